"""Serving many adapters on one base: greedy decoding with unmerged adapters, each row its own.

    decoder = slimtune.Decoder(model, adapters=["math", "code"])
    out = decoder.generate(input_ids, attention_mask=mask, adapter_names=["math", "code", None], max_new_tokens=64)

What makes it cost (nearly) what the base model costs on the same decode path:

- Rows are routed as in :mod:`slimtune.mixed_batch`: per adapted layer one stacked low-rank product for
  all rows, ``W x + ((x Aᵀ) ⊙ M) Bᵀ`` — three launches per decode step whatever the number of adapters,
  two when every row shares one (a prefill whose rows run one adapter each gathers each row's own factors:
  two gathers, two batched matmuls). The stacked factors are read once, when the decoder is made
  (:meth:`Decoder.refresh` after changing adapter weights); each request gathers the blocks its rows use once.
- A wrapper with nothing to add (its adapters merged, or used by no row) runs its base layer's
  ``forward`` directly: a merged model decodes through the very calls of the plain model.
- 4-bit layers (:class:`~slimtune.quant.Linear4bit`) run through :mod:`slimtune.perf.kernels`: the GEMV
  kernel up to 16 rows, the fused dequantize-matmul above (CUDA with Triton; on CPUs the C++ GEMV of
  :mod:`slimtune.quant.cpu_decode` up to 8 rows, elsewhere the pure-torch path).
- Last-position logits only. ``compile=True`` runs the one-token steps through ``torch.compile`` (CUDA
  graphs on a GPU) on a static key/value cache (fixed shapes; its length rounded up to a multiple of 64 so
  one compiled step serves many requests). Eager steps keep transformers' dynamic cache: a static one
  only pays with a compiled step (eager on the development CPU: the same step time within the noise).
  Compiling is off by default, since the first request pays for it: on the development CPU (SmolLM2-135M
  shape, one unmerged adapter, 1 thread, a shared machine) it compiled in ~35 s and took an fp32 decode step
  from ~74 to ~64 ms. An NF4 step compiles its 4-bit decode into the graph (``quant.nf4.decode_4bit``, scalar
  C++ as in training's compiled blocks): measured 0.81 × the eager time for 16 tokens after an ~80 s compile
  (the decode broke the graph at every layer before, 2.8 × slower than eager). On GPUs, where eager decode is
  launch-bound, CUDA graphs remove the launches.

Decoding is greedy (the same tokens as ``model.generate(do_sample=False)``); prompts are left-padded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig, StaticCache

from slimtune.compat import cache_entry, forward_parameters
from slimtune.core.state import find_state
from slimtune.methods import method_for
from slimtune.methods.contract import saved_modules, tuner_layers
from slimtune.methods.prompts import PromptLearningMethod
from slimtune.perf.compilation import compile_options
from slimtune.perf.kernels import gemv_4bit, matmul_4bit, use_triton_for, weight_4bit
from slimtune.quant import Linear4bit, QuantizedLinear
from slimtune.serving.routing import (
    LayerFactors,
    RoutedForward,
    check_rows,
    route_heads,
    row_names,
    set_forward,
    undo_all,
)

__all__ = ["Decoder"]

GEMV_ROWS = 16  # gemv_4bit serves up to this many rows
CACHE_STEP = 64  # compiled decoding rounds the static cache's length up to a multiple of this


class Linear4bitForward:
    """A :class:`Linear4bit`'s ``forward`` while decoding: the GEMV kernel for few rows, else the fused matmul."""

    def __init__(self, layer: Linear4bit) -> None:
        self.layer, self.weight = layer, weight_4bit(layer)
        self.gemv_ok = layer.in_features % 2 == 0
        # Resolved once per request, not per call: no environment look-ups in the step (nor in a compiled graph).
        self.use_triton = use_triton_for(layer.weight.device, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer, w, triton = self.layer, self.weight, self.use_triton
        xc = x.to(layer.compute_dtype)
        rows = xc.numel() // layer.in_features
        few = None if triton else layer.few_rows_matmul(xc)  # CPUs: the C++ GEMV (slimtune.quant.cpu_decode)
        if few is not None:
            out = few
        elif rows <= GEMV_ROWS and self.gemv_ok:
            out = gemv_4bit(xc, w, triton)
        else:
            out = matmul_4bit(xc, w, True, triton)
        if layer.bias is not None:
            out = out + layer.bias.to(out.dtype)
        return out.to(x.dtype)


def compute_dtype(base: nn.Module) -> torch.dtype | None:
    """The dtype a layer computes in (None: leave adapter factors in their own)."""
    if isinstance(base, QuantizedLinear):
        return base.compute_dtype
    weight = getattr(base, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None


class Decoder:
    """Greedy decoding of a model with several adapters, each row of a batch its own (or the model as it is).

    ``adapters``: the adapters rows may name (default: all the model's); their factors are read now.
    ``compile``: run the one-token steps through ``torch.compile`` (off by default; see the module docstring).
    ``cache``: ``"auto"`` (static when compiled, else dynamic), ``"static"`` (preallocated) or ``"dynamic"``.
    Call :meth:`refresh` after adapters were added, removed or trained, or the model was moved.
    """

    def __init__(self, model: nn.Module, adapters: Sequence[str] | None = None, cache: str = "auto",
                 compile: bool = False) -> None:
        if cache not in ("auto", "static", "dynamic"):
            raise ValueError(f"cache={cache!r}: use 'auto' (static when compiled, else dynamic), 'static' "
                             "(preallocated) or 'dynamic'")
        cache = ("static" if compile else "dynamic") if cache == "auto" else cache
        if compile and cache == "dynamic":
            raise ValueError("compile=True needs cache='static' (or 'auto'): a dynamic cache changes shape every "
                             "step, so the compiled step would recompile each time.")
        entry = cache_entry(model)
        if entry is None:
            raise ValueError(f"{type(model).__name__} takes no key/value cache; Decoder serves causal language models.")
        config = getattr(model, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise ValueError(f"{type(model).__name__} has no transformers config; Decoder serves transformers models.")
        if config.is_encoder_decoder:
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model; Decoder serves causal language "
                             "models. Use slimtune.mixed_batch with model.generate for it.")
        self.model, self.config, self.cache, self.cache_name = model, config, cache, entry[1]
        params = forward_parameters(model)
        self._logits_to_keep, self._cache_position = "logits_to_keep" in params, "cache_position" in params
        state = find_state(model)
        self.adapters = list(state.configs if state is not None else []) if adapters is None else list(adapters)
        self._explicit = adapters is not None
        # Prefill runs eagerly; the one-token steps (fixed shapes with the static cache) may run compiled.
        self.compiled = compile
        device = next(iter(model.parameters()), torch.empty(0)).device
        # CUDA graphs on GPUs; on CPUs the options training's compiled blocks use (scalar code for a 4-bit decode)
        on_gpu = device.type == "cuda"
        self._step_forward: Callable[..., Any] = torch.compile(
            model, dynamic=False, mode="reduce-overhead" if on_gpu else None,
            options=None if on_gpu else compile_options(model)) if compile else model
        self.refresh()

    def refresh(self) -> None:
        """Read the model's wrapped layers and the adapters' factors again (after adapters were added,
        removed or trained)."""
        state = find_state(self.model)
        if self.adapters:
            if state is None:
                raise ValueError(f"adapters {self.adapters} were named but the model has no slimtune adapter.")
            state.check_known(self.adapters)
        # The model's structure, read once (walking a model with many adapters costs more than a decode step).
        self.layers = list(tuner_layers(self.model))
        self.heads = [m for _, m in saved_modules(self.model)]
        self.quantized = [m for m in self.model.modules() if isinstance(m, Linear4bit)]
        self._last_plan: tuple[Any, list[tuple[nn.Module, Callable[..., Any]]]] | None = None
        self.factors: dict[str, LayerFactors] = {}
        for name, layer in self.layers:
            if any(a in layer.adapter_names for a in self.adapters):
                self.factors[name] = LayerFactors(layer, name, self.adapters, compute_dtype(layer.base_layer))
        if self._explicit:  # adapters asked for by name must be routable: say so now, not mid-request
            for factors in self.factors.values():
                if factors.unroutable:
                    raise ValueError(next(iter(factors.unroutable.values())))

    # ---- routing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def routed(self, adapter_names: Sequence[str | None] | None, batch: int) -> Iterator[nn.Module]:
        """Inside the block the model's forward runs row i with ``adapter_names[i]`` (None: the model's
        active adapters for every row), each layer on its fast path."""
        self._check_model()
        rows = None if adapter_names is None else self._rows(adapter_names, batch)
        undo: list[Callable[[], None]] = []
        try:
            for module, forward in self._plan(rows, batch):
                set_forward(module, forward, undo)
            if rows is None or not self.heads:
                yield self.model
                return
            with route_heads(self.heads, rows, list(dict.fromkeys(n for row in rows for n in row))):
                yield self.model
        finally:
            undo_all(undo)

    def _rows(self, adapter_names: Sequence[str | None], batch: int) -> list[tuple[str, ...]]:
        if len(adapter_names) != batch:
            raise ValueError(f"{len(adapter_names)} adapter names for a batch of {batch} rows; give one per row "
                             "(None or '__base__': the base model).")
        rows = row_names(adapter_names)
        used = list(dict.fromkeys(n for row in rows for n in row))
        unknown = [n for n in used if n not in self.adapters]
        if unknown:
            raise ValueError(f"adapter(s) {unknown} are not among this decoder's adapters {self.adapters}; "
                             "make it with Decoder(model, adapters=[...]).")
        check_rows(self.model, used, self.layers)
        return rows

    def _plan(self, rows: list[tuple[str, ...]] | None, batch: int) -> list[tuple[nn.Module, Callable[..., Any]]]:
        """``(module, forward)`` to install for a request. The last plan is kept: the same request again
        gathers nothing, and installs the very same objects (what a compiled step's guards check)."""
        actives = tuple(tuple(layer.unmerged_active()) for _, layer in self.layers) if rows is None else ()
        key = (None if rows is None else tuple(rows), batch, actives)
        if self._last_plan is not None and self._last_plan[0] == key:
            return self._last_plan[1]
        fast: dict[nn.Module, Callable[..., Any]] = {m: Linear4bitForward(m) for m in self.quantized}
        plan: list[tuple[nn.Module, Callable[..., Any]]] = list(fast.items())
        layouts: dict = {}
        for i, (name, layer) in enumerate(self.layers):
            factors = self.factors.get(name)
            base = fast.get(layer.base_layer, layer.base_layer.forward)
            if rows is not None:
                route = None if factors is None else factors.route(rows, layouts)
            elif not actives[i]:  # merged or inactive: no wrapper code in the path
                route = None
            elif factors is None or any(a not in factors.widths for a in actives[i]) or \
                    (len(actives[i]) > 1 and any(a in factors.gains for a in actives[i])):
                continue  # not routable here (or not read by this decoder): the layer's own forward
            else:
                route = factors.route([actives[i]] * batch, layouts)
            plan.append((layer, base if route is None else RoutedForward(base, route)))
        self._last_plan = (key, plan)
        return plan

    def _check_model(self) -> None:
        state = find_state(self.model)
        prompts = [] if state is None else [a for a in state.active
                                            if isinstance(method_for(state.configs[a]), PromptLearningMethod)]
        if prompts:
            raise ValueError(f"adapter(s) {prompts} are prompt-learning adapters, which change the inputs; Decoder "
                             "serves layer adapters (LoRA, DoRA, VeRA …). Use model.generate for them.")

    # ---- decoding ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 adapter_names: Sequence[str | None] | None = None, max_new_tokens: int = 64,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 ignore_eos: bool = False, return_logits: bool = False) -> Any:
        """Greedy continuation of ``input_ids`` (batch, prompt), left-padded where ``attention_mask`` is 0.

        Row i runs ``adapter_names[i]`` (None or ``"__base__"``: the base model alone); without
        ``adapter_names`` every row runs the model as it is (merged weights and active adapters).
        Returns ``(batch, prompt + new)`` token ids like ``model.generate`` (rows that ended get
        ``pad_token_id``), and with ``return_logits`` also the logits ``(batch, new, vocab)``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask has padding on the right; Decoder needs left padding "
                             "(tokenizer.padding_side = 'left').")
        config = getattr(self.model, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
        eos_ids = [] if eos is None or ignore_eos else [eos] if isinstance(eos, int) else list(eos)
        pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.routed(adapter_names, input_ids.shape[0]):
                tokens, logits = self._decode(input_ids, mask, max_new_tokens, eos_ids, pad, return_logits)
        finally:
            self.model.train(was_training)
        out = torch.cat([input_ids, tokens], dim=1)
        return (out, logits) if return_logits else out

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, new: int, eos: list[int], pad: int,
                keep_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, prompt = ids.shape
        total = prompt + new
        if self.compiled:  # cache lengths in steps of 64: one compiled step serves many request lengths
            total = -(-total // CACHE_STEP) * CACHE_STEP
        full = torch.cat([mask, mask.new_ones(batch, total - prompt)], dim=1)  # the future: hidden by causality
        positions = (full.long().cumsum(1) - 1).clamp_min(0)
        cache = StaticCache(config=self.config, max_cache_len=total) if self.cache == "static" \
            else DynamicCache(config=self.config)
        eos_t = torch.tensor(eos, device=ids.device)
        done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        tokens, all_logits = [], []
        step_ids, start = ids, 0
        for _ in range(new):
            end = start + step_ids.shape[1]
            logits = self._step(step_ids, full if self.cache == "static" else full[:, :end], positions[:, start:end],
                                cache, start)
            if keep_logits:
                all_logits.append(logits)
            token = logits.argmax(-1).masked_fill(done, pad)
            tokens.append(token)
            if eos:
                done = done | torch.isin(token, eos_t)
                if bool(done.all()):
                    break
            step_ids, start = token[:, None], end
        return torch.stack(tokens, 1), torch.stack(all_logits, 1) if keep_logits else None

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
              start: int) -> torch.Tensor:
        """The last position's logits (batch, vocab) of one forward that appends ``ids`` to ``cache``."""
        kwargs: dict[str, Any] = {self.cache_name: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self._cache_position:  # transformers 4: the cache slots to write (later releases track them)
            kwargs["cache_position"] = torch.arange(start, start + ids.shape[1], device=ids.device)
        forward = self._step_forward if ids.shape[1] == 1 else self.model
        out = forward(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1]

