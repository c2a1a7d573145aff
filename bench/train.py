"""Training throughput side by side: our GPT vs the book-style GPT vs transformers' GPT2LMHeadModel.

One training step = forward + loss + backward + AdamW step (fused kernel for every contender; HF Trainer's
default since torch 2.8) at the same model shape, batch, and precision: fp32, or bf16 autocast with fp32
master weights. Dropout is 0 everywhere. Tokens are random ids (speed does not depend on them).

MFU = achieved FLOP/s / the matmul peak this script measures for the same dtype (best of square matmuls).
FLOPs per token = 6 * (12 * n_layers * emb_dim^2 + vocab * emb_dim) + 12 * n_layers * T * emb_dim
(weights of the blocks and the output layer, forward + backward, plus attention scores; PaLM's formula).

    python bench/train.py                                   # cpu-small preset, batch 8 x 256, all contenders
    python bench/train.py --setup gpt2:2x512 --contenders ours@best,hf@system,hf@best,book@system
    python bench/train.py --contenders ours@best,ours+compile@best --precisions bf16

A contender is `<name>@<allocator>`: names ours, ours+compile, book, hf; allocators system, best, inherit or
a library path (see bench/harness.py).
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
import torch.nn.functional as F

import llm.losses
from llm.config import GPTConfig, get_preset

NAMES = ("ours", "ours+compile", "ours-plainloss", "ours-nopad", "book", "hf")
# Ablations: ours-plainloss takes F.cross_entropy on the full logits instead of the fused loss; ours-nopad runs
# the fused loss without padding the vocabulary to a multiple of 64.
DEFAULT_CONTENDERS = "ours@best,book@system,hf@system,ours@system,book@best,hf@best"
PEAK_SIZES = (1024, 2048, 4096)


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (see the module docstring)."""
    weights = 12 * config.n_layers * config.emb_dim**2 + config.vocab_size * config.emb_dim
    return 6 * weights + 12 * config.n_layers * seq_len * config.emb_dim


# ---- worker side -------------------------------------------------------------------------------------------


class Trainer:
    """One contender's model, optimizer and batches, stepping in fp32 or bf16 autocast."""

    def __init__(self, name: str, config: GPTConfig, batch: int, seq_len: int, device: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device)
        model, self.loss_fn = _build(name.removesuffix("+compile").partition("-")[0], config)
        if name == "ours-plainloss":
            self.loss_fn = lambda m, x, y: F.cross_entropy(m(x).flatten(0, 1).float(), y.flatten())
        if name == "ours-nopad":
            llm.losses.PAD_VOCAB = 1
        self.model = model.to(self.device).train()
        if name.startswith("ours"):  # through the project's training code: its optimizer set-up
            from llm.optimizer import make_optimizer
            from llm.train_config import TrainConfig

            self.optimizer = make_optimizer(self.model, TrainConfig(lr=4e-4, weight_decay=0.1))
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=4e-4, weight_decay=0.1, fused=True)
        if name.endswith("+compile"):
            self.loss_fn = torch.compile(self.loss_fn)
        self.batches = [torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device) for _ in range(4)]
        self.steps = 0

    def run(self, steps: int, precision: str) -> dict[str, float]:
        """Time `steps` training steps; the loss is read once at the end (no host sync inside the loop)."""
        harness.synchronize(self.device.type)
        start = time.perf_counter()
        for _ in range(steps):
            tokens = self.batches[self.steps % len(self.batches)]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = self.loss_fn(self.model, tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
        value = loss.item()
        return {"seconds": time.perf_counter() - start, "loss": value}


def _build(name: str, config: GPTConfig) -> tuple[torch.nn.Module, Any]:
    """(model, loss(model, inputs, targets)) for contender `name`, all of shape `config` without dropout."""
    if name == "ours":
        from llm.model import GPT
        from llm.training import lm_loss

        return GPT(config.replace(dropout=0.0)), lambda m, x, y: lm_loss(m, (x, y))
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
        return book_gpt.GPTModel(cfg), lambda m, x, y: book_gpt.calc_loss_batch(x, y, m)
    if name == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.context_length,
            n_embd=config.emb_dim,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            tie_word_embeddings=config.tie_weights,
        )
        # HF shifts the labels itself; pass the inputs as labels (same tensor shapes and work as ours).
        return GPT2LMHeadModel(hf_config), lambda m, x, y: m(input_ids=x, labels=x).loss
    raise ValueError(f"unknown contender {name!r}; valid: {', '.join(NAMES)}")


def worker() -> None:
    state: dict[str, Trainer] = {}

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "setup":
            torch.set_num_threads(request["threads"])
            start = time.perf_counter()
            config = get_preset(request["preset"])
            state["trainer"] = Trainer(
                request["name"], config, request["batch"], request["seq_len"], request["device"], request["seed"]
            )
            return {"setup_s": time.perf_counter() - start, **harness.process_info()}
        if request["op"] == "run":
            return {**state["trainer"].run(request["steps"], request["precision"]), **harness.process_info()}
        if request["op"] == "peak":
            torch.set_num_threads(request["threads"])
            dtype = getattr(torch, request["dtype"])
            return {"gflops": max(harness.matmul_gflops(dtype, n, request["device"]) for n in PEAK_SIZES)}
        raise ValueError(f"unknown op {request['op']!r}")

    harness.serve(handle)


# ---- driver side -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", default="cpu-small:8x256", help="PRESET:BATCHxSEQ_LEN (default %(default)s)")
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS, help="comma-separated NAME@ALLOCATOR")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (default %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender and precision")
    parser.add_argument("--threads", type=int, default=harness.default_threads(), help="torch threads everywhere")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write all measurements to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker()
    preset, _, shape = args.setup.partition(":")
    batch, seq_len = (int(v) for v in shape.split("x"))
    config = get_preset(preset)
    precisions = args.precisions.split(",")
    contenders = args.contenders.split(",")
    for contender in contenders:
        if contender.partition("@")[0] not in NAMES:
            raise SystemExit(f"unknown contender {contender!r}; names: {', '.join(NAMES)}")
    info = harness.machine_info()
    print(
        f"# Training: {preset} (vocab {config.vocab_size}, emb {config.emb_dim}, {config.n_layers} layers), "
        f"batch {batch} x {seq_len}, {args.threads} threads\n"
    )
    harness.print_machine(info)

    results: dict[str, Any] = {
        "machine": info,
        "setup": args.setup,
        "contenders": {c: {"process": {}, "warmup_s": {}, "runs": {}, "loss": {}} for c in contenders},
        "peak": {},
    }
    for precision in precisions:
        measure(args, precision, contenders, preset, batch, seq_len, results)
    results["load_after"] = os.getloadavg()
    report(results, config, batch, seq_len, precisions)
    harness.write_json(args.json, results)


def measure(
    args: argparse.Namespace,
    precision: str,
    contenders: list[str],
    preset: str,
    batch: int,
    seq_len: int,
    results: dict[str, Any],
) -> None:
    """All rounds of one precision, every contender in a worker process of its own started for it.

    A user trains at one precision per process, and a process that ran the other precision first carries state
    over: after one fp32 step, HF's bf16 steps under glibc ran 9-20% faster while ours (jemalloc) lost 3%
    (BENCHMARKS.md). So each precision gets fresh workers; contenders still alternate within every round.
    """
    print(f"\n{precision}:", flush=True)
    workers = {c: harness.Worker(__file__, c, c.partition("@")[2] or "inherit") for c in contenders}
    peak_worker = harness.Worker(__file__, "peak", "system")
    try:
        for contender, w in workers.items():
            reply = w.call(
                op="setup",
                name=contender.partition("@")[0],
                preset=preset,
                batch=batch,
                seq_len=seq_len,
                device=args.device,
                seed=args.seed,
                threads=args.threads,
            )
            entry = results["contenders"][contender]
            entry["process"][precision] = reply
            # the first step includes compilation for ours+compile
            entry["warmup_s"][precision] = w.call(op="run", steps=1, precision=precision)["seconds"]
            if args.warmup > 1:
                w.call(op="run", steps=args.warmup - 1, precision=precision)
            entry["runs"][precision] = []
            print(f"  set up {contender}: {reply['allocator']}, {reply['setup_s']:.1f} s", flush=True)
        for i, order in enumerate(harness.rounds(args.repeats, [*contenders, "peak"])):
            for contender in order:
                if contender == "peak":
                    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
                    reply = peak_worker.call(op="peak", dtype=dtype, device=args.device, threads=args.threads)
                    results["peak"].setdefault(precision, []).append(reply["gflops"])
                    continue
                reply = workers[contender].call(op="run", steps=args.steps, precision=precision)
                entry = results["contenders"][contender]
                entry["runs"][precision].append(batch * seq_len * args.steps / reply["seconds"])
                entry["process"][precision] = reply | {"setup_s": entry["process"][precision]["setup_s"]}
                entry["loss"][precision] = reply["loss"]
            print(f"  round {i + 1}/{args.repeats} done, load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for w in [*workers.values(), peak_worker]:
            w.close()


def report(results: dict[str, Any], config: GPTConfig, batch: int, seq_len: int, precisions: list[str]) -> None:
    peak = {p: harness.summary(v) for p, v in results["peak"].items()}
    fpt = flops_per_token(config, seq_len)
    print(f"\nload average after: {results['load_after']}")
    print(
        f"matmul peak (GFLOP/s, median of per-round best over n={PEAK_SIZES}): "
        + ", ".join(f"{p} {harness.fmt_range(s)}" for p, s in peak.items())
    )
    print(f"FLOPs per token: {fpt / 1e6:.1f} M; per step: {fpt * batch * seq_len / 1e9:.1f} G\n")
    speed: dict[tuple[str, str], float] = {}
    rows = []
    for contender, entry in results["contenders"].items():
        for precision in precisions:
            s = harness.summary(entry["runs"][precision])
            speed[contender, precision] = s["median"]
            mfu = s["median"] * fpt / 1e9 / peak[precision]["median"]
            rows.append(
                [
                    contender,
                    entry["process"][precision]["allocator"],
                    precision,
                    harness.fmt_range(s),
                    f"{mfu:.0%}",
                    f"{entry['loss'][precision]:.3f}",
                    f"{entry['warmup_s'][precision]:.1f}",
                    f"{entry['process'][precision]['peak_rss_mb']:,.0f}",
                ]
            )
    print(
        harness.table(
            [
                "contender",
                "allocator",
                "precision",
                "tokens/s median (min–max)",
                "MFU",
                "last loss",
                "first step s",
                "peak RSS MB",
            ],
            rows,
        )
    )
    print("\nRatios (row / column), of medians and (range of per-round ratios):")
    runs = {f"{c} {p}": e["runs"][p] for c, e in results["contenders"].items() for p in precisions}
    ours = [k for k in runs if k.startswith("ours")]
    peers = [k for k in runs if not k.startswith("ours")] + [k for k in ours if k.split()[0] == ours[0].split()[0]]
    print(harness.ratio_table(runs, ours, peers))
    results["summary"] = {f"{c} {p}": v for (c, p), v in speed.items()}


if __name__ == "__main__":
    main()
