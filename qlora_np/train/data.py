"""Training data: read records from files, turn them into tokens with a loss mask, batch them.

A record is one JSON object (a line of a ``.jsonl`` file, an item of a ``.json`` list)
or one non-empty line of a ``.txt`` file. Its format is recognised by its fields:

* ``{"text": …}``                                — plain text; every token is learned
* ``{"instruction": …, "input": …, "output": …}`` — Alpaca (``input`` optional)
* ``{"prompt": …, "completion": …}``             — raw prompt and completion
* ``{"messages": [{"role": …, "content": …}, …]}`` — chat, rendered with the chat template
* ``{"conversations": [{"from": …, "value": …}, …]}`` — ShareGPT chat (``human``, ``gpt``,
  ``system``), read as ``messages``

Alpaca records become a user turn and an assistant reply. Unless ``train_on_prompt``,
only the replies (the completion, the assistant turns) count in the loss.

An :class:`Example` is a token sequence and, per token, whether the model is trained
to predict it. Batches are (batch, seq) arrays: ``ids`` in, ``labels`` out (the next
token, or IGNORE_INDEX), plus RoPE ``positions`` and, when packing, ``segments``.
"""

import json
import os
import warnings
from typing import NamedTuple

import numpy as np

from qlora_np.errors import DataError, DataWarning, InvalidValueError
from qlora_np.models.llama.lora import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
"""ShareGPT's speaker names (``from``) → chat roles."""
SUFFIXES = (".jsonl", ".json", ".txt")


class Example(NamedTuple):
    """One tokenized record."""

    ids: np.ndarray          # (n,) int32 token ids
    targets: np.ndarray      # (n,) bool: is this token predicted in the loss
    source: str              # "file:line", for messages


class Batch(NamedTuple):
    """One training batch, all (batch, seq) arrays."""

    ids: np.ndarray          # int32 input tokens
    labels: np.ndarray       # int32 next token, IGNORE_INDEX where not learned (or padding)
    positions: np.ndarray    # int32 RoPE positions
    segments: np.ndarray     # int32 document of each token in a packed row; None when padding

    @property
    def label_count(self):
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))


# ---------------------------------------------------------------------------
# 1. Reading records
# ---------------------------------------------------------------------------

def read_records(path):
    """[(where, record)] from a .jsonl / .json / .txt file; ``where`` is "file:line" (or "file:record N")."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use one of {SUFFIXES}")
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
    name = os.path.basename(path)
    if suffix == ".json":
        records = _json_records(name, raw)
    else:
        records = []
        for number, line in enumerate(raw.split(b"\n"), start=1):
            text = _decode(name, number, line).rstrip("\r")
            if not text.strip():
                continue
            where = f"{name}:{number}"
            records.append((where, {"text": text} if suffix == ".txt" else _json_line(where, text)))
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def _decode(name, number, line):
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{name}:{number}: not UTF-8 text (byte {error.start} of the line)") from None


def _json_line(where, text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON: {error.msg} at column {error.colno}") from None


def _json_records(name, raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not UTF-8 text") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{name}:{error.lineno}: not valid JSON: {error.msg}") from None
    if isinstance(items, dict) and isinstance(items.get("data"), list):
        items = items["data"]
    if not isinstance(items, list):
        raise DataError(f"{name}: a .json data file must hold a list of records (or {{\"data\": [...]}})")
    return [(f"{name}:record {index}", item) for index, item in enumerate(items, start=1)]


# ---------------------------------------------------------------------------
# 2. Records → token ids and loss mask
# ---------------------------------------------------------------------------

def tokenize_record(record, tokenizer, where="record", train_on_prompt=False):
    """One record → :class:`Example` (ids and the mask of tokens to learn)."""
    pieces = record_pieces(record, tokenizer, where)
    ids, targets = [], []
    if tokenizer.add_bos:
        ids.append(tokenizer.bos_id)
        targets.append(False)
    for text, is_reply in pieces:
        piece_ids = tokenizer.encode(text, add_bos=False)
        ids += piece_ids
        targets += [is_reply or train_on_prompt] * len(piece_ids)
    return Example(np.array(ids, np.int32), np.array(targets, bool), where)


def record_pieces(record, tokenizer, where="record"):
    """(text, is_reply) pieces of a record in any of the five formats."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    end = tokenizer.token_text(tokenizer.eos_id)
    if "messages" in record:
        return tokenizer.chat_template.pieces(_checked_messages(record["messages"], where))
    if "conversations" in record:
        return tokenizer.chat_template.pieces(_sharegpt_messages(record["conversations"], where))
    if "instruction" in record or "output" in record:
        instruction, output = _text(record, "instruction", where), _text(record, "output", where)
        extra = _text(record, "input", where, required=False)
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                    {"role": "assistant", "content": output}]
        system = _text(record, "system", where, required=False)
        return tokenizer.chat_template.pieces(([{"role": "system", "content": system}] if system else [])
                                              + messages)
    if "prompt" in record or "completion" in record:
        return [(_text(record, "prompt", where), False), (_text(record, "completion", where) + end, True)]
    if "text" in record:
        return [(_text(record, "text", where) + end, True)]
    raise DataError(f"{where}: no known fields; a record needs 'text', 'messages', 'conversations', "
                    f"'instruction' + 'output' or 'prompt' + 'completion' (has {sorted(record)})")


def _text(record, key, where, required=True):
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _checked_messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {index} must be an object, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: message {index} has role {message.get('role')!r}; use one of {ROLES}")
        _text(message, "content", f"{where}: message {index}")
    return messages


def _sharegpt_messages(turns, where):
    """ShareGPT turns [{"from", "value"}] → checked chat messages [{"role", "content"}]."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {index} must be an object, got {type(turn).__name__}")
        if turn.get("from") not in SHAREGPT_ROLES:
            raise DataError(f"{where}: turn {index} is from {turn.get('from')!r}; use one of "
                            f"{tuple(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]],
                         "content": _text(turn, "value", f"{where}: turn {index}")})
    return messages


def load_examples(path, tokenizer, train_on_prompt=False, max_length=None):
    """Tokenize every record of a file: a list of :class:`Example`.

    With ``max_length``, each example is cut to max_length + 1 tokens (inputs and the
    last label). A record with nothing to learn raises a :class:`DataError`; one whose
    replies all start past max_length is left out, with a warning that counts them
    (long prompts are normal data, not a broken file). If that leaves nothing, DataError.
    """
    examples, cut_off = [], []
    for where, record in read_records(path):
        example = tokenize_record(record, tokenizer, where, train_on_prompt)
        if not example.targets[1:].any():
            raise DataError(f"{where}: no tokens to learn (the reply is empty)")
        if max_length is not None:
            example = Example(example.ids[:max_length + 1], example.targets[:max_length + 1], where)
            if not example.targets[1:].any():
                cut_off.append(where)
                continue
        examples.append(example)
    if cut_off and not examples:
        raise DataError(f"{path}: every record's reply starts past max_length={max_length}")
    if cut_off:
        warnings.warn(f"left out {len(cut_off)} of {len(cut_off) + len(examples)} records whose replies "
                      f"start past max_length={max_length} (the first: {cut_off[0]})", DataWarning,
                      stacklevel=2)
    return examples


def split_examples(examples, eval_fraction=0.1, seed=0):
    """Shuffle with ``seed`` and hold out a fraction: (train, eval); eval is empty for fraction 0."""
    if not 0 <= eval_fraction < 1:
        raise InvalidValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(len(examples))
    count = int(round(eval_fraction * len(examples)))
    if eval_fraction > 0:
        count = min(max(count, 1), len(examples) - 1)
    return [examples[i] for i in order[count:]], [examples[i] for i in order[:count]]


# ---------------------------------------------------------------------------
# 3. Examples → batches
# ---------------------------------------------------------------------------

def epoch_batches(examples, batch_size, seed, epoch, pad_id, packing=False, max_length=None,
                  shuffle=True):
    """The batches of one epoch, in an order fixed by (seed, epoch).

    Padding: each batch holds ``batch_size`` examples, padded on the right to its
    longest. Packing: examples are laid end to end into rows of ``max_length``
    positions (an example never straddles two rows), each restarting at position 0
    and attending only to itself; a batch holds ``batch_size`` rows.
    """
    order = (np.random.default_rng([seed, epoch]).permutation(len(examples)) if shuffle
             else np.arange(len(examples)))
    ordered = [examples[i] for i in order]
    if packing:
        if max_length is None:
            raise InvalidValueError("packing needs max_length (the row length)")
        rows = pack_rows(ordered, max_length)
        return [_packed_batch(rows[i:i + batch_size], max_length, pad_id)
                for i in range(0, len(rows), batch_size)]
    return [_padded_batch(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


def pack_rows(examples, max_length):
    """Group examples, in order, into rows whose inputs (n − 1 positions each) fit ``max_length``."""
    rows, current, used = [], [], 0
    for example in examples:
        size = len(example.ids) - 1
        if size > max_length:
            raise InvalidValueError(f"{example.source}: {size} positions do not fit max_length={max_length}")
        if used + size > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(example)
        used += size
    if current:
        rows.append(current)
    return rows


def _inputs_and_labels(example):
    """Inputs ids[:-1] and labels ids[1:] (IGNORE_INDEX where the next token is not a target)."""
    labels = np.where(example.targets[1:], example.ids[1:], IGNORE_INDEX)
    return example.ids[:-1], labels


def _padded_batch(examples, pad_id):
    length = max(len(e.ids) for e in examples) - 1
    ids = np.full((len(examples), length), pad_id, np.int32)
    labels = np.full((len(examples), length), IGNORE_INDEX, np.int32)
    for row, example in enumerate(examples):
        inputs, targets = _inputs_and_labels(example)
        ids[row, :len(inputs)], labels[row, :len(inputs)] = inputs, targets
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return Batch(ids, labels, positions, None)


def _packed_batch(rows, max_length, pad_id):
    length = max(sum(len(e.ids) - 1 for e in row) for row in rows)
    shape = (len(rows), min(length, max_length))
    ids = np.full(shape, pad_id, np.int32)
    labels = np.full(shape, IGNORE_INDEX, np.int32)
    positions = np.zeros(shape, np.int32)
    segments = np.full(shape, -1, np.int32)                   # padding: its own segment
    for r, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row):
            inputs, targets = _inputs_and_labels(example)
            stop = start + len(inputs)
            ids[r, start:stop], labels[r, start:stop] = inputs, targets
            positions[r, start:stop] = np.arange(len(inputs))
            segments[r, start:stop] = segment
            start = stop
    return Batch(ids, labels, positions, segments)
