"""Demonstration validation: every bad line reported as FILE:LINE: field: reason, exit 2, nothing written."""
import json
import re

import pytest

from conftest import igpt, write_jsonl
from instructgpt_cli.data import parse_demo, read_demos
from instructgpt_cli.errors import BadInput

GOOD = {"prompt": "Say hi.", "response": "Hi!"}

# (name, lines of the file, line number reported, text the message must contain)
MALFORMED = [
    ("bad_json", [GOOD, '{"prompt": "a", "response": }'], 2, "not valid JSON"),
    ("not_object", [GOOD, GOOD, '["a", "b"]'], 3, "expected a JSON object, got array"),
    ("missing_response", [{"prompt": "a"}], 1, "response: missing"),
    ("empty_prompt", [GOOD, {"prompt": "  ", "response": "b"}], 2, "prompt: must be a non-empty string, got empty string"),
    ("wrong_type", [{"prompt": "a", "response": 5}], 1, "response: must be a non-empty string, got number"),
    ("unknown_role", [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}], 1,
     "messages[1].role: unknown role 'bot'"),
    ("no_assistant", [{"messages": [{"role": "user", "content": "a"}]}], 1, "messages: no assistant turn"),
    ("ends_with_user", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": "c"}]}], 1, "messages[2].role"),
    ("messages_not_list", [{"messages": "hello"}], 1, "messages: must be a non-empty list"),
    ("both_formats", [{"messages": [], "prompt": "a", "response": "b"}], 1, "either messages or prompt/response"),
    ("category_type", [{"prompt": "a", "response": "b", "category": 3}], 1, "category: must be a non-empty string"),
    ("missing_content", [{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}], 1,
     "messages[0]: content: missing"),
    ("prompt_too_long", [GOOD, {"prompt": "x" * 400, "response": "b"}], 2, "longer than the context window"),
]


@pytest.mark.parametrize("name,lines,lineno,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_demos_exit_2_and_write_nothing(tmp_path, name, lines, lineno, reason):
    data = write_jsonl(tmp_path / f"{name}.jsonl", lines)
    run_dir = tmp_path / "run"
    result = igpt("sft", "--model", "tiny", "--data", data, "--run-dir", run_dir, "--max-seq-len", "128")
    assert result.exit_code == 2, result.output
    assert f"{data}:{lineno}: " in result.stderr
    assert reason in result.stderr
    assert not run_dir.exists()


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"prompt": "caf\xe9", "response": "b"}'.encode("latin-1") + b"\n")
    run_dir = tmp_path / "run"
    result = igpt("sft", "--model", "tiny", "--data", data, "--run-dir", run_dir)
    assert result.exit_code == 2
    assert f"{data}:2: invalid UTF-8" in result.stderr
    assert not run_dir.exists()


def test_every_bad_line_is_reported_not_only_the_first(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": ""}, GOOD, "nope", {"response": "x"}])
    with pytest.raises(BadInput) as e:
        read_demos(data)
    lines = {m.split(": ")[0] for m in e.value.messages}
    assert lines == {f"{data}:1", f"{data}:3", f"{data}:4"}
    assert f"{data}:1: response: missing" in e.value.messages


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for path, text in [(empty, "no demonstrations found"), (tmp_path / "nope.jsonl", "file not found")]:
        result = igpt("sft", "--model", "tiny", "--data", path, "--run-dir", tmp_path / "run")
        assert result.exit_code == 2 and text in result.stderr
    assert not (tmp_path / "run").exists()


def test_chat_messages_are_split_into_prompt_turns_and_target():
    errors = []
    demo = parse_demo({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                                    {"role": "assistant", "content": "Goodbye"}], "category": "chat"}, "f:1", errors)
    assert errors == []
    assert demo.response == "Goodbye" and demo.category == "chat"
    assert [m["role"] for m in demo.messages] == ["system", "user", "assistant", "user"]


def test_prompt_tokens_are_masked_and_response_ends_with_eos():
    from instructgpt_cli.data import Demo
    from instructgpt_cli.batches import IGNORE_INDEX, tokenize_demos
    from instructgpt_cli.models import tiny_tokenizer

    tok = tiny_tokenizer()
    (ex,), cut = tokenize_demos(tok, [Demo([{"role": "user", "content": "Hi"}], "Yo", None, "f:1")], 64)
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert cut == 0
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(ex.labels[n_prompt:]) == "Yo<|im_end|>"
    assert ex.input_ids[-1] == tok.eos_token_id != tok.pad_token_id


# ---------------------------------------------------------------- "group": rankings held out together


def test_hold_out_without_groups_is_the_split_by_item():
    import torch

    from instructgpt_cli.batches import hold_out

    items = list(range(23))
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(7)).tolist()  # the split before groups
    assert hold_out(items, 0.3, 7) == ([items[i] for i in perm[6:]], [items[i] for i in perm[:6]])
    assert hold_out(items, 0.3, 7, [None] * 23) == hold_out(items, 0.3, 7)


def test_hold_out_by_group_never_splits_a_group():
    from instructgpt_cli.batches import hold_out

    # 10 messages under 4 framings each, and 5 rankings with no group (each its own)
    items = [(m, f) for m in range(10) for f in range(4)] + [(None, i) for i in range(5)]
    keys = [f"message {m}" if m is not None else None for m, _ in items]
    for seed in range(5):
        train, val = hold_out(items, 0.2, seed, keys)
        assert sorted(train + val, key=str) == sorted(items, key=str)
        assert not {m for m, _ in train if m is not None} & {m for m, _ in val if m is not None}
        held_groups = {m for m, _ in val if m is not None} | {("alone", i) for m, i in val if m is None}
        assert len(held_groups) == int(15 * 0.2)  # a fraction of the 15 groups, whole
    assert len(hold_out(items, 1.0, 0, keys)[0]) >= 1  # at least one group trains


@pytest.mark.parametrize("reader,line", [("read_rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]}),
                                         ("read_prompts", {"prompt": "p"})])
def test_group_is_read_and_a_bad_one_is_reported(tmp_path, reader, line):
    import instructgpt_cli.data as data

    path = write_jsonl(tmp_path / "in.jsonl", [{**line, "group": "msg-1"}, line, {**line, "group": 7},
                                               {**line, "group": " "}])
    with pytest.raises(BadInput) as e:
        getattr(data, reader)(path)
    assert [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in e.value.messages] == ["3", "4"]
    assert all("group: must be a non-empty string" in m for m in e.value.messages)
    path = write_jsonl(tmp_path / "ok.jsonl", [{**line, "group": "msg-1"}, line])
    assert [r.group for r in getattr(data, reader)(path)] == ["msg-1", None]


def test_train_rm_holds_out_whole_groups(tmp_path):
    """20 rankings in groups of 12, 4 and 4: half the groups is one group, so 12 or 4 rankings are held out,
    never the 10 that half the rankings would be."""
    from conftest import arithmetic_demos, marker_rankings

    rankings = [{**r, "group": "big" if i < 12 else f"small-{i // 16}"} for i, r in enumerate(marker_rankings(20))]
    run_dir = tmp_path / "run"
    result = igpt("train-rm", "--model", "tiny", "--rankings", write_jsonl(tmp_path / "r.jsonl", rankings),
                  "--demos", write_jsonl(tmp_path / "d.jsonl", arithmetic_demos(4)), "--run-dir", run_dir,
                  "--val-fraction", "0.5", "--max-steps", "1", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    held = json.loads((run_dir / "manifest.json").read_text())["stages"]["rm"]["outputs"]["eval/rankings"]
    assert held in (12, 4)
    dpo = igpt("dpo", "--model", "tiny", "--rankings", tmp_path / "r.jsonl", "--run-dir", run_dir,
               "--val-fraction", "0.5", "--max-steps", "1", "--batch-size", "4")  # DPO splits the same way
    assert dpo.exit_code == 0, dpo.output
    split = re.search(r"(\d+) train, (\d+) held-out prompts", " ".join(dpo.stderr.split()))
    assert split and (int(split[1]), int(split[2])) in ((8, 12), (16, 4)), dpo.stderr
