"""The one exception that turns into exit code 2: bad input, reported in full, with nothing written."""
from __future__ import annotations


class BadInput(Exception):
    """Bad user input (data file, config, flag, path). ``messages`` are lines like
    ``demos.jsonl:17: response: must be a non-empty string``; all are reported, not only the first."""

    def __init__(self, messages: list[str] | str):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))
