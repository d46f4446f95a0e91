"""igpt eval ppo --checkpoints: the reward-vs-KL frontier of a PPO run, its gold judge, PPO checkpoints loaded
as models, publishing all or nothing, and compare's page showing it."""
import json
import shutil

import pytest
import torch

from conftest import TINY_CONFIG, igpt, write_jsonl
from instructgpt_cli import rundir
from instructgpt_cli.models import load_trained_policy, tiny_tokenizer
from rule_rm import make_constant_lm, sft_with_rule_rm

RULE = '''
def score(prompt, responses):
    return [r.count("a") - 0.5 * r.count(" ") for r in responses]
'''


def rule(text):
    return text.count("a") - 0.5 * text.count(" ")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SFT model, the rule RM ('e' share) as the run's rm/final, 8 prompts, a PPO run of 4 iterations
    keeping a checkpoint of each, and a LoRA PPO run of 2 beside it; the gold rule module."""
    t = tmp_path_factory.mktemp("frontier")
    run_dir = t / "run"
    sft_with_rule_rm(t, run_dir, run_dir / "rm" / "final", demos=16, steps=4)
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"Write about {w}."} for w in "cats dogs rain snow tea maps".split()])
    common = ["--config", TINY_CONFIG, "--prompts", t / "prompts.jsonl", "--max-new-tokens", "12",
              "--rollout-batch-size", "4", "--mini-batch-size", "4", "--save-every", "1", "--keep-checkpoints", "10"]
    result = igpt("ppo", *common, "--run-dir", run_dir, "--max-steps", "4")
    assert result.exit_code == 0, result.output
    result = igpt("ppo", *common, "--run-dir", t / "lora", "--max-steps", "2", "--lora", "--lora-r", "4",
                  "--sft", run_dir / "sft" / "final", "--rm", run_dir / "rm" / "final")
    assert result.exit_code == 0, result.output
    (t / "goldrule.py").write_text(RULE, encoding="utf-8")
    return t


def frontier(world, run_dir, *extra):
    return igpt("eval", "ppo", "--checkpoints", "all", "--prompts", world / "prompts.jsonl", "--run-dir", run_dir,
                "--max-new-tokens", "12", "--json", *extra)


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_frontier_has_a_row_per_checkpoint_with_eval_s_numbers_and_the_rule_s_gold(world, monkeypatch):
    monkeypatch.syspath_prepend(str(world))
    run_dir = world / "run"
    result = frontier(world, run_dir, "--gold", "python:goldrule:score")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    points = report["points"]
    # the SFT model, checkpoints 1-3 and the final policy (step 4: its checkpoint holds the same weights)
    assert [p["label"] for p in points] == ["sft", "step-1", "step-2", "step-3", "final (step 4)"]
    assert [p["episodes"] for p in points] == [0, 4, 8, 12, 16]
    assert points[0]["kl_to_sft"] == 0.0 and all(p["kl_to_sft"] > 0 for p in points[1:])
    # the final point is what igpt eval reports of the final model alone, same settings and seed
    alone = igpt("eval", "ppo", "--prompts", world / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "12",
                 "--json", "--name", "ppo-alone")
    assert alone.exit_code == 0, alone.output
    alone = json.loads(alone.stdout)
    for key in ("kl_to_sft", "score_mean", "response_length", "eos_rate"):
        assert points[-1][key] == pytest.approx(alone[key], abs=1e-6), key
    out = run_dir / "eval" / "ppo-frontier"
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the gold is the rule applied to each point's saved responses; the best gold and the proxy's pick marked
    for p in points:
        samples = read_jsonl(out / "samples" / f"step-{p['step']:06d}.jsonl")
        assert len(samples) == 6 and [s["gold"] for s in samples] == [rule(s["response"]) for s in samples]
        assert p["gold_mean"] == pytest.approx(sum(rule(s["response"]) for s in samples) / 6)
        assert p["score_mean"] == pytest.approx(sum(s["score"] for s in samples) / 6)
    assert report["best_gold"] == max(points, key=lambda p: p["gold_mean"])["label"]
    assert report["best_proxy"] == max(points, key=lambda p: p["score_mean"])["label"]
    # over-optimisation only where the gold's fall to the proxy's pick holds beyond its paired interval,
    # recomputed here from the saved per-prompt golds
    step = {p["label"]: p["step"] for p in points}
    if step[report["best_proxy"]] > step[report["best_gold"]]:
        gold_of = {p["label"]: [s["gold"] for s in read_jsonl(out / "samples" / f"step-{p['step']:06d}.jsonl")]
                   for p in points}
        diffs = [a - b for a, b in zip(gold_of[report["best_gold"]], gold_of[report["best_proxy"]])]
        m = sum(diffs) / 6
        half = 2.5706 * (sum((d - m) ** 2 for d in diffs) / 5) ** 0.5 / 6 ** 0.5  # t(5) 97.5%
        assert report["gold_drop"]["drop"] == pytest.approx(m)
        assert report["gold_drop"]["ci"] == pytest.approx([m - half, m + half], abs=1e-3)
        assert report["overoptimised"] is (m - half > 0)
    else:
        assert report["gold_drop"] is None and report["overoptimised"] is False
    # eval's KL labels: samples at eval's T = 1 are PPO's, so the KL is on them
    assert (report["settings"]["temperature"], report["kl_temperature"], report["kl_separate_samples"]) == (1.0, 1.0,
                                                                                                          False)
    # sampled at T = 0.7, each point's KL is still measured at PPO's T = 1, on a second set of samples with the
    # same seed: the very figures of the T = 1 frontier
    cooler = frontier(world, run_dir, "--temperature", "0.7", "--name", "cooler")
    assert cooler.exit_code == 0, cooler.output
    cooler = json.loads(cooler.stdout)
    assert cooler["kl_separate_samples"] is True and cooler["kl_sampled_at"] == 1.0
    assert [p["kl_to_sft"] for p in cooler["points"]] == [p["kl_to_sft"] for p in points]
    rows = read_jsonl(run_dir / "eval" / "cooler" / "samples" / "step-000002.jsonl")
    assert [r["kl_response_ids"] for r in rows] == [s["response_ids"] for s in
                                                   read_jsonl(out / "samples" / "step-000002.jsonl")]


def test_a_pairwise_gold_is_the_win_rate_over_sft_and_a_second_rm_a_score(world):
    """A judge LM that always answers '1' picks the first response in both orders: every pair is a tie, 50%.
    A second reward model (the rule on 'e') as gold gives the proxy's own numbers."""
    make_constant_lm(world / "judge1", tiny_tokenizer(), "1")
    result = frontier(world, world / "run", "--checkpoints", "2", "--gold", f"model:{world / 'judge1'}",
                      "--name", "pairwise")
    assert result.exit_code == 0, result.output
    points = json.loads(result.stdout)["points"]
    assert [p["label"] for p in points] == ["sft", "step-2", "final (step 4)"]
    assert [p["gold_mean"] for p in points] == [0.5, 0.5, 0.5] and [p["gold_n"] for p in points] == [0, 6, 6]
    result = frontier(world, world / "run", "--checkpoints", "1", "--gold-rm", world / "run" / "rm" / "final",
                      "--name", "gold-rm")
    assert result.exit_code == 0, result.output
    assert all(p["gold_mean"] == pytest.approx(p["score_mean"]) for p in json.loads(result.stdout)["points"])


@pytest.mark.parametrize("run", ["run", "lora"])
def test_a_checkpoint_loads_as_the_policy_of_its_step(world, run):
    run_dir = world / run
    steps = 4 if run == "run" else 2
    tok = tiny_tokenizer()
    sft = run_dir.parent / "run" / "sft" / "final"
    lora = None
    if run == "lora":
        from instructgpt_cli.config import LoraConfig

        lora = LoraConfig(enabled=True, r=4)
    ckpt = run_dir / "ppo" / "checkpoints"
    model = load_trained_policy(ckpt / f"step-{steps:06d}", sft, lora, tok, torch.device("cpu"))
    first = load_trained_policy(ckpt / "step-000001", sft, lora, tok, torch.device("cpu"))
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "final" / "policy").eval()
    base = AutoModelForCausalLM.from_pretrained(sft).eval()
    ids = torch.tensor([tok("Write about tea. It is warm")["input_ids"]])
    with torch.no_grad():
        logits = [m(ids).logits for m in (model, final, first, base)]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    assert (logits[2] - logits[3]).abs().max() > 1e-4  # step 1's weights are loaded, not the SFT model's
    if run == "lora":  # the frontier reads the run's LoRA block from ppo/config.yaml
        result = frontier(world, run_dir, "--checkpoints", "1")
        assert result.exit_code == 0, result.output
        points = json.loads(result.stdout)["points"]
        assert [p["label"] for p in points] == ["sft", "step-1", "final (step 2)"] and points[1]["kl_to_sft"] > 0


def test_bad_checkpoints_fail_before_any_model_loads_and_nothing_is_written(world, monkeypatch):
    import instructgpt_cli.stages.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load", lambda *a, **k: pytest.fail("a model loaded"))
    run_dir = world / "run"
    bad = frontier(world, run_dir, "--checkpoints", "last", "--name", "bad")
    assert bad.exit_code == 2 and "--checkpoints" in bad.stderr and "comma-separated list" in bad.stderr
    missing = frontier(world, run_dir, "--checkpoints", "2,99", "--name", "bad")
    assert missing.exit_code == 2 and "no complete checkpoint of step 99" in missing.stderr
    assert "there are: 1, 2, 3, 4" in missing.stderr
    gold = frontier(world, run_dir, "--gold", "human", "--name", "bad")
    assert gold.exit_code == 2 and "--gold" in gold.stderr
    assert not (run_dir / "eval" / "bad").exists()
    # a run whose checkpoints are gone: said, with the flags that keep them
    bare = world / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("eval"))
    shutil.rmtree(bare / "ppo" / "checkpoints")
    none = frontier(world, bare)
    assert none.exit_code == 2 and "holds no complete checkpoint" in " ".join(none.stderr.split())
    assert "--keep-checkpoints" in none.stderr and not (bare / "eval").exists()


def test_a_gold_that_fails_midway_publishes_nothing_and_keeps_earlier_results(world, monkeypatch, tmp_path):
    """The judge raises at its 10th call (the second point): no eval/NAME/ appears; over earlier results
    (--overwrite) they stay as they were."""
    (tmp_path / "failing_gold.py").write_text("calls = [0]\n\ndef score(prompt, responses):\n    calls[0] += 1\n"
                                              "    if calls[0] > 9:\n        raise ValueError('judge down')\n"
                                              "    return [1.0 for _ in responses]\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = world / "run"
    result = frontier(world, run_dir, "--gold", "python:failing_gold:score", "--name", "failing")
    assert result.exit_code == 2 and "judge down" in result.stderr
    assert not (run_dir / "eval" / "failing").exists()
    out = run_dir / "eval" / "pairwise"  # published by an earlier test; a failed rerun leaves it intact
    if out.exists():
        before = (out / "report.json").read_text()
        result = frontier(world, run_dir, "--gold", "python:failing_gold:score", "--name", "pairwise", "--overwrite")
        assert result.exit_code == 2 and (out / "report.json").read_text() == before


def test_compare_s_page_shows_the_frontier(world, monkeypatch):
    monkeypatch.syspath_prepend(str(world))
    run_dir = world / "run"
    if not (run_dir / "eval" / "ppo-frontier" / "report.json").exists():
        assert frontier(world, run_dir, "--gold", "python:goldrule:score").exit_code == 0
    result = igpt("compare", "ppo", "sft", "--prompts", world / "prompts.jsonl", "--run-dir", run_dir,
                  "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    page = (run_dir / "compare" / "ppo-vs-sft" / "report.html").read_text()
    section = page[page.index("id='frontier'"):]
    assert "data:image/png;base64," in section.split("<h2")[0] and "python:goldrule:score" in section.split("<h2")[0]


def compare(world, run_dir, a, b, *extra):
    return igpt("compare", a, b, "--prompts", world / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "12",
                "--temperature", "1.0", "--batch-size", "8", "--judge", "python:goldrule:score", *extra)


@pytest.mark.parametrize("run", ["run", "lora"])
def test_compare_takes_a_ppo_checkpoint_as_the_frontier_sampled_it(world, monkeypatch, run):
    """compare ppo@step-1 answers exactly what the frontier's step-1 point answered (same settings and seed:
    the checkpoint's weights, on the SFT model, LoRA merged); ppo@step-N at the last step is the final policy."""
    monkeypatch.syspath_prepend(str(world))
    run_dir, last = world / run, 4 if run == "run" else 2
    result = frontier(world, run_dir, "--checkpoints", "1", "--temperature", "1.0", "--batch-size", "8",
                      "--name", "at-t1", "--overwrite")
    assert result.exit_code == 0, result.output
    step1 = read_jsonl(run_dir / "eval" / "at-t1" / "samples" / "step-000001.jsonl")
    final = read_jsonl(run_dir / "eval" / "at-t1" / "samples" / f"step-{last:06d}.jsonl")
    assert [s["response_ids"] for s in step1] != [s["response_ids"] for s in final]
    result = compare(world, run_dir, "ppo@step-1", "ppo@" + str(last), "--overwrite")
    assert result.exit_code == 0, result.output
    out = run_dir / "compare" / "ppo-step-1-vs-ppo.python-goldrule-score"
    report = json.loads((out / "report.json").read_text())
    assert (report["a"], report["b"]) == ("ppo-step-1", "ppo")
    assert report["a_path"] == str(run_dir / "ppo" / "checkpoints" / "step-000001")
    pairs = read_jsonl(out / "responses.jsonl")
    assert [p["a_ids"] for p in pairs] == [s["response_ids"] for s in step1]
    assert [p["b_ids"] for p in pairs] == [s["response_ids"] for s in final]
    # the rule judge's verdicts on those responses, tallied by hand
    verdicts = [(rule(p["a"]) > rule(p["b"])) - (rule(p["a"]) < rule(p["b"])) for p in pairs]
    assert (report["wins"], report["ties"], report["losses"]) == (verdicts.count(1), verdicts.count(0),
                                                                 verdicts.count(-1))
    # lineage: the checkpoint and the SFT model it loads on; PPO (or SFT) running again makes the result stale
    manifest = run_dir / "manifest.json"
    before = manifest.read_text()
    inputs = rundir.read_manifest(run_dir)["stages"][out.relative_to(run_dir).as_posix()]["inputs"]
    def stored(key):
        return rundir.stored_path(run_dir, inputs[key]["path"]).resolve()

    assert stored("a") == (run_dir / "ppo" / "checkpoints" / "step-000001").resolve()
    assert stored("a_base") == (world / "run" / "sft" / "final").resolve() and "b_base" not in inputs
    try:
        rundir.mark_stale(run_dir, "ppo")
        assert "stale" in rundir.read_manifest(run_dir)["stages"][out.relative_to(run_dir).as_posix()]
    finally:
        manifest.write_text(before)


def test_a_ppo_checkpoint_that_is_not_there_exits_2_before_any_model_loads(world, monkeypatch):
    import instructgpt_cli.refs as refs_module

    monkeypatch.syspath_prepend(str(world))
    monkeypatch.setattr(refs_module.Side, "load", lambda *a, **k: pytest.fail("a model loaded"))
    run_dir = world / "run"
    missing = compare(world, run_dir, "ppo@step-9", "sft")
    said = " ".join(missing.stderr.split())
    assert missing.exit_code == 2 and "A ppo@step-9: no complete checkpoint of step 9" in said
    assert "there are: 1, 2, 3, 4" in missing.stderr
    malformed = compare(world, run_dir, "sft", "ppo@last")
    assert malformed.exit_code == 2 and "B ppo@last: a PPO checkpoint is ppo@step-N" in malformed.stderr
    no_ppo = compare(world, world / "bare-run", "ppo@1", "sft")
    assert no_ppo.exit_code == 2 and "has no PPO stage" in no_ppo.stderr and not (world / "bare-run").exists()
    assert not list((run_dir / "compare").glob("*ppo-step-9*")) and not list((run_dir / "compare").glob("*@*"))


def frontier_points(golds, proxies):
    """Frontier points sft, step-1, ... with these gold and proxy means."""
    return [{"label": "sft" if i == 0 else f"step-{i}", "step": i, "gold_mean": g, "score_mean": s}
            for i, (g, s) in enumerate(zip(golds, proxies))]


def test_a_gold_drop_within_its_noise_is_not_over_optimisation_and_a_clear_one_is():
    """The proxy's pick (step-1) comes after the best gold point (sft) and scores higher on the proxy, so the
    point estimates show over-optimisation, and the old rule (pick later than the best gold) flagged both cases.
    Per-prompt gold of sft [3, 1, 2, 2] (mean 2):
    - step-1 [1, 2, 2, 1.6] (mean 1.65): differences [2, -1, 0, 0.4], mean 0.35, sd sqrt(4.67 / 3) = 1.24766,
      t(3) 3.182446 x 1.247664 / 2 = 1.985313: 95% CI [-1.635, 2.335] holds 0, not flagged;
    - step-1 [2.5, 0.4, 1.6, 1.5] (mean 1.5): differences [0.5, 0.6, 0.4, 0.5], mean 0.5, sd sqrt(0.02 / 3) =
      0.0816497, half-width 3.182446 x 0.0408248 = 0.129923: CI [0.370, 0.630] above 0, flagged."""
    from instructgpt_cli.frontier import best, gold_drop
    from instructgpt_cli.report import drop_text

    sft = [3.0, 1.0, 2.0, 2.0]
    noisy, clear = [1.0, 2.0, 2.0, 1.6], [2.5, 0.4, 1.6, 1.5]
    for later, drop, ci, flagged in ((noisy, 0.35, [-1.635313, 2.335313], False),
                                     (clear, 0.5, [0.370077, 0.629923], True)):
        points = frontier_points([2.0, sum(later) / 4], [0.1, 0.5])
        best_gold, best_proxy = best(points, "gold_mean"), best(points, "score_mean")
        assert (best_gold, best_proxy) == ("sft", "step-1")  # what the old rule flagged
        out = gold_drop(points, best_gold, best_proxy, {"sft": sft, "step-1": later})
        assert (out["from"], out["to"], out["n"]) == ("sft", "step-1", 4)
        assert out["drop"] == pytest.approx(drop) and out["ci"] == pytest.approx(ci, abs=1e-6)
        assert out["significant"] is flagged
        said = drop_text(out)  # what the terminal and report.html say under the frontier
        assert ("over-optimisation, the proxy kept rising" in said) is flagged
        assert ("within noise (the interval includes 0), not called over-optimisation" in said) is not flagged


def test_a_gold_drop_over_grouped_prompts_takes_its_interval_over_the_groups():
    """Three messages, four framings each; per-prompt differences 1.0 (x4), -0.2 (x4), 0.6 (x4): mean 0.4667.
    As 12 independent prompts: sd 0.52106, t(11) 2.200985 x 0.52106 / sqrt(12) = 0.33107, CI [0.136, 0.798],
    flagged. Clustered by message: group means [1.0, -0.2, 0.6], sd 0.61101, t(2) 4.302653 x 0.61101 / sqrt(3)
    = 1.51783, CI [-1.051, 1.985], within noise."""
    from instructgpt_cli.frontier import gold_drop

    points = frontier_points([1.0, 0.5], [0.0, 1.0])
    diffs = [1.0] * 4 + [-0.2] * 4 + [0.6] * 4
    values = {"sft": [1.0 + d for d in diffs], "step-1": [1.0] * 12}
    plain = gold_drop(points, "sft", "step-1", values)
    assert plain["ci"] == pytest.approx([0.135596, 0.797737], abs=1e-5) and plain["significant"] is True
    grouped = gold_drop(points, "sft", "step-1", values, [m for m in "abc" for _ in range(4)])
    assert (grouped["n"], grouped["clusters"]) == (12, 3) and grouped["drop"] == pytest.approx(0.466667, abs=1e-6)
    assert grouped["ci"] == pytest.approx([-1.051167, 1.984500], abs=1e-5) and grouped["significant"] is False
    assert gold_drop(points, "sft", "step-1", values, [None] * 12)["clusters"] is None  # ungrouped prompts


def test_a_pairwise_gold_s_drop_counts_wins_1_ties_half_losses_0():
    """A pairwise gold against the SFT response: step-1 ['A', 'A', 'A', 'tie'] (win rate 0.875) is the best gold,
    the proxy picks step-2 ['B', 'B', 'tie', 'B'] (0.125): differences [1, 1, 0.5, 0.5], mean 0.75, sd
    0.288675, half-width 3.182446 x 0.144338 = 0.459347: CI [0.291, 1.209], flagged."""
    from instructgpt_cli.frontier import gold_drop

    points = frontier_points([0.5, 0.875, 0.125], [0.0, 0.2, 0.9])
    values = {"sft": ["tie"] * 4, "step-1": ["A", "A", "A", "tie"], "step-2": ["B", "B", "tie", "B"]}
    out = gold_drop(points, "step-1", "step-2", values)
    assert out["drop"] == pytest.approx(0.75) and out["ci"] == pytest.approx([0.290653, 1.209347], abs=1e-6)
    assert out["significant"] is True


def test_no_gold_drop_without_a_later_proxy_pick_or_an_interval():
    from instructgpt_cli.frontier import gold_drop

    points = frontier_points([1.0, 2.0, 0.5], [0.3, 0.1, 0.2])
    values = {"sft": [1.0, 1.0], "step-1": [2.0, 2.0], "step-2": [0.5, 0.5]}
    assert gold_drop(points, "step-1", "sft", values) is None  # the proxy's pick comes before the gold's best
    assert gold_drop(points, "step-1", "step-1", values) is None  # the same point
    one = gold_drop(frontier_points([2.0, 1.0], [0.0, 1.0]), "sft", "step-1", {"sft": [2.0], "step-1": [1.0]})
    assert one["drop"] == 1.0 and one["ci"] is None and one["significant"] is False  # one prompt: no interval
