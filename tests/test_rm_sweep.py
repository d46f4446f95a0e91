"""train-rm --sweep: settings chosen by held-out accuracy, every trial a run of its own on the same split, the
chosen one the stage's model; bad sweeps refused before anything is written."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import arithmetic_demos, igpt, marker_rankings, write_jsonl
from instructgpt_cli.errors import BadInput
from instructgpt_cli.stages.reward import choose_trial, parse_sweep


def test_the_grid_of_a_sweep():
    assert parse_sweep("") == []
    # the issue's own form: a value without "=" is one more of the key before it
    assert parse_sweep("lr=1e-4,3e-4,epochs=1,2") == [{"lr": 1e-4, "epochs": 1}, {"lr": 1e-4, "epochs": 2},
                                                      {"lr": 3e-4, "epochs": 1}, {"lr": 3e-4, "epochs": 2}]
    assert parse_sweep("lr=1e-4; lora_layers=0 4  weight_decay=0.1") == [
        {"lr": 1e-4, "lora_layers": 0, "weight_decay": 0.1}, {"lr": 1e-4, "lora_layers": 4, "weight_decay": 0.1}]
    assert parse_sweep("lora_r=8") == [{"lora_r": 8}]
    for bad, says in (("momentum=0.9", "not a setting it can sweep"), ("1e-4,lr=2e-4", "a value before any KEY="),
                      ("lr=fast", "not a number"), ("epochs=1.5", "not an integer"), ("lr=1e-4,lr=2e-4", "given twice"),
                      ("lr=", "no value"), ("lr=-1e-4", "must be > 0"), ("epochs=0", "must be > 0"),
                      ("weight_decay=-0.1", "must be > 0 (or 0)")):
        with pytest.raises(BadInput) as e:
            parse_sweep(bad)
        assert says in e.value.messages[0] and bad in e.value.messages[0], (bad, e.value.messages)


def test_the_chosen_trial_is_the_most_accurate_then_the_lowest_loss_then_the_first():
    def trial(t, accuracy, loss):
        return {"trial": t, "accuracy": accuracy, "loss": loss}

    assert choose_trial([trial(1, 0.6, 0.5), trial(2, 0.7, 0.9), trial(3, 0.65, 0.1)])["trial"] == 2
    assert choose_trial([trial(1, 0.7, 0.6), trial(2, 0.7, 0.4), trial(3, 0.7, 0.4)])["trial"] == 2
    assert choose_trial([trial(1, None, None), trial(2, 0.5, 0.7)])["trial"] == 2


def rm_args(tmp_path, run_dir, *extra):
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(60))
    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(16))
    return ["train-rm", "--model", "tiny", "--rankings", rankings, "--demos", demos, "--run-dir", run_dir,
            "--batch-size", "8", "--eval-every", "4", "--max-steps", "6", *extra]


def test_a_sweep_keeps_every_trial_and_its_best_is_the_model(tmp_path):
    run = tmp_path / "run"
    result = igpt(*rm_args(tmp_path, run, "--sweep", "lr=1e-5,3e-3"))
    assert result.exit_code == 0, result.output
    sweep = json.loads((run / "rm" / "sweep.json").read_text())
    assert [t["settings"] for t in sweep["trials"]] == [{"lr": 1e-5}, {"lr": 3e-3}]
    for t in sweep["trials"]:  # each trial as its own run measured it, on the same held-out rankings
        own = json.loads((run / "rm" / t["final"]).parents[1].joinpath("manifest.json").read_text())
        outputs = own["stages"]["rm"]["outputs"]
        assert (t["accuracy"], t["loss"]) == (outputs["eval/accuracy"], outputs["eval/loss"])
        assert outputs["eval/rankings"] == 6
    # a learning rate 300x higher learns the marker preference: lower held-out loss at least
    assert sweep["trials"][1]["loss"] < sweep["trials"][0]["loss"]
    best = choose_trial(sweep["trials"])
    assert sweep["chosen"] == best["trial"]
    stage = json.loads((run / "manifest.json").read_text())["stages"]["rm"]
    assert stage["status"] == "completed" and stage["outputs"]["sweep/chosen"] == best["trial"]
    assert stage["outputs"]["eval/accuracy"] == best["accuracy"]
    chosen = load_file(str(run / "rm" / best["final"] / "model.safetensors"))
    final = load_file(str(run / "rm" / "final" / "model.safetensors"))
    assert all(torch.equal(chosen[k], final[k]) for k in chosen)
    assert (run / "rm" / "final" / "COMPLETED").is_file()
    assert "optimistic" in result.stderr
    # the chosen trial is the model train-rm trains with those settings alone, bit for bit
    alone = tmp_path / "alone"
    assert igpt(*rm_args(tmp_path, alone, "--lr", str(best["settings"]["lr"]))).exit_code == 0
    single = load_file(str(alone / "rm" / "final" / "model.safetensors"))
    assert all(torch.equal(single[k], final[k]) for k in single)


@pytest.mark.parametrize("extra, says", [(["--sweep", "lr=fast"], "not a number"),
                                         (["--sweep", "lr=1e-4,2e-4", "--val-fraction", "0"], "holds nothing out")])
def test_a_bad_sweep_exits_2_with_nothing_written(tmp_path, extra, says):
    result = igpt(*rm_args(tmp_path, tmp_path / "run", *extra))
    assert result.exit_code == 2 and says in result.stderr, result.output
    assert not (tmp_path / "run").exists()


def test_a_resumed_sweep_finds_its_trials_by_their_settings(tmp_path):
    """Trials live in directories named by their settings: a sweep stopped in its first trial and resumed with
    the grid in another order resumes that trial under its own learning rate and trains the other anew."""
    from test_sft import run_subprocess

    run = tmp_path / "run"
    args = rm_args(tmp_path, run, "--save-every", "2")
    killed = run_subprocess([*args, "--sweep", "lr=1e-5,3e-3"], {"IGPT_FAULT_AFTER_STEP": "3"})
    assert killed.returncode == 99, killed.stderr
    assert (run / "rm" / "trials" / "lr-1e-05").is_dir() and not (run / "rm" / "trials" / "lr-0.003").exists()
    resumed = igpt(*args, "--sweep", "lr=3e-3,1e-5", "--resume", "--allow-changes")
    assert resumed.exit_code == 0, resumed.output
    sweep = json.loads((run / "rm" / "sweep.json").read_text())
    assert [(t["settings"]["lr"], t["final"]) for t in sweep["trials"]] == [
        (3e-3, "trials/lr-0.003/rm/final"), (1e-5, "trials/lr-1e-05/rm/final")]
    for t in sweep["trials"]:  # each trial's own run recorded the learning rate it trained with
        config = yaml.safe_load((run / "rm" / t["final"]).parents[0].joinpath("config.yaml").read_text())
        assert config["rm"]["optim"]["lr"] == t["settings"]["lr"]


def test_a_sweep_of_lora_settings_needs_lora(tmp_path):
    result = igpt(*rm_args(tmp_path, tmp_path / "run", "--sweep", "lora_r=4,8"))
    assert result.exit_code == 2 and "add --lora" in result.stderr
    assert not (tmp_path / "run").exists()
