"""Step time: FLOPs of the forward, backward and recomputation over the device's matmul rate, bytes moved
(4-bit decoding, element-wise ops, the optimizer) over its bandwidth, and a dispatch cost per op.

Per micro-batch of ``t`` tokens (``n`` of them scored), for each linear ``(in, out)`` of the decoder:

    forward    2·t·in·out            base matmul              + 2·t·r·(in + out)   LoRA's A and B
    backward   2·t·in·out            dL/dx only (frozen base) + 4·t·r·(in + out)   dA, dB and dx
    recompute  the forward again, for checkpointed layers

attention ``2·B·S²·heads·head_dim`` forward (QKᵀ and AV, causal half), 2.5× that backward (flash
attention's recomputation); the output head ``2·n·hidden·vocab`` each way (only label rows with the
chunked loss, every row without). Each matmul takes ``max(FLOPs / FLOP/s, bytes / bandwidth)`` (a roofline:
skinny LoRA products are bandwidth-bound). A 4-bit base is decoded for every pass that touches it
(forward, backward, recompute): ``weights × DEQUANT_BYTES_PER_WEIGHT`` bytes at the decode bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.estimate.activations import ROLES, Precision, tokens_of
from slimtune.estimate.devices import DEQUANT_BYTES_PER_WEIGHT, DeviceProfile
from slimtune.estimate.model_shapes import AdapterLayout, ModelShape
from slimtune.optim import OPTIMIZER_ALIASES
from slimtune.quant.config import QuantConfig

__all__ = ["StepTime", "step_time", "TRITON_BYTES_PER_WEIGHT"]

TRITON_BYTES_PER_WEIGHT = 0.5 + 1 / 64  # packed codes + one uint8 scale per 64-weight block


@dataclass
class StepTime:
    forward_flops: float
    backward_flops: float
    recompute_flops: float
    matmul_seconds: float
    dequant_bytes: float
    dequant_seconds: float
    elementwise_bytes: float
    elementwise_seconds: float
    optimizer_seconds: float
    ops: int
    overhead_seconds: float
    micro_batches: int
    tokens: int  # per optimizer step

    @property
    def seconds(self) -> float:
        return self.matmul_seconds + self.dequant_seconds + self.elementwise_seconds + self.optimizer_seconds + \
            self.overhead_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class _Matmuls:
    def __init__(self, device: DeviceProfile, elem: int) -> None:
        self.device, self.elem = device, elem
        self.flops = 0.0
        self.seconds = 0.0
        self.count = 0

    def add(self, m: int, k: int, n: int, times: float = 1.0) -> None:
        """``times`` products of ``(m, k) @ (k, n)``."""
        flops = 2.0 * m * k * n
        moved = (m * k + k * n + m * n) * self.elem
        self.flops += flops * times
        self.seconds += max(flops / self.device.matmul_flops, moved / self.device.bandwidth) * times
        self.count += int(round(times))


def _role(name: str) -> str | None:
    parts = name.rsplit(".", 2)
    last, two = parts[-1], ".".join(parts[-2:])
    return next((r for r, names in ROLES.items() if last in names or two in names), None)


def step_time(shape: ModelShape, layout: AdapterLayout, device: DeviceProfile, prec: Precision, *, batch: int,
              seq: int, accumulation: int, checkpointing: bool, quant: QuantConfig | None, chunked: bool,
              optim: str) -> StepTime:
    """Seconds of one optimizer step (``accumulation`` micro-batches of ``batch × seq`` tokens at full length)."""
    t = tokens_of(batch, seq, layout)
    n = max(t - batch, 1)
    s = seq + layout.virtual_tokens
    first = 0 if layout.embedding_trainable else min(layout.adapted_layers, default=shape.layers)
    wrapped = {w.name: w for w in layout.wrapped}
    quantized = {q.name for q in shape.quantized_linears(quant)}
    fwd, bwd, rec = (_Matmuls(device, prec.matmul) for _ in range(3))
    dequant = elementwise = 0.0
    ops = 0
    # the Triton kernels decode inside the matmul: only the packed codes and scales are read
    beta = TRITON_BYTES_PER_WEIGHT if prec.triton else DEQUANT_BYTES_PER_WEIGHT[2 if prec.autocast else 4]
    e_h = prec.weight
    for lin in shape.linears:
        if lin.name == shape.head_name:
            continue
        index = _layer_index(lin.name, shape.block_prefix)
        on_path = index is not None and index >= first
        needs_dx = on_path and not (index == first and not layout.embedding_trainable and _role(lin.name) == "attn_in")
        passes = 1 + int(needs_dx) + int(on_path and bool(checkpointing))
        fwd.add(t, lin.in_features, lin.out_features)
        if needs_dx:
            bwd.add(t, lin.out_features, lin.in_features)
        if on_path and checkpointing:
            rec.add(t, lin.in_features, lin.out_features)
        ops += passes
        if lin.name in quantized:
            decodes = passes - int(needs_dx and prec.keep_dequantized and not prec.triton)  # backward reuses it
            dequant += decodes * lin.in_features * lin.out_features * beta
            casts = int(prec.autocast or e_h != 4)  # the input to the compute dtype, the output back
            elementwise += passes * t * (lin.in_features + lin.out_features) * (e_h + 2) * casts
            ops += 4 * passes
        elif prec.autocast and e_h == 4:
            elementwise += passes * lin.in_features * lin.out_features * 6  # the bf16 cast of the frozen weight
        w = wrapped.get(lin.name)
        if w is not None and w.rank:
            for mm in (fwd, rec) if checkpointing and on_path else (fwd,):
                mm.add(t, lin.in_features, w.rank)
                mm.add(t, w.rank, lin.out_features)
            bwd.add(t, lin.out_features, w.rank, 2.0)  # dL/d(Ax) = g Bᵀ, dB = gᵀ (Ax)
            bwd.add(w.rank, t, lin.in_features, 2.0 if w.trains_input_factor else 1.0)  # dA, and dx via A
            fused = prec.fused and w.fusable  # one node: no separate scale, add and cast passes
            per_pass = (lin.out_features * 4 + 4 * lin.in_features if fused else
                        5 * lin.out_features * 4 + (16 * lin.in_features if w.dropout else 0)
                        + (6 * lin.in_features if prec.autocast else 0))
            elementwise += t * per_pass * (3 + int(bool(checkpointing)))
            ops += (3 if fused else 8) * (3 + int(bool(checkpointing)))
            if w.kind == "DoraLinear":
                fwd.add(lin.out_features, lin.in_features, w.rank)  # W Aᵀ for the row norms
                elementwise += 3 * t * lin.out_features * 4 * 3
        elif w is not None:
            elementwise += 3 * t * (lin.in_features + 2 * lin.out_features) * 4 * 3
            ops += 20
    e_g = e_h if quant is not None else prec.matmul
    heads_dim = shape.heads * shape.head_dim
    for index in range(shape.layers):
        on_path = index >= first
        passes = 1 + 2 * int(on_path) + int(on_path and bool(checkpointing))
        attn = 2.0 * batch * s * s * heads_dim  # QKᵀ and AV of a causal mask: half of 4·B·S²·h·d
        fwd.flops += attn
        fwd.seconds += attn / device.matmul_flops
        if on_path:
            bwd.flops += 2.5 * attn
            bwd.seconds += 2.5 * attn / device.matmul_flops
            if checkpointing:
                rec.flops += attn
                rec.seconds += attn / device.matmul_flops
        per_token = (48 * shape.hidden + 6 * shape.hidden * e_h + 13 * (shape.heads + shape.kv_heads)
                     * shape.head_dim * (2 if prec.autocast else e_h) + 5 * shape.intermediate * e_g)
        elementwise += t * per_token * passes
        ops += 40 * passes
    head_rows = n if chunked else t
    head_trains = any(shape.head_name is not None and name.startswith(shape.head_name) for name, _ in layout.trainable)
    fwd.add(head_rows, shape.hidden, shape.vocab)
    bwd.add(head_rows, shape.vocab, shape.hidden, 2.0 if head_trains else 1.0)
    elementwise += n * shape.vocab * 4 * (10 if chunked else 12)
    optimizer_bytes = layout.trainable_params * (120 if "8bit" in OPTIMIZER_ALIASES.get(optim, optim) else 80)
    optimizer_ops = 14 * len(layout.trainable)
    matmul = fwd.seconds + bwd.seconds + rec.seconds
    micro_ops = ops + fwd.count + bwd.count + rec.count
    dispatch = micro_ops * device.op_overhead
    if device.on_gpu:  # kernels launch asynchronously: dispatch only shows where it outruns the GPU's work
        work = matmul + dequant / device.dequant_bandwidth + elementwise / device.bandwidth
        dispatch = max(0.0, dispatch - work)
    return StepTime(
        forward_flops=fwd.flops, backward_flops=bwd.flops, recompute_flops=rec.flops,
        matmul_seconds=matmul * accumulation,
        dequant_bytes=dequant * accumulation, dequant_seconds=dequant / device.dequant_bandwidth * accumulation,
        elementwise_bytes=elementwise * accumulation, elementwise_seconds=elementwise / device.bandwidth * accumulation,
        optimizer_seconds=optimizer_bytes / device.bandwidth + optimizer_ops * device.op_overhead,
        ops=micro_ops * accumulation + optimizer_ops,
        overhead_seconds=dispatch * accumulation,
        micro_batches=accumulation, tokens=t * accumulation)


def _layer_index(name: str, prefix: str) -> int | None:
    if not prefix or not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None
