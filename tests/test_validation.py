"""Refused before any work: prompts that do not fit the context (ppo, sample, eval, compare), --ptx-data
with --ptx-coef 0, and a reward model that learned nothing (train-rm's interval and warning, ppo's gate)."""
import json
import random

import pytest

from conftest import TINY_CONFIG, arithmetic_demos, igpt, marker_rankings, write_jsonl
from instructgpt_cli.data import Prompt
from instructgpt_cli.batches import render_prompt, render_queries
from instructgpt_cli.errors import BadInput
from instructgpt_cli.models import tiny_tokenizer
from instructgpt_cli.stats import Z95, describe_rm_accuracy, rm_accuracy, t_quantile
from rule_rm import sft_with_rule_rm

TINY_CONTEXT = 1024  # max_position_embeddings of the tiny model (models.tiny_config)


def prompt_of(tokens: int) -> str:
    """A prompt that renders to exactly ``tokens`` tokens with the tiny (byte-level) tokenizer's chat template."""
    overhead = len(render_prompt(tiny_tokenizer(), [{"role": "user", "content": "x"}])) - 1
    return "x" * (tokens - overhead)


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run with a tiny SFT model and a rule reward model as rm/final (no accuracy record)."""
    t = tmp_path_factory.mktemp("valid")
    sft_with_rule_rm(t, t / "run", t / "run" / "rm" / "final", demos=16, steps=2)
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"Write about {w}."} for w in ("cats", "rain", "tea", "maps")])
    write_jsonl(t / "pretrain.jsonl", [{"text": "the quick brown fox jumps over the lazy dog " * 8}] * 4)
    return t


# ---------------------------------------------------------------- prompts that do not fit


def test_render_queries_at_the_edge_of_the_context_and_all_errors_reported():
    tok = tiny_tokenizer()
    prompts = [Prompt(prompt_of(n), None, f"p.jsonl:{i + 1}") for i, n in enumerate((36, 37, 20, 90))]
    assert [len(render_prompt(tok, p.messages)) for p in prompts] == [36, 37, 20, 90]
    # 36 + 64 = 100 fits a context of 100 exactly; 37 + 64 does not, nor 90 + 64
    with pytest.raises(BadInput) as e:
        render_queries(tok, prompts, 64, 100)
    assert e.value.messages == [
        "p.jsonl:2: prompt: 37 tokens + max_new_tokens 64 exceed the context of 100 tokens",
        "p.jsonl:4: prompt: 90 tokens + max_new_tokens 64 exceed the context of 100 tokens",
    ]
    queries = render_queries(tok, prompts[:1] + prompts[2:3], 64, 100)
    assert queries == [render_prompt(tok, prompts[0].messages), render_prompt(tok, prompts[2].messages)]
    assert len(render_queries(tok, prompts, 64, None)) == 4  # no known limit: nothing to check
    with pytest.raises(BadInput):
        render_queries(tok, prompts[2:3], 91, 100)  # a short prompt with too many new tokens


def long_prompts(path):
    """Line 1 fits; line 2 fits alone but not with 64 new tokens; line 3 fits; line 4 is longer than the context."""
    return write_jsonl(path, [{"prompt": "Say hi."}, {"prompt": prompt_of(TINY_CONTEXT - 63)}, {"prompt": "Bye."},
                              {"prompt": prompt_of(TINY_CONTEXT + 100)}])


COMMANDS = {
    "ppo": lambda w, p, out: ["ppo", "--prompts", p, "--sft", w / "run" / "sft" / "final", "--rm", w / "run" / "rm" / "final"],
    "sample": lambda w, p, out: ["sample", "--prompts", p, "--out", out],
    "eval": lambda w, p, out: ["eval", "sft", "--prompts", p],
    "compare": lambda w, p, out: ["compare", "sft", "sft", "--prompts", p],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_prompts_longer_than_the_context_exit_2_with_file_line_and_write_nothing(world, tmp_path, command):
    prompts = long_prompts(tmp_path / "prompts.jsonl")
    run_dir, out = world / "run", tmp_path / "samples.jsonl"
    before = snapshot(run_dir)
    result = igpt(*COMMANDS[command](world, prompts, out), "--run-dir", run_dir, "--max-new-tokens", "64")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {prompts}:2: prompt: {TINY_CONTEXT - 63} tokens + max_new_tokens 64 exceed the context of 1024 tokens",
        f"error: {prompts}:4: prompt: {TINY_CONTEXT + 100} tokens + max_new_tokens 64 exceed the context of 1024 tokens",
    ]
    assert snapshot(run_dir) == before and not out.exists()


def test_ppo_context_is_model_max_seq_len_capped_by_the_models(world, tmp_path):
    # tiny.yaml sets ppo's model.max_seq_len to 256: a 200-token prompt + 64 new tokens does not fit it
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompt_of(200)}])
    run_dir = tmp_path / "run"
    args = ["ppo", "--config", TINY_CONFIG, "--prompts", prompts, "--sft", world / "run" / "sft" / "final",
            "--rm", world / "run" / "rm" / "final", "--run-dir", run_dir, "--max-new-tokens", "64"]
    result = igpt(*args)
    assert result.exit_code == 2
    assert f"{prompts}:1: prompt: 200 tokens + max_new_tokens 64 exceed the context of 256 tokens" in result.stderr
    assert not run_dir.exists()
    # a max_seq_len above the model's own 1024 positions is capped at them
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": prompt_of(1000)}])
    result = igpt(*args[:4], long, *args[5:])
    assert result.exit_code == 2 and "exceed the context of 256 tokens" in result.stderr
    preset = tmp_path / "big.yaml"
    preset.write_text("ppo:\n  model: {max_seq_len: 4096}\n")
    result = igpt(*args[:2], preset, *args[3:4], long, *args[5:])
    assert result.exit_code == 2 and "1000 tokens + max_new_tokens 64 exceed the context of 1024 tokens" in result.stderr
    assert not run_dir.exists()


def test_ptx_data_without_a_coefficient_is_refused(world, tmp_path):
    run_dir = tmp_path / "run"
    result = igpt("ppo", "--prompts", world / "prompts.jsonl", "--sft", world / "run" / "sft" / "final",
                  "--rm", world / "run" / "rm" / "final", "--run-dir", run_dir, "--ptx-data", world / "pretrain.jsonl",
                  "--ptx-coef", "0")
    assert result.exit_code == 2
    assert "--ptx-data" in result.stderr and "--ptx-coef 0" in result.stderr
    assert not run_dir.exists()


# ---------------------------------------------------------------- a reward model that learned nothing


def test_rm_accuracy_interval_over_rankings_at_the_edges():
    assert rm_accuracy([], []) == {}  # nothing held out
    # one ranking of K=2, right: 100%, but one ranking cannot show how rankings vary: [0, 1], not above chance
    one = rm_accuracy([1], [1])
    assert one["accuracy"] == 1.0 and (one["accuracy_ci_low"], one["accuracy_ci_high"]) == (0.0, 1.0)
    # 0 of 60 pairs over 10 rankings of K = 4: no spread to estimate, so n is the rankings (t-adjusted, df 9)
    n_eff = 10 * (Z95 / t_quantile(0.975, 9)) ** 2
    zero = rm_accuracy([0] * 10, [6] * 10)
    assert (zero["accuracy_ci_low"], zero["accuracy_ci_high"]) == pytest.approx((0.0, Z95 ** 2 / (n_eff + Z95 ** 2)))
    # all right over 100 rankings: [n / (n + z^2), 1] with n = 100 (z / t_99)^2: 96.2%
    full = rm_accuracy([3] * 100, [3] * 100)
    n_eff = 100 * (Z95 / t_quantile(0.975, 99)) ** 2
    assert full["accuracy_ci_low"] == pytest.approx(n_eff / (n_eff + Z95 ** 2)) and full["accuracy_ci_high"] == 1.0
    # near the case: 52.8% (19 of 36 pairs) over 9 held-out rankings of K = 3
    mid = rm_accuracy([3, 3, 3, 2, 2, 2, 2, 1, 1], [4] * 9)
    assert mid["accuracy"] == pytest.approx(19 / 36) and mid["accuracy_ci_low"] < 0.5 < mid["accuracy_ci_high"]
    for record, warned in ((one, True), (zero, True), (full, False), (mid, True)):
        text, warning = describe_rm_accuracy({f"eval/{k}": v for k, v in record.items()})
        assert f"{record['accuracy']:.1%}" in text and f"{record['rankings']} held-out rankings" in text
        assert "clustered by ranking" in text
        assert (warning is not None) == warned and (not warned or "not above chance" in warning)
    # 25 rankings of 4 pairs: 80% and 70% are above chance, 60% (these counts) not yet: lower bound 49.0%
    verdicts = []
    for counts in ([4] * 10 + [3] * 10 + [2] * 5, [3] * 20 + [2] * 5, [4] * 5 + [3] * 5 + [2] * 10 + [1] * 5):
        record = rm_accuracy(counts, [4] * 25)
        verdicts.append(describe_rm_accuracy({f"eval/{k}": v for k, v in record.items()})[1] is None)
    assert verdicts == [True, True, False] and record["accuracy_ci_low"] == pytest.approx(0.4904, abs=1e-4)
    text, warning = describe_rm_accuracy(None)
    assert text.startswith("unknown accuracy") and warning
    assert describe_rm_accuracy({"eval/accuracy": 0.7})[1] is None  # an older record: no interval, no verdict
    # an ensemble's mean score, under its own prefix: read from those keys only, never from a member's eval/ ones
    both = {f"eval/{k}": v for k, v in mid.items()} | {f"ensemble/{k}": v for k, v in full.items()}
    assert describe_rm_accuracy(both, "ensemble/") == describe_rm_accuracy({f"eval/{k}": v for k, v in full.items()})
    assert describe_rm_accuracy({f"eval/{k}": v for k, v in full.items()}, "ensemble/")[0].startswith("unknown")


def rm_run(tmp_path, name, rankings, *extra):
    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(16))
    run_dir = tmp_path / name
    result = igpt("train-rm", "--model", "tiny", "--rankings", rankings, "--demos", demos, "--run-dir", run_dir,
                  "--lr", "2e-3", "--batch-size", "8", "--eval-every", "50", *extra)
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]["rm"]["outputs"]
    saved = json.loads((run_dir / "rm" / "final" / "config.json").read_text())["igpt_reward_stats"]
    return run_dir / "rm" / "final", result, manifest, saved


def ppo(world, rm, run_dir, *extra):
    return igpt("ppo", "--config", TINY_CONFIG, "--prompts", world / "prompts.jsonl", "--sft",
                world / "run" / "sft" / "final", "--rm", rm, "--run-dir", run_dir, "--max-steps", "1",
                "--rollout-batch-size", "4", "--mini-batch-size", "4", "--max-new-tokens", "8", *extra)


def test_an_rm_that_learned_the_marker_passes_the_gate(world, tmp_path):
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(100))
    rm, result, manifest, saved = rm_run(tmp_path, "good", rankings, "--epochs", "4")
    assert manifest["eval/rankings"] == 10 and manifest["eval/accuracy"] >= 0.9
    assert manifest["eval/accuracy_ci_low"] > 0.5 and manifest["eval/accuracy_ci_high"] <= 1.0
    assert manifest["eval/accuracy_ci_low"] < manifest["eval/accuracy"] or manifest["eval/accuracy"] == 1.0
    assert all(manifest[k] == v for k, v in saved.items())  # one record: in the manifest and with the model
    assert "held-out accuracy" in result.stderr and "not above chance" not in result.stderr
    run = ppo(world, rm, tmp_path / "ppo", "--require-rm-accuracy", "0.6", "--require-rm-above-chance")
    assert run.exit_code == 0, run.output
    assert f"held-out accuracy {manifest['eval/accuracy']:.1%}" in run.stderr and "not above chance" not in run.stderr


def test_an_rm_trained_on_random_ranks_warns_and_the_gate_refuses(world, tmp_path):
    rng = random.Random(1)
    shuffled = [{**r, "ranks": rng.sample(range(1, len(r["ranks"]) + 1), len(r["ranks"]))} for r in marker_rankings(60)]
    rankings = write_jsonl(tmp_path / "ranks.jsonl", shuffled)
    rm, result, manifest, saved = rm_run(tmp_path, "noise", rankings, "--max-steps", "2", "--val-fraction", "0.3")
    assert manifest["eval/rankings"] == 18 and manifest["eval/accuracy_ci_low"] <= 0.5
    assert "not above chance" in result.stderr and "--epochs" in result.stderr
    # ppo says so in its banner, and --require-rm-accuracy 0.6 refuses with nothing written
    run_dir = tmp_path / "ppo"
    refused = ppo(world, rm, run_dir, "--require-rm-accuracy", "0.6")
    assert refused.exit_code == 2, refused.output
    assert f"has held-out accuracy {manifest['eval/accuracy']:.1%}" in refused.stderr and "60.0%" in refused.stderr
    assert not run_dir.exists()
    # --require-rm-above-chance (the gold recipe's gate): the interval reaching 50% refuses, saying what to do
    refused = ppo(world, rm, run_dir, "--require-rm-above-chance")
    assert refused.exit_code == 2 and "--require-rm-above-chance" in refused.stderr, refused.output
    assert f"{manifest['eval/accuracy_ci_low']:.1%} (<= 50%)" in refused.stderr and "--epochs" in refused.stderr
    assert not run_dir.exists()
    warned = ppo(world, rm, run_dir)
    assert warned.exit_code == 0, warned.output
    assert "not above chance" in warned.stderr


def test_an_rm_with_no_record_is_unknown_and_the_gate_refuses(world, tmp_path):
    rule_rm = world / "run" / "rm" / "final"  # built by hand: no train-rm record
    run_dir = tmp_path / "ppo"
    refused = ppo(world, rule_rm, run_dir, "--require-rm-accuracy", "0.6")
    assert refused.exit_code == 2 and "no held-out accuracy record" in refused.stderr
    assert not run_dir.exists()
    refused = ppo(world, rule_rm, run_dir, "--require-rm-above-chance")
    assert refused.exit_code == 2 and "accuracy is unknown" in refused.stderr, refused.output
    assert not run_dir.exists()
    out_of_range = ppo(world, rule_rm, run_dir, "--require-rm-accuracy", "60")
    assert out_of_range.exit_code == 2 and "require_rm_accuracy" in out_of_range.stderr
    assert not run_dir.exists()
