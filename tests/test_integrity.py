"""Checked checkpoints and final models: COMPLETED records every file's size and sha256; resume skips a
damaged checkpoint for the previous intact one, and a stage refuses a damaged model before reading it."""
import hashlib
import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CONFIG, igpt, marker_rankings, write_jsonl
from instructgpt_cli.config import LoraConfig, ModelConfig
from instructgpt_cli.errors import BadInput
from instructgpt_cli.models import apply_lora, check_sealed, load_model, save_final, tiny_model, tiny_tokenizer
from instructgpt_cli.storage import COMPLETED, seal_dir, verify_dir
from instructgpt_cli.rundir import begin_checkpoint, latest_checkpoint, publish_checkpoint, read_metrics


def compact(text: str) -> str:
    """Text without whitespace: rich wraps long stderr lines (and folds long paths) at the terminal width."""
    return re.sub(r"\s+", "", text)


def truncate(path, size: int) -> int:
    """Cut ``path`` to ``size`` bytes; returns the size it had."""
    before = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size)
    return before


def flip_byte(path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def sealed(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"0123456789")
    (d / "sub" / "b.bin").write_bytes(b"abc")
    seal_dir(d)
    return d


# ---------------------------------------------------------------- seal_dir / verify_dir


def test_seal_records_size_and_sha256_of_every_file_and_verifies_intact(sealed):
    record = json.loads((sealed / COMPLETED).read_text())
    assert record["files"] == {
        "a.bin": {"size": 10, "sha256": hashlib.sha256(b"0123456789").hexdigest()},
        "sub/b.bin": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
    }
    assert record["completed"][:2] == "20"
    assert verify_dir(sealed) == []


def test_verify_names_a_truncated_file_with_both_sizes(sealed):
    truncate(sealed / "a.bin", 4)
    assert verify_dir(sealed) == ["a.bin: 4 bytes, 10 recorded"]


def test_verify_names_a_missing_file(sealed):
    (sealed / "sub" / "b.bin").unlink()
    assert verify_dir(sealed) == ["sub/b.bin: missing"]


def test_verify_catches_a_flipped_byte_of_the_same_size(sealed):
    flip_byte(sealed / "a.bin", 3)
    assert verify_dir(sealed) == ["a.bin: sha256 differs from the one recorded"]


def test_verify_ignores_files_not_recorded(sealed):
    (sealed / "notes.txt").write_text("added by the user")
    assert verify_dir(sealed) == []


def test_old_style_completed_has_nothing_to_check_and_garbage_is_unreadable(sealed):
    (sealed / COMPLETED).write_text("2026-11-02T10:11:12+00:00\n")  # what igpt wrote before the record
    truncate(sealed / "a.bin", 1)
    assert verify_dir(sealed) == []
    (sealed / COMPLETED).write_text('{"completed": "2026-11-02T10:11:12+00:00", "fil')  # cut JSON
    assert verify_dir(sealed) == ["COMPLETED: unreadable"]
    (sealed / COMPLETED).unlink()
    assert verify_dir(sealed) == ["COMPLETED: missing"]


# ---------------------------------------------------------------- checkpoints


def publish(root, step, payload: bytes, keep=0):
    tmp = begin_checkpoint(root, step)
    (tmp / "trainable.safetensors").write_bytes(payload)
    return publish_checkpoint(root, tmp, step, keep)


def test_latest_checkpoint_skips_damaged_ones_and_says_which(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        publish(root, step, bytes(4096))
    truncate(root / "step-000006" / "trainable.safetensors", 100)
    (root / "step-000004" / "trainable.safetensors").unlink()
    said = []
    assert latest_checkpoint(root, warn=said.append) == root / "step-000002"
    assert said == [f"{root / 'step-000006'} is damaged (trainable.safetensors: 100 bytes, 4096 recorded); "
                    "resuming from step-000002",
                    f"{root / 'step-000004'} is damaged (trainable.safetensors: missing); resuming from step-000002"]
    assert (root / "step-000006").exists() and (root / "step-000004").exists()  # left for the user to look at


def test_latest_checkpoint_refuses_when_every_checkpoint_is_damaged(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        publish(root, step, bytes(64))
        flip_byte(root / f"step-{step:06d}" / "trainable.safetensors")
    with pytest.raises(BadInput) as e:
        latest_checkpoint(root)
    text = "\n".join(e.value.messages)
    assert "step-000002 is damaged (trainable.safetensors: sha256 differs" in text
    assert "step-000004 is damaged" in text and "--overwrite" in text
    assert latest_checkpoint(tmp_path / "none") is None  # nothing there: a fresh start


def test_pruning_keeps_the_resumed_runs_checkpoints_and_replaces_the_damaged_one(tmp_path):
    root = tmp_path / "checkpoints"
    publish(root, 2, b"two", keep=1)
    publish(root, 4, b"four", keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]
    publish(root, 2, b"two", keep=0)  # as if the run had kept 2 and died with 4 damaged
    truncate(root / "step-000004" / "trainable.safetensors", 1)
    assert latest_checkpoint(root) == root / "step-000002"
    # the resumed run saves step 3 with keep 1: the damaged step 4 (newer) neither counts nor crowds out step 3
    publish(root, 3, b"three", keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]
    assert latest_checkpoint(root) == root / "step-000003"
    publish(root, 4, b"FOUR", keep=1)  # reaching step 4 again replaces the damaged one
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]
    assert verify_dir(root / "step-000004") == [] and (root / "step-000004" / "trainable.safetensors").read_bytes() == b"FOUR"


# ---------------------------------------------------------------- final models


def test_save_final_seals_merged_weights_and_adapter_and_loading_checks_them(tmp_path):
    tok = tiny_tokenizer()
    model = apply_lora(tiny_model(tok, 0), LoraConfig(enabled=True, r=4))
    dest = tmp_path / "final"
    save_final(model, tok, dest)
    files = json.loads((dest / COMPLETED).read_text())["files"]
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {COMPLETED}
    assert set(files) == on_disk and {"model.safetensors", "config.json", "adapter/adapter_model.safetensors"} <= on_disk
    check_sealed(dest)
    flip_byte(dest / "adapter" / "adapter_model.safetensors")
    with pytest.raises(BadInput, match=r"final: damaged: adapter/adapter_model.safetensors: sha256 differs"):
        check_sealed(dest)
    truncate(dest / "model.safetensors", 10)
    with pytest.raises(BadInput, match=r"model.safetensors: 10 bytes, \d+ recorded.*re-run the stage that wrote it"):
        load_model(ModelConfig(name=str(dest)), tok, dest, torch.device("cpu"), 0)
    (dest / COMPLETED).unlink()  # a directory without COMPLETED (a user's own model) is not checked
    check_sealed(dest)


# ---------------------------------------------------------------- end to end


def test_resume_skips_a_truncated_checkpoint_and_ends_bit_identical(tmp_path, demos_file):
    run_dir = tmp_path / "run"
    args = ["sft", "--config", TINY_CONFIG, "--data", demos_file, "--run-dir", run_dir, "--max-steps", "20",
            "--save-every", "5", "--dropout", "0.1"]
    assert igpt(*args).exit_code == 0
    straight = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))
    ckpts = run_dir / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000015", "step-000020"]  # 20: the last step
    # killed after the last checkpoint and before the export, and the disk lost the newest checkpoint's tail
    shutil.rmtree(run_dir / "sft" / "final")
    size = truncate(ckpts / "step-000020" / "trainable.safetensors", 100)
    resumed = igpt(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert compact(f"{ckpts / 'step-000020'} is damaged (trainable.safetensors: 100 bytes, {size} recorded); "
                   "resuming from step-000015") in compact(resumed.stderr)
    assert "from step-000015" in resumed.stderr
    again = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))
    assert again.keys() == straight.keys()
    assert all(torch.equal(again[k], straight[k]) for k in straight), "resumed weights differ from the straight run"
    assert [m["step"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")] == list(range(1, 21))
    assert verify_dir(ckpts / "step-000020") == []  # the resumed run wrote step 15 again, whole
    assert verify_dir(run_dir / "sft" / "final") == [] and (run_dir / "sft" / "final" / COMPLETED).exists()


def test_next_stage_refuses_a_truncated_final_model_and_writes_nothing(tmp_path, demos_file):
    run_dir = tmp_path / "run"
    assert igpt("sft", "--config", TINY_CONFIG, "--data", demos_file, "--run-dir", run_dir, "--max-steps", "2").exit_code == 0
    final = run_dir / "sft" / "final"
    size = truncate(final / "model.safetensors", 1000)
    rankings = write_jsonl(tmp_path / "rankings.jsonl", marker_rankings(8))
    result = igpt("train-rm", "--rankings", rankings, "--run-dir", run_dir, "--max-steps", "1")  # from sft/final
    assert result.exit_code == 2, result.output
    assert compact(f"{final}: damaged: model.safetensors: 1000 bytes, {size} recorded; re-run the stage that wrote it") \
        in compact(result.stderr)
    assert "Traceback" not in result.output
    assert not (run_dir / "rm").exists()
    assert json.loads((run_dir / "manifest.json").read_text())["stages"].keys() == {"sft"}


def test_weights_digest_follows_a_file_rewritten_in_place(tmp_path):
    from instructgpt_cli.storage import weights_sha256

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 64)
    first = weights_sha256(tmp_path)
    assert weights_sha256(tmp_path) == first  # asked again: the same digest (read once)
    time.sleep(0.01)
    f.write_bytes(b"b" * 64)  # same size, new bytes (a retrained model saved in place)
    assert weights_sha256(tmp_path) != first
