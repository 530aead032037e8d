"""Per-rank memory of a distributed run (``slimtune estimate RECIPE --nproc-per-node N``), from the one-process
model of :mod:`.memory`, as :mod:`slimtune.distributed` runs it:

- **ddp**: every rank holds the whole model, and DistributedDataParallel keeps its gradient buckets (a second
  fp32 copy of the trainable gradients, reduced bucket by bucket).
- **fsdp**: FSDP2 shards the decoder blocks' weights and the adapter (parameters, gradients, optimizer states)
  over the N ranks; the root's frozen tensors (embeddings, final norm, a frozen output head) stay whole on
  every rank (:func:`slimtune.distributed.wrap._replicated_root`); during the step one decoder block is
  gathered for its forward or backward while the next is prefetched (two blocks whole). With a 4-bit base and a
  method that does not read the base when added, each rank loads only its own rows, so loading holds the
  rank's share. ``cpu_offload`` (GPUs): the shards live in host memory, and the root is sharded and gathered too.
- Activations, the loss buffers and the process/context overhead are per rank as in one process
  (``training.batch_size`` is per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from slimtune.distributed.wrap import strategy_for_bytes, why_not_per_rank
from slimtune.estimate.memory import Component, MemoryModel, human
from slimtune.estimate.model_shapes import ModelShape
from slimtune.train.recipe import DistributedSection, Recipe

__all__ = ["Distribution", "distribution", "per_rank", "loads_per_rank"]

PREFETCHED_BLOCKS = 2  # FSDP2: the block being computed and the next one, gathered ahead


@dataclass(frozen=True)
class Distribution:
    strategy: str  # "ddp" or "fsdp"
    ranks: int  # in the whole run
    cpu_offload: bool
    per_machine: int  # ranks sharing one machine's memory (a CPU run: all the ranks of a node)

    def __str__(self) -> str:
        offload = " with CPU offload" if self.cpu_offload else ""
        return f"{self.strategy}{offload} over {_ranks(self.ranks)}: memory per rank"


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def distribution(recipe: Recipe, ranks: int, stored_bytes: int, device_memory: int, on_gpu: bool,
                 per_machine: int | None = None) -> Distribution:
    """The strategy ``slimtune train --nproc-per-node ranks`` would use (``auto`` as
    :func:`slimtune.distributed.wrap.choose_strategy`: fsdp when the stored weights exceed ``fsdp_fraction`` of
    one device's memory). ``per_machine``: the ranks on one node (default: all of them)."""
    if ranks < 1:
        raise ValueError(f"--nproc-per-node {ranks}: the number of ranks must be at least 1.")
    settings = recipe.distributed or DistributedSection()
    strategy: str = settings.strategy
    if strategy == "auto":
        strategy = strategy_for_bytes(stored_bytes, device_memory, settings.fsdp_fraction)
    return Distribution(strategy, ranks, settings.cpu_offload and strategy == "fsdp" and on_gpu,
                        min(per_machine or ranks, ranks))


def loads_per_rank(recipe: Recipe) -> bool:
    """Whether FSDP2 loading reads only the rank's rows (:func:`slimtune.distributed.wrap.why_not_per_rank`)."""
    return why_not_per_rank(recipe) is None


def _block_weight_share(shape: ModelShape, component: Component) -> int:
    """Bytes of a full-precision ``weights`` component that belong to the decoder blocks' linear layers."""
    inside = sum(s.in_features * s.out_features for s in shape.linears if s.name.startswith(shape.block_prefix + "."))
    return int(component.bytes * min(1.0, inside / max(shape.params, 1)))


def per_rank(mem: MemoryModel, shape: ModelShape, recipe: Recipe, dist: Distribution) -> MemoryModel:
    """``mem`` (one process) as each of ``dist.ranks`` ranks holds it."""
    n = dist.ranks
    comps: list[Component] = []
    if dist.strategy == "ddp":
        comps = list(mem.components)
        grads = mem.component("gradients")
        comps.append(Component("gradients", "DDP gradient buckets", grads,
                               "DistributedDataParallel reduces gradients through buckets: a second fp32 copy"))
        return _rebuilt(mem, comps, mem.load_peak)
    sharded_total = replicated = 0
    for c in mem.components:
        quantized = "-bit" in c.label
        if c.key == "weights" and c.label.startswith("weights,") and not quantized:
            blocks = _block_weight_share(shape, c)  # full-precision base: block linears sharded, the rest whole
            sharded_total += blocks
            replicated += c.bytes - blocks
            comps.append(replace(c, bytes=blocks // n, on_device=not dist.cpu_offload,
                                 why=f"{c.why}; the decoder blocks' share sharded over {_ranks(n)}"))
            if dist.cpu_offload:  # the root sharded and offloaded too, gathered for the step
                comps.append(Component("weights", "gathered root", c.bytes - blocks,
                                       "the root unit (embeddings, norms, head) gathered for the step"))
            else:
                comps.append(Component("weights_fp", "weights kept whole", c.bytes - blocks,
                                       "embeddings, norms and the output head: the root's frozen tensors, whole on "
                                       "every rank"))
        elif c.key == "weights" and c.label == "weights, 8-bit":  # int8 codes are buffers: FSDP2 copies them
            replicated += c.bytes
            comps.append(replace(c, why=f"{c.why}; whole on every rank (FSDP2 shards parameters, and the 8-bit "
                                        "layers' codes are buffers; a 4-bit base is sharded)"))
        elif c.key == "weights" and c.label.startswith("weights,"):  # a 4-bit base: its layers are in the blocks
            sharded_total += c.bytes
            comps.append(replace(c, bytes=-(-c.bytes // n), on_device=not dist.cpu_offload,
                                 why=f"{c.why}; sharded over {_ranks(n)} (rows of whole blocks)"))
        elif c.key == "weights_fp" and dist.cpu_offload:  # everything sharded and offloaded; the root gathered
            comps.append(replace(c, bytes=-(-c.bytes // n), on_device=False,
                                 why=f"{c.why}; sharded over {_ranks(n)}, in host memory"))
            comps.append(Component("weights", "gathered root", c.bytes,
                                   "the root unit (embeddings, norms, head) gathered for the step"))
        elif c.key == "weights_fp":
            replicated += c.bytes
            comps.append(replace(c, why=f"{c.why}; the root's frozen tensors, whole on every rank"))
        elif c.key in ("adapter", "gradients", "optimizer") and c.on_device:
            comps.append(replace(c, bytes=-(-c.bytes // n), on_device=not dist.cpu_offload,
                                 why=f"{c.why}; sharded over {_ranks(n)}"))
        else:
            comps.append(c)
    if n > 1 or dist.cpu_offload:
        block = -(-sharded_total // max(shape.layers, 1))
        comps.insert(1, Component("weights", "gathered decoder blocks", PREFETCHED_BLOCKS * block,
                                  f"FSDP2 gathers one block ({human(block)}) for its forward or backward and "
                                  "prefetches the next"))
    load_peak = mem.load_peak
    if loads_per_rank(recipe) and not shape.fused_expert_params:  # (fused experts: WholeLoadNeeded)
        largest = max((s.in_features * s.out_features for s in shape.quantized_linears(recipe.quantization)),
                      default=0)
        overhead = sum(c.bytes for c in mem.components if c.key == "overhead" and c.label != "allocator slack")
        load_peak = -(-sharded_total // n) + replicated + -(-largest // n) * 4 + overhead
    return _rebuilt(mem, comps, load_peak)


def _rebuilt(mem: MemoryModel, comps: list[Component], load_peak: int) -> MemoryModel:
    on_device = sum(c.bytes for c in comps if c.on_device)
    host = sum(c.bytes for c in comps if not c.on_device)
    return MemoryModel(comps, on_device, load_peak, host, list(mem.notes))
