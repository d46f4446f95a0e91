"""A lean forward through a Llama decoder stack: the arithmetic of transformers' ``LlamaModel``, op for op,
without the machinery around it.

PPO calls its models hundreds of times an iteration on small batches: sampling steps, scoring, and every
micro-batch of every epoch. At those sizes transformers' wrappers (mask construction, output capturing,
argument deprecation, the decoder-layer call) cost as much as the arithmetic (figures: bench/README.md). The
results are the same numbers (tests/test_lean.py compares outputs and gradients). SFT's forward takes it too
(padded or packed rows); one packed row attends sequence by sequence (causal attention within each) instead
of under a block-diagonal mask.

What runs is the model's own modules (embedding, projections, norms, activation, rotary embedding, heads), so
LoRA adapters, their disabling, and any head work as in ``model(...)``; only the order of calls is ours.
:func:`families.runs_lean` says where that holds: the families ``families.FAMILIES`` marks ``lean``, with transformers'
Llama classes exactly (a subclass, as FSDP makes of a sharded layer, may hook its calls), SDPA attention.
Everything else takes transformers' forward (``forward.py`` holds both paths; a ``runners.Runner`` picks one
when it is built). Gradient checkpointing, where transformers' layers have it switched on, is done here as they
do it (:func:`states`).

Sampling keeps its own cache: keys and values of every layer in preallocated tensors, written in place
at each step (:class:`Decoder`). On a CPU it computes a decoding step's products with large layers itself:
with MKL's GEMM on weights packed once for the batch (:class:`PackedProduct`), or for a few sequences as
(W @ x.T).T (:func:`few_row_product`; ``rollout.decoding_products`` says which).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from .batches import mask_inputs, position_ids
from .families import backbone, logit_transform, unwrapped


class Context(NamedTuple):
    """What every layer of one forward shares: the rotary embedding's cos and signed sin (B, 1, L, D)
    (:func:`rotary`), the attention mask (B, 1, L, S) of allowed positions, or None for plain causal
    attention, and the batch's (B, L). Between layers the hidden states are (B * L, H): a linear layer on
    a 2-D input is one matmul node in autograd, on a 3-D one a matmul between two reshapes. ``segments``:
    for one row of packed sequences, each one's (start, end), attended to one by one."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    shape: tuple[int, int]
    segments: tuple[tuple[int, int], ...] | None = None


def rotary(stack: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the model's rotary embedding at ``positions`` (B, L), shaped to broadcast over heads,
    the first half of sin negated: transformers' rotate_half(x) * sin is then x.roll(D/2) * that, one op
    for four (negation is exact, so the product is the same number)."""
    cos, sin = stack.rotary_emb(hidden, positions)
    half = sin.size(-1) // 2
    return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, None]


def context(stack: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
            positions: torch.Tensor | None = None) -> Context:
    """The rotary embedding and attention mask for a batch (B, L) of left- and/or right-padded rows, or, with
    ``positions`` (B, L) and no mask, of rows of sequences packed end to end (``data.pack``: positions
    restart at 0 where a sequence begins).

    Without left padding no mask is needed (right pads follow every real token of their row; what the
    pads themselves output is never read), as ``data.mask_inputs`` argues. With it, positions skip the
    padding and each real token attends to the real tokens up to itself; a pad attends to itself only, so
    no row of the softmax is empty. Packed, each token attends to its own sequence up to itself."""
    shape = (hidden.size(0), hidden.size(1))
    device = hidden.device
    with torch.no_grad():
        if attention_mask is not None and attention_mask.dim() == 4:  # the caller's own (G, 1, L, L) boolean mask
            return Context(*rotary(stack, hidden, positions), attention_mask, shape)  # (a ranking's shared prompt)
        inputs = mask_inputs(attention_mask) if positions is None and attention_mask is not None else {}
        if positions is None and not inputs:
            return Context(*rotary(stack, hidden, torch.arange(shape[1], device=device)[None]), None, shape)
        if positions is not None and shape[0] == 1:  # one row: each sequence its own causal attention
            starts = (positions[0] == 0).nonzero().flatten().tolist() + [shape[1]]
            return Context(*rotary(stack, hidden, positions), None, shape, tuple(zip(starts, starts[1:])))
        causal = torch.ones(shape[1], shape[1], dtype=torch.bool, device=device).tril()
        if positions is not None:
            segment = (positions == 0).cumsum(-1)
            allowed = causal & (segment[:, None, :, None] == segment[:, None, None, :])
            return Context(*rotary(stack, hidden, positions), allowed, shape)
        allowed = causal & attention_mask.bool()[:, None, None, :]
        allowed |= torch.eye(shape[1], dtype=torch.bool, device=device)
        return Context(*rotary(stack, hidden, inputs["position_ids"]), allowed, shape)


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:  # the fused kernel computes what LlamaRMSNorm computes in float32
        return F.rms_norm(x, (x.size(-1),), module.weight, module.variance_epsilon)
    return module(x)  # lower precision: LlamaRMSNorm's own upcasting


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.size(-1) // 2, -1) * signed_sin


def _attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               segments: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
    if segments:  # packed sequences: causal attention within each, none of the block-diagonal mask's waste
        return torch.cat([_attention(attn, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None) for a, b in segments], 2)
    groups = q.size(1) // k.size(1)  # query heads per key/value head
    if groups > 1 and mask is not None and q.device.type != "cpu":
        # CUDA's memory-efficient kernel takes a mask but not grouped heads (transformers repeats them too)
        k, v = (x.repeat_interleave(groups, 1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.size(2) > 1,
                                          dropout_p=attn.attention_dropout if attn.training else 0.0,
                                          scale=attn.scaling, enable_gqa=q.size(1) != k.size(1))


def _one_query_attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query a row (a decoding step: q (B, H, 1, D) over the cache k, v (B, KV, S, D)), as two
    matmuls with each key/value head's query heads side by side, and the softmax between them. On a CPU SDPA's
    flash kernel, made for long queries, took 1.2-1.8x as long at 16-64 rows of SmolLM2 (the decoder takes this
    from 16 rows); the same
    attention in another summation order. ``mask`` (B, 1, 1, S): the positions each row may attend to."""
    rows, heads, _, dim = q.shape
    weights = torch.matmul(q.view(rows, k.size(1), heads // k.size(1), dim), k.transpose(-1, -2)).mul_(attn.scaling)
    if mask is not None:
        weights.masked_fill_(~mask, float("-inf"))
    return torch.matmul(weights.softmax(-1), v).view(rows, heads, 1, dim)


def _call(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


# How a forward applies a layer (a projection, the MLP) to an input: the layer's own call, or the decoder's on a CPU
# (:meth:`Decoder.linear`).
LayerCall = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _qkv(attn: torch.nn.Module, x: torch.Tensor, ctx: Context, linear: LayerCall = _call) -> tuple[torch.Tensor, ...]:
    shape = (*ctx.shape, -1, attn.head_dim)
    q, k, v = (linear(proj, x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    return _rotate(q, ctx.cos, ctx.sin), _rotate(k, ctx.cos, ctx.sin), v


def _finish(layer: torch.nn.Module, hidden: torch.Tensor, out: torch.Tensor, linear: LayerCall = _call,
            mlp: LayerCall = _call) -> torch.Tensor:
    """The attention output (B, H, L, D) projected and added to ``hidden`` (B * L, H), then the MLP block;
    ``linear`` applies the projection and ``mlp`` the MLP."""
    hidden = hidden + linear(layer.self_attn.o_proj, out.transpose(1, 2).reshape(hidden.size(0), -1))
    return hidden + mlp(layer.mlp, _norm(layer.post_attention_layernorm, hidden))


def layer_forward(layer: torch.nn.Module, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
    """``LlamaDecoderLayer`` on hidden states (B * L, H), no cache."""
    q, k, v = _qkv(layer.self_attn, _norm(layer.input_layernorm, hidden), ctx)
    return _finish(layer, hidden, _attention(layer.self_attn, q, k, v, ctx.mask, ctx.segments))


def states(model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
           embeds: torch.Tensor | None = None, start: int = 0, stop: int | None = None,
           final_norm: bool = True, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states (B, L, H) of the decoder layers ``start:stop`` of a :func:`families.runs_lean` model, from the
    token ids (``start`` 0) or from ``embeds``, the states entering layer ``start``; then the final norm.
    Padded rows (``attention_mask``) or packed ones (``positions``): :func:`context`.

    A layer whose gradient checkpointing transformers switched on (``models.enable_checkpointing``) runs
    under its checkpoint function, as ``GradientCheckpointingLayer`` runs it: in training with gradients
    enabled, non-reentrant, the RNG state restored for the recompute (the same dropout masks)."""
    stack = backbone(model)
    hidden = stack.embed_tokens(input_ids) if embeds is None else embeds
    ctx = context(stack, hidden, attention_mask, positions)
    size = hidden.size(-1)
    hidden = hidden.reshape(-1, size)
    for layer in stack.layers[start:stop]:
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            hidden = layer._gradient_checkpointing_func(layer_forward, layer, hidden, ctx)
        else:
            hidden = layer_forward(layer, hidden, ctx)
    return (_norm(stack.norm, hidden) if final_norm else hidden).view(*ctx.shape, size)


def lm_head(model: Any) -> torch.nn.Module:
    """The LM head of a causal LM, under peft's wrappers."""
    return unwrapped(model).lm_head


def logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits (..., V) from final hidden states (..., H): its LM head and its family's logit
    transform (``families.logit_transform``; the identity for Llama)."""
    return logit_transform(model)(lm_head(model)(hidden))


# ---------------------------------------------------------------- decoding with a preallocated cache


def few_row_product(layer: torch.nn.Linear, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``layer(x)``, computed as ``(W @ x.T).T`` where ``x`` has at most ``rows`` rows (a decoding step of a few
    sequences): on CPUs torch's ``linear`` (x @ W.T) runs such near-vector products far below memory bandwidth
    (figures: bench/README.md). The same product in another summation order; more rows take ``linear``."""
    if x.numel() > rows * x.shape[-1]:
        return F.linear(x, layer.weight, layer.bias)
    out = (layer.weight @ x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], layer.weight.shape[0])
    return out if layer.bias is None else out + layer.bias


GEMM_ENV = "IGPT_CPU_GEMM"  # mkl or onednn: which library's packed GEMM a CPU decoding step uses (default: by vendor)


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor as Linux names it (GenuineIntel, AuthenticAMD ...); '' where /proc/cpuinfo does not say.
    Read once a process."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def packed_gemm(vendor: str | None = None) -> str:
    """Which packed GEMM :class:`PackedProduct` uses on this CPU: ``mkl`` (MKL's ``cblas_sgemm_pack``) or
    ``onednn`` (oneDNN's ``_linear_pointwise`` on a weight reordered once), or '' where torch has neither.
    ``IGPT_CPU_GEMM`` chooses; otherwise MKL on Intel CPUs and oneDNN on others. Why: on an AMD EPYC (Zen 3,
    AVX2) MKL's products of a few rows run at a third of the memory's bandwidth, on one thread's worth of speed
    whatever the thread count, and oneDNN's at twice that (every layer of SmolLM2-135M at 16 rows, weights read
    from memory: 182 against 76 ms; bench/README.md), while on an Intel Xeon MKL's packed GEMM was measured ahead
    of torch's own products (oneDNN not measured there)."""
    mkl = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    asked = os.environ.get(GEMM_ENV, "").strip().lower()
    if asked in ("mkl", "onednn"):
        return asked if (mkl if asked == "mkl" else onednn) else ""
    if mkl and (vendor if vendor is not None else cpu_vendor()) == "GenuineIntel":
        return "mkl"
    return "onednn" if onednn else "mkl" if mkl else ""


def can_pack(weight: torch.Tensor) -> bool:
    """Whether :class:`PackedProduct` can hold ``weight``: a plain float32 tensor on a CPU (not an FSDP shard: its
    full weight exists only inside the forward that gathers it), torch built with a packed GEMM
    (:func:`packed_gemm`)."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and type(weight.data) is torch.Tensor
            and bool(packed_gemm()))


class PackedProduct:
    """The products of ``layers`` (one linear layer, or several that read the same input: a layer's q, k and v
    projections, its MLP's gate and up projections) side by side, ``torch.cat([l(x) for l in layers], -1)``,
    for inputs of exactly ``rows`` rows (a decoding step: one token per sequence), by a GEMM on their weights
    stacked and packed once for that shape: ``gemm`` ``mkl``, MKL's ``cblas_sgemm_pack`` (what torch.compile's CPU
    backend uses for frozen float32 weights), or ``onednn``, oneDNN's reordered weight (:func:`packed_gemm` chooses
    one per CPU). Torch's ``linear`` packs a weight again inside every call: with a few rows it
    reads and writes the whole weight twice to multiply it once, so a 135M model's decoding step at 16 rows ran
    at half the memory's bandwidth (bench/README.md); one product for q, k and v is one call where there were
    three. Other inputs (a prompt's forward, another batch size, another dtype) take ``linear``.
    The packed copy is a second copy of the weights in memory while it lives (``rollout.cpu_decoding``: one
    ``generate`` call); the weights must not change meanwhile."""

    def __init__(self, layers: tuple[torch.nn.Linear, ...], rows: int, gemm: str = "mkl"):
        self.layers, self.rows, self.gemm = layers, rows, gemm
        weight = torch.cat([m.weight.detach() for m in layers]) if len(layers) > 1 else layers[0].weight.detach()
        self.width = weight.shape[0]
        self.bias = None if all(m.bias is None for m in layers) else torch.cat(
            [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in layers])
        if gemm == "onednn":  # oneDNN's own layout of the weight, for this batch size
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            return
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        # the op reads its weight argument for the shape only when the input has ``rows`` rows (with others it
        # would fall back to it: never here), so a stacked copy need not stay in memory beside the packed one
        self.shape = weight.new_zeros(1, 1).expand(weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.rows * x.shape[-1] or x.dtype != self.layers[0].weight.dtype:
            outs = [F.linear(x, m.weight, m.bias) for m in self.layers]
            return outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        if self.gemm == "onednn":
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(self.rows, -1), self.packed, self.bias, "none", [], "")
        else:
            out = torch.ops.mkl._mkl_linear(x.reshape(self.rows, -1), self.packed, self.shape, self.bias, self.rows)
        return out.view(*x.shape[:-1], self.width)


# How a decoding step computes a product with a layer where it does not call the layer (:class:`Decoder`)
Product = Callable[[torch.Tensor], torch.Tensor]


class Decoder:
    """Token-by-token logits of a :func:`families.runs_lean` model after left-padded prompts ``ids`` (B, L) with
    ``mask``: :meth:`start` runs the prompts, each :meth:`step` one new token per row. Keys and values of
    every layer live in tensors sized for prompt + ``max_new`` tokens, written in place (transformers'
    dynamic cache concatenates at every step). ``products``: linear layers (projections, LM head) whose
    products it computes its own way instead of calling them (:func:`few_row_product`, :class:`PackedProduct`;
    ``rollout.decoding_products`` chooses them on a CPU); the others are called as they are."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int,
                 products: Mapping[torch.nn.Module, Product] | None = None):
        self.model, self.stack = model, backbone(model)
        self.products = products or {}
        rows, width = ids.shape
        self.size = width + max_new
        self.keys: list[torch.Tensor] = []  # allocated at the first step, in the dtype the keys come in (autocast)
        self.values: list[torch.Tensor] = []
        self.ids, self.mask, self.width, self.length = ids, mask, width, 0
        # a new token attends to every real token before it: a mask only where prompts are left-padded
        full = torch.cat([mask, mask.new_ones(rows, max_new)], 1).bool()
        self.allowed = full[:, None, None, :] if mask_inputs(mask) else None
        # the new tokens' rotary embeddings, all at once
        steps = torch.arange(1, max_new + 1, device=ids.device)
        self.cos, self.sin = rotary(self.stack, self.stack.embed_tokens.weight, position_ids(mask)[:, -1:] + steps)

    def linear(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)``, by its product in ``products`` where it has one (not called then: hooks on it do not
        run)."""
        product = self.products.get(layer)
        return layer(x) if product is None else product(x)

    def fused(self, *layers: torch.nn.Module) -> PackedProduct | None:
        """The one product of ``layers`` side by side, where ``products`` has it (``rollout.decoding_products``)."""
        product = self.products.get(layers[0])
        return product if isinstance(product, PackedProduct) and product.layers == layers else None

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, ...]:
        """:func:`_qkv`; with one product of the three projections, q and k rotated together."""
        fused = self.fused(attn.q_proj, attn.k_proj, attn.v_proj)
        if fused is None:
            return _qkv(attn, x, ctx, self.linear)
        heads, kv = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        out = fused(x).view(*ctx.shape, heads + 2 * kv, attn.head_dim).transpose(1, 2)
        qk = _rotate(out[:, :heads + kv], ctx.cos, ctx.sin)
        return qk[:, :heads], qk[:, heads:], out[:, heads + kv:]

    def mlp(self, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``mlp(x)``; where ``products`` holds one of its projections, ``LlamaMLP.forward`` op for op, each
        projection by :meth:`linear` (gate and up by their one product where there is one)."""
        fused = self.fused(mlp.gate_proj, mlp.up_proj)
        if fused is not None:
            gate, up = fused(x).split(mlp.gate_proj.out_features, -1)
            return self.linear(mlp.down_proj, mlp.act_fn(gate) * up)
        if not any(p in self.products for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            return mlp(x)
        return self.linear(mlp.down_proj, mlp.act_fn(self.linear(mlp.gate_proj, x)) * self.linear(mlp.up_proj, x))

    def _run(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        start, stop = self.length, self.length + ctx.shape[1]
        for i, layer in enumerate(self.stack.layers):
            q, k, v = self.qkv(layer.self_attn, _norm(layer.input_layernorm, hidden), ctx)
            if len(self.keys) == i:
                self.keys.append(k.new_empty(*k.shape[:2], self.size, k.size(-1)))
                self.values.append(v.new_empty(*v.shape[:2], self.size, v.size(-1)))
            keys, values = self.keys[i], self.values[i]
            keys[:, :, start:stop], values[:, :, start:stop] = k, v
            attention = (_one_query_attention if ctx.shape[1] == 1 and q.device.type == "cpu" and q.size(0) >= 16
                         and q.dtype == torch.float32 else _attention)  # (bf16 scores would round before the softmax;
            # fewer rows: SDPA was as fast or faster, 21 against 25 us at 8 rows of a tiny model, 28 against 36 at 1 of
            # SmolLM2's)
            out = attention(layer.self_attn, q, keys[:, :, :stop], values[:, :, :stop], ctx.mask)
            hidden = _finish(layer, hidden, out, self.linear, self.mlp)
        self.length = stop
        last = hidden.view(*ctx.shape, -1)[:, -1]
        return logit_transform(self.model)(self.linear(lm_head(self.model), _norm(self.stack.norm, last)))

    def start(self) -> torch.Tensor:
        """Logits (B, V) for the first new token."""
        hidden = self.stack.embed_tokens(self.ids)
        return self._run(hidden.reshape(-1, hidden.size(-1)), context(self.stack, hidden, self.mask))

    def repeat(self, rows: torch.Tensor, prompt_logits: torch.Tensor) -> torch.Tensor:
        """After :meth:`start` on distinct prompts: batch row i continues prompt ``rows[i]`` from here on (the
        K samples of one prompt share its prefill, ``rollout.sample``); returns the start's ``prompt_logits``
        (U, V) as the rows' (B, V)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.ids, self.mask, self.cos, self.sin = (x.index_select(0, rows) for x in (self.ids, self.mask, self.cos,
                                                                                    self.sin))
        if self.allowed is not None:
            self.allowed = self.allowed.index_select(0, rows)
        return prompt_logits.index_select(0, rows)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for the token after ``tokens`` (B,)."""
        n = self.length - self.width  # new tokens already in the cache
        mask = None if self.allowed is None else self.allowed[..., :self.length + 1]
        ctx = Context(self.cos[:, :, n:n + 1], self.sin[:, :, n:n + 1], mask, (tokens.size(0), 1))
        return self._run(self.stack.embed_tokens(tokens), ctx)
