"""Prompt tuning, P-tuning and prefix tuning: PEFT parity (outputs, generation, files both ways),
init modes, folding, training, round trips, clean removal and the errors users hit."""

import copy
import json

import peft
import pytest
import torch
from tiny_models import FAMILIES, VOCAB, logits, sample_inputs, tiny_gpt2, tiny_llama
from tiny_models import one_thread  # noqa: F401 (a fixture, used by pytestmark)

import slimtune
from slimtune.methods.prompts import PROMPT_CONTAINER

TOL = 1e-5
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}
METHODS = {  # name -> (PEFT config class, our config class, extra kwargs)
    "prompt": (peft.PromptTuningConfig, slimtune.PromptTuningConfig, {}),
    "p_mlp": (peft.PromptEncoderConfig, slimtune.PromptEncoderConfig, {"encoder_hidden_size": 16}),
    "p_lstm": (peft.PromptEncoderConfig, slimtune.PromptEncoderConfig,
               {"encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM"}),
    "prefix": (peft.PrefixTuningConfig, slimtune.PrefixTuningConfig, {}),
    "prefix_mlp": (peft.PrefixTuningConfig, slimtune.PrefixTuningConfig,
                   {"prefix_projection": True, "encoder_hidden_size": 8}),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(family, method, p=3):
    """Base model, PEFT's prompt adapter and ours holding the same (random) prompt weights."""
    theirs_cls, ours_cls, extra = METHODS[method]
    base = FAMILIES[family][0]()
    kwargs = {"task_type": TASKS[family], "num_virtual_tokens": p, **extra}
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cls(**kwargs))
    ours = slimtune.inject(copy.deepcopy(base), ours_cls(**kwargs))
    shared = {k.removeprefix("base_model."): v for k, v in theirs.state_dict().items() if "prompt_encoder" in k}
    assert shared and not ours.load_state_dict(shared, strict=False).unexpected_keys
    return base, theirs, ours


def _randomise_heads(*models):
    """Make the SEQ_CLS head copies differ from the originals, identically in every model."""
    for model in models:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.1)


CASES = [(f, m) for f in TASKS for m in METHODS if not (f == "t5" and m == "p_lstm")]


@pytest.mark.parametrize("family, method", CASES)
def test_forward_matches_peft(family, method):
    base, theirs, ours = _pair(family, method)
    _randomise_heads(theirs, ours)
    inputs = sample_inputs(family)
    expected = logits(theirs, inputs)
    got = logits(ours, inputs)
    assert got.shape == expected.shape  # causal LMs: logits for the virtual positions too, as PEFT
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    if expected.shape == logits(base, inputs).shape:
        assert (expected - logits(base, inputs)).abs().max() > 1e-4


@pytest.mark.parametrize("family, method", [(f, m) for f in TASKS for m in ("prompt", "p_mlp", "prefix_mlp")])
def test_adapter_files_move_both_ways(family, method, tmp_path):
    base, theirs, ours = _pair(family, method)
    _randomise_heads(theirs, ours)
    inputs = sample_inputs(family)
    slimtune.save_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(in_peft, inputs), logits(ours, inputs), atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(in_ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)
    # both folders hold the same keys: one prompt_embeddings tensor (+ the head copy for SEQ_CLS)
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))


@pytest.mark.parametrize("family, method", [(f, m) for f in ("llama", "gpt2", "t5") for m in ("prompt", "p_mlp",
                                                                                            "prefix")])
def test_generate_matches_peft_and_the_uncached_result(family, method):
    _, theirs, ours = _pair(family, method)
    with torch.no_grad():
        for name, p in ours.named_parameters():  # a strong prompt, so generation depends on it
            if PROMPT_CONTAINER in name:
                p.mul_(3)
        for name, p in theirs.named_parameters():
            if PROMPT_CONTAINER in name:
                p.mul_(3)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                  pad_token_id=0)
    expected = theirs.generate(**kwargs)[:, -6:]
    cached = ours.generate(**kwargs)
    torch.testing.assert_close(cached[:, -6:], expected, atol=0, rtol=0)
    torch.testing.assert_close(ours.generate(**kwargs, use_cache=False), cached, atol=0, rtol=0)
    with slimtune.disable_adapters(ours):  # and the prompt matters
        assert not torch.equal(ours.generate(**kwargs), cached)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_left_padded_batch_generates_like_single_rows(method):
    _, _, ours = _pair("llama", method)
    with torch.no_grad():
        for p in getattr(ours, PROMPT_CONTAINER).parameters():
            p.mul_(3)
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[9, 10, 11, 12, 13]])
    batch = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    g = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    together = ours.generate(input_ids=batch, attention_mask=mask, **g)[:, -4:]
    alone = torch.cat([ours.generate(input_ids=x, attention_mask=torch.ones_like(x), **g)[:, -4:]
                       for x in (short, long)])
    torch.testing.assert_close(together, alone, atol=0, rtol=0)


def _train(model, family, steps=8, lr=0.3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = sample_inputs(family, batch=4, seq=12)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


# (method, trainable params on tiny Llama (d = 32, L = 2, kv_dim = 16) with p = 4)
FORMULAS = {
    "prompt": 4 * 32,
    "p_mlp": 4 * 32 + (32 * 16 + 16) + (16 * 16 + 16) + (16 * 32 + 32),
    # bidirectional 2-layer LSTM (h = 8): per layer and direction 4h·(input + h) + 2·4h, input d then 2h
    "p_lstm": 4 * 32 + 2 * (4 * 8 * (32 + 8) + 8 * 8) + 2 * (4 * 8 * (16 + 8) + 8 * 8)
    + (16 * 16 + 16) + (16 * 32 + 32),
    "prefix": 4 * 2 * 2 * 16,
    "prefix_mlp": 4 * 16 + (16 * 8 + 8) + (8 * 2 * 2 * 16 + 2 * 2 * 16),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_count_training_and_save_load_round_trip(method, tmp_path):
    _, ours_cls, extra = METHODS[method]
    base = tiny_llama()
    model = slimtune.inject(copy.deepcopy(base), ours_cls(task_type="CAUSAL_LM", num_virtual_tokens=4, **extra))
    assert slimtune.trainable_parameters(model).trainable == FORMULAS[method]
    assert all(PROMPT_CONTAINER in n for n, p in model.named_parameters() if p.requires_grad)
    losses = _train(model, "llama")
    assert losses[-1] < losses[0] - 0.04
    slimtune.save_adapter(model, tmp_path)
    loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    assert not hasattr(getattr(loaded, PROMPT_CONTAINER)["default"], "mlp_head")  # saved folded
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["p_mlp", "prefix_mlp"])
def test_folding_the_encoder_keeps_outputs(method):
    _, _, ours = _pair("llama", method)
    inputs = sample_inputs("llama")
    before = logits(ours, inputs)
    module = getattr(ours, PROMPT_CONTAINER)["default"]
    slimtune.fold_prompt_encoder(ours)
    assert not module.has_heads() and module.embedding.weight.requires_grad
    torch.testing.assert_close(logits(ours, inputs), before, atol=1e-6, rtol=0)


def test_prompt_init_from_vocabulary_and_from_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(["[UNK]", "classify", "the", "sentiment"], start=10)}
    raw = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    base = tiny_llama()
    table = base.get_input_embeddings().weight
    text = slimtune.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", tokenizer_name_or_path=str(
        tmp_path), prompt_tuning_init_text="classify the sentiment")
    rows = getattr(slimtune.inject(copy.deepcopy(base), text), PROMPT_CONTAINER)["default"].embedding.weight
    torch.testing.assert_close(rows, table[[11, 12, 13, 11, 12]], atol=0, rtol=0)  # text ids, repeated
    vocab = slimtune.PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB")
    rows = getattr(slimtune.inject(copy.deepcopy(base), vocab), PROMPT_CONTAINER)["default"].embedding.weight
    assert all(any(torch.equal(r, t) for t in table) for r in rows)


def test_unload_and_disable_give_back_the_base_model():
    base = tiny_gpt2()
    inputs = sample_inputs("gpt2")
    model = slimtune.inject(copy.deepcopy(base), slimtune.PromptTuningConfig(num_virtual_tokens=3))
    assert logits(model, inputs).shape[1] == 13
    with slimtune.disable_adapters(model):
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    with pytest.raises(slimtune.NotMergeableError, match="virtual tokens"):
        slimtune.merge_and_unload(model)
    slimtune.unload(model)
    assert not hasattr(model, PROMPT_CONTAINER) and not model._forward_pre_hooks
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)


def test_saved_config_is_complete_and_peft_shaped(tmp_path):
    model = slimtune.inject(tiny_llama(), slimtune.PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    slimtune.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "PREFIX_TUNING" and data["inference_mode"] is True
    # grouped-query attention: token_dim = kv heads · head_dim, as PEFT sizes the cache
    assert (data["num_layers"], data["token_dim"], data["num_attention_heads"]) == (2, 16, 2)


@pytest.mark.parametrize("cls", [slimtune.PromptTuningConfig, slimtune.PromptEncoderConfig,
                                 slimtune.PrefixTuningConfig])
@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_num_virtual_tokens_must_be_positive(cls, bad):
    with pytest.raises(ValueError, match=f"num_virtual_tokens={bad}"):
        cls(num_virtual_tokens=bad)


def test_prefix_tuning_needs_a_usable_cache():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4,
                                                                 hidden_dim=64))
    with pytest.raises(ValueError, match="past_key_values.*DistilBertForSequenceClassification has none"):
        slimtune.inject(model, slimtune.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))
    assert not hasattr(model, "slimtune_state")  # nothing was changed
    llama = tiny_llama()
    getattr(llama, "activation_checkpointing_enable", llama.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        slimtune.inject(llama, slimtune.PrefixTuningConfig(num_virtual_tokens=2))


def test_prompt_tuning_text_init_needs_its_inputs():
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        slimtune.PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="encoder_reparameterization_type='GRU'"):
        slimtune.PromptEncoderConfig(encoder_reparameterization_type="GRU")
