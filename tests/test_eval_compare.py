"""eval, compare and label: the arithmetic by hand, the reports, the human judge through its input."""
import json
import math
import shutil

import pytest

from conftest import TINY_CONFIG, igpt, write_jsonl
from instructgpt_cli.data import read_rankings
from instructgpt_cli.models import tiny_tokenizer
from instructgpt_cli.stages.compare import tally
from instructgpt_cli.stats import Z95, t_quantile, wilson_interval, win_rate
from instructgpt_cli.storage import weights_sha256
from rule_rm import make_rule_rm, sft_with_rule_rm


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
    run_dir = t / "run"
    sft_with_rule_rm(t, run_dir, run_dir / "rm" / "final", demos=24, steps=6)
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
    # 100% over 2 rankings, clustered by ranking: Wilson at n = 2 (z / t_1)^2 (two clusters leave 1 df): [1.2%, 1]
    n_eff = 2 * (Z95 / t_quantile(0.975, 1)) ** 2
    assert report["rm_rankings"] == 2 and report["rm_accuracy_ci"] == pytest.approx([n_eff / (n_eff + Z95 ** 2), 1.0])
    assert report["rm_correct_by_ranking"] == [3, 1] and report["rm_pairs_by_ranking"] == [3, 1]  # in file order
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
    assert "alt='win rate chart'" in page and "alt='PPO reward and its terms'" in page
    assert "http://" not in page and "https://" not in page  # opens offline
    # the page a researcher keeps: what was compared (weights digests), the run's curves, PPO's against episodes
    from test_report import outside_references, parse

    assert outside_references(parse(page)) == []
    for model in ("ppo/final/policy", "sft/final", "rm/final"):
        assert weights_sha256(run_dir / model) in page
    for alt in ("SFT loss (nats/token)", "reward vs KL", "policy entropy (nats/token)", "clip fraction", "EOS rate",
                "response length (tokens)", "β, KL coefficient (fixed)", "pretraining loss (ptx)"):
        assert f"alt='{alt}'" in page
    assert "<h3>Reward model</h3><p class='na'>not available</p>" in page  # the rule RM was not trained here
    assert "id='eval'" in page and page.count("<h4>") == 6  # 3 samples of each of the 2 categories
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
    out = run_dir / "compare" / "ppo-vs-sft.human"  # the human judge's own results, beside the rm judge's
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


def files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_and_compare_keep_earlier_results_unless_overwrite(run, tmp_path, monkeypatch):
    """A second eval or compare of the same name exits 2 before any model loads and leaves every file of the
    run as it was; with --overwrite it replaces the results."""
    from instructgpt_cli.refs import Side
    from instructgpt_cli.stages import evaluate as evaluate_stage

    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir)
    for folder in ("eval", "compare"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    common = ["--prompts", run / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "8"]
    assert igpt("eval", "sft", *common).exit_code == 0
    assert igpt("compare", "ppo", "sft", *common).exit_code == 0
    before = files(run_dir)
    assert {"eval/sft/report.json", "compare/ppo-vs-sft/report.json"} <= before.keys()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evaluate_stage, "load_model", no_model)
    monkeypatch.setattr(Side, "load", no_model)  # how compare loads each model
    for args, out in [(["eval", "sft", *common, "--temperature", "0"], "eval/sft"),
                      (["compare", "ppo", "sft", *common, "--tie-margin", "100"], "compare/ppo-vs-sft")]:
        refused = igpt(*args)
        assert refused.exit_code == 2, refused.output
        assert f"{run_dir / out}: already has results (report.json); pass --overwrite to replace them" in refused.stderr
        assert files(run_dir) == before  # nothing written: not the report, not a lock, not the manifest
    monkeypatch.undo()
    assert igpt("eval", "sft", *common, "--temperature", "0", "--overwrite").exit_code == 0
    greedy_sft = json.loads((run_dir / "eval" / "sft" / "report.json").read_text())
    assert greedy_sft["settings"]["temperature"] == 0.0
    assert greedy_sft["kl_separate_samples"] is False  # the SFT model's KL is 0: no second set is drawn
    assert igpt("compare", "ppo", "sft", *common, "--tie-margin", "100", "--overwrite").exit_code == 0
    report = json.loads((run_dir / "compare" / "ppo-vs-sft" / "report.json").read_text())
    assert (report["ties"], report["n"]) == (8, 8)  # a margin of 100 reward units: every pair a tie now


def test_rm_and_human_judgments_of_one_pair_are_both_kept(run, tmp_path):
    from typer.testing import CliRunner

    from instructgpt_cli.cli import app

    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir)
    shutil.rmtree(run_dir / "compare", ignore_errors=True)
    args = ["compare", "ppo", "sft", "--prompts", str(run / "prompts.jsonl"), "--run-dir", str(run_dir),
            "--max-new-tokens", "8"]
    assert igpt(*args).exit_code == 0
    by_rm = files(run_dir / "compare" / "ppo-vs-sft")
    human = CliRunner().invoke(app, [*args, "--judge", "human"], input="1\n" * 8)
    assert human.exit_code == 0, human.output
    assert files(run_dir / "compare" / "ppo-vs-sft") == by_rm  # the human judge did not replace the rm's
    out = run_dir / "compare" / "ppo-vs-sft.human"
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == "human" and report["n"] == 8
    assert {json.loads(l)["judge"] for l in (out / "judgments.jsonl").read_text().splitlines()} == {"human"}
    assert json.loads(by_rm["report.json"])["judge"] == "rm"
    entries = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {"compare/ppo-vs-sft", "compare/ppo-vs-sft.human"} <= entries.keys()
    # a finished human session is results like any other: kept, unless --overwrite starts a new session
    kept = files(out)
    again = CliRunner().invoke(app, [*args, "--judge", "human"], input="t\n" * 8)
    assert again.exit_code == 2 and "already has results" in again.stderr and files(out) == kept
    again = CliRunner().invoke(app, [*args, "--judge", "human", "--overwrite"], input="t\n" * 8)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "report.json").read_text())["ties"] == 8
    assert files(run_dir / "compare" / "ppo-vs-sft") == by_rm


def test_a_human_session_where_an_older_igpt_kept_it_goes_on(run, tmp_path):
    """Before each judge had its own results, a human session lived in compare/A-vs-B.human/: compare moves
    it to compare/A-vs-B.human.session/ and goes on with its judgments."""
    from typer.testing import CliRunner

    from instructgpt_cli.cli import app

    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir)
    args = ["compare", "ppo", "sft", "--prompts", str(run / "prompts.jsonl"), "--run-dir", str(run_dir),
            "--judge", "human", "--max-new-tokens", "8"]
    assert CliRunner().invoke(app, args, input="1\n1\nq\n").exit_code == 0
    out = run_dir / "compare" / "ppo-vs-sft.human"
    shutil.rmtree(out)
    (out.parent / "ppo-vs-sft.human.session").rename(out)  # the old layout: the session only, no results
    assert CliRunner().invoke(app, args, input="t\n" * 8).exit_code == 0
    winners = [json.loads(l)["winner"] for l in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(winners) == 8 and winners.count("tie") == 6  # the 2 judgments of the old session kept
    assert (out.parent / "ppo-vs-sft.human.session" / "judgments.jsonl").is_file()


def test_each_judge_has_a_result_folder_named_after_it():
    from pathlib import Path

    from instructgpt_cli.stages.compare import result_dir

    run_dir = Path("r")
    assert result_dir(run_dir, "a-vs-b", "rm") == run_dir / "compare" / "a-vs-b"
    assert result_dir(run_dir, "a-vs-b", "human") == run_dir / "compare" / "a-vs-b.human"
    assert result_dir(run_dir, "a-vs-b", "model:runs/x/rm/final").name == "a-vs-b.model-runs-x-rm-final"
    assert result_dir(run_dir, "a-vs-b", "python:my.judges:pick better").name == "a-vs-b.python-my.judges-pick-better"
    long = result_dir(run_dir, "a-vs-b", "model:/" + "d" * 100).name
    other = result_dir(run_dir, "a-vs-b", "model:/" + "d" * 101).name
    assert len(long) == len("a-vs-b.") + 64 and long != other  # cut, told apart by a hash of the whole name


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
        (["eval", "orpo", "--prompts", run / "prompts.jsonl"], "not a stage of the run"),
        (["eval", str(tmp_path / "nowhere"), "--prompts", run / "prompts.jsonl"], "nor a model directory"),
        (["eval", "ppo", "--prompts", write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}])], "bad.jsonl:1: prompt"),
        (["compare", "ppo", "sft", "--prompts", tmp_path / "missing.jsonl"], "file not found"),
        (["compare", "ppo", "sft", "--prompts", run / "prompts.jsonl", "--judge", "crowd"], "must be rm, human, model:REF or python:MODULE:FUNCTION"),
        (["compare", "ppo", "sft", "--prompts", run / "prompts.jsonl", "--rm", tmp_path], "does not exist"),
    ]
    for args, message in cases:
        result = igpt(*args, "--run-dir", run_dir)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (message, result.stderr)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_compare_reuses_eval_samples_taken_with_the_same_settings(run, tmp_path, monkeypatch):
    from instructgpt_cli.runners import Runner

    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir)
    shutil.rmtree(run_dir / "compare", ignore_errors=True)
    settings = ["--prompts", run / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "12",
                "--temperature", "0.7", "--overwrite", "--seed", "3"]  # replacing the copied run's eval/
    for model in ("ppo", "sft"):
        assert igpt("eval", model, *settings).exit_code == 0
    monkeypatch.setattr(Runner, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
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
    # the judge's scores are eval's of the very tokens it sampled, by the same reward model: taken as they are
    # (the reward model is not loaded, let alone run: generate and scoring both refused above and below)
    judged = [json.loads(l) for l in (run_dir / "compare" / "ppo-vs-sft" / "judgments.jsonl").open()]
    eval_scores = {m: [json.loads(l)["score"] for l in (run_dir / "eval" / m / "samples.jsonl").open()]
                   for m in ("ppo", "sft")}
    assert [j["score_a"] for j in judged] == eval_scores["ppo"] and [j["score_b"] for j in judged] == eval_scores["sft"]
    report = json.loads((run_dir / "compare" / "ppo-vs-sft" / "report.json").read_text())
    assert report["scores_from"] == {"a": str(run_dir / "eval" / "ppo" / "samples.jsonl"),
                                     "b": str(run_dir / "eval" / "sft" / "samples.jsonl")}
    # a reward model with the same weights and another bias (what a re-normalisation changes) is another judge:
    # it scores the responses itself, each score eval's moved by the bias, and the same pairs win
    import instructgpt_cli.rollout as rollout_module
    from instructgpt_cli.storage import COMPLETED
    monkeypatch.setattr(rollout_module, "score_responses",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored")))
    assert igpt("compare", "ppo", "sft", *settings).exit_code == 0  # the run's own reward model: still not run
    monkeypatch.undo()
    shifted = tmp_path / "rm-shifted"
    shutil.copytree(run_dir / "rm" / "final", shifted)
    (shifted / COMPLETED).unlink(missing_ok=True)  # edited by hand: no longer the sealed directory train-rm wrote
    config = json.loads((shifted / "config.json").read_text())
    config["igpt_reward_bias"] = config.get("igpt_reward_bias", 0.0) + 1.0
    (shifted / "config.json").write_text(json.dumps(config))
    again = igpt("compare", "ppo", "sft", *settings, "--rm", shifted)
    assert again.exit_code == 0, again.output
    rejudged = [json.loads(l) for l in (run_dir / "compare" / "ppo-vs-sft" / "judgments.jsonl").open()]
    assert [j["score_a"] for j in rejudged] == pytest.approx([x + 1.0 for x in eval_scores["ppo"]], abs=1e-5)
    assert [j["winner"] for j in rejudged] == [j["winner"] for j in judged]
    assert "scores_from" not in json.loads((run_dir / "compare" / "ppo-vs-sft" / "report.json").read_text())
    other = igpt("compare", "ppo", "sft", *settings[:-2], "--seed", "4")  # other settings: sampled afresh
    assert other.exit_code == 0


def test_max_prompts_is_one_seeded_subset_in_file_order_for_eval_and_compare(run, tmp_path, monkeypatch):
    """--max-prompts 3 (a quick look): eval samples 3 of the prompts, drawn with --seed and kept in file order, and
    compare with the same settings takes the same 3 and reuses eval's samples; 0, or as many as the file has,
    is every prompt; a bad record outside the subset is still refused (every record is validated)."""
    from instructgpt_cli.data import read_prompts
    from instructgpt_cli.runners import Runner

    every = [p.prompt for p in read_prompts(run / "prompts.jsonl")]
    picked = [p.prompt for p in read_prompts(run / "prompts.jsonl", at_most=3, seed=3)]
    assert len(picked) == 3 and picked == [p for p in every if p in picked]  # a subset, in file order
    assert [p.prompt for p in read_prompts(run / "prompts.jsonl", at_most=len(every), seed=3)] == every
    assert [p.prompt for p in read_prompts(run / "prompts.jsonl", at_most=0, seed=3)] == every
    assert {tuple(p.prompt for p in read_prompts(run / "prompts.jsonl", at_most=3, seed=s)) for s in range(6)} != \
        {tuple(picked)}  # another seed, another subset (one of six at least)
    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir)
    settings = ["--prompts", run / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "8", "--overwrite",
                "--seed", "3", "--max-prompts", "3"]
    for model in ("ppo", "sft"):
        assert igpt("eval", model, *settings).exit_code == 0
        samples = [json.loads(l)["prompt"] for l in (run_dir / "eval" / model / "samples.jsonl").open()]
        assert samples == picked
    monkeypatch.setattr(Runner, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    result = igpt("compare", "ppo", "sft", *settings)
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "compare" / "ppo-vs-sft" / "report.json").read_text())["n"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text((run / "prompts.jsonl").read_text() + '{"prompt": 7}\n')
    refused = igpt("eval", "ppo", *settings[2:], "--prompts", bad)
    assert refused.exit_code == 2 and f"bad.jsonl:{len(every) + 1}" in refused.stderr, refused.output


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (which Python's json writes by default, and no other reader takes)."""
    def refuse(name):
        raise ValueError(f"{name} in a report")
    return json.loads(text, parse_constant=refuse)


def test_summarise_empty_group_and_one_item_have_no_nan():
    from instructgpt_cli.stages.evaluate import summarise

    empty = summarise([], [], [], [])
    assert empty == {"n": 0, "kl_to_sft": None, "response_length": None, "eos_rate": None}
    one = summarise([0.5], [0.25], [7], [True])
    assert one == {"n": 1, "kl_to_sft": 0.25, "response_length": 7.0, "eos_rate": 1.0, "score_mean": 0.5,
                   "score_sd": None}  # the sample sd of one score is undefined, not 0
    two = summarise([1.0, 2.0], [0.0, 1.0], [3, 4], [True, False])
    assert two["score_sd"] == pytest.approx(math.sqrt(0.5)) and two["eos_rate"] == 0.5
    for r in (empty, one, two):
        strict_json(json.dumps(r, allow_nan=False))


def hand_kl(policy_dir, sft_dir, tokenizer, prompts, samples, temperature, key="response_ids"):
    """sum_t KL(pi(. | x, y_<t) || pi_SFT(. | x, y_<t)), both of logits / T, over the whole vocabulary, by a
    plain forward of each prompt + response (``sample[key]``) through transformers (no batching, no padding):
    one number per sample."""
    import torch
    from transformers import AutoModelForCausalLM

    from instructgpt_cli.batches import render_prompt

    models = [AutoModelForCausalLM.from_pretrained(d).eval() for d in (policy_dir, sft_dir)]
    out = []
    for prompt, sample in zip(prompts, samples):
        query = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
        ids = torch.tensor([query + sample[key]])
        lps = []
        for m in models:
            with torch.no_grad():
                logits = m(input_ids=ids).logits[0, len(query) - 1:-1].double() / temperature
            lps.append(torch.log_softmax(logits, -1))
        out.append(sum(sum(p * (a - b) for p, a, b in zip(lps[0][t].exp(), lps[0][t], lps[1][t])).item()
                       for t in range(len(sample[key]))))
    return out


def test_eval_kl_at_ppo_temperature_by_hand_finite_at_greedy_and_strict_json(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir)
    prompts = [json.loads(l)["prompt"] for l in (run / "prompts.jsonl").read_text().splitlines()]
    common = ["--prompts", run / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "10",
              "--overwrite"]  # the copied run has eval/ppo/ already
    # greedy samples (T = 0): the KL is still PPO's, under the run's PPO temperature (ppo/config.yaml: 1.0), on
    # a second set of samples drawn at T = 1
    shown = igpt("eval", "ppo", *common, "--temperature", "0")
    assert shown.exit_code == 0, shown.output
    said = " ".join((shown.stderr + shown.stdout).split())
    assert "KL to SFT (T=1)" in said and "samples at T=0 (greedy), seed 0" in said
    assert "second set of samples drawn at T=1" in said
    text = (run_dir / "eval" / "ppo" / "report.json").read_text()
    report = strict_json(text)
    assert report["kl_temperature"] == 1.0 and report["kl_temperature_from"].endswith("config.yaml")
    assert report["settings"]["temperature"] == 0 and report["kl_sampled_at"] == 1.0
    assert report["kl_separate_samples"] is True
    samples = [strict_json(l) for l in (run_dir / "eval" / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert [s["kl_response_ids"] for s in samples] != [s["response_ids"] for s in samples]
    tok = tiny_tokenizer()
    expected = hand_kl(run_dir / "ppo" / "final" / "policy", run_dir / "sft" / "final", tok, prompts, samples, 1.0,
                       "kl_response_ids")
    assert [s["kl"] for s in samples] == pytest.approx(expected, abs=1e-4)
    assert all(s["kl"] >= 0 for s in samples)  # a KL, not a one-sample estimate that can go negative
    assert report["kl_to_sft"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert math.isfinite(report["kl_to_sft"]) and report["kl_to_sft"] != 0.0
    # an explicit log-prob temperature divides the logits of both models by it
    half = strict_json(igpt("eval", "ppo", *common, "--temperature", "0", "--kl-temperature", "0.5",
                            "--name", "ppo-half", "--json").stdout)
    assert half["kl_temperature"] == 0.5 and half["kl_temperature_from"] == "--kl-temperature"
    samples = [strict_json(l) for l in (run_dir / "eval" / "ppo-half" / "samples.jsonl").read_text().splitlines()]
    expected = hand_kl(run_dir / "ppo" / "final" / "policy", run_dir / "sft" / "final", tok, prompts, samples, 0.5,
                       "kl_response_ids")
    assert half["kl_to_sft"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert half["kl_to_sft"] != pytest.approx(report["kl_to_sft"], abs=1e-3)  # the temperature mattered


# Two bigram models over a two-token response space {x, y}: logits (at T = 1) of the first response token after
# the prompt, and of the second after x and after y. Every other token gets -30 (with EOS: responses of
# max_new_tokens 2 are exactly two tokens of {x, y}, up to probability ~1e-11).
POLICY = {"first": (1.3, 0.0), "x": (2.0, -2.0), "y": (0.0, 0.0)}
REFERENCE = {"first": (0.0, 0.0), "x": (-2.0, 2.0), "y": (0.0, 0.0)}


def make_bigram_lm(path, tokenizer, table):
    """A LlamaForCausalLM whose next-token logits depend on the last token only (attention and MLPs zero, LM
    head untied): ``table[c]`` are the logits of (x, y) after c in {x, y}, ``table['first']`` after any other
    token (the prompt's last). The final RMS norm maps the embedding 100 e_k (dim 64) to 8 e_k, so column k of
    the head, set to logits / 8, gives the logits."""
    import torch
    from transformers import LlamaForCausalLM

    from instructgpt_cli.models import tiny_config
    from rule_rm import zero_but_norms

    config = tiny_config(tokenizer)
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    x, y = (tokenizer.convert_tokens_to_ids(c) for c in "xy")
    with torch.no_grad():
        zero_but_norms(model)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, 0] = 100.0  # every other token: context 0, the first response token's table
        emb[x, 0], emb[x, 1], emb[y, 0], emb[y, 2] = 0.0, 100.0, 0.0, 100.0  # 100: the norm's eps (1e-6) is nil
        head.fill_(-30.0 / 8)
        for k, ctx in enumerate(("first", "x", "y")):
            head[x, k], head[y, k] = (v / 8 for v in table[ctx])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def two_token_kl(policy, ref, t):
    """KL(pi_T || ref_T) over the four responses xx, xy, yx, yy, enumerated: sum_y pi(y) log(pi(y) / ref(y)),
    each response's probability the product of its two tokens' softmax(logits / T)."""
    def probs(logits):
        z = [math.exp(v / t) for v in logits]
        return [v / sum(z) for v in z]

    total = 0.0
    for i, first in enumerate("xy"):
        for j in range(2):
            p = probs(policy["first"])[i] * probs(policy[first])[j]
            q = probs(ref["first"])[i] * probs(ref[first])[j]
            total += p * math.log(p / q)
    return total


def test_two_token_kl_by_hand():
    """The enumeration against the chain rule worked by hand at T = 1: first token KL(σ(1.3) || 1/2) plus
    σ(1.3) times the second token's KL after x, 4 (2σ(4) - 1) (log-odds 4 against -4); 0 after y."""
    p = 1 / (1 + math.exp(-1.3))
    first = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    after_x = 4 * (2 / (1 + math.exp(-4)) - 1)
    assert two_token_kl(POLICY, REFERENCE, 1.0) == pytest.approx(first + p * after_x, rel=1e-12)
    assert (first, after_x, first + p * after_x) == pytest.approx((0.17372, 3.85612, 3.20399), abs=1e-5)


@pytest.mark.parametrize("eval_t", [0.7, 0.0, 1.0])
def test_eval_kl_is_the_kl_of_samples_at_ppo_temperature(tmp_path, eval_t):
    """KL(pi_T || pi_SFT,T) at PPO's T = 1 is 3.204 nats (enumerated); eval's figure must be it whatever eval's
    own temperature. Summing the exact per-token KL along eval's samples instead weighs the first token as
    drawn at eval's T: 0.174 + 0.865 x 3.856 = 3.51 at T = 0.7 (1.10x), 4.03 greedy. The figure is a mean over
    N responses whose only randomness is the first token, x with p = σ(1.3) at T = 1: its sd is
    3.856 sqrt(p (1 - p) / N) = 0.049 at N = 1024, and it must lie within 4 sd; the same seed at eval's T = 1
    gives the same figure to the bit. Each response's KL is checked exactly along the response it was measured
    on (kl_response_ids: drawn at T = 1, apart from eval's own where eval's T differs)."""
    tok = tiny_tokenizer()
    policy = make_bigram_lm(tmp_path / "policy", tok, POLICY)
    ref = make_bigram_lm(tmp_path / "ref", tok, REFERENCE)
    n = 1024
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say two letters."}] * n)
    result = igpt("eval", policy, "--sft", ref, "--prompts", tmp_path / "prompts.jsonl", "--run-dir", tmp_path / "run",
                  "--max-new-tokens", "2", "--batch-size", "256", "--temperature", str(eval_t), "--kl-temperature",
                  "1", "--json", "--name", "bigram")
    assert result.exit_code == 0, result.output
    report = strict_json(result.stdout)
    exact = two_token_kl(POLICY, REFERENCE, 1.0)
    p = 1 / (1 + math.exp(-1.3))
    sd = 4 * (2 / (1 + math.exp(-4)) - 1) * math.sqrt(p * (1 - p) / n)
    assert abs(report["kl_to_sft"] - exact) < 4 * sd, (report["kl_to_sft"], exact, sd)
    assert (report["settings"]["temperature"], report["kl_temperature"], report["kl_sampled_at"]) == (eval_t, 1, 1)
    assert report["kl_separate_samples"] is (eval_t != 1.0)
    samples = [strict_json(l) for l in (tmp_path / "run" / "eval" / "bigram" / "samples.jsonl").read_text().splitlines()]
    x, y = (tok.convert_tokens_to_ids(c) for c in "xy")
    measured_on = [s.get("kl_response_ids", s["response_ids"]) for s in samples]
    assert all(len(r) == 2 and set(r) <= {x, y} for r in measured_on)
    first_kl = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    second_kl = {x: 4 * (2 / (1 + math.exp(-4)) - 1), y: 0.0}
    assert [s["kl"] for s in samples] == pytest.approx([first_kl + second_kl[r[0]] for r in measured_on], abs=1e-4)
    if eval_t == 0.0:  # greedy: eval's own responses are all xx, the policy's argmax
        assert all(s["response_ids"] == [x, x] for s in samples)
    reference = igpt("eval", policy, "--sft", ref, "--prompts", tmp_path / "prompts.jsonl", "--run-dir",
                     tmp_path / "run", "--max-new-tokens", "2", "--batch-size", "256", "--temperature", "1",
                     "--kl-temperature", "1", "--json", "--name", "at-t1")
    assert reference.exit_code == 0, reference.output
    assert strict_json(reference.stdout)["kl_to_sft"] == report["kl_to_sft"]


def test_rm_judge_scores_the_sampled_tokens_as_eval_and_ppo_do(run):
    """The same response gets the same score from compare's judge, eval's score_responses and PPO's
    build_rollout + Runner.scores: token ids as sampled, EOS only where the model emitted it."""
    import torch

    from instructgpt_cli.config import ModelConfig
    from instructgpt_cli.batches import render_prompt
    from instructgpt_cli.models import load_model
    from instructgpt_cli.rollout import build_rollout, score_responses
    from instructgpt_cli.judges import RMJudge, Settings
    from instructgpt_cli.runners import Runner

    tok = tiny_tokenizer()
    rm_path = run / "run" / "rm" / "final"
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    queries = [render_prompt(tok, [{"role": "user", "content": p}]) for p in ("say e", "say x", "more", "go")]
    responses = [enc(" eee e"),        # never ended, and a leading space that decoding strips
                 enc("xx e") + [eos],  # ended
                 enc("e") * 3,         # never ended
                 [eos]]                # ended at once: an empty text
    rm = Runner.for_eval(load_model(ModelConfig(name=str(rm_path)), tok, rm_path, torch.device("cpu"), 0, "reward"))
    eval_scores = score_responses(rm, tok, queries, responses, 3).tolist()
    ro = build_rollout(queries, responses, tok.pad_token_id, eos)
    with torch.no_grad():
        ppo_scores = rm.scores(ro.query_response, ro.attention_mask, ro.context_len, ro.lengths).tolist()
    pairs = [{"prompt": "", "category": None, "a": "", "b": "", "a_ids": r, "b_ids": responses[::-1][i]}
             for i, r in enumerate(responses)]
    judged = RMJudge(Settings(batch_size=2), rm_path, tok, queries, torch.device("cpu")).compare(pairs)
    assert [j["score_a"] for j in judged] == pytest.approx(eval_scores, abs=1e-5)
    assert [j["score_a"] for j in judged] == pytest.approx(ppo_scores, abs=1e-5)
    # the same tokens re-encoded from text with an EOS appended are another sequence, with another score
    reencoded = score_responses(rm, tok, queries, [enc(tok.decode(r, skip_special_tokens=True).strip()) + [eos]
                                                   for r in responses], 3).tolist()
    assert reencoded[0] != pytest.approx(eval_scores[0], abs=1e-4)


def test_compare_judges_the_model_as_it_is_now(run, tmp_path, monkeypatch):
    """compare reuses eval's samples only for the weights eval sampled: a policy retrained in place with
    --overwrite is sampled afresh; evaluated again, its samples are reused again."""
    from instructgpt_cli.runners import Runner

    run_dir = tmp_path / "run"
    shutil.copytree(run / "run", run_dir)
    settings = ["--prompts", run / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "8",
                "--temperature", "0.7", "--overwrite"]  # compare's default decoding; eval and compare run again
    for model in ("ppo", "sft"):
        assert igpt("eval", model, *settings).exit_code == 0
    evaluated = [json.loads(l) for l in (run_dir / "eval" / "ppo" / "samples.jsonl").read_text().splitlines()]
    retrain = igpt("ppo", "--config", TINY_CONFIG, "--prompts", run / "prompts.jsonl", "--run-dir", run_dir,
                   "--max-steps", "2", "--seed", "7", "--overwrite")
    assert retrain.exit_code == 0, retrain.output
    sampled = []
    real_generate = Runner.generate
    monkeypatch.setattr(Runner, "generate", lambda *a, **k: sampled.append(1) or real_generate(*a, **k))
    assert igpt("compare", "ppo", "sft", *settings).exit_code == 0
    assert len(sampled) == 1  # the retrained policy; sft's samples still belong to sft/final's weights
    sources = json.loads((run_dir / "compare" / "ppo-vs-sft" / "report.json").read_text())["responses_from"]
    assert sources["a"] == "sampled" and sources["b"] == str(run_dir / "eval" / "sft" / "samples.jsonl")
    pairs = [json.loads(l) for l in (run_dir / "compare" / "ppo-vs-sft" / "responses.jsonl").read_text().splitlines()]
    assert [p["a_ids"] for p in pairs] != [s["response_ids"] for s in evaluated]
    assert igpt("eval", "ppo", *settings).exit_code == 0
    sampled.clear()  # eval samples through a runner too: count compare's alone
    assert igpt("compare", "ppo", "sft", *settings).exit_code == 0
    assert not sampled  # evaluated again: reused


@pytest.fixture(scope="module")
def constant_run(tmp_path_factory):
    """Two hand-built models and a rule RM whose preference depends on the prompt: A always stops at once
    ([EOS]), B always says 'x'; the RM scores the share of 'q' minus the share of 'z' over prompt and
    response. A longer response dilutes the prompt's share, so A wins on q-prompts and loses on z-prompts."""
    t = tmp_path_factory.mktemp("constant")
    tok = tiny_tokenizer()
    from rule_rm import make_constant_lm

    run_dir = t / "run"
    make_rule_rm(run_dir / "rm" / "final", tok, "q", minus="z")
    make_constant_lm(t / "stopper", tok, tok.eos_token)
    make_constant_lm(t / "xer", tok, "x")
    rows = [("qqqq", "wins"), ("qq", "wins"), ("q q q", "wins"), ("zzzz", "losses"), ("zz", "losses"),
            ("z z z", "losses"), ("q", "single")]
    write_jsonl(t / "prompts.jsonl", [{"prompt": p, "category": c} for p, c in rows])
    return t


def compare_constant(t, *extra):
    return igpt("compare", t / "stopper", t / "xer", "--prompts", t / "prompts.jsonl", "--run-dir", t / "run",
                "--temperature", "0", "--max-new-tokens", "4", "--overwrite", *extra)


def test_compare_with_categories_at_0_of_3_3_of_3_and_1_of_1(constant_run):
    result = compare_constant(constant_run)
    assert result.exit_code == 0, result.output
    out = constant_run / "run" / "compare" / "stopper-vs-xer"
    report = strict_json((out / "report.json").read_text())
    cats = report["categories"]
    assert (cats["wins"]["wins"], cats["wins"]["n"], cats["wins"]["win_rate"]) == (3, 3, 1.0)
    assert (cats["losses"]["losses"], cats["losses"]["n"], cats["losses"]["win_rate"]) == (3, 3, 0.0)
    assert (cats["single"]["wins"], cats["single"]["n"], cats["single"]["win_rate"]) == (1, 1, 1.0)
    assert cats["losses"]["ci_low"] == 0.0 and cats["wins"]["ci_high"] == 1.0 and cats["single"]["ci_high"] == 1.0
    assert (report["wins"], report["losses"], report["n"]) == (4, 3, 7)
    page = (out / "report.html").read_text()
    assert "alt='win rate chart'" in page
    # A stops at once (every response ended), B never does: each of B's 7 samples is marked, none of A's
    assert page.count("class='noeos'") == 7 and "stopper: 7 of 7 responses ended" in page
    assert "xer: 0 of 7 responses ended" in page
    pairs = [json.loads(l) for l in (out / "responses.jsonl").read_text().splitlines()]
    tok = tiny_tokenizer()
    assert all(p["a_ids"] == [tok.eos_token_id] and p["b_ids"] == [tok.convert_tokens_to_ids("x")] * 4 for p in pairs)


def test_a_crash_while_publishing_leaves_the_previous_complete_set(constant_run, monkeypatch):
    from instructgpt_cli import report as report_page

    assert compare_constant(constant_run).exit_code == 0
    compare_dir = constant_run / "run" / "compare"
    before = {p.name: p.read_bytes() for p in (compare_dir / "stopper-vs-xer").iterdir()}
    assert set(before) == {"report.json", "judgments.jsonl", "responses.jsonl", "report.html"}

    def broken_page(*args, **kwargs):
        raise RuntimeError("chart failed")

    monkeypatch.setattr(report_page, "write_html", broken_page)
    with pytest.raises(RuntimeError, match="chart failed"):
        compare_constant(constant_run, "--tie-margin", "100")  # all ties: another report.json and judgments
    assert {p.name: p.read_bytes() for p in (compare_dir / "stopper-vs-xer").iterdir()} == before
    assert sorted(p.name for p in compare_dir.iterdir()) == ["stopper-vs-xer"]  # no temporary folder left
    monkeypatch.undo()
    assert compare_constant(constant_run, "--tie-margin", "100").exit_code == 0
    assert strict_json((compare_dir / "stopper-vs-xer" / "report.json").read_text())["ties"] == 7
    assert sorted(p.name for p in compare_dir.iterdir()) == ["stopper-vs-xer"]


def test_publish_set_swaps_whole_sets_and_recovers_one_put_aside(tmp_path):
    from instructgpt_cli.storage import publish_set, recover_published

    out = tmp_path / "compare" / "a-vs-b"
    with publish_set(out) as d:
        (d / "report.json").write_text("1")
        (d / "extra.txt").write_text("only in the first set")
    with publish_set(out) as d:
        (d / "report.json").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["report.json"] and (out / "report.json").read_text() == "2"
    with pytest.raises(OSError):
        with publish_set(out) as d:
            (d / "report.json").write_text("3")
            raise OSError("disk full")
    assert (out / "report.json").read_text() == "2"
    # killed between the two renames: the previous set sits aside, the next publish (or a reader) puts it back
    out.rename(out.parent / ".a-vs-b.old-999999999")
    recover_published(out)
    assert (out / "report.json").read_text() == "2"
    assert sorted(p.name for p in out.parent.iterdir()) == ["a-vs-b"]


def test_win_chart_error_bars_never_negative_even_for_a_bound_rounded_past_the_rate():
    from instructgpt_cli.report import win_chart

    zero = {"n": 3, "wins": 0, "ties": 0, "losses": 3, "win_rate": 0.0, "ci_low": 5.6e-17, "ci_high": 0.5615}
    full = {"n": 1, "wins": 1, "ties": 0, "losses": 0, "win_rate": 1.0, "ci_low": 0.2065, "ci_high": 1 - 1e-16}
    report = {"a": "A", "b": "B", **win_rate(1, 0, 3), "categories": {"zero": zero, "full": full}}
    assert win_chart(report).startswith("data:image/png;base64,")  # matplotlib refused negative xerr before


def test_perplexity_of_a_diverged_model_is_null_not_an_overflow():
    from instructgpt_cli.stages.evaluate import perplexity

    assert perplexity(0.0) == 1.0 and perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(800.0) is None  # math.exp would raise OverflowError
