"""Normalized examples: one raw row (prompt/response, Alpaca, chat ``messages``, ShareGPT ``conversations``,
plain ``text``) turned into ``{"prompt", "response"[, "system", "history"]}`` or ``{"text"}``; the accepted
forms are listed in :mod:`slimtune.train.data`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimtune.errors import DataError

PROMPT_KEYS = ("prompt", "instruction", "input")
RESPONSE_KEYS = ("response", "output", "completion")
CONTEXT_KEYS = ("input", "context")  # appended to the instruction (Alpaca, Databricks Dolly)
TEXT_KEY = "text"
_EXPECTED = ("'prompt' and 'response' (or 'instruction'/'input' and 'output', or chat 'messages', or ShareGPT "
             "'conversations', or plain 'text')")
# ShareGPT speaker names (``from``), and the chat roles (``role``) read the same way.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TOOL_KEYS = ("tool_calls", "function_call")  # an assistant turn that calls tools (OpenAI's and TRL's message fields)


def _text(row: Mapping[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r:.60}.")
    return value


def _content(message: Mapping[str, Any], where: str) -> str:
    """A chat message's text: a string, or the parts list newer datasets use (``[{"type": "text", "text": ...}]``),
    its text parts joined; other parts (images, audio) are refused, since the models trained here read text."""
    content = message["content"]
    if not isinstance(content, list):
        return _text(message, "content", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise DataError(f"{where}: content[{j}] is {part!r:.60}; only text parts ({{'type': 'text', 'text': "
                             f"...}}) can be trained here.")
        texts.append(part["text"])
    return "".join(texts)


def _turn(msg: Any, where: str) -> dict[str, Any]:
    """One chat message as a turn: role, text, and an assistant's ``reasoning_content`` (rendered by templates that
    know it, Qwen3's and DeepSeek-R1's); tool calls are refused rather than trained without them."""
    if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
        raise DataError(f"{where} must be an object with 'role' and 'content', got {msg!r:.80}.")
    if msg["role"] not in ("system", "user", "assistant"):
        raise DataError(f"{where} has role {msg['role']!r}; use 'system', 'user' or 'assistant'.")
    calls = next((key for key in TOOL_KEYS if msg.get(key)), None)
    if calls is not None:
        raise DataError(f"{where} holds {calls!r}: slimtune does not train tool calls yet (the answer would be "
                         "learned without them); leave such rows out of the data.")
    turn = {"role": msg["role"], "content": _content(msg, where)}
    reasoning = msg.get("reasoning_content")
    if reasoning is not None and msg["role"] == "assistant" and _text(msg, "reasoning_content", where):
        turn["reasoning_content"] = reasoning  # "" (a row without reasoning in a mixed set): none
    return turn


def _from_messages(messages: Any, where: str) -> dict[str, Any]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least a user and an assistant turn.")
    turns = [_turn(msg, f"{where}: messages[{i}]") for i, msg in enumerate(messages)]
    example: dict[str, Any] = {}
    if turns[0]["role"] == "system":
        example["system"] = turns.pop(0)["content"]
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        roles = [m["role"] for m in messages]
        raise DataError(f"{where}: messages must end with a user turn then an assistant turn; roles are {roles}.")
    example["prompt"], example["response"] = turns[-2]["content"], turns[-1]["content"]
    if "reasoning_content" in turns[-1]:
        example["reasoning"] = turns[-1]["reasoning_content"]
    if len(turns) > 2:
        example["history"] = turns[:-2]
    return example


def _from_sharegpt(conversation: Any, where: str) -> dict[str, Any]:
    """A ShareGPT conversation as a chat example whose every assistant turn is trained."""
    if not isinstance(conversation, list) or not conversation:
        raise DataError(f"{where}: 'conversations' must be a list of turns with 'from' and 'value'.")
    messages = []
    for i, turn in enumerate(conversation):
        keys = ("from", "value") if isinstance(turn, Mapping) and "from" in turn else ("role", "content")
        if not isinstance(turn, Mapping) or keys[0] not in turn or keys[1] not in turn:
            raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value' (or 'role' "
                             f"and 'content'), got {turn!r:.80}.")
        role = SHAREGPT_ROLES.get(str(turn[keys[0]]).lower())
        if role is None:
            raise DataError(f"{where}: conversations[{i}] is from {turn[keys[0]]!r}; use one of "
                             f"{sorted(SHAREGPT_ROLES)}.")
        messages.append({"role": role, "content": _text(turn, keys[1], f"{where}: conversations[{i}]")})
    while messages and messages[-1]["role"] != "assistant":  # nothing to learn after the last answer
        messages.pop()
    if not messages:
        raise DataError(f"{where}: the conversation has no 'gpt' (assistant) turn to learn.")
    return {**_from_messages(messages, where), "train_all_turns": True}


def _lists_tools(tools: Any) -> bool:
    """Whether a chat row's ``tools`` column names any tool (a list, or its JSON text; ``[]`` and "" name none)."""
    if isinstance(tools, str):
        return tools.strip() not in ("", "[]", "null")
    return bool(tools)


def _from_text(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    text = _text(row, TEXT_KEY, where)
    if not text.strip():
        raise DataError(f"{where}: the 'text' is empty; every example needs text to learn.")
    return {TEXT_KEY: text}


def is_text_example(example: Mapping[str, Any]) -> bool:
    """Whether ``example`` is plain text (trained on every token, no template) rather than prompt + response."""
    return TEXT_KEY in example


def normalize_example(row: Any, where: str) -> dict[str, Any]:
    """Turn one raw row into a normalized example; ``where`` (e.g. "data.jsonl: line 3") prefixes errors."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with {_EXPECTED}, got {type(row).__name__} {row!r:.80}.")
    prompt_key = next((k for k in PROMPT_KEYS if row.get(k) is not None), None)
    response_key = next((k for k in RESPONSE_KEYS if row.get(k) is not None), None)
    # TRL's conversational prompt-completion rows: message lists, the completion's last turn trained
    conversational = bool(prompt_key and response_key and isinstance(row[prompt_key], list)
                          and isinstance(row[response_key], list))
    chat = conversational or row.get("messages") is not None or row.get("conversations") is not None
    if chat and _lists_tools(row.get("tools")):
        raise DataError(f"{where}: the row lists 'tools' for its chat template: slimtune does not train tool use yet "
                         "(the template would render the conversation without them); leave such rows out.")
    if row.get("messages") is not None:  # None: a column other rows fill (Parquet, Arrow, HF datasets)
        example = _from_messages(row["messages"], where)
    elif row.get("conversations") is not None:
        example = _from_sharegpt(row["conversations"], where)
        if row.get("system") is not None and _text(row, "system", where):
            if example.get("system", row["system"]) != row["system"]:
                raise DataError(f"{where}: the row's 'system' and its first turn's system prompt differ; keep one.")
            example["system"] = row["system"]
    elif conversational:
        assert prompt_key is not None and response_key is not None
        example = _from_messages([*row[prompt_key], *row[response_key]], where)
    else:
        if (prompt_key is None or response_key is None) and row.get(TEXT_KEY) is not None:
            return _from_text(row, where)
        if prompt_key is None or response_key is None:
            empty = [k for k in (*PROMPT_KEYS, *RESPONSE_KEYS, TEXT_KEY) if k in row and row[k] is None]
            if empty:
                raise DataError(f"{where}: field {empty[0]!r} is empty (null, or a short CSV row); every example "
                                f"needs {_EXPECTED}.")
            raise DataError(f"{where}: row has no {_EXPECTED} fields; its fields are {sorted(map(str, row))}.")
        prompt = _text(row, prompt_key, where)
        for key in CONTEXT_KEYS:  # Alpaca's input, Dolly's context: after the instruction, a blank line between
            if key != prompt_key and row.get(key) is not None and _text(row, key, where).strip():
                prompt = f"{prompt}\n\n{row[key]}" if prompt else _text(row, key, where)
        example = {"prompt": prompt, "response": _text(row, response_key, where)}
        if row.get("system") is not None and _text(row, "system", where):  # an empty cell: no system prompt
            example["system"] = _text(row, "system", where)
    if not example["response"].strip():
        raise DataError(f"{where}: the response is empty; every example needs text to learn.")
    return example
