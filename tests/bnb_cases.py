"""The bitsandbytes reference vectors in tests/data/bnb, loaded for the tests."""

import json
import pathlib

import numpy as np

from qlora_np import bfloat16_from_bits

BNB_DIR = pathlib.Path(__file__).parent / "data" / "bnb"
MANIFEST = json.loads((BNB_DIR / "manifest.json").read_text())
BNB_CASES = MANIFEST["cases"]


def load_case(case):
    """A case's npz fields, with bf16 bit patterns turned into ml_dtypes.bfloat16 arrays."""
    with np.load(BNB_DIR / case["file"]) as data:
        fields = {key: data[key] for key in data.files}
    if str(fields["dtype"]) == "bfloat16":
        fields["input"] = bfloat16_from_bits(fields["input"])
        fields["dequantized"] = bfloat16_from_bits(fields["dequantized"])
    return fields
