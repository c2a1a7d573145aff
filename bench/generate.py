"""Generation throughput side by side: ours with and without the KV cache vs transformers' `generate`.

Greedy decoding of exactly `--new-tokens` tokens (no early stop) at batch 1 from a short prompt, GPT-2 124M
shape with random weights (speed does not depend on them). Ours goes through `llm.generate.generate`
(`use_cache=True` / `False`); HF through `GPT2LMHeadModel.generate` with its default cache; `book` is the
book's `generate_text_simple` loop (no cache). tokens/s = new tokens / wall time of the whole call.

    python bench/generate.py
    python bench/generate.py --contenders ours@best,hf@system --dtype bfloat16
    python bench/generate.py --prompt-tokens 256        # a long prompt: the uncached path recomputes more

A contender is `<name>@<allocator>`: names ours, ours-compiled (`compile=True`), ours-nocache, ours-noonednn
(every linear layer through F.linear), hf, book; allocators as in bench/harness.py. The warm-up call (20 tokens)
is timed apart: it holds torch.compile's compilation.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize`: look in this folder after the stdlib.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import argparse
import os
import time
from typing import Any

import harness
import torch

from llm.config import GPTConfig, get_preset

OURS = {  # name -> generation settings; ours-noonednn is an ablation (every linear layer through F.linear)
    "ours": {},
    "ours-compiled": {"compile": True},
    "ours-nocache": {"use_cache": False},
    "ours-noonednn": {},
}
NAMES = (*OURS, "hf", "book")
DEFAULT_CONTENDERS = "ours-compiled@best,ours@best,ours-nocache@best,hf@system,hf@best"
PROMPT = "Hello, I am"


# ---- worker side -------------------------------------------------------------------------------------------


def _generator(name: str, config: GPTConfig, dtype: torch.dtype) -> Any:
    """A function (prompt ids, new tokens) -> generated ids for contender `name`."""
    if name in OURS:
        import llm.kernels
        import llm.model
        from llm.generate import generate

        if name == "ours-noonednn":
            llm.kernels.ONEDNN_LINEAR = False
        model = llm.model.GPT(config).to(dtype).eval()
        return lambda ids, n: generate(model, [ids], max_new_tokens=n, temperature=0.0, **OURS[name])[0]
    if name == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.context_length,
            n_embd=config.emb_dim,
            n_layer=config.n_layers,
            n_head=config.n_heads,
        )
        model = GPT2LMHeadModel(hf_config).to(dtype).eval()
        model.generation_config.eos_token_id = None  # random weights: never stop early

        def hf_generate(ids: list[int], n: int) -> list[int]:
            x = torch.tensor([ids])
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0
            )
            return out[0, len(ids) :].tolist()

        return hf_generate
    if name == "book":
        import book_gpt

        cfg = {
            "vocab_size": config.vocab_size,
            "context_length": config.context_length,
            "emb_dim": config.emb_dim,
            "n_heads": config.n_heads,
            "n_layers": config.n_layers,
            "drop_rate": 0.0,
            "qkv_bias": config.qkv_bias,
        }
        model = book_gpt.GPTModel(cfg).to(dtype).eval()

        def book_generate(ids: list[int], n: int) -> list[int]:
            out = book_gpt.generate_text_simple(model, torch.tensor([ids]), n, config.context_length)
            return out[0, len(ids) :].tolist()

        return book_generate
    raise ValueError(f"unknown contender {name!r}; valid: {', '.join(NAMES)}")


def worker() -> None:
    state: dict[str, Any] = {}

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "setup":
            torch.set_num_threads(request["threads"])
            torch.manual_seed(request["seed"])
            config = get_preset(request["preset"])
            state["generate"] = _generator(request["name"], config, getattr(torch, request["dtype"]))
            from llm.tokenizer import get_tokenizer

            prompt = get_tokenizer().encode(PROMPT)
            length = request["prompt_tokens"] or len(prompt)
            state["prompt"] = (prompt * (length // len(prompt) + 1))[:length]  # the prompt repeated to `length`
            return harness.process_info()
        if request["op"] == "ceiling":
            return weight_streaming_ceiling(request["preset"], getattr(torch, request["dtype"]), request["threads"])
        if request["op"] == "run":
            start = time.perf_counter()
            with torch.inference_mode():
                out = state["generate"](state["prompt"], request["new_tokens"])
            seconds = time.perf_counter() - start
            return {"seconds": seconds, "tokens": len(out), "head": out[:8], **harness.process_info()}
        raise ValueError(f"unknown op {request['op']!r}")

    harness.serve(handle)


# ---- driver side -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model shape (default %(default)s)")
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS, help="comma-separated NAME@ALLOCATOR")
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens generated per call (default 200)")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="prompt length (default: the 4-token PROMPT)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds (default %(default)s)")
    parser.add_argument("--threads", type=int, default=harness.default_threads(), help="torch threads everywhere")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write all measurements to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker()
    contenders = args.contenders.split(",")
    for contender in contenders:
        if contender.partition("@")[0] not in NAMES:
            raise SystemExit(f"unknown contender {contender!r}; names: {', '.join(NAMES)}")
    info = harness.machine_info()
    prompt = f"{args.prompt_tokens}-token prompt" if args.prompt_tokens else "4-token prompt"
    print(
        f"# Generation: {args.preset}, {args.dtype}, batch 1, {prompt}, {args.new_tokens} new tokens, "
        f"{args.threads} threads\n"
    )
    harness.print_machine(info)
    probe = harness.Worker(__file__, "ceiling", "best")  # measured under the memory set-up of ours@best
    try:
        ceiling = probe.call(op="ceiling", preset=args.preset, dtype=args.dtype, threads=args.threads)
    finally:
        probe.close()
    print(
        f"memory-bandwidth ceiling for cached decoding: {ceiling['tokens_per_s']:.1f} tokens/s (every linear "
        f"layer's weights read once per token at {ceiling['gb_per_s']:.1f} GB/s, a streaming sum's rate)"
    )
    workers = {c: harness.Worker(__file__, c, c.partition("@")[2] or "inherit") for c in contenders}
    results: dict[str, Any] = {"machine": info, "ceiling": ceiling, "contenders": {}}
    try:
        for contender, w in workers.items():
            reply = w.call(
                op="setup", name=contender.partition("@")[0], preset=args.preset, dtype=args.dtype,
                seed=args.seed, threads=args.threads, prompt_tokens=args.prompt_tokens,
            )  # fmt: skip
            warm = w.call(op="run", new_tokens=min(args.new_tokens, 20))
            results["contenders"][contender] = {"process": reply, "warmup_s": warm["seconds"], "runs": []}
            print(f"  set up {contender}: {reply['allocator']}", flush=True)
        for i, order in enumerate(harness.rounds(args.repeats, contenders)):
            for contender in order:
                reply = workers[contender].call(op="run", new_tokens=args.new_tokens)
                if reply["tokens"] != args.new_tokens:
                    raise SystemExit(f"{contender} generated {reply['tokens']} tokens, not {args.new_tokens}")
                entry = results["contenders"][contender]
                entry["runs"].append(reply["tokens"] / reply["seconds"])
                entry["process"] = reply
            print(f"  round {i + 1}/{args.repeats} done, load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for w in workers.values():
            w.close()
    results["load_after"] = os.getloadavg()
    report(results)
    harness.write_json(args.json, results)


def weight_streaming_ceiling(preset: str, dtype: torch.dtype, threads: int) -> dict[str, float]:
    """The fastest batch-1 decoding could be if memory bandwidth were its only limit: tokens/s if a token cost
    just one read of every linear layer's weights (attention, MLP and output layer; ~500 MB for GPT-2 in fp32),
    read at the rate of a plain streaming pass (the best of 5 sums over a buffer of that size), and that rate.
    The driver runs it in a worker with the `best` memory set-up (huge pages speed up streaming too)."""
    from llm.model import GPT

    torch.set_num_threads(threads)
    numel = sum(m.weight.numel() for m in GPT(get_preset(preset)).modules() if isinstance(m, torch.nn.Linear))
    buffer = torch.ones(numel, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return {"tokens_per_s": 1 / best, "gb_per_s": buffer.numel() * buffer.element_size() / best / 1e9}


def report(results: dict[str, Any]) -> None:
    print(f"\nload average after: {results['load_after']}\n")
    speed = {c: harness.summary(e["runs"]) for c, e in results["contenders"].items()}
    rows = [
        [c, e["process"]["allocator"], harness.fmt_range(speed[c], 1), f"{e['warmup_s']:.1f}",
         e["process"]["head"][:4], f"{e['process']['peak_rss_mb']:,.0f}"]
        for c, e in results["contenders"].items()
    ]  # fmt: skip
    header = ["contender", "allocator", "tokens/s median (min–max)", "warm-up s", "first tokens", "peak RSS MB"]
    print(harness.table(header, rows))
    print("\nRatios (row / column), of medians and (range of per-round ratios):")
    print(harness.ratio_table({c: e["runs"] for c, e in results["contenders"].items()}, list(speed), list(speed)))
    results["summary"] = {c: s["median"] for c, s in speed.items()}


if __name__ == "__main__":
    main()
