"""Prompt templates: turn a normalized example into prompt token ids and response token ids.

With a tokenizer that has a chat template (SmolLM2-Instruct has one) the example is rendered as
messages ``[system] + history + [user: prompt] + [assistant: response]``; the prompt part is what the
template renders with ``add_generation_prompt=True`` — exactly what inference feeds the model —
and the response part is the rest. Without a chat template, the plain template is::

    {system}\n\n                      (only when there is a system prompt)
    ### Instruction:\n{user turn}\n\n### Response:\n{assistant turn}\n\n   (each history pair)
    ### Instruction:\n{prompt}\n\n### Response:\n{response}<eos>

The rendered text is tokenized whole (:func:`tokenize_pieces`) and cut into the two parts by character
offsets, so the ids are those of the whole conversation as ``apply_chat_template`` tokenizes it.
The response always ends with exactly one EOS: a template that writes text after its end-of-turn
token (ChatML writes ``<|im_end|>\\n``) has that tail cut, since the model should stop at EOS.

Examples marked ``train_all_turns`` (ShareGPT rows) are cut into segments instead, every assistant
turn trained and everything else not (:func:`encode_conversation`). Plain-text examples take no template
at all (:func:`encode_texts`).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from slimtune.errors import DataError

PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


def to_messages(example: Mapping[str, Any]) -> list[dict[str, str]]:
    """The example as chat messages, the response last (a system prompt given as "" is rendered as such: the
    template's default system prompt, which some write when there is none, is not the same text)."""
    messages = [{"role": "system", "content": example["system"]}] if example.get("system") is not None else []
    messages += [dict(m) for m in example.get("history", [])]  # role, content (and an answer's reasoning_content)
    answer = {"role": "assistant", "content": example["response"]}
    if example.get("reasoning") is not None:
        answer["reasoning_content"] = example["reasoning"]
    messages += [{"role": "user", "content": example["prompt"]}, answer]
    return messages


def _check_plain(example: Mapping[str, Any]) -> None:
    """Refuse what the plain template has no place for (an answer's reasoning would be dropped)."""
    if example.get("reasoning") or any(m.get("reasoning_content") for m in example.get("history", [])):
        raise DataError("an example holds 'reasoning_content', which the plain template has no place for (it would "
                        "be trained without it); use a tokenizer whose chat template renders it (Qwen3's, "
                        "DeepSeek-R1's), or drop the field.")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_plain(example: Mapping[str, Any]) -> tuple[str, str]:
    """``(prompt_text, response_text)`` with the plain ``### Instruction / ### Response`` template."""
    _check_plain(example)
    parts = [f"{example['system']}\n\n"] if example.get("system") else []
    history = example.get("history", [])
    for turn in history:
        if turn["role"] == "user":
            parts.append(PLAIN_PROMPT.format(prompt=turn["content"]))
        else:
            parts.append(f"{turn['content']}\n\n")
    parts.append(PLAIN_PROMPT.format(prompt=example["prompt"]))
    return "".join(parts), example["response"]


def apply_template(tokenizer: Any, messages: list[dict[str, str]], example: Mapping[str, Any], **options: Any) -> str:
    """``tokenizer.apply_chat_template`` as text; a template that refuses the conversation (Gemma's refuses a
    system turn, many refuse two user turns in a row) is a :class:`DataError` naming the example."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as error:
        if type(error).__module__.split(".")[0] != "jinja2":  # the templates' own raise_exception(...)
            raise
        first = str(example.get("prompt", ""))[:60]
        raise DataError(f"the example whose prompt begins {first!r}: the tokenizer's chat template refuses its "
                        f"turns {[m['role'] for m in messages]} ({error}). Reshape such rows (no system prompt, "
                        "user and assistant turns alternating), or use the plain template: data.use_chat_template: "
                        "false in a recipe, --no-chat-template for `slimtune generate` / `eval`.") from None


def render_chat(example: Mapping[str, Any], tokenizer: Any) -> tuple[str, str]:
    """``(prompt_text, response_text)`` with the tokenizer's chat template."""
    messages = to_messages(example)
    prompt = apply_template(tokenizer, messages[:-1], example, add_generation_prompt=True)
    full = apply_template(tokenizer, messages, example)
    _check_rendered(full, messages[-1], example)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    # Some templates render the last turn otherwise once it is answered (one adding a reasoning block to the
    # generation prompt only, one moving the system prompt into the last user turn): the whole rendering is
    # trained, cut at the longest prefix it shares with the generation prompt, which then is not what training saw.
    warnings.warn("the tokenizer's chat template renders the generation prompt differently from the start of the "
                  "answered conversation (it adds or moves text in the last turn), so the prompt `slimtune "
                  "generate` feeds is not what training saw; training cuts the whole rendering where the two part. "
                  "Check the template (or use data.use_chat_template: false).", stacklevel=2)
    cut = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    return full[:cut], full[cut:]


def _check_rendered(full: str, answer: Mapping[str, Any], example: Mapping[str, Any]) -> None:
    """Refuse a rendering that left out the answer's text or its reasoning: a template that reads content only as a
    list of parts (a vision model's) renders a string as nothing, one without a thinking block drops
    ``reasoning_content``; the turn would train on its markup alone."""
    for key in ("content", "reasoning_content"):
        text = str(answer.get(key) or "").rpartition("</think>")[2] if key == "content" else str(answer.get(key) or "")
        text = text.strip()[-40:].strip()  # its end: a template may rewrite a <think> block before it (R1 drops it,
        if text and text not in full:  # Qwen3 re-renders it)
            first = str(example.get("prompt", ""))[:60]
            raise DataError(f"the example whose prompt begins {first!r}: the tokenizer's chat template does not "
                            f"render its answer's {key!r} (a template that reads content only as a list of parts, or "
                            "one without a reasoning block?), so it cannot be trained; use a tokenizer whose template "
                            "renders it, the plain template (data.use_chat_template: false), or drop the field.")


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


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"Tokenizer {type(tokenizer).__name__} has no EOS token; set one (tokenizer.eos_token = ...) "
                         "so the model learns where a response (or a document) ends.")
    return int(eos)


TOKENIZE_CHUNK = 256  # texts per tokenizer call (still a batch for the Rust tokenizer's threads)


def tokenize_pieces(tokenizer: Any, pieces: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Token ids of each text's pieces, the text tokenized whole, as ``apply_chat_template(tokenize=True)`` and
    inference tokenize it (a SentencePiece tokenizer prepends ``▁`` to every text it starts, and byte-level BPE
    merges across a cut: tokenizing the pieces apart added a space token before every answer, or an extra
    newline). A token belongs to the piece it starts in. A tokenizer without offsets (a slow one) gets the
    pieces tokenized apart."""
    if len(pieces) > TOKENIZE_CHUNK:  # the offsets of a whole dataset at once cost the demo 0.1 GiB of peak
        return [out for start in range(0, len(pieces), TOKENIZE_CHUNK)
                for out in tokenize_pieces(tokenizer, pieces[start:start + TOKENIZE_CHUNK])]
    texts = ["".join(parts) for parts in pieces]
    try:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return [tokenizer(list(parts), add_special_tokens=False)["input_ids"] if parts else [] for parts in pieces]
    out, straddled = [], False
    for parts, ids, offsets in zip(pieces, encoded["input_ids"], encoded["offset_mapping"]):
        ends = list(itertools.accumulate(len(part) for part in parts))
        split: list[list[int]] = [[] for _ in parts]
        piece = 0
        for token, (start, stop) in zip(ids, offsets):
            while piece < len(parts) - 1 and start >= ends[piece]:
                piece += 1
            straddled |= piece < len(parts) - 1 and start < ends[piece] < stop
            split[piece].append(token)
        out.append(split)
    if straddled:
        warnings.warn("some examples' answers start with characters that share a token with the end of the prompt "
                      "(e.g. an answer starting with spaces or a line break, after the template's own line break): "
                      "that token counts as prompt, so those characters are not trained (as TRL labels them). Strip "
                      "the answers' leading whitespace if it matters.", stacklevel=2)
    return out


def encode_examples(
    examples: Sequence[Mapping[str, Any]], tokenizer: Any, use_chat_template: bool | None = None
) -> list[tuple[list[int], list[int]]]:
    """Token ids ``(prompt_ids, response_ids)`` per example; each ``response_ids`` ends with EOS.

    ``use_chat_template``: None picks the chat template when the tokenizer has one; True requires
    it; False forces the plain template. Texts are encoded in batches (the Rust tokenizer then
    uses every core).
    """
    eos = _eos_id(tokenizer)
    chat = _use_chat(tokenizer, use_chat_template)
    if not examples:
        return []
    texts = [render_chat(ex, tokenizer) if chat else render_plain(ex) for ex in examples]
    # A chat template writes its own BOS text when the model needs one; the plain one adds it
    # only where the tokenizer itself would (Llama yes, GPT-2 no).
    bos = [tokenizer.bos_token_id] if not chat and _adds_bos(tokenizer) else []
    out = []
    for prompt_ids, response_ids in tokenize_pieces(tokenizer, texts):
        end = _eos_end(response_ids, eos, tokenizer)
        out.append((bos + prompt_ids, response_ids[:end] if end is not None else response_ids + [eos]))
    return out


def _eos_end(ids: list[int], eos: int, tokenizer: Any) -> int | None:
    """Where an answer's ids end: after its last EOS when nothing but whitespace follows it (a template's line
    break after its end-of-turn token, cut). None when there is no such EOS: an EOS inside the answer's own
    text (a literal ``<eos>``, in a template whose turns end with another token) is not its end."""
    if eos not in ids:
        return None
    end = len(ids) - ids[::-1].index(eos)
    return end if not tokenizer.decode(ids[end:]).strip() else None


def encode_texts(texts: Sequence[str], tokenizer: Any, end: bool = True) -> list[list[int]]:
    """Token ids of plain texts as a causal LM reads a document: the tokenizer's own BOS where it adds one,
    the text, then EOS (so documents packed together are separated, and the model learns where one ends);
    ``end=False`` leaves the EOS out (the opening of a text, to continue)."""
    eos = [_eos_id(tokenizer)] if end else []
    if not texts:
        return []
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    return [bos + ids + eos for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


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
        text = apply_template(tokenizer, messages, example, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    return bos + tokenizer(render_plain({**example, "response": ""})[0], add_special_tokens=False)["input_ids"]


Segment = tuple[list[int], bool]  # (token ids, whether they carry the loss)


def _chat_segments(example: Mapping[str, Any], tokenizer: Any) -> list[tuple[str, bool]]:
    """The chat-template text of a conversation cut into (text, is an assistant turn) pieces.

    An assistant turn ``i`` spans from the end of the generation prompt of ``messages[:i]`` to the end of
    ``messages[:i + 1]`` rendered, as :func:`render_chat` cuts the last turn; that needs a template whose
    renderings of a conversation's prefixes are prefixes of the whole (ChatML, Llama 3, Mistral, ... are).
    """
    messages = to_messages(example)
    full = apply_template(tokenizer, messages, example)
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if not any(m["role"] == "user" for m in messages[:i]):  # a greeting before any user turn: context
            continue
        before = apply_template(tokenizer, messages[:i], example, add_generation_prompt=True)
        through = apply_template(tokenizer, messages[: i + 1], example)
        if not (full.startswith(before) and full.startswith(through) and done <= len(before) <= len(through)):
            raise ValueError("the tokenizer's chat template renders earlier turns differently once later turns "
                             "follow, so every assistant turn cannot be trained; use chat 'messages' rows (only "
                             "the last answer trained) or data.use_chat_template=false.")
        pieces += [(full[done:len(before)], False), (full[len(before):len(through)], True)]
        done = len(through)
    return pieces


def _plain_segments(example: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """:func:`render_plain`'s text cut into (text, is an assistant turn) pieces."""
    _check_plain(example)
    pieces = [(f"{example['system']}\n\n", False)] if example.get("system") else []
    asked = False  # a greeting before the first user turn is context
    for turn in [*example.get("history", []), {"role": "user", "content": example["prompt"]}]:
        if turn["role"] == "user":
            pieces.append((PLAIN_PROMPT.format(prompt=turn["content"]), False))
            asked = True
        else:  # an assistant turn is trained; a system note between turns is context, as a leading one is
            pieces += [(turn["content"], turn["role"] == "assistant" and asked), ("\n\n", False)]
    return [*pieces, (example["response"], True)]


def encode_conversation(example: Mapping[str, Any], tokenizer: Any, use_chat_template: bool | None = None
                        ) -> list[Segment]:
    """Token segments of a multi-turn example: each assistant turn (and its end-of-turn EOS) trained, the
    rest (system, user turns, template markup) not. Concatenated, the ids are the whole conversation as
    the template renders it; the last turn ends with exactly one EOS, as in :func:`encode_examples`.
    """
    eos = _eos_id(tokenizer)
    chat = _use_chat(tokenizer, use_chat_template)
    pieces = _chat_segments(example, tokenizer) if chat else _plain_segments(example)
    bos = [tokenizer.bos_token_id] if not chat and _adds_bos(tokenizer) else []
    ids = tokenize_pieces(tokenizer, [[text for text, _ in pieces]])[0]
    segments: list[Segment] = [(bos, False)] if bos else []
    for (_, trained), piece in zip(pieces, ids):
        end = _eos_end(piece, eos, tokenizer) if trained else None
        if end is not None:  # the turn ends at its EOS; what a template writes after it is context
            segments += [(piece[:end], True), (piece[end:], False)]
        else:
            segments.append((piece, trained))
    while segments and not segments[-1][1]:  # nothing follows the last answer ...
        segments.pop()
    if segments and eos not in segments[-1][0][-1:]:  # ... which ends with EOS
        segments[-1] = (segments[-1][0] + [eos], True)
    return [(piece, trained) for piece, trained in segments if piece]
