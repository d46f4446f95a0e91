"""Benchmarks through lm-evaluation-harness (instructgpt_cli/benchmarks.py): the harness's accuracy equals
one computed by hand from the model's own log-likelihoods; check() catches a missing extra, an unknown
task and data not available offline, and writes nothing; the alignment tax is model minus SFT with the
standard error of a difference; the shipped igpt_basics task runs from any directory; a LoRA model runs."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_jsonl
from instructgpt_cli.errors import BadInput
from instructgpt_cli.models import tiny_model, tiny_tokenizer

SHIPPED = REPO / "data" / "benchmarks"
PROMPT = "Question: {q}\nAnswer:"
QUESTIONS = [("What color is the sky?", ["blue", "green", "red", "black"]),
             ("How many legs has a cat?", ["two", "four", "six", "eight"]),
             ("What is two plus two?", ["three", "four", "five", "twenty-two"]),
             ("Where do fish live?", ["in water", "in trees", "on the moon", "in the desert"]),
             ("What do bees make?", ["honey", "bricks", "steel", "glass"])]
TASK_YAML = """task: {name}
dataset_path: {path}
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def choice_logliks(model, tok, question: str, choices: list[str]) -> list[float]:
    """Sum of log-probs of each choice's tokens (after the harness's " " delimiter) given the prompt:
    one plain forward pass per choice."""
    ctx = PROMPT.format(q=question)
    ctx_ids = tok.encode(ctx)
    out = []
    for c in choices:
        ids = tok.encode(ctx + " " + c)
        assert ids[:len(ctx_ids)] == ctx_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        out.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx_ids), len(ids))))
    return out


def write_task(d: Path, name: str, records: list[dict], path: str = "json") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.yaml").write_text(TASK_YAML.format(name=name, path=path), encoding="utf-8")
    write_jsonl(d / f"{name}.jsonl", records)
    return d


def hand_task(model, tok, wrong: set[int]) -> tuple[list[dict], float, float]:
    """Records whose answer is the model's own pick (by raw log-likelihood) except for the documents in
    ``wrong``; with the accuracy and the length-normalised accuracy that follow by hand."""
    records, acc, acc_norm = [], [], []
    for i, (q, choices) in enumerate(QUESTIONS):
        lls = choice_logliks(model, tok, q, choices)
        pred = max(range(len(choices)), key=lambda j: lls[j])
        pred_norm = max(range(len(choices)), key=lambda j: lls[j] / len(choices[j]))
        answer = (pred + 1) % len(choices) if i in wrong else pred
        records.append({"question": q, "choices": choices, "answer": answer})
        acc.append(float(pred == answer))
        acc_norm.append(float(pred_norm == answer))
    return records, sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)


def stderr_of_mean(p: float, n: int) -> float:
    """The harness's stderr of a mean of 0/1 values: sample stddev (n - 1) over sqrt(n)."""
    return math.sqrt(p * (1 - p) * n / (n - 1)) / math.sqrt(n)


def snapshot(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs for p in d.rglob("*")} if dirs else set()


def test_accuracy_equals_the_models_own_loglikelihoods(tmp_path: Path):
    pytest.importorskip("lm_eval")
    from instructgpt_cli import benchmarks

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0).eval()
    records, acc, acc_norm = hand_task(model, tok, wrong={1, 3})
    assert acc == pytest.approx(3 / 5)
    write_task(tmp_path / "tasks", "mini_mc", records)
    out = benchmarks.run(model, tok, ["mini_mc"], str(tmp_path / "tasks"), None, 2, "cpu")
    json.dumps(out, allow_nan=False)
    r = out["mini_mc"]
    assert r["n"] == 5 and r["version"] == 2.0 and r["seconds"] > 0
    assert set(r["metrics"]) == {"acc", "acc_norm"}
    assert r["metrics"]["acc"]["value"] == pytest.approx(acc)
    assert r["metrics"]["acc"]["stderr"] == pytest.approx(stderr_of_mean(acc, 5))
    assert r["metrics"]["acc_norm"]["value"] == pytest.approx(acc_norm)


def in_own_directory(tmp_path: Path) -> Path:
    """An empty working directory of the test's own: what check writes there is its doing, never another test's
    (the suite runs its files in parallel, and the repository's root changes as they run)."""
    (tmp_path / "cwd").mkdir()
    return tmp_path / "cwd"


def test_check_passes_for_local_data_and_writes_nothing(tmp_path: Path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(in_own_directory(tmp_path))
    from instructgpt_cli import benchmarks

    write_task(tmp_path / "tasks", "mini_mc", [{"question": "Q?", "choices": ["a", "b"], "answer": 0}])
    env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    before = snapshot(tmp_path), sorted(os.listdir(os.getcwd()))
    benchmarks.check(["mini_mc"], str(tmp_path / "tasks"))
    assert (snapshot(tmp_path), sorted(os.listdir(os.getcwd()))) == before
    assert {k: os.environ.get(k) for k in env} == env  # the offline switches are restored


def test_check_names_a_task_whose_dataset_is_not_cached_and_writes_nothing(tmp_path: Path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(in_own_directory(tmp_path))
    import datasets

    from instructgpt_cli import benchmarks

    write_task(tmp_path / "tasks", "hub_mc", [], path="some_org/not_cached")
    flags = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    before = snapshot(tmp_path), sorted(os.listdir(os.getcwd()))
    with pytest.raises(BadInput) as e:
        benchmarks.check(["hub_mc"], str(tmp_path / "tasks"))
    assert (snapshot(tmp_path), sorted(os.listdir(os.getcwd()))) == before
    (line,) = e.value.messages
    assert "hub_mc" in line and "some_org/not_cached" in line and "datasets.load_dataset('some_org/not_cached')" in line
    assert (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE) == flags  # restored


def test_check_names_a_task_whose_local_data_file_is_missing(tmp_path: Path):
    pytest.importorskip("lm_eval")
    from instructgpt_cli import benchmarks

    write_task(tmp_path / "tasks", "gone_mc", [])
    (tmp_path / "tasks" / "gone_mc.jsonl").unlink()
    with pytest.raises(BadInput) as e:
        benchmarks.check(["gone_mc"], str(tmp_path / "tasks"))
    (line,) = e.value.messages
    assert "gone_mc" in line and "gone_mc.jsonl" in line and "cannot be read" in line


def test_check_unknown_task_suggests_close_names(tmp_path: Path):
    pytest.importorskip("lm_eval")
    from instructgpt_cli import benchmarks

    with pytest.raises(BadInput) as e:
        benchmarks.check(["igpt_basicz"], str(SHIPPED))
    (line,) = e.value.messages
    assert "igpt_basicz" in line and "no such lm-eval task" in line and "igpt_basics" in line


def test_check_task_dir_must_be_a_directory(tmp_path: Path):
    pytest.importorskip("lm_eval")
    from instructgpt_cli import benchmarks

    with pytest.raises(BadInput, match="--benchmark-tasks .*: not a directory"):
        benchmarks.check(["igpt_basics"], str(tmp_path / "nope"))


def test_check_without_the_extra_says_how_to_install_it(monkeypatch):
    from instructgpt_cli import benchmarks

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(BadInput) as e:
        benchmarks.check(["hellaswag"], None)
    assert e.value.messages == ["--benchmarks needs the lm-eval extra: pip install 'instructgpt-cli[lm-eval]'"]


def test_tax_is_the_difference_with_its_standard_error():
    from instructgpt_cli.benchmarks import tax

    model = {"hs": {"metrics": {"acc": {"value": 0.40, "stderr": 0.03}, "acc_norm": {"value": 0.50, "stderr": None}},
                    "n": 100, "seconds": 1.0, "version": 1},
             "only_model": {"metrics": {"acc": {"value": 0.1, "stderr": 0.01}}}}
    sft = {"hs": {"metrics": {"acc": {"value": 0.45, "stderr": 0.04}, "acc_norm": {"value": 0.48, "stderr": 0.02},
                              "mc2": {"value": 0.3, "stderr": 0.01}}, "n": 100, "seconds": 1.0, "version": 1}}
    out = tax(model, sft)
    assert set(out) == {"hs"} and set(out["hs"]) == {"acc", "acc_norm"}
    acc = out["hs"]["acc"]
    assert acc["diff"] == pytest.approx(-0.05) and acc["stderr"] == pytest.approx(0.05)  # sqrt(.03^2 + .04^2)
    assert acc["ci95"] == pytest.approx([-0.05 - 0.098, -0.05 + 0.098])
    assert (acc["model"], acc["sft"]) == (0.40, 0.45)
    norm = out["hs"]["acc_norm"]
    assert norm["diff"] == pytest.approx(0.02) and norm["stderr"] is None and norm["ci95"] is None
    json.dumps(out, allow_nan=False)


def test_shipped_igpt_basics_runs_from_any_directory(tmp_path: Path, monkeypatch):
    pytest.importorskip("lm_eval")
    from instructgpt_cli import benchmarks

    lines = (SHIPPED / "igpt_basics" / "igpt_basics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(x) for x in lines]
    assert len(records) >= 40
    assert all(len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4 and r["question"] for r in records)
    # length gives the answer away in few questions (a random model's acc_norm prefers long choices)
    longest = sum(len(r["choices"][r["answer"]]) > max(len(c) for i, c in enumerate(r["choices"]) if i != r["answer"])
                  for r in records)
    assert longest <= len(records) // 8
    monkeypatch.chdir(tmp_path)  # the YAML's data_files is relative to the YAML, not to the current directory
    benchmarks.check(["igpt_basics"], str(SHIPPED))
    tok = tiny_tokenizer()
    out = benchmarks.run(tiny_model(tok, seed=1), tok, ["igpt_basics"], str(SHIPPED), 3, 4, None)
    r = out["igpt_basics"]
    assert r["n"] == 3 and set(r["metrics"]) == {"acc", "acc_norm"}
    assert all(0.0 <= m["value"] <= 1.0 for m in r["metrics"].values())
    one = benchmarks.run(tiny_model(tok, seed=1), tok, ["igpt_basics"], str(SHIPPED), 1, 1, None)["igpt_basics"]
    assert one["n"] == 1 and one["metrics"]["acc"]["stderr"] is None  # the harness's "N/A" for one document
    json.dumps(one, allow_nan=False)
    assert os.listdir(tmp_path) == []


def test_a_lora_model_is_scored_as_its_own_forward_and_left_unchanged(tmp_path: Path):
    pytest.importorskip("lm_eval")
    from instructgpt_cli import benchmarks
    from instructgpt_cli.config import LoraConfig
    from instructgpt_cli.models import apply_lora

    tok = tiny_tokenizer()
    model = apply_lora(tiny_model(tok, seed=2), LoraConfig(enabled=True, layers=1)).eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapter an effect to merge
                p.normal_(0, 0.5)
    records, acc, acc_norm = hand_task(model, tok, wrong={0})
    write_task(tmp_path / "tasks", "lora_mc", records)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = benchmarks.run(model, tok, ["lora_mc"], str(tmp_path / "tasks"), None, 4, "cpu")["lora_mc"]
    assert out["metrics"]["acc"]["value"] == pytest.approx(acc) == pytest.approx(4 / 5)
    assert out["metrics"]["acc_norm"]["value"] == pytest.approx(acc_norm)
    # the caller's LoRA model is left as it was: adapters not merged, weights and train mode unchanged
    from peft import PeftModel

    assert isinstance(model, PeftModel) and model.training and model.get_base_model().training
    after = model.state_dict()
    assert set(after) == set(weights) and all(torch.equal(after[k], v) for k, v in weights.items())
