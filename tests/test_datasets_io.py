"""Data inputs through Hugging Face ``datasets`` (save_to_disk directories, parquet, CSV, JSON, cached hub ids,
--split, --columns) and TRL's dataset formats, each read back as the igpt-native records they stand for."""
import dataclasses
import json
import socket
import subprocess
import sys

import pytest

from conftest import REPO, TINY_CONFIG, igpt, write_jsonl
from instructgpt_cli.batches import render_prompt
from instructgpt_cli.data import read_demos, read_pretrain, read_prompts, read_rankings
from instructgpt_cli.errors import BadInput
from instructgpt_cli.models import tiny_tokenizer

datasets = pytest.importorskip("datasets")


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def bare(records):
    """Records without their FILE:LINE, to compare what was read from different sources."""
    return [dataclasses.replace(r, where="") for r in records]


NATIVE_DEMOS = [{"prompt": "What is 2 plus 3?", "response": "5."}, {"prompt": "Name a colour.", "response": "Blue."}]
TRL_DEMOS = [{"prompt": "What is 2 plus 3?", "completion": "5."},  # standard prompt-completion
             {"prompt": [u("Name a colour.")], "completion": [a("Blue.")]}]  # conversational


def test_trl_prompt_completion_and_messages_read_as_native_demos(tmp_path):
    native = bare(read_demos(write_jsonl(tmp_path / "n.jsonl", NATIVE_DEMOS)))
    assert bare(read_demos(write_jsonl(tmp_path / "t.jsonl", TRL_DEMOS))) == native
    messages = [{"messages": [u("What is 2 plus 3?"), a("5.")]}, {"messages": [u("Name a colour."), a("Blue.")]}]
    assert bare(read_demos(write_jsonl(tmp_path / "m.jsonl", messages))) == native
    # a multi-turn conversational prompt keeps its turns: the same demo as the messages form
    turns = [{"role": "system", "content": "Be brief."}, u("Hi."), a("Hello."), u("Name a colour.")]
    conv = read_demos(write_jsonl(tmp_path / "c.jsonl", [{"prompt": turns, "completion": [a("Blue.")]}]))
    msgs = read_demos(write_jsonl(tmp_path / "cm.jsonl", [{"messages": turns + [a("Blue.")]}]))
    assert bare(conv) == bare(msgs) and conv[0].messages == turns


def test_trl_preference_forms_read_as_native_rankings(tmp_path):
    native = bare(read_rankings(write_jsonl(tmp_path / "n.jsonl", [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Sky? It is", "chosen": " blue.", "rejected": " green."}])))
    assert native[0].responses == [" blue.", " green."] and native[0].ranks == [1, 2]
    forms = {
        "implicit standard": [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
                              {"chosen": "Sky? It is blue.", "rejected": "Sky? It is green."}],
        "explicit conversational": [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                                    {"prompt": [u("Sky? It is")], "chosen": [a(" blue.")], "rejected": [a(" green.")]}],
        "implicit conversational": [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
                                    {"chosen": [u("Sky? It is"), a(" blue.")], "rejected": [u("Sky? It is"), a(" green.")]}],
    }
    for name, rows in forms.items():
        got = bare(read_rankings(write_jsonl(tmp_path / f"{name.replace(' ', '_')}.jsonl", rows)))
        assert got == native, name
    # implicit multi-turn: the shared turns are the prompt, the differing last turn each response
    turns = [u("Hi."), a("Hello."), u("Sky colour?")]
    r = read_rankings(write_jsonl(tmp_path / "mt.jsonl", [{"chosen": turns + [a("Blue.")],
                                                            "rejected": turns + [a("Green.")]}]))[0]
    assert r.messages == turns and r.responses == ["Blue.", "Green."] and r.prompt == "Sky colour?"


def test_implicit_pairs_that_share_no_prompt_or_differ_in_several_turns_are_errors(tmp_path):
    rows = [{"chosen": "Blue.", "rejected": "Green."},
            {"chosen": [u("A?"), a("x"), u("B?"), a("y")], "rejected": [u("A?"), a("z"), u("B?"), a("w")]},
            {"chosen": [u("A?"), a("x")], "rejected": "text"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadInput) as e:
        read_rankings(path)
    msgs = e.value.messages
    assert msgs[0] == f"{path}:1: prompt: missing, and chosen and rejected share no prompt text to take as one"
    assert msgs[1] == f"{path}:2: chosen: expected one assistant message, got assistant, user, assistant"
    assert any(m.startswith(f"{path}:3: rejected: must be a list of messages") for m in msgs)


def test_conversational_prompts_render_with_the_chat_template_as_messages_demos_do(tmp_path):
    turns = [{"role": "system", "content": "Be brief."}, u("Hi."), a("Hello."), u("Name a colour.")]
    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": turns}, {"prompt": [u("Solo.")]}]))
    demo = read_demos(write_jsonl(tmp_path / "d.jsonl", [{"messages": turns + [a("Blue.")]}]))[0]
    tok = tiny_tokenizer()
    assert render_prompt(tok, prompts[0].messages) == render_prompt(tok, demo.messages)
    assert prompts[0].prompt == "Name a colour." and prompts[0].record == turns
    # one user turn is the plain prompt it stands for
    assert bare(prompts[1:]) == bare(read_prompts(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Solo."}])))
    with pytest.raises(BadInput) as e:
        read_prompts(write_jsonl(tmp_path / "e.jsonl", [{"prompt": [u("Hi."), a("Hello.")]}]))
    assert e.value.messages == [f"{tmp_path / 'e.jsonl'}:1: prompt[1].role: a prompt must end with a user turn, "
                                "got 'assistant'"]


def containers(tmp_path, rows):
    """The same rows as parquet, CSV, a JSON array, a save_to_disk Dataset directory and JSONL."""
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    ds.save_to_disk(str(tmp_path / "saved"))
    return [tmp_path / "d.parquet", tmp_path / "d.csv", tmp_path / "d.json", tmp_path / "saved"]


def test_every_container_reads_back_equal_to_jsonl(tmp_path):
    native = bare(read_demos(write_jsonl(tmp_path / "n.jsonl", NATIVE_DEMOS)))
    for path in containers(tmp_path, [{"prompt": d["prompt"], "completion": d["response"]} for d in NATIVE_DEMOS]):
        got = read_demos(path)
        assert bare(got) == native, path
        assert got[1].where == f"{path}:2"
    conv = tmp_path / "conv"
    datasets.Dataset.from_list([TRL_DEMOS[1]]).save_to_disk(str(conv))  # message lists as Arrow structs
    assert bare(read_demos(conv)) == native[1:]


def test_a_dataset_dict_reads_the_split_asked_for_and_names_the_splits_it_has(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "train prompt"}]),
                               "test": datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [p.prompt for p in read_prompts(tmp_path / "dd")] == ["train prompt"]
    test = read_prompts(tmp_path / "dd", split="test")
    assert [p.prompt for p in test] == ["a", "b"] and test[1].where == f"{tmp_path / 'dd'}[test]:2"
    with pytest.raises(BadInput) as e:
        read_prompts(tmp_path / "dd", split="validation")
    assert e.value.messages == [f"{tmp_path / 'dd'}: no split 'validation'; it has train, test (choose one with --split)"]


def fake_hub_dataset(hf_home, repo, rows_by_split):
    """A dataset in the hub cache as huggingface_hub lays it out: blobs linked from a snapshot, refs/main."""
    root = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    (snapshot / "data").mkdir(parents=True)
    for split, rows in rows_by_split.items():
        datasets.Dataset.from_list(rows).to_parquet(str(snapshot / "data" / f"{split}-00000-of-00001.parquet"))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(snapshot.name)


def test_a_dataset_id_in_the_local_cache_loads_offline_and_an_absent_one_is_a_clear_error(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    fake_hub_dataset(hf_home, "acme/prompts", {"train": [{"prompt": "x"}], "test": [{"prompt": "y"}, {"prompt": "z"}]})
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("igpt tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    got = read_prompts("acme/prompts", split="test")
    assert [p.prompt for p in got] == ["y", "z"] and got[0].where == "acme/prompts[test]:1"
    run_dir = tmp_path / "run"
    result = igpt("sft", "--model", "tiny", "--data", "acme/absent", "--run-dir", run_dir)
    assert result.exit_code == 2
    assert "acme/absent: file not found, and no dataset 'acme/absent' in the local Hugging Face cache" in result.stderr
    assert not run_dir.exists()


def test_columns_map_by_field_name_and_a_missing_column_is_one_error(tmp_path):
    native = bare(read_demos(write_jsonl(tmp_path / "n.jsonl", NATIVE_DEMOS)))
    rows = [{"question": d["prompt"], "answer": d["response"]} for d in NATIVE_DEMOS]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    columns = ["prompt=question", "response=answer"]
    assert bare(read_demos(tmp_path / "qa.parquet", columns=columns)) == native
    assert bare(read_demos(write_jsonl(tmp_path / "qa.jsonl", rows), columns=columns)) == native
    # the same stage-wide mapping leaves an input without those columns alone (ppo: --prompts and --ptx-data)
    assert read_pretrain(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]), columns=columns) == ["hello"]
    with pytest.raises(BadInput) as e:
        read_demos(tmp_path / "qa.parquet")
    assert e.value.messages == [f"{tmp_path / 'qa.parquet'}: no columns igpt reads as demonstrations: it has "
                                "question, answer; expected messages or prompt+response or prompt+completion "
                                "(map yours with --columns FIELD=COLUMN,...)"]
    bad = igpt("sft", "--data", "d.jsonl", "--columns", "prompt=question,nonsense", "--print-config")
    assert bad.exit_code == 2 and "--columns (sft.columns): ['prompt=question', 'nonsense'] must be FIELD=COLUMN" in bad.stderr
    ok = igpt("sft", "--data", "d.jsonl", "--columns", "prompt=question", "--split", "test", "--print-config")
    assert ok.exit_code == 0 and "split: test" in ok.stdout and "- prompt=question" in ok.stdout


def test_bad_rows_of_a_parquet_file_are_all_reported_and_nothing_is_written(tmp_path):
    rows = [{"prompt": "ok", "completion": "fine"}, {"prompt": "no answer", "completion": ""},
            {"prompt": None, "completion": "orphan"}]
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    run_dir = tmp_path / "run"
    result = igpt("sft", "--config", TINY_CONFIG, "--data", path, "--run-dir", run_dir)
    assert result.exit_code == 2
    assert f"error: {path}:2: completion: must be a non-empty string, got empty string" in result.stderr
    assert f"error: {path}:3: prompt: must be a non-empty string, got null" in result.stderr
    assert not run_dir.exists()


def test_jsonl_runs_do_not_import_datasets(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", NATIVE_DEMOS)
    code = ("import sys; from instructgpt_cli.data import read_demos; read_demos(sys.argv[1]); "
            "print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sft_on_a_trl_parquet_and_train_rm_on_conversational_pairs(tmp_path):
    demos = tmp_path / "demos.parquet"
    datasets.Dataset.from_list([{"prompt": f"What is {i} plus 1?", "completion": f"{i + 1}."}
                                for i in range(12)]).to_parquet(str(demos))
    run_dir = tmp_path / "run"
    sft = igpt("sft", "--config", TINY_CONFIG, "--data", demos, "--run-dir", run_dir, "--max-steps", "2")
    assert sft.exit_code == 0, sft.output
    assert (run_dir / "sft" / "final" / "model.safetensors").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["inputs"]["data"]["split"] == "train"
    pairs = tmp_path / "pairs"
    datasets.Dataset.from_list([{"chosen": [u(f"Say {i}."), a(f"{i} banana")], "rejected": [u(f"Say {i}."), a(f"{i}")]}
                                for i in range(16)]).save_to_disk(str(pairs))
    rm = igpt("train-rm", "--config", TINY_CONFIG, "--rankings", pairs, "--run-dir", run_dir, "--max-steps", "2")
    assert rm.exit_code == 0, rm.output  # the demos that normalise the reward: the SFT parquet, from the manifest
    assert (run_dir / "rm" / "final" / "model.safetensors").is_file()
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["rm"]["inputs"]["demos"]["path"] == str(demos)


def test_dpo_reads_a_named_split_with_mapped_columns(tmp_path):
    """dpo takes --split and --columns as train-rm does (UltraFeedback's preference split is train_prefs)."""
    rows = [{"question": f"Pick {i}?", "good": f"banana {i}", "bad": f"stone {i}"} for i in range(6)]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows),
                          "test_prefs": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "prefs"))
    args = ["dpo", "--model", "tiny", "--rankings", tmp_path / "prefs", "--run-dir", tmp_path / "run",
            "--max-steps", "1", "--batch-size", "2", "--val-fraction", "0"]
    result = igpt(*args, "--split", "train_prefs", "--columns", "prompt=question,chosen=good,rejected=bad")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["dpo"]["inputs"]["rankings"]
    assert manifest["split"] == "train_prefs" and manifest["columns"] == ["prompt=question", "chosen=good",
                                                                          "rejected=bad"]
    missing = igpt(*args[:-6], "--run-dir", tmp_path / "run2", "--columns", "prompt=question,chosen=good,rejected=bad")
    assert missing.exit_code == 2 and "no split 'train'" in missing.stderr and not (tmp_path / "run2").exists()
