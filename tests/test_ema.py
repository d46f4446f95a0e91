"""PPO's exponential moving average of the policy (--ema-decay): the update by hand, the exported
ppo/final/policy_ema against the average of the policy's weights after every optimizer step, with LoRA the
average of the merged weights (not of the factors), a stopped run resumed with a bit-identical average (full and
LoRA), eval and compare of ppo_ema."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import igpt, write_jsonl
from instructgpt_cli.ema import ModelEMA, ema_update
from test_ppo import ppo_args, world  # noqa: F401  (the tiny SFT model, rule RM and prompts)


def test_ema_update_by_hand_over_three_steps():
    ema = [torch.tensor([2.0, -4.0]), torch.tensor([[8.0]])]
    steps = [([6.0, 0.0], 0.0), ([3.0, 1.0], 4.0), ([-1.0, 2.0], -8.0)]
    for vector, scalar in steps:
        ema_update(ema, [torch.tensor(vector), torch.tensor([[scalar]])], 0.75)
    # 0.75 * 2 + 0.25 * 6 = 3; 0.75 * 3 + 0.25 * 3 = 3; 0.75 * 3 - 0.25 = 2.  -4 -> -3 -> -2 -> -1.
    # 8 -> 6 -> 5.5 -> 2.125
    assert ema[0].tolist() == [2.0, -1.0] and ema[1].tolist() == [[2.125]]


def test_ema_of_bf16_weights_is_fp32_and_keeps_increments_bf16_would_round_away():
    ema = [torch.tensor([1.0])]
    ema_update(ema, [torch.tensor([1.25], dtype=torch.bfloat16)], 0.992)
    assert ema[0].dtype == torch.float32 and ema[0].item() == pytest.approx(1.002)
    in_bf16 = torch.tensor(1.0, dtype=torch.bfloat16) * 0.992 + torch.tensor(1.25, dtype=torch.bfloat16) * 0.008
    assert in_bf16.item() == 1.0  # why the average is fp32: the same step in bf16 does not move


def test_only_applied_optimizer_steps_update_and_only_trained_tensors_are_kept():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)  # frozen, as a LoRA base is: not averaged
    from instructgpt_cli.stages.ppo import PPOState

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ema = ModelEMA(model, 0.5)
    state = PPOState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), ema=ema)
    assert ema.names == ["0.weight", "0.bias"]
    expected = [p.detach().clone() for p in model[0].parameters()]
    for i in range(3):
        model(torch.randn(4, 3)).square().sum().backward()
        before = [p.detach().clone() for p in model[0].parameters()]
        state.optimizer_step(0.0, loss=float("nan") if i == 1 else 1.0)  # step 1 is skipped: no update
        if i == 1:
            assert all(torch.equal(b, p) for b, p in zip(before, model[0].parameters()))
            continue
        expected = [0.5 * e + 0.5 * p.detach() for e, p in zip(expected, model[0].parameters())]
    assert state.skipped == 1 and state.ptx_cursor == 2  # the applied steps are the ptx stream's position
    state = ema.state()
    for name, e in zip(ema.names, expected):
        torch.testing.assert_close(state[name], e, rtol=0, atol=0)
    ema.load({n: t + 1 for n, t in state.items()})  # a checkpoint's average replaces the running one
    assert torch.equal(ema.state()["0.bias"], expected[1] + 1)


def sft_names(world):
    from transformers import AutoModelForCausalLM

    return [n for n, _ in AutoModelForCausalLM.from_pretrained(world / "base" / "sft" / "final").named_parameters()]


def test_policy_ema_is_the_average_of_the_policy_after_every_step(world, tmp_path, monkeypatch):  # noqa: F811
    """Decay 0.5 over 2 iterations x 2 minibatches: policy_ema = the hand-computed average of the SFT weights and
    the policy's weights after each of the 4 optimizer steps (captured from the optimizer, not the EMA)."""
    from instructgpt_cli.train import TrainState

    after_steps = []
    real = TrainState.optimizer_step_by_group

    def step_and_capture(state, *args):
        norms = real(state, *args)
        after_steps.append([p.detach().clone() for p in state.optimizer.param_groups[0]["params"]])  # the policy's
        return norms

    monkeypatch.setattr(TrainState, "optimizer_step_by_group", step_and_capture)
    run_dir = tmp_path / "run"
    result = igpt(*ppo_args(world, run_dir, "--max-steps", "2", "--ema-decay", "0.5"))
    assert result.exit_code == 0, result.output
    assert len(after_steps) == 4 and "decay 0.5 per optimizer step" in result.stderr
    names = sft_names(world)
    sft = load_file(str(world / "base" / "sft" / "final" / "model.safetensors"))
    expected = {n: sft[n].float() for n in names}
    for params in after_steps:
        expected = {n: 0.5 * expected[n] + 0.5 * p for n, p in zip(names, params)}
    final = run_dir / "ppo" / "final"
    ema, policy = (load_file(str(final / d / "model.safetensors")) for d in ("policy_ema", "policy"))
    assert (final / "policy_ema" / "COMPLETED").exists() and ema.keys() == policy.keys()
    for n in ema:
        torch.testing.assert_close(ema[n], expected[n])
    moved = [n for n in ema if not torch.equal(policy[n], sft[n])]
    assert moved and all(not torch.equal(ema[n], policy[n]) and not torch.equal(ema[n], sft[n]) for n in moved)
    outputs = json.loads((run_dir / "manifest.json").read_text())["stages"]["ppo"]["outputs"]
    assert outputs["policy_ema"].endswith("policy_ema")

    # eval and compare take it by its stage name
    prompts = write_jsonl(tmp_path / "four.jsonl", [{"prompt": f"What is {i} plus 2?"} for i in range(4)])
    common = ["--prompts", prompts, "--run-dir", run_dir, "--rm", world / "rule_rm", "--max-new-tokens", "8"]
    evaluated = igpt("eval", "ppo_ema", *common, "--sft", world / "base" / "sft" / "final", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["model"] == "ppo_ema" and report["model_path"].endswith("policy_ema") and report["n"] == 4
    assert math.isfinite(report["kl_to_sft"]) and (run_dir / "eval" / "ppo_ema" / "report.json").exists()
    compared = igpt("compare", "ppo_ema", "ppo", *common)
    assert compared.exit_code == 0, compared.output
    judged = json.loads((run_dir / "compare" / "ppo_ema-vs-ppo" / "report.json").read_text())
    assert judged["a_path"].endswith("policy_ema") and judged["judged"] == 4


def test_no_ema_by_default_and_ppo_ema_then_names_the_flag(world, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    assert igpt(*ppo_args(world, run_dir, "--max-steps", "1")).exit_code == 0
    assert sorted(p.name for p in (run_dir / "ppo" / "final").iterdir() if p.is_dir()) == ["policy", "value"]
    state = torch.load(run_dir / "ppo" / "checkpoints" / "step-000001" / "state.pt", weights_only=True)
    assert "ema" not in state["extra"]
    missing = igpt("eval", "ppo_ema", "--prompts", world / "prompts.jsonl", "--run-dir", run_dir)
    assert missing.exit_code == 2 and "--ema-decay" in missing.stderr
    bad = igpt(*ppo_args(world, tmp_path / "bad", "--ema-decay", "1"))
    assert bad.exit_code == 2 and "ema" in bad.stderr and not (tmp_path / "bad").exists()


def test_lora_ema_is_the_average_of_the_merged_weights_not_of_the_factors(world, tmp_path, monkeypatch):  # noqa: F811
    """With LoRA, policy_ema is the EMA of the weights the policy acts with, W + scale * B @ A after each optimizer
    step (hand-computed from the factors captured there), not W + scale * ema(B) @ ema(A): the product of the
    factors' averages is not the average of their product. Kept in fp32 under the merged model's names (no copy
    of an unadapted weight) and exported as a merged model without an adapter."""
    from instructgpt_cli.stages import ppo
    from instructgpt_cli.train import TrainState

    policies, factors = [], []  # the policy (peft model); its LoRA factors at the start and after every step
    real_build, real_step = ppo.build_optimizer, TrainState.optimizer_step_by_group

    def lora(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}

    def build_and_capture(trained, *args):
        policies.append(trained.policy)
        factors.append(lora(trained.policy))
        return real_build(trained, *args)

    def step_and_capture(*args):
        norms = real_step(*args)
        factors.append(lora(policies[0]))
        return norms

    monkeypatch.setattr(ppo, "build_optimizer", build_and_capture)
    monkeypatch.setattr(TrainState, "optimizer_step_by_group", step_and_capture)
    run_dir, decay = tmp_path / "run", 0.5
    result = igpt(*ppo_args(world, run_dir, "--max-steps", "2", "--lora", "--ema-decay", str(decay), "--lr", "3e-2"))
    assert result.exit_code == 0, result.output
    assert len(factors) == 1 + 4  # the start, then 2 iterations x 2 minibatches
    final = run_dir / "ppo" / "final"
    config = json.loads((final / "policy" / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    sft = load_file(str(world / "base" / "sft" / "final" / "model.safetensors"))
    adapted = {n.split("base_model.model.", 1)[1].replace(".lora_A.default.weight", ".weight"): n
               for n in factors[0] if ".lora_A." in n}
    assert adapted and set(adapted) < set(sft)

    def merged(f, name):  # W + scale * B @ A, in fp64 for the reference
        a = f[adapted[name]].double()
        return sft[name].double() + scale * f[adapted[name].replace(".lora_A.", ".lora_B.")].double() @ a

    by_hand = {n: merged(factors[0], n) for n in adapted}  # the EMA of the merged weights
    ema_factors = dict(factors[0])  # what averaging A and B apart gave
    for f in factors[1:]:
        by_hand = {n: decay * e + (1 - decay) * merged(f, n) for n, e in by_hand.items()}
        ema_factors = {n: decay * e + (1 - decay) * f[n] for n, e in ema_factors.items()}
    factorwise = {n: merged(ema_factors, n) for n in adapted}

    state = torch.load(run_dir / "ppo" / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    averaged = state["extra"]["ema"]
    assert sorted(averaged) == sorted(adapted) and all(t.dtype == torch.float32 for t in averaged.values())
    exported = load_file(str(final / "policy_ema" / "model.safetensors"))
    assert not (final / "policy_ema" / "adapter").exists() and exported.keys() == sft.keys()
    gap = sum((by_hand[n] - factorwise[n]).norm() ** 2 for n in adapted) ** 0.5
    error = sum((exported[n].double() - by_hand[n]).norm() ** 2 for n in adapted) ** 0.5
    assert error < 1e-5 and gap > 1000 * error  # here 9e-7 against 1.4
    for n in adapted:
        torch.testing.assert_close(exported[n].double(), by_hand[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(averaged[n].double(), by_hand[n], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(exported[n], sft[n]) for n in sft if n not in adapted)  # unadapted: the SFT weights


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_stopped_run_resumes_with_a_bit_identical_average(world, tmp_path, lora):  # noqa: F811
    from test_recovery import run

    lora_flag = ["--lora"] if lora else []
    args = lambda d: ppo_args(world, d, *lora_flag, "--max-steps", "3", "--save-every", "3", "--ema-decay", "0.9")  # noqa: E731
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert igpt(*args(straight)).exit_code == 0
    killed = run(args(stopped), {"IGPT_FAULT_AFTER_STEP": "1:SIGTERM"})
    assert killed.returncode == 143, killed.stderr
    changed = igpt(*args(stopped)[:-1], "0.99", "--resume")  # another decay averages something else
    assert changed.exit_code == 2 and "ema_decay" in changed.stderr
    assert igpt(*args(stopped), "--resume").exit_code == 0
    a, b = (load_file(str(d / "ppo" / "final" / "policy_ema" / "model.safetensors")) for d in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (torch.load(d / "ppo" / "checkpoints" / "step-000003" / "state.pt", weights_only=True)["extra"]["ema"]
              for d in (straight, stopped))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
