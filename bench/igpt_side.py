"""The igpt side: each benchmark runs igpt's own stage (``stages.sft.run``, ``stages.reward.run``,
``stages.ppo.run``: the code behind ``igpt sft / train-rm / ppo``) in this process on the prepared models
and data, then reads the per-step wall times from the stage's ``metrics.jsonl`` (``elapsed_s``).

The first ``warmup`` steps are dropped; the peak RSS is read right before the stage exports its final
model (the export is not part of training).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from common import DATA, model_dir, read_jsonl, vm_hwm_mb


def _capture_peak_before_export(module) -> dict:
    """Wrap ``module.save_final`` so the peak RSS is read before the first export."""
    box: dict = {}
    original = module.save_final

    def wrapped(*args, **kwargs):
        box.setdefault("peak_rss_mb", vm_hwm_mb())
        return original(*args, **kwargs)

    module.save_final = wrapped
    return box


def _step_seconds(metrics: Path, warmup: int) -> list[float]:
    rows = read_jsonl(metrics)
    elapsed = [r["elapsed_s"] for r in rows]
    return [elapsed[i] - elapsed[i - 1] for i in range(max(warmup, 1), len(elapsed))], rows


def sft(spec: dict) -> dict:
    from instructgpt_cli.config import ModelConfig, OptimConfig, SFTConfig
    from instructgpt_cli.stages import sft as stage

    from workloads import sft_plan

    plan = sft_plan(spec)
    run_dir = Path(tempfile.mkdtemp(prefix="igpt-bench-sft-"))
    try:
        cfg = SFTConfig(data=plan["data"], run_dir=str(run_dir),
                        model=ModelConfig(name=str(model_dir(spec["shape"], "policy")), dtype="float32",
                                          max_seq_len=1024),
                        optim=OptimConfig(batch_size=spec["batch_size"], grad_accum=1, lr=1e-5),
                        epochs=1, max_steps=plan["total_steps"], val_fraction=0.0, eval_every=10**9,
                        save_every=10**9, seed=0, device="cpu")
        box = _capture_peak_before_export(stage)
        stage.run(cfg, overwrite=True)
        seconds, rows = _step_seconds(run_dir / "sft" / "metrics.jsonl", spec["warmup"])
        timed = plan["steps"][spec["warmup"]:]
        igpt_tokens = [r["train/tokens"] for r in rows[spec["warmup"]:]]
        assert igpt_tokens == [s["tokens"] for s in timed], (igpt_tokens, [s["tokens"] for s in timed])
        return {"step_seconds": seconds, "units_per_step": [s["tokens"] for s in timed],
                "flops_per_step": [s["flops"] for s in timed], "peak_rss_mb": box.get("peak_rss_mb", vm_hwm_mb()),
                "notes": {"train_loss_mean": sum(r["train/loss"] for r in rows) / len(rows),
                          "tokens_total": sum(r["train/tokens"] for r in rows)}}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _ranking_result(metrics: Path, spec: dict, plan: dict, box: dict, notes: dict | None = None) -> dict:
    """A K-wise ranking workload's result (train-rm, dpo): comparisons per timed step, checked against the plan."""
    seconds, rows = _step_seconds(metrics, spec["warmup"])
    comparisons = [r["train/comparisons"] for r in rows[spec["warmup"]:]]
    assert all(c == plan["comparisons_per_step"] for c in comparisons), comparisons
    return {"step_seconds": seconds, "units_per_step": comparisons,
            "flops_per_step": [plan["flops_per_step"]] * len(seconds),
            "peak_rss_mb": box.get("peak_rss_mb", vm_hwm_mb()),
            "notes": {"sequences_per_step": plan["igpt_sequences_per_step"],
                      "train_loss_mean": sum(r["train/loss"] for r in rows) / len(rows),
                      "tokens_total": sum(r["train/tokens"] for r in rows), **(notes or {})}}


def rm(spec: dict) -> dict:
    from instructgpt_cli.config import ModelConfig, OptimConfig, RMConfig
    from instructgpt_cli.stages import reward as stage

    from workloads import rm_plan

    plan = rm_plan(spec)
    run_dir = Path(tempfile.mkdtemp(prefix="igpt-bench-rm-"))
    try:
        cfg = RMConfig(rankings=plan["data"], normalize=False, run_dir=str(run_dir),
                       share_prompts=spec.get("share_prompts", True),
                       model=ModelConfig(name=str(model_dir(spec["shape"], "policy")), dtype="float32",
                                         max_seq_len=1024),
                       optim=OptimConfig(batch_size=spec["prompts_per_step"], grad_accum=1, lr=1e-5),
                       epochs=1, max_steps=plan["total_steps"], val_fraction=0.0, eval_every=10**9,
                       save_every=10**9, seed=0, device="cpu")
        box = _capture_peak_before_export(stage)
        stage.run(cfg, overwrite=True)
        return _ranking_result(run_dir / "rm" / "metrics.jsonl", spec, plan, box, {
            "tokens_run_per_step": (plan["igpt_shared_tokens_per_step"] if cfg.share_prompts
                                    else plan["full_tokens_per_step"]),
            "forwards_per_comparison": plan["igpt_sequences_per_step"] / plan["comparisons_per_step"]})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def dpo(spec: dict) -> dict:
    """igpt dpo on the RM group's rankings: K policy forwards a ranking, the reference's log-probs computed in a
    pass before the first step (outside the timed steps, as TRL's ``precompute_ref_log_probs``)."""
    from instructgpt_cli.config import DPOConfig, ModelConfig, OptimConfig
    from instructgpt_cli.stages import dpo as stage

    from workloads import rm_plan

    plan = rm_plan(spec)
    run_dir = Path(tempfile.mkdtemp(prefix="igpt-bench-dpo-"))
    try:
        cfg = DPOConfig(rankings=plan["data"], sft=str(model_dir(spec["shape"], "policy")), run_dir=str(run_dir),
                        share_prompts=spec.get("share_prompts", True),
                        model=ModelConfig(name="", dtype="float32", max_seq_len=1024),
                        optim=OptimConfig(batch_size=spec["prompts_per_step"], grad_accum=1, lr=1e-6,
                                          scheduler="linear"),
                        epochs=1, max_steps=plan["total_steps"], val_fraction=0.0, eval_every=10**9,
                        save_every=10**9, seed=0, device="cpu")
        box = _capture_peak_before_export(stage)
        stage.run(cfg, overwrite=True)
        return _ranking_result(run_dir / "dpo" / "metrics.jsonl", spec, plan, box)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def ppo(spec: dict) -> dict:
    from instructgpt_cli.config import LoraConfig, ModelConfig, OptimConfig, PPOConfig
    from instructgpt_cli.stages import ppo as stage

    from workloads import ppo_plan

    plan = ppo_plan(spec)
    run_dir = Path(tempfile.mkdtemp(prefix="igpt-bench-ppo-"))
    try:
        cfg = PPOConfig(prompts=str(DATA / spec["shape"] / "prompts.jsonl"), run_dir=str(run_dir),
                        sft=str(model_dir(spec["shape"], "policy")), rm=str(model_dir(spec["shape"], "reward")),
                        model=ModelConfig(name="", dtype="float32", max_seq_len=1024),
                        lora=LoraConfig(enabled=bool(spec.get("lora"))),
                        optim=OptimConfig(lr=1e-5, scheduler="constant_with_warmup", warmup_steps=0,
                                          batch_size=spec["micro_batch"], grad_clip=0.0),
                        max_steps=plan["total_steps"], rollout_batch_size=spec["rollout_batch"],
                        mini_batch_size=spec["rollout_batch"], ppo_epochs=spec["ppo_epochs"],
                        temperature=spec["temperature"], max_new_tokens=spec["response_length"], beta=spec["kl_coef"],
                        missing_eos_penalty=1.0, sample_every=10**9, save_every=10**9, seed=0, device="cpu")
        box = _capture_peak_before_export(stage)
        stage.run(cfg, overwrite=True)
        seconds, rows = _step_seconds(run_dir / "ppo" / "metrics.jsonl", spec["warmup"])
        timed = rows[spec["warmup"]:]
        phases = {k: sum(r[k] for r in timed) / len(timed) for k in timed[0] if k.startswith("timing/")}
        return {"step_seconds": seconds, "units_per_step": [spec["rollout_batch"]] * len(seconds),
                "peak_rss_mb": box.get("peak_rss_mb", vm_hwm_mb()),
                "notes": {"response_length_mean": sum(r["val/response_length"] for r in timed) / len(timed),
                          "seconds_by_phase": phases, "lora": bool(spec.get("lora")),
                          "ratio_first": timed[0].get("val/ratio_first")}}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


TASKS = {"sft": sft, "rm": rm, "ppo": ppo, "dpo": dpo}
