"""The command line as a user meets it (issue 31): what --help shows, what an unknown flag is answered with, a
--config file without the command's section, a resume that cannot go back, changed data named by file, long
error lists cut short, byte order marks, and one sampling temperature for eval and compare."""
from __future__ import annotations

import codecs
import json

import yaml
from typer.testing import CliRunner

from conftest import TINY_CONFIG, arithmetic_demos, igpt, write_jsonl
from instructgpt_cli import config as config_mod
from instructgpt_cli.data import read_demos, read_pretrain


def help_of(*command: str) -> str:
    from instructgpt_cli.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


def row(text: str, flag: str) -> str:
    return next(ln for ln in text.splitlines() if f" {flag} " in ln)


# ---------------------------------------------------------------- --help


def test_switches_show_no_value_in_help():
    text = help_of("sft")
    for flag in ("--resume", "--overwrite", "--print-config", "--lora", "--fsdp", "--help"):
        assert "<bool>" not in row(text, flag), row(text, flag)
    assert "<float>" in row(text, "--lr") and "<int>" in row(text, "--epochs")  # options that take a value do
    assert "<bool>" not in row(help_of(), "--version")


def test_help_shows_defaults_and_required_arguments_as_they_are():
    status = help_of("status")
    assert "Run directory [default: runs/default]." in status and "RUN_DIR" in status
    evaluate = help_of("eval")
    assert "[MODEL]" not in evaluate and "MODEL" in evaluate.splitlines()[1]  # required, so not in brackets
    assert "[A] [B]" not in help_of("compare")
    sft = help_of("sft")
    assert "['" not in sft and "[default: ]" not in sft  # no Python list, no empty default
    assert "[default: all-linear]" in row(sft, "--lora-target-modules")


def test_input_docs_name_every_format_read():
    """Inputs are read through data.py and sources.py, so every input's doc names the formats besides JSONL."""
    for cls in (config_mod.SFTConfig, config_mod.RMConfig, config_mod.DPOConfig, config_mod.PPOConfig,
                config_mod.SampleConfig, config_mod.EvalConfig, config_mod.CompareConfig):
        docs = config_mod.field_docs(cls)
        for key in ("data", "rankings", "demos", "prompts", "ptx_data"):
            if key in docs:
                assert "JSONL file" not in docs[key] and "parquet" in docs[key], (cls.__name__, key, docs[key])


def test_one_name_for_the_dtype_the_old_one_hidden():
    sft = help_of("sft")
    assert " --dtype " in sft and "--model-dtype" not in sft
    for flag in ("--dtype", "--model-dtype"):
        printed = igpt("sft", "--data", "d.jsonl", flag, "bfloat16", "--print-config")
        assert printed.exit_code == 0 and yaml.safe_load(printed.stdout)["sft"]["model"]["dtype"] == "bfloat16"
    assert " --dtype " in help_of("eval") and " --dtype " in help_of("ppo")


def test_ppo_log_every_counts_iterations():
    assert "iterations" in row(help_of("ppo"), "--log-every") and "optimizer" not in row(help_of("ppo"), "--log-every")


# ---------------------------------------------------------------- unknown flags


def unboxed(output: str) -> str:
    """The words of an error click prints in a box, as one line: the box's sides and the terminal's wrapping (its
    width differs between a terminal, CI and a test worker) taken out."""
    return " ".join(output.replace("│", " ").split())


def test_an_unknown_flag_is_answered_with_the_one_meant():
    said = {flag: igpt("sft", "--data", "d.jsonl", flag, "1", "--print-config") for flag in
            ("--report_to", "--learning-rate", "--num-train-epochs", "--per-device-train-batch-size", "--output-dir",
             "--gradient-accumulation-steps", "--max-length", "--logging-steps", "--save-steps", "--epoch", "--zebra")}
    assert all(r.exit_code == 2 for r in said.values())
    text = {flag: unboxed(r.output) for flag, r in said.items()}
    assert "igpt spells it --report-to" in text["--report_to"] and "--dropout" not in text["--report_to"]
    for trl, ours in (("--learning-rate", "--lr"), ("--num-train-epochs", "--epochs"),
                      ("--per-device-train-batch-size", "--batch-size"), ("--output-dir", "--run-dir"),
                      ("--gradient-accumulation-steps", "--grad-accum"), ("--max-length", "--max-seq-len"),
                      ("--logging-steps", "--log-every"), ("--save-steps", "--save-every")):
        assert f"igpt calls it {ours}" in text[trl], text[trl]
    assert "did you mean --epochs?" in text["--epoch"]
    assert "did you mean" not in text["--zebra"] and "Possible options" not in text["--zebra"]
    ppo = unboxed(igpt("ppo", "--model-name-or-path", "x").output)
    assert "igpt calls it --sft" in ppo  # ppo has no --model: the first of TRL's meanings it has


# ---------------------------------------------------------------- config files and resume


def test_a_config_file_without_the_commands_section_is_refused(tmp_path):
    saved = tmp_path / "config.yaml"  # what runs/NAME/ppo/config.yaml holds
    saved.write_text("ppo:\n  beta: 0.05\n")
    result = igpt("sft", "--config", saved, "--data", "d.jsonl", "--print-config")
    assert result.exit_code == 2 and not result.stdout
    message = " ".join(result.stderr.split())
    assert f"{saved}: no 'sft' section" in message and "it has ppo" in message
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert igpt("sft", "--config", empty, "--data", "d.jsonl", "--print-config").exit_code == 2


def test_non_finite_numbers_are_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    preset = tmp_path / "p.yaml"
    preset.write_text("sft:\n  optim: {lr: .inf}\n")
    for args in (["--lr", "inf"], ["--lr", "nan"], ["--config", preset]):
        result = igpt("sft", "--data", "d.jsonl", "--run-dir", run_dir, *args)
        assert result.exit_code == 2 and "must be a finite number" in result.stderr, result.output
    assert not run_dir.exists()


def sft_args(tmp_path, demos):
    return ["sft", "--config", TINY_CONFIG, "--data", demos, "--run-dir", tmp_path / "run", "--save-every", "2"]


def test_a_resume_cannot_go_back_to_fewer_steps(tmp_path):
    """Refused rather than said: a run at step 4 resumed with --max-steps 2 would export step 4 as a run of 2
    (igpt status: "4 of 2"); the user meant another run length, and the message says which values work."""
    args = sft_args(tmp_path, write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(20)))
    assert igpt(*args, "--max-steps", "4").exit_code == 0
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    behind = igpt(*args, "--max-steps", "2", "--resume")
    assert behind.exit_code == 2, behind.output
    message = " ".join(behind.stderr.split())
    assert "--max-steps 2 is below the step this run has reached, 4" in message and "--max-steps 4" in message
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest  # nothing recorded


def test_a_resume_refused_for_changed_data_names_the_file(tmp_path):
    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(20))
    args = sft_args(tmp_path, demos)
    assert igpt(*args, "--max-steps", "2").exit_code == 0
    write_jsonl(demos, arithmetic_demos(21))
    changed = igpt(*args, "--max-steps", "4", "--resume")
    assert changed.exit_code == 2
    message = " ".join(changed.stderr.split())
    assert f"input data: {demos.resolve()}: content changed since the run began" in message
    assert "(20 -> 21 records, " in message and "kB -> " in message  # what it held when the run began, and now
    other = write_jsonl(tmp_path / "other.jsonl", arithmetic_demos(22))
    args[args.index(demos)] = other
    message = " ".join(igpt(*args, "--max-steps", "4", "--resume").stderr.split())
    assert f"input data: {other.resolve()}: other content than {demos.resolve()}, which the run began with" in message
    assert "(20 -> 22 records, " in message


# ---------------------------------------------------------------- data


def test_a_byte_order_mark_is_no_part_of_the_first_record(tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_bytes(codecs.BOM_UTF8 + b"".join(json.dumps(d).encode() + b"\n" for d in arithmetic_demos(3)))
    assert len(read_demos(demos)) == 3
    text = tmp_path / "text.txt"
    text.write_bytes(codecs.BOM_UTF8 + b"First paragraph.\n\nSecond.")
    assert read_pretrain(text) == ["First paragraph.", "Second."]


def test_thousands_of_errors_show_the_first_twenty(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": ""}] * 1000)
    result = igpt("sft", "--data", bad, "--model", "tiny", "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 21 and lines[-1] == "error: ... and 980 more" and f"{bad}:20: response" in lines[-2]


# ---------------------------------------------------------------- sampling


def test_eval_and_compare_sample_at_one_default_temperature():
    assert config_mod.EvalConfig().temperature == config_mod.CompareConfig().temperature == 1.0
    assert config_mod.SampleConfig().temperature == 1.0 == config_mod.PPOConfig().temperature


def test_a_changed_inputs_size_is_said_as_it_was_and_is_or_as_it_is_when_never_recorded():
    from instructgpt_cli.lifecycle import size_change

    assert size_change({"records": 20, "bytes": 1820}, {"records": 21, "bytes": 1900}) == \
        "20 -> 21 records, 1.8 kB -> 1.9 kB; "
    assert size_change({}, {"records": 21, "bytes": 1900}) == "now 21 records, 1.9 kB; "  # a manifest before sizes
    assert size_change({"files": 3, "bytes": 0}, {"files": 1, "bytes": 2000}) == "3 -> 1 files, 0.0 kB -> 2.0 kB; "
    assert size_change({"records": 5}, {}) == ""  # unreadable now: nothing said
