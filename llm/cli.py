"""The `llm` console script.

Every subcommand is one function registered with `@command(name, help, arguments)`, where `arguments` adds
its options to the subcommand's parser. Heavy modules (torch, the model) are imported inside the command
functions so that `llm --help` stays instant. An LLMError becomes one `error: ...` line on stderr and exit
status 1; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from llm.allocator import request_huge_pages
from llm.errors import LLMError

Run = Callable[[argparse.Namespace], None]


class Command(NamedTuple):
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Run


COMMANDS: list[Command] = []


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[Run], Run]:
    """Register the decorated function as `llm <name>`; `arguments(parser)` declares its options."""

    def register(run: Run) -> Run:
        COMMANDS.append(Command(name, help, arguments, run))
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm", description="Use and convert GPT models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.arguments(sub)
        sub.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm` script; returns the exit status."""
    request_huge_pages()  # before torch allocates: decoding streams every weight once per token
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


MODEL_URI = "a registered model, models:/NAME/VERSION or models:/NAME@ALIAS"
COMPILE_HELP = "torch.compile the decoding steps: a slower start (~25 s for GPT-2 on CPU), then faster tokens"


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    unset = argparse.SUPPRESS  # omitted options keep GenerationConfig's defaults
    parser.add_argument(
        "--model", required=True, help=f"our model directory, an HF GPT-2 directory, gpt2..gpt2-xl, or {MODEL_URI}"
    )
    parser.add_argument("--prompt", required=True, help="text to continue ('' starts from <|endoftext|>)")
    parser.add_argument("--max-new-tokens", type=int, default=unset, help="tokens to generate (default 50)")
    parser.add_argument("--temperature", type=float, default=unset, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=unset, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=unset, help="nucleus sampling: smallest set with mass >= p")
    parser.add_argument("--seed", type=int, default=unset, help="random seed for reproducible samples")
    parser.add_argument("--compile", action="store_true", default=unset, help=COMPILE_HELP)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


@command("generate", "continue a prompt with a model, streaming the text to stdout", _generate_arguments)
def generate_command(args: argparse.Namespace) -> None:
    import dataclasses
    from itertools import takewhile

    from llm.generate import FINISHED, GenerationConfig, decode_stream, stream
    from llm.hf import load_any
    from llm.registry import resolve_model
    from llm.tokenizer import EOT_ID, get_tokenizer

    fields = {field.name for field in dataclasses.fields(GenerationConfig)}
    settings = GenerationConfig(**{key: value for key, value in vars(args).items() if key in fields})
    tokenizer = get_tokenizer()
    model = load_any(resolve_model(args.model), device=_device(args.device))
    has_eot = model.config.vocab_size > EOT_ID
    prompt = tokenizer.encode(args.prompt, allowed_special="all") or [EOT_ID]
    tokens = (int(step[0]) for step in stream(model, [prompt], settings, eos_id=EOT_ID if has_eot else None))
    sys.stdout.write(args.prompt)
    for text in decode_stream(takewhile(lambda token: token != FINISHED, tokens), tokenizer):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a local HF GPT-2 directory or a hub name: gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    parser.add_argument("out", help="model directory to write (config.json + model.safetensors)")


@command("import-hf", "convert OpenAI GPT-2 weights (Hugging Face layout) to our model directory", _import_arguments)
def import_hf_command(args: argparse.Namespace) -> None:
    from llm.checkpoint import save_model
    from llm.hf import import_hf

    model = import_hf(args.src)
    save_model(model, args.out, extra={"source": str(args.src)})
    print(f"wrote {args.out}: {model.num_parameters():,} parameters from {args.src}")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help=f"our model directory or {MODEL_URI}")
    parser.add_argument("out", help="directory to write for transformers.GPT2LMHeadModel.from_pretrained")


@command("export-hf", "write a model in the Hugging Face GPT-2 layout", _export_arguments)
def export_hf_command(args: argparse.Namespace) -> None:
    from llm.checkpoint import load_model
    from llm.hf import export_hf
    from llm.registry import resolve_model

    model = load_model(resolve_model(args.model_dir))
    export_hf(model, args.out)
    print(f"wrote {args.out}: {model.num_parameters():,} parameters in the Hugging Face GPT-2 layout")


def _instruct_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instruction", nargs="?", help="what the model should do (omit with --chat)")
    parser.add_argument("--input", default="", help="optional input the instruction refers to")
    parser.add_argument(
        "--model", default="models/instruct", help=f"model directory or {MODEL_URI} (default: models/instruct)"
    )
    parser.add_argument("--chat", action="store_true", help="interactive loop: an instruction, then an optional input")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="longest response in tokens (default 100)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


@command("instruct", "answer an instruction (Alpaca prompt) with an instruction-tuned model", _instruct_arguments)
def instruct_command(args: argparse.Namespace) -> None:
    from llm.data.instructions import Instruction, respond
    from llm.generate import GenerationConfig
    from llm.hf import load_any
    from llm.registry import resolve_model
    from llm.tokenizer import get_tokenizer

    if (args.instruction is None) != args.chat:
        raise LLMError("give an INSTRUCTION, or --chat for an interactive session (not both)")
    settings = GenerationConfig(args.max_new_tokens, args.temperature, args.top_k, seed=args.seed, compile=args.compile)
    model, tokenizer = load_any(resolve_model(args.model), device=_device(args.device)), get_tokenizer()

    def answer(instruction: str, text: str) -> str:
        return respond(model, [Instruction(instruction, text, "")], tokenizer, settings, progress=False)[0]

    if not args.chat:
        print(answer(args.instruction, args.input))
        return
    print("Type an instruction, then an optional input (Enter to skip). Ctrl-D or an empty instruction quits.")
    while True:
        try:
            instruction = input("instruction> ").strip()
            text = input("input> ").strip() if instruction else ""
        except EOFError:
            print()
            return
        if not instruction:
            return
        print(answer(instruction, text), flush=True)


def _classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (none: read lines from stdin)")
    parser.add_argument(
        "--model", default="models/classifier", help=f"classifier directory or {MODEL_URI} (default models/classifier)"
    )
    parser.add_argument(
        "--base",
        default=None,
        help="base model of an adapter, a directory or models:/ URI (default: the path it recorded)",
    )
    parser.add_argument("--file", default=None, help="read texts from a UTF-8 file, one per line (blank lines skipped)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


@command("classify", "label texts with a fine-tuned classifier; prints label<TAB>probability", _classify_arguments)
def classify_command(args: argparse.Namespace) -> None:
    from pathlib import Path

    from llm.classifier import classify, load_classifier
    from llm.registry import resolve_model
    from llm.tokenizer import get_tokenizer

    if args.texts and args.file:
        raise LLMError("give TEXT arguments or --file, not both")
    texts = args.texts
    if not texts:
        if args.file:
            try:
                raw = Path(args.file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise LLMError(f"cannot read {args.file}: {err}") from err
        elif sys.stdin.isatty():
            raise LLMError("no texts: give TEXT arguments, --file, or lines on stdin")
        else:
            raw = sys.stdin.read()
        texts = [line for line in raw.splitlines() if line.strip()]
        if not texts:
            raise LLMError(f"no texts to classify in {args.file or 'stdin'}")
    base = args.base and resolve_model(args.base)
    model = load_classifier(resolve_model(args.model), base=base, device=_device(args.device))
    for label, probability in classify(model, texts, get_tokenizer(), batch_size=args.batch_size):
        print(f"{label}\t{probability:.4f}")


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["repro", "exp-run"], help="dvc repro, or dvc exp run")
    parser.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to dvc, e.g. -S pretrain.lr=0.002")


@command(
    "pipeline", "run dvc repro / dvc exp run inside a parent MLflow run (stages log child runs)", _pipeline_arguments
)
def pipeline_command(args: argparse.Namespace) -> None:
    from llm.pipeline import run_pipeline

    code = run_pipeline(args.action, args.dvc_args)
    if code:
        raise SystemExit(code)


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as err:
        raise LLMError(f"device {name!r} is not usable here ({str(err).splitlines()[0]})") from err
    return name


if __name__ == "__main__":
    sys.exit(main())
