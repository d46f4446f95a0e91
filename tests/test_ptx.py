"""PPO-ptx and the LM losses: the chunked head + cross-entropy against the plain one, ptx micro-batches
against one forward, PPO and ptx gradients in one optimizer step, one ptx batch per optimizer step, and the
paper preset (configs/instructgpt.yaml) scaled down to a tiny model."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, arithmetic_demos, igpt, marker_rankings, write_jsonl
from grads import assert_same_grads
from instructgpt_cli import forward
from instructgpt_cli import faults, losses
from instructgpt_cli.config import OptimConfig, PPOConfig
from instructgpt_cli.data import Demo
from instructgpt_cli.batches import IGNORE_INDEX, collate, pad_right, tokenize_demos
from instructgpt_cli.losses import linear_cross_entropy_sum, lm_targets, policy_loss, sft_loss_sum, value_loss
from instructgpt_cli.models import tiny_model, tiny_tokenizer
from instructgpt_cli.rollout import Rollout, build_rollout
from instructgpt_cli.forward import choose
from instructgpt_cli.rundir import read_metrics
from instructgpt_cli.runners import Runner
from instructgpt_cli.stages import ppo
from instructgpt_cli.train import stream_indices


def grads_of(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# ---------------------------------------------------------------- chunked LM head + cross-entropy


def ptx_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The oracle of the LM losses (PPO-ptx's term, eval's alignment tax): mean next-token cross-entropy over
    the real tokens of right-padded text, from the model's full logits (B, L, V); ids and mask (B, L)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                           lm_targets(input_ids, attention_mask).reshape(-1), ignore_index=IGNORE_INDEX)


def test_the_ptx_oracle_is_mean_token_cross_entropy_over_real_tokens():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = math.log(2.0)  # p(token 1 | pos 0) = 2/4
    ids = torch.tensor([[0, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # last position is padding
    loss = ptx_loss(logits, ids, mask)
    assert loss.item() == pytest.approx((math.log(2.0) + math.log(3.0)) / 2, rel=1e-6)


@pytest.mark.parametrize("rows", [1, 4, 37, 1000])
def test_chunked_linear_cross_entropy_equals_one_matmul(rows):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = IGNORE_INDEX  # skipped rows: no loss, no gradient
    want = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    got = linear_cross_entropy_sum(hidden, weight, targets, rows)
    torch.testing.assert_close(got, want)
    # a factor on the loss (the caller's normalisation) reaches both gradients
    assert_same_grads(dict(zip("hw", torch.autograd.grad(2.5 * got, (hidden, weight)))),
                      dict(zip("hw", torch.autograd.grad(2.5 * want, (hidden, weight)))))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, targets, rows), want.detach())


def test_chunked_linear_cross_entropy_edges():
    weight = torch.randn(11, 4, requires_grad=True)
    hidden = torch.randn(3, 4, requires_grad=True)
    none = linear_cross_entropy_sum(hidden, weight, torch.full((3,), IGNORE_INDEX), 2)  # every row ignored
    none.backward()
    assert none.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    empty = linear_cross_entropy_sum(torch.zeros(0, 4), weight.detach(), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0
    # a frozen head (LoRA): only the hidden states get a gradient
    h = torch.randn(5, 4, requires_grad=True)
    t = torch.randint(0, 11, (5,))
    frozen = weight.detach()
    (g,) = torch.autograd.grad(linear_cross_entropy_sum(h, frozen, t, 2), (h,))
    (want,) = torch.autograd.grad(F.cross_entropy(h @ frozen.T, t, reduction="sum"), (h,))
    torch.testing.assert_close(g, want)


def test_chunk_rows_keep_fp32_logits_to_tens_of_mb():
    assert losses.chunk_rows(49152) * 49152 * 4 <= losses.CHUNK_BYTES < (losses.chunk_rows(49152) + 1) * 49152 * 4
    assert losses.chunk_rows(10**9) == 1


def saved_logit_rows(fn, vocab: int) -> int:
    """The most rows of any (.., vocab) tensor autograd keeps for the backward while ``fn`` runs."""
    most = 0

    def pack(t):
        nonlocal most
        if t.dim() >= 1 and t.size(-1) == vocab:
            most = max(most, t.numel() // vocab)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return most


def test_sft_and_ptx_losses_chunked_equal_the_full_logits_and_keep_no_logits(monkeypatch):
    """forward.response_loss_sum and forward.lm_loss_sum on the lean path (a tiny Llama) against the model's own logits:
    the same loss and gradients, and no full-vocabulary tensor kept for the backward (the plain loss keeps
    its logits and their log-softmax: (rows, V) each)."""
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 7 * 260)  # a few rows a chunk: many chunks
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    blocks = [[rng.randrange(4, len(tok)) for _ in range(n)] for n in (23, 9, 16)]
    ids, mask = pad_right(blocks, tok.pad_token_id)
    summed, n = choose(model).lm_loss_sum(model, ids, mask)
    assert int(n) == sum(len(b) - 1 for b in blocks)
    (summed / n).backward()
    got = grads_of(model)
    want_loss = ptx_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    want_loss.backward()
    torch.testing.assert_close(summed / n, want_loss)
    assert_same_grads(got, grads_of(model))
    assert saved_logit_rows(lambda: choose(model).lm_loss_sum(model, ids, mask), vocab) == 0
    assert saved_logit_rows(lambda: ptx_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask),
                            vocab) >= int(n)

    demos = [Demo([{"role": "user", "content": d["prompt"]}], d["response"], None, f"d:{i}")
             for i, d in enumerate(arithmetic_demos(4))]
    batch = collate(tokenize_demos(tok, demos, 256)[0], tok.pad_token_id)
    summed, n = forward.choose(model).response_loss_sum(model, batch)
    summed.backward()
    got = grads_of(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    want, want_n = sft_loss_sum(model(**inputs).logits, batch["labels"])
    want.backward()
    assert int(n) == int(want_n) > 0
    torch.testing.assert_close(summed, want)
    assert_same_grads(got, grads_of(model))
    assert saved_logit_rows(lambda: forward.choose(model).response_loss_sum(model, batch), vocab) == 0


# ---------------------------------------------------------------- PPO-ptx in ppo_update

CPU = torch.device("cpu")


def ptx_blocks(tok, n: int = 9) -> list[list[int]]:
    """Blocks of very different lengths: a mean over blocks or over micro-batches differs from one over tokens."""
    rng = random.Random(1)
    return [[rng.randrange(4, len(tok)) for _ in range(rng.choice([3, 5, 30, 41]))] for _ in range(n)]


@pytest.mark.parametrize("micro", [1, 2, 5])
def test_ptx_micro_batches_give_the_loss_and_gradient_of_the_whole_batch(micro):
    tok = tiny_tokenizer()
    policy = tiny_model(tok, seed=0)
    blocks = ptx_blocks(tok)
    cfg = PPOConfig(ptx_coef=2.5, ptx_batch_size=5, ptx_micro_batch_size=micro)
    loss = ppo.ptx_backward(Runner(policy, CPU), blocks, 3, cfg, tok.pad_token_id, CPU)
    got = grads_of(policy)
    # the whole ptx batch of step 3 in one forward, the mean over all its tokens
    ids, mask = pad_right([blocks[i] for i in stream_indices(len(blocks), 3, 5, cfg.seed)], tok.pad_token_id)
    want = ptx_loss(policy(input_ids=ids, attention_mask=mask).logits, ids, mask)
    (2.5 * want).backward()
    assert loss == pytest.approx(want.item(), rel=1e-5)
    assert_same_grads(got, grads_of(policy))


def ppo_world(cfg: PPOConfig):
    """Tiny policy, value, reference and RM as ppo.run builds them, a fixed rollout of 8 and its scores."""
    tok = tiny_tokenizer()
    policy, value = tiny_model(tok, seed=0), tiny_model(tok, seed=1, kind="reward")
    ref = tiny_model(tok, seed=0).requires_grad_(False).eval()
    rm = tiny_model(tok, seed=2, kind="reward").requires_grad_(False).eval()
    trained = ppo.PolicyAndValue(policy, value)
    models = ppo.as_runners(ppo.PPOModules(policy, value, reference=ref, reward=rm), cfg, CPU)
    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(4, len(tok)) for _ in range(n)]  # noqa: E731
    ro = Rollout(*build_rollout([tokens(rng.randint(3, 9)) for _ in range(8)],
                                [tokens(rng.randint(1, 11)) + [tok.eos_token_id] * (i % 2) for i in range(8)],
                                tok.pad_token_id, tok.eos_token_id))
    sc = ppo.score_rollout(models, ro, cfg, 0.05, cfg.optim.batch_size)
    return tok, trained, models, ro, sc


def recording_optimizer(trained):
    """SGD whose every step records the gradients it was given; policy and value in their own groups, as
    ``igpt ppo`` builds its optimizer."""
    optimizer = torch.optim.SGD([{"params": [p for p in m.parameters() if p.requires_grad]}
                                 for m in (trained.policy, trained.value)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    seen = []
    step = optimizer.step

    def recorded(*args, **kwargs):
        seen.append({n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    optimizer.step = recorded
    return optimizer, scheduler, seen


def test_ppo_and_ptx_gradients_share_one_optimizer_step():
    """One minibatch: the one optimizer step's gradient is grad(pg + vf_coef * vf) + gamma * grad(ptx mean over
    every token of the step's ptx batch). A ptx step of its own, or a mean per block or per micro-batch,
    gives another gradient or another step count."""
    cfg = PPOConfig(rollout_batch_size=8, mini_batch_size=8, ppo_epochs=1, temperature=0.7, ptx_coef=3.0,
                    ptx_batch_size=5, ptx_micro_batch_size=2, vf_coef=0.3,
                    optim=OptimConfig(batch_size=3, grad_clip=0.0))
    tok, trained, models, ro, sc = ppo_world(cfg)
    blocks = ptx_blocks(tok)
    policy, value = trained.policy, trained.value
    mask = ro.response_mask.float()
    logprobs, _ = choose(policy).response_logprobs(policy, ro.query_response, ro.attention_mask, ro.context_len, cfg.temperature)
    pg, _ = policy_loss(logprobs, sc.logprobs, sc.advantages, mask, cfg.cliprange)
    vf, _ = value_loss(choose(value).token_values(value, ro.query_response, ro.attention_mask, ro.context_len), sc.values,
                       sc.returns, mask, cfg.cliprange_value)
    ids, pmask = pad_right([blocks[i] for i in stream_indices(len(blocks), 0, 5, cfg.seed)], tok.pad_token_id)
    ptx = ptx_loss(policy(input_ids=ids, attention_mask=pmask).logits, ids, pmask)
    (pg + cfg.vf_coef * vf + cfg.ptx_coef * ptx).backward()
    want = grads_of(trained)
    optimizer, scheduler, seen = recording_optimizer(trained)
    stats, _ = ppo.ppo_update(models, ppo.PPOState(trained, optimizer, scheduler), ro, sc, cfg, blocks, tok.pad_token_id)
    assert len(seen) == 1  # PPO and ptx in the same step
    assert_same_grads(seen[0], want)
    assert stats["loss/ptx"] == pytest.approx(ptx.item(), rel=1e-5)


def test_one_ptx_batch_per_optimizer_step_across_minibatches_and_epochs(monkeypatch):
    cfg = PPOConfig(rollout_batch_size=8, mini_batch_size=3, ppo_epochs=2, ptx_coef=1.0, ptx_batch_size=4,
                    optim=OptimConfig(batch_size=2, grad_clip=0.0))
    tok, trained, models, ro, sc = ppo_world(cfg)
    calls = []
    monkeypatch.setattr(ppo, "stream_indices", lambda *a: calls.append(a[1]) or stream_indices(*a))
    optimizer, scheduler, seen = recording_optimizer(trained)
    state = ppo.PPOState(trained, optimizer, scheduler)
    for iteration in range(2):
        state.step = iteration
        ppo.ppo_update(models, state, ro, sc, cfg, ptx_blocks(tok), tok.pad_token_id)
    assert len(seen) == 2 * 2 * 3  # iterations x epochs x minibatches (3, 3 and 2 responses), no more
    assert calls == list(range(12))  # ptx batch k in optimizer step k


@pytest.mark.parametrize("n_items,per_step", [(10, 4), (10, 5), (3, 8), (1, 1), (7, 7)])
def test_stream_indices_full_steps_every_item_once_a_pass(n_items, per_step):
    steps = [stream_indices(n_items, s, per_step, seed=3) for s in range(12)]
    assert all(len(s) == per_step for s in steps)  # no short last step
    stream = [i for s in steps for i in s]
    passes = [stream[k:k + n_items] for k in range(0, len(stream) - n_items + 1, n_items)]
    assert passes and all(sorted(p) == list(range(n_items)) for p in passes)  # none reused or skipped
    if n_items > 2:
        assert passes[0] != passes[1]  # a fresh order each pass
    assert stream_indices(n_items, 5, per_step, seed=3) == steps[5]  # a pure function of the step: resumable



# ---------------------------------------------------------------- through the CLI: resume, the paper preset


class Killed(Exception):
    pass


def test_ptx_batches_continue_across_iterations_and_resume(tmp_path, monkeypatch):
    """ppo from the command line, 3 iterations x 2 epochs x 2 minibatches, ptx batches of 7 of ~60 blocks
    (passes end mid-step): ptx batch k in optimizer step k, and a run killed after iteration 2 resumes
    with batch 8 (its checkpoint's scheduler), the batches of the uninterrupted run."""
    from test_ppo import WORDS
    from rule_rm import make_rule_rm

    rng = random.Random(0)
    write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(8))
    assert igpt("sft", "--config", REPO / "configs" / "tiny.yaml", "--data", tmp_path / "demos.jsonl",
                "--run-dir", tmp_path / "base", "--max-steps", "1").exit_code == 0
    make_rule_rm(tmp_path / "rule_rm", tiny_tokenizer(), "e")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} plus 2?"} for i in range(24)])
    write_jsonl(tmp_path / "pretrain.jsonl", [{"text": " ".join(rng.choice(WORDS) for _ in range(60))}
                                              for _ in range(12)])
    (tmp_path / "ptx.yaml").write_text("ppo:\n  ptx_batch_size: 7\n  ptx_seq_len: 64\n")

    def ppo_run(run_dir, *extra):
        calls = []  # the ptx batches (7 blocks a step; the prompt order, 4 a step, comes from the same function)
        monkeypatch.setattr(ppo, "stream_indices",
                            lambda *a: (a[2] == 7 and calls.append(a[:3])) or stream_indices(*a))
        args = ["ppo", "--config", tmp_path / "ptx.yaml", "--prompts", tmp_path / "prompts.jsonl",
                "--sft", tmp_path / "base" / "sft" / "final", "--rm", tmp_path / "rule_rm", "--run-dir", run_dir,
                "--max-new-tokens", "8", "--rollout-batch-size", "4", "--mini-batch-size", "2", "--ppo-epochs", "2",
                "--max-steps", "3", "--save-every", "1", "--ptx-coef", "0.5", "--ptx-data",
                tmp_path / "pretrain.jsonl", *extra]
        return igpt(*args), calls

    result, straight = ppo_run(tmp_path / "straight")
    assert result.exit_code == 0, result.output
    n_blocks = straight[0][0]
    assert n_blocks % 7 and 12 * 7 > n_blocks  # steps that straddle passes
    assert [c[1] for c in straight] == list(range(12)) and all(c[2] == 7 for c in straight)

    def die_after_2(step):
        if step == 2:
            raise Killed

    monkeypatch.setattr(faults, "after_step", die_after_2)
    with pytest.raises(Killed):
        ppo_run(tmp_path / "interrupted")
    result, resumed = ppo_run(tmp_path / "interrupted", "--resume")
    assert result.exit_code == 0 and "from step-000002" in result.stderr, result.output
    assert resumed == straight[8:]
    a, b = (read_metrics(d / "ppo" / "metrics.jsonl") for d in (tmp_path / "straight", tmp_path / "interrupted"))
    assert [r["loss/ptx"] for r in a] == [r["loss/ptx"] for r in b]


def test_paper_preset_scaled_down_runs_two_ppo_iterations(tmp_path):
    """configs/instructgpt.yaml as it is, with model.name tiny and every size divided by 32: sft, train-rm
    and 2 PPO-ptx iterations of 16 episodes, minibatches of 2 with 16 ptx blocks of 64 tokens each."""
    preset = yaml.safe_load((REPO / "configs" / "instructgpt.yaml").read_text())
    factor = 32
    preset["sft"]["model"].update(name="tiny", max_seq_len=2048 // factor)
    for stage in ("sft", "rm"):
        preset[stage]["optim"]["batch_size"] //= factor
    p = preset["ppo"]
    for key in ("rollout_batch_size", "mini_batch_size", "ptx_batch_size", "ptx_seq_len", "max_new_tokens"):
        p[key] //= factor
    p["model"]["max_seq_len"] = 4096 // factor  # a prompt and its response (the paper: 2048 tokens)
    p["optim"]["batch_size"] = max(1, p["optim"]["batch_size"] // factor)
    p["ptx_micro_batch_size"] = max(1, p["ptx_micro_batch_size"] // factor)
    p["optim"]["warmup_steps"] //= factor
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    rng = random.Random(0)
    write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(8))
    write_jsonl(tmp_path / "rankings.jsonl", marker_rankings(8))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{rng.randint(1, 9)} plus {rng.randint(1, 9)}?"}
                                             for _ in range(32)])
    write_jsonl(tmp_path / "pretrain.jsonl", [{"text": f"{i} and {i + 1} make {2 * i + 1}. " * 8} for i in range(20)])
    common = ["--config", tmp_path / "preset.yaml", "--run-dir", tmp_path / "run"]
    assert igpt("sft", *common, "--data", tmp_path / "demos.jsonl", "--max-steps", "1").exit_code == 0
    assert igpt("train-rm", *common, "--rankings", tmp_path / "rankings.jsonl", "--max-steps", "1").exit_code == 0
    result = igpt("ppo", *common, "--prompts", tmp_path / "prompts.jsonl", "--ptx-data", tmp_path / "pretrain.jsonl",
                  "--max-steps", "2")
    assert result.exit_code == 0, result.output
    metrics = read_metrics(tmp_path / "run" / "ppo" / "metrics.jsonl")
    assert len(metrics) == 2 and all(r["loss/ptx"] > 0 and r["episode"] == 16 * (i + 1) for i, r in enumerate(metrics))
    assert (tmp_path / "run" / "ppo" / "final" / "policy" / "model.safetensors").exists()
    assert (tmp_path / "run" / "ppo" / "final" / "policy_ema" / "model.safetensors").exists()  # ema_decay 0.992
