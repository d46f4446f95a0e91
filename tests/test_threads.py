"""--threads, IGPT_THREADS and the automatic thread count (cpus.py): the cgroup quota (v1, v2, none), the CPUs
other processes keep busy (fake /proc readings), the order of the settings, bad values exiting 2 with nothing
written, and a real sft on the tiny model saying and recording its threads. No timing is asserted: these pass
at any thread count and under any load."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import THREADS, TINY_CONFIG, arithmetic_demos, igpt, write_jsonl
from instructgpt_cli import cpus
from instructgpt_cli.errors import BadInput


@pytest.fixture(autouse=True)
def same_threads_after():
    """Every test leaves torch on the suite's thread count (conftest), whatever it applied."""
    yield
    torch.set_num_threads(THREADS)


def machine(cpu_set=(0, 1), quota=None, others=0.0, own=0.0, seconds=0.25, hz=100, readable=True) -> cpus.System:
    """A fake machine: ``others`` CPUs kept busy by other processes and ``own`` by this one while it watches."""
    clock, jiffies, mine, slept = iter([0.0, seconds]), iter([10_000, 10_000 + round((others + own) * seconds * hz)]), \
        iter([500, 500 + round(own * seconds * hz)]), []

    def cpu_jiffies(which):
        assert which == set(cpu_set)  # the CPUs of the affinity are the ones watched
        if not readable:
            raise OSError("no /proc/stat")
        return next(jiffies)

    system = cpus.System(affinity=lambda: set(cpu_set), cgroup_limit=lambda: quota, cpu_jiffies=cpu_jiffies,
                         own_jiffies=lambda: next(mine), clock=lambda: next(clock), sleep=slept.append, hz=hz)
    return system


# ---------------------------------------------------------------- the cgroup quota


def test_cgroup_v2_quota_rounds_up_and_the_tightest_level_wins(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path, "0::/\n") == 2
    (tmp_path / "job" / "step").mkdir(parents=True)
    (tmp_path / "job" / "cpu.max").write_text("100000 100000\n")
    (tmp_path / "job" / "step" / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path, "0::/job/step\n") == 1


def test_cgroup_v2_max_and_no_files_mean_no_quota(tmp_path):
    assert cpus.cgroup_cpu_limit(tmp_path, "0::/\n") is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path, "0::/\n") is None
    assert cpus.cgroup_cpu_limit(tmp_path, "") is None


def test_cgroup_v1_quota_and_minus_one(tmp_path):
    mount = tmp_path / "cpu,cpuacct"
    mount.mkdir()
    (mount / "cpu.cfs_quota_us").write_text("250000\n")
    (mount / "cpu.cfs_period_us").write_text("100000\n")
    # a container sees its own cgroup as the mount's root: the path /proc/self/cgroup names does not exist there
    membership = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cpus.cgroup_cpu_limit(tmp_path, membership) == 3
    (mount / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_cpu_limit(tmp_path, membership) is None


# ---------------------------------------------------------------- the automatic count


def test_a_core_busy_with_another_process_is_left_to_it():
    choice = cpus.auto(system=machine(others=1.0))
    assert choice.threads == 1
    assert str(choice) == "1 (2 usable CPUs, 1 busy with other processes; --threads to choose)"


def test_an_idle_machine_gets_every_usable_cpu_and_this_process_own_load_is_not_counted():
    assert cpus.auto(system=machine(others=0.0)).threads == 2
    assert cpus.auto(system=machine(others=0.0, own=2.0)).threads == 2
    assert cpus.auto(system=machine(others=0.4)).threads == 2  # rounded to the nearest CPU
    assert cpus.auto(system=machine(others=0.6)).threads == 1


def test_more_busy_than_cpus_still_gets_one_thread():
    choice = cpus.auto(system=machine(others=7.0))
    assert choice.threads == 1 and "2 busy with other processes" in choice.reason  # at most the CPUs watched


def test_the_cgroup_quota_caps_the_count():
    eight = tuple(range(8))
    assert cpus.auto(system=machine(eight, quota=2, others=3.0)).threads == 2  # 5 CPUs free, 2 allowed
    choice = cpus.auto(system=machine(eight, quota=2, others=7.0))
    assert choice.threads == 1 and "2 usable CPUs (the cgroup quota; 8 in affinity)" in choice.reason
    assert cpus.auto(system=machine(eight, quota=16)).threads == 8  # a quota above the affinity changes nothing


def test_a_gpu_takes_the_usable_cpus_without_watching_the_load():
    system = machine(others=2.0)
    choice = cpus.auto(gpu=True, system=system)
    assert choice.threads == 2 and "device cuda" in choice.reason and system.sleep.__self__ == []


def test_processes_of_a_launcher_share_the_usable_cpus(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    choice = cpus.auto(system=machine(tuple(range(4)), others=3.0))
    assert choice.threads == 2 and "each of 2 processes" in choice.reason  # their own loading is no other load
    assert cpus.auto(system=machine((0,))).threads == 1


def test_a_machine_without_proc_stat_gets_the_usable_cpus():
    choice = cpus.auto(system=machine(readable=False))
    assert choice.threads == 2 and "not measurable" in choice.reason


# ---------------------------------------------------------------- which setting wins


def test_the_flag_beats_the_variable_which_beats_the_config_which_beats_omp(monkeypatch):
    monkeypatch.setenv("IGPT_THREADS", "3")
    assert cpus.choose(flag=2, configured=4) == (2, "--threads")
    assert cpus.choose(configured=4) == (3, "IGPT_THREADS=3")
    monkeypatch.delenv("IGPT_THREADS")
    assert cpus.choose(configured=4) == (4, "threads in the config file")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch read it at start: its count stays
    assert cpus.choose().threads == torch.get_num_threads()
    assert "OMP_NUM_THREADS=1" in cpus.choose().reason


def test_a_resume_prefers_the_checkpoints_threads_if_the_cpus_allow(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("IGPT_THREADS", raising=False)
    choice = cpus.choose(resumed=("step-000004", 1), system=machine(others=0.0))
    assert choice.threads == 1 and "as step-000004 was written" in choice.reason
    assert cpus.choose(resumed=("step-000004", 4), system=machine(others=0.0)).threads == 2  # more than usable: auto
    assert "device cuda" in cpus.choose(gpu=True, resumed=("step-000004", 1), system=machine()).reason


@pytest.mark.parametrize("value", ["0", "x", "-2", "1.5"])
def test_a_bad_igpt_threads_is_bad_input_naming_it(monkeypatch, value):
    monkeypatch.setenv("IGPT_THREADS", value)
    with pytest.raises(BadInput, match=f"IGPT_THREADS={value}: must be a whole number"):
        cpus.env_threads()
    monkeypatch.setenv("IGPT_THREADS", " ")
    assert cpus.env_threads() is None


# ---------------------------------------------------------------- the command line


@pytest.fixture
def demos(tmp_path):
    return write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(16))


@pytest.mark.parametrize("value", ["0", "x"])
def test_bad_igpt_threads_exits_2_before_anything_is_written(tmp_path, demos, monkeypatch, value):
    monkeypatch.setenv("IGPT_THREADS", value)
    run_dir = tmp_path / "run"
    result = igpt("sft", "--config", TINY_CONFIG, "--data", demos, "--run-dir", run_dir, "--threads", "1")
    assert result.exit_code == 2 and f"IGPT_THREADS={value}" in result.stderr, result.output
    assert not run_dir.exists()
    labelled = igpt("label", tmp_path / "samples.jsonl", "--out", tmp_path / "ranks.jsonl", "--judge", "python:m:f")
    assert labelled.exit_code == 2 and "IGPT_THREADS" in labelled.stderr and not (tmp_path / "ranks.jsonl").exists()


def test_bad_threads_flag_or_config_value_exits_2_naming_it(tmp_path, demos):
    run_dir = tmp_path / "run"
    result = igpt("sft", "--data", demos, "--run-dir", run_dir, "--threads", "-1")
    assert result.exit_code == 2 and "--threads" in result.stderr and not run_dir.exists()
    preset = tmp_path / "preset.yaml"
    preset.write_text("sample:\n  threads: many\n")
    result = igpt("sample", "--config", preset, "--prompts", demos, "--out", tmp_path / "s.jsonl")
    assert result.exit_code == 2 and "sample.threads" in result.stderr
    preset.write_text("sample:\n  threads: 3\n")
    printed = igpt("sample", "--config", preset, "--prompts", demos, "--out", tmp_path / "s.jsonl", "--print-config")
    assert printed.exit_code == 0 and "threads: 3" in printed.stdout
    for command in ("sft", "train-rm", "ppo", "dpo", "sample", "eval", "compare", "label"):
        assert "--threads" in igpt(command, "--help").stdout, command


def test_sft_with_threads_1_says_and_records_it_and_a_resume_keeps_the_checkpoints(tmp_path, demos, monkeypatch):
    monkeypatch.setenv("IGPT_THREADS", "2")  # the flag wins
    run_dir = tmp_path / "run"
    args = ["sft", "--config", TINY_CONFIG, "--data", demos, "--run-dir", run_dir, "--save-every", "2"]
    result = igpt(*args, "--max-steps", "2", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert [line.split() for line in result.stderr.splitlines() if line.startswith("threads")] == [
        ["threads", "1", "(--threads)"]]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["threads"] == 1
    state = torch.load(run_dir / "sft" / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert state["numerics"]["threads"] == 1
    # resumed with the automatic choice (no flag, variable or OMP_NUM_THREADS): the checkpoint's 1 thread
    monkeypatch.delenv("IGPT_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    resumed = igpt(*args, "--max-steps", "3", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "as step-000002 was written" in resumed.stderr and "bit-identical" in resumed.stderr
    assert "will not be bit-identical" not in resumed.stderr
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]["threads"] == 1
