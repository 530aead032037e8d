"""The training loop's parts: schedule, loss, accumulation, optimizer hooks, Ctrl-C, metrics and plot."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import signal

import pytest
import torch
from run_helpers import rows
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import make_tokenizer, tiny_llama
from transformers import get_scheduler

import slimtune
from slimtune.errors import SaveError, TrainingDivergedError
from slimtune.methods import REGISTRY
from slimtune.methods.lora import LoraMethod
from slimtune.perf import losses
from slimtune.train import progress
from slimtune.train.batching import BatchIterator, collate
from slimtune.train.generation import generate_text
from slimtune.train.losses import chunked_loss_refusal, evaluate_loss, label_tokens, loss_sum
from slimtune.train.packing import packing_refusal
from slimtune.train.progress import MetricsLog, peak_memory_mb, plot_loss
from slimtune.train.recipe import TrainingSection
from slimtune.train.schedule import lr_multiplier
from slimtune.train.stop_request import StopRequest
from slimtune.train.tokenization import IGNORE_INDEX, tokenize_examples
from slimtune.train.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def token_rows(tokenizer):
    return tokenize_examples(rows(16), tokenizer, max_length=48).rows


def lora_model(tokenizer, config=None, seed=0):
    model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
    torch.manual_seed(seed)
    slimtune.add_adapter(model, config or slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False))
    return model


def make_trainer(model, token_rows, tmp_path, tokenizer, **settings):
    training = TrainingSection(**{"max_steps": 2, "learning_rate": 1e-2, **settings})
    batches = BatchIterator(token_rows, training.batch_size, seed=0, pad_id=tokenizer.pad_token_id)
    return Trainer(model, batches, token_rows[:4], training, tmp_path, CPU, tokenizer.pad_token_id,
                   show_progress=False, log=lambda message: None)


@pytest.mark.parametrize("kind, min_ratio", [("cosine", 0.0), ("cosine", 0.1), ("linear", 0.0), ("constant", 0.0),
                                             ("constant_with_warmup", 0.0)])
@pytest.mark.parametrize("total, warmup", [(10, 3), (7, 0), (5, 5), (1, 0)])
def test_schedules_are_transformers_get_scheduler(kind, min_ratio, total, warmup):
    """The rate at every optimizer step is the one a HF Trainer with the same lr_scheduler_type uses."""
    if kind == "constant":
        warmup = 0  # transformers' constant schedule has no warmup (a recipe giving one is refused)
    param = torch.nn.Parameter(torch.zeros(1))
    theirs = get_scheduler("cosine_with_min_lr" if min_ratio else kind, torch.optim.SGD([param], lr=1.0),
                           num_warmup_steps=warmup, num_training_steps=total,
                           scheduler_specific_kwargs={"min_lr_rate": min_ratio} if min_ratio else None)
    expected = []
    for _ in range(total):
        expected.append(theirs.get_last_lr()[0])
        theirs.optimizer.step()
        theirs.step()
    ours = lr_multiplier(kind, total_steps=total, warmup_steps=warmup, min_ratio=min_ratio)
    assert [ours(step) for step in range(total)] == pytest.approx(expected, abs=1e-12)


def test_mixed_precision_from_python_is_checked_too(tmp_path, tokenizer, token_rows):
    """Recipes refuse fp16; a TrainingSection made in Python must not run it silently as fp32."""
    with pytest.raises(ValueError, match=r"mixed_precision='fp16' is not one of \['auto', 'no', 'bf16'\].*use bf16"):
        make_trainer(lora_model(tokenizer), token_rows, tmp_path, tokenizer, mixed_precision="fp16")


def test_schedule_names_and_warmup():
    with pytest.raises(ValueError, match="lr_scheduler='step'"):
        lr_multiplier("step", 5, 0)
    with pytest.raises(ValueError, match="lr_scheduler=constant has no warmup .*constant_with_warmup"):
        TrainingSection(lr_scheduler="constant", warmup_steps=2)
    for constant in ("constant", "constant_with_warmup"):  # a floor for a rate that never decays: a key doing nothing
        with pytest.raises(ValueError, match=f"min_lr_ratio=0.1 is where a decay ends, and lr_scheduler={constant}"):
            TrainingSection(lr_scheduler=constant, min_lr_ratio=0.1)
    TrainingSection(lr_scheduler="linear", min_lr_ratio=0.1)
    linear = lr_multiplier("linear", total_steps=4, warmup_steps=0, min_ratio=0.2)  # linear with a floor
    assert [linear(s) for s in range(4)] == pytest.approx([1.0, 0.8, 0.6, 0.4])


def test_warmup_ratio_rounds_up_as_transformers(tmp_path, tokenizer, token_rows):
    trainer = make_trainer(lora_model(tokenizer), token_rows, tmp_path, tokenizer, max_steps=8, warmup_ratio=0.1,
                           lr_scheduler="constant_with_warmup")
    assert trainer.scheduler.get_last_lr()[0] == 0.0  # ceil(0.8) = 1 warmup step: the first update's rate is 0


def test_eval_loss_is_the_models_own_mean_token_loss(tokenizer, token_rows):
    model = tiny_llama(vocab_size=len(tokenizer))
    batch = collate(token_rows[:1], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(**batch).loss.item()  # transformers shifts labels and averages over label tokens
    for loss in ("full", "chunked"):  # chunked: slimtune.perf.losses, logits never materialized whole
        got = evaluate_loss(model, token_rows[:1], 1, tokenizer.pad_token_id, CPU, loss=loss)
        assert got == pytest.approx(expected, rel=1e-5), loss
    # Padding in a bigger batch changes nothing: the mean is over every label token of the set.
    one_by_one = [evaluate_loss(model, [r], 1, tokenizer.pad_token_id, CPU) for r in token_rows[:4]]
    counts = [sum(t != -100 for t in r["labels"][1:]) for r in token_rows[:4]]
    pooled = sum(loss * c for loss, c in zip(one_by_one, counts)) / sum(counts)
    assert evaluate_loss(model, token_rows[:4], 3, tokenizer.pad_token_id, CPU) == pytest.approx(pooled, rel=1e-5)


def test_evaluation_gives_every_module_its_own_mode_back(tokenizer, token_rows):
    """A model in train() holding a block the user put in eval(): both are as they were after an evaluation, a
    sample generation and the run's probes (the chunked-loss and packing checks)."""
    model = tiny_llama(vocab_size=len(tokenizer)).train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    calls, own_train = [], model.train
    model.train = lambda mode=True: (calls.append(mode), own_train(mode))[1]  # (transformers' train() does work)
    evaluate_loss(model, token_rows[:2], 2, tokenizer.pad_token_id, CPU)
    generate_text(model, tokenizer, "hello", max_new_tokens=2, silent=True)
    chunked_loss_refusal(model, "auto")
    packing_refusal(model, CPU)
    assert [m.training for m in model.modules()] == modes
    assert len(calls) >= 8 and calls == [False, True] * (len(calls) // 2)  # the model's own train(), there and back


def test_accumulation_equals_the_full_batch(tmp_path, tokenizer, token_rows):
    """2 micro-batches of 2 rows = 1 batch of 4 rows: the loss is the mean over all label tokens."""
    params = []
    for i, (batch_size, accum) in enumerate([(4, 1), (2, 2)]):
        model = lora_model(tokenizer)
        trainer = make_trainer(model, token_rows, tmp_path / str(i), tokenizer, batch_size=batch_size,
                               gradient_accumulation_steps=accum, max_steps=1, max_grad_norm=None)
        metrics = trainer.train_step()
        params.append((metrics["loss"], [p.detach().clone() for p in trainer.params]))
    assert params[0][0] == pytest.approx(params[1][0], rel=1e-5)
    for a, b in zip(params[0][1], params[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_a_steps_tokens_are_its_rows_tokens_without_padding(tmp_path, tokenizer, packing):
    """The tokens a step reports (and tokens/s) are its examples' tokens, packed or not: never the padding."""
    token_rows = tokenize_examples(rows(16), tokenizer, max_length=48, packing=packing).rows
    trainer = make_trainer(lora_model(tokenizer), token_rows, tmp_path, tokenizer, batch_size=3, max_steps=1)
    trainer.batches = BatchIterator(token_rows, 3, seed=0, pad_id=tokenizer.pad_token_id, shuffle=False,
                                    pad_to_multiple_of=16)
    assert trainer.train_step()["tokens"] == sum(len(r["input_ids"]) for r in token_rows[:3])


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("batch_size, accum", [(4, 1), (2, 2)])
def test_an_moe_router_balancing_loss_is_trained_as_the_models_own_loss(tmp_path, tokenizer, token_rows,
                                                                       batch_size, accum):
    """Mixtral with output_router_logits: the objective is the model's own loss (cross-entropy + coefficient ×
    load-balancing loss, what HF's Trainer trains); over micro-batches the balancing term is their mean. The
    chunked loss, which leaves it out, is not used (and refused when asked for)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    coef = 0.5
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=coef)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainer = make_trainer(model, token_rows, tmp_path, tokenizer, batch_size=batch_size,
                           gradient_accumulation_steps=accum, max_steps=1, max_grad_norm=None)
    trainer.batches = BatchIterator(token_rows, batch_size, seed=0, pad_id=tokenizer.pad_token_id, shuffle=False)
    assert not trainer.chunked and "router load-balancing" in trainer.loss_refusal
    seen = []
    trainer.optimizer.step = lambda *a, **k: seen.append([p.grad.clone() for p in trainer.params])
    metrics = trainer.train_step()
    # the same objective by hand, from the model's own losses on the same micro-batches
    parts = [collate(token_rows[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, 4, batch_size)]
    n_labels = sum(label_tokens(b) for b in parts)
    outs = [model(**b, use_cache=False) for b in parts]
    objective = sum((o.loss - coef * o.aux_loss) * label_tokens(b) / n_labels + coef * o.aux_loss / accum
                    for o, b in zip(outs, parts))
    objective.backward()
    assert metrics["loss"] == pytest.approx(objective.item(), rel=1e-5)
    assert outs[0].aux_loss.item() > 1.0  # the balancing term is a large part of it
    for ours, theirs in zip(seen[0], [p.grad for p in trainer.params]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    from slimtune.train.losses import chunked_loss_refusal

    with pytest.raises(ValueError, match="router load-balancing"):
        chunked_loss_refusal(model, "chunked")


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_step_never_reaches_into_the_next_epoch(tmp_path, tokenizer, token_rows, epochs):
    """6 rows, batch 1 × accumulation 4: an epoch is 2 steps (4 micro-batches, then the 2 left), each row seen
    once per epoch, as with batch 4 × accumulation 1; before, the second step took 2 rows of the next epoch."""
    six = token_rows[:6]
    trained = []
    for i, (batch_size, accum) in enumerate([(1, 4), (4, 1)]):
        (tmp_path / str(i)).mkdir()
        trainer = make_trainer(lora_model(tokenizer), six, tmp_path / str(i), tokenizer, max_steps=None,
                               epochs=epochs, batch_size=batch_size, gradient_accumulation_steps=accum)
        assert trainer.total_steps == 2 * epochs
        assert trainer.train() is True
        trained.append(trainer.state.tokens)
        rows = [json.loads(line) for line in (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()]
        expected = [0.6667, 1.0, 1.6667, 2.0] if accum == 4 else [0.5, 1.0, 1.5, 2.0]  # micro-batches, as HF
        assert [r["epoch"] for r in rows if "loss" in r] == expected[: 2 * epochs]
    assert trained[0] == trained[1] == epochs * sum(len(r["input_ids"]) for r in six)


@pytest.mark.parametrize("variant", [{"loss": "full"}, {"optim": "adamw_8bit"}, "gradient_checkpointing"])
def test_loss_paths_optimizers_and_checkpointing_agree(variant, tmp_path, tokenizer, token_rows):
    """Full vs chunked loss, 8-bit AdamW (fp32 below 4096 elements) and layer checkpointing: same step."""
    from slimtune.perf.activation_checkpointing import checkpoint_layers

    results = []
    for i, options in enumerate([{}, variant]):
        model = lora_model(tokenizer)
        if options == "gradient_checkpointing":
            checkpoint_layers(model)
            options = {}
        trainer = make_trainer(model, token_rows, tmp_path / str(i), tokenizer, batch_size=4, **options)
        results.append((trainer.train_step()["loss"], [p.detach().clone() for p in trainer.params]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_and_only_trains_the_adapter(tmp_path, tokenizer, token_rows):
    model = lora_model(tokenizer)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = make_trainer(model, token_rows, tmp_path, tokenizer, max_steps=12, batch_size=4, learning_rate=5e-2)
    before = trainer.evaluate()
    assert trainer.train() is True and trainer.state.step == 12
    assert trainer.evaluate() < before - 0.05  # a tiny random model learns slowly, but it must learn
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    logged = MetricsLog(tmp_path).rows()
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 13))
    assert {"lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_mb"} <= set(logged[1])
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # cosine ends at min_lr_ratio 0
    assert plot_loss(tmp_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_metrics_row_every_n_steps_holds_their_mean_loss_and_tokens(tmp_path, tokenizer, token_rows):
    """As a HF Trainer logs with logging_steps=N: no step's loss is dropped from the log."""
    (tmp_path / "every").mkdir()
    (tmp_path / "third").mkdir()
    every = make_trainer(lora_model(tokenizer), token_rows, tmp_path / "every", tokenizer, max_steps=5, batch_size=2)
    every.train()
    steps = [r for r in MetricsLog(tmp_path / "every").rows() if "loss" in r]
    third = make_trainer(lora_model(tokenizer), token_rows, tmp_path / "third", tokenizer, max_steps=5, batch_size=2,
                         log_every=3)
    third.train()
    rows = [r for r in MetricsLog(tmp_path / "third").rows() if "loss" in r]
    assert [r["step"] for r in rows] == [3, 5]
    for row, window in zip(rows, (steps[:3], steps[3:])):
        assert row["loss"] == pytest.approx(sum(r["loss"] for r in window) / len(window), rel=1e-6)
        assert row["tokens"] == sum(r["tokens"] for r in window)


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, tokenizer, token_rows):
    said = []
    training = TrainingSection(max_steps=2, warmup_steps=100)
    batches = BatchIterator(token_rows, 1, seed=0, pad_id=tokenizer.pad_token_id)
    Trainer(lora_model(tokenizer), batches, token_rows[:4], training, tmp_path, CPU, tokenizer.pad_token_id,
            show_progress=False, log=said.append)
    assert len(said) == 1 and re.search(r"warmup \(100 steps\) is not shorter than the run \(2 steps\)", said[0])
    said.clear()
    Trainer(lora_model(tokenizer), batches, token_rows[:4], TrainingSection(max_steps=2, warmup_steps=1), tmp_path,
            CPU, tokenizer.pad_token_id, show_progress=False, log=said.append)
    assert said == []


@dataclasses.dataclass
class HookedConfig(slimtune.LoraConfig):
    peft_type = "HOOKED_TEST"


class HookedMethod(LoraMethod):
    """LoRA+-style groups (B learns 16x faster) and a post-step hook, as methods may provide them."""

    peft_type = "HOOKED_TEST"
    config_class = HookedConfig
    calls: list = []
    keep_groups: int | None = None

    def param_groups(self, model, config, lr):
        a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
        b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
        return [{"params": a, "lr": lr}, {"params": b, "lr": 16 * lr}][:self.keep_groups]

    def after_optimizer_step(self, model, adapter_name, state):
        self.calls.append(sum(float(p.detach().abs().sum()) for p in model.parameters() if p.requires_grad))


@pytest.fixture
def hooked_method():
    REGISTRY.register(HookedMethod)
    yield REGISTRY.method("HOOKED_TEST")
    REGISTRY.unregister("HOOKED_TEST")


def test_method_hooks_shape_the_optimizer(tmp_path, tokenizer, token_rows, hooked_method):
    trainer = make_trainer(lora_model(tokenizer, HookedConfig(r=2, target_modules=["q_proj"])), token_rows, tmp_path,
                           tokenizer, max_steps=3, warmup_steps=0, lr_scheduler="constant")
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-2, 16e-2])
    trainer.train()
    assert len(hooked_method.calls) == 3  # once per optimizer step, after the update

    hooked_method.keep_groups = 1
    with pytest.raises(ValueError, match="every trainable parameter exactly once"):
        make_trainer(lora_model(tokenizer, HookedConfig(r=2, target_modules=["q_proj"])), token_rows, tmp_path,
                     tokenizer)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_training_steps_never_build_the_full_logits(tmp_path, tokenizer, token_rows, monkeypatch):
    """``loss: auto`` takes the chunked cross-entropy: no (tokens, vocab) logits tensor in a training step."""
    monkeypatch.setattr(losses, "_CHUNK_BYTES", 4 * len(tokenizer) * 8)  # 8 tokens of logits per chunk
    largest = {}
    for mode in ("auto", "full"):
        trainer = make_trainer(lora_model(tokenizer), token_rows, tmp_path / mode, tokenizer, loss=mode, batch_size=4)
        assert trainer.chunked == (mode == "auto")
        with _LargestTensor() as tracker:
            trainer.train_step()
        largest[mode] = tracker.largest
    tokens = max(len(r["input_ids"]) for r in token_rows[:4]) * 4
    assert largest["full"] >= tokens * len(tokenizer) * 0.5  # the control does build them
    assert largest["auto"] < tokens * len(tokenizer) * 0.5


def test_optimizer_features_from_training_keys(tmp_path, tokenizer, token_rows):
    """LoRA+ and layer-wise decay are recipe keys that work with any method."""
    model = lora_model(tokenizer, slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    plus = make_trainer(model, token_rows, tmp_path, tokenizer, loraplus_lr_ratio=8.0, warmup_steps=0,
                        lr_scheduler="constant")
    lrs = {g["name"]: g["lr"] for g in plus.optimizer.param_groups}
    assert lrs == pytest.approx({"lora_A": 1e-2, "lora_B": 8e-2})
    decayed = make_trainer(model, token_rows, tmp_path, tokenizer, layerwise_lr_decay=0.5, warmup_steps=0,
                           lr_scheduler="constant")
    by_depth = {g["depth"]: g["lr"] for g in decayed.optimizer.param_groups}
    assert by_depth == pytest.approx({1: 1e-2 * 0.25, 2: 1e-2 * 0.5})  # block i of L=2: lr · decay^(L − i)
    with pytest.raises(ValueError, match="both set: each defines the optimizer's parameter groups"):
        make_trainer(model, token_rows, tmp_path, tokenizer, loraplus_lr_ratio=8.0, layerwise_lr_decay=0.5)
    with pytest.raises(ValueError, match="loraplus_lr_ratio=0.5 must be ≥ 1"):
        TrainingSection(loraplus_lr_ratio=0.5)


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit", "ADAMW_8BIT"])
def test_8bit_optimizers_keep_embedding_tables_in_fp32_as_a_hf_trainer_does(tmp_path, tokenizer, token_rows, optim):
    config = slimtune.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    model = lora_model(tokenizer, config)
    trainer = make_trainer(model, token_rows, tmp_path, tokenizer, optim=optim, max_steps=1)
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = {names[id(p)]: sorted(trainer.optimizer.state[p]) for g in trainer.optimizer.param_groups
             for p in g["params"]}
    table = next(n for n in kinds if "embed_tokens" in n)
    big_lora = next(n for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad and p.numel() >= 4096)
    assert "exp_avg" in kinds[table] and next(p for n, p in model.named_parameters() if n == table).numel() >= 4096
    assert "exp_avg_codes" in kinds[big_lora]  # other large tensors (the head's copy) keep 8-bit moments


def test_ctrl_c_asks_to_stop_then_aborts():
    notes = []
    with StopRequest(notes.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and "saving a checkpoint" in notes[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_repeated_sigterm_never_aborts_the_stop_but_ctrl_c_does():
    """A job's every process signalled and torchrun forwarding it: each rank gets SIGTERM twice, and its
    checkpoint at the step boundary must still be saved."""
    notes = []
    with StopRequest(notes.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and len(notes) == 1 and "SIGTERM: stopping after this step" in notes[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_in_training_saves_a_resumable_checkpoint(tmp_path, tokenizer, token_rows, monkeypatch):
    trainer = make_trainer(lora_model(tokenizer), token_rows, tmp_path, tokenizer, max_steps=6)
    step = trainer.train_step

    def interrupted_step():
        out = step()
        if trainer.state.step == 2:  # the step being run is the 3rd: Ctrl-C arrives during it
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer, "train_step", interrupted_step)
    assert trainer.train() is False and trainer.state.step == 3
    saved = tmp_path / "checkpoints" / "step-000003"
    assert sorted(p.name for p in saved.iterdir()) == ["adapter", "tensors.safetensors", "trainer_state.json"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left


def test_a_diverging_run_stops_and_never_checkpoints_non_finite_weights(tmp_path, tokenizer, token_rows,
                                                                        monkeypatch):
    """A loss that turns NaN stops the run with advice; weights that turned inf/NaN in the update right before a
    checkpoint are not saved, so keep_checkpoints=1 never replaces the last good checkpoint with them."""
    trainer = make_trainer(lora_model(tokenizer), token_rows, tmp_path, tokenizer, max_steps=6, save_every=2,
                           keep_checkpoints=1)
    step = trainer.train_step

    def poisoned_step():
        out = step()
        if trainer.state.step == 3:  # the 4th step's update leaves a NaN weight behind; its loss was finite
            with torch.no_grad():
                next(p for p in trainer.model.parameters() if p.requires_grad).view(-1)[0] = math.nan
        return out

    monkeypatch.setattr(trainer, "train_step", poisoned_step)
    with pytest.raises(TrainingDivergedError, match=r"step 4: trained weights are inf or NaN: the training diverged.*"
                                                    r"last checkpoint, step-000002, holds finite weights"):
        trainer.train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]

    (tmp_path / "lr").mkdir()
    nan_loss = make_trainer(lora_model(tokenizer), token_rows, tmp_path / "lr", tokenizer, learning_rate=1e30,
                            max_grad_norm=None, max_steps=6)
    with pytest.raises(TrainingDivergedError, match=r"step \d: the loss is nan: .*learning_rate \(now 1e\+30\), set "
                                                    r"training.max_grad_norm \(now null\)"):
        nan_loss.train()
    assert not (tmp_path / "lr" / "checkpoints").exists()


def test_metrics_truncate_and_memory(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(5):
        log.write({"step": step, "loss": float(step)})
    with open(log.path, "ab") as fh:  # damage: bytes that are not UTF-8, rows that are not objects ...
        fh.write(b'\xff\xfe{"step": 7}\n3\n{"step": "x"}\n{"step": 9, "lo')  # ... and a line cut by a crash
    assert [r["step"] for r in log.rows()] == [0, 1, 2, 3, 4]
    log.truncate_after(2)
    assert [r["step"] for r in log.rows()] == [0, 1, 2]
    assert peak_memory_mb(CPU) > 10
    assert math.isfinite(peak_memory_mb(CPU))


def test_a_full_disk_under_the_metrics_log_is_a_save_error_naming_it(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 1.0})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(progress, "open", full, raising=False)
    with pytest.raises(SaveError, match=r"cannot append to .*metrics.jsonl: No space left on device; free some disk "
                                        r"space .*--resume") as caught:
        log.write({"step": 2, "loss": 0.5})
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert [r["step"] for r in log.rows()] == [1]


@pytest.mark.parametrize("config", [slimtune.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                                    slimtune.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8,
                                                                 task_type="CAUSAL_LM")],
                         ids=["prompt_tuning", "p_tuning"])
def test_the_loss_skips_the_virtual_tokens_of_prompt_methods(config):
    """Virtual tokens go before the text: the trainer scores the text's positions only, as the model's own loss
    (PEFT's: the virtual tokens' labels are -100) does."""
    model = tiny_llama().eval()
    slimtune.add_adapter(model, config)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        ours = loss_sum(model, batch, contextlib.nullcontext) / label_tokens(batch)
        theirs = model(**batch).loss
    torch.testing.assert_close(ours, theirs)


def test_auto_loss_falls_back_when_the_forward_changes_logits_unknown_to_the_chunked_loss():
    """A model whose forward transforms its logits in a way the chunked loss does not know of (here: a subclass
    scaling them by 1.1, as Falcon-H1's lm_head_multiplier did before the chunked loss knew it) is caught by the
    probe: ``auto`` keeps the model's own loss, ``chunked`` says why. The probe compares logits: a random-weight
    model's small logits hardly move the loss (the loss comparison passed it), yet every gradient was 10% off."""
    from transformers import LlamaForCausalLM

    from slimtune.train.losses import chunked_loss_refusal, chunked_loss_works

    class ScalingLlama(LlamaForCausalLM):
        def forward(self, *args, labels=None, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.1
            if labels is not None:
                out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
            return out

    model = tiny_llama()
    assert chunked_loss_works(model, "auto")
    scaling = ScalingLlama(model.config)
    assert not chunked_loss_works(scaling, "auto")
    assert "logits differ from ScalingLlama's own" in chunked_loss_refusal(scaling, "auto")
    assert chunked_loss_refusal(model, "auto") is None and chunked_loss_refusal(model, "full") == "training.loss: full"
    with pytest.raises(ValueError, match="logits differ from ScalingLlama's own"):
        chunked_loss_works(scaling, "chunked")


def test_the_logit_transform_is_read_from_a_composite_models_text_config():
    """Gemma 3n's softcap lives in its text_config (transformers reads get_text_config()); it was missed."""
    from transformers import Gemma3nConfig

    from slimtune.perf.losses import logit_transform

    holder = torch.nn.Module()
    holder.config = Gemma3nConfig()
    assert logit_transform(holder).softcap == holder.config.get_text_config().final_logit_softcapping == 30.0


def test_a_micro_batch_without_labels_adds_no_tokens(tmp_path, tokenizer, token_rows):
    # a rank's stand-in at an epoch's short end (distributed.data): all labels masked, none of the run's tokens
    stand_in = {**token_rows[0], "labels": [IGNORE_INDEX] * len(token_rows[0]["labels"])}
    rows = [token_rows[0], stand_in]
    trainer = make_trainer(lora_model(tokenizer), rows, tmp_path, tokenizer, max_steps=1, batch_size=1,
                           gradient_accumulation_steps=2)
    trainer.batches = BatchIterator(rows, 1, seed=0, pad_id=tokenizer.pad_token_id, shuffle=False)
    assert trainer.train_step()["tokens"] == len(token_rows[0]["input_ids"])
