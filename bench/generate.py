"""Generation throughput side by side: ours in fp32, bf16 and int8 weights (and with or without the KV cache) vs
transformers' `generate` in fp32 and bf16.

Greedy decoding of exactly `--new-tokens` tokens (no early stop) for `--batches` copies of a short prompt, GPT-2
124M shape with random weights (speed does not depend on them). Ours goes through `llm.generate.generate` on a
model converted by `llm.quantize.for_inference`; HF through `GPT2LMHeadModel.generate` with its default cache;
`book` is the book's `generate_text_simple` loop (no cache, fp32). tokens/s = batch x new tokens / wall time of
the whole call. The run also measures the memory-bandwidth ceiling of batch-1 decoding for each weight format.

    python bench/generate.py                                # fp32 / bf16 / int8 against HF, batches 1, 8, 32
    python bench/generate.py --contenders ours-compiled@best,ours@best,ours-nocache@best,hf@system --batches 1
    python bench/generate.py --prompt-tokens 256            # a long prompt: the uncached path recomputes more
    python bench/generate.py --profile ours-int8            # where one batch-1 decoding call spends its time

A contender is `<name>@<allocator>`: names ours (fp32), ours-bf16, ours-int8 (int8 weights, `--quantize int8`'s
default activations), ours-compiled (`compile=True`), ours-nocache, ours-noonednn (every fp32 linear layer through
F.linear), hf, hf-bf16, book; allocators as in bench/harness.py. The warm-up call (20 tokens, batch 1) is timed
apart: it holds torch.compile's compilation.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize`: look in this folder after the stdlib.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import argparse
import os
import statistics
import time
from typing import Any

import harness
import torch

from llm.config import GPTConfig, get_preset

FP32, BF16, INT8 = ("fp32", None), ("bf16", None), (None, "int8")  # (dtype, quantize) of llm.quantize
OURS: dict[str, tuple[dict[str, Any], tuple[str, str | None]]] = {  # name -> (generation settings, format)
    "ours": ({}, FP32),
    "ours-bf16": ({}, BF16),
    "ours-int8": ({}, INT8),
    "ours-compiled": ({"compile": True}, FP32),
    "ours-nocache": ({"use_cache": False}, FP32),
    "ours-noonednn": ({}, FP32),  # an ablation: every fp32 linear layer through F.linear
}
HF = {"hf": torch.float32, "hf-bf16": torch.bfloat16}
NAMES = (*OURS, *HF, "book")
DEFAULT_CONTENDERS = "ours@best,ours-bf16@best,ours-int8@best,hf@best,hf-bf16@best"
BYTES_PER_WEIGHT = {"ours": 4, "ours-bf16": 2, "ours-int8": 1}  # the formats whose ceiling the report shows
PROMPT = "Hello, I am"


# ---- worker side -------------------------------------------------------------------------------------------


def _generator(name: str, config: GPTConfig) -> Any:
    """A function (prompt ids, new tokens, batch) -> the generated ids of the first row, for contender `name`."""
    if name in OURS:
        import llm.kernels
        import llm.model
        from llm.generate import generate
        from llm.quantize import for_inference

        if name == "ours-noonednn":
            llm.kernels.ONEDNN_LINEAR = False
        settings, (dtype, quantize) = OURS[name]
        model = for_inference(llm.model.GPT(config).eval(), dtype, quantize)

        def ours_generate(ids: list[int], n: int, batch: int) -> list[int]:
            out = generate(model, [ids] * batch, max_new_tokens=n, temperature=0.0, **settings)
            return [t for row in out for t in row]

        return ours_generate
    if name in HF:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.context_length,
            n_embd=config.emb_dim,
            n_layer=config.n_layers,
            n_head=config.n_heads,
        )
        model = GPT2LMHeadModel(hf_config).to(HF[name]).eval()
        model.generation_config.eos_token_id = None  # random weights: never stop early

        def hf_generate(ids: list[int], n: int, batch: int) -> list[int]:
            x = torch.tensor([ids] * batch)
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0
            )
            return out[:, len(ids) :].flatten().tolist()

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
        model = book_gpt.GPTModel(cfg).eval()

        def book_generate(ids: list[int], n: int, batch: int) -> list[int]:
            out = book_gpt.generate_text_simple(model, torch.tensor([ids] * batch), n, config.context_length)
            return out[:, len(ids) :].flatten().tolist()

        return book_generate
    raise ValueError(f"unknown contender {name!r}; valid: {', '.join(NAMES)}")


def worker() -> None:
    state: dict[str, Any] = {}

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "setup":
            torch.set_num_threads(request["threads"])
            torch.manual_seed(request["seed"])
            state["generate"] = _generator(request["name"], get_preset(request["preset"]))
            from llm.tokenizer import get_tokenizer

            prompt = get_tokenizer().encode(PROMPT)
            length = request["prompt_tokens"] or len(prompt)
            state["prompt"] = (prompt * (length // len(prompt) + 1))[:length]  # the prompt repeated to `length`
            return harness.process_info()
        if request["op"] == "ceiling":
            return weight_streaming_ceiling(request["preset"], request["threads"])
        if request["op"] == "run":
            start = time.perf_counter()
            with torch.inference_mode():
                out = state["generate"](state["prompt"], request["new_tokens"], request["batch"])
            seconds = time.perf_counter() - start
            return {"seconds": seconds, "tokens": len(out), "head": out[:8], **harness.process_info()}
        if request["op"] == "profile":
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                state["generate"](state["prompt"], request["new_tokens"], 1)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=request["rows"])
            return {"table": table}
        raise ValueError(f"unknown op {request['op']!r}")

    harness.serve(handle)


# ---- driver side -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model shape (default %(default)s)")
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS, help="comma-separated NAME@ALLOCATOR")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens generated per call (default 200)")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="prompt length (default: the 4-token PROMPT)")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds (default %(default)s)")
    parser.add_argument("--threads", type=int, default=harness.default_threads(), help="torch threads everywhere")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", metavar="NAME", help="only profile one batch-1 call of contender NAME")
    parser.add_argument("--json", help="also write all measurements to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker()
    contenders = [args.profile + "@best"] if args.profile else args.contenders.split(",")
    for contender in contenders:
        if contender.partition("@")[0] not in NAMES:
            raise SystemExit(f"unknown contender {contender!r}; names: {', '.join(NAMES)}")
    batches = [int(b) for b in args.batches.split(",")]
    info = harness.machine_info()
    prompt = f"{args.prompt_tokens}-token prompt" if args.prompt_tokens else "4-token prompt"
    print(
        f"# Generation: {args.preset}, batches {args.batches}, {prompt}, {args.new_tokens} new tokens, "
        f"{args.threads} threads\n"
    )
    harness.print_machine(info)
    workers = {c: harness.Worker(__file__, c, c.partition("@")[2] or "inherit") for c in contenders}
    results: dict[str, Any] = {"machine": info, "batches": batches, "contenders": {}}
    try:
        for contender, w in workers.items():
            reply = w.call(
                op="setup", name=contender.partition("@")[0], preset=args.preset, seed=args.seed,
                threads=args.threads, prompt_tokens=args.prompt_tokens,
            )  # fmt: skip
            warm = w.call(op="run", new_tokens=min(args.new_tokens, 20), batch=1)
            results["contenders"][contender] = {"process": reply, "warmup_s": warm["seconds"], "runs": {}}
            print(f"  set up {contender}: {reply['allocator']}", flush=True)
        if args.profile:
            print(workers[contenders[0]].call(op="profile", new_tokens=args.new_tokens, rows=20)["table"])
            return
        results["ceiling"] = workers[contenders[0]].call(op="ceiling", preset=args.preset, threads=args.threads)
        for i, order in enumerate(harness.rounds(args.repeats, contenders)):
            for contender in order:
                for batch in batches:
                    reply = workers[contender].call(op="run", new_tokens=args.new_tokens, batch=batch)
                    if reply["tokens"] != batch * args.new_tokens:
                        raise SystemExit(f"{contender} generated {reply['tokens']} tokens, not {args.new_tokens}")
                    entry = results["contenders"][contender]
                    entry["runs"].setdefault(str(batch), []).append(reply["tokens"] / reply["seconds"])
                    entry["process"] = reply
            print(f"  round {i + 1}/{args.repeats} done, load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for w in workers.values():
            w.close()
    results["load_after"] = os.getloadavg()
    report(results)
    harness.write_json(args.json, results)


def weight_streaming_ceiling(preset: str, threads: int) -> dict[str, float]:
    """The fastest batch-1 decoding could be if memory bandwidth were its only limit: tokens/s if a token cost
    just one read of every linear layer's weights (attention, MLP and output layer; ~500 MB for GPT-2 in fp32),
    read at the rate of a plain streaming pass (the best of 5 sums over an fp32 buffer of that size), per weight
    format (`BYTES_PER_WEIGHT`), and that rate. Run in a worker with the `best` memory set-up (huge pages speed up
    streaming too)."""
    from llm.model import GPT

    torch.set_num_threads(threads)
    numel = sum(m.weight.numel() for m in GPT(get_preset(preset)).modules() if isinstance(m, torch.nn.Linear))
    rate = harness.streaming_rate(numel)
    return {"gb_per_s": rate / 1e9, **{name: rate / (numel * size) for name, size in BYTES_PER_WEIGHT.items()}}


def report(results: dict[str, Any]) -> None:
    print(f"\nload average after: {results['load_after']}\n")
    ceiling = results["ceiling"]
    print(
        f"memory-bandwidth ceiling of batch-1 decoding (every linear layer's weights read once per token at "
        f"{ceiling['gb_per_s']:.1f} GB/s, a streaming sum's rate): "
        + ", ".join(f"{name} {ceiling[name]:.1f} tokens/s" for name in BYTES_PER_WEIGHT)
        + "\n"
    )
    entries = results["contenders"]
    rows = []
    for c, e in entries.items():
        for batch, runs in e["runs"].items():
            s = harness.summary(runs)
            name = c.partition("@")[0]
            share = f"{s['median'] / ceiling[name]:.0%}" if batch == "1" and name in ceiling else ""
            rows.append([c, batch, harness.fmt_range(s, 1), share, f"{e['warmup_s']:.1f}",
                         e["process"]["head"][:4], f"{e['process']['peak_rss_mb']:,.0f}"])  # fmt: skip
    header = ["contender", "batch", "tokens/s median (min–max)", "of ceiling", "warm-up s", "first tokens"]
    header.append("peak RSS MB")
    print(harness.table(header, rows))
    contenders = list(entries)
    bases = [c for c in contenders if c.partition("@")[0] in ("ours", "hf", "hf-bf16")]
    for batch in map(str, results["batches"]):
        print(f"\nBatch {batch}: ratios (row / column), of medians and (range of per-round ratios):")
        runs = {c: e["runs"][batch] for c, e in entries.items()}
        print(harness.ratio_table(runs, contenders, bases or contenders))
    results["summary"] = {c: {b: statistics.median(r) for b, r in e["runs"].items()} for c, e in entries.items()}


if __name__ == "__main__":
    main()
