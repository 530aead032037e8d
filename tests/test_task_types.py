"""Every method of the PEFT family on the three task types: causal LM (Llama), seq2seq (T5) and
sequence classification (a BERT encoder and a Llama decoder with a ``score`` head): the model runs,
outputs have the right shape, a few training steps lower the loss, and only what should train does."""

import pytest
import torch
from tiny_models import (
    one_thread,  # noqa: F401 (a fixture, used by pytestmark)
    sample_inputs,
    tiny_bert_cls,
    tiny_llama,
    tiny_llama_cls,
    tiny_t5,
)

import slimtune

pytestmark = pytest.mark.usefixtures("one_thread")

# task name -> (builder, sample_inputs family, task_type, IA3 targets, IA3 feed-forward targets)
TASKS = {
    "causal_llama": (tiny_llama, "llama", "CAUSAL_LM", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "seq2seq_t5": (tiny_t5, "t5", "SEQ_2_SEQ_LM", ["k", "v", "wo"], ["wo"]),
    "cls_bert": (tiny_bert_cls, "bert", "SEQ_CLS", ["key", "value", "output.dense"], ["output.dense"]),
    "cls_llama": (tiny_llama_cls, "llama", "SEQ_CLS", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}
P = 4  # virtual tokens


def _config(method, task):
    _, _, task_type, targets, ff = TASKS[task]
    return {
        "ia3": lambda: slimtune.IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=ff),
        "houlsby": lambda: slimtune.BottleneckConfig(task_type=task_type, reduction_factor=4),
        "pfeiffer": lambda: slimtune.BottleneckConfig(task_type=task_type, adapter_type="pfeiffer"),
        "prompt": lambda: slimtune.PromptTuningConfig(task_type=task_type, num_virtual_tokens=P),
        "p_tuning": lambda: slimtune.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=P),
        "prefix": lambda: slimtune.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P),
        "bitfit": lambda: slimtune.BitFitConfig(task_type=task_type),
        "selective": lambda: slimtune.SelectiveConfig(task_type=task_type, layers_to_transform=[1]),
    }[method]()


LR = {"ia3": 0.3, "houlsby": 1e-2, "pfeiffer": 1e-2, "prompt": 0.3, "p_tuning": 1e-2, "prefix": 0.3,
      "bitfit": 5e-2, "selective": 1e-2}
# BitFit needs biases: of these models only BERT has them (it raises a clear error on the others).
CASES = [(m, t) for m in LR for t in TASKS if m != "bitfit" or t == "cls_bert"]


def _train(model, task, lr, steps=6):
    """Train ``steps`` steps; return the eval-mode loss (no dropout, no LayerDrop) before and after."""
    batch, labels = _batch(task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(**batch, labels=labels).loss.item()

    before = eval_loss()
    model.train()
    for _ in range(steps):
        out = model(**batch, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, eval_loss(), out, batch, labels


def _batch(task):
    family, task_type = TASKS[task][1], TASKS[task][2]
    batch = sample_inputs(family, batch=4, seq=12)
    if task_type == "SEQ_CLS":
        return batch, torch.tensor([0, 1, 2, 1])
    if task_type == "SEQ_2_SEQ_LM":
        return {"input_ids": batch["input_ids"]}, batch["decoder_input_ids"]
    return batch, batch["input_ids"]


@pytest.mark.parametrize("method, task", CASES)
def test_method_trains_on_task(method, task):
    model = TASKS[task][0]()
    config = _config(method, task)
    slimtune.add_adapter(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if TASKS[task][2] == "SEQ_CLS":  # the randomly initialised head always trains (PEFT's default)
        assert any("modules_to_save" in n for n in trainable)
    lr = min(LR[method], 0.05) if TASKS[task][2] == "SEQ_CLS" else LR[method]  # the head trains at this lr, too
    before, after, out, batch, labels = _train(model, task, lr)
    assert after < before - 0.02, (before, after)
    virtual = P if method in ("prompt", "p_tuning") else 0  # causal LMs return logits for virtual tokens too
    expected = {"CAUSAL_LM": (4, batch["input_ids"].shape[1] + virtual, 128),
                "SEQ_2_SEQ_LM": (4, labels.shape[-1], 128), "SEQ_CLS": (4, 3)}[TASKS[task][2]]
    assert tuple(out.logits.shape) == expected


@pytest.mark.parametrize("task", ["causal_llama", "seq2seq_t5", "cls_bert"])
def test_layerdrop_with_lora_trains_on_task(task):
    model = TASKS[task][0]()
    targets = {"causal_llama": ["q_proj", "v_proj"], "seq2seq_t5": ["q", "v"], "cls_bert": ["query", "value"]}[task]
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=targets, modules_to_save=(
        ["classifier"] if task == "cls_bert" else None)))
    slimtune.apply_layerdrop(model, 0.2)
    torch.manual_seed(0)
    before, after, *_ = _train(model, task, lr=5e-2, steps=8)
    assert after < before - 0.02, (before, after)


@pytest.mark.parametrize("peft_type", ["IA3", "BOTTLENECK", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "BITFIT",
                                       "SELECTIVE", "LAYERDROP"])
def test_every_config_is_buildable_by_name_for_recipes(peft_type):
    minimal = {"IA3": {"target_modules": ["k_proj"], "feedforward_modules": []},
               "SELECTIVE": {"target_parameters": ["bias"]}}.get(peft_type, {})
    config = slimtune.config_from_dict({"peft_type": peft_type, "task_type": "SEQ_CLS", **minimal})
    assert config.peft_type == peft_type
    assert slimtune.config_from_dict(config.to_dict()) == config  # the JSON round trip is lossless
