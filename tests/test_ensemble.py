"""Reward-model ensembles: train-rm --ensemble N (members from seeds seed..seed+N-1 on one held-out split, kept in
RUN_DIR/rm), their held-out accuracy together, exact resume, and ppo optimising their mean, min or mean-std with
the members' disagreement logged."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import arithmetic_demos, igpt, marker_rankings, write_jsonl
from instructgpt_cli.batches import hold_out, tokenize_rankings
from instructgpt_cli.config import ModelConfig, RMConfig
from instructgpt_cli.data import read_rankings
from instructgpt_cli.models import load_tokenizer, tiny_tokenizer
from instructgpt_cli.rewards import ensemble_objective
from instructgpt_cli.rundir import read_metrics
from instructgpt_cli.stages.reward import ensemble_accuracy
from rule_rm import make_rule_rm, sft_with_rule_rm


def test_the_ensemble_objectives_by_hand():
    scores = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.5, 0.5], [-2.0, 4.0, 1.0]])  # (B=3 responses, M=3 members)
    assert ensemble_objective(scores, "mean", 1.0).tolist() == [2.0, 0.5, 1.0]
    assert ensemble_objective(scores, "min", 1.0).tolist() == [1.0, 0.5, -2.0]
    # sample standard deviations over the members: 1, 0, 3
    assert ensemble_objective(scores, "mean-std", 1.0).tolist() == pytest.approx([1.0, 0.5, -2.0])
    assert ensemble_objective(scores, "mean-std", 0.5).tolist() == pytest.approx([1.5, 0.5, -0.5])
    one = torch.tensor([[1.5], [-0.5]])  # one member: no spread, every objective is its score
    for objective in ("mean", "min", "mean-std"):
        assert ensemble_objective(one, objective, 2.0).tolist() == [1.5, -0.5]


def rm_args(tmp_path, run_dir, *extra):
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(60))
    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(16))
    return ["train-rm", "--model", "tiny", "--rankings", rankings, "--demos", demos, "--run-dir", run_dir,
            "--lr", "2e-3", "--batch-size", "8", "--eval-every", "4", "--max-steps", "8", "--save-every", "4",
            *extra]


def weights(final):
    return load_file(str(final / "model.safetensors"))


def test_an_ensemble_s_members_train_from_their_seeds_on_one_held_out_split(tmp_path):
    alone, ensemble = tmp_path / "alone", tmp_path / "ensemble"
    # with dropout on, so that member 0's random stream must be the one of a model trained alone
    assert igpt(*rm_args(tmp_path, alone, "--dropout", "0.1")).exit_code == 0
    result = igpt(*rm_args(tmp_path, ensemble, "--ensemble", "3", "--dropout", "0.1"))
    assert result.exit_code == 0, result.output
    rm = ensemble / "rm"
    listing = json.loads((rm / "ensemble.json").read_text())
    assert listing["members"] == ["members/member-1/rm/final", "members/member-2/rm/final"]
    assert listing["seeds"] == [0, 1, 2]
    members = [rm / "final", *(rm / m for m in listing["members"])]
    # member 0 is the reward model train-rm trains alone at that seed, bit for bit; the others differ from it
    a = weights(alone / "rm" / "final")
    assert all(torch.equal(a[k], v) for k, v in weights(members[0]).items())
    for other in members[1:]:
        assert (other / "COMPLETED").is_file()
        assert any(not torch.equal(a[k], v) for k, v in weights(other).items())
        manifest = json.loads((other.parents[1] / "manifest.json").read_text())["stages"]["rm"]
        assert manifest["status"] == "completed" and manifest["steps"] == 8
        # every member held out the same rankings (the split is the run's seed's, not the member's)
        assert manifest["outputs"]["eval/rankings"] == listing["ensemble/rankings"]
        assert manifest["outputs"]["eval/pairs"] == listing["ensemble/pairs"]
    outputs = json.loads((ensemble / "manifest.json").read_text())["stages"]["rm"]["outputs"]
    assert outputs["ensemble/accuracy"] == listing["ensemble/accuracy"]
    assert "ensemble accuracy" in result.stderr

    # the ensemble's accuracy is that of the members' mean score: of one member alone, the member's own
    # held-out accuracy as train-rm measured it
    tok, _ = load_tokenizer(ModelConfig(name=str(members[0])))
    rankings = read_rankings(tmp_path / "ranks.jsonl")
    groups, _ = tokenize_rankings(tok, rankings, 512)
    _, val = hold_out(groups, 0.1, 0, [r.group for r in rankings])
    model_cfg, cfg = ModelConfig(name="tiny"), RMConfig()
    own = json.loads((ensemble / "manifest.json").read_text())["stages"]["rm"]["outputs"]
    alone_acc = ensemble_accuracy([members[0]], val, cfg, model_cfg, tok, torch.device("cpu"))
    assert alone_acc["accuracy"] == pytest.approx(own["eval/accuracy"])
    assert alone_acc["pairs"] == own["eval/pairs"]
    together = ensemble_accuracy(members, val, cfg, model_cfg, tok, torch.device("cpu"))
    assert together["accuracy"] == pytest.approx(listing["ensemble/accuracy"])

    # a finished ensemble is finished: --resume does nothing
    again = igpt(*rm_args(tmp_path, ensemble, "--ensemble", "3", "--dropout", "0.1", "--resume"))
    assert again.exit_code == 0 and "nothing to do" in again.stderr + again.stdout
    # asked for with another ensemble size, a finished one says it redid nothing
    other = igpt(*rm_args(tmp_path, ensemble, "--ensemble", "2", "--dropout", "0.1", "--resume"))
    assert other.exit_code == 0 and "other settings" in other.stderr and "ensemble" in other.stderr


def test_a_killed_ensemble_resumes_bit_identical(tmp_path):
    from test_sft import run_subprocess

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert igpt(*rm_args(tmp_path, straight, "--ensemble", "2")).exit_code == 0
    args = rm_args(tmp_path, interrupted, "--ensemble", "2")
    killed = run_subprocess(args, {"IGPT_FAULT_AFTER_STEP": "6"})  # member 1, between its checkpoints 4 and 8
    assert killed.returncode == 99, killed.stderr
    assert not (interrupted / "rm" / "final").exists()
    resumed = igpt(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "from step-000004" in resumed.stderr
    for final in ("final", "members/member-1/rm/final"):
        a, b = weights(straight / "rm" / final), weights(interrupted / "rm" / final)
        assert all(torch.equal(a[k], b[k]) for k in a), final


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SFT model and a hand-made ensemble of three rule reward models (the share of 'e', of 'o', and of 'e'
    less that of 'o'), laid out as train-rm --ensemble 3 lays one out."""
    t = tmp_path_factory.mktemp("ensemble")
    rm = t / "rm"
    sft_with_rule_rm(t, t / "base", rm / "final", demos=32, steps=10)
    tok = tiny_tokenizer()
    make_rule_rm(rm / "members" / "member-1" / "rm" / "final", tok, "o")
    make_rule_rm(rm / "members" / "member-2" / "rm" / "final", tok, "e", minus="o")
    (rm / "ensemble.json").write_text(json.dumps({"members": ["members/member-1/rm/final",
                                                              "members/member-2/rm/final"]}))
    rng = random.Random(0)
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"What is {rng.randint(1, 30)} plus {rng.randint(1, 30)}?"}
                                      for _ in range(32)])
    return t


def ppo(world, run_dir, *extra):
    return igpt("ppo", "--prompts", world / "prompts.jsonl", "--sft", world / "base" / "sft" / "final",
                "--rm", world / "rm" / "final", "--run-dir", run_dir, "--max-new-tokens", "16",
                "--rollout-batch-size", "8", "--mini-batch-size", "4", "--max-steps", "2", *extra)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo_optimises_the_ensemble_s_objective_and_logs_its_disagreement(world, tmp_path, lora):
    by = {}
    for objective in ("mean", "min", "mean-std"):
        result = ppo(world, tmp_path / objective, "--rm-objective", objective, *(["--lora"] if lora else []))
        assert result.exit_code == 0, result.output
        assert "3 reward models" in result.stderr and f"their {objective}" in result.stderr
        by[objective] = read_metrics(tmp_path / objective / "ppo" / "metrics.jsonl")
        inputs = json.loads((tmp_path / objective / "manifest.json").read_text())["stages"]["ppo"]["inputs"]
        assert len(inputs["rm_member_1"]["sha256"]) == len(inputs["rm_member_2"]["sha256"]) == 64
    # the first iteration samples the same responses under every objective (the same seed, the same policy)
    first = {k: v[0] for k, v in by.items()}
    assert first["mean"]["objective/rm_mean"] == first["min"]["objective/rm_mean"] == first["mean-std"][
        "objective/rm_mean"]
    assert first["mean"]["objective/rm_std"] > 0  # the members disagree
    assert first["mean"]["objective/scores"] == pytest.approx(first["mean"]["objective/rm_mean"], abs=1e-6)
    assert first["min"]["objective/scores"] < first["mean"]["objective/scores"]  # the worst member, below the mean
    # mean - 1 std: the batch mean of (mean - std) per response is the mean less the mean std
    assert first["mean-std"]["objective/scores"] == pytest.approx(
        first["mean"]["objective/rm_mean"] - first["mean"]["objective/rm_std"], abs=1e-5)


def test_ppo_refuses_an_ensemble_with_a_missing_member(world, tmp_path):
    broken = tmp_path / "rm"
    (broken / "final").mkdir(parents=True)
    for f in (world / "rm" / "final").iterdir():
        (broken / "final" / f.name).write_bytes(f.read_bytes())
    (broken / "ensemble.json").write_text(json.dumps({"members": ["members/member-1/rm/final"]}))
    args = ["ppo", "--prompts", world / "prompts.jsonl", "--sft", world / "base" / "sft" / "final",
            "--rm", broken / "final", "--run-dir", tmp_path / "run", "--max-steps", "1"]
    result = igpt(*args)
    assert result.exit_code == 2 and "member-1" in result.stderr and "not there" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_conservative_objective_of_one_reward_model_is_refused(world, tmp_path):
    """--rm-objective min (or mean-std) of a reward model trained alone would silently optimise that one model."""
    args = ["ppo", "--prompts", world / "prompts.jsonl", "--sft", world / "base" / "sft" / "final",
            "--rm", world / "base" / "sft" / "final", "--run-dir", tmp_path / "run", "--rm-objective", "min"]
    single = tmp_path / "single"
    make_rule_rm(single, tiny_tokenizer(), "e")
    args[args.index("--rm") + 1] = single
    result = igpt(*args)
    assert result.exit_code == 2 and "--rm-objective min" in result.stderr and "not an ensemble" in result.stderr
    assert not (tmp_path / "run").exists()


def test_an_overwrite_stopped_in_a_member_resumes_instead_of_keeping_the_old_model(tmp_path):
    """--overwrite keeps the old final/ until the new one is whole; stopped while a member trains (no checkpoint
    of member 0 yet), the stage is unfinished (its manifest says so), so --resume trains on rather than calling
    the old model done; the new ensemble then equals one trained straight."""
    from test_sft import run_subprocess

    run, straight = tmp_path / "run", tmp_path / "straight"
    assert igpt(*rm_args(tmp_path, run, "--ensemble", "2")).exit_code == 0
    assert igpt(*rm_args(tmp_path, straight, "--ensemble", "2", "--seed", "5")).exit_code == 0
    args = rm_args(tmp_path, run, "--ensemble", "2", "--seed", "5")
    killed = run_subprocess([*args, "--overwrite"], {"IGPT_FAULT_AFTER_STEP": "6"})
    assert killed.returncode == 99, killed.stderr
    assert not (run / "rm" / "ensemble.json").exists()  # the old listing went with the old members
    resumed = igpt(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "nothing to do" not in resumed.stderr + resumed.stdout
    for final in ("final", "members/member-1/rm/final"):
        a, b = weights(straight / "rm" / final), weights(run / "rm" / final)
        assert all(torch.equal(a[k], b[k]) for k in a), final
    assert json.loads((run / "rm" / "ensemble.json").read_text())["seeds"] == [5, 6]
    assert json.loads((run / "manifest.json").read_text())["stages"]["rm"]["status"] == "completed"


def test_a_resume_with_a_smaller_ensemble_drops_the_members_past_it(tmp_path):
    from test_sft import run_subprocess

    run = tmp_path / "run"
    args = rm_args(tmp_path, run, "--ensemble", "2")
    assert run_subprocess(args, {"IGPT_FAULT_AFTER_STEP": "6"}).returncode == 99  # in member 1
    assert (run / "rm" / "members" / "member-1").is_dir()
    alone = igpt(*rm_args(tmp_path, run, "--ensemble", "1", "--resume", "--allow-changes"))
    assert alone.exit_code == 0, alone.output
    assert not (run / "rm" / "members" / "member-1").exists() and not (run / "rm" / "ensemble.json").exists()
    assert (run / "rm" / "final" / "COMPLETED").is_file()


def test_a_rerun_of_the_reward_model_makes_ppo_on_its_members_stale(tmp_path):
    """Lineage: PPO records every member's weights; a member retrained with other weights makes it stale."""
    from instructgpt_cli.rundir import mark_stale
    from instructgpt_cli.storage import weights_sha256

    run = tmp_path / "run"
    member = run / "rm" / "members" / "member-1" / "rm" / "final"
    member.mkdir(parents=True)
    (member / "model.safetensors").write_bytes(b"member weights")
    (run / "manifest.json").write_text(json.dumps({"stages": {"ppo": {"inputs": {
        "rm_member_1": {"path": str(member.resolve()), "sha256": weights_sha256(member)}}}}}))
    mark_stale(run, "rm", "abc")  # the same member weights: fresh
    assert "stale" not in json.loads((run / "manifest.json").read_text())["stages"]["ppo"]
    (member / "model.safetensors").write_bytes(b"other member weights")
    mark_stale(run, "rm", "abc")
    assert "re-run" in json.loads((run / "manifest.json").read_text())["stages"]["ppo"]["stale"]
