"""Memory of a training run, component by component, and the peaks of its two phases.

Loading: a quantized base is built on the meta device and each weight quantized as it is read, so loading
holds the quantized model plus one full-precision weight. Training: the steady state of a step —
weights, adapter, gradients, optimizer states — plus the activations kept for backward and the loss's
vocabulary-sized buffers at the end of the forward. Every term says where its formula comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimtune.estimate.activations import ActivationModel, Precision, tokens_of
from slimtune.estimate.model_shapes import AdapterLayout, LinearShape, ModelShape
from slimtune.optim import OPTIMIZER_ALIASES
from slimtune.optim.adamw_8bit import BLOCK_SIZE, MIN_8BIT_SIZE
from slimtune.optim.paged_adamw import MIN_PAGED_SIZE
from slimtune.perf.losses import default_chunk_size, logit_transform
from slimtune.quant.config import QuantConfig
from slimtune.quant.nf4 import NESTED_BLOCKSIZE

__all__ = ["Component", "MemoryModel", "quantized_storage_bytes", "weight_bytes", "optimizer_state_bytes",
           "loss_bytes", "memory_model"]


@dataclass(frozen=True)
class Component:
    key: str  # weights | weights_fp | adapter | gradients | optimizer | activations | logits | overhead | evaluation
    label: str
    bytes: int
    why: str
    on_device: bool = True  # False: kept in host memory (paged optimizer states, offloaded activations)


@dataclass
class MemoryModel:
    components: list[Component]  # the training peak, term by term (host-side terms marked)
    train_peak: int  # on the device, training
    load_peak: int  # on the device, while loading (a quantized base is first loaded in full precision)
    host_extra: int  # bytes in host memory besides the device (paged states, offload) on a GPU
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.load_peak)

    def component(self, key: str) -> int:
        return sum(c.bytes for c in self.components if c.key == key)


def quantized_storage_bytes(lin: LinearShape, quant: QuantConfig) -> int:
    """Bytes of the tensors that encode one quantized weight, exactly as ``QuantizedLinear.storage_bytes``:
    4-bit: packed codes ⌈n/2⌉ + per-block absmax (uint8 with double quantization, plus one fp32 scale per
    256 blocks and the fp32 offset; fp32 without); 8-bit: int8 codes + one fp32 scale per row."""
    n = lin.in_features * lin.out_features
    if quant.bits == 8:
        return n + 4 * lin.out_features
    blocks = -(-n // quant.blocksize)
    if quant.double_quant:
        return (n + 1) // 2 + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4
    return (n + 1) // 2 + 4 * blocks


def _codebook_bytes(quant: QuantConfig) -> int:
    """Per-layer code books held as buffers: 16 fp32 levels (+ the 256-entry dynamic map with DQ)."""
    if quant.bits == 8:
        return 0
    return 16 * 4 + (256 * 4 if quant.double_quant else 0)


def weight_bytes(shape: ModelShape, quant: QuantConfig | None, weight_size: int) -> tuple[int, int, int]:
    """(quantized storage incl. code books, full-precision rest, quantized weight count)."""
    if quant is None:
        return 0, shape.params * weight_size + shape.buffer_bytes, 0
    qlin = shape.quantized_linears(quant)
    n = sum(s.in_features * s.out_features for s in qlin)
    stored = sum(quantized_storage_bytes(s, quant) + _codebook_bytes(quant) for s in qlin)
    return stored, (shape.params - n) * weight_size + shape.buffer_bytes, n


def optimizer_state_bytes(name: str, tensors: list[tuple[str, int]], paged_off_device: bool) -> tuple[int, int]:
    """(bytes on the device, bytes in host memory) of the optimizer's state for ``tensors`` (fp32 params).

    adamw: exp_avg + exp_avg_sq, 2 × 4 B per weight. adamw_8bit: 2 × (1 B + 4 B / 256) per weight for tensors
    of ≥ 4096 elements, fp32 below. Paged kinds on a GPU keep the states of tensors ≥ 1e5 elements in host
    memory (see slimtune.optim).
    """
    key = OPTIMIZER_ALIASES.get(name.lower(), name.lower())
    device = host = 0
    for _, n in tensors:
        if "8bit" in key and n >= MIN_8BIT_SIZE:
            size = 2 * (n + 4 * -(-n // BLOCK_SIZE))
        else:
            size = 2 * 4 * n
        if key.startswith("paged") and paged_off_device and n >= MIN_PAGED_SIZE:
            host += size
        else:
            device += size
    return device, host


def _optimizer_step_transient(name: str, tensors: list[tuple[str, int]], foreach: bool) -> int:
    """Temporaries of one optimizer step: the fp32 denominator (and, 8-bit, the decoded moments) of the
    largest tensor; torch's foreach AdamW (its default on a GPU) builds them for all tensors at once."""
    key = OPTIMIZER_ALIASES.get(name.lower(), name.lower())
    largest = max((n for _, n in tensors), default=0)
    total = sum(n for _, n in tensors)
    if key == "adamw" and foreach:
        return 2 * 4 * total
    return (3 if "8bit" in key else 1) * 4 * largest


def loss_bytes(shape: ModelShape, tokens: int, label_tokens: int, chunked: bool, prec: Precision,
               forward_only: bool = False) -> tuple[int, str]:
    """Peak bytes of the loss at the end of the forward, and why.

    Full: logits ``(tokens, V)`` in the head's dtype, their label rows copied (and upcast to fp32 under
    autocast), log_softmax's fp32 output; in backward the saved output, two fp32 gradients of it and the
    full-size gradient of the logits. Chunked (slimtune.perf.losses): per chunk of
    ``C = 256 MiB / (4 V)`` label tokens the fp32 logits (softmax and its gradient are written into them), plus
    the gradient of the hidden states kept for backward; a softcapped model (Gemma 2/3) holds the capped logits
    beside the raw ones (whose buffer keeps the cap's slope for backward).
    """
    v, n = shape.vocab, label_tokens
    if chunked:
        c = min(n, default_chunk_size(v))
        extra = c * v * 2 if prec.autocast else 0
        extra += c * v * 4 if logit_transform(shape.meta).softcap is not None else 0
        cast = v * shape.hidden * 2 if prec.autocast and prec.weight == 4 else 0
        total = c * v * 4 + extra + cast + tokens * shape.hidden * prec.weight + c * shape.hidden * 4
        return total, f"chunked cross-entropy: {c:,} tokens × {v:,} vocab fp32 logits"
    e_l = prec.matmul
    forward = tokens * v * e_l + n * v * e_l + (n * v * 4 if e_l != 4 else 0) + n * v * 4
    backward = 0 if forward_only else max(3 * n * v * 4, n * v * 4 + tokens * v * e_l + n * v * e_l)
    return max(forward, backward), f"full-vocabulary logits: {tokens:,} tokens × {v:,} vocab ({e_l} B) + fp32 " \
                                   "log-softmax and its gradients"


def memory_model(shape: ModelShape, layout: AdapterLayout, acts: ActivationModel, *, quant: QuantConfig | None,
                 prec: Precision, optim: str, batch: int, seq: int, chunked: bool, on_gpu: bool,
                 overhead: list[Component], heap_retention: float, eval_batch: int = 0) -> MemoryModel:
    """Put the terms together; ``overhead`` are the device's fixed terms, ``heap_retention`` the share of the
    step's transient memory the allocator keeps on top (glibc's heap on CPU, the caching allocator's slack
    on a GPU); ``eval_batch`` the rows per evaluation batch (0: no evaluation), whose pass may peak higher."""
    stored, full_rest, n_quant = weight_bytes(shape, quant, prec.weight)
    comps: list[Component] = []
    dtype = {4: "fp32", 2: "16-bit"}[prec.weight]
    if quant is not None:
        kind = f"NF4{' + double quant' if quant.double_quant else ''}" if quant.bits == 4 and \
            quant.quant_type == "nf4" else ("FP4" if quant.bits == 4 else "int8 row-wise")
        bits = 8 * stored / max(n_quant, 1)
        comps.append(Component("weights", f"weights, {quant.bits}-bit", stored,
                               f"{n_quant:,} weights of {len(shape.quantized_linears(quant))} linear layers as "
                               f"{kind}, blocksize {quant.blocksize}: {bits:.3f} bits/weight incl. scales"))
        rest = shape.params - n_quant
        experts = f", {shape.fused_expert_params:,} of them in fused experts" if shape.fused_expert_params else ""
        comps.append(Component("weights_fp", f"weights kept {dtype}", full_rest,
                               f"{rest:,} params: embeddings, norms, the output head{' (tied)' if shape.tied else ''}"
                               f" and skipped layers × {prec.weight} B{experts}"))
    else:
        comps.append(Component("weights", f"weights, {dtype}", full_rest, f"{shape.params:,} params × {prec.weight} B"))
    adapter = layout.trainable_bytes + layout.frozen_bytes
    comps.append(Component("adapter", "adapter parameters", adapter,
                           f"{layout.trainable_params:,} trainable ({layout.peft_type}) × 4 B"
                           + (f" + {layout.frozen_bytes:,} B frozen" if layout.frozen_bytes else "")))
    comps.append(Component("gradients", "gradients", layout.trainable_bytes,
                           "one fp32 gradient per trainable param (kept across accumulation micro-batches)"))
    state_dev, state_host = optimizer_state_bytes(optim, layout.trainable, paged_off_device=on_gpu)
    comps.append(Component("optimizer", f"optimizer states ({optim})", state_dev,
                           _optimizer_why(optim)
                           + (f"; {human(state_host)} paged to host memory" if state_host else "")))
    if state_host:
        comps.append(Component("optimizer", "optimizer states paged to host", state_host,
                               "pinned host memory, fetched per tensor for its update", on_device=False))
    tokens = tokens_of(batch, seq, layout)
    # every text position but the last of a row is scored (an upper bound); prompt tuning's virtual tokens get
    # logits too (in ``tokens``) but no labels: the loss copies and log-softmaxes the text's rows only
    label_tokens = max(batch * (seq - 1), 1)
    logits, logits_why = loss_bytes(shape, tokens, label_tokens, chunked, prec)
    on_path = sum(1 for b in acts.per_layer if b)
    if acts.recompute_layer:
        kept = "each layer's input offloaded to host" if acts.offloaded else "each layer's input kept"
        comps.append(Component("activations", "activations (checkpointed)", acts.saved,
                               f"gradient checkpointing: {kept} ({on_path} layers × {tokens:,} tokens × "
                               f"{shape.hidden} × {prec.weight} B) + final norm"))
        if acts.offloaded:
            comps.append(Component("activations", "checkpointed inputs in host memory", acts.offloaded,
                                   "pinned host memory, copied back before each layer's recomputation",
                                   on_device=False))
    else:
        comps.append(Component("activations", "activations kept for backward", acts.saved,
                               f"{on_path} layers × {human(max(acts.per_layer, default=0))} at {tokens:,} tokens "
                               f"(batch {batch} × seq {seq})"))
    if layout.adapted_weights:  # W + s·B A, one copy per block kept for backward (one at a time when recomputed)
        each = [n * prec.weight for n in layout.adapted_weights]
        comps.append(Component("activations", "adapted weights kept for backward", max(each) if acts.recompute_layer
                               else sum(each), f"target_parameters: {len(each)} blocks' adapted weights × "
                               f"{prec.weight} B" + (" (one block at a time: recomputed)" if acts.recompute_layer
                                                     else "")))
    comps.append(Component("logits", "loss (chunked)" if chunked else "loss (full logits)", logits, logits_why))
    dequant = 0
    if quant is not None and not prec.triton:
        qlin = shape.quantized_linears(quant)
        if on_gpu:  # pure-torch path on a GPU: a decoded weight per matmul, freed after it
            dequant = max((q.in_features * q.out_features for q in qlin), default=0) * (4 + prec.matmul)
        else:  # CPU: one reused fp32 decode buffer per weight size (slimtune.quant.linear.scratch_buffer)
            sizes = {2 * ((q.in_features * q.out_features + 1) // 2) for q in qlin}
            comps.insert(2, Component("weights", "4-bit decode buffers", 4 * sum(sizes),
                                      f"{len(sizes)} reused fp32 buffers, one per distinct weight size"))
    working = acts.backward_working + acts.recompute_layer + dequant
    why = "gradients inside one layer" + (" + that layer's recomputed activations" if acts.recompute_layer else "") \
        + (" + one decoded 4-bit weight" if dequant else "") + f" ({human(working)}), beyond the loss buffers"
    comps.append(Component("backward", "backward working set", max(0, working - logits), why))
    comps += overhead
    retained = int(heap_retention * (acts.saved + max(logits, working)))
    if retained:
        comps.append(Component("overhead", "allocator slack", retained,
                               f"{heap_retention:.0%} of the step's activation and loss memory, kept by the allocator"))
    phase = sum(c.bytes for c in comps if c.on_device)
    static = sum(c.bytes for c in comps if c.on_device and c.key in ("weights", "weights_fp", "adapter", "optimizer",
                                                                     "gradients", "overhead"))
    step = static + _optimizer_step_transient(optim, layout.trainable, foreach=on_gpu)
    if step > phase:
        comps.append(Component("optimizer_step", "optimizer step temporaries", step - phase,
                               "the update's temporaries exceed the forward/backward peak"))
    train_peak = sum(c.bytes for c in comps if c.on_device)
    if eval_batch:
        extra = _evaluation_excess(shape, layout, acts, comps, prec, chunked, eval_batch, seq, tokens) - train_peak
        if extra > 0:
            comps.append(Component("evaluation", f"evaluation pass (batch {eval_batch})", extra,
                                   "the no-grad evaluation peaks above the training step: its loss over "
                                   f"{eval_batch} × {seq} tokens and one layer's activations, beside the weights "
                                   "and optimizer states (gradients are freed)"))
            train_peak += extra
    load_peak = 0
    if quant is not None and shape.fused_expert_params:  # read whole in full precision, then quantized
        load_peak = shape.params * prec.weight + sum(c.bytes for c in overhead if c.on_device)
    elif quant is not None:  # streamed: each weight is read in full precision, quantized, then freed
        largest = max((q.in_features * q.out_features for q in shape.quantized_linears(quant)), default=0)
        load_peak = stored + full_rest + largest * 4 + sum(c.bytes for c in overhead if c.on_device)
    host = sum(c.bytes for c in comps if not c.on_device)
    return MemoryModel(comps, train_peak, load_peak, host, list(acts.notes))


def _evaluation_excess(shape: ModelShape, layout: AdapterLayout, acts: ActivationModel, comps: list[Component],
                       prec: Precision, chunked: bool, eval_batch: int, seq: int, train_tokens: int) -> int:
    """Peak bytes of an evaluation pass: what stays allocated (weights, adapter, optimizer states, fixed
    overhead) + the forward's loss at the evaluation batch + one layer's forward activations + hidden states."""
    tokens = tokens_of(eval_batch, seq, layout)
    loss, _ = loss_bytes(shape, tokens, max(eval_batch * (seq - 1), 1), chunked, prec, forward_only=True)
    layer = -(-max(acts.per_layer, default=0) * tokens // max(train_tokens, 1))
    kept = sum(c.bytes for c in comps if c.on_device and (c.key in ("weights", "weights_fp", "adapter", "optimizer")
                                                           or (c.key == "overhead" and c.label != "allocator slack")))
    return kept + loss + layer + 2 * tokens * shape.hidden * prec.weight


def _optimizer_why(optim: str) -> str:
    key = OPTIMIZER_ALIASES.get(optim.lower(), optim.lower())
    if "8bit" in key:
        return "2 moments × (1 B + 4 B/256 absmax) per weight; tensors < 4096 elements: 2 × 4 B"
    return "2 moments (exp_avg, exp_avg_sq) × 4 B per weight"


def human(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"
