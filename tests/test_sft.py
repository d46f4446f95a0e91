"""The sft stage end to end on the tiny model: outputs, learning, invariance, resume, LoRA."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_CONFIG, arithmetic_demos, igpt, write_jsonl
from grads import assert_same_grads
from instructgpt_cli.data import read_demos
from instructgpt_cli.batches import tokenize_demos
from instructgpt_cli.models import tiny_model, tiny_tokenizer
from instructgpt_cli.rundir import read_metrics
from instructgpt_cli.runners import Runner
from instructgpt_cli.stages.sft import train_step
from instructgpt_cli.train import TrainState


def final_weights(run_dir):
    return load_file(str(run_dir / "sft" / "final" / "model.safetensors"))


def test_cli_sft_writes_loadable_final_model_that_learned(tmp_path, demos_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    result = igpt("sft", "--model", "tiny", "--data", demos_file, "--run-dir", run_dir, "--max-steps", "20",
                  "--lr", "3e-3", "--batch-size", "4", "--save-every", "5", "--eval-every", "10")
    assert result.exit_code == 0, result.output
    final = run_dir / "sft" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    initial = tiny_model(tiny_tokenizer(), seed=0).state_dict()
    trained = model.state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) >= len(initial) - 1  # rotary buffers aside
    metrics = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    first, last = metrics[0]["train/loss"], sum(m["train/loss"] for m in metrics[-3:]) / 3
    assert last < 0.8 * first
    assert "eval/loss" in metrics[9] and "eval/loss" in metrics[19]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] == "completed"
    assert len(manifest["stages"]["sft"]["inputs"]["data"]["sha256"]) == 64
    assert (run_dir / "sft" / "config.yaml").read_text().startswith("sft:")
    # checkpoints: complete, and only the newest two are kept
    ckpts = sorted(p.name for p in (run_dir / "sft" / "checkpoints").iterdir())
    assert ckpts == ["step-000015", "step-000020"]  # the last step too: --resume --max-steps extends
    assert all((run_dir / "sft" / "checkpoints" / c / "COMPLETED").exists() for c in ckpts)


def test_rerun_refuses_without_resume_or_overwrite(tmp_path, demos_file):
    run_dir = tmp_path / "run"
    args = ["sft", "--config", TINY_CONFIG, "--data", demos_file, "--run-dir", run_dir, "--max-steps", "3"]
    assert igpt(*args).exit_code == 0
    before = final_weights(run_dir)
    refused = igpt(*args)
    assert refused.exit_code == 2 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    done = igpt(*args, "--resume")  # a finished stage resumes to a no-op
    assert done.exit_code == 0 and "already complete" in done.stderr
    assert all(torch.equal(before[k], v) for k, v in final_weights(run_dir).items())
    again = igpt(*args, "--overwrite", "--seed", "1")
    assert again.exit_code == 0
    assert not torch.equal(before["model.embed_tokens.weight"], final_weights(run_dir)["model.embed_tokens.weight"])


def one_step(batch_size, grad_accum, examples, tok, packed=False):
    torch.manual_seed(0)
    model = tiny_model(tok, seed=0)
    # SGD, so the weight change is the gradient itself (Adam's first step is ~lr*sign(g) and would
    # amplify float noise in near-zero gradients); the clip norm is large enough not to bind.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    cpu = torch.device("cpu")
    loss = train_step(Runner(model, cpu), TrainState(model, opt, sched), chunks, tok.pad_token_id, packed, cpu, 100.0)
    return loss["train/loss"], model.state_dict()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "padding-free"])
def test_batch_8_x_accum_1_equals_batch_1_x_accum_8(tmp_path, packed):
    from instructgpt_cli.batches import pays_to_pack

    tok = tiny_tokenizer()
    long_demo = {"prompt": "Count to twenty.", "response": " ".join(str(i) for i in range(1, 21))}
    demos = read_demos(write_jsonl(tmp_path / "d.jsonl", arithmetic_demos(7) + [long_demo]))
    examples, _ = tokenize_demos(tok, demos, 256)
    # lengths differ enough that padding and normalisation matter, and that batch 8 is packed when asked
    assert pays_to_pack([len(e.input_ids) for e in examples])
    loss_a, sd_a = one_step(8, 1, examples, tok, packed)
    loss_b, sd_b = one_step(1, 8, examples, tok, packed)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=1e-5, atol=1e-6)
    initial = tiny_model(tok, seed=0).state_dict()
    assert not torch.equal(sd_a["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def run_subprocess(args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "instructgpt_cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_killed_run_resumes_bit_identical(tmp_path, demos_file, lora):
    common = ["sft", "--config", TINY_CONFIG, "--data", demos_file, "--max-steps", "20", "--save-every", "5",
              "--dropout", "0.1", *(["--lora"] if lora else [])]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert igpt(*common, "--run-dir", straight).exit_code == 0
    # the process dies after step 13, between the checkpoints of steps 10 and 15
    killed = run_subprocess([*common, "--run-dir", interrupted], {"IGPT_FAULT_AFTER_STEP": "13"})
    assert killed.returncode == 99, killed.stderr
    assert not (interrupted / "sft" / "final").exists()
    assert [m["step"] for m in read_metrics(interrupted / "sft" / "metrics.jsonl")][-1] == 13
    resumed = igpt(*common, "--run-dir", interrupted, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "from step-000010" in resumed.stderr
    a, b = final_weights(straight), final_weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    steps = [m["step"] for m in read_metrics(interrupted / "sft" / "metrics.jsonl")]
    assert steps == list(range(1, 21))  # metrics of steps 11-13 were dropped and redone, not duplicated
    la = [m["train/loss"] for m in read_metrics(straight / "sft" / "metrics.jsonl")]
    lb = [m["train/loss"] for m in read_metrics(interrupted / "sft" / "metrics.jsonl")]
    assert la == lb


def test_lora_saves_adapter_and_merged_model_with_equal_logits(tmp_path, demos_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    result = igpt("sft", "--config", TINY_CONFIG, "--data", demos_file, "--run-dir", run_dir, "--lora",
                  "--max-steps", "8", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    final = run_dir / "sft" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    base = tiny_model(tiny_tokenizer(), seed=0)
    adapted = PeftModel.from_pretrained(copy.deepcopy(base), final / "adapter").eval()
    ids = torch.tensor([[1, 80, 90, 100, 33, 2, 1, 70]])
    with torch.no_grad():
        lm, la, lb = merged(ids).logits, adapted(ids).logits, base(ids).logits
    torch.testing.assert_close(lm, la, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(la, lb, atol=1e-4)  # the adapter learned something


def tiny_lm(lora: bool):
    """The tiny causal LM, with LoRA on its top layer when ``lora``."""
    from instructgpt_cli.config import LoraConfig
    from instructgpt_cli.models import apply_lora

    model = tiny_model(tiny_tokenizer(), seed=0)
    return apply_lora(model, LoraConfig(enabled=True, layers=1)) if lora else model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_lm_head_on_response_positions_only_equals_the_full_logits_loss(tmp_path, lora):
    from instructgpt_cli.batches import collate
    from instructgpt_cli.losses import sft_loss_sum
    from instructgpt_cli.forward import choose

    tok, model = tiny_tokenizer(), tiny_lm(lora)
    examples, _ = tokenize_demos(tok, read_demos(write_jsonl(tmp_path / "d.jsonl", arithmetic_demos(4))), 256)
    batch = collate(examples, tok.pad_token_id)
    fast, n_fast = choose(model).response_loss_sum(model, batch)
    full, n_full = sft_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])
    assert int(n_fast) == int(n_full) > 0
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_padding_free_batch_gives_the_padded_loss_and_gradients(tmp_path, lora):
    """Packed sequences attend only within themselves: loss and every gradient equal the padded batch's."""
    from instructgpt_cli.batches import collate, collate_packed
    from instructgpt_cli.families import supports_packing
    from instructgpt_cli.forward import choose

    tok, model = tiny_tokenizer(), tiny_lm(lora)
    demos = arithmetic_demos(3) + [{"prompt": "Say a long sentence, please.", "response": "word " * 30}]
    examples, _ = tokenize_demos(tok, read_demos(write_jsonl(tmp_path / "d.jsonl", demos)), 256)
    lengths = [len(e.input_ids) for e in examples]
    assert len(set(lengths)) > 1 and supports_packing(model)

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        summed, n = choose(model).response_loss_sum(model, batch)
        summed.backward()
        return summed.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    packed = collate_packed(examples)
    assert packed["input_ids"].shape == (1, sum(lengths))  # not a single padding token
    assert packed["position_ids"][0, lengths[0]] == 0       # positions restart at every example
    padded_loss, padded_n, padded_grads = loss_and_grads(collate(examples, tok.pad_token_id))
    packed_loss, packed_n, packed_grads = loss_and_grads(packed)
    assert packed_n == padded_n > 0
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    assert padded_grads
    assert_same_grads(packed_grads, padded_grads)


def test_models_without_packed_attention_are_padded():
    from transformers import GPT2Config, GPT2LMHeadModel

    from instructgpt_cli.families import supports_packing

    assert not supports_packing(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))


def test_packing_is_chosen_only_when_padding_would_waste_a_tenth():
    from instructgpt_cli.batches import pays_to_pack

    assert not pays_to_pack([7])              # one sequence: nothing to pad
    assert not pays_to_pack([10, 10, 10])     # equal lengths: no padding at all
    assert not pays_to_pack([10, 9])          # 1 of 20 padded tokens (5%)
    assert pays_to_pack([10, 8])              # 2 of 20 (10%)
    assert pays_to_pack([10, 5])              # 5 of 20 (25%)
