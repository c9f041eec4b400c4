"""The demo's small dataset: rewrite a date written in words as an ISO date (a checkable answer).

    {"messages": [{"role": "user", "content": "Convert this date to YYYY-MM-DD: March 7, 2021"},
                  {"role": "assistant", "content": "2021-03-07"}]}

A base SmolLM2-135M-Instruct almost never answers with the bare ISO date; a few
minutes of LoRA training teach it the format and the month numbers, and exact match on
held-out dates measures that. The shipped files ``qlora_np/data/dates_{train,eval}.jsonl``
are :func:`write_date_dataset` output (a test checks that they still are).
"""

import datetime
import json
import os

import numpy as np

from qlora_np.io.safetensors import atomic_write

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
QUESTIONS = ("Convert this date to YYYY-MM-DD: {date}",
             "Write {date} as an ISO 8601 date.",
             "What is {date} in YYYY-MM-DD format?",
             "Give the ISO date for {date}.")
FIRST_DAY = datetime.date(1900, 1, 1).toordinal()
LAST_DAY = datetime.date(2099, 12, 31).toordinal()
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
SIZES = {"train": 600, "eval": 40}


def date_records(count, seed, exclude=()):
    """``count`` chat records about distinct random dates (none of the ISO dates in ``exclude``)."""
    rng = np.random.default_rng(seed)
    records, seen = [], set(exclude)
    while len(records) < count:
        day = datetime.date.fromordinal(int(rng.integers(FIRST_DAY, LAST_DAY + 1)))
        answer = day.isoformat()
        if answer in seen:
            continue
        seen.add(answer)
        month = MONTHS[day.month - 1]
        written = f"{month} {day.day}, {day.year}" if rng.random() < 0.5 else f"{day.day} {month} {day.year}"
        question = QUESTIONS[int(rng.integers(len(QUESTIONS)))].format(date=written)
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


def date_dataset():
    """{"train": records, "eval": records}: the eval dates never occur in training."""
    evaluation = date_records(SIZES["eval"], seed=2)
    train = date_records(SIZES["train"], seed=1, exclude={r["messages"][1]["content"] for r in evaluation})
    return {"train": train, "eval": evaluation}


def write_date_dataset(folder=DATA_DIR):
    """Write dates_train.jsonl and dates_eval.jsonl into ``folder``; returns their paths."""
    paths = {}
    for split, records in date_dataset().items():
        paths[split] = os.path.join(folder, f"dates_{split}.jsonl")
        with atomic_write(paths[split], "w") as stream:
            stream.writelines(json.dumps(record) + "\n" for record in records)
    return paths


def shipped_date_dataset():
    """Paths of the dataset files that ship inside the package."""
    return {split: os.path.join(DATA_DIR, f"dates_{split}.jsonl") for split in SIZES}
