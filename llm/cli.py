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
from typing import Any, NamedTuple

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


def _device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="torch device: auto (cuda, else mps, else cpu), cpu, cuda:N, mps"
    )


def _weights_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", default=None, help="weights and activations: fp32 or bf16 (default fp32; docs/generation.md)"
    )
    parser.add_argument("--quantize", default=None, help="int8: int8 linear layers (docs/generation.md)")


def _load_for_inference(args: argparse.Namespace, load: Callable[..., Any], *load_args: Any, **load_kwargs: Any) -> Any:
    """load(*load_args, device=the --device, **load_kwargs) converted to --dtype / --quantize (checked first, so a
    bad value fails before the model loads)."""
    from llm.device import resolve_device
    from llm.quantize import for_inference, resolve_format

    device = resolve_device(args.device)
    dtype, quantize = resolve_format(args.dtype, args.quantize, device)
    return for_inference(load(*load_args, device=device, **load_kwargs), dtype, quantize)


MODEL_URI = "a registered model, models:/NAME/VERSION or models:/NAME@ALIAS"
COMPILE_HELP = "torch.compile the decoding steps: a slower start (compiling on first use), then faster tokens"


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
    _weights_arguments(parser)
    _device_argument(parser)


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
    model = _load_for_inference(args, load_any, resolve_model(args.model))
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
    parser.add_argument("--force", action="store_true", help="write into OUT even when it holds files")


@command("import-hf", "convert OpenAI GPT-2 weights (Hugging Face layout) to our model directory", _import_arguments)
def import_hf_command(args: argparse.Namespace) -> None:
    from llm.hf import import_hf
    from llm.io import check_destination
    from llm.model_dir import save_model

    check_destination(args.out, args.src, force=args.force)
    model = import_hf(args.src)
    save_model(model, args.out, extra={"source": str(args.src)})
    print(f"wrote {args.out}: {model.num_parameters():,} parameters from {args.src}")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help=f"our model directory or {MODEL_URI}")
    parser.add_argument("out", help="directory to write for transformers.GPT2LMHeadModel.from_pretrained")
    parser.add_argument("--force", action="store_true", help="write into OUT even when it holds files")


@command("export-hf", "write a model in the Hugging Face GPT-2 layout", _export_arguments)
def export_hf_command(args: argparse.Namespace) -> None:
    from llm.hf import export_hf
    from llm.io import check_destination
    from llm.model_dir import load_model
    from llm.registry import resolve_model

    check_destination(args.out, args.model_dir, force=args.force)
    model = load_model(resolve_model(args.model_dir))
    export_hf(model, args.out)
    print(f"wrote {args.out}: {model.num_parameters():,} parameters in the Hugging Face GPT-2 layout")


def _instruct_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instruction", nargs="?", help="what the model should do (omit with --chat)")
    parser.add_argument("--input", default="", help="optional input the instruction refers to")
    parser.add_argument(
        "--model", default="models/instruct", help=f"model directory or {MODEL_URI} (default: models/instruct)"
    )
    parser.add_argument("--chat", action="store_true", help="a conversation: user messages from stdin, one a line")
    parser.add_argument("--system", default=None, help="with --chat: a system prompt (replaces the Alpaca preamble)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="longest response in tokens (default 100)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    _weights_arguments(parser)
    _device_argument(parser)


@command("instruct", "answer an instruction, or chat (--chat), with an instruction-tuned model", _instruct_arguments)
def instruct_command(args: argparse.Namespace) -> None:
    from llm.chat import Message, fit_context
    from llm.data.instructions import Instruction, respond
    from llm.generate import GenerationConfig
    from llm.hf import load_any
    from llm.registry import resolve_model
    from llm.tokenizer import get_tokenizer

    if (args.instruction is None) != args.chat or (args.system is not None and not args.chat):
        raise LLMError("give an INSTRUCTION, or --chat (optionally with --system) for a conversation")
    settings = GenerationConfig(args.max_new_tokens, args.temperature, args.top_k, seed=args.seed, compile=args.compile)
    model, tokenizer = _load_for_inference(args, load_any, resolve_model(args.model)), get_tokenizer()
    if not args.chat:
        print(respond(model, [Instruction(args.instruction, args.input, "")], tokenizer, settings, progress=False)[0])
        return
    budget = model.config.context_length - args.max_new_tokens  # prompt tokens that leave room for the reply
    if budget < 1:
        raise LLMError(f"--max-new-tokens must be below the model's context length {model.config.context_length}")
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message (Enter sends it). Ctrl-D or an empty message quits.")
    conversation = [Message("system", args.system)] if args.system else []
    while (line := _read_turn(interactive)).strip():
        try:
            kept = fit_context([*conversation, Message("user", line)], tokenizer, budget)
        except LLMError as err:
            print(f"error: {err}; message dropped", file=sys.stderr)
            continue
        if dropped := len(conversation) + 1 - len(kept):
            print(f"(dropped the oldest {dropped} messages to fit the context)", file=sys.stderr)
        entry = Instruction(line, "", "", tuple(kept[:-1]))
        reply = respond(model, [entry], tokenizer, settings, progress=False)[0]
        print(reply, flush=True)
        conversation = [*kept, Message("assistant", reply)]


def _read_turn(interactive: bool) -> str:
    """The next user message from stdin ("" at its end)."""
    try:
        return input("you> " if interactive else "")
    except EOFError:
        return ""


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
    _weights_arguments(parser)
    _device_argument(parser)


@command("classify", "label texts with a fine-tuned classifier; prints label<TAB>probability", _classify_arguments)
def classify_command(args: argparse.Namespace) -> None:
    from llm.classifier import classify, load_classifier
    from llm.io import read_utf8
    from llm.registry import resolve_model
    from llm.tokenizer import get_tokenizer

    if args.texts and args.file:
        raise LLMError("give TEXT arguments or --file, not both")
    if args.batch_size < 1:
        raise LLMError(f"--batch-size must be at least 1, got {args.batch_size}")
    texts = args.texts
    if not texts:
        if args.file:
            raw = read_utf8(args.file)
        elif sys.stdin.isatty():
            raise LLMError("no texts: give TEXT arguments, --file, or lines on stdin")
        else:
            data = sys.stdin.buffer.read()
            try:  # strictly, as --file reads: the text stream would decode bad bytes with the locale's handler
                raw = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LLMError(f"stdin is not valid UTF-8 (byte {err.start})") from err
        texts = [line for line in raw.splitlines() if line.strip()]
        if not texts:
            raise LLMError(f"no texts to classify in {args.file or 'stdin'}")
    base = args.base and resolve_model(args.base)
    model = _load_for_inference(args, load_classifier, resolve_model(args.model), base=base)
    for label, probability in classify(model, texts, get_tokenizer(), batch_size=args.batch_size):
        print(f"{label}\t{probability:.4f}")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"a base, instruct or classifier directory, or {MODEL_URI}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--name", default=None, help="model id clients pass as `model` (default: the directory name)")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default ${API_KEY_ENV})")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens, and the default (1024)")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (default 1 MB)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _weights_arguments(parser)
    _device_argument(parser)


API_KEY_ENV = "LLM_API_KEY"


@command("serve", "serve a model over an OpenAI-compatible HTTP API (see docs/serving.md)", _serve_arguments)
def serve_command(args: argparse.Namespace) -> None:
    import os

    from llm.device import resolve_device
    from llm.quantize import resolve_format
    from llm.serve.app import Limits
    from llm.serve.server import serve

    if min(args.max_batch, args.max_tokens, args.max_body_bytes, args.threads or 1) < 1:
        raise LLMError("--max-batch, --max-tokens, --max-body-bytes and --threads must be positive")
    if not 0 <= args.port <= 65535:
        raise LLMError(f"--port must be in 0..65535, got {args.port}")
    device = resolve_device(args.device)
    dtype, quantize = resolve_format(args.dtype, args.quantize, device)
    limits = Limits(args.max_tokens, args.max_body_bytes, args.api_key or os.environ.get(API_KEY_ENV) or None)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    serve(args.model, host=args.host, port=args.port, name=args.name, max_batch=args.max_batch, limits=limits,
          device=device, dtype=dtype, quantize=quantize)  # fmt: skip


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


if __name__ == "__main__":
    sys.exit(main())
