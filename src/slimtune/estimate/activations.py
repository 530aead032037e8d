"""Activation memory: the tensors autograd keeps from the forward for the backward, layer by layer.

Counted the way PyTorch actually saves them for a decoder block of the Llama family (Llama, Mistral,
Qwen2, SmolLM2: RMSNorm, q/k/v/o, rotary, SDPA, gate/up/down with SiLU) under slimtune's layers:

- RMSNorm keeps its fp32 input and the per-token ``rsqrt`` (only when its input requires grad);
- a frozen base linear keeps nothing of its input (its weight gets no gradient); under bf16 autocast
  a full-precision frozen weight is cast to bf16 and that copy IS kept (for the input's gradient);
  a 4-bit / 8-bit base keeps nothing (the weight is dequantized again in backward, as QLoRA);
- a LoRA layer keeps the input of A (shared by q/k/v and by gate/up unless cast per layer), with dropout
  a one-byte keep mask (slimtune.core.dropout), and ``A x`` (size r); DoRA, whose forward is its own,
  torch's dropout output and float mask, and the ``(W x + s B A x)`` it rescales; LoRA-FA nothing of
  size ``in`` (A is frozen);
- SDPA keeps q, k, v, its output and the log-sum-exp (k and v at the key/value head count or repeated, and a
  causal mask or none, as :mod:`slimtune.estimate.sdpa_probe` finds the installed transformers doing);
  SwiGLU keeps gate, SiLU(gate) and up.

The decoder-block model was checked tensor by tensor against ``torch.autograd.graph.saved_tensors_hooks``
on a real model (tests/estimate). Other architectures reuse it by linear-layer role (an approximation,
said so in the report).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.estimate.model_shapes import AdapterLayout, LinearShape, ModelShape, WrappedLinear
from slimtune.estimate.sdpa_probe import sdpa_layout

__all__ = ["Precision", "ActivationModel", "activation_model", "tokens_of", "ROLES"]

# Linear layers by their role in a decoder block, by the module's last name (parent.name for GPT-2's c_proj).
ROLES = {
    "attn_in": ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv"),
    "attn_out": ("o_proj", "attn.c_proj", "attention.dense", "self_attention.dense", "out_proj"),
    "mlp_in": ("gate_proj", "up_proj", "gate_up_proj", "c_fc", "dense_h_to_4h", "fc1", "w1", "w3"),
    "mlp_out": ("down_proj", "mlp.c_proj", "dense_4h_to_h", "fc2", "w2"),
}


@dataclass(frozen=True)
class Precision:
    """How the step computes: element sizes, autocast, the quantized base, the fast path."""

    weight: int  # bytes per element of model.dtype: 4 for float32, 2 for bfloat16 / float16
    autocast: bool  # bf16 mixed precision (the trainer's default on a GPU)
    quantized: bool
    fused: bool = False  # the fast path's fused LoRA nodes (kernels: auto on a GPU or a CPU)
    triton: bool = False  # the fast path's Triton 4-bit matmuls on a GPU (no decoded weight)
    keep_dequantized: bool = False  # training.keep_dequantized: decoded 4-bit weights kept for backward

    @property
    def matmul(self) -> int:
        return 2 if self.autocast else self.weight


@dataclass
class ActivationModel:
    saved: int  # bytes kept for backward at the end of the forward (every layer + outside the layers)
    per_layer: list[int]  # bytes each decoder layer keeps (without checkpointing)
    kept_inputs: int  # with checkpointing: the layer inputs kept on the device instead (0 without)
    offloaded: int  # with checkpointing "offload" on a GPU: the layer inputs kept in host memory
    recompute_layer: int  # with checkpointing: the largest layer re-run in backward
    backward_working: int  # gradient tensors alive at once inside a layer's backward
    notes: list[str]


def _role(block_relative: str) -> str | None:
    last = block_relative.rsplit(".", 1)[-1]
    two = ".".join(block_relative.rsplit(".", 2)[-2:])
    for role, names in ROLES.items():
        if two in names or last in names:
            return role
    return None


class _Layer:
    """Bytes kept by one decoder layer, with shared inputs counted once (keyed by tensor role)."""

    def __init__(self, tokens: int, prec: Precision) -> None:
        self.t, self.p = tokens, prec
        self.bytes = 0
        self.shared: set[str] = set()

    def keep(self, n: int) -> None:
        self.bytes += n

    def keep_shared(self, key: str, n: int) -> None:
        if key not in self.shared:
            self.shared.add(key)
            self.bytes += n

    def linear(self, lin: LinearShape, wrapped: WrappedLinear | None, x_key: str, x_size: int,
               input_grad: bool) -> None:
        """What one (possibly wrapped) linear keeps; ``x_size`` is its input's element size."""
        t, p = self.t, self.p
        n_in, n_out = t * lin.in_features, t * lin.out_features
        lora = 2 if p.autocast else 4
        if p.quantized and p.keep_dequantized and not p.triton and input_grad:
            self.keep(lin.in_features * lin.out_features * (2 if p.autocast else x_size))  # training.keep_dequantized
        if wrapped is not None and wrapped.fusable and p.fused:
            # one fused node (slimtune.perf.fused_lora): keeps the input as given (shared with its siblings)
            # and A x; the dropout mask is regenerated from a seed, the weights are cast or decoded again
            if wrapped.trains_input_factor:
                self.keep_shared(x_key, n_in * x_size)
            self.keep(t * wrapped.rank * lora)
            return
        if p.autocast and not p.quantized and p.weight == 4 and input_grad:
            self.keep(lin.in_features * lin.out_features * 2)  # bf16 copy of the frozen weight, for dL/dx
        if wrapped is None:
            return
        if wrapped.kind == "LokrLinear":  # W1 (X W2ᵀ): the input and X W2ᵀ, and factors built from two
            w1_built, w2_built = wrapped.kept_per_call
            self.keep_shared(x_key, n_in * x_size)
            self.keep((t * wrapped.kept_per_token + w1_built + (w2_built if input_grad else 0)) * 4)
            return
        if wrapped.kind == "LohaLinear":
            self.keep_shared(x_key, n_in * x_size)
            self.keep(lin.in_features * lin.out_features * 4)  # the Hadamard product weight
            return
        if wrapped.rank == 0:  # VeRA, IA3, bottleneck, ...: the input and one output-sized tensor
            self.keep_shared(x_key, n_in * x_size)
            self.keep(n_out * 4)
            return
        masked = wrapped.dropout > 0 and wrapped.mask_dropout  # slimtune.core.dropout.dropout_then_linear
        if wrapped.trains_input_factor:
            if masked:  # the input (cast to fp32 when it is not) and a one-byte keep mask
                if x_size == 4:
                    self.keep_shared(x_key, n_in * 4)
                else:
                    self.keep(n_in * 4)
                self.keep(n_in)
            elif wrapped.dropout > 0:
                if input_grad:
                    self.keep(n_in * 4)  # dropout's mask (fp32: input * mask / (1 - p))
                self.keep(n_in * lora)  # the dropped-out input of A (its bf16 cast under autocast)
            elif p.autocast:
                self.keep(n_in * 2)  # each layer casts the input to bf16 for A
            elif x_size != 4:
                self.keep(n_in * 4)  # x.to(float32): a copy per layer
            else:
                self.keep_shared(x_key, n_in * 4)  # the very input tensor, shared by its siblings
        self.keep(t * wrapped.rank * lora)  # A x, for B's gradient
        if p.autocast:  # bf16 casts of B (and of A, unless A ran inside the masked-dropout node)
            self.keep(wrapped.rank * (lin.out_features + (0 if masked else lin.in_features)) * 2)
        if wrapped.kind == "DoraLinear":
            self.keep(n_out * 4 + 2 * lin.out_features * 4)  # W x + s B A x, and m / ||W'||


def _block_linears(shape: ModelShape, index: int) -> list[tuple[str, LinearShape]]:
    prefix = f"{shape.block_prefix}.{index}."
    return [(s.name[len(prefix):], s) for s in shape.linears if s.name.startswith(prefix)]


def _layer_bytes(shape: ModelShape, index: int, wrapped: dict[str, WrappedLinear], tokens: int, prec: Precision,
                 input_grad: bool, batch: int = 1) -> int:
    """Bytes decoder layer ``index`` keeps; ``input_grad``: whether its input requires grad."""
    t, h = tokens, shape.hidden
    e_h = prec.weight  # the residual stream's dtype is the model's
    layer = _Layer(tokens, prec)
    if input_grad:
        layer.keep(t * h * 4 + t * 4)  # input RMSNorm: fp32 input and rsqrt
    # q/k/v, then o, outputs: the base's dtype (4/8-bit bases return the input's dtype)
    out_size = e_h if prec.quantized else prec.matmul
    sdpa = 2 if prec.autocast else out_size
    by_role: dict[str, list[tuple[str, LinearShape]]] = {role: [] for role in ROLES}
    for rel, lin in _block_linears(shape, index):
        role = _role(rel)
        if role is not None:
            by_role[role].append((rel, lin))
    for _, lin in by_role["attn_in"]:
        layer.linear(lin, wrapped.get(lin.name), "attn_in", e_h, input_grad)
    heads, kv, d = shape.heads, shape.kv_heads, shape.head_dim
    sdpa_keeps = sdpa_layout()  # what the installed transformers keeps (see sdpa_probe)
    kv_kept = heads if sdpa_keeps.kv_repeated else kv
    layer.keep(t * (2 * heads + 2 * kv_kept) * d * sdpa + t * heads * 4)  # SDPA: q, k, v, out; fp32 log-sum-exp
    if sdpa_keeps.mask_kept:
        layer.keep(batch * (t // batch) ** 2 * sdpa)  # the causal mask, cast to the dtype SDPA runs in
    layer.shared.add("attn_out")  # o_proj's input IS the SDPA output kept above
    for _, lin in by_role["attn_out"]:
        layer.linear(lin, wrapped.get(lin.name), "attn_out", sdpa, True)
    layer.keep(t * h * 4 + t * 4)  # post-attention RMSNorm
    for _, lin in by_role["mlp_in"]:
        layer.linear(lin, wrapped.get(lin.name), "mlp_in", e_h, True)
    inter = shape.intermediate
    if shape.gated_mlp:
        layer.keep(3 * t * inter * out_size)  # gate (for SiLU), SiLU(gate) and up (for their product)
    else:
        layer.keep(2 * t * inter * out_size)  # pre-activation and activation (GELU variants keep more)
    for _, lin in by_role["mlp_out"]:
        layer.linear(lin, wrapped.get(lin.name), "mlp_out", out_size, True)
    return layer.bytes


def activation_model(shape: ModelShape, layout: AdapterLayout, batch: int, seq: int, prec: Precision,
                     checkpointing: bool | str, on_gpu: bool = False) -> ActivationModel:
    """Activation bytes of one micro-batch of ``batch × seq`` tokens (all rows at full length)."""
    tokens = tokens_of(batch, seq, layout)
    wrapped = {w.name: w for w in layout.wrapped}
    first = 0 if layout.embedding_trainable else min(layout.adapted_layers, default=shape.layers)
    per_layer = []
    for i in range(shape.layers):
        on_path = i >= first
        per_layer.append(_layer_bytes(shape, i, wrapped, tokens, prec, input_grad=i > first or (
            i == first and layout.embedding_trainable), batch=batch) if on_path else 0)
    notes = []
    if not any(_role(rel) for rel, _ in _block_linears(shape, 0)):
        notes.append(f"{shape.model_type}: linear layer names not recognised; activations are a rough guess")
    elif shape.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        notes.append(f"{shape.model_type}: activations follow the Llama block model (approximate)")
    # outside the layers: the final norm's fp32 input and rsqrt; the rotary cos/sin every layer shares (kept by
    # the layers' own graphs, so not under checkpointing, where the layers run without one)
    outside = 0
    if first < shape.layers:
        outside = tokens * shape.hidden * 4 + tokens * 4 + (0 if checkpointing else
                                                            2 * tokens * shape.head_dim * prec.weight)
    e_h = prec.weight
    kept_inputs = offloaded = 0
    recompute = max(per_layer, default=0)
    if checkpointing:
        inputs = sum(1 for b in per_layer if b) * tokens * shape.hidden * e_h
        # "offload" moves the kept inputs to pinned host memory on a GPU; on a CPU they stay where they are
        kept_inputs, offloaded = (0, inputs) if checkpointing == "offload" and on_gpu else (inputs, 0)
        saved = kept_inputs + outside
    else:
        saved = sum(per_layer) + outside
    inter_size = e_h if prec.quantized else prec.matmul
    working = 3 * tokens * shape.intermediate * inter_size + 2 * tokens * shape.hidden * 4
    return ActivationModel(saved=saved, per_layer=per_layer, kept_inputs=kept_inputs, offloaded=offloaded,
                           recompute_layer=recompute if checkpointing else 0, backward_working=working, notes=notes)


def tokens_of(batch: int, seq: int, layout: AdapterLayout) -> int:
    """Tokens per micro-batch through the decoder: prompt tuning / P-tuning prepend their virtual tokens."""
    return batch * (seq + layout.virtual_tokens)
