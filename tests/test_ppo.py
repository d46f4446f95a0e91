"""The ppo stage on tiny models from the command line: ratio 1 at the start, learning against a
rule-based reward model, PPO-ptx's smaller alignment tax, exact resume, swapping models."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import igpt, write_jsonl
from instructgpt_cli.batches import pad_right, pretrain_blocks
from instructgpt_cli.models import tiny_tokenizer
from instructgpt_cli.rundir import read_metrics
from grads import assert_same_grads
from rule_rm import make_rule_rm, sft_with_rule_rm
from test_ptx import ptx_loss

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old tunes".split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run with a tiny SFT model, a rule reward model (share of 'e'), prompts and pretraining text."""
    t = tmp_path_factory.mktemp("ppo")
    sft_with_rule_rm(t, t / "base", t / "rule_rm", demos=32, steps=10)
    rng = random.Random(0)
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"What is {rng.randint(1, 30)} plus {rng.randint(1, 30)}?"}
                                      for _ in range(64)])
    texts = [{"text": " ".join(rng.choice(WORDS) for _ in range(60))} for _ in range(50)]
    write_jsonl(t / "pretrain.jsonl", texts[:40])
    write_jsonl(t / "heldout.jsonl", texts[40:])
    return t


def ppo_args(world, run_dir, *extra):
    return ["ppo", "--prompts", world / "prompts.jsonl", "--sft", world / "base" / "sft" / "final",
            "--rm", world / "rule_rm", "--run-dir", run_dir, "--max-new-tokens", "24", "--rollout-batch-size", "8",
            "--mini-batch-size", "4", "--lr", "3e-3", *extra]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_first_minibatch_ratio_is_one_and_kl_starts_at_zero(world, tmp_path, lora):
    run_dir = tmp_path / "run"
    result = igpt(*ppo_args(world, run_dir, "--max-steps", "2", "--ppo-epochs", "2", *(["--lora"] if lora else [])))
    assert result.exit_code == 0, result.output
    first = read_metrics(run_dir / "ppo" / "metrics.jsonl")[0]
    assert first["val/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert first["policy/approxkl_first"] == pytest.approx(0.0, abs=1e-6)
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    for key in ("objective/scores", "objective/entropy", "policy/clipfrac", "loss/policy", "loss/value",
                "val/num_eos_tokens", "val/response_length", "timing/generation", "timing/training"):
        assert key in first
    parts = [first[f"timing/scoring/{m}"] for m in ("policy", "ref", "value", "reward")]
    assert all(p > 0 for p in parts) and sum(parts) <= first["timing/scoring"]  # the split of the scoring phase
    final = run_dir / "ppo" / "final"
    assert (final / "policy" / "model.safetensors").exists() and (final / "value" / "model.safetensors").exists()
    samples = (run_dir / "ppo" / "samples" / "step-000002.jsonl").read_text().splitlines()
    assert len(samples) == 8 and {"prompt", "response", "score", "kl"} <= json.loads(samples[0]).keys()


def flat(text):
    """stderr with rich's line wrapping undone."""
    return " ".join(text.split())


def test_every_iteration_samples_exactly_rollout_batch_size_episodes(world, tmp_path):
    """10 prompts, 4 per iteration: the third iteration takes the last 2 of the first pass and the first 2 of
    the next (not a short batch of 2); `episode` counts them; the value model has its own learning rate."""
    from instructgpt_cli.data import read_prompts
    from instructgpt_cli.train import stream_indices

    prompts = write_jsonl(tmp_path / "ten.jsonl", [{"prompt": f"What is {i} plus {i + 2}?"} for i in range(10)])
    run_dir = tmp_path / "run"
    args = ppo_args(world, run_dir, "--max-steps", "3", "--sample-every", "1", "--save-every", "2", "--vf-lr", "1e-3")
    args[args.index("--prompts") + 1], args[args.index("--rollout-batch-size") + 1] = prompts, "4"
    args[args.index("--mini-batch-size") + 1] = "2"
    result = igpt(*args)
    assert result.exit_code == 0, result.output
    assert "4 per iteration" in flat(result.stderr) and "12 episodes" in flat(result.stderr)
    assert "policy 0.003, value 0.001" in flat(result.stderr)
    m = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    assert [r["episode"] for r in m] == [4, 8, 12]
    assert all(r["val/eos_rate"] == r["val/num_eos_tokens"] / 4 for r in m)  # the share of the 4 that ended
    texts = [p.prompt for p in read_prompts(prompts)]
    for step in (1, 2, 3):
        lines = [json.loads(x) for x in (run_dir / "ppo" / "samples" / f"step-{step:06d}.jsonl").read_text().splitlines()]
        assert [x["prompt"] for x in lines] == [texts[j] for j in stream_indices(10, step - 1, 4, 0)]
    # the value model's parameter group: its own learning rate, its own gradient norm
    assert all(r["train/lr"] == pytest.approx(3e-3) and r["train/lr_value"] == pytest.approx(1e-3) for r in m)
    for r in m:
        assert r["train/grad_norm_policy"] > 0 and r["train/grad_norm_value"] > 0
    saved = torch.load(run_dir / "ppo" / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    assert [g["lr"] for g in saved["param_groups"]] == pytest.approx([3e-3, 1e-3])


def test_total_episodes_rounds_up_to_whole_iterations_and_more_prompts_than_the_file_wrap(world, tmp_path):
    prompts = write_jsonl(tmp_path / "ten.jsonl", [{"prompt": f"What is {i} plus {i + 2}?"} for i in range(10)])
    args = ppo_args(world, tmp_path / "run", "--total-episodes", "10")
    args[args.index("--prompts") + 1], args[args.index("--rollout-batch-size") + 1] = prompts, "4"
    result = igpt(*args)
    assert result.exit_code == 0, result.output
    assert "12 episodes (--total-episodes 10 rounded up to whole iterations of 4)" in flat(result.stderr)
    assert [r["episode"] for r in read_metrics(tmp_path / "run" / "ppo" / "metrics.jsonl")] == [4, 8, 12]
    # 16 per iteration from a file of 10: said in the banner, and 16 responses sampled
    args = ppo_args(world, tmp_path / "run16", "--max-steps", "1")
    args[args.index("--prompts") + 1], args[args.index("--rollout-batch-size") + 1] = prompts, "16"
    result = igpt(*args)
    assert result.exit_code == 0, result.output
    assert "16 per iteration (more than the file has" in flat(result.stderr)
    assert read_metrics(tmp_path / "run16" / "ppo" / "metrics.jsonl")[0]["episode"] == 16
    assert len((tmp_path / "run16" / "ppo" / "samples" / "step-000001.jsonl").read_text().splitlines()) == 16


def test_lora_dropout_is_off_in_ppo(world, tmp_path):
    """LoRA dropout 0.3 in the config: PPO turns it off like the model's, so the first minibatch's ratio is
    exactly 1 at every iteration (it was 1.0018 at the second, once the adapters had moved)."""
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("ppo:\n  lora: {enabled: true, dropout: 0.3}\n")
    result = igpt(*ppo_args(world, tmp_path / "run", "--config", cfg, "--max-steps", "3"))
    assert result.exit_code == 0, result.output
    m = read_metrics(tmp_path / "run" / "ppo" / "metrics.jsonl")
    assert any(r["policy/approxkl"] > 1e-6 for r in m)  # the adapters did move
    for r in m:
        assert r["val/ratio_first"] == pytest.approx(1.0, abs=1e-6)
        assert r["policy/approxkl_first"] == pytest.approx(0.0, abs=1e-7)


def test_score_rises_against_a_rule_reward_while_kl_stays_bounded(world, tmp_path):
    run_dir = tmp_path / "run"
    result = igpt(*ppo_args(world, run_dir, "--max-steps", "12", "--seed", "0"))
    assert result.exit_code == 0, result.output
    m = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    scores = [r["objective/scores"] for r in m]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.2, scores
    assert all(r["objective/kl"] < 10.0 for r in m), [r["objective/kl"] for r in m]
    assert any(r["objective/kl"] > 0.01 for r in m)  # the policy did move


def heldout_loss(model_dir, world):
    from transformers import AutoModelForCausalLM

    from instructgpt_cli.data import read_pretrain

    tok = tiny_tokenizer()
    ids, mask = pad_right(pretrain_blocks(tok, read_pretrain(world / "heldout.jsonl"), 256), tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return ptx_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask).item()


def test_ptx_keeps_held_out_pretraining_loss_closer_to_sft(world, tmp_path):
    losses = {}
    for coef in ("0", "1.0"):
        run_dir = tmp_path / f"ptx{coef}"
        ptx = ["--ptx-coef", coef, "--ptx-data", world / "pretrain.jsonl"] if coef != "0" else []  # data alone: exit 2
        result = igpt(*ppo_args(world, run_dir, "--max-steps", "8", *ptx))
        assert result.exit_code == 0, result.output
        losses[coef] = heldout_loss(run_dir / "ppo" / "final" / "policy", world)
        if coef != "0":
            assert "loss/ptx" in read_metrics(run_dir / "ppo" / "metrics.jsonl")[0]
    sft = heldout_loss(world / "base" / "sft" / "final", world)
    tax_without, tax_with = losses["0"] - sft, losses["1.0"] - sft
    assert tax_with < tax_without, (sft, losses)


def test_ptx_coef_without_data_is_refused(world, tmp_path):
    result = igpt(*ppo_args(world, tmp_path / "run", "--ptx-coef", "27.8"))
    assert result.exit_code == 2 and "--ptx-data" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_killed_ppo_run_resumes_bit_identical(world, tmp_path, lora):
    from test_sft import run_subprocess

    extra = ["--max-steps", "5", "--save-every", "2", "--ppo-epochs", "2", "--target-kl", "0.5", "--vf-lr", "1e-3",
             "--ptx-coef", "0.5", "--ptx-data", world / "pretrain.jsonl", *(["--lora"] if lora else [])]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert igpt(*ppo_args(world, straight, *extra)).exit_code == 0
    killed = run_subprocess(ppo_args(world, interrupted, *extra), {"IGPT_FAULT_AFTER_STEP": "3"})
    assert killed.returncode == 99, killed.stderr
    resumed = igpt(*ppo_args(world, interrupted, *extra), "--resume")
    assert resumed.exit_code == 0 and "from step-000002" in resumed.stderr, resumed.output
    for part in ("policy", "value"):
        a = load_file(str(straight / "ppo" / "final" / part / "model.safetensors"))
        b = load_file(str(interrupted / "ppo" / "final" / part / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    ma, mb = (read_metrics(d / "ppo" / "metrics.jsonl") for d in (straight, interrupted))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("timing/", "elapsed"))} for r in rows]  # noqa: E731
    assert strip(ma) == strip(mb)  # same samples, scores, KL controller and losses, step for step


def test_a_skipped_iteration_leaves_the_adaptive_beta_alone(world, tmp_path, monkeypatch):
    """A NaN reward in iteration 2 of 3 skips it (no update): its KL, finite, moves beta no more. The others move
    it by Ziegler's controller, by hand: beta *= 1 + clip(KL / target - 1, +-0.2) * rollout / horizon."""
    import math

    from instructgpt_cli.stages import ppo

    real, calls = ppo.score_rollout, []

    def nan_in_the_second(*args, **kwargs):
        sc = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            sc.scores[0] = math.nan
        return sc

    monkeypatch.setattr(ppo, "score_rollout", nan_in_the_second)
    run_dir = tmp_path / "run"
    result = igpt(*ppo_args(world, run_dir, "--max-steps", "3", "--target-kl", "0.5", "--kl-horizon", "80",
                            "--beta", "0.02"))
    assert result.exit_code == 0, result.output
    metrics = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    assert [m["train/skipped_steps"] for m in metrics] == [0, 1, 1]
    betas, kls = [m["objective/beta"] for m in metrics], [m["objective/kl"] for m in metrics]
    assert math.isfinite(kls[1]) and kls[1] != 0.5  # what the skipped iteration would have moved beta by
    step = lambda beta, kl: beta * (1 + max(-0.2, min(0.2, kl / 0.5 - 1)) * 8 / 80)  # noqa: E731
    assert betas[0] == 0.02 and betas[1] == pytest.approx(step(0.02, kls[0]), rel=1e-12)
    assert betas[2] == betas[1]  # the skipped iteration
    state = torch.load(run_dir / "ppo" / "checkpoints" / "step-000003" / "state.pt", weights_only=True)
    assert state["extra"]["beta"] == pytest.approx(step(betas[2], kls[2]), rel=1e-12)  # the last one moves it


def test_models_from_another_run_and_a_foreign_tokenizer(world, tmp_path):
    # --sft and --rm from elsewhere work (the fixture's run has no rm stage at all)
    result = igpt(*ppo_args(world, tmp_path / "run", "--max-steps", "1"))
    assert result.exit_code == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["ppo"]["inputs"]
    assert manifest["rm"]["path"] == str((world / "rule_rm").resolve()) and len(manifest["rm"]["sha256"]) == 64
    # a reward model that reads other tokens is refused before anything is written
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    make_rule_rm(tmp_path / "foreign_rm", other, "e")
    args = ppo_args(world, tmp_path / "run2", "--max-steps", "1")
    args[args.index("--rm") + 1] = tmp_path / "foreign_rm"
    refused = igpt(*args)
    assert refused.exit_code == 2 and "tokenizer differs" in refused.stderr
    assert not (tmp_path / "run2").exists()
    # no rm in the run and none given
    missing = igpt("ppo", "--prompts", world / "prompts.jsonl", "--run-dir", world / "base")
    assert missing.exit_code == 2 and "igpt train-rm" in missing.stderr


def outputs_and_grads(model, run, keep=None):
    """``run()``'s output (at ``keep``, when given) and the gradient of its sum of squares, by parameter."""
    model.zero_grad(set_to_none=True)
    out = run()
    out = out if keep is None else out[keep]
    out.square().sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_frozen_layers_run_once_give_the_full_forward_and_its_gradients(family):
    """LoRA on the top layers: logits, values and every adapter gradient from cached frozen-layer states
    equal those of the whole model; the base (adapters disabled) reads the same cache."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from instructgpt_cli.config import LoraConfig
    from instructgpt_cli.models import apply_lora
    from instructgpt_cli.families import frozen_layers
    from instructgpt_cli.forward import choose

    config = AutoConfig.for_model(family, vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    policy = apply_lora(AutoModelForCausalLM.from_config(config), LoraConfig(enabled=True, r=4, layers=1))
    value = apply_lora(AutoModelForSequenceClassification.from_config(config), LoraConfig(enabled=True, r=4, layers=2),
                       task_type="SEQ_CLS")
    for model in (policy, value):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # adapters that change the output
    assert (frozen_layers(policy), frozen_layers(value)) == (3, 2)
    qr = torch.randint(1, 96, (3, 12))
    mask = torch.ones_like(qr)
    mask[0, :4] = 0  # a left-padded query

    for model, fn, k in ((policy, lambda m, t: choose(m).response_logprobs(m, qr, mask, 5, 0.7, trunk=t)[0], 3),
                         (value, lambda m, t: choose(m).token_values(m, qr, mask, 5, t), 2)):
        with torch.no_grad():
            states = choose(model).trunk_states(model, k, qr, mask)
        full, full_grads = outputs_and_grads(model, lambda: fn(model, None))
        cached, cached_grads = outputs_and_grads(model, lambda: fn(model, (k, states)))
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
        assert any("lora" in n for n in full_grads)
        assert_same_grads(cached_grads, full_grads)
        with torch.no_grad(), model.disable_adapter():
            base, base_cached = fn(model, None), fn(model, (k, states))
        torch.testing.assert_close(base_cached, base, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(base, full, atol=1e-3)  # the adapters do matter


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batches_padded_only_on_the_right_run_unmasked_with_the_same_outputs_and_gradients(family):
    """No row padded on the left: the forward drops the attention mask (causal attention alone hides right
    pads from every real token); log-probs, values and gradients at real tokens are those of the masked one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from instructgpt_cli.batches import mask_inputs, position_ids
    from instructgpt_cli.forward import scalar_head_outputs
    from instructgpt_cli.forward import choose

    config = AutoConfig.for_model(family, vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    policy, value = AutoModelForCausalLM.from_config(config), AutoModelForSequenceClassification.from_config(config)
    qr = torch.randint(1, 96, (3, 12))
    mask = torch.ones_like(qr)
    mask[0, 8:], mask[2, 10:] = 0, 0  # responses that ended early: right padding only
    real = mask[:, 5:].bool()
    assert mask_inputs(mask) == {}
    left = mask.clone()
    left[1, :2] = 0  # a left-padded query keeps the mask
    assert set(mask_inputs(left)) == {"attention_mask", "position_ids"}
    masked = {"attention_mask": mask, "position_ids": position_ids(mask), "use_cache": False}

    def masked_logprobs(m):
        logits = m(input_ids=qr, **masked).logits[:, 4:-1].float() / 0.7
        return torch.log_softmax(logits, -1).gather(-1, qr[:, 5:, None])[..., 0]

    for model, fast, slow in ((policy, lambda m: choose(m).response_logprobs(m, qr, mask, 5, 0.7)[0], masked_logprobs),
                              (value, lambda m: choose(m).token_values(m, qr, mask, 5),
                               lambda m: scalar_head_outputs(m, input_ids=qr, **masked)[:, 4:-1])):
        (a, grads_a), (b, grads_b) = (outputs_and_grads(model, lambda: fn(model), real) for fn in (fast, slow))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert_same_grads(grads_a, grads_b)


def test_nothing_is_cached_where_the_layers_below_train_or_the_family_is_not_known():
    from transformers import AutoConfig, AutoModelForCausalLM

    from instructgpt_cli.config import LoraConfig
    from instructgpt_cli.models import apply_lora, tiny_model
    from instructgpt_cli.families import frozen_layers

    model = tiny_model(tiny_tokenizer(), seed=0)
    assert frozen_layers(model) == 0  # full fine-tuning: the embeddings train
    assert frozen_layers(apply_lora(model, LoraConfig(enabled=True, layers=0))) == 0  # LoRA on every layer
    gemma = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))  # scales its embeddings inside the backbone
    assert frozen_layers(apply_lora(gemma, LoraConfig(enabled=True, layers=1))) == 0


def test_ppo_with_cached_frozen_layers_trains_as_without(world, tmp_path):
    """LoRA on the top layer only: running the frozen layer once per rollout changes nothing but the time."""
    runs = {}
    for cache in ("true", "false"):
        cfg = tmp_path / f"cache-{cache}.yaml"
        cfg.write_text(f"ppo:\n  lora: {{enabled: true, layers: 1}}\n  cache_frozen_layers: {cache}\n")
        run_dir = tmp_path / cache
        result = igpt(*ppo_args(world, run_dir, "--config", cfg, "--max-steps", "3", "--ppo-epochs", "2"))
        assert result.exit_code == 0, result.output
        runs[cache] = read_metrics(run_dir / "ppo" / "metrics.jsonl")
        weights = load_file(str(run_dir / "ppo" / "final" / "policy" / "model.safetensors"))
        runs[cache + "-weights"] = weights
    assert all(r["timing/scoring/frozen"] > 0 for r in runs["true"])
    assert all("timing/scoring/frozen" not in r for r in runs["false"])
    for a, b in zip(runs["true"], runs["false"]):
        for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "val/ratio_first"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    a, b = runs["true-weights"], runs["false-weights"]
    assert any(not torch.equal(a[k], load_file(str(world / "base" / "sft" / "final" / "model.safetensors"))[k])
               for k in a)  # the policy did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_a_value_model_from_the_same_sft_runs_the_policys_frozen_layers_once(world, tmp_path, monkeypatch):
    """A reward model trained with LoRA on the top layer from the run's SFT model holds the SFT model's lowest
    layer: PPO runs it once per micro-batch for the policy and the value model both (half the trunk calls), and
    trains exactly as when each model runs its own."""
    from conftest import marker_rankings
    import instructgpt_cli.stages.ppo as ppo_stage
    from instructgpt_cli.runners import Runner

    sft = world / "base" / "sft" / "final"
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(16))
    rm_run = tmp_path / "rm-run"
    trained = igpt("train-rm", "--rankings", rankings, "--sft", sft, "--run-dir", rm_run, "--lora", "--lora-layers",
                   "1", "--max-steps", "2", "--val-fraction", "0", "--no-normalize")
    assert trained.exit_code == 0, trained.output
    calls = []
    real_trunk = Runner.trunk
    monkeypatch.setattr(Runner, "trunk", lambda self, *a: calls.append(a[0]) or real_trunk(self, *a))
    cfg = tmp_path / "lora1.yaml"
    cfg.write_text("ppo:\n  lora: {enabled: true, layers: 1}\n")
    runs = {}
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(ppo_stage, "shared_layers", lambda models: 0)
        calls.clear()
        run_dir = tmp_path / f"shared-{shared}"
        args = ppo_args(world, run_dir, "--config", cfg, "--max-steps", "2", "--ppo-epochs", "1")
        args[args.index("--rm") + 1] = rm_run / "rm" / "final"
        result = igpt(*args)
        assert result.exit_code == 0, result.output
        runs[shared] = (list(calls), read_metrics(run_dir / "ppo" / "metrics.jsonl"),
                        load_file(str(run_dir / "ppo" / "final" / "policy" / "model.safetensors")))
    assert runs[True][0] and set(runs[True][0]) == {1} and 2 * len(runs[True][0]) == len(runs[False][0])
    for a, b in zip(runs[True][1], runs[False][1]):
        for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "val/ratio_first"):
            assert a[key] == b[key], key  # the same layers on the same tokens: the same numbers, bit for bit
    assert all(torch.equal(runs[True][2][k], runs[False][2][k]) for k in runs[True][2])
