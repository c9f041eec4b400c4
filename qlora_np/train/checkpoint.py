"""Training checkpoints: a folder of safetensors and JSON, written atomically, checked when read.

    checkpoint-000120/
      adapter_model.safetensors   the adapters, under the names and row order PEFT uses
      adapter_config.json         PEFT's LoRA config: the folder is also a PEFT adapter
      optimizer.safetensors       AdamW moments: <name>.exp_avg, <name>.exp_avg_sq
      trainer_state.json          step counts, schedule position, RNG states, data position,
                                  config, fingerprints of model and data, SHA-256 of the files

Nothing is pickled: a checkpoint holds numbers, strings and raw arrays only. The folder
is built under a temporary name and renamed into place, so a crash never leaves half a
checkpoint under the real name; the stored hashes catch files damaged later. Version 1
(before the folder was a PEFT adapter) stored the adapters under the optimizer's names
(blk.N.attn_q.lora_a, …) and had no adapter_config.json; it is still read.
"""

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from qlora_np.errors import CheckpointError
from qlora_np.io.peft import write_peft
from qlora_np.io.safetensors import atomic_write, read_safetensors, save_safetensors

FORMAT = "qlora_np-train-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
ADAPTERS = "adapter_model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def save_checkpoint(folder, adapters, adapter_config, optimizer_state, state):
    """Write a checkpoint folder (replacing one already there).

    ``adapters``, ``adapter_config``: the PEFT adapter (:func:`qlora_np.io.peft.peft_adapter`);
    ``optimizer_state``: :meth:`AdamW.state_dict` output; ``state``: anything JSON can
    hold (the trainer's counters, RNG states, config).
    """
    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(folder))
    try:
        write_peft(staging, adapters, adapter_config)
        moments = {f"{name}.{key}": saved[key] for name, saved in optimizer_state["state"].items()
                   for key in MOMENTS}
        save_safetensors(os.path.join(staging, OPTIMIZER), moments)
        optimizer = {key: value for key, value in optimizer_state.items() if key != "state"}
        optimizer["steps"] = {name: saved["step"] for name, saved in optimizer_state["state"].items()}
        record = {"format": FORMAT, "version": VERSION, "optimizer": optimizer, **state,
                  "sha256": {name: _sha256(os.path.join(staging, name)) for name in (ADAPTERS, OPTIMIZER)}}
        with atomic_write(os.path.join(staging, STATE), "w") as stream:
            json.dump(record, stream, indent=1)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_checkpoint(folder):
    """(adapters, optimizer_state, state) from :func:`save_checkpoint`; CheckpointError if damaged.

    The adapters are keyed as the file has them: PEFT's keys, or the optimizer's names
    in a version 1 checkpoint (``state["version"]`` tells).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"no checkpoint folder at {folder}")
    state = _read_state(folder)
    for name in (ADAPTERS, OPTIMIZER):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: {name} is missing")
        if _sha256(path) != state["sha256"].get(name):
            raise CheckpointError(f"{path} is damaged: its SHA-256 differs from the one recorded")
    adapters = read_safetensors(os.path.join(folder, ADAPTERS))
    adapters = {name: np.array(array) for name, array in adapters.items()}            # off the memory map
    moments = read_safetensors(os.path.join(folder, OPTIMIZER))
    optimizer = state.pop("optimizer")
    steps = optimizer.pop("steps")
    try:
        optimizer["state"] = {name: {"step": int(step), **{key: np.array(moments[f"{name}.{key}"])
                                                            for key in MOMENTS}}
                              for name, step in steps.items()}
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder}: optimizer moments do not match the recorded steps "
                              f"({error})") from None
    return adapters, optimizer, state


def _read_state(folder):
    path = os.path.join(folder, STATE)
    try:
        with open(path, encoding="utf-8") as stream:
            state = json.load(stream)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: {STATE} is missing (not a finished checkpoint)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a qlora_np training checkpoint")
    if state.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')!r}, this qlora_np reads "
                              f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    if not isinstance(state.get("sha256"), dict) or not isinstance(state.get("optimizer"), dict) \
            or not isinstance(state["optimizer"].get("steps"), dict):
        raise CheckpointError(f"{path}: the sha256 or optimizer record is missing or malformed")
    return state


def latest_checkpoint(output_dir):
    """The checkpoint-NNNNNN folder with the highest step in ``output_dir`` (None if none)."""
    if not os.path.isdir(output_dir):
        return None
    steps = [(int(name.split("-")[1]), name) for name in os.listdir(output_dir)
             if name.startswith("checkpoint-") and name.split("-")[1].isdigit()]
    return os.path.join(output_dir, max(steps)[1]) if steps else None


def checkpoint_name(step):
    return f"checkpoint-{step:06d}"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(2 ** 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _replace_folder(staging, folder):
    """Rename ``staging`` to ``folder``; an old ``folder`` is moved aside first and removed after."""
    if not os.path.exists(folder):
        os.replace(staging, folder)
        return
    retired = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(folder)), prefix=".old-")
    os.replace(folder, os.path.join(retired, "old"))
    os.replace(staging, folder)
    shutil.rmtree(retired, ignore_errors=True)
