"""Serving many adapters on one base (slimtune.Decoder): each row decodes as if it ran alone with its adapter,
merged models decode through the base layers only, and the work per layer does not grow with the adapters."""

import copy
import sys

import pytest
import torch
from tiny_models import sample_inputs, tiny_gpt2, tiny_llama
from torch._dynamo.utils import counters

import slimtune
from slimtune.perf.compilation import compile_options, cpu_compiler
from slimtune.quant import Linear4bit, QuantConfig, cpu_decode, quantize
from slimtune.serving import Decoder, decoder

NEW = 5
# Calls that launch work (a gather by index included); views, shape reads and no-op casts launch nothing.
COMPUTE = ("mm", "addmm", "bmm", "baddbmm", "mul", "__mul__", "add", "__add__", "__getitem__", "index_select",
           "gather", "repeat_interleave", "cat", "clone", "contiguous")


def alone(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own greedy decoding of one unpadded row: (new tokens, logits (new, vocab))."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.logits, 1)[0]


def left_padded(batch: int, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = sample_inputs("llama", batch=batch, seq=seq)["input_ids"]
    mask = torch.ones_like(ids)
    for row in range(1, batch, 2):  # every other row is shorter, padded on the left
        mask[row, : row % 4 + 1] = 0
        ids[row, : row % 4 + 1] = 0
    return ids, mask


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_each_row_decodes_as_if_alone_with_its_adapter(family, cache):
    base, singles, multi = family
    rows = ["lora", "dora", None, "vera", "lora", "__base__"]
    ids, mask = left_padded(len(rows))
    tokens, logits = Decoder(multi, cache=cache).generate(ids, attention_mask=mask, adapter_names=rows,
                                                          max_new_tokens=NEW, ignore_eos=True, return_logits=True)
    for i, name in enumerate(rows):
        expected_tokens, expected_logits = alone(base if name in (None, "__base__") else singles[name],
                                                 ids[i: i + 1, mask[i].bool()])
        assert torch.equal(tokens[i, ids.shape[1]:], expected_tokens), (i, name)
        torch.testing.assert_close(logits[i], expected_logits, atol=1e-5, rtol=0, msg=f"row {i} ({name})")


def test_left_padding_under_absolute_positions():
    """GPT-2 adds absolute position embeddings (rotary ones would hide a shifted position): a padded row
    must count its positions from its first real token. Conv1D layers store their weight transposed."""
    base = tiny_gpt2()
    multi, singles = copy.deepcopy(base), {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        config = slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                     init_lora_weights=False)
        singles[name] = slimtune.add_adapter(copy.deepcopy(base), config)
        slimtune.add_adapter(multi, config, name)
        multi.load_state_dict({k.replace(".default", f".{name}"): v for k, v in singles[name].state_dict().items()
                               if ".default" in k}, strict=False)
    rows = ["a", "b", None, "b"]
    ids, mask = left_padded(len(rows))
    tokens, logits = Decoder(multi).generate(ids, attention_mask=mask, adapter_names=rows, max_new_tokens=NEW,
                                             ignore_eos=True, return_logits=True)
    for i, name in enumerate(rows):
        expected_tokens, expected_logits = alone(base if name is None else singles[name], ids[i: i + 1, mask[i].bool()])
        assert torch.equal(tokens[i, ids.shape[1]:], expected_tokens), (i, name)
        torch.testing.assert_close(logits[i], expected_logits, atol=1e-5, rtol=0, msg=f"row {i} ({name})")


def test_rows_run_their_own_head_copies():
    base = tiny_llama()
    multi, singles = copy.deepcopy(base), {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        config = slimtune.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                     init_lora_weights=False)
        singles[name] = slimtune.add_adapter(copy.deepcopy(base), config)
        with torch.no_grad():
            singles[name].lm_head.modules_to_save["default"].weight.mul_(1.5 + seed)
        slimtune.add_adapter(multi, config, name)
        multi.load_state_dict({k.replace(".default", f".{name}"): v for k, v in singles[name].state_dict().items()
                               if ".default" in k}, strict=False)
    rows = ["b", None, "a"]
    ids = sample_inputs("llama", batch=3, seq=6)["input_ids"]
    tokens, logits = Decoder(multi).generate(ids, adapter_names=rows, max_new_tokens=NEW, ignore_eos=True,
                                             return_logits=True)
    for i, name in enumerate(rows):
        expected_tokens, expected_logits = alone(base if name is None else singles[name], ids[i: i + 1])
        assert torch.equal(tokens[i, ids.shape[1]:], expected_tokens), (i, name)
        torch.testing.assert_close(logits[i], expected_logits, atol=1e-5, rtol=0)


def test_rows_sharing_one_adapter_and_the_active_adapter(family):
    """Every row the same adapter (no row mask), and no names: the model's active adapter for every row."""
    _, singles, multi = family
    ids, mask = left_padded(2)
    shared = Decoder(multi).generate(ids, attention_mask=mask, adapter_names=["dora", "dora"], max_new_tokens=NEW,
                                     ignore_eos=True)
    slimtune.set_adapter(multi, "dora")
    active = Decoder(multi).generate(ids, attention_mask=mask, max_new_tokens=NEW, ignore_eos=True)
    for i in range(2):
        expected, _ = alone(singles["dora"], ids[i: i + 1, mask[i].bool()])
        assert torch.equal(shared[i, ids.shape[1]:], expected)
        assert torch.equal(active[i, ids.shape[1]:], expected)


def _qualname(frame) -> str:
    """frame.f_code.co_qualname (Python 3.11+), or on 3.10 the defining class found through self's MRO."""
    code = frame.f_code
    if hasattr(code, "co_qualname"):
        return code.co_qualname
    owner = frame.f_locals.get("self")
    for cls in type(owner).__mro__ if owner is not None else ():
        func = cls.__dict__.get(code.co_name)
        if getattr(func, "__code__", None) is code:
            return f"{cls.__qualname__}.{code.co_name}"
    return code.co_name


def _slimtune_code_in_forwards(fn) -> set[str]:
    """The slimtune functions that run inside transformers' model code (its forwards) while ``fn()`` runs:
    the cost a serving path adds to the model's own, whatever the function is called."""
    seen: set[str] = set()

    def inside_model(frame) -> bool:
        while frame is not None:
            if "transformers/models/" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def profile(frame, event, arg):
        if event == "call" and "slimtune/" in frame.f_code.co_filename and inside_model(frame):
            seen.add(_qualname(frame))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_merged_model_decodes_through_the_base_layers_only(family):
    _, singles, _ = family
    unmerged = singles["lora"]
    ids = sample_inputs("llama", batch=1, seq=6)["input_ids"]
    expected = Decoder(unmerged).generate(ids, adapter_names=["default"], max_new_tokens=NEW, ignore_eos=True)
    merged = slimtune.merge_adapter(copy.deepcopy(unmerged))
    serve = Decoder(merged)
    assert torch.equal(serve.generate(ids, max_new_tokens=NEW, ignore_eos=True), expected)
    assert torch.equal(merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                       min_new_tokens=NEW, pad_token_id=0), expected)
    # No slimtune code at all runs inside a merged decode's forwards: the wrappers' forward is their base layer's.
    ran = _slimtune_code_in_forwards(lambda: serve.generate(ids, max_new_tokens=NEW, ignore_eos=True))
    assert not ran, ran
    with serve.routed(None, batch=1):
        for _, layer in serve.layers:
            assert layer.forward == layer.base_layer.forward
    # ... while the model as it is (outside the decoder) still runs its wrappers.
    assert "LoraLinear.forward" in _slimtune_code_in_forwards(lambda: merged(ids))


def test_unmerged_adapters_run_the_route_not_the_wrappers(family):
    """Unmerged, each adapted layer runs its base layer and the route; the wrappers' own forward (a loop over
    the active adapters) stays out of the decode path."""
    _, singles, _ = family
    ids = sample_inputs("llama", batch=1, seq=6)["input_ids"]
    serve = Decoder(singles["lora"])
    ran = _slimtune_code_in_forwards(lambda: serve.generate(ids, adapter_names=["default"], max_new_tokens=NEW,
                                                            ignore_eos=True))
    assert {"RoutedForward.__call__", "Route.add_to"} <= ran
    assert not {name for name in ran if name.endswith(".forward")}, ran


class _CountCalls(torch.overrides.TorchFunctionMode):
    """Torch calls by name (what a forward asks torch for; views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _calls_per_forward(serve: Decoder, ids: torch.Tensor, rows) -> tuple[dict[str, int], dict[str, int]]:
    """Torch calls of one forward over the prompt (prefill) and over one token per row (a decode step)."""
    counts = []
    with serve.routed(rows, ids.shape[0]), torch.inference_mode():
        for step in (ids, ids[:, :1]):
            with _CountCalls() as counter:
                serve.model(input_ids=step)
            counts.append(counter.calls)
    return counts[0], counts[1]


def test_work_per_layer_does_not_grow_with_the_adapters():
    model = tiny_llama()
    names = [f"a{i}" for i in range(4)]
    for i, name in enumerate(names):
        slimtune.add_adapter(model, slimtune.LoraConfig(r=2 + i, target_modules="all-linear",
                                                        init_lora_weights=False), name)
    serve = Decoder(model)
    ids = sample_inputs("llama", batch=4, seq=6)["input_ids"]
    _calls_per_forward(serve, ids, names)  # the first long input pads each layer's factors into slots, once
    two = _calls_per_forward(serve, ids, ["a0", "a1", "a0", "a1"])
    four = _calls_per_forward(serve, ids, names)
    assert four == two  # the same calls whatever the number of adapters in the batch
    base = _calls_per_forward(serve, ids, [None] * 4)
    wrapped = len(serve.layers)
    # Per wrapped layer: the prefill gathers each row's A and B, then two batched matmuls; a decode step runs
    # x Aᵀ, the row mask, and y + (·) Bᵀ.
    for routed, plain, per_layer in zip(four, base, (4, 3)):
        extra = {k: v - plain.get(k, 0) for k, v in routed.items() if v != plain.get(k, 0)}
        launches = sum(v for k, v in extra.items() if k in COMPUTE)
        assert launches == per_layer * wrapped, extra
    one = _calls_per_forward(serve, ids[:1], ["a2"])[1]
    one_base = _calls_per_forward(serve, ids[:1], [None])[1]
    extra = {k: v - one_base.get(k, 0) for k, v in one.items() if v != one_base.get(k, 0)}
    assert extra.get("mm") == extra.get("addmm") == wrapped, extra  # one adapter, bs 1: x Aᵀ, then y + (·) Bᵀ


def test_4bit_base_runs_through_the_kernels(monkeypatch):
    model = slimtune.add_adapter(quantize(tiny_llama(), QuantConfig()),
                                 slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    calls = {"gemv": 0, "matmul": 0, "cpu gemv": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(decoder, "gemv_4bit", counted("gemv", decoder.gemv_4bit))
    monkeypatch.setattr(decoder, "matmul_4bit", counted("matmul", decoder.matmul_4bit))
    monkeypatch.setattr(cpu_decode, "gemv", counted("cpu gemv", cpu_decode.gemv))
    ids = sample_inputs("llama", batch=3, seq=8)["input_ids"]
    out, logits = Decoder(model).generate(ids, max_new_tokens=NEW, ignore_eos=True, return_logits=True)
    quantized = sum(isinstance(m, Linear4bit) for m in model.modules())
    # 3 rows per step; 24 in the prefill. On an AVX-512 CPU the C++ GEMV takes the layers whose rows are whole
    # blocks of 64 (down_proj, in 64; the others have in 32), the kernels' GEMV the rest.
    cpu = 2 * (NEW - 1) if cpu_decode.gemv_ready() else 0
    assert calls == {"gemv": quantized * (NEW - 1) - cpu, "matmul": quantized, "cpu gemv": cpu}
    for i in range(3):
        expected_tokens, expected_logits = alone(model, ids[i: i + 1])
        assert torch.equal(out[i, 8:], expected_tokens)
        torch.testing.assert_close(logits[i], expected_logits, atol=1e-4, rtol=0)


@pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile's CPU code needs a C++ compiler")
def test_a_compiled_4bit_step_decodes_inside_its_graph_with_the_eager_tokens(monkeypatch):
    """The pure-torch 4-bit decode broke the compiled step at every layer (2.8x slower than eager on the development
    CPU, and a warning said so); traced (quant.nf4.decode_4bit for the prompt, the CPU GEMV's operator for each new
    token where the kernel serves), the step compiles whole, to the same tokens."""
    model = slimtune.add_adapter(quantize(tiny_llama(), QuantConfig(compute_dtype="float32", blocksize=32)),
                                 slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = sample_inputs("llama", batch=2, seq=8)["input_ids"]
    calls, gemv = [], cpu_decode.gemv
    monkeypatch.setattr(cpu_decode, "gemv", lambda *args, **kwargs: calls.append(1) or gemv(*args, **kwargs))
    want, want_logits = Decoder(model).generate(ids, max_new_tokens=NEW, ignore_eos=True, return_logits=True)
    eager_calls = len(calls)
    torch._dynamo.reset()
    counters.clear()
    got, logits = Decoder(model, compile=True).generate(ids, max_new_tokens=NEW, ignore_eos=True, return_logits=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    per_token = 14 * (NEW - 1)  # 2 blocks x 7 layers for each token after the first (the prompt has 16 rows)
    assert eager_calls == len(calls) - eager_calls == (per_token if cpu_decode.gemv_ready() else 0)
    assert torch.equal(got, want)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)


def test_a_compiled_step_on_the_cpu_gets_the_compile_options_of_training(monkeypatch):
    """Scalar C++ over a 4-bit base (inductor's vectorized table look-ups are 2.5x slower: perf.compilation)."""
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **options: seen.update(options) or model)
    model = quantize(tiny_llama(), QuantConfig(compute_dtype="float32"))
    Decoder(model, compile=True)
    assert seen["options"] == compile_options(model) and seen["options"]["cpp.simdlen"] == 0 and seen["mode"] is None


def test_requests_it_cannot_serve_are_clear_errors(family):
    _, _, multi = family
    serve = Decoder(multi)
    ids = sample_inputs("llama", batch=2, seq=5)["input_ids"]
    right = torch.ones_like(ids)
    right[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        serve.generate(ids, attention_mask=right, adapter_names=["lora", "dora"])
    with pytest.raises(ValueError, match="one per row"):
        serve.generate(ids, adapter_names=["lora"])
    with pytest.raises(ValueError, match="not among this decoder's adapters"):
        Decoder(multi, adapters=["lora"]).generate(ids, adapter_names=["lora", "vera"])
    from tiny_models import tiny_t5

    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model; Decoder serves"):
        Decoder(tiny_t5())  # (its generate failed inside transformers)
    ia3 = slimtune.add_adapter(tiny_llama(), slimtune.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="cannot be routed per row"):
        Decoder(ia3, adapters=["default"])
    with pytest.raises(ValueError, match="cannot be routed per row"):
        Decoder(ia3).generate(ids, adapter_names=["default", None])
    # The model as it is still decodes, the IA3 layers through their own forward.
    expected = ia3.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                            do_sample=False, pad_token_id=0)
    assert torch.equal(Decoder(ia3).generate(ids, max_new_tokens=NEW, ignore_eos=True), expected)
    merged = slimtune.merge_adapter(copy.deepcopy(multi), "lora")
    with pytest.raises(ValueError, match="merged"):
        Decoder(merged).generate(ids, adapter_names=["lora", "dora"])
    prompt = slimtune.add_adapter(tiny_llama(), slimtune.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prompt-learning"):
        Decoder(prompt).generate(ids)
    with pytest.raises(ValueError, match="compile=True needs cache='static'"):
        Decoder(multi, cache="dynamic", compile=True)
    # Trained biases live in the base layers' own bias (as in PEFT): one value for every row of a batch
    biased = slimtune.add_adapter(tiny_gpt2(), slimtune.LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only"))
    slimtune.add_adapter(biased, slimtune.LoraConfig(r=2, target_modules=["c_attn"]), adapter_name="plain")
    gpt2_ids = sample_inputs("gpt2", batch=2, seq=5)["input_ids"]
    for serve_rows in (lambda: Decoder(biased).generate(gpt2_ids, adapter_names=["default", None]),
                       lambda: slimtune.mixed_batch(biased, ["plain", None]).__enter__()):
        with pytest.raises(ValueError, match=r"adapter 'default' trains biases \(bias='lora_only'\), which live in "
                                             r"the base layers' own bias"):
            serve_rows()
