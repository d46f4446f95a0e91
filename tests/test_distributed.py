"""Two processes on CPU (gloo), launched as users launch them: ``torchrun --nproc-per-node 2 -m instructgpt_cli``.

A 2-process run writes one set of outputs and trains exactly what one process trains with the same
global batch (SFT through the CLI; a PPO update and a reward-model step on fixed data, under DDP and
FSDP); a killed 2-process run resumes on both ranks from the last complete checkpoint and ends equal
to an uninterrupted one (PPO under DDP, SFT under FSDP with sharded checkpoints); bad input fails on
every rank with nothing written.
"""
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_CONFIG, arithmetic_demos, igpt, marker_rankings, write_jsonl
from instructgpt_cli.models import tiny_model, tiny_tokenizer
from instructgpt_cli.rundir import read_metrics
from rule_rm import make_rule_rm

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def worker_env(tmp_path, extra=None):
    """This environment without any launcher's variables, one thread, offline, a per-test model cache."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update({"HF_HUB_OFFLINE": "1", "IGPT_CACHE": str(tmp_path / "cache"), **(extra or {})})
    # this checkout's package first: a script (tests/dist_steps.py) would otherwise import the installed one
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def torchrun(args, tmp_path, env_extra=None):
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`` (a free port each time)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], cwd=REPO, env=worker_env(tmp_path, env_extra), capture_output=True,
                          text=True, timeout=300)


def sft_args(data, run_dir, *extra):
    # 22 training examples, 4 per step over 2 ranks: step 6 is an epoch's short last step (one micro-batch,
    # so rank 1 runs a weight-0 one); held-out loss at steps 5 and 8
    return ["sft", "--config", TINY_CONFIG, "--data", data, "--run-dir", run_dir, "--max-steps", "8",
            "--batch-size", "2", "--save-every", "3", *extra]


def flat(text):
    """stderr with rich's line wrapping undone."""
    return " ".join(text.split())


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """The same SFT run by two processes (batch 2 each) and by one (batch 2 x accumulation 2)."""
    t = tmp_path_factory.mktemp("sft")
    write_jsonl(t / "demos.jsonl", arithmetic_demos(24))
    two = torchrun(["-m", "instructgpt_cli", *sft_args(t / "demos.jsonl", t / "two")], t)
    one = igpt(*sft_args(t / "demos.jsonl", t / "one", "--grad-accum", "2"))
    assert one.exit_code == 0, one.output
    return t, two


def test_two_process_sft_writes_one_set_of_outputs_equal_to_one_process(sft_runs):
    from transformers import AutoModelForCausalLM

    t, two = sft_runs
    assert two.returncode == 0, two.stderr
    assert two.stdout.split() == [str(t / "two" / "sft" / "final")]  # rank 0 alone prints the result
    assert "over 2 processes (DDP)" in flat(two.stderr)
    # exactly the files of a single-process run: one manifest, one metrics line a step, no temporaries
    assert files_under(t / "two") == files_under(t / "one")
    assert not [f for f in files_under(t / "two") if ".tmp-" in f]
    assert [m["step"] for m in read_metrics(t / "two" / "sft" / "metrics.jsonl")] == list(range(1, 9))
    assert json.loads((t / "two" / "manifest.json").read_text())["stages"]["sft"]["status"] == "completed"
    AutoModelForCausalLM.from_pretrained(t / "two" / "sft" / "final")
    # the same global batch trains the same model, and reports the same losses (reduced over ranks)
    a, b = weights(t / "one" / "sft" / "final"), weights(t / "two" / "sft" / "final")
    initial = tiny_model(tiny_tokenizer(), seed=0).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    ma, mb = (read_metrics(t / d / "sft" / "metrics.jsonl") for d in ("one", "two"))
    assert [m["step"] for m in ma if "eval/loss" in m] == [m["step"] for m in mb if "eval/loss" in m] == [5, 8]
    for key in ("train/loss", "train/grad_norm", "train/tokens", "eval/loss"):
        assert [m[key] for m in mb if key in m] == pytest.approx([m[key] for m in ma if key in m], rel=1e-6), key


def test_fsdp_sft_saves_shards_resumes_on_both_ranks_and_exports_a_plain_model(sft_runs):
    from transformers import AutoModelForCausalLM

    t, two = sft_runs
    args = ["-m", "instructgpt_cli", *sft_args(t / "demos.jsonl", t / "fsdp", "--fsdp")]
    killed = torchrun(args, t, {"IGPT_FAULT_AFTER_STEP": "5"})  # between the checkpoints of steps 3 and 6
    assert killed.returncode != 0 and "exitcode  : 99" in killed.stderr, killed.stderr
    ckpt = t / "fsdp" / "sft" / "checkpoints" / "step-000003"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt", "COMPLETED"} <= set(os.listdir(ckpt))
    assert not (t / "fsdp" / "sft" / "final").exists()
    assert [m["step"] for m in read_metrics(t / "fsdp" / "sft" / "metrics.jsonl")][-1] == 5
    resumed = torchrun([*args, "--resume"], t)
    assert resumed.returncode == 0, resumed.stderr
    for rank in (0, 1):
        assert f"rank {rank}/2: resumed at step 3 from step-000003" in resumed.stderr
    assert "over 2 processes (FSDP)" in flat(resumed.stderr)
    assert [m["step"] for m in read_metrics(t / "fsdp" / "sft" / "metrics.jsonl")] == list(range(1, 9))
    # a plain HF directory, gathered from the shards, equal to the DDP run's model
    final = t / "fsdp" / "sft" / "final"
    AutoModelForCausalLM.from_pretrained(final)
    a, b = weights(t / "two" / "sft" / "final"), weights(final)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_ppo_and_rm_steps_over_two_ranks_equal_one_process(tmp_path):
    import dist_steps

    write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(20))
    out = tmp_path / "steps.pt"
    result = torchrun([REPO / "tests" / "dist_steps.py", out, tmp_path / "ranks.jsonl"], tmp_path)
    assert result.returncode == 0, result.stderr
    two = torch.load(out, weights_only=True)
    one = dist_steps.all_steps(str(tmp_path / "ranks.jsonl"), fsdp=False)
    initial = {"ppo": {**{f"policy.{k}": v for k, v in tiny_model(tiny_tokenizer(), 0).state_dict().items()}},
               "rm": tiny_model(tiny_tokenizer(), 3, kind="reward").state_dict()}
    for mode in ("ddp", "fsdp"):
        for part in ("ppo", "rm"):
            a, b = one[part]["weights"], two[mode][part]["weights"]
            assert a.keys() == b.keys(), (mode, part)
            changed = [k for k in initial[part] if not torch.equal(initial[part][k], a[k])]
            assert len(changed) > len(initial[part]) // 2, (mode, part)  # the step did train
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{mode} {part} {k}")
        # whitening, token normalisation, ptx shares and every reported metric are global
        s1, s2 = one["ppo"]["stats"], two[mode]["ppo"]["stats"]
        assert s1.keys() == s2.keys() and "loss/ptx" in s1
        for k in s1:  # a clip fraction may flip one token on float noise at the clip boundary
            assert s2[k] == pytest.approx(s1[k], rel=1e-5, abs=0.02 if "clipfrac" in k else 1e-6), (mode, k)
        for key in ("record", "eval"):
            assert two[mode]["rm"][key] == pytest.approx(one["rm"][key], rel=1e-6), (mode, key)
        torch.testing.assert_close(two[mode]["rm"]["scores"], one["rm"]["scores"], rtol=0, atol=1e-6)


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old tunes".split()


def test_two_process_ppo_killed_resumes_on_both_ranks_equal_to_uninterrupted(sft_runs):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    t, _ = sft_runs
    make_rule_rm(t / "rule_rm", tiny_tokenizer(), "e")
    rng = random.Random(0)
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"What is {rng.randint(1, 30)} plus {rng.randint(1, 30)}?"}
                                      for _ in range(40)])
    write_jsonl(t / "pretrain.jsonl", [{"text": " ".join(rng.choice(WORDS) for _ in range(60))} for _ in range(20)])

    def ppo(run_dir):
        return ["-m", "instructgpt_cli", "ppo", "--prompts", t / "prompts.jsonl", "--sft", t / "two" / "sft" / "final",
                "--rm", t / "rule_rm", "--run-dir", run_dir, "--max-new-tokens", "12", "--rollout-batch-size", "8",
                "--mini-batch-size", "4", "--lr", "3e-3", "--max-steps", "3", "--save-every", "2", "--sample-every",
                "2", "--ppo-epochs", "2", "--target-kl", "0.5", "--ptx-coef", "0.5", "--ptx-data",
                t / "pretrain.jsonl"]

    straight = torchrun(ppo(t / "ppo_straight"), t)
    assert straight.returncode == 0, straight.stderr
    out = t / "ppo_straight" / "ppo"
    assert files_under(out) == sorted([
        "checkpoints", *[f"checkpoints/step-00000{s}{f}" for s in (2, 3) for f in
                         ("", "/COMPLETED", "/optimizer.pt", "/state.pt", "/trainable.safetensors")],
        "config.yaml", "metrics.jsonl", "samples", "samples/step-000002.jsonl", "samples/step-000003.jsonl", "final",
        "final/policy", "final/value", *[f"final/{m}/{f}" for m in ("policy", "value") for f in
                                         os.listdir(out / "final" / m)]])
    samples = [json.loads(line) for line in (out / "samples" / "step-000003.jsonl").read_text().splitlines()]
    assert len(samples) == 8  # both ranks' responses, gathered
    AutoModelForCausalLM.from_pretrained(out / "final" / "policy")
    AutoModelForSequenceClassification.from_pretrained(out / "final" / "value")
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["episode"] == 24
    first = metrics[0]
    assert first["val/ratio_first"] == pytest.approx(1.0, abs=1e-6) and first["objective/kl"] == pytest.approx(0, abs=1e-6)
    assert len({m["objective/beta"] for m in metrics}) > 1  # the KL controller moved beta (the same on both ranks)

    # rank 0 dies inside the last step's checkpoint, its files written but not published: step 2 is the newest
    killed = torchrun(ppo(t / "ppo_killed"), t, {"IGPT_FAULT_AFTER_STEP": "3:publish"})
    assert killed.returncode != 0 and "exitcode  : 99" in killed.stderr, killed.stderr
    assert not (t / "ppo_killed" / "ppo" / "final").exists()
    resumed = torchrun([*ppo(t / "ppo_killed"), "--resume"], t)
    assert resumed.returncode == 0, resumed.stderr
    for rank in (0, 1):
        assert f"rank {rank}/2: resumed at step 2 from step-000002" in resumed.stderr
    for part in ("policy", "value"):  # each rank's sampling RNG, beta and the data order were restored
        a, b = weights(out / "final" / part), weights(t / "ppo_killed" / "ppo" / "final" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("timing/", "elapsed"))} for r in rows]  # noqa: E731
    assert strip(metrics) == strip(read_metrics(t / "ppo_killed" / "ppo" / "metrics.jsonl"))

    # SIGTERM reaches rank 0 only after iteration 1: both ranks agree to stop there, checkpoint it together,
    # exit 143; the resumed run ends equal to the uninterrupted one
    stopped = torchrun(ppo(t / "ppo_stopped"), t, {"IGPT_FAULT_AFTER_STEP": "1:SIGTERM"})
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 1 of 3" in flat(stopped.stderr), stopped.stderr
    assert (t / "ppo_stopped" / "ppo" / "checkpoints" / "step-000001" / "COMPLETED").exists()
    resumed = torchrun([*ppo(t / "ppo_stopped"), "--resume"], t)
    assert resumed.returncode == 0, resumed.stderr
    for part in ("policy", "value"):
        a, b = weights(out / "final" / part), weights(t / "ppo_stopped" / "ppo" / "final" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_bad_input_fails_on_every_rank_with_nothing_written(tmp_path):
    bad = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "hi", "response": "there"}, {"prompt": "x", "response": 3}])
    # Both ranks started as a launcher starts them (its environment), each waited for on its own: torchrun
    # would stop the other worker once one fails, and whether the second had exited by then is a race.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-m", "instructgpt_cli", *map(str, sft_args(bad, tmp_path / "run"))],
                              cwd=REPO, env=worker_env(tmp_path, {**group, "RANK": str(r), "LOCAL_RANK": str(r)}),
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) for r in range(2)]
    try:
        stderr = [proc.communicate(timeout=300)[1] for proc in ranks]  # a rank that hung would time out here
    finally:
        for proc in ranks:
            proc.kill()
    assert [proc.returncode for proc in ranks] == [2, 2], stderr  # both ranks exited 2
    assert all(err.count(f"error: {bad}:2: response: must be a non-empty string") == 1 for err in stderr), stderr
    assert not (tmp_path / "run").exists()


def test_fsdp_without_a_launcher_trains_unsharded(tmp_path, demos_file):
    result = igpt(*sft_args(demos_file, tmp_path / "run", "--fsdp"))
    assert result.exit_code == 0, result.output
    assert "--fsdp ignored: one process" in flat(result.stderr)
    assert (tmp_path / "run" / "sft" / "checkpoints" / "step-000006" / "trainable.safetensors").exists()


def test_two_process_ppo_with_lora_on_the_top_layer_caches_the_frozen_one(sft_runs, tmp_path):
    """DDP over the layers above cached frozen ones: the first minibatch's ratio is still exactly 1."""
    t, _ = sft_runs
    make_rule_rm(tmp_path / "rule_rm", tiny_tokenizer(), "e")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} plus {i + 3}?"} for i in range(16)])
    (tmp_path / "lora.yaml").write_text("ppo:\n  lora: {enabled: true, layers: 1}\n")
    out = torchrun(["-m", "instructgpt_cli", "ppo", "--config", tmp_path / "lora.yaml", "--prompts",
                    tmp_path / "prompts.jsonl", "--sft", t / "two" / "sft" / "final", "--rm", tmp_path / "rule_rm",
                    "--run-dir", tmp_path / "run", "--max-new-tokens", "12", "--rollout-batch-size", "8",
                    "--mini-batch-size", "8", "--lr", "3e-3", "--max-steps", "2", "--ppo-epochs", "2"], tmp_path)
    assert out.returncode == 0, out.stderr
    metrics = read_metrics(tmp_path / "run" / "ppo" / "metrics.jsonl")
    assert all(m["timing/scoring/frozen"] > 0 for m in metrics)
    assert metrics[0]["val/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "run" / "ppo" / "final" / "policy" / "model.safetensors").exists()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_ema_of_the_policy_is_gathered_whole_and_equals_ddps(sft_runs, tmp_path, lora):
    """--ema-decay under FSDP: each rank averages its shard; the checkpoint holds the whole average (every tensor
    its parameter's full shape) and final/policy_ema equals a DDP run's (where every rank averages it all). With
    LoRA the average is of the adapted weights, W + scale * B @ A, each rank's rows of it from the gathered factors."""
    t, _ = sft_runs
    make_rule_rm(tmp_path / "rule_rm", tiny_tokenizer(), "e")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} plus {i + 3}?"} for i in range(16)])
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = torchrun(["-m", "instructgpt_cli", "ppo", "--prompts", tmp_path / "prompts.jsonl", "--sft",
                        t / "two" / "sft" / "final", "--rm", tmp_path / "rule_rm", "--run-dir", tmp_path / mode,
                        "--max-new-tokens", "12", "--rollout-batch-size", "8", "--mini-batch-size", "4", "--lr", "3e-3",
                        "--max-steps", "2", "--ema-decay", "0.5", *(["--fsdp"] if mode == "fsdp" else []),
                        *(["--lora"] if lora else [])], tmp_path)
        assert out.returncode == 0, out.stderr
        runs[mode] = {m: weights(tmp_path / mode / "ppo" / "final" / m) for m in ("policy", "policy_ema")}
    sft = weights(t / "two" / "sft" / "final")
    state = torch.load(tmp_path / "fsdp" / "ppo" / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert {k: v.shape for k, v in state["extra"]["ema"].items()} == {k: sft[k].shape for k in state["extra"]["ema"]}
    ddp, fsdp = runs["ddp"]["policy_ema"], runs["fsdp"]["policy_ema"]
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(fsdp[k], runs["fsdp"]["policy"][k], atol=1e-4) for k in fsdp)


def test_two_process_dpo_equals_one_process(sft_runs):
    """igpt dpo under torchrun: each rank scores its share of a step's rankings (the reference pass too); the
    same global batch trains the same model with the same reported losses and reference log-probs."""
    t, _ = sft_runs
    write_jsonl(t / "ranks.jsonl", marker_rankings(20))
    args = ["dpo", "--config", TINY_CONFIG, "--rankings", t / "ranks.jsonl", "--sft", t / "one" / "sft" / "final",
            "--max-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--val-fraction", "0.2", "--eval-every", "3"]
    two = torchrun(["-m", "instructgpt_cli", *args, "--run-dir", t / "dpo_two"], t)
    assert two.returncode == 0, two.stderr
    one = igpt(*args, "--run-dir", t / "dpo_one", "--grad-accum", "2")
    assert one.exit_code == 0, one.output
    a, b = weights(t / "dpo_one" / "dpo" / "final"), weights(t / "dpo_two" / "dpo" / "final")
    start = weights(t / "one" / "sft" / "final")
    assert not torch.equal(a["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    ref_a, ref_b = (load_file(str(t / d / "dpo" / "ref_logps.safetensors")) for d in ("dpo_one", "dpo_two"))
    torch.testing.assert_close(ref_a["logps"], ref_b["logps"], rtol=0, atol=1e-5)
    ma, mb = (read_metrics(t / d / "dpo" / "metrics.jsonl") for d in ("dpo_one", "dpo_two"))
    assert [m["step"] for m in mb if "eval/loss" in m] == [3]
    for key in ("train/loss", "rewards/margins", "rewards/accuracies", "eval/loss", "eval/rewards/margins"):
        assert [m[key] for m in mb if key in m] == pytest.approx([m[key] for m in ma if key in m], rel=1e-5), key
