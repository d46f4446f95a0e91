"""The shipped data set: valid for igpt, big enough, the paper's category mix, eval prompts held out."""
import collections
import json

import pytest

from conftest import REPO
from instructgpt_cli.data import read_demos, read_pretrain, read_prompts, read_rankings

DATA = REPO / "data"
PAPER_MIX = {"generation": 45.6, "open_qa": 12.4, "brainstorming": 11.2, "chat": 8.4, "rewrite": 6.6,
             "summarization": 4.2, "classification": 3.5, "other": 3.5, "closed_qa": 2.6, "extraction": 1.9}


def test_every_file_passes_validation_and_meets_its_size():
    assert len(read_demos(DATA / "demos.jsonl")) >= 300
    rankings = read_rankings(DATA / "rankings.jsonl")
    assert len(rankings) >= 150 and all(4 <= len(r.responses) <= 6 for r in rankings)
    assert len(read_prompts(DATA / "prompts.jsonl")) >= 300
    assert len(read_prompts(DATA / "eval_prompts.jsonl")) >= 100
    assert (DATA / "pretrain.jsonl").stat().st_size >= 200_000
    assert read_pretrain(DATA / "pretrain.jsonl") and read_pretrain(DATA / "pretrain_heldout.jsonl")


@pytest.mark.parametrize("name", ["demos", "rankings", "prompts", "eval_prompts"])
def test_category_mix_is_within_3_points_of_the_paper(name):
    lines = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
    counts = collections.Counter(r["category"] for r in lines)
    assert set(counts) == set(PAPER_MIX)
    for category, target in PAPER_MIX.items():
        assert abs(100 * counts[category] / len(lines) - target) <= 3.0, (category, counts[category])


def test_eval_prompts_appear_in_no_other_file():
    def prompts(name):
        return {json.loads(line)["prompt"].strip().lower() for line in (DATA / name).read_text().splitlines()}

    held_out = prompts("eval_prompts.jsonl")
    for other in ("demos.jsonl", "rankings.jsonl", "prompts.jsonl"):
        assert not held_out & prompts(other), other
    texts = lambda name: {json.loads(l)["text"] for l in (DATA / name).read_text().splitlines()}  # noqa: E731
    assert not texts("pretrain.jsonl") & texts("pretrain_heldout.jsonl")
