"""Training data: each record format, prompt masking, padding and packing, bad files named by line."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qlora_np.train.data import (Example, epoch_batches, load_examples, pack_rows, read_records,
                                 split_examples, tokenize_record)
from qlora_np.errors import DataError
from qlora_np.models.llama.lora import IGNORE_INDEX


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def learned_text(tokenizer, example):
    return tokenizer.decode(example.ids[example.targets])


# ---------------------------------------------------------------------------
# Formats and masking
# ---------------------------------------------------------------------------

def test_chat_learns_only_the_assistant_replies(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    example = tokenize_record({"messages": messages}, tok)
    assert tok.decode(example.ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    assert learned_text(tok, example) == "Blue.<|im_end|>Green.<|im_end|>"
    # the tokens before each reply are exactly what generation would be prompted with
    prompt = tok.encode(tok.apply_chat_template(messages[:1]))
    assert list(example.ids[:len(prompt)]) == prompt
    assert not example.targets[:len(prompt)].any() and example.targets[len(prompt)]


def test_train_on_prompt_learns_every_token(smollm2_tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    example = tokenize_record(record, smollm2_tokenizer, train_on_prompt=True)
    assert example.targets.all()


def test_alpaca_becomes_a_user_turn_and_a_reply(smollm2_tokenizer):
    tok = smollm2_tokenizer
    with_input = tokenize_record({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, tok)
    expected = tok.apply_chat_template([{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                        {"role": "assistant", "content": "5"}], add_generation_prompt=False)
    assert tok.decode(with_input.ids) == expected
    assert learned_text(tok, with_input) == "5<|im_end|>"
    without_input = tokenize_record({"instruction": "Say yes.", "output": "Yes"}, tok)
    assert "Say yes.<|im_end|>" in tok.decode(without_input.ids)
    with_system = tokenize_record({"instruction": "Hi", "output": "Ho", "system": "Be brief."}, tok)
    assert tok.decode(with_system.ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_sharegpt_conversations_read_as_chat_messages(smollm2_tokenizer):
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour."},
             {"from": "gpt", "value": "Blue."}, {"from": "human", "value": "Another?"},
             {"from": "gpt", "value": "Red."}]
    messages = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                for t in turns]
    shared = tokenize_record({"conversations": turns}, smollm2_tokenizer)
    chat = tokenize_record({"messages": messages}, smollm2_tokenizer)
    assert np.array_equal(shared.ids, chat.ids) and np.array_equal(shared.targets, chat.targets)
    assert shared.targets.any() and not shared.targets.all()


def test_prompt_completion_and_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    end = tok.token_text(tok.eos_id)                       # the model's end-of-sequence token
    assert end == "<|im_end|>"
    example = tokenize_record({"prompt": "2 + 2 =", "completion": " 4"}, tok)
    assert tok.decode(example.ids) == "2 + 2 = 4" + end
    assert learned_text(tok, example) == " 4" + end
    text = tokenize_record({"text": "Once upon a time"}, tok)
    assert text.targets.all() and tok.decode(text.ids) == "Once upon a time" + end


def test_text_files_give_one_record_per_line(tmp_path, smollm2_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n  \nsecond line\r\n", encoding="utf-8")
    assert read_records(path) == [("corpus.txt:1", {"text": "first line"}),
                                  ("corpus.txt:4", {"text": "second line"})]


def test_json_list_files(tmp_path, smollm2_tokenizer):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a"}, {"prompt": "b", "completion": "c"}]), encoding="utf-8")
    examples = load_examples(path, smollm2_tokenizer)
    assert [e.source for e in examples] == ["data.json:record 1", "data.json:record 2"]


def test_max_length_cuts_examples(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one two three four five six seven eight"}])
    (example,) = load_examples(path, smollm2_tokenizer, max_length=4)
    assert len(example.ids) == 5


def test_records_whose_reply_starts_past_max_length_are_left_out_with_a_warning(tmp_path, smollm2_tokenizer):
    from qlora_np.errors import DataWarning

    long_prompt = {"prompt": "word " * 60, "completion": "yes"}
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "short", "completion": "yes"}, long_prompt, long_prompt])
    with pytest.warns(DataWarning, match="left out 2 of 3 records .* max_length=16 .*d.jsonl:2"):
        (example,) = load_examples(path, smollm2_tokenizer, max_length=16)
    assert example.source == "d.jsonl:1"
    assert len(load_examples(path, smollm2_tokenizer, max_length=200)) == 3
    only_long = write_jsonl(tmp_path / "long.jsonl", [long_prompt])
    with pytest.raises(DataError, match="every record's reply starts past max_length=16"):
        load_examples(only_long, smollm2_tokenizer, max_length=16)


# ---------------------------------------------------------------------------
# Bad files: a DataError that names the file and line
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ({"instruction": "x"}, "missing field 'output'"),
    ({"text": 5}, "field 'text' must be a string"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "'content' must be a string"),
    ({"messages": [{"role": "user", "content": "question only"}]}, "no tokens to learn"),
    ({"conversations": {"from": "human"}}, "'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "turn 0 is from 'bot'"),
    ({"conversations": [{"from": "gpt", "value": 3}]}, "turn 0: field 'value' must be a string"),
    ({"title": "x"}, "no known fields"),
    ([1, 2], "must be a JSON object"),
    ({"prompt": "p", "completion": ""}, None),          # the end marker is still learned
])
def test_bad_records_name_their_line(tmp_path, smollm2_tokenizer, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": "also fine"}, line])
    if message is None:
        assert len(load_examples(path, smollm2_tokenizer)) == 3
        return
    with pytest.raises(DataError, match="d.jsonl:3") as error:
        load_examples(path, smollm2_tokenizer)
    assert message in str(error.value)


def test_bad_files_raise_data_error(tmp_path, smollm2_tokenizer):
    cases = {"empty.jsonl": b"", "blank.jsonl": b"\n  \n", "latin1.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
             "broken.jsonl": b'{"text": "ok"}\n{"text": \n', "list.json": b'{"text": "not a list"}',
             "latin1.json": b'[\n{"text": "caf\xe9"}]', "broken.json": b'[{"text": "a"},\n{"text": ]',
             "data.csv": b"text\nhello\n"}
    expected = {"empty.jsonl": "empty", "blank.jsonl": "empty", "latin1.jsonl": "latin1.jsonl:2: not UTF-8",
                "broken.jsonl": "broken.jsonl:2: not valid JSON", "list.json": "must hold a list",
                "latin1.json": "latin1.json:2: not UTF-8", "broken.json": "broken.json:2: not valid JSON",
                "data.csv": "unknown data file type"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=expected[name]):
            load_examples(tmp_path / name, smollm2_tokenizer)
    with pytest.raises(DataError, match="cannot read"):
        load_examples(tmp_path / "missing.jsonl", smollm2_tokenizer)


@settings(max_examples=80, deadline=None)
@given(blob=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_load_or_raise_data_error(tmp_path_factory, smollm2_tokenizer, blob):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes(blob)
    try:
        examples = load_examples(path, smollm2_tokenizer)
    except DataError:
        return
    assert all(e.targets[1:].any() for e in examples)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["text", "messages", "role", "content", "input",
                                                              "instruction", "output", "prompt", "completion",
                                                              "conversations", "from", "value"]),
                                             inner, max_size=4), max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(record=json_values)
def test_any_json_record_tokenizes_or_raises_data_error(smollm2_tokenizer, record):
    try:
        example = tokenize_record(record, smollm2_tokenizer, "d.jsonl:1")
    except DataError as error:
        assert str(error).startswith("d.jsonl:1")
        return
    assert example.ids.dtype == np.int32 and example.ids.shape == example.targets.shape


# ---------------------------------------------------------------------------
# Splitting, shuffling, padding, packing
# ---------------------------------------------------------------------------

def fake_examples(lengths, first_target=1):
    examples = []
    for index, length in enumerate(lengths):
        ids = np.arange(length, dtype=np.int32) + 100 * index
        targets = np.arange(length) >= first_target
        examples.append(Example(ids, targets, f"fake:{index}"))
    return examples


def test_split_is_deterministic_and_disjoint():
    examples = fake_examples([3] * 20)
    train, held_out = split_examples(examples, 0.25, seed=4)
    assert len(held_out) == 5 and len(train) == 15
    assert {e.source for e in train}.isdisjoint({e.source for e in held_out})
    again, _ = split_examples(examples, 0.25, seed=4)
    assert [e.source for e in again] == [e.source for e in train]
    assert [e.source for e in split_examples(examples, 0.25, seed=5)[0]] != [e.source for e in train]


def test_epochs_shuffle_deterministically_and_cover_every_example():
    examples = fake_examples([4, 6, 3, 5, 7, 2, 4])
    first = epoch_batches(examples, 3, seed=1, epoch=0, pad_id=0)
    assert [b.ids.tolist() for b in first] == [b.ids.tolist() for b in epoch_batches(examples, 3, 1, 0, 0)]
    second = epoch_batches(examples, 3, seed=1, epoch=1, pad_id=0)
    assert [b.ids.tolist() for b in first] != [b.ids.tolist() for b in second]
    seen = sorted(int(row[0]) for batch in first for row in batch.ids)
    assert seen == [100 * i for i in range(len(examples))]


def test_padding_aligns_labels_with_the_next_token():
    examples = fake_examples([4, 7], first_target=2)
    (batch,) = epoch_batches(examples, 2, seed=0, epoch=0, pad_id=9, shuffle=False)
    assert batch.ids.shape == (2, 6) and batch.segments is None
    assert batch.ids[0].tolist() == [0, 1, 2, 9, 9, 9]
    assert batch.labels[0].tolist() == [IGNORE_INDEX, 2, 3] + [IGNORE_INDEX] * 3
    assert batch.labels[1].tolist() == [IGNORE_INDEX, 102, 103, 104, 105, 106]
    assert batch.label_count == 7


def test_packing_never_splits_an_example_and_restarts_positions():
    examples = fake_examples([4, 5, 3, 6, 2])                # 3, 4, 2, 5, 1 positions
    batches = epoch_batches(examples, 2, seed=0, epoch=0, pad_id=0, packing=True, max_length=8,
                            shuffle=False)
    rows = [(b.ids[r], b.labels[r], b.positions[r], b.segments[r]) for b in batches for r in range(len(b.ids))]
    assert [ids.tolist() for ids, *_ in rows] == [[0, 1, 2, 100, 101, 102, 103, 0],
                                                   [200, 201, 300, 301, 302, 303, 304, 400]]
    ids, labels, positions, segments = rows[0]
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert segments.tolist() == [0, 0, 0, 1, 1, 1, 1, -1]
    # an example's last label is its own last token, never the next example's first
    assert labels.tolist() == [1, 2, 3, 101, 102, 103, 104, IGNORE_INDEX]


@settings(max_examples=100)
@given(lengths=st.lists(st.integers(2, 9), min_size=1, max_size=30), max_length=st.integers(8, 20))
def test_pack_rows_keeps_order_and_fits(lengths, max_length):
    examples = fake_examples(lengths)
    rows = pack_rows(examples, max_length)
    assert [e.source for row in rows for e in row] == [e.source for e in examples]
    assert all(sum(len(e.ids) - 1 for e in row) <= max_length for row in rows)
    assert all(sum(len(a.ids) - 1 for a in first) + len(second[0].ids) - 1 > max_length
               for first, second in zip(rows, rows[1:]))
