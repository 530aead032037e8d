"""Prompt tuning, P-tuning and prefix tuning: PEFT parity (outputs, generation, files both ways),
init modes, folding, training, round trips, clean removal and the errors users hit.

Two oracles: HF PEFT itself, wherever it works with the installed transformers, and PEFT's outputs
captured as fixtures under the newest transformers where it is verified correct (5.23.0, see
tests/fixtures/peft_prompts/capture.py): PEFT 0.21.2 refuses prefix tuning on BERT from transformers
5.24 and its cached generation there disagrees with its own greedy decoding, so live checks skip
those (saying why) and the captured ones always run.
"""

import copy
import json

import pytest
import torch
from oracles import CapturedCase, check_files_move_both_ways
from prompt_cases import (
    CASES,
    GENERATE_CASES,
    METHODS,
    TASKS,
    base_model,
    generate_inputs,
    greedy_by_forward,
    ours_for,
    peft_adapter_state,
    peft_for,
    randomise_heads,
    strengthen_prompts,
)
from tiny_models import (
    FAMILIES,
    VOCAB,
    logits,
    one_thread,  # noqa: F401 (a fixture, used by pytestmark)
    sample_inputs,
    tiny_gpt2,
    tiny_llama,
)

import slimtune
from slimtune.core.state import get_state
from slimtune.methods.prompts import PROMPT_CONTAINER

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(family, method, p=3):
    """Base model, PEFT's prompt adapter and ours holding the same (random) prompt weights; skips with
    the reason when PEFT cannot build this case on the installed transformers."""
    base = base_model(family)
    try:
        theirs = peft_for(base, family, method, p)
    except ValueError as error:  # e.g. "Model does not support past key values": PEFT's check of the old name
        pytest.skip(f"PEFT refuses {family}-{method} on this transformers ({error}); "
                    "checked against PEFT's captured outputs instead")
    ours = ours_for(base, family, method, p)
    shared = {k: v for k, v in peft_adapter_state(theirs).items() if PROMPT_CONTAINER in k}
    assert shared and not ours.load_state_dict(shared, strict=False).unexpected_keys
    return base, theirs, ours


def _peft_logits(theirs, inputs):
    try:
        return logits(theirs, inputs)
    except ValueError as error:
        if "past key values" not in str(error):
            raise
        pytest.skip(f"PEFT refuses prefix tuning here on this transformers ({error}): its check looks for the "
                    "argument name `past_key_values`; checked against PEFT's captured outputs instead")


def _ours(family, method):
    return ours_for(base_model(family), family, method)


@pytest.mark.parametrize("family, method", CASES)
def test_forward_matches_peft(family, method):
    base, theirs, ours = _pair(family, method)
    randomise_heads(theirs, ours)
    inputs = sample_inputs(family)
    expected = _peft_logits(theirs, inputs)
    got = logits(ours, inputs)
    assert got.shape == expected.shape  # causal LMs: logits for the virtual positions too, as PEFT
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    if expected.shape == logits(base, inputs).shape:
        assert (expected - logits(base, inputs)).abs().max() > 1e-4


@pytest.mark.parametrize("family, method", CASES)
def test_forward_matches_captured_peft(family, method):
    case = CapturedCase("forward", family, method)
    base = case.base(FAMILIES[family][0])
    ours = ours_for(base, family, method)
    case.load_adapter_into(ours)
    inputs = case.part("input")
    expected = case.tensors["expected.logits"]
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)
    if expected.shape == case.tensors["base.logits"].shape:
        torch.testing.assert_close(logits(base, inputs), case.tensors["base.logits"], atol=TOL, rtol=0)
        assert (expected - case.tensors["base.logits"]).abs().max() > 1e-4  # the prompt matters


@pytest.mark.parametrize("family, method", [(f, m) for f in TASKS for m in ("prompt", "p_mlp", "prefix_mlp")])
def test_adapter_files_move_both_ways(family, method, tmp_path):
    base, theirs, ours = _pair(family, method)
    randomise_heads(theirs, ours)
    # both folders hold the same keys: one prompt_embeddings tensor (+ the head copy for SEQ_CLS)
    check_files_move_both_ways(base, theirs, ours, sample_inputs(family), tmp_path, TOL, logits, _peft_logits)


@pytest.mark.parametrize("family, method", [(f, m) for f in TASKS for m in ("prompt", "p_mlp", "prefix_mlp")])
def test_adapter_files_match_captured_peft_both_ways(family, method, tmp_path):
    """PEFT's saved folder loads in slimtune with PEFT's outputs; slimtune's save of the same adapter holds
    the tensors and config values PEFT wrote (so PEFT loads it as it loads its own)."""
    from safetensors.torch import load_file, save_file

    case = CapturedCase("files", family, method)
    base = case.base(FAMILIES[family][0])
    theirs_dir = tmp_path / "theirs"
    theirs_dir.mkdir()
    save_file(case.part("file"), theirs_dir / "adapter_model.safetensors")
    (theirs_dir / "adapter_config.json").write_text(json.dumps(case.meta["adapter_config"]))
    inputs = case.part("input")
    loaded = slimtune.load_adapter(copy.deepcopy(base), theirs_dir)
    torch.testing.assert_close(logits(loaded, inputs), case.tensors["expected.logits"], atol=TOL, rtol=0)
    ours = ours_for(base, family, method)
    case.load_adapter_into(ours)
    slimtune.save_adapter(ours, tmp_path / "ours")
    written = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(written) == set(case.part("file"))
    for key, value in case.part("file").items():
        torch.testing.assert_close(written[key], value, atol=1e-6, rtol=0)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = case.meta["adapter_config"]
    same = lambda k: set(config[k] or ()) == set(theirs_config[k] or ()) if k == "modules_to_save" else \
        config[k] == theirs_config[k]  # noqa: E731 (PEFT appends its head names again on every save)
    differ = {k for k in config if k in theirs_config and not same(k)}
    assert differ <= {"base_model_name_or_path", "revision"}, {k: (config[k], theirs_config[k]) for k in differ}


@pytest.mark.parametrize("family, method", GENERATE_CASES)
def test_generate_is_greedy_decoding_from_first_principles(family, method):
    """Cached and uncached generation equal greedy decoding by full forward passes, and the prompt matters."""
    ours = _ours(family, method)
    strengthen_prompts(ours)
    kwargs = generate_inputs()
    steps = kwargs["max_new_tokens"]
    cached = ours.generate(**kwargs)[:, -steps:]
    torch.testing.assert_close(cached, greedy_by_forward(ours, family, kwargs["input_ids"], steps), atol=0, rtol=0)
    torch.testing.assert_close(ours.generate(**kwargs, use_cache=False)[:, -steps:], cached, atol=0, rtol=0)


@pytest.mark.parametrize("family, method", GENERATE_CASES)
def test_generate_matches_captured_peft(family, method):
    case = CapturedCase("generate", family, method)
    base = case.base(FAMILIES[family][0])
    ours = ours_for(base, family, method)
    case.load_adapter_into(ours)
    kwargs = {**generate_inputs(), "input_ids": case.tensors["input.input_ids"]}
    steps = case.meta["max_new_tokens"]
    torch.testing.assert_close(ours.generate(**kwargs)[:, -steps:], case.tensors["expected.tokens"], atol=0, rtol=0)
    with slimtune.disable_adapters(ours):
        torch.testing.assert_close(ours.generate(**kwargs)[:, -steps:], case.tensors["base.tokens"], atol=0, rtol=0)
    assert not torch.equal(case.tensors["expected.tokens"], case.tensors["base.tokens"])  # the prompt matters


@pytest.mark.parametrize("family, method", GENERATE_CASES)
def test_generate_matches_live_peft(family, method):
    """Where PEFT's own cached generation is right on the installed transformers (it equals PEFT's greedy
    decoding by full forward passes), ours equals it token for token."""
    _, theirs, ours = _pair(family, method)
    strengthen_prompts(theirs, ours)
    kwargs = generate_inputs()
    steps = kwargs["max_new_tokens"]
    expected = theirs.generate(**kwargs)[:, -steps:]
    if not torch.equal(expected, greedy_by_forward(theirs, family, kwargs["input_ids"], steps)):
        pytest.skip("PEFT's cached generation disagrees with its own greedy decoding on this transformers; "
                    "test_generate_matches_captured_peft holds the oracle")
    torch.testing.assert_close(ours.generate(**kwargs)[:, -steps:], expected, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_left_padded_batch_generates_like_single_rows(method):
    ours = _ours("llama", method)
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
    model = slimtune.add_adapter(copy.deepcopy(base), ours_cls(task_type="CAUSAL_LM", num_virtual_tokens=4, **extra))
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
    rows = getattr(slimtune.add_adapter(copy.deepcopy(base), text), PROMPT_CONTAINER)["default"].embedding.weight
    torch.testing.assert_close(rows, table[[11, 12, 13, 11, 12]], atol=0, rtol=0)  # text ids, repeated
    vocab = slimtune.PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB")
    rows = getattr(slimtune.add_adapter(copy.deepcopy(base), vocab), PROMPT_CONTAINER)["default"].embedding.weight
    assert all(any(torch.equal(r, t) for t in table) for r in rows)


def test_unload_and_disable_give_back_the_base_model():
    base = tiny_gpt2()
    inputs = sample_inputs("gpt2")
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.PromptTuningConfig(num_virtual_tokens=3))
    assert logits(model, inputs).shape[1] == 13
    with slimtune.disable_adapters(model):
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    with pytest.raises(slimtune.NotMergeableError, match="virtual tokens"):
        slimtune.merge_and_unload(model)
    slimtune.unload(model)
    assert not hasattr(model, PROMPT_CONTAINER) and not model._forward_pre_hooks
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)


def test_saved_config_is_complete_and_peft_shaped(tmp_path):
    model = slimtune.add_adapter(tiny_llama(), slimtune.PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
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
        slimtune.add_adapter(model, slimtune.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))
    assert not hasattr(model, "slimtune_state")  # nothing was changed
    llama = tiny_llama()
    getattr(llama, "activation_checkpointing_enable", llama.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        slimtune.add_adapter(llama, slimtune.PrefixTuningConfig(num_virtual_tokens=2))


def test_prompt_tuning_text_init_needs_its_inputs():
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        slimtune.PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="encoder_reparameterization_type='GRU'"):
        slimtune.PromptEncoderConfig(encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match=r"tokenizer_kwargs=\{'use_fast': False\} only apply with prompt_tuning_init"):
        slimtune.PromptTuningConfig(tokenizer_kwargs={"use_fast": False})  # PEFT refuses these too


def test_p_tuning_options_its_mlp_encoder_does_not_use_are_warned_about():
    with pytest.warns(UserWarning, match=r"MLP encoder .*: encoder_num_layers=5, encoder_dropout=0.1 is ignored"):
        slimtune.PromptEncoderConfig(encoder_num_layers=5, encoder_dropout=0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimtune.PromptEncoderConfig()
        slimtune.PromptEncoderConfig(encoder_num_layers=5, encoder_dropout=0.1, encoder_reparameterization_type="LSTM")


@pytest.mark.parametrize("layout", [dict(multi_query=True), dict(multi_query=False),
                                    dict(new_decoder_architecture=True, num_kv_heads=2)],
                         ids=["multi-query (Falcon-7B)", "multi-head", "new decoder architecture"])
def test_prefix_tuning_sizes_falcons_cache(layout):
    """Falcon's config has no num_key_value_heads: the prefix must still have the heads its cache holds (one for
    multi-query attention, every query head otherwise), or the first forward fails."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    base = FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          **layout)).eval()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.PrefixTuningConfig(num_virtual_tokens=3,
                                                                                   task_type="CAUSAL_LM"))
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    heads = 1 if layout.get("multi_query") else 4
    assert get_state(model).configs["default"].token_dim == heads * 8
    assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4
    assert model.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=False).shape == (1, 8)


@pytest.mark.parametrize("family, task_type", [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS")])
@pytest.mark.parametrize("cls", [slimtune.PromptTuningConfig, slimtune.PrefixTuningConfig])
def test_a_prompt_adapter_without_task_type_takes_the_models_and_peft_applies_it(family, task_type, cls, tmp_path):
    """PEFT loads a prompt adapter whose file has no task_type as a plain PeftModel that ignores the prompt; so
    the task is read from the model's head (as the sizes are) and saved."""
    if family == "bert" and cls is slimtune.PrefixTuningConfig:
        pytest.skip("PEFT 0.21.2 refuses prefix tuning on BERT under transformers 5.24 (see the module docstring)")
    base = base_model(family)
    model = slimtune.add_adapter(copy.deepcopy(base), cls(num_virtual_tokens=3))
    strengthen_prompts(model)
    config = get_state(model).configs["default"]
    assert config.task_type == task_type
    assert config.modules_to_save == (["classifier", "score"] if task_type == "SEQ_CLS" else None)
    slimtune.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == task_type
    import peft
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    inputs = sample_inputs(family)
    torch.testing.assert_close(logits(theirs, inputs), logits(model.eval(), inputs), atol=TOL, rtol=0)
    plain = logits(base, inputs)  # (prompt tuning on a causal LM also returns the virtual tokens' logits)
    assert (logits(model, inputs)[:, -plain.shape[1]:] - plain).abs().max() > 1e-3


@pytest.mark.parametrize("head", ["BertForTokenClassification", "BertForQuestionAnswering",
                                  "LlamaForTokenClassification"])
def test_a_prompt_adapter_of_a_token_or_span_head_carries_the_head_as_peft_does(head, tmp_path):
    """PEFT trains (and its loader expects) a copy of the new classifier / qa_outputs head for TOKEN_CLS and
    QUESTION_ANS, as for SEQ_CLS: the saved adapter holds it, and PEFT loads it with the same outputs."""
    import peft
    import transformers

    torch.manual_seed(0)
    labels = 2 if "QuestionAnswering" in head else 3  # a span head: start and end
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=labels) if head.startswith("Bert") else \
        transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_labels=labels)
    base = getattr(transformers, head)(config).eval()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.PromptTuningConfig(num_virtual_tokens=3))
    strengthen_prompts(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)  # the head copy moves away from the base's
    slimtune.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_out, theirs_out = model.eval()(input_ids=ids), theirs(input_ids=ids)
    for key in ("logits", "start_logits", "end_logits"):
        if getattr(ours_out, key, None) is not None:
            torch.testing.assert_close(getattr(theirs_out, key), getattr(ours_out, key), atol=TOL, rtol=0)


def test_the_task_of_a_model_without_a_known_head_must_be_given():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64))
    with pytest.raises(ValueError, match="cannot tell the task of a BertForMaskedLM; set task_type"):
        slimtune.add_adapter(model, slimtune.PromptTuningConfig(num_virtual_tokens=2))
    assert not hasattr(model, "slimtune_state")
    assert get_state(slimtune.add_adapter(tiny_llama().model, slimtune.PromptTuningConfig(
        num_virtual_tokens=2))).configs["default"].task_type == "FEATURE_EXTRACTION"


def test_prefix_tuning_sizes_a_cache_whose_heads_do_not_make_up_the_hidden_size(tmp_path):
    """Gemma-7B's layout (16 heads and 16 key/value heads of 256 for a hidden size of 3072): the prefix holds
    heads × head_dim per layer, as PEFT sizes it, and both libraries read each other's files."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, head_dim=16)).eval()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.PrefixTuningConfig(num_virtual_tokens=3,
                                                                                   task_type="CAUSAL_LM"))
    strengthen_prompts(model)
    assert get_state(model).configs["default"].token_dim == 4 * 16
    slimtune.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(theirs, inputs), logits(model.eval(), inputs), atol=TOL, rtol=0)
    assert (logits(model, inputs) - logits(base, inputs)).abs().max() > 1e-3


def test_prefix_tuning_on_a_seq2seq_model_needs_both_submodules():
    with pytest.raises(ValueError, match="needs num_transformer_submodules=2 .* got 1; leave it unset"):
        slimtune.add_adapter(base_model("t5"), slimtune.PrefixTuningConfig(
            num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM", num_transformer_submodules=1))


@pytest.mark.parametrize("method", METHODS)
def test_a_fixed_size_cache_or_a_prepared_mask_is_refused_by_name(method):
    from transformers import StaticCache

    model = ours_for(base_model("llama"), "llama", method).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    kind = METHODS[method][1].peft_type
    with pytest.raises(ValueError, match=f"a {kind} adapter .*StaticCache has no room.*dynamic cache"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static")
    cache = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(ValueError, match="StaticCache has no room"):
        model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"needs the 2-D \(batch, seq\) attention mask .*got \(1, 1, 4, 4\)"):
        model(ids, attention_mask=torch.ones(1, 1, 4, 4))
    model(ids, attention_mask=torch.ones(1, 4, dtype=torch.long))  # the tokenizer's mask: fine


@pytest.mark.parametrize("cls", [slimtune.PromptTuningConfig, slimtune.PromptEncoderConfig])
def test_virtual_tokens_take_the_width_of_the_token_embeddings(cls):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)  # OPT-350m's layout: tokens embedded in 16, projected to the hidden size 32
    model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                                     num_attention_heads=2, ffn_dim=64, max_position_embeddings=64)).eval()
    config = cls(num_virtual_tokens=3)
    slimtune.add_adapter(model, config)
    assert get_state(model).configs["default"].token_dim == 16 and config.token_dim is None
    out = model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    assert out.logits.shape == (1, 6, VOCAB) and torch.isfinite(out.loss)


@pytest.mark.parametrize("config, message", [
    (slimtune.PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2),
     r"num_transformer_submodules=2 is for encoder-decoder models.*a CAUSAL_LM model takes one prompt"),
    (slimtune.PromptTuningConfig(num_virtual_tokens=2, token_dim=48), r"token_dim=48, but LlamaForCausalLM's token "
                                                                      r"embeddings are 32 wide"),
    (slimtune.PrefixTuningConfig(num_virtual_tokens=2, num_layers=3), r"num_layers=3, but LlamaForCausalLM has 2 "),
    (slimtune.PrefixTuningConfig(num_virtual_tokens=2, num_layers=1), r"num_layers=1, but LlamaForCausalLM has 2 "),
], ids=["submodules", "token_dim", "more layers", "fewer layers"])
def test_sizes_set_by_hand_must_be_the_models(config, message):
    # PEFT prepends 2p rows (and pads the mask by p), crashes on a missing layer, or mis-sizes the prefix
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        slimtune.add_adapter(model, config)
    assert not hasattr(model, "slimtune_state")


def test_a_prefix_sized_by_hand_for_another_width_is_refused():
    with pytest.raises(ValueError, match=r"token_dim=48, but GPT2LMHeadModel's attention has 32"):
        slimtune.add_adapter(tiny_gpt2(), slimtune.PrefixTuningConfig(num_virtual_tokens=2, token_dim=48))
    with pytest.raises(ValueError, match=r"num_attention_heads=8, but GPT2LMHeadModel's attention has 4"):
        slimtune.add_adapter(tiny_gpt2(), slimtune.PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=8))


def test_an_encoder_decoder_prefix_may_size_its_layers_for_a_decoder_of_another_depth():
    # distilbart's shape: 3 encoder, 2 decoder layers; num_layers=2 is what runs (the model's count is the encoder's)
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64)).eval()
    slimtune.add_adapter(model, slimtune.PrefixTuningConfig(num_virtual_tokens=3, num_layers=2))
    model(input_ids=torch.randint(3, 100, (2, 6)), decoder_input_ids=torch.randint(3, 100, (2, 4)))
