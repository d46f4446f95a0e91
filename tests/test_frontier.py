"""igpt eval ppo --checkpoints: the reward-vs-KL frontier of a PPO run, its gold judge, PPO checkpoints loaded
as models, publishing all or nothing, and compare's page showing it."""
import json
import shutil

import pytest
import torch

from conftest import TINY_CONFIG, arithmetic_demos, igpt, write_jsonl
from instructgpt_cli import rundir
from instructgpt_cli.models import load_trained_policy, tiny_tokenizer
from rule_rm import make_constant_lm, make_rule_rm

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
    write_jsonl(t / "demos.jsonl", arithmetic_demos(16))
    run_dir = t / "run"
    assert igpt("sft", "--config", TINY_CONFIG, "--data", t / "demos.jsonl", "--run-dir", run_dir,
                "--max-steps", "4").exit_code == 0
    make_rule_rm(run_dir / "rm" / "final", tiny_tokenizer(), "e")
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
    import instructgpt_cli.frontier as frontier_module

    monkeypatch.syspath_prepend(str(world))
    monkeypatch.setattr(frontier_module.Side, "load", lambda *a, **k: pytest.fail("a model loaded"))
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
