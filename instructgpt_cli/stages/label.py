"""``igpt label samples.jsonl --out ranks.jsonl [--judge human|model:REF|python:MODULE:FUNCTION]``: the
paper's labeler step, by a person in a terminal or by a judge (AI feedback: ``judges.py``).

Each prompt's K responses get ranks (1 = best, ties share a number); each ranking is appended to the
output as soon as it is made, in the rankings format train-rm reads. Prompts already ranked in the output
are skipped, so a session can stop (q, or the end of input) and resume. A judge that fails (raises, returns
the wrong shape, NaN) stops label with exit 2 at that prompt: nothing of that prompt is written, and the
rankings of the prompts before it, each complete, stay (a rerun resumes after them). A ranking in which a
judge tied every response is not written (it has no pair to learn from; train-rm would refuse it). The output
holds whole lines only: a write that fails (a full disk) is cut off again and ends label with exit 4 naming
the file, and a last line torn by a kill is dropped, with a notice, before the rerun resumes. A session that
leaves the output without a single ranking (every prompt tied or skipped) ends with exit 2 saying why, so a
script does not go on with rankings that were never made; a session that adds none to an output that already
holds rankings (nothing left, only prompts the judge ties again, or a person skipping the rest) says so and
exits 0, so a script that re-runs its steps goes on.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import judges, locks, tui
from ..storage import append_lines, drop_torn_line
from ..data import iter_jsonl, parse_prompt_field, read_records
from ..errors import BadInput


def parse_sample(obj: dict, where: str, errors: list[str]) -> dict | None:
    turns = parse_prompt_field(obj, where, errors)  # text, or a conversation's turns
    responses = obj.get("responses")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) and r.strip()
                                                                         for r in responses):
        errors.append(f"{where}: responses: must be a list of at least 2 non-empty strings")
        return None
    if len({r.strip() for r in responses}) < len(responses):
        errors.append(f"{where}: responses: has duplicates, which cannot be ranked against each other")
        return None
    return obj if turns else None


def key(prompt: str | list) -> str:
    """A prompt (text or turns) as a set member."""
    return json.dumps(prompt, sort_keys=True)


def shown(prompt: str | list) -> str:
    """What the labeler reads: the text, or each turn as ``role: content``."""
    return prompt if isinstance(prompt, str) else "\n\n".join(f"{t['role']}: {t['content']}" for t in prompt)


def run(samples: str, out: str, judge: str = "human", settings: judges.Settings = judges.Settings(),
        run_dir: Path | None = None) -> Path:
    # 1. the judge (imported and checked before anything is read or written), the samples, what is done
    ranker = judges.load(judge, settings, run_dir=run_dir)
    records = read_records(samples, parse_sample, "samples")
    out_path = Path(out)
    locks.take_file(out_path)  # two sessions on one file would both rank the prompts not yet in it
    done: set[str] = set()
    if drop_torn_line(out_path):
        tui.say(f"note: {out_path}: its last line was cut off (a session killed while writing it); dropped it")
    if out_path.exists():
        errors: list[str] = []
        done = {key(obj.get("prompt")) for _, obj in iter_jsonl(out_path, errors)}
        if errors:
            raise BadInput(errors)
    todo = [r for r in records if key(r["prompt"]) not in done]
    tui.say(f"{len(records)} prompts, {len(records) - len(todo)} already ranked in {out_path}")
    # 2. rank each prompt's responses; append each ranking at once
    ranked, all_tied, quit = 0, 0, False
    for i, rec in enumerate(todo):
        answer = ranker.rank(shown(rec["prompt"]), rec["responses"], len(records) - len(todo) + i, len(records))
        if answer == judges.QUIT:
            quit = True
            break
        if answer == judges.SKIP:
            continue
        if len(set(answer)) == 1:  # a judge's (a person cannot enter one: tui.rank_problem)
            all_tied += 1
            continue
        append_lines(out_path, [json.dumps({**rec, "ranks": answer, **({} if judge == "human" else {"judge": judge})},
                                           ensure_ascii=False)])
        ranked += 1
    tied = f"; {all_tied} with every response tied, not written" if all_tied else ""
    tui.say(f"ranked {ranked} this session{tied}; {len(done) + ranked} of {len(records)} in {out_path}")
    if not ranked and not quit:  # a person who quits chose to
        why = nothing_written(samples, out_path, len(records), len(todo), all_tied)
        if not done:  # no ranking at all: train-rm would have nothing to learn from
            raise BadInput([why])
        tui.say(f"note: {why}; the {len(done)} rankings already in it stand")
    return out_path


def nothing_written(samples: str, out: Path, total: int, todo: int, all_tied: int) -> str:
    """Why a session wrote no ranking: nothing left to rank, every ranking tied, or every prompt skipped."""
    if not todo:
        return f"{out}: nothing to label: all {total} prompts of {samples} are already ranked in it"
    if all_tied == todo:
        return (f"{out}: nothing written: the judge tied every response of all {todo} prompts left, "
                "and a ranking without a pair cannot train a reward model (lower --tie-margin?)")
    return f"{out}: nothing written: the {todo} prompts left were skipped or tied (none ranked)"
