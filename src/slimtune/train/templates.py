"""Prompt templates: turn a normalized example into prompt token ids and response token ids.

With a tokenizer that has a chat template (SmolLM2-Instruct has one) the example is rendered as
messages ``[system] + history + [user: prompt] + [assistant: response]``; the prompt part is what the
template renders with ``add_generation_prompt=True`` — exactly what inference feeds the model —
and the response part is the rest. Without a chat template, the plain template is::

    {system}\n\n                      (only when there is a system prompt)
    ### Instruction:\n{user turn}\n\n### Response:\n{assistant turn}\n\n   (each history pair)
    ### Instruction:\n{prompt}\n\n### Response:\n{response}<eos>

The two parts are tokenized separately (as at inference, where the prompt is tokenized alone).
The response always ends with exactly one EOS: a template that writes text after its end-of-turn
token (ChatML writes ``<|im_end|>\\n``) has that tail cut, since the model should stop at EOS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


def to_messages(example: Mapping[str, Any]) -> list[dict[str, str]]:
    """The example as chat messages, the response last."""
    messages = [{"role": "system", "content": example["system"]}] if example.get("system") else []
    messages += [{"role": m["role"], "content": m["content"]} for m in example.get("history", [])]
    messages += [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["response"]}]
    return messages


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_plain(example: Mapping[str, Any]) -> tuple[str, str]:
    """``(prompt_text, response_text)`` with the plain ``### Instruction / ### Response`` template."""
    parts = [f"{example['system']}\n\n"] if example.get("system") else []
    history = example.get("history", [])
    for turn in history:
        if turn["role"] == "user":
            parts.append(PLAIN_PROMPT.format(prompt=turn["content"]))
        else:
            parts.append(f"{turn['content']}\n\n")
    parts.append(PLAIN_PROMPT.format(prompt=example["prompt"]))
    return "".join(parts), example["response"]


def render_chat(example: Mapping[str, Any], tokenizer: Any) -> tuple[str, str]:
    """``(prompt_text, response_text)`` with the tokenizer's chat template."""
    messages = to_messages(example)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    # Templates are expected to extend the generation prompt; some (e.g. ones that insert a
    # reasoning block into the last turn) do not, so split at the longest shared prefix.
    cut = len(prompt) if full.startswith(prompt) else next(
        (i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full))
    )
    return full[:cut], full[cut:]


def _use_chat(tokenizer: Any, use_chat_template: bool | None) -> bool:
    chat = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if chat and not has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template; pass False or None.")
    return chat


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_examples(
    examples: Sequence[Mapping[str, Any]], tokenizer: Any, use_chat_template: bool | None = None
) -> list[tuple[list[int], list[int]]]:
    """Token ids ``(prompt_ids, response_ids)`` per example; each ``response_ids`` ends with EOS.

    ``use_chat_template``: None picks the chat template when the tokenizer has one; True requires
    it; False forces the plain template. Texts are encoded in batches (the Rust tokenizer then
    uses every core).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"Tokenizer {type(tokenizer).__name__} has no EOS token; set one (tokenizer.eos_token = ...) so the "
            f"model learns where a response ends."
        )
    chat = _use_chat(tokenizer, use_chat_template)
    if not examples:
        return []
    texts = [render_chat(ex, tokenizer) if chat else render_plain(ex) for ex in examples]
    # A chat template writes its own BOS text when the model needs one; the plain one adds it
    # only where the tokenizer itself would (Llama yes, GPT-2 no).
    bos = [tokenizer.bos_token_id] if not chat and _adds_bos(tokenizer) else []
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in texts], add_special_tokens=False)["input_ids"]
    out = []
    for prompt_ids, response_ids in zip(prompts, responses):
        if eos in response_ids:  # cut what a template writes after its end-of-turn token
            last = len(response_ids) - 1 - response_ids[::-1].index(eos)
            response_ids = response_ids[: last + 1]
        else:
            response_ids = response_ids + [eos]
        out.append((bos + prompt_ids, response_ids))
    return out


def encode_example(
    example: Mapping[str, Any], tokenizer: Any, use_chat_template: bool | None = None
) -> tuple[list[int], list[int]]:
    """:func:`encode_examples` for one example."""
    return encode_examples([example], tokenizer, use_chat_template)[0]


def encode_prompt(
    prompt: str | Mapping[str, Any], tokenizer: Any, use_chat_template: bool | None = None
) -> list[int]:
    """Token ids of a prompt as training renders an example's prompt part, for generation.

    ``prompt`` is the user text, or an example-like dict (``prompt`` plus optional ``system`` and
    ``history``). With a chat template this is the generation prompt (what ``render_chat`` puts
    before the response when the template extends it).
    """
    example = {"prompt": prompt} if isinstance(prompt, str) else dict(prompt)
    if _use_chat(tokenizer, use_chat_template):
        messages = to_messages({**example, "response": ""})[:-1]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    return bos + tokenizer(render_plain({**example, "response": ""})[0], add_special_tokens=False)["input_ids"]
