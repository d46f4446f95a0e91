"""Model references: each model the user names is checked for its role (a reward model is not sampled, a causal
LM is not a reward) before any weights load; one reference syntax (stage, STAGE@step-N, checkpoint folder,
directory) for eval, compare and sample; a stage's missing prerequisites named together; every shipped preset
runs the whole chain, each stage from the run's earlier outputs."""
import json

import pytest
import yaml

import instructgpt_cli.frontier as frontier_module
import instructgpt_cli.refs as refs_module
import instructgpt_cli.models as models_module
from conftest import REPO, TINY_CONFIG, arithmetic_demos, igpt, marker_rankings, write_jsonl
from instructgpt_cli.errors import BadInput
from instructgpt_cli.judges import Settings
from instructgpt_cli.models import tiny_model, tiny_tokenizer
from rule_rm import make_rule_rm


def said(result) -> str:
    """stderr on one line (rich wraps long messages)."""
    return " ".join(result.stderr.split())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny causal LM, a tiny reward model, a bare LoRA adapter folder and the data files the commands read."""
    t = tmp_path_factory.mktemp("refs")
    tok = tiny_tokenizer()
    for name, kind in (("lm", "causal"), ("rm", "reward")):
        tiny_model(tok, 0, kind=kind).save_pretrained(t / name)
        tok.save_pretrained(t / name)
    (t / "adapter").mkdir()
    (t / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"Say {w}."} for w in "a b c d".split()])
    write_jsonl(t / "demos.jsonl", arithmetic_demos(8))
    write_jsonl(t / "ranks.jsonl", marker_rankings(8))
    write_jsonl(t / "samples.jsonl", [{"prompt": "Say a.", "responses": ["a", "b"]}])
    return t


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: a role is checked before weights load."""
    import importlib

    fail = lambda *a, **k: pytest.fail("a model loaded")  # noqa: E731
    # the stages first: one imported while models.load_model is patched would keep the patch for good
    stages = [importlib.import_module(f"instructgpt_cli.stages.{stage}")
              for stage in ("sft", "reward", "ppo", "dpo", "evaluate", "compare", "sample")]
    monkeypatch.setattr(models_module, "load_model", fail)
    monkeypatch.setattr(refs_module.Side, "load", fail)
    for module in stages:
        if hasattr(module, "load_model"):  # imported by name: patched where the stage calls it
            monkeypatch.setattr(module, "load_model", fail)


def test_a_reward_model_is_refused_where_a_policy_is_sampled_trained_or_asked(dirs, tmp_path, no_loading):
    rm, lm, run = dirs / "rm", dirs / "lm", tmp_path / "run"
    prompts = ["--prompts", dirs / "prompts.jsonl", "--run-dir", run]
    cases = {
        "MODEL": ["eval", rm, *prompts, "--sft", lm],
        "A": ["compare", rm, lm, *prompts, "--judge", "python:nowhere:f"],
        "--model": ["sample", "--model", rm, "--k", "2", "--out", tmp_path / "s.jsonl", *prompts],
        "--sft": ["train-rm", "--sft", rm, "--rankings", dirs / "ranks.jsonl", "--demos", dirs / "demos.jsonl",
                  "--run-dir", run],
    }
    for flag, args in cases.items():
        result = igpt(*args)
        assert result.exit_code == 2, (flag, result.output)
        text = said(result)
        assert f"{flag} {rm}: a reward model (LlamaForSequenceClassification)" in text, (flag, text)
        assert f"{flag} needs a causal language model" in text
    for args in (["label", dirs / "samples.jsonl", "--out", tmp_path / "r.jsonl"], ["compare", lm, lm, *prompts]):
        result = igpt(*args, "--judge", f"model:{rm}")
        assert result.exit_code == 2, result.output
        assert f"--judge model:{rm}: a reward model (LlamaForSequenceClassification); --judge model:REF needs a " \
               "causal language model" in said(result), said(result)
    for command in (["sft", "--data", dirs / "demos.jsonl"], ["dpo", "--rankings", dirs / "ranks.jsonl"]):
        result = igpt(*command, "--config", TINY_CONFIG, "--model", rm, "--run-dir", run)
        assert result.exit_code == 2 and f"--model {rm}: a reward model" in said(result), result.output
    result = igpt("dpo", "--rankings", dirs / "ranks.jsonl", "--sft", rm, "--run-dir", run)
    assert result.exit_code == 2 and f"--sft {rm}: a reward model" in said(result)
    assert not run.exists()


def test_a_causal_lm_is_refused_where_a_reward_model_scores(dirs, tmp_path, no_loading):
    lm, run = dirs / "lm", tmp_path / "run"
    prompts = ["--prompts", dirs / "prompts.jsonl", "--run-dir", run]
    for args in (["ppo", *prompts, "--sft", lm, "--rm", lm], ["eval", lm, *prompts, "--sft", lm, "--rm", lm],
                 ["compare", lm, lm, *prompts, "--rm", lm]):
        result = igpt(*args)
        text = said(result)
        assert result.exit_code == 2, result.output
        assert f"--rm {lm}: a causal language model (LlamaForCausalLM); --rm needs a reward model" in text, text
    assert not run.exists()


def test_a_reference_starting_with_a_tilde_is_the_home_directory(dirs, tmp_path, monkeypatch):
    """``model:~/x`` reaches igpt as written (the shell expands no ~ after a colon)."""
    monkeypatch.setenv("HOME", str(dirs))
    side = refs_module.model_or_checkpoint("~/lm", tmp_path, "--judge model:")
    assert side.path == dirs / "lm" and side.name == "lm"


def test_a_bare_adapter_and_a_classifier_are_named_for_what_they_are(dirs, tmp_path):
    from instructgpt_cli.models import model_kind, role_problem

    assert model_kind(dirs / "adapter")[0] == "adapter"
    assert "PEFT (LoRA) adapter" in role_problem(dirs / "adapter", "policy", "--sft")
    classifier = tmp_path / "cls"
    classifier.mkdir()
    (classifier / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"],
                                                        "id2label": {"0": "neg", "1": "pos"}}))
    assert "a classifier with 2 labels" in role_problem(classifier, "reward", "--rm")
    assert role_problem(dirs / "rm", "reward", "--rm") is None and role_problem("tiny", "policy", "--model") is None
    with pytest.raises(BadInput, match="--gold-rm .*: a causal language model"):  # the frontier's gold
        frontier_module.load_gold("", str(dirs / "lm"), Settings())


def test_a_path_that_is_not_a_model_is_named_by_its_flag(dirs, tmp_path, no_loading):
    result = igpt("train-rm", "--rankings", dirs / "ranks.jsonl", "--demos", dirs / "demos.jsonl", "--sft",
                  tmp_path / "notamodel", "--run-dir", tmp_path / "run")
    text = said(result)
    assert result.exit_code == 2 and f"--sft {tmp_path / 'notamodel'}: not a model" in text and "--model" not in text
    result = igpt("compare", dirs / "rm", tmp_path / "notamodel", "--prompts", dirs / "prompts.jsonl", "--run-dir",
                  tmp_path / "run")
    text = said(result)  # both sides named at once
    assert result.exit_code == 2 and f"A {dirs / 'rm'}: a reward model" in text
    assert f"B {tmp_path / 'notamodel'}: not a stage of the run" in text


def test_every_missing_prerequisite_is_named_at_once_with_the_command_that_makes_it(dirs, tmp_path, no_loading):
    run = tmp_path / "run"
    result = igpt("ppo", "--prompts", dirs / "prompts.jsonl", "--run-dir", run)
    text = said(result)
    assert result.exit_code == 2
    assert f"--sft: not given, and {run / 'sft' / 'final'} does not exist (run `igpt sft` first" in text, text
    assert f"--rm: not given, and {run / 'rm' / 'final'} does not exist (run `igpt train-rm` first" in text
    result = igpt("ppo", "--prompts", dirs / "prompts.jsonl", "--run-dir", run, "--sft", tmp_path / "nothing")
    text = said(result)
    assert f"--sft {tmp_path / 'nothing'}: not a model" in text and "run `igpt train-rm` first" in text


@pytest.fixture(scope="module")
def chain(tmp_path_factory, dirs):
    """sft (4 steps, a checkpoint each 2), the rule RM as rm/final, ppo (3 iterations, a checkpoint each) and
    dpo (2 steps, a checkpoint each), all on tiny."""
    t = tmp_path_factory.mktemp("chain")
    run = t / "run"
    common = ["--config", TINY_CONFIG, "--run-dir", run]
    assert igpt("sft", *common, "--data", dirs / "demos.jsonl", "--max-steps", "4", "--save-every", "2",
                "--keep-checkpoints", "5").exit_code == 0
    make_rule_rm(run / "rm" / "final", tiny_tokenizer(), "e")
    result = igpt("ppo", *common, "--prompts", dirs / "prompts.jsonl", "--max-steps", "3", "--save-every", "1",
                  "--keep-checkpoints", "5", "--rollout-batch-size", "4", "--mini-batch-size", "4",
                  "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    result = igpt("dpo", *common, "--rankings", dirs / "ranks.jsonl", "--max-steps", "2", "--save-every", "1",
                  "--keep-checkpoints", "5", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    return run


def test_eval_compare_and_sample_read_one_model_reference_syntax(chain, dirs, tmp_path):
    common = ["--prompts", dirs / "prompts.jsonl", "--run-dir", chain, "--max-new-tokens", "6"]
    folder = chain / "ppo" / "checkpoints" / "step-000001"
    for ref, name in (("ppo@step-1", "ppo-step-1"), ("sft@step-2", "sft-step-2"), ("dpo@1", "dpo-step-1")):
        result = igpt("eval", ref, *common, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["model"] == name and (chain / "eval" / name / "report.json").is_file()
    # a checkpoint folder given as a path is its stage's checkpoint: the same weights, the same samples
    result = igpt("eval", folder, *common, "--json", "--name", "by-path")
    assert result.exit_code == 0, result.output
    by_ref = json.loads((chain / "eval" / "ppo-step-1" / "report.json").read_text())
    by_path = json.loads(result.stdout)
    assert by_path["model"] == "ppo-step-1" and by_path["score_mean"] == by_ref["score_mean"]
    result = igpt("compare", "ppo@step-1", "sft@step-2", *common)
    assert result.exit_code == 0, result.output
    assert (chain / "compare" / "ppo-step-1-vs-sft-step-2" / "report.json").is_file()
    out = tmp_path / "samples.jsonl"
    result = igpt("sample", "--model", "dpo@step-1", "--k", "2", "--out", out, *common)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 4
    # the last step of a stage is its final model
    result = igpt("eval", "sft@step-4", *common, "--json", "--name", "sft-last")
    assert result.exit_code == 0 and json.loads(result.stdout)["model"] == "sft"


def scaled_down(preset: dict) -> dict:
    """A shipped preset as it is but for size: the tiny model, short sequences, a few examples per batch."""
    preset["sft"]["model"]["name"] = "tiny"
    for section in preset.values():
        if "model" in section:
            section["model"]["max_seq_len"] = 128
        if "optim" in section:
            section["optim"].update(batch_size=4, warmup_steps=0)
        if "batch_size" in section:
            section["batch_size"] = 4
        if "max_new_tokens" in section:
            section["max_new_tokens"] = 8
    preset["ppo"].update(rollout_batch_size=4, mini_batch_size=4, ptx_batch_size=4, ptx_seq_len=32,
                         ptx_micro_batch_size=2)
    return preset


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_each_shipped_preset_runs_the_chain_each_stage_from_the_one_before(name, dirs, tmp_path):
    preset = scaled_down(yaml.safe_load((REPO / "configs" / name).read_text()))
    assert {"sft", "rm", "ppo", "dpo", "eval", "compare"} <= set(preset), "the README's chain needs every section"
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    write_jsonl(tmp_path / "pretrain.jsonl", [{"text": f"{i} and {i + 1} make {2 * i + 1}. " * 4} for i in range(8)])
    run = tmp_path / "run"
    common = ["--config", tmp_path / "preset.yaml", "--run-dir", run]
    ptx = ["--ptx-data", tmp_path / "pretrain.jsonl"] if preset["ppo"].get("ptx_coef", 0) > 0 else []
    prompts = ["--prompts", dirs / "prompts.jsonl"]
    for args in (["sft", "--data", dirs / "demos.jsonl", "--max-steps", "2"],
                 ["train-rm", "--rankings", dirs / "ranks.jsonl", "--max-steps", "1"],
                 ["ppo", *prompts, *ptx, "--max-steps", "1"],
                 ["dpo", "--rankings", dirs / "ranks.jsonl", "--max-steps", "1"],
                 ["eval", "ppo", *prompts], ["compare", "ppo", "dpo", *prompts]):
        result = igpt(*args, *common)
        assert result.exit_code == 0, (args[0], result.output)
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    sft_sha = stages["sft"]["outputs"]["sha256"]
    inputs = {"rm": ("init",), "ppo": ("sft", "rm"), "dpo": ("sft",)}
    for stage, keys in inputs.items():
        for key in keys:
            made_by = "sft" if key in ("init", "sft") else key
            assert stages[stage]["inputs"][key]["path"] == f"{made_by}/final", (name, stage, key)
            if made_by == "sft":
                assert stages[stage]["inputs"][key]["sha256"] == sft_sha, (name, stage, key)
    assert stages["compare/ppo-vs-dpo"]["status"] == "completed"


def test_a_model_judge_reads_the_same_references(chain, dirs, tmp_path, monkeypatch):
    """label's, compare's and eval's ``model:REF`` judge is read as eval reads a model: a stage's checkpoint
    loads that step's weights on the stage's base (the judge's forward sees exactly them), a stage name its
    final model; an unknown step is named as the user wrote it."""
    import torch

    from instructgpt_cli import judges
    from instructgpt_cli.refs import model_or_checkpoint

    def total(model) -> float:
        return sum(float(p.double().sum()) for p in model.parameters())

    seen: list[float] = []

    def fake_logits(runner, ids, mask):  # '1' always: every pair ties, so compare still reports
        seen.append(total(runner.model))
        logits = torch.zeros(ids.size(0), runner.model.config.vocab_size)
        logits[:, 0] = 1.0
        return logits

    monkeypatch.setattr(judges, "answer_logits", fake_logits)
    tok = tiny_tokenizer()
    expected = {ref: total(model_or_checkpoint(ref, chain, "X").load(tok, torch.device("cpu"), "float32", 0))
                for ref in ("ppo@step-1", "sft")}
    assert expected["ppo@step-1"] != expected["sft"]
    out = tmp_path / "ranks.jsonl"
    result = igpt("label", dirs / "samples.jsonl", "--judge", "model:ppo@step-1", "--run-dir", chain, "--out", out)
    assert result.exit_code == 2 and "tied every response" in said(result)  # what the fake says: all tied
    assert seen and all(s == pytest.approx(expected["ppo@step-1"], rel=1e-9) for s in seen)
    seen.clear()
    result = igpt("compare", "ppo", "dpo", "--prompts", dirs / "prompts.jsonl", "--run-dir", chain,
                  "--max-new-tokens", "4", "--judge", "model:sft")
    assert result.exit_code == 0, result.output
    assert json.loads((chain / "compare" / "ppo-vs-dpo.model-sft" / "report.json").read_text())["ties"] == 4
    assert seen and all(s == pytest.approx(expected["sft"], rel=1e-9) for s in seen)
    result = igpt("label", dirs / "samples.jsonl", "--judge", "model:ppo@step-9", "--run-dir", chain, "--out", out)
    assert result.exit_code == 2 and "--judge model:ppo@step-9: no complete checkpoint of step 9" in said(result)
    assert not out.exists()
