"""Generation prompts: the ids generate feeds are the ones training saw; prompts it cannot run are clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from tokenizers import processors
from train_helpers import make_tokenizer, tiny_llama

import slimtune
from slimtune.train.generation import generate_text, prompt_ids, sample_prompt
from slimtune.train.templates import encode_example


@pytest.mark.parametrize("chat", [True, False])
def test_generate_feeds_the_training_prompt_even_when_the_tokenizer_appends_eos(chat):
    tok = make_tokenizer() if chat else make_tokenizer(chat_template=None)
    bos, eos = tok.bos_token, tok.eos_token  # a post-processor adding BOS ... EOS (add_eos_token=True Llamas)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    example = {"prompt": "Say hello", "response": "hi"}
    ids = prompt_ids(tok, example["prompt"])
    assert ids == encode_example(example, tok)[0] and ids[-1] != tok.eos_token_id


def test_empty_and_too_long_prompts_are_clear_errors():
    tok = make_tokenizer(chat_template=None)
    tok = copy.deepcopy(tok)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])  # no BOS
    model = tiny_llama(vocab_size=len(tok))
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_text(model, tok, "", max_new_tokens=2, raw=True, silent=True)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match=r"the prompt's \d+ tokens and --max-new-tokens 8 exceed the model's 32 "
                                         r"positions: shorten the prompt or lower --max-new-tokens"):
        generate_text(gpt2, tok, "word " * 30, max_new_tokens=8, raw=True, silent=True)
    assert generate_text(gpt2, tok, "word " * 3, max_new_tokens=2, raw=True, silent=True) is not None
    text = next("word " * n for n in range(1, 30) if len(prompt_ids(tok, "word " * n, raw=True)) > 14)
    fits = len(prompt_ids(tok, text, raw=True))
    assert fits + 8 <= 32 < fits + 8 + 10  # room for the prompt and 8 new tokens, not for 10 virtual ones too
    generate_text(gpt2, tok, text, max_new_tokens=8, raw=True, silent=True)
    slimtune.add_adapter(gpt2, slimtune.PromptTuningConfig(num_virtual_tokens=10))
    with pytest.raises(ValueError, match=rf"the prompt's {fits} tokens and --max-new-tokens 8 exceed the model's 32 "
                                         r"positions less the 10 its prompt-learning adapter puts first \(22 left\)"):
        generate_text(gpt2, tok, text, max_new_tokens=8, raw=True, silent=True)
    with slimtune.disable_adapters(gpt2):  # the base model alone has its 32
        generate_text(gpt2, tok, text, max_new_tokens=8, raw=True, silent=True)


def test_generation_stops_at_the_models_own_end_tokens_too():
    """An instruct model's end of turn (generation_config.eos_token_id, a list: Llama 3's <|eot_id|>) ends the
    answer as transformers' generate does, besides the tokenizer's EOS; it ran on to max_new_tokens."""
    tok = make_tokenizer(chat_template=None)
    model = tiny_llama(vocab_size=len(tok)).eval()
    ids = torch.tensor([prompt_ids(tok, "word word", raw=True)])
    free = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    end = free[2]
    answer = free[:free.index(end) + 1]
    assert len(answer) < 8
    model.generation_config.eos_token_id = [tok.eos_token_id, end]
    text = generate_text(model, tok, "word word", max_new_tokens=8, raw=True, silent=True)
    assert text == tok.decode(answer, skip_special_tokens=True)


def test_a_system_prompt_is_fed_as_training_rendered_it():
    """`slimtune generate --system` and the run's sample (from an evaluation example with a system prompt) feed
    the prompt part training saw for that example; the system prompt was dropped."""
    tok = make_tokenizer()
    example = {"system": "Answer in French.", "prompt": "Say hello", "response": "bonjour"}
    ids = prompt_ids(tok, "Say hello", system="Answer in French.")
    assert ids == encode_example(example, tok)[0] and ids != prompt_ids(tok, "Say hello")
    sample = sample_prompt(None, example)
    assert (sample.text, sample.system) == ("Say hello", "Answer in French.")
    with pytest.raises(ValueError, match="a system prompt needs a template"):
        prompt_ids(tok, "Say hello", raw=True, system="Answer in French.")
