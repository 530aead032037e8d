"""Loading user data, templates and tokenization (masking, truncation, packing), collation, batching."""

from __future__ import annotations

import copy
import json
import types
import warnings
from dataclasses import replace

import datasets
import pyarrow as pa
import pyarrow.feather
import pytest
import torch
from train_helpers import tiny_llama

from slimtune.errors import DataError
from slimtune.train import data as data_module
from slimtune.train.batching import BatchIterator, collate, epoch_order, real_tokens
from slimtune.train.data import load_examples, split_examples
from slimtune.train.examples import normalize_example
from slimtune.train.losses import label_tokens
from slimtune.train.recipe import recipe_from_dict
from slimtune.train.runner import load_data
from slimtune.train.templates import encode_conversation, encode_example, encode_prompt, render_plain
from slimtune.train.tokenization import IGNORE_INDEX, tokenize_examples

ROWS = [
    {"prompt": "Say hi", "response": "hello world"},
    {"instruction": "Add", "input": "1 and 2", "output": "3"},
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"},
    ]},
]
NORMALIZED = [
    {"prompt": "Say hi", "response": "hello world"},
    {"prompt": "Add\n\n1 and 2", "response": "3"},
    {"system": "Be brief.", "prompt": "second", "response": "two",
     "history": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"}]},
]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------- loading
def test_jsonl_json_and_memory_rows_normalize(tmp_path):
    jsonl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert load_examples(jsonl) == NORMALIZED
    assert load_examples(write(tmp_path / "d.json", json.dumps(ROWS))) == NORMALIZED
    assert load_examples(write(tmp_path / "w.json", json.dumps({"data": ROWS}))) == NORMALIZED
    assert load_examples(ROWS) == NORMALIZED
    # A JSON object that names its splits is split by the file, not by hash.
    named = write(tmp_path / "s.json", json.dumps({"train": ROWS[:2], "validation": ROWS[2:]}))
    assert load_examples(named, split="validation") == NORMALIZED[2:]
    assert load_examples(named) == NORMALIZED


def test_csv_and_tsv(tmp_path):
    csv_file = write(tmp_path / "d.csv", 'prompt,response\nSay hi,"hello, world"\n"two\nlines",ok\n')
    assert load_examples(csv_file) == [
        {"prompt": "Say hi", "response": "hello, world"}, {"prompt": "two\nlines", "response": "ok"},
    ]
    stray = write(tmp_path / "s.csv", 'prompt,response\nfine,ok\n"Say" hello,ok\n"open,never closed\nmore,rows\n')
    with pytest.raises(DataError, match=r"s.csv: line 3: the row starting here is not readable as CSV .* doubled"):
        load_examples(stray)  # read leniently, the unclosed quote after it would swallow the rest of the file
    tsv = write(tmp_path / "d.tsv", "instruction\tinput\toutput\tsystem\nAdd\t\t3\tBe brief.\n")
    assert load_examples(tsv) == [{"prompt": "Add", "response": "3", "system": "Be brief."}]


def test_hash_split_is_disjoint_and_complete():
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(400)]
    train = load_examples(rows, split="train")
    val = load_examples(rows, split="validation", max_examples=1000)
    assert len(train) + len(val) == 400 and 5 <= len(val) <= 40
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in val}
    assert split_examples(load_examples(rows), "validation") == val  # pure function of the content


@pytest.mark.parametrize(
    "name, text, error, message",
    [
        ("d.jsonl", '{"prompt": "a", "response": "b"}\n\n{"question": "q", "answer": "a"}\n', ValueError,
         r"d.jsonl: line 3: row has no 'prompt' and 'response' .* its fields are \['answer', 'question'\]"),
        ("d.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": \n', ValueError, r"line 2: not valid JSON"),
        ("d.jsonl", "", ValueError, r"d.jsonl: the file is empty; it needs rows"),
        ("d.json", " \n", ValueError, r"d.json: the file is empty; it needs rows"),
        ("d.jsonl", "\n\n", ValueError, r"d.jsonl: the file is empty"),
        ("d.csv", "prompt,answer\nq,a\n", ValueError, r"d.csv: line 2: row has no .* \['answer', 'prompt'\]"),
        ("d.csv", "prompt,response,response\nq,a,b\n", ValueError,
         r"d.csv: line 1: the header names \['response'\] more than once"),
        ("d.csv", "prompt,response\nq,a\nq\n", ValueError, r"d.csv: line 3: field 'response' is empty \(null"),
        ("d.csv", 'prompt,response\nq1,a1\nq2,"a2\nq3,a3\nq4,a4\n', ValueError,  # not one row swallowing the rest
         r"d.csv: line 3: the row starting here opens a quote that never closes"),
        ("d.jsonl", '{"prompt": "q", "response": null}\n', ValueError, r"line 1: field 'response' is empty"),
        ("d.json", '{"rows": 3}', ValueError,
         r"object with named lists of rows \('train', and 'validation' or 'test'\) or a .data. list; .*\['rows'\]"),
        ("d.json", '[{"prompt": "a", "response": ""}]', ValueError, r"d.json: item 1: the response is empty"),
        ("d.json", '[{"prompt": 3, "response": "b"}]', ValueError, r"item 1: field 'prompt' must be a string, got int"),
        ("d.json", '[{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}]',
         ValueError, r"must end with a user turn then an assistant turn; roles are \['assistant', 'user'\]"),
        ("d.json", '[{"messages": [{"role": "bot", "content": "a"}, {"role": "user", "content": "q"}]}]',
         ValueError, r"messages\[0\] has role 'bot'"),
        ("d.xlsx", "x", ValueError, r"unknown format '.xlsx'; use one of \['.arrow', '.csv', '.json'"),
        ("d.parquet", "x", ValueError, r"d.parquet: not a readable parquet file"),
        ("d.json", '[{"conversations": [{"from": "bot", "value": "a"}]}]', ValueError,
         r"item 1: conversations\[0\] is from 'bot'; use one of \['assistant', 'gpt', 'human', 'system', 'user'\]"),
        ("d.json", '[{"conversations": [{"from": "human", "value": "q"}]}]', ValueError,
         r"item 1: the conversation has no 'gpt' \(assistant\) turn to learn"),
    ],
)
def test_bad_inputs_give_clear_errors(tmp_path, name, text, error, message):
    path = write(tmp_path / name, text)
    with pytest.raises(error, match=message):
        load_examples(path)


def test_missing_file_empty_split_and_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"Dataset '.*nope.jsonl' does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"Split 'validation' of dataset 'in-memory examples' is empty .*raise "
                                         r"data\.validation_fraction or give data\.eval_dataset.*--split all"):
        load_examples(ROWS[:1], split="validation", validation_fraction=0.0)
    with pytest.raises(ValueError, match=r"Split 'train' .* is empty .*lower data\.validation_fraction"):
        load_examples(ROWS[:1], split="train", validation_fraction=1.0)
    empty_split = write(tmp_path / "d.json", json.dumps({"train": ROWS, "validation": []}))
    with pytest.raises(ValueError, match=r"Split 'validation' of dataset '.*d.json' is empty: it has no rows"):
        load_examples(empty_split, split="validation")
    with pytest.raises(ValueError, match=r"split 'dev' is unknown"):
        load_examples(ROWS, split="dev")
    monkeypatch.setattr(data_module, "datasets", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match=r"'someone/data' is not a file.*pip install datasets"):
        load_examples("someone/data")


def test_hf_datasets_are_used_when_installed(monkeypatch):
    calls = []

    def load_dataset(name):
        calls.append(name)
        return {"train": ROWS[:2], "test": ROWS[2:]}

    monkeypatch.setattr(data_module, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_examples("someone/data", split="train") == NORMALIZED[:2]
    assert load_examples("someone/data", split="validation") == NORMALIZED[2:]  # "test" is the held-out split
    assert load_examples("someone/data") == [NORMALIZED[2]] + NORMALIZED[:2]  # every split, by name
    assert calls == ["someone/data"] * 3


def test_a_source_with_named_splits_trains_on_train_only_also_beside_an_eval_dataset(tmp_path):
    train_rows = [{"prompt": f"train {i}", "response": "a"} for i in range(5)]
    held_out = [{"prompt": f"held out {i}", "response": "b"} for i in range(3)]
    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows),
                          "test": datasets.Dataset.from_list(held_out)}).save_to_disk(folder)
    as_json = write(tmp_path / "splits.json", json.dumps({"train": train_rows, "validation": held_out}))
    other = write(tmp_path / "other.jsonl", "".join(json.dumps(r) + "\n" for r in held_out[:1]))
    for source in (str(folder), str(as_json)):
        for eval_dataset in (None, str(other)):
            recipe = recipe_from_dict({"method": {"peft_type": "LORA"},
                                       "data": {"dataset": source, "eval_dataset": eval_dataset}})
            train, evals = load_data(recipe)
            assert train == train_rows, (source, eval_dataset)
            assert evals == (held_out if eval_dataset is None else held_out[:1])
    # a dataset separate from the eval data is read whole; one that names only "train" is split by hash
    whole = recipe_from_dict({"method": {"peft_type": "LORA"}, "data": {"dataset": str(other)}})
    assert load_data(replace(whole, data=replace(whole.data, eval_dataset=str(other))))[0] == held_out[:1]
    only_train = write(tmp_path / "only_train.json", json.dumps({"train": ROWS}))
    assert load_examples(only_train, split="train", validation_fraction=0.5) == \
        split_examples(NORMALIZED, "train", validation_fraction=0.5)
    assert load_examples(only_train, split="validation", validation_fraction=0.5) == \
        split_examples(NORMALIZED, "validation", validation_fraction=0.5)
    no_train = write(tmp_path / "no_train.json", json.dumps({"test": ROWS}))
    with pytest.raises(ValueError, match=r"no 'train' split: it has \['test'\].*data\.eval_dataset"):
        load_examples(no_train, split="train")


def test_pycode_is_a_builtin_source():
    rows = load_examples("pycode", split="validation", max_examples=3)
    assert len(rows) == 3 and all(r["prompt"].startswith("Write ") for r in rows)


# ShareGPT: every assistant turn is trained (chat "messages" rows keep training the last one only).
SHAREGPT = {"conversations": [
    {"from": "system", "value": "Be brief."}, {"from": "human", "value": "first"}, {"from": "gpt", "value": "one"},
    {"from": "human", "value": "second"}, {"from": "gpt", "value": "two"}, {"from": "human", "value": "thanks"},
]}
SHAREGPT_NORMALIZED = {**NORMALIZED[2], "train_all_turns": True}  # the trailing human turn has nothing to learn


def test_sharegpt_and_alpaca_rows_are_recognized():
    as_roles = {"system": "Be brief.", "conversations": [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}]}
    assert load_examples([SHAREGPT, as_roles]) == [SHAREGPT_NORMALIZED] * 2
    alpaca = {"instruction": "Add", "input": "", "output": "3", "text": "### Instruction: Add ..."}  # flytech's fields
    assert load_examples([alpaca]) == [{"prompt": "Add", "response": "3"}]


def _trained_spans(tok, row):
    """The decoded runs of labelled tokens, after checking labels equal input_ids wherever they are set."""
    spans, current = [], []
    for token, label in [*zip(row["input_ids"], row["labels"]), (None, IGNORE_INDEX)]:
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans


def test_every_assistant_turn_is_trained_and_nothing_else(chat_tokenizer, plain_tokenizer):
    (row,) = tokenize_examples([SHAREGPT_NORMALIZED], chat_tokenizer, max_length=256).rows
    assert _trained_spans(chat_tokenizer, row) == ["one<|im_end|>", "two<|im_end|>"]
    # The row is the whole conversation as the template renders it (ChatML's last "\n" cut: it ends at EOS).
    messages = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                for t in SHAREGPT["conversations"][:5]]
    assert chat_tokenizer.decode(row["input_ids"]) == chat_tokenizer.apply_chat_template(messages, tokenize=False)[:-1]
    # The last turn is cut exactly as a single-turn example's response.
    assert encode_conversation(SHAREGPT_NORMALIZED, chat_tokenizer)[-1][0] == \
        encode_example(NORMALIZED[2], chat_tokenizer)[1]
    (plain,) = tokenize_examples([SHAREGPT_NORMALIZED], plain_tokenizer, max_length=256).rows
    assert _trained_spans(plain_tokenizer, plain) == ["one", "two<|im_end|>"]
    assert plain_tokenizer.decode(plain["input_ids"]) == "".join(render_plain(NORMALIZED[2])) + "<|im_end|>"
    # Cut at max_length: kept while some answer token fits, dropped when none does.
    first_answer = row["labels"].index(next(t for t in row["labels"] if t != IGNORE_INDEX))
    cut = tokenize_examples([SHAREGPT_NORMALIZED] * 2, chat_tokenizer, max_length=first_answer + 1)
    assert (cut.stats.n_truncated, cut.stats.n_dropped) == (2, 0)
    dropped = tokenize_examples([SHAREGPT_NORMALIZED, NORMALIZED[0]], chat_tokenizer, max_length=first_answer)
    assert (dropped.stats.n_dropped, len(dropped)) == (1, 1)


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        encode_conversation(SHAREGPT_NORMALIZED, tok)


def test_dolly_context_joins_the_instruction_like_alpacas_input():
    dolly = {"instruction": "Summarize.", "context": "A long text.", "response": "Short.", "category": "summarization"}
    assert normalize_example(dolly, "row") == {"prompt": "Summarize.\n\nA long text.", "response": "Short."}
    assert normalize_example({**dolly, "context": ""}, "row")["prompt"] == "Summarize."


def test_a_system_note_between_turns_is_context_not_an_answer(plain_tokenizer):
    conversation = {"conversations": [{"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"},
                                      {"from": "system", "value": "NOTE"}, {"from": "human", "value": "u2"},
                                      {"from": "gpt", "value": "a2"}]}
    (row,) = tokenize_examples([normalize_example(conversation, "row")], plain_tokenizer, max_length=256).rows
    assert _trained_spans(plain_tokenizer, row) == ["a1", "a2<|im_end|>"]
    assert "NOTE" in plain_tokenizer.decode(row["input_ids"])


def test_a_given_empty_system_prompt_is_rendered_and_an_empty_cell_is_none(chat_tokenizer, tmp_path):
    chat = normalize_example({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "yo"}]}, "row")
    prompt, _ = encode_example(chat, chat_tokenizer)
    expected = chat_tokenizer.apply_chat_template(
        [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}], tokenize=False,
        add_generation_prompt=True)
    assert chat_tokenizer.decode(prompt) == expected and expected.startswith("<|im_start|>system\n<|im_end|>")
    table = write(tmp_path / "d.csv", "system,prompt,response\n,hi,yo\nBe brief.,hi,yo\n")
    assert load_examples(table) == [{"prompt": "hi", "response": "yo"},
                                    {"prompt": "hi", "response": "yo", "system": "Be brief."}]


def test_a_chat_template_that_refuses_a_row_names_it_and_the_fix(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + chat_tokenizer.chat_template)
    refused = r"prompt begins 'hi': the tokenizer's chat template refuses its turns \['system', 'user'.*System role " \
              r"not supported.*data\.use_chat_template: false"
    with pytest.raises(DataError, match=refused):
        tokenize_examples([{"system": "be brief", "prompt": "hi", "response": "yo"}], tok, max_length=64)
    with pytest.raises(DataError, match=refused):
        tokenize_examples([{"system": "be brief", "prompt": "hi", "response": "yo", "train_all_turns": True}], tok,
                          max_length=64)
    with pytest.raises(DataError, match=refused):
        encode_prompt({"system": "be brief", "prompt": "hi"}, tok)
    assert tokenize_examples([{"prompt": "hi", "response": "yo"}], tok, max_length=64).rows


def test_parquet_arrow_and_saved_datasets(tmp_path, monkeypatch):
    rows = [{"prompt": "Say hi", "response": "hello world"}, {"instruction": "Add", "input": "1 and 2", "output": "3"},
            SHAREGPT]
    expected = [NORMALIZED[0], NORMALIZED[1], SHAREGPT_NORMALIZED]
    columns = sorted({key for row in rows for key in row})  # one schema: None in the other rows' columns
    table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
    pa.parquet.write_table(table, tmp_path / "d.parquet")
    pa.feather.write_feather(table, tmp_path / "file.arrow")  # Arrow's file format
    saved = datasets.Dataset(table)
    saved.save_to_disk(tmp_path / "saved")  # a folder of Arrow stream files
    assert load_examples(tmp_path / "d.parquet") == expected
    assert load_examples(tmp_path / "file.arrow") == expected
    assert load_examples(next((tmp_path / "saved").glob("*.arrow"))) == expected
    assert load_examples(tmp_path / "saved") == expected
    monkeypatch.setattr(data_module, "pyarrow_parquet", None)  # as if datasets (and pyarrow) were not installed
    with pytest.raises(ValueError, match=r"reading .parquet files needs pyarrow: `pip install datasets`"):
        load_examples(tmp_path / "d.parquet")


def test_a_dataset_view_renders_prompts_from_columns(tmp_path):
    qa = write(tmp_path / "qa.jsonl", json.dumps({"question": "2+2?", "answer": "4", "topic": "sums"}) + "\n")
    view = json.dumps({"source": str(qa), "prompt": "{topic}: {question} {{exact}}", "response": "answer",
                       "system": "You know {topic}."})
    assert load_examples(view) == [{"prompt": "sums: 2+2? {exact}", "response": "4", "system": "You know sums."}]
    ludwig = json.dumps({"source": "pycode-alpaca", "prompt": "### Instruction:\n{instruction}\n### Input:\n{input}",
                         "response": "output"})
    first = load_examples(ludwig, split="validation", max_examples=1)[0]
    plain = load_examples("pycode", split="validation", max_examples=1)[0]
    assert first["prompt"] == "### Instruction:\n" + plain["prompt"].replace(" It should do the following: ",
                                                                            "\n### Input:\n")
    assert first["response"] == plain["response"]
    with pytest.raises(ValueError, match=r"qa.jsonl: line 1: the dataset view needs columns \['input', 'output'\]; "
                                         r"the row has \['answer', 'question', 'topic'\]"):
        load_examples(json.dumps({"source": str(qa), "prompt": "{input}", "response": "output"}))
    with pytest.raises(ValueError, match="must be a JSON object with string fields 'source' and 'prompt'"):
        load_examples(json.dumps({"source": str(qa), "template": "{question}"}))


# ------------------------------------------------------------------------------------ tokenization
def test_chat_template_masks_the_prompt_and_ends_with_eos(chat_tokenizer):
    tok = chat_tokenizer
    (row,) = tokenize_examples(NORMALIZED[2:], tok, max_length=256).rows
    n_prompt = row["labels"].count(IGNORE_INDEX)
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # prompt first, all masked
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]  # response kept as is
    assert tok.decode(row["input_ids"][:n_prompt]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nfirst<|im_end|>\n"
        "<|im_start|>assistant\none<|im_end|>\n<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n"
    )
    # One EOS at the end: ChatML's "\n" after <|im_end|> is cut.
    assert tok.decode(row["input_ids"][n_prompt:]) == "two<|im_end|>"


def test_plain_template_without_chat_template(plain_tokenizer):
    prompt, response = encode_example(NORMALIZED[0], plain_tokenizer)
    assert plain_tokenizer.decode(prompt) == "### Instruction:\nSay hi\n\n### Response:\n"
    assert response[-1] == plain_tokenizer.eos_token_id and plain_tokenizer.decode(response[:-1]) == "hello world"
    assert render_plain(NORMALIZED[2])[0] == (
        "Be brief.\n\n### Instruction:\nfirst\n\n### Response:\none\n\n### Instruction:\nsecond\n\n### Response:\n"
    )
    with pytest.raises(ValueError, match="has no chat_template"):
        encode_example(NORMALIZED[0], plain_tokenizer, use_chat_template=True)


@pytest.mark.parametrize("fixture", ["chat_tokenizer", "plain_tokenizer"])
def test_generation_prompt_matches_the_training_prompt(request, fixture):
    tok = request.getfixturevalue(fixture)
    for example in NORMALIZED:
        assert encode_prompt(example, tok) == encode_example(example, tok)[0]
    assert encode_prompt("Say hi", tok) == encode_example(NORMALIZED[0], tok)[0]


def test_truncation_and_dropping_are_counted(chat_tokenizer):
    examples = [{"prompt": "hi", "response": "hello world " * 20}, {"prompt": "long " * 60, "response": "x"},
                {"prompt": "hi", "response": "ok"}]
    lengths = [sum(map(len, encode_example(e, chat_tokenizer))) for e in examples]
    prompt_len = len(encode_example(examples[1], chat_tokenizer)[0])
    max_length = 30
    assert lengths[0] > max_length and prompt_len > max_length and lengths[2] <= max_length
    ds = tokenize_examples(examples, chat_tokenizer, max_length=max_length)
    assert (ds.stats.n_examples, ds.stats.n_truncated, ds.stats.n_dropped, len(ds)) == (3, 1, 1, 2)
    assert len(ds[0]["input_ids"]) == max_length and ds[0]["labels"][-1] != chat_tokenizer.eos_token_id
    assert ds.stats.n_tokens == max_length + lengths[2]
    with pytest.raises(ValueError, match="No example fits max_length=4"):
        tokenize_examples(examples[1:2], chat_tokenizer, max_length=4)
    with pytest.raises(ValueError, match="No evaluation example fits max_length=4"):  # which set, for a run
        tokenize_examples(examples[1:2], chat_tokenizer, max_length=4, part="evaluation")


def _examples(n):
    return [{"prompt": f"question {i}", "response": "word " * (1 + (i * 7) % 13)} for i in range(n)]


def test_packing_keeps_every_example_intact(chat_tokenizer):
    examples = _examples(40)
    plain = tokenize_examples(examples, chat_tokenizer, max_length=128)
    packed = tokenize_examples(examples, chat_tokenizer, max_length=128, packing=True)
    # First-fit decreasing wastes little: at most one sequence more than the tokens strictly need.
    assert packed.stats.n_sequences <= -(-plain.stats.n_tokens // 128) + 1 < len(examples) // 2
    assert packed.stats.n_tokens == plain.stats.n_tokens
    assert packed.stats.n_label_tokens == plain.stats.n_label_tokens
    pieces = []
    for row in packed:
        assert len(row["input_ids"]) <= 128 and len(row["labels"]) == len(row["position_ids"]) == len(row["input_ids"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert row["position_ids"] == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        for a, b in zip(starts, starts[1:]):
            assert row["labels"][a] == IGNORE_INDEX  # never predicted from the previous example
            pieces.append((row["input_ids"][a:b], row["labels"][a:b]))
    originals = [(r["input_ids"], r["labels"]) for r in plain]
    assert sorted(pieces) == sorted(originals)


def test_packed_rows_do_not_attend_across_examples(chat_tokenizer):
    """Logits of a packed batch equal those of each example run alone (transformers' packed masking)."""
    model = tiny_llama(vocab_size=len(chat_tokenizer))
    examples = _examples(6)
    plain = tokenize_examples(examples, chat_tokenizer, max_length=256)
    packed = tokenize_examples(examples, chat_tokenizer, max_length=80, packing=True)
    batch = collate(packed.rows, chat_tokenizer.pad_token_id)
    assert "attention_mask" not in batch and len(packed) >= 2
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        alone = {tuple(r["input_ids"]): model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in plain}
    for b, row in enumerate(packed):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, e in zip(starts, starts[1:]):
            torch.testing.assert_close(logits[b, a:e], alone[tuple(row["input_ids"][a:e])], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- collation
def test_collate_pads_by_length(chat_tokenizer):
    eos = chat_tokenizer.eos_token_id
    rows = [{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]}, {"input_ids": [7], "labels": [7]}]
    out = collate(rows, pad_id=eos, pad_to_multiple_of=4)
    assert out["input_ids"].tolist() == [[5, 6, eos, eos], [7, eos, eos, eos]]
    # The real EOS label survives although pad == EOS; padding is -100 and masked out.
    assert out["labels"].tolist() == [[-100, 6, eos, -100], [7, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    packed = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 0, 1]},
                      {"input_ids": [8], "labels": [8], "position_ids": [0]}], pad_id=0)
    assert packed["position_ids"].tolist() == [[0, 0, 1], [0, 0, 1]]  # padding: a segment of its own
    with pytest.raises(ValueError, match="pad_id is None"):
        collate(rows, pad_id=None)


def test_real_tokens_count_no_padding_packed_or_not(chat_tokenizer):
    """tokens/s counts the same tokens whether the rows are packed (no attention mask) or not: never padding."""
    examples = _examples(7)
    plain = tokenize_examples(examples, chat_tokenizer, max_length=256)
    packed = tokenize_examples(examples, chat_tokenizer, max_length=80, packing=True)
    real = sum(len(r["input_ids"]) for r in plain)
    assert sum(len(r["input_ids"]) for r in packed) == real
    pad = chat_tokenizer.pad_token_id
    for rows in (plain.rows, packed.rows):
        batches = [collate(rows[i:i + 3], pad, pad_to_multiple_of=8) for i in range(0, len(rows), 3)]
        assert sum(b["input_ids"].numel() for b in batches) > real  # there is padding to leave out
        assert sum(real_tokens(b) for b in batches) == real
    whole = collate([{"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}], pad_id=0)
    assert real_tokens(whole) == 2  # no padding tail: a row that is one example


# -------------------------------------------------------------------------------------- batching
def _rows(n):
    return [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(n)]


def test_batch_iterator_is_deterministic_and_covers_each_epoch():
    data = _rows(10)

    def epochs(iterator, n):
        return [[[r["input_ids"][0] for r in batch] for batch in iterator] for _ in range(n)]

    first = epochs(BatchIterator(data, batch_size=3, seed=7), 2)
    assert first == epochs(BatchIterator(data, batch_size=3, seed=7), 2)
    assert first != epochs(BatchIterator(data, batch_size=3, seed=8), 2)
    assert first[0] != first[1]  # reshuffled each epoch
    for epoch in first:
        assert sorted(i for batch in epoch for i in batch) == list(range(10)) and len(epoch) == 4
    assert epoch_order(10, 0, 0, shuffle=False) == list(range(10))
    assert len(BatchIterator(data, batch_size=3, drop_last=True)) == 3


def test_batch_iterator_resumes_mid_epoch_exactly():
    data = _rows(23)
    reference = BatchIterator(data, batch_size=4, seed=3, pad_id=0)
    expected = [b["input_ids"].tolist() for _ in range(2) for b in reference]

    interrupted = BatchIterator(data, batch_size=4, seed=3, pad_id=0)
    seen = []
    for batch in interrupted:
        seen.append(batch["input_ids"].tolist())
        if len(seen) == 4:
            break  # "checkpoint" after the 4th training step
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a JSON checkpoint
    assert (state["epoch"], state["index"]) == (0, 4)
    resumed = BatchIterator(data, batch_size=4, seed=3, pad_id=0)
    resumed.load_state_dict(state)
    seen += [b["input_ids"].tolist() for b in resumed]  # the rest of epoch 0
    seen += [b["input_ids"].tolist() for b in resumed]  # epoch 1
    assert seen == expected and resumed.state_dict()["epoch"] == 2

    with pytest.raises(ValueError, match=r"different settings .*'seed': \(3, 4\)"):
        BatchIterator(data, batch_size=4, seed=4).load_state_dict(state)
    edited = copy.deepcopy(data)  # as many rows, one token changed: a data file edited in place
    edited[7]["labels"][-1] += 1
    with pytest.raises(ValueError, match=r"the training rows differ from the run's .*fingerprint"):
        BatchIterator(edited, batch_size=4, seed=3).load_state_dict(state)
    BatchIterator(edited, batch_size=4, seed=3).load_state_dict({k: v for k, v in state.items() if k != "rows_sha256"})
    with pytest.raises(ValueError, match="gives no batch of 4 with drop_last=True"):
        BatchIterator(data[:3], batch_size=4, drop_last=True)


# ----------------------------------------------------------------------------------------- plain text
def _bos_tokenizer():
    """A tokenizer that adds BOS itself (as Llama's does), no chat template."""
    from tokenizers import processors
    from train_helpers import make_tokenizer

    tok = make_tokenizer(chat_template=None, pad_token="<pad>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


def test_plain_text_rows_and_txt_files_load(tmp_path):
    jsonl = write(tmp_path / "d.jsonl", '{"text": "first document"}\n{"text": "second", "source": "web"}\n'
                                        '{"prompt": "q", "response": "a", "text": "q a"}\n')
    assert load_examples(jsonl) == [{"text": "first document"}, {"text": "second"}, {"prompt": "q", "response": "a"}]
    # A .txt file: an example per non-blank line (datasets' "text" loader reads lines the same way).
    txt = write(tmp_path / "d.txt", "line one\n\n  \nline two  \r\nlast line")
    assert load_examples(txt) == [{"text": "line one"}, {"text": "line two  "}, {"text": "last line"}]
    with pytest.raises(ValueError, match=r"d2.json: item 2: the 'text' is empty"):
        load_examples(write(tmp_path / "d2.json", '[{"text": "a"}, {"text": " "}]'))
    with pytest.raises(ValueError, match=r"item 1: field 'text' must be a string, got list"):
        load_examples(write(tmp_path / "d3.json", '[{"text": ["a"]}]'))


@pytest.mark.parametrize("fixture", ["chat_tokenizer", "plain_tokenizer", "bos"])
def test_plain_text_takes_no_template_and_every_token_carries_the_loss(request, fixture):
    tok = _bos_tokenizer() if fixture == "bos" else request.getfixturevalue(fixture)
    text = "def add(a, b):\n    return a + b\n"
    (row,) = tokenize_examples([{"text": text}], tok, max_length=256).rows
    bos = [tok.bos_token_id] if fixture == "bos" else []
    assert row["input_ids"] == bos + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["labels"] == row["input_ids"]
    # Mixed with prompt/response rows, each keeps its own labelling, in order.
    mixed = tokenize_examples([NORMALIZED[0], {"text": text}, NORMALIZED[1]], tok, max_length=256).rows
    assert mixed[1] == row and mixed[0]["labels"][0] == IGNORE_INDEX and mixed[2]["labels"][0] == IGNORE_INDEX


def test_long_texts_are_truncated_counted_and_packed(chat_tokenizer):
    texts = [{"text": "the quick brown fox " * n} for n in (1, 2, 40)]
    out = tokenize_examples(texts, chat_tokenizer, max_length=32, packing=True)
    assert out.stats.n_truncated == 1 and out.stats.n_dropped == 0
    assert all(len(r["input_ids"]) <= 32 for r in out.rows)
    # Packed: every token but each example's first carries the loss.
    assert out.stats.n_label_tokens == out.stats.n_tokens - len(texts)
    # Unpacked: the same, each row's first token predicted by nothing (as the loss counts, trainer.label_tokens)
    alone = tokenize_examples(texts, chat_tokenizer, max_length=32)
    assert alone.stats.n_label_tokens == alone.stats.n_tokens - len(alone.rows) == \
        sum(label_tokens(collate([row], pad_id=0)) for row in alone.rows)


def test_a_text_demo_continues_the_texts_opening_as_is():
    from slimtune.train.generation import prompt_ids, sample_prompt, text_opening

    tok = _bos_tokenizer()
    text = "alpha bravo charlie delta echo foxtrot golf hotel"
    demo = sample_prompt(None, {"text": text})
    assert demo.raw and demo.text == text_opening(text) and text.startswith(demo.text + " ")
    assert 0 < len(demo.text) <= len(text) // 2
    training = tokenize_examples([{"text": text}], tok, max_length=64).rows[0]["input_ids"]
    ids = prompt_ids(tok, demo.text, raw=True)
    assert ids[0] == tok.bos_token_id and training[: len(ids)] == ids  # the prompt is how training read the text
    assert prompt_ids(tok, demo.text) != ids  # (the template's rendering differs)
    assert sample_prompt("my own", {"text": text}).raw and not sample_prompt(None, NORMALIZED[0]).raw
    assert sample_prompt(None, NORMALIZED[0]).text == "Say hi"
    assert len(text_opening("x" * 1000)) == 200 and text_opening("ab") == "a"


def test_trl_conversational_prompt_completion_and_text_parts_are_read_as_chat():
    user = {"role": "user", "content": [{"type": "text", "text": "first "}, {"type": "text", "text": "part"}]}
    row = {"prompt": [{"role": "system", "content": "Be brief."}, user],
           "completion": [{"role": "assistant", "content": "done"}]}
    assert load_examples([row]) == [{"system": "Be brief.", "prompt": "first part", "response": "done"}]
    with pytest.raises(DataError, match="row: the row lists 'tools'"):  # as a 'messages' row with tools is
        normalize_example({**row, "tools": [{"type": "function"}]}, "row")
    normalize_example({**row, "tools": []}, "row")
    for empty in ("", "  ", []):  # the answer would be the EOS alone
        with pytest.raises(DataError, match="row: the response is empty"):
            normalize_example({**row, "completion": [{"role": "assistant", "content": empty}]}, "row")
    image = {"role": "user", "content": [{"type": "image", "url": "x.png"}, {"type": "text", "text": "what?"}]}
    with pytest.raises(ValueError, match=r"example 0: messages\[0\]: content\[0\] is .*'image'.*only text parts"):
        load_examples([{"messages": [image, {"role": "assistant", "content": "a cat"}]}])


# ------------------------------------------------------------------- tokenizing the rendered text whole
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _sentencepiece_tokenizer():
    """A Llama-2/Mistral/Zephyr-style tokenizer: BPE over Metaspace pieces, ▁ prepended to the text it starts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([  # a line break is a piece of its own (byte fallback <0x0A>)
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)])
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    corpus = ["Hello there, what is the capital of France?\nParis is the capital.\n", "def add(a, b): return a + b"]
    raw.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                             show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ZEPHYR
    return tok


@pytest.mark.parametrize("rows", ["single", "sharegpt"])
def test_the_ids_are_the_whole_rendering_tokenized_as_apply_chat_template_does(rows):
    """The prompt and each turn were tokenized apart: a SentencePiece tokenizer then began every answer with a
    lone ▁ (a space token the model never emits) and shifted the context of later turns."""
    tok = _sentencepiece_tokenizer()
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Paris is"},
                {"role": "user", "content": "what is the capital of France?"},
                {"role": "assistant", "content": "Paris is the capital."}]
    whole = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    if rows == "single":
        prompt, response = encode_example({"prompt": messages[2]["content"], "response": messages[3]["content"],
                                           "history": messages[:2]}, tok)
        ids, trained = prompt + response, response
    else:
        example = normalize_example({"conversations": [{"from": "human" if m["role"] == "user" else "gpt",
                                                        "value": m["content"]} for m in messages]}, "row 1")
        segments = encode_conversation(example, tok)
        ids = [t for piece, _ in segments for t in piece]
        trained = [t for piece, on in segments if on for t in piece]
    assert ids == whole[:len(ids)] and tok.convert_ids_to_tokens(whole[len(ids):]) == ["\n"]  # the tail cut
    assert not tok.convert_ids_to_tokens(trained[0]).startswith("\u2581")  # "Paris" starts a line: no space
    text = "".join(tok.convert_ids_to_tokens(trained)).replace("\u2581", " ")
    assert text.startswith("Paris is the capital." if rows == "single" else "Paris is")


def test_an_eos_inside_an_answer_is_not_its_end():
    """A literal EOS in an answer, under a template whose turns end with another token (Gemma's <end_of_turn>),
    does not cut the answer there: only an EOS that nothing but whitespace follows ends it."""
    tok = _sentencepiece_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|system|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    prompt, response = encode_example({"prompt": "Hello there", "response": "Paris </s> is the capital."}, tok)
    assert "".join(tok.convert_ids_to_tokens(response)).replace("\u2581", " ").startswith(
        "Paris </s> is the capital.<|system|>")
    assert response[-1] == tok.eos_token_id  # one EOS appended after the turn's own end


def test_a_conversation_opening_with_an_assistant_greeting_trains_the_later_answers(chat_tokenizer):
    """A ShareGPT row that opens with a gpt greeting: the greeting is context (no user turn precedes it to render
    a generation prompt from; transformers refused that empty render with a raw error)."""
    example = normalize_example({"conversations": [{"from": "gpt", "value": "Hi, how can I help?"},
                                                   {"from": "human", "value": "Say yes"},
                                                   {"from": "gpt", "value": "yes"}]}, "row 1")
    segments = encode_conversation(example, chat_tokenizer)
    trained = chat_tokenizer.decode([t for piece, on in segments if on for t in piece])
    context = chat_tokenizer.decode([t for piece, on in segments if not on for t in piece])
    assert trained.startswith("yes") and "Hi, how can I help?" in context


def test_a_template_whose_generation_prompt_is_not_the_start_of_the_answered_turn_warns(chat_tokenizer):
    """A template adding a reasoning block to the generation prompt only (DeepSeek-R1's <think>): what generation
    feeds is not what training saw, which is said (it was silent)."""
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: <think>\n{% endif %}")
    with pytest.warns(UserWarning, match="renders the generation prompt differently"):
        prompt, response = encode_example({"prompt": "Say yes", "response": "yes"}, tok)
    assert tok.decode(response).strip().startswith("yes")
    tok.chat_template = tok.chat_template.replace("<think>\n", "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_example({"prompt": "Say yes", "response": "yes"}, tok)  # a prefix: no warning


def test_tokenizing_in_chunks_gives_the_same_ids(chat_tokenizer, monkeypatch):
    """The dataset is tokenized TOKENIZE_CHUNK texts at a time (the offsets of all at once cost ~0.1 GiB of peak
    memory in the demo); the ids do not depend on it."""
    from slimtune.train import templates

    examples = _examples(10)
    whole = tokenize_examples(examples, chat_tokenizer, max_length=128).rows
    monkeypatch.setattr(templates, "TOKENIZE_CHUNK", 3)
    assert tokenize_examples(examples, chat_tokenizer, max_length=128).rows == whole


def _trained(tokenizer, row, chat=None):
    """The text a row trains (its tokens whose label is not -100), through load_examples' normalization."""
    from slimtune.train.tokenization import tokenize_examples

    example = normalize_example(row, "row")
    labels = tokenize_examples([example], tokenizer, 512, use_chat_template=chat).rows[0]["labels"]
    return tokenizer.decode([t for t in labels if t != -100])


THINKING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>"
            "{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PARTS_ONLY = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% for p in m.content %}{% if p.type == 'text' %}"
              "{{ p.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_what_a_template_would_leave_out_of_an_answer_is_refused_not_trained_without_it(chat_tokenizer):
    from train_helpers import make_tokenizer

    thinking = {"messages": [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]}
    assert _trained(make_tokenizer(chat_template=THINKING), thinking) == "<think>two and two</think>4<|im_end|>"
    with pytest.raises(DataError, match="does not render its answer's 'reasoning_content'"):
        _trained(chat_tokenizer, thinking)  # ChatML has no reasoning block
    with pytest.raises(DataError, match="'reasoning_content', which the plain template has no place for"):
        _trained(chat_tokenizer, thinking, chat=False)
    plain = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]}
    with pytest.raises(DataError, match="does not render its answer's 'content'"):  # it reads parts lists only
        _trained(make_tokenizer(chat_template=PARTS_ONLY), plain)
    calls = {"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": "Let me check.", "tool_calls": [{"type": "function"}]}]}
    with pytest.raises(DataError, match=r"row: messages\[1\] holds 'tool_calls': slimtune does not train tool calls"):
        normalize_example(calls, "row")
    with pytest.raises(DataError, match="row: the row lists 'tools'"):
        normalize_example({**plain, "tools": [{"type": "function"}]}, "row")
    for none in ([], "[]", ""):  # a chat row naming no tool, and any other row's own 'tools' column, are data
        normalize_example({**plain, "tools": none}, "row")
    normalize_example({"instruction": "Which tool cuts wood?", "output": "A saw.", "tools": "saw, hammer"}, "row")
    empty = {"messages": [plain["messages"][0], {**plain["messages"][1], "reasoning_content": ""}]}
    assert _trained(chat_tokenizer, empty, chat=False).startswith("four")  # "" in a mixed set: no reasoning
    R1 = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    think = {"messages": [{"role": "user", "content": "2+2?"},  # R1 drops the block before a short answer
                          {"role": "assistant", "content": "<think>Two plus two is four.</think>It is 4."}]}
    assert _trained(make_tokenizer(chat_template=R1), think) == "It is 4.<|im_end|>"


@pytest.mark.parametrize("chat", [None, False], ids=["chat template", "plain template"])
def test_a_greeting_before_the_first_user_turn_is_context_after_a_system_turn_too(chat_tokenizer, chat):
    row = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "gpt", "value": "GREETING"},
                             {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "answer"}]}
    trained = _trained(chat_tokenizer, row, chat)
    assert "answer" in trained and "GREETING" not in trained
    assert normalize_example({**row, "system": "Be kind."}, "row")["system"] == "Be kind."
    with pytest.raises(DataError, match="row: the row's 'system' and its first turn's system prompt differ"):
        normalize_example({**row, "system": "Be brief."}, "row")


def test_an_answer_sharing_its_first_token_with_the_prompt_is_said(chat_tokenizer, recwarn):
    # "\n" ending the template's prompt and the answer's indentation are one token ("\n   "): it counts as prompt
    assert _trained(chat_tokenizer, {"prompt": "def f(x):", "response": "    return x"}) == " return x<|im_end|>"
    assert [str(w.message) for w in recwarn if "share a token with the end of the prompt" in str(w.message)]
    recwarn.clear()
    assert _trained(chat_tokenizer, {"prompt": "def f(x):", "response": "return x"}) == "return x<|im_end|>"
    assert not [w for w in recwarn if "share a token" in str(w.message)]
