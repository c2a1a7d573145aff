"""The linear layers of one batch-1 decoding step, through the matrix-vector kernels PyTorch offers on this
machine, side by side in one process.

Decoding one token at batch 1 runs each linear layer of the model once on a single row: GPT-2 124M has 49 of
them (4 per block and the vocabulary head), ~124 M weights. This script times those 49 products in a row, on
random weights and inputs of the model's shapes, for each kernel: the layers `llm` decodes with in each weight
format ("fp32, llm": `llm.kernels.linear`, oneDNN's linear op on x86; "bf16, llm": `llm.quantize.PackedLinear`,
oneDNN on weights packed at load; "int8, llm": `llm.quantize.Int8Linear`, fbgemm on x86) and the other kernels
PyTorch has for the same bytes per weight.

Everything runs in one worker process under the stages' memory set-up (jemalloc + huge pages where available).
Every layer's output is first checked against fp32 F.linear (relative error below 5 %). Then each round times
every kernel once, in a rotated order; ratios compare each kernel with `llm`'s fp32 layer, round by round.
GB/s = weight bytes read / time (where a format's weights fit in the CPU's last-level cache, part of them comes
from there rather than from memory).

    python bench/linear_kernels.py                 # GPT-2 124M shapes, 15 rounds
    python bench/linear_kernels.py --threads 1     # what one core streams
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize`: look in this folder after the stdlib.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import harness
import torch
import torch.nn.functional as F
from torch import nn

from llm.config import get_preset

Layer = Callable[[torch.Tensor], torch.Tensor]  # one linear layer: input (1, in) → output (1, out)


def _kernels() -> dict[str, tuple[int, torch.dtype, Callable[[nn.Linear], Layer]]]:
    """name -> (bytes per weight, input dtype, a function making the layer from an fp32 nn.Linear), for the
    kernels this machine's PyTorch has."""
    from llm import kernels, quantize

    def fp32_llm(linear: nn.Linear) -> Layer:
        return lambda x: kernels.linear(x, linear.weight, linear.bias)

    def fp32_f_linear(linear: nn.Linear) -> Layer:
        return lambda x: F.linear(x, linear.weight, linear.bias)

    def bf16_f_linear(linear: nn.Linear) -> Layer:
        weight = linear.weight.bfloat16()
        bias = None if linear.bias is None else linear.bias.bfloat16()
        return lambda x: F.linear(x, weight, bias)

    def bf16_onednn_plain(linear: nn.Linear) -> Layer:
        weight = linear.weight.bfloat16()
        bias = None if linear.bias is None else linear.bias.bfloat16()
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    def bf16_llm(linear: nn.Linear) -> Layer:
        return quantize.PackedLinear(linear.to(torch.bfloat16))

    def fp16_fbgemm(linear: nn.Linear) -> Layer:
        packed = torch.ops.quantized.linear_prepack_fp16(linear.weight, linear.bias)
        return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)

    def int8_llm(linear: nn.Linear) -> Layer:
        return quantize.Int8Linear(linear, torch.float32)

    def int8_weight_only(linear: nn.Linear) -> Layer:
        layer = quantize.Int8Linear(linear, torch.bfloat16)
        layer.packed = None  # without fbgemm's copy it takes the path it takes off x86 CPUs
        return layer

    found: dict[str, tuple[int, torch.dtype, Callable[[nn.Linear], Layer]]] = {
        "fp32, llm": (4, torch.float32, fp32_llm),
        "fp32, F.linear": (4, torch.float32, fp32_f_linear),
    }
    if quantize.ONEDNN_BF16:
        found["bf16, llm"] = (2, torch.bfloat16, bf16_llm)
    if kernels.ONEDNN_LINEAR:
        found["bf16, oneDNN on row-major weights"] = (2, torch.bfloat16, bf16_onednn_plain)
    found["bf16, F.linear"] = (2, torch.bfloat16, bf16_f_linear)
    if quantize.FBGEMM:
        found["fp16 weights, fbgemm (fp32 inputs)"] = (2, torch.float32, fp16_fbgemm)
        found["int8, llm"] = (1, torch.float32, int8_llm)
    found["int8 weight-only, aten._weight_int8pack_mm (bf16 inputs)"] = (1, torch.bfloat16, int8_weight_only)
    return found


# ---- worker side -------------------------------------------------------------------------------------------


def measure(preset: str, threads: int, repeats: int, seed: int) -> dict[str, Any]:
    """Seconds per pass over the model's linear layers, per kernel and round, plus the weight count and a
    streaming sum's rate over a buffer of the fp32 weights' size."""
    from llm.model import GPT

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = GPT(get_preset(preset)).eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]  # forward order: block by block, then head
    numel = sum(m.weight.numel() for m in linears)
    kernels = _kernels()
    layers: dict[str, list[tuple[Layer, torch.Tensor]]] = {}
    with torch.inference_mode():
        for name, (_, dtype, make) in kernels.items():
            layers[name] = []
            for linear in linears:
                layer, x = make(copy.deepcopy(linear)), torch.randn(1, linear.in_features)  # make may convert it
                expected = F.linear(x, linear.weight, linear.bias)
                error = (layer(x.to(dtype)).float() - expected).norm() / expected.norm()
                if error > 0.05:
                    shape = tuple(linear.weight.shape)
                    raise RuntimeError(f"kernel {name!r}: relative error {error:.3f} on a {shape} layer")
                layers[name].append((layer, x.to(dtype)))
        del model, linears
        seconds: dict[str, list[float]] = {name: [] for name in kernels}
        for name in kernels:  # warm-up: oneDNN creates its primitives on the first call
            _one_pass(layers[name])
        for order in harness.rounds(repeats, list(kernels)):
            for name in order:
                seconds[name].append(_one_pass(layers[name]))
    return {
        "numel": numel,
        "bytes_per_weight": {name: size for name, (size, _, _) in kernels.items()},
        "seconds": seconds,
        "streaming_gb_per_s": harness.streaming_rate(numel) / 1e9,
    }


def _one_pass(layers: list[tuple[Layer, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for layer, x in layers:
        layer(x)
    return time.perf_counter() - start


def worker() -> None:
    def handle(request: dict[str, Any]) -> dict[str, Any]:
        result = measure(request["preset"], request["threads"], request["repeats"], request["seed"])
        return {**result, **harness.process_info()}

    harness.serve(handle)


# ---- driver side -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model shape (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="measured rounds (default %(default)s)")
    parser.add_argument("--threads", type=int, default=harness.default_threads(), help="torch threads")
    parser.add_argument("--allocator", default="best", help="as in bench/harness.py (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write all measurements to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    info = harness.machine_info()
    print(f"# Linear kernels: {args.preset}, batch 1, {args.threads} threads, {args.repeats} rounds\n")
    harness.print_machine(info)
    w = harness.Worker(__file__, "kernels", args.allocator)
    try:
        result = w.call(preset=args.preset, threads=args.threads, repeats=args.repeats, seed=args.seed)
    finally:
        w.close()
    print(f"- worker: {result['allocator']}, {result['threads']} threads, peak RSS {result['peak_rss_mb']:,.0f} MB")
    report(result)
    harness.write_json(args.json, {"machine": info, **result})


def report(result: dict[str, Any]) -> None:
    numel, seconds = result["numel"], result["seconds"]
    base = next(iter(seconds))
    print(
        f"\n{numel / 1e6:.1f} M weights per pass; a streaming sum over their fp32 bytes runs at "
        f"{result['streaming_gb_per_s']:.1f} GB/s in the same process.\n"
    )
    rows = []
    for name, runs in seconds.items():
        size = result["bytes_per_weight"][name]
        s = harness.summary([t * 1e3 for t in runs])
        speedups = [b / t for b, t in zip(seconds[base], runs, strict=True)]
        ratio = statistics.median(seconds[base]) / statistics.median(runs)
        rows.append([
            name, size, harness.fmt_range(s, 2), f"{numel * size / statistics.median(runs) / 1e9:.1f}",
            f"{ratio:.2f}x ({min(speedups):.2f}–{max(speedups):.2f})",
            f"{4 / size:.0f}x",
        ])  # fmt: skip
    header = ["kernel", "bytes/weight", "ms per pass, median (min–max)", "GB/s of weights"]
    header += [f"speed vs {base}: ratio of medians (per-round range)", "bytes ratio"]
    print(harness.table(header, rows))


if __name__ == "__main__":
    main()
