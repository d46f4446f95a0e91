"""igpt eval's paper evaluations through the command: toxicity sampled and scored (numbers by hand from the
continuations it kept), several models in one table (eval/summary/), fresh reports reused and stale ones
refused, and every bad input refused before any sampling with nothing written."""
import json
import math

import pytest

from conftest import REPO, TINY_CONFIG, igpt, write_jsonl
from instructgpt_cli import toxicity
from instructgpt_cli.runners import Runner
from instructgpt_cli.stats import t_quantile, wilson_interval
from rule_rm import sft_with_rule_rm
from test_toxicity import tiny_classifier

# a transparent toxicity function: the share of the letter 'e' among a continuation's letters, doubled, capped
TOXRULE = '''
def score(texts):
    out = []
    for t in texts:
        letters = [c for c in t.lower() if c.isalpha()]
        out.append(min(1.0, 2 * sum(c == "e" for c in letters) / len(letters)) if letters else 0.0)
    return out
'''


def rule(text):
    letters = [c for c in text.lower() if c.isalpha()]
    return min(1.0, 2 * sum(c == "e" for c in letters) / len(letters)) if letters else 0.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run: sft, a rule reward model as rm/final, a short PPO run; prompts and toxicity prompts."""
    t = tmp_path_factory.mktemp("evalsuite")
    run_dir = t / "run"
    sft_with_rule_rm(t, run_dir, run_dir / "rm" / "final", demos=24, steps=4)
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"Write about {w}."} for w in "cats dogs rain snow".split()])
    result = igpt("ppo", "--config", TINY_CONFIG, "--prompts", t / "prompts.jsonl", "--run-dir", run_dir,
                  "--max-steps", "2")
    assert result.exit_code == 0, result.output
    write_jsonl(t / "tox.jsonl", [{"prompt": {"text": "The referee was a"}, "challenging": True},
                                  {"prompt": {"text": "My neighbour is a"}, "challenging": False},
                                  {"prompt": {"text": "The weather today is"}, "challenging": False}])
    (t / "toxrule.py").write_text(TOXRULE, encoding="utf-8")
    return t


def tox_args(run, *extra):
    return ["--toxicity-prompts", run / "tox.jsonl", "--toxicity-classifier", "python:toxrule:score",
            "--toxicity-samples", "3", "--toxicity-max-new-tokens", "6", *extra]


def test_toxicity_numbers_are_those_of_the_continuations_it_kept(run, monkeypatch):
    monkeypatch.syspath_prepend(str(run))
    result = igpt("eval", "ppo", "--run-dir", run / "run", *tox_args(run), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = [json.loads(x) for x in (run / "run" / "eval" / "ppo" / "toxicity.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The referee was a", "My neighbour is a", "The weather today is"]
    assert all(len(r["continuations"]) == len(r["toxicity"]) == 3 for r in rows)
    by_hand = [[rule(c) for c in r["continuations"]] for r in rows]
    assert [x for r in rows for x in r["toxicity"]] == pytest.approx([x for s in by_hand for x in s])
    maxima = [max(s) for s in by_hand]
    tox = report["toxicity"]
    assert tox["n"] == 3 and tox["k"] == 3
    assert tox["expected_max_toxicity"] == pytest.approx(sum(maxima) / 3)
    sd = math.sqrt(sum((m - sum(maxima) / 3) ** 2 for m in maxima) / 2)
    half = t_quantile(0.975, 2) * sd / math.sqrt(3)
    lo, hi = tox["expected_max_toxicity_ci"]
    assert lo == pytest.approx(max(0.0, sum(maxima) / 3 - half)) and hi == pytest.approx(min(1.0, sum(maxima) / 3 + half))
    toxic = sum(m >= 0.5 for m in maxima)
    assert tox["toxicity_probability"] == pytest.approx(toxic / 3)
    assert tox["toxicity_probability_ci"] == pytest.approx(list(wilson_interval(toxic / 3, 3)))
    assert set(tox["categories"]) == {"challenging", "not challenging"}
    assert tox["categories"]["challenging"]["n"] == 1
    # no --prompts: the held-out prompt measurements are absent, not zero
    assert "score_mean" not in report and "kl_to_sft" not in report
    # and compare, which reuses eval's samples of the same weights, finds none here (and samples its own)
    compared = igpt("compare", "ppo", "sft", "--run-dir", run / "run", "--prompts", run / "prompts.jsonl",
                    "--max-new-tokens", "4", "--overwrite")
    assert compared.exit_code == 0, compared.output


def test_a_toxicity_classifier_directory_scores_the_toxic_label(run, tmp_path):
    clf = tiny_classifier(tmp_path / "clf", ["non-toxic", "toxic"])
    out = tmp_path / "out"
    result = igpt("eval", "sft", "--run-dir", run / "run", "--name", "sft-clf", "--toxicity-prompts", run / "tox.jsonl",
                  "--toxicity-classifier", clf, "--toxicity-samples", "2", "--toxicity-max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (run / "run" / "eval" / "sft-clf" / "toxicity.jsonl").read_text().splitlines()]
    scorer = toxicity.load_classifier(str(clf), "toxic", "cpu", 8)
    for r in rows:
        assert r["toxicity"] == pytest.approx(scorer.score(r["continuations"]), abs=1e-6)
    del out


def test_several_models_make_one_table_and_fresh_reports_are_reused(run, monkeypatch):
    monkeypatch.syspath_prepend(str(run))
    run_dir = run / "run"
    from instructgpt_cli.stages import evaluate

    write_jsonl(run / "pretrain.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * 6}] * 3)
    common = ["--run-dir", run_dir, "--prompts", run / "prompts.jsonl", "--max-new-tokens", "8", *tox_args(run),
              "--ptx-data", run / "pretrain.jsonl"]
    losses, real = [], evaluate.lm_loss
    monkeypatch.setattr(evaluate, "lm_loss", lambda *a, **k: losses.append(1) or real(*a, **k))
    first = igpt("eval", "sft", "ppo", *common, "--json", "--overwrite")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["models"] == ["sft", "ppo"]
    each = {m: json.loads((run_dir / "eval" / m / "report.json").read_text()) for m in ("sft", "ppo")}
    for row in summary["rows"]:
        r = each[row["model"]]
        assert row["score_mean"] == r["score_mean"] and row["kl_to_sft"] == r["kl_to_sft"]
        assert row["toxicity"]["expected_max_toxicity"] == r["toxicity"]["expected_max_toxicity"]
        n, m, sd = r["n"], r["score_mean"], r["score_sd"]
        half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        assert row["score_ci"] == pytest.approx([m - half, m + half])
    assert summary["rows"][0]["kl_to_sft"] == 0.0
    # SFT's pretraining loss is measured once: ppo's alignment tax reads it from eval/sft/report.json
    assert len(losses) == 2 and each["ppo"]["sft_ptx_loss"] == each["sft"]["ptx_loss"]
    assert each["ppo"]["alignment_tax"] == each["ppo"]["ptx_loss"] - each["sft"]["ptx_loss"]
    page = (run_dir / "eval" / "summary" / "report.html").read_text()
    assert "<table>" in page and "expected max toxicity" in page and "ppo" in page
    # the same command again: both reports are fresh (same weights, settings, data), nothing is sampled
    monkeypatch.setattr(Runner, "generate", lambda *a, **k: pytest.fail("a fresh report was measured again"))
    again = igpt("eval", "sft", "ppo", *common, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["rows"] == summary["rows"]
    assert "reused" in again.stderr
    # other settings: the earlier reports are stale, and kept unless --overwrite (before any sampling)
    stale = igpt("eval", "sft", "ppo", *common, "--seed", "7")
    assert stale.exit_code == 2 and "already has results" in stale.stderr


@pytest.mark.parametrize("args,needle", [
    (["--toxicity-prompts", "tox.jsonl"], "--toxicity-classifier: required"),
    (["--toxicity-classifier", "python:toxrule:score"], "--toxicity-prompts: required"),
    (["--toxicity-prompts", "tox.jsonl", "--toxicity-classifier", "python:nosuchmod:score"], "nosuchmod"),
    (["--toxicity-prompts", "bad.jsonl", "--toxicity-classifier", "python:toxrule:score"], "bad.jsonl:1"),
    (["--limit", "3"], "--benchmarks: required"),
    ([], "--prompts: required"),
    (["--prompts", "tox.jsonl", "--name", "summary"], "name this report otherwise"),
])
def test_bad_evaluation_inputs_exit_2_before_any_sampling_with_nothing_written(run, tmp_path, monkeypatch, args,
                                                                               needle):
    monkeypatch.syspath_prepend(str(run))
    write_jsonl(run / "bad.jsonl", [{"prompt": {"txt": "x"}}])
    monkeypatch.setattr(Runner, "generate", lambda *a, **k: pytest.fail("sampled before the inputs were checked"))
    args = [run / a if a.endswith(".jsonl") else a for a in args]
    result = igpt("eval", "sft", "--run-dir", run / "run", "--name", "bad", *args)
    assert result.exit_code == 2 and needle in result.stderr, result.output
    assert not (run / "run" / "eval" / "bad").exists() and not (run / "run" / "eval" / ".bad.partial").exists()


def test_a_classifier_without_the_label_is_refused_naming_its_labels(run, tmp_path):
    clf = tiny_classifier(tmp_path / "clf", ["LABEL_0", "LABEL_1"])
    result = igpt("eval", "sft", "--run-dir", run / "run", "--name", "nolabel", "--toxicity-prompts",
                  run / "tox.jsonl", "--toxicity-classifier", clf)
    assert result.exit_code == 2 and "LABEL_1" in result.stderr, result.output
    assert not (run / "run" / "eval" / "nolabel").exists()


def test_benchmarks_through_eval_report_each_model_and_the_tax_to_sft(run, monkeypatch):
    pytest.importorskip("lm_eval")
    from instructgpt_cli import benchmarks

    calls, real = [], benchmarks.run
    monkeypatch.setattr(benchmarks, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_dir = run / "run"
    result = igpt("eval", "sft", "ppo", "--run-dir", run_dir, "--benchmarks", "igpt_basics", "--benchmark-tasks",
                  REPO / "data" / "benchmarks", "--limit", "6", "--json", "--overwrite")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tasks"] == ["igpt_basics"]
    sft, ppo = (json.loads((run_dir / "eval" / m / "report.json").read_text())["benchmarks"] for m in ("sft", "ppo"))
    assert sft["tasks"]["igpt_basics"]["n"] == 6 and "tax" not in sft  # SFT's difference to itself is not reported
    tax = ppo["tax"]["igpt_basics"]["acc"]
    a, b = ppo["tasks"]["igpt_basics"]["metrics"]["acc"], sft["tasks"]["igpt_basics"]["metrics"]["acc"]
    assert tax["diff"] == pytest.approx(a["value"] - b["value"])
    assert tax["stderr"] == pytest.approx(math.hypot(a["stderr"], b["stderr"]))
    assert ppo["sft_tasks"] == sft["tasks"] and len(calls) == 2  # SFT's read from eval/sft/report.json, not rerun
    row = {r["model"]: r for r in summary["rows"]}["ppo"]["benchmarks"]["igpt_basics"]
    norm = [r["tasks"]["igpt_basics"]["metrics"]["acc_norm"]["value"] for r in (ppo, sft)]
    assert row["metric"] == "acc_norm" and row["tax"]["diff"] == pytest.approx(norm[0] - norm[1])


def test_toxicity_alone_needs_no_sft_model_in_the_run(run, tmp_path, monkeypatch):
    """A model from elsewhere, a fresh run directory, toxicity only: no KL, no tax, so no SFT model is needed."""
    monkeypatch.syspath_prepend(str(run))
    result = igpt("eval", run / "run" / "sft" / "final", "--run-dir", tmp_path / "elsewhere", *tox_args(run), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["toxicity"]["n"] == 3 and "kl_to_sft" not in report
    # and two such models in one table
    both = igpt("eval", run / "run" / "sft" / "final", run / "run" / "ppo" / "final" / "policy", "--run-dir",
                tmp_path / "elsewhere", *tox_args(run), "--json", "--overwrite")
    assert both.exit_code == 0, both.output
    assert [r["toxicity"]["n"] for r in json.loads(both.stdout)["rows"]] == [3, 3]


def test_the_table_says_dash_where_a_report_has_no_number():
    """eval_table.cells: a model without a reward model, a benchmark or toxicity shows '-' in those cells, never
    0; a benchmark measured shows its value and standard error, and its difference to SFT with the interval."""
    from instructgpt_cli.eval_table import cells

    bare = {"model": "dpo", "score_mean": None, "score_ci": None, "kl_to_sft": 0.5, "response_length": 12.0,
            "eos_rate": 1.0, "ptx_perplexity": None, "benchmarks": {}, "toxicity": None}
    assert cells(bare, ["basics"]) == ["dpo", "-", "0.500", "12.0", "100%", "-", "-", "-", "-"]
    measured = {**bare, "score_mean": 0.25, "score_ci": [0.2, 0.3],
                "benchmarks": {"basics": {"value": 0.5, "stderr": 0.05, "tax": {"diff": -0.1, "ci95": [-0.2, 0.0]}}}}
    assert cells(measured, ["basics"], compact=True)[1:2] == ["0.250 ±0.050"]
    assert cells(measured, ["basics"], compact=True)[6:8] == ["0.500 ±0.050", "-0.100 ±0.100"]
    assert cells(measured, ["basics"])[6] == "0.500 ±0.050 (-0.100 [-0.200, +0.000])"
