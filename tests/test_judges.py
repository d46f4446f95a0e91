"""Judges as plug-ins (judges.py): a Python function and a local LM judge compare and label; the verdict
arithmetic by hand; both orders asked; a bad judge exits 2 naming itself, with nothing written."""
from __future__ import annotations

import json
import os
import math
import sys
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, igpt, write_jsonl
from rule_rm import make_constant_lm

from instructgpt_cli.data import read_rankings
from instructgpt_cli.models import tiny_tokenizer


@pytest.fixture(autouse=True)
def own_sys_path(monkeypatch):
    """A python judge puts the current directory on sys.path: each test gets its sys.path back."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Hand-built LMs: one always stops at once (an empty response), one always says 'x'; one always answers
    '1', whichever response is first (pure position bias)."""
    t = tmp_path_factory.mktemp("judges")
    tok = tiny_tokenizer()
    make_constant_lm(t / "stopper", tok, tok.eos_token)
    make_constant_lm(t / "xer", tok, "x")
    make_constant_lm(t / "says1", tok, "1")
    write_jsonl(t / "prompts.jsonl", [{"prompt": p} for p in ("qq", "zz", "write")])
    return t


def compare(t, run_dir, judge, *extra):
    return igpt("compare", t / "stopper", t / "xer", "--prompts", t / "prompts.jsonl", "--run-dir", run_dir,
                "--temperature", "0", "--max-new-tokens", "4", "--judge", judge, *extra)


RULES = '''
def length(prompt, responses):
    return [len(r) for r in responses]

def shortness(prompt, responses):
    return [-len(r) for r in responses]

def bananas(prompt, responses):
    return [r.count("banana") for r in responses]
'''

# hand-checkable: the number of 'banana's ranks them; equal counts tie
SAMPLES = [{"prompt": "p0", "responses": ["banana banana", "no fruit", "one banana"]},   # 2 0 1 -> 1 3 2
           {"prompt": "p1", "responses": ["banana", "also banana", "none"]},           # 1 1 0 -> 1 1 2
           {"prompt": "p2", "responses": ["a", "b"]},                                  # 0 0 -> all tied
           {"prompt": "p3", "responses": ["x", "banana x banana x banana", "banana"]}]  # 0 3 1 -> 3 1 2


def test_ranks_verdicts_and_answer_margins_by_hand():
    import torch

    from instructgpt_cli.judges import answer_margin, both_orders, ranks_from_scores, winner

    assert ranks_from_scores([3.0, 1.0, 3.0, 2.0]) == [1, 3, 1, 2]  # ties share a rank; dense
    assert ranks_from_scores([1.0, 1.4, 3.0], margin=0.5) == [2, 2, 1]
    # a rank spans at most the margin: no chain of small steps ties the ends (0.34 and 0.09 are 0.25 apart)
    assert ranks_from_scores([0.2, 0.343, 0.088, 0.257, 0.115], margin=0.1) == [2, 1, 3, 1, 2]
    assert ranks_from_scores([0.3, 0.2, 0.1, 0.0], margin=0.1) == [1, 1, 2, 2]  # a difference of exactly margin ties
    assert ranks_from_scores([5.0]) == [1]
    assert (winner(1.0, 1.5, 0.5), winner(1.0, 1.6, 0.5), winner(2.0, 1.0, 0.0)) == ("tie", "B", "A")
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 0.0, 0.0, -1.0]])
    got = answer_margin(logits, ones=[1], twos=[2, 3]).tolist()  # "2" has two token forms: their mass adds
    assert got == pytest.approx([1.0 - math.log(math.e ** 2 + math.e ** 3), 0.0 - math.log(1 + math.e ** -1)])
    assert both_orders(1.0, -1.0, 0.0) == "first"   # X first: '1'; Y first: '2' -> X both times
    assert both_orders(-2.0, 3.0, 0.0) == "second"
    assert both_orders(1.0, 1.0, 0.0) == "tie"      # '1' whatever comes first: position bias, no preference
    assert both_orders(0.3, -0.3, 0.5) == "tie"     # within the margin
    assert both_orders(0.6, -0.6, 0.5) == "first"


def test_label_with_a_python_judge_ranks_by_the_rule_resumes_and_feeds_train_rm(tmp_path, monkeypatch):
    (tmp_path / "label_rules.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)  # found in the current directory, as `python -m` finds modules
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    out = tmp_path / "ranks.jsonl"
    result = igpt("label", samples, "--judge", "python:label_rules:bananas", "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 with every response tied, not written" in result.output
    ranked = read_rankings(out)  # train-rm's own reader accepts it
    assert [(r.prompt, r.ranks) for r in ranked] == [("p0", [1, 3, 2]), ("p1", [1, 1, 2]), ("p3", [3, 1, 2])]
    assert {json.loads(line)["judge"] for line in out.read_text().splitlines()} == {"python:label_rules:bananas"}
    again = igpt("label", samples, "--judge", "python:label_rules:bananas", "--out", out)
    assert again.exit_code == 0 and "3 already ranked" in again.output  # p2, left, is tied again: nothing written;
    said = " ".join(again.output.split())  # it says so, the 3 rankings stand, and a script's rerun goes on
    assert "tied every response of all 1 prompts left" in said and "the 3 rankings already in it stand" in said
    assert len(read_rankings(out)) == 3  # resumed: the ranked prompts are not ranked twice
    trained = igpt("train-rm", "--config", TINY_CONFIG, "--model", "tiny", "--rankings", out, "--run-dir",
                   tmp_path / "run", "--max-steps", "1", "--val-fraction", "0", "--no-normalize")
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "run" / "rm" / "final" / "config.json").is_file()


def test_compare_win_rate_follows_a_python_rule(models, tmp_path, monkeypatch):
    (tmp_path / "cmp_rules.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    # A stops at once (''), B says 'xxxx': the longer response wins every pair, the shorter loses every pair
    for judge, wins, losses in (("python:cmp_rules:length", 0, 3), ("python:cmp_rules:shortness", 3, 0)):
        result = compare(models, run_dir, judge)
        assert result.exit_code == 0, result.output
        out = run_dir / "compare" / f"stopper-vs-xer.{judge.replace(':', '-')}"
        report = json.loads((out / "report.json").read_text())
        assert (report["wins"], report["losses"], report["ties"], report["judge"]) == (wins, losses, 0, judge)
        assert report["win_rate"] == wins / 3
        assert report["judge_source"]["file"] == str(tmp_path / "cmp_rules.py")
        judged = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
        sign = 1 if judge.endswith("length") else -1
        assert [(j["score_a"], j["score_b"]) for j in judged] == [(0.0, sign * 4.0)] * 3
        assert "cmp_rules.py" in (out / "report.html").read_text()
    # a difference of 4 within --tie-margin 4: every pair a tie, win rate 1/2
    result = compare(models, run_dir, "python:cmp_rules:length", "--tie-margin", "4", "--overwrite")
    report = json.loads((run_dir / "compare" / "stopper-vs-xer.python-cmp_rules-length" / "report.json").read_text())
    assert (report["ties"], report["win_rate"]) == (3, 0.5)


def test_a_model_judge_that_always_answers_1_makes_every_pair_a_tie(models, tmp_path):
    """A real forward of a judge LM that prefers '1' after any input: the first order picks A, the swapped
    order picks B, so every verdict is a tie; in label every response ties, and nothing is written."""
    run_dir = tmp_path / "run"
    judge = f"model:{models / 'says1'}"
    result = compare(models, run_dir, judge, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    out = run_dir / "compare" / next(p.name for p in (run_dir / "compare").iterdir() if "says1" in p.name)
    report = json.loads((out / "report.json").read_text())
    assert (report["ties"], report["n"], report["win_rate"], report["judge"]) == (3, 3, 0.5, judge)
    judged = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    margins = [(j["margin_a_first"], j["margin_b_first"]) for j in judged]
    assert all(a > 1.0 and b > 1.0 for a, b in margins)  # '1' both times, by a wide margin
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"][out.relative_to(run_dir).as_posix()]["inputs"]["judge"]["path"] == \
        str((models / "says1").resolve())
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES[:2])
    labelled = igpt("label", samples, "--judge", judge, "--out", tmp_path / "ranks.jsonl")
    assert labelled.exit_code == 2 and "2 with every response tied" in labelled.output  # nothing written: said why
    assert not (tmp_path / "ranks.jsonl").exists()


def test_a_model_judge_asks_both_orders_in_batches_and_ranks_by_wins(models, tmp_path, monkeypatch):
    """A judge whose logits we set: '1' gets the number of bananas in response 1 plus a position bias of 0.5,
    '2' those of response 2. Equal counts: '1' in both orders -> a tie; a count higher by 1 or more wins in
    both orders."""
    import torch

    from instructgpt_cli import judges

    tok = tiny_tokenizer()
    one, two = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")
    seen: list[tuple[str, str]] = []
    calls: list[int] = []

    def fake_logits(model, ids, mask):
        calls.append(ids.size(0))
        logits = torch.zeros(ids.size(0), len(tok))
        for row, (r_ids, r_mask) in enumerate(zip(ids.tolist(), mask.tolist())):
            assert r_mask[-1] == 1  # left-padded: the answer position is the last column
            text = tok.decode([t for t, m in zip(r_ids, r_mask) if m])
            first = text.split("Response 1:\n")[1].split("\n\nResponse 2:")[0]
            second = text.split("Response 2:\n")[1].split("\n\nWhich")[0]
            seen.append((first, second))
            logits[row, one], logits[row, two] = first.count("banana") + 0.5, second.count("banana")
        return logits

    monkeypatch.setattr(judges, "answer_logits", fake_logits)
    samples = write_jsonl(tmp_path / "samples.jsonl", [SAMPLES[0], SAMPLES[1]])
    out = tmp_path / "ranks.jsonl"
    result = igpt("label", samples, "--judge", f"model:{models / 'says1'}", "--out", out, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    # counts 2 0 1: every pair decided -> points 2 0 1 -> ranks 1 3 2; counts 1 1 0: the 1-1 pair ties on bias
    assert [r.ranks for r in read_rankings(out)] == [[1, 3, 2], [1, 1, 2]]
    for s in SAMPLES[:2]:  # each of the C(3,2) pairs asked in both orders
        rs = s["responses"]
        asked = [(f, g) for f, g in seen if f in rs and g in rs]
        assert sorted(asked) == sorted((rs[i], rs[j]) for i in range(3) for j in range(3) if i != j)
    assert calls == [4, 2, 4, 2]  # 6 prompts per sample, 4 per forward


def judge_files(tmp_path: Path) -> Path:
    (tmp_path / "bad_judges.py").write_text('''
def boom(prompt, responses):
    raise ValueError("boom")

def three(prompt, responses):
    return [1.0, 2.0, 3.0]

def two(prompt, responses):
    return [1.0, 2.0]

def nan(prompt, responses):
    return [float("nan")] * len(responses)

def scalar(prompt, responses):
    return 1.0

def words(prompt, responses):
    return ["good"] * len(responses)

def one_argument(prompt):
    return [0.0]

def fails_at_p1(prompt, responses):
    if prompt == "p1":
        raise RuntimeError("rate limited")
    return [r.count("banana") for r in responses]
''')
    return write_jsonl(tmp_path / "samples.jsonl", SAMPLES[:1])


@pytest.mark.parametrize("judge, message", [
    ("python:bad_judges:boom", "--judge python:bad_judges:boom: raised ValueError: boom (prompt 1)"),
    ("python:bad_judges:two", "--judge python:bad_judges:two: returned 2 scores for 3 responses"),
    ("python:bad_judges:nan", "--judge python:bad_judges:nan: score 0 is nan, not a finite number"),
    ("python:bad_judges:scalar", "--judge python:bad_judges:scalar: returned float, not a list of 3 numbers"),
    ("python:bad_judges:words", "--judge python:bad_judges:words: score 0 is str 'good', not a number"),
    ("python:bad_judges:one_argument", "one_argument(prompt) must take (prompt, responses)"),
    ("python:bad_judges:missing", "--judge python:bad_judges:missing: bad_judges ("),
    ("python:no_such_judges_module:score", "--judge python:no_such_judges_module:score: cannot import"),
    ("crowd", "--judge crowd: must be rm, human, model:REF or python:MODULE:FUNCTION"),
    ("rm", "--judge rm: the reward model judges compare's sampled tokens only"),
])
def test_a_bad_judge_in_label_exits_2_naming_it_and_writes_nothing(tmp_path, monkeypatch, judge, message):
    samples = judge_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = igpt("label", samples, "--judge", judge, "--out", tmp_path / "ranks.jsonl")
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "ranks.jsonl").exists()


def test_a_bad_judge_in_compare_exits_2_and_publishes_nothing(models, tmp_path, monkeypatch):
    from instructgpt_cli.refs import Side

    judge_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    result = compare(models, run_dir, "python:bad_judges:three")  # fails at its first call, after sampling
    assert result.exit_code == 2, result.output
    assert "--judge python:bad_judges:three: returned 3 scores for 2 responses (pair 1" in result.stderr
    assert not (run_dir / "compare").exists() or not any((run_dir / "compare").iterdir())
    # a judge that cannot load fails before any model loads or samples
    monkeypatch.setattr(Side, "load", lambda *a, **k: pytest.fail("a model loaded"))  # how compare loads a model
    for judge, message in (("python:bad_judges:missing", "has no function missing"),
                           (f"model:{tmp_path / 'nowhere'}", "nowhere: not a stage of the run (sft, ppo, rm, dpo, "
                                                             "ppo_ema) nor a model directory with config.json")):
        result = compare(models, run_dir, judge)
        assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_a_judge_that_fails_midway_keeps_the_complete_rankings_before_it_and_resumes(tmp_path, monkeypatch):
    judge_files(tmp_path)
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ranks.jsonl"
    result = igpt("label", samples, "--judge", "python:bad_judges:fails_at_p1", "--out", out)
    assert result.exit_code == 2
    assert "--judge python:bad_judges:fails_at_p1: raised RuntimeError: rate limited (prompt 2)" in result.stderr
    assert [(r.prompt, r.ranks) for r in read_rankings(out)] == [("p0", [1, 3, 2])]  # nothing of p1
    (tmp_path / "good_judge.py").write_text(RULES)
    again = igpt("label", samples, "--judge", "python:good_judge:bananas", "--out", out)
    assert again.exit_code == 0 and "1 already ranked" in again.output
    assert [(r.prompt, r.ranks) for r in read_rankings(out)] == [("p0", [1, 3, 2]), ("p1", [1, 1, 2]),
                                                                   ("p3", [3, 1, 2])]


def test_label_holds_its_output_and_a_python_judge_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    """Two label sessions on one --out would rank the same prompts twice: the second is refused (exit 2,
    naming the holder). The judge's module is found in the current directory for its import only: a user's
    yaml.py or datasets.py there must not shadow the library for the rest of the command."""
    from instructgpt_cli import locks

    (tmp_path / "label_rules.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    out = tmp_path / "ranks.jsonl"
    holder = locks.Lock(tmp_path / ".ranks.jsonl.lock", str(out))
    holder.acquire()
    try:
        refused = igpt("label", samples, "--judge", "python:label_rules:bananas", "--out", out)
    finally:
        holder.release()
    assert refused.exit_code == 2 and str(os.getpid()) in refused.stderr and not out.exists()
    before = list(sys.path)
    result = igpt("label", samples, "--judge", "python:label_rules:bananas", "--out", out)
    assert result.exit_code == 0, result.output
    assert sys.path == before and len(read_rankings(out)) == 3
