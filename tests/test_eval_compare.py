"""eval, compare and label: the arithmetic by hand, the reports, the human judge through its input."""
import json
import math
import shutil

import pytest

from conftest import TINY_CONFIG, arithmetic_demos, igpt, write_jsonl
from instructgpt_cli.data import read_rankings
from instructgpt_cli.models import tiny_tokenizer
from instructgpt_cli.stages.compare import tally
from instructgpt_cli.stats import wilson_interval, win_rate
from rule_rm import make_rule_rm


def test_wilson_interval_by_hand_85_of_100():
    z = 1.959963984540054
    p, n = 0.85, 100
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    r = win_rate(85, 0, 15)
    assert r["win_rate"] == 0.85
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((center - half, center + half))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.7672, 0.9069), abs=1e-4)


def test_ties_count_half_and_swapping_gives_one_minus():
    r = win_rate(50, 20, 30)
    assert r["win_rate"] == pytest.approx(0.6)
    s = win_rate(30, 20, 50)  # B over A
    assert s["win_rate"] == pytest.approx(1 - r["win_rate"])
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((1 - r["ci_high"], 1 - r["ci_low"]))
    judgments = [{"winner": w, "category": c} for w, c in [("A", "x"), ("A", "x"), ("tie", "y"), ("B", "y")]]
    by_cat = tally(judgments, "category")
    assert by_cat["x"]["win_rate"] == 1.0 and by_cat["y"]["win_rate"] == 0.25
    assert wilson_interval(0.0, 0) == (0.0, 1.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run: sft, a rule reward model as rm/final, and a short PPO run."""
    t = tmp_path_factory.mktemp("evalrun")
    write_jsonl(t / "demos.jsonl", arithmetic_demos(24))
    run_dir = t / "run"
    assert igpt("sft", "--config", TINY_CONFIG, "--data", t / "demos.jsonl", "--run-dir", run_dir,
                "--max-steps", "6").exit_code == 0
    make_rule_rm(run_dir / "rm" / "final", tiny_tokenizer(), "e")
    cats = ["generation", "open_qa"]
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"Write about {w}.", "category": cats[i % 2]}
                                      for i, w in enumerate("cats dogs rain snow tea maps bread lamps".split())])
    write_jsonl(t / "pretrain.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * 8}] * 4)
    result = igpt("ppo", "--config", TINY_CONFIG, "--prompts", t / "prompts.jsonl", "--run-dir", run_dir,
                  "--max-steps", "3", "--ptx-coef", "0.5", "--ptx-data", t / "pretrain.jsonl")
    assert result.exit_code == 0, result.output
    return t


def test_eval_reports_kl_scores_tax_and_categories(run):
    run_dir = run / "run"
    rankings = write_jsonl(run / "held_out_ranks.jsonl", [
        {"prompt": "p", "responses": ["eeee eee", "xyz", "e x"], "ranks": [1, 3, 2]},
        {"prompt": "q", "chosen": "see the bee", "rejected": "no way"}])
    common = ["--prompts", run / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "16",
              "--ptx-data", run / "pretrain.jsonl", "--json"]
    ppo = igpt("eval", "ppo", *common, "--rankings", rankings)
    assert ppo.exit_code == 0, ppo.output
    report = json.loads(ppo.stdout)
    assert report["kl_to_sft"] > 0 and math.isfinite(report["kl_to_sft"])
    for key in ("score_mean", "score_sd", "response_length", "eos_rate", "ptx_loss", "ptx_perplexity",
                "sft_ptx_loss", "alignment_tax"):
        assert math.isfinite(report[key]), key
    assert report["ptx_perplexity"] == pytest.approx(math.exp(report["ptx_loss"]))
    assert report["rm_pairs"] == 4 and report["rm_accuracy"] == 1.0  # the rule RM ranks 'e'-rich text higher
    assert set(report["categories"]) == {"generation", "open_qa"} and report["categories"]["open_qa"]["n"] == 4
    assert json.loads((run_dir / "eval" / "ppo" / "report.json").read_text()) == report
    assert len((run_dir / "eval" / "ppo" / "samples.jsonl").read_text().splitlines()) == 8
    sft = json.loads(igpt("eval", "sft", *common).stdout)
    assert sft["kl_to_sft"] == 0.0 and sft["alignment_tax"] == 0.0


def test_compare_with_the_rm_judge_writes_report_html_and_is_antisymmetric(run):
    run_dir = run / "run"
    args = ["--prompts", run / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "16"]
    assert igpt("compare", "ppo", "sft", *args).exit_code == 0
    assert igpt("compare", "sft", "ppo", *args).exit_code == 0
    ab = json.loads((run_dir / "compare" / "ppo-vs-sft" / "report.json").read_text())
    ba = json.loads((run_dir / "compare" / "sft-vs-ppo" / "report.json").read_text())
    assert ab["n"] == 8 and ab["wins"] + ab["ties"] + ab["losses"] == 8
    assert ba["win_rate"] == pytest.approx(1 - ab["win_rate"])
    assert (ab["wins"], ab["losses"]) == (ba["losses"], ba["wins"])
    assert set(ab["categories"]) == {"generation", "open_qa"}
    page = (run_dir / "compare" / "ppo-vs-sft" / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") >= 3  # win-rate chart + PPO score and KL curves
    assert "alt='win rate chart'" in page and "alt='reward-model score'" in page
    assert "http://" not in page and "https://" not in page  # opens offline
    judgments = (run_dir / "compare" / "ppo-vs-sft" / "judgments.jsonl").read_text().splitlines()
    assert len(judgments) == 8 and {"score_a", "score_b", "winner"} <= json.loads(judgments[0]).keys()


def test_human_judge_through_its_input_stream_stops_and_resumes(run, tmp_path):
    from typer.testing import CliRunner

    from instructgpt_cli.cli import app

    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir)
    args = ["compare", "ppo", "sft", "--prompts", str(run / "prompts.jsonl"), "--run-dir", str(run_dir),
            "--judge", "human", "--max-new-tokens", "8"]
    first = CliRunner().invoke(app, args, input="1\n2\nmaybe\nt\ns\nq\n")
    assert first.exit_code == 0, first.output
    out = run_dir / "compare" / "ppo-vs-sft"
    lines = [json.loads(l) for l in (out / "judgments.jsonl").read_text().splitlines()]
    assert [j["winner"] for j in lines][2] == "tie" and len(lines) == 3  # 'maybe' was asked again, s skipped
    for j in lines[:2]:  # answer 1 picks whichever model was shown first
        assert j["winner"] == (j["shown_first"] if j is lines[0] else ("B" if j["shown_first"] == "A" else "A"))
    second = CliRunner().invoke(app, args, input="1\n" * 10)
    assert second.exit_code == 0
    lines = [json.loads(l) for l in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(lines) == 8 - 1 + 1 - 1 + 1  # 3 before; the skipped prompt comes back; all 8 judged now
    assert len({j["index"] for j in lines}) == 8
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == "human" and report["n"] == 8


def test_label_ranks_samples_resumes_and_feeds_train_rm(tmp_path):
    from typer.testing import CliRunner

    from instructgpt_cli.cli import app

    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"prompt": f"prompt {i}", "responses": [f"a{i}", f"b{i}", f"c{i}"], "category": "chat"} for i in range(3)])
    out = tmp_path / "ranks.jsonl"
    first = CliRunner().invoke(app, ["label", str(samples), "--out", str(out)], input="1 2 3\n2 2 2\n0 1 2\n2 1 1\nq\n")
    assert first.exit_code == 0, first.output
    ranked = read_rankings(out)  # train-rm's own reader accepts it
    assert [r.ranks for r in ranked] == [[1, 2, 3], [2, 1, 1]]
    second = CliRunner().invoke(app, ["label", str(samples), "--out", str(out)], input="3,2,1\n")
    assert second.exit_code == 0 and "2 already ranked" in second.output
    assert [r.ranks for r in read_rankings(out)] == [[1, 2, 3], [2, 1, 1], [3, 2, 1]]
    assert sorted(read_rankings(out)[2].pairs()) == [(1, 0), (2, 0), (2, 1)]  # (better, worse)


def test_bad_inputs_exit_2_and_write_nothing(run, tmp_path):
    run_dir = run / "run"
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    cases = [
        (["eval", "dpo", "--prompts", run / "prompts.jsonl"], "not a stage of the run"),
        (["eval", str(tmp_path / "nowhere"), "--prompts", run / "prompts.jsonl"], "nor a model directory"),
        (["eval", "ppo", "--prompts", write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}])], "bad.jsonl:1: prompt"),
        (["compare", "ppo", "sft", "--prompts", tmp_path / "missing.jsonl"], "file not found"),
        (["compare", "ppo", "sft", "--prompts", run / "prompts.jsonl", "--judge", "crowd"], "must be rm or human"),
        (["compare", "ppo", "sft", "--prompts", run / "prompts.jsonl", "--rm", tmp_path], "does not exist"),
    ]
    for args, message in cases:
        result = igpt(*args, "--run-dir", run_dir)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (message, result.stderr)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_compare_reuses_eval_samples_taken_with_the_same_settings(run, tmp_path, monkeypatch):
    from instructgpt_cli.stages import compare as compare_stage

    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir)
    shutil.rmtree(run_dir / "compare", ignore_errors=True)
    settings = ["--prompts", run / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "12",
                "--temperature", "0.7", "--seed", "3"]
    for model in ("ppo", "sft"):
        assert igpt("eval", model, *settings).exit_code == 0
    monkeypatch.setattr(compare_stage, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    result = igpt("compare", "ppo", "sft", *settings)  # no sampling: eval's responses are reused
    assert result.exit_code == 0
    kl = json.loads((run_dir / "eval" / "ppo" / "report.json").read_text())["kl_to_sft"]
    assert "igpt eval of the same models" in result.stderr and f"{kl:.3f}" in result.stderr  # eval's KL shown too
    assert "report.html" in result.stderr[-300:]  # it ends by saying where the page is
    winners = {json.loads(l)["winner"] for l in (run_dir / "compare" / "ppo-vs-sft" / "judgments.jsonl").open()}
    shown = {w for w in ("A", "B", "tie") if f"judge picked: {w}" in result.stderr}
    assert {"A", "B"} & winners <= shown and shown  # an example of each side that won somewhere
    pairs = [json.loads(l) for l in (run_dir / "compare" / "ppo-vs-sft" / "responses.jsonl").read_text().splitlines()]
    evals = {m: [json.loads(l)["response"] for l in (run_dir / "eval" / m / "samples.jsonl").read_text().splitlines()]
             for m in ("ppo", "sft")}
    assert [p["a"] for p in pairs] == evals["ppo"] and [p["b"] for p in pairs] == evals["sft"]
    monkeypatch.undo()
    other = igpt("compare", "ppo", "sft", *settings[:-2], "--seed", "4")  # other settings: sampled afresh
    assert other.exit_code == 0
