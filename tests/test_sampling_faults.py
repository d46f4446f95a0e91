"""Faults while label, sample, eval and compare write: a full disk, a torn last line, --overwrite over a
finished stage that then fails; each ends with its exit code, keeps whole lines or the old outputs, and
resumes."""
import builtins
import errno
import json
from pathlib import Path

import pytest

from conftest import igpt, write_jsonl
from instructgpt_cli.data import read_rankings

RULES = "def longest(prompt, responses):\n    return [float(len(r)) for r in responses]\n"
SAMPLES = [{"prompt": f"p{i}", "responses": ["a" * (i % 3 + 1), "bb" * (i % 2 + 2), "c"]} for i in range(6)]


def full_disk_after(monkeypatch, path: Path, lines: int) -> None:
    """Appends to ``path`` fail with ENOSPC once ``lines`` writes went through, the failing one writing half
    its bytes first (as a disk that fills up mid-write does)."""
    real_open, written = builtins.open, [0]

    class Filling:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            if written[0] >= lines:
                self.fh.write(data[:len(data) // 2])
                self.fh.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            written[0] += 1
            return self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return Filling(fh) if "a" in mode and Path(file) == path else fh

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.fixture
def labelling(tmp_path, monkeypatch):
    (tmp_path / "label_faults_rules.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    return write_jsonl(tmp_path / "samples.jsonl", SAMPLES), tmp_path / "ranks.jsonl"


def label(samples, out):
    return igpt("label", samples, "--judge", "python:label_faults_rules:longest", "--out", out)


def test_label_on_a_full_disk_exits_4_naming_the_file_keeps_whole_lines_and_resumes(labelling, monkeypatch):
    samples, out = labelling
    full_disk_after(monkeypatch, out, 2)
    result = label(samples, out)
    assert result.exit_code == 4, result.output
    assert f"no space left on device while writing {out}" in result.stderr and "Traceback" not in result.output
    assert out.read_text().endswith("\n") and len(read_rankings(out)) == 2  # whole lines only
    monkeypatch.undo()  # space freed
    resumed = label(samples, out)
    assert resumed.exit_code == 0 and "2 already ranked" in resumed.output, resumed.output
    assert [r.prompt for r in read_rankings(out)] == [s["prompt"] for s in SAMPLES]


def test_label_drops_a_torn_last_line_with_a_notice_and_resumes_after_the_whole_ones(labelling):
    samples, out = labelling
    assert label(samples, out).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:len(lines[3]) // 2])  # killed while appending the 4th
    resumed = label(samples, out)
    assert resumed.exit_code == 0, resumed.output
    assert "last line was cut off" in resumed.output and "3 already ranked" in resumed.output
    assert out.read_text() == "".join(lines)


def test_label_that_writes_nothing_exits_2_saying_why_and_a_rerun_of_a_finished_one_exits_0(labelling, tmp_path):
    samples, out = labelling
    tied = write_jsonl(tmp_path / "tied.jsonl", [{"prompt": "p", "responses": ["ab", "cd"]}])
    result = label(tied, out)
    assert result.exit_code == 2 and "tied every response" in result.stderr, result.output
    assert not out.exists()
    assert label(samples, out).exit_code == 0
    before = out.read_bytes()
    again = label(samples, out)  # a script re-run after a finished label goes on: its rankings stand
    said = " ".join(again.output.split())  # as the terminal wraps it
    assert again.exit_code == 0 and "nothing to label: all 6 prompts" in said, again.output
    assert "the 6 rankings already in it stand" in said and out.read_bytes() == before


# ---------------------------------------------------------------- igpt sample: chunks kept, --resume

PROMPTS = [{"prompt": f"Tell me about thing {i}.", "category": "open_qa"} for i in range(72)]  # chunks 32, 32, 8


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from conftest import TINY_CONFIG, arithmetic_demos

    root = tmp_path_factory.mktemp("sampling")
    demos = write_jsonl(root / "demos.jsonl", arithmetic_demos(24))
    result = igpt("sft", "--config", TINY_CONFIG, "--data", demos, "--run-dir", root / "run", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    prompts = write_jsonl(root / "prompts.jsonl", PROMPTS)
    whole = root / "whole.jsonl"
    assert igpt(*sample_args(root, prompts, whole)).exit_code == 0
    return root, prompts, whole.read_text()


def sample_args(root, prompts, out, *more):
    return ("sample", "--prompts", prompts, "--k", "2", "--out", out, "--run-dir", root / "run",
            "--max-new-tokens", "4", "--batch-size", "8", "--seed", "3", *more)


def stop_after_chunks(monkeypatch, chunks: int) -> None:
    """A SIGTERM (as the handler raises it) once ``chunks`` chunks are kept."""
    import signal

    from instructgpt_cli import rollout
    from instructgpt_cli.errors import Interrupted

    real, calls = rollout.append_lines, []

    def stop(path, lines):
        real(path, lines)
        calls.append(len(lines))
        if len(calls) == chunks:
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(rollout, "append_lines", stop)


def test_sample_stopped_by_a_signal_keeps_whole_chunks_and_resume_draws_what_an_uninterrupted_run_does(
        sft_run, tmp_path, monkeypatch):
    root, prompts, whole = sft_run
    out = tmp_path / "s.jsonl"
    kept = tmp_path / ".s.jsonl.partial" / "rows.jsonl"
    stop_after_chunks(monkeypatch, 2)
    stopped = igpt(*sample_args(root, prompts, out))
    assert stopped.exit_code == 143, stopped.output
    assert "--resume" in stopped.stderr and "checkpoint" not in stopped.output
    assert not out.exists() and len(kept.read_text().splitlines()) == 64
    monkeypatch.undo()
    refused = igpt(*sample_args(root, prompts, out))  # neither --resume nor --overwrite: the kept chunks stay
    assert refused.exit_code == 2 and "pass --resume" in refused.stderr and kept.is_file()
    resumed = igpt(*sample_args(root, prompts, out, "--resume"))
    assert resumed.exit_code == 0 and "64 of 72 prompts already drawn" in resumed.output, resumed.output
    assert out.read_text() == whole and not kept.parent.exists()


def test_sample_on_a_full_disk_exits_4_naming_the_file_and_resumes_after_a_torn_line(sft_run, tmp_path, monkeypatch):
    root, prompts, whole = sft_run
    out = tmp_path / "s.jsonl"
    partial = tmp_path / ".s.jsonl.partial" / "rows.jsonl"
    full_disk_after(monkeypatch, partial, 1)
    result = igpt(*sample_args(root, prompts, out))
    assert result.exit_code == 4 and f"no space left on device while writing {partial}" in result.stderr, result.output
    assert partial.read_text().endswith("\n") and len(partial.read_text().splitlines()) == 32  # whole chunks only
    monkeypatch.undo()
    kept = partial.read_text().splitlines(keepends=True)
    partial.write_text("".join(kept[:9]) + kept[9][:20])  # as a kill while appending leaves it
    resumed = igpt(*sample_args(root, prompts, out, "--resume"))
    assert resumed.exit_code == 0 and "last line was cut off" in resumed.output, resumed.output
    assert out.read_text() == whole


# ---------------------------------------------------------------- --overwrite keeps the old final/ until the new one


def test_overwrite_that_fails_on_a_full_disk_keeps_the_finished_final_and_resume_goes_on(tmp_path, monkeypatch):
    from conftest import TINY_CONFIG, arithmetic_demos
    from instructgpt_cli import checkpoint
    from instructgpt_cli.storage import verify_dir, weights_sha256

    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(24))
    run_dir = tmp_path / "run"
    args = ["sft", "--config", TINY_CONFIG, "--data", demos, "--run-dir", run_dir, "--max-steps", "6",
            "--save-every", "2", "--val-fraction", "0"]
    assert igpt(*args).exit_code == 0
    final = run_dir / "sft" / "final"
    before = weights_sha256(final)
    real = checkpoint.write

    def full_at_4(dest, state, *a, **k):
        if state.step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(dest, state, *a, **k)

    monkeypatch.setattr(checkpoint, "write", full_at_4)
    failed = igpt(*args, "--overwrite", "--lr", "3e-3")
    assert failed.exit_code == 4, failed.output
    assert verify_dir(final) == [] and weights_sha256(final) == before  # the old model, whole, still there
    monkeypatch.undo()
    resumed = igpt(*args, "--lr", "3e-3", "--resume")  # the new run's checkpoint is newer than the old final/
    assert resumed.exit_code == 0 and "from step-000002" in resumed.stderr, resumed.output
    assert verify_dir(final) == [] and weights_sha256(final) != before, resumed.output


def test_sample_writes_a_one_turn_conversation_back_as_the_message_list_it_read(sft_run, tmp_path, monkeypatch):
    root, _, _ = sft_run
    turn = [{"role": "user", "content": "Tell me about tea."}]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": turn}, {"prompt": "Tell me about snow."}])
    out = tmp_path / "s.jsonl"
    assert igpt(*sample_args(root, prompts, out)).exit_code == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == [turn, "Tell me about snow."]


# ---------------------------------------------------------------- eval and compare: chunks kept, --resume


@pytest.fixture(scope="module")
def two_models(sft_run):
    """The sampling run's SFT model, a second one trained with another seed, and a rule reward model."""
    from conftest import TINY_CONFIG
    from instructgpt_cli.models import tiny_tokenizer
    from rule_rm import make_rule_rm

    root, prompts, _ = sft_run
    other = igpt("sft", "--config", TINY_CONFIG, "--data", root / "demos.jsonl", "--run-dir", root / "other",
                 "--max-steps", "2", "--seed", "5")
    assert other.exit_code == 0, other.output
    make_rule_rm(root / "run" / "rm" / "final", tiny_tokenizer(), "e")
    return root, prompts, root / "other" / "sft" / "final"


def flat(text: str) -> str:
    """Console text with its line wrapping undone."""
    return " ".join(text.split())


def results(folder: Path, *names: str) -> dict:
    return {n: (folder / n).read_text() for n in names}


def test_eval_stopped_by_a_signal_resumes_to_the_report_of_an_uninterrupted_run(two_models, monkeypatch):
    root, prompts, other = two_models
    args = ("eval", other, "--prompts", prompts, "--run-dir", root / "run", "--max-new-tokens", "4",
            "--temperature", "0.7", "--batch-size", "8", "--name", "other")  # KL: a second set of samples at T
    assert igpt(*args).exit_code == 0
    out = root / "run" / "eval" / "other"
    whole = results(out, "report.json", "samples.jsonl")
    assert "kl_response_ids" in whole["samples.jsonl"]
    stop_after_chunks(monkeypatch, 2)
    stopped = igpt(*args, "--overwrite")
    assert stopped.exit_code == 143, stopped.output
    assert "64 of 72 prompts' samples are kept" in flat(stopped.stderr) and "checkpoint" not in stopped.output
    assert results(out, "report.json", "samples.jsonl") == whole  # the previous results stay until replaced
    monkeypatch.undo()
    assert igpt(*args).exit_code == 2  # neither --resume nor --overwrite
    resumed = igpt(*args, "--resume")
    assert resumed.exit_code == 0 and "64 of 72 prompts already drawn" in flat(resumed.output), resumed.output
    assert results(out, "report.json", "samples.jsonl") == whole
    assert not (out.parent / ".other.partial").exists()


def test_compare_stopped_by_a_signal_resumes_to_the_results_of_an_uninterrupted_run(two_models, monkeypatch):
    root, prompts, other = two_models
    args = ("compare", other, "sft", "--prompts", prompts, "--run-dir", root / "run", "--max-new-tokens", "4",
            "--batch-size", "8", "--seed", "11")
    assert igpt(*args).exit_code == 0
    [out] = [p for p in (root / "run" / "compare").iterdir() if not p.name.startswith(".")]
    whole = results(out, "report.json", "judgments.jsonl", "responses.jsonl")
    stop_after_chunks(monkeypatch, 4)  # A's three chunks and B's first
    stopped = igpt(*args, "--overwrite")
    assert stopped.exit_code == 143 and "32 of 72 prompts' samples are kept" in flat(stopped.stderr), stopped.output
    assert "checkpoint" not in stopped.output
    monkeypatch.undo()
    resumed = igpt(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert results(out, "report.json", "judgments.jsonl", "responses.jsonl") == whole


def test_a_full_disk_while_eval_publishes_names_the_report_folder_and_resume_publishes_the_kept_samples(
        two_models, monkeypatch):
    root, prompts, other = two_models
    args = ("eval", other, "--prompts", prompts, "--run-dir", root / "run", "--max-new-tokens", "4",
            "--batch-size", "8", "--name", "full")
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == "samples.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    failed = igpt(*args)
    out = root / "run" / "eval" / "full"
    assert failed.exit_code == 4 and f"no space left on device while writing {out}" in failed.stderr, failed.output
    assert not out.exists() and (out.parent / ".full.partial" / "rows.jsonl").is_file()  # the samples are kept
    monkeypatch.undo()
    resumed = igpt(*args, "--resume")
    assert resumed.exit_code == 0 and "72 of 72 prompts already drawn" in flat(resumed.output), resumed.output
    assert (out / "report.json").is_file() and not (out.parent / ".full.partial").exists()


def test_label_stopped_by_a_signal_keeps_the_rankings_made_and_says_so(labelling, monkeypatch):
    import signal

    from instructgpt_cli import judges
    from instructgpt_cli.errors import Interrupted

    samples, out = labelling
    real, calls = judges.PythonJudge.rank, []

    def stop_at_3(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted(signal.SIGTERM)
        return real(self, *args)

    monkeypatch.setattr(judges.PythonJudge, "rank", stop_at_3)
    stopped = label(samples, out)
    assert stopped.exit_code == 143 and f"rankings made so far are kept in {out}" in flat(stopped.stderr)
    assert "before the command started" not in stopped.output and len(read_rankings(out)) == 2
