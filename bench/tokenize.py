"""Benchmark: our tokenize path (`llm.data.corpus.tokenize_corpus`, text files → Parquet) against raw tiktoken.

Builds a ~200 MB corpus by repeating the real one in a temporary folder, then alternates, `--repeats` times,
two worker subprocesses on the same text with the same threads:
  ours: tokenize_corpus(corpus, out.parquet) — read, decode, strip boilerplate, encode, write Parquet;
  raw:  the same normalised texts already in memory → `enc.encode_ordinary_batch(texts, num_threads)`, fed in
        the same ~8 M-character batches (all 55 M tokens as Python lists at once would need ~2 GB).
Each worker reports its wall time and peak RSS (`ru_maxrss`). Workers run under the memory allocator the
stages use (`llm.allocator`; set LLM_ALLOCATOR=system to opt out).

    .venv/bin/python bench/tokenize.py [--mb 200] [--repeats 3] [--threads N] [--corpus DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's `tokenize` module: keep its folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from llm.data.corpus import tokenize_corpus  # noqa: E402
from llm.data.inputs import list_files  # noqa: E402
from llm.data.text import read_text, strip_gutenberg  # noqa: E402
from llm.paths import find_mirror  # noqa: E402
from llm.tokenizer import get_tokenizer  # noqa: E402

BATCH_CHARS = 8 << 20  # tokenize_corpus's default batch


def build_corpus(source: Path, dest: Path, target_mb: float) -> tuple[int, int]:
    """Copy the files of `source` into dest/rep000, rep001, … until `target_mb` MB; → (files, bytes)."""
    files = list_files(source)
    size = sum(f.stat().st_size for f in files)
    copies = max(1, round(target_mb * 1e6 / size))
    for i in range(copies):
        (dest / f"rep{i:03d}").mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, dest / f"rep{i:03d}" / f.name)
    return copies * len(files), copies * size


def worker(mode: str, corpus: Path, threads: int) -> dict[str, float]:
    enc = get_tokenizer()
    if mode == "ours":
        with tempfile.TemporaryDirectory() as tmp:
            cpu_before, started = _cpu_seconds(), time.perf_counter()
            stats = tokenize_corpus(corpus, Path(tmp) / "corpus.parquet", enc, num_threads=threads, progress=False)
            seconds, tokens = time.perf_counter() - started, stats.tokens
    else:
        texts = [strip_gutenberg(read_text(f)) for f in list_files(corpus)]
        batches, batch, chars = [], [], 0
        for text in texts:
            batch.append(text)
            chars += len(text)
            if chars >= BATCH_CHARS:
                batches.append(batch)
                batch, chars = [], 0
        batches.append(batch)
        cpu_before, started = _cpu_seconds(), time.perf_counter()
        tokens = sum(len(ids) for b in batches for ids in enc.encode_ordinary_batch(b, num_threads=threads))
        seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime - cpu_before
    return {"seconds": seconds, "cpu_seconds": cpu_s, "tokens": tokens, "peak_rss_mb": usage.ru_maxrss / 1024}  # KiB


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_worker(mode: str, corpus: Path, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", mode, "--corpus", str(corpus), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}–{max(values):,.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200.0, help="corpus size to build, MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--corpus", type=Path, help="real corpus folder (default: the data mirror's corpus/)")
    parser.add_argument("--worker", choices=["ours", "raw"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from llm.allocator import reexec_with_best_allocator

        reexec_with_best_allocator()
        print(json.dumps(worker(args.worker, args.corpus, args.threads)))
        return

    source = args.corpus or (find_mirror() or Path("data/raw")) / "corpus"
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        n_files, n_bytes = build_corpus(source, Path(tmp), args.mb)
        print(f"corpus: {n_files} files, {n_bytes / 1e6:,.1f} MB (from {source}); threads: {args.threads}")
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "raw": []}
        for i in range(args.repeats):
            for mode in ("raw", "ours"):
                result = run_worker(mode, Path(tmp), args.threads)
                runs[mode].append(result)
                print(
                    f"  run {i + 1} {mode:4}: {result['seconds']:.2f} s wall, {result['cpu_seconds']:.2f} s CPU, "
                    f"{result['peak_rss_mb']:.0f} MB peak RSS"
                )
    tokens = {mode: {r["tokens"] for r in results} for mode, results in runs.items()}
    assert tokens["ours"] == tokens["raw"] and len(tokens["ours"]) == 1, f"token counts differ: {tokens}"
    n_tokens = tokens["ours"].pop()
    print(f"tokens: {n_tokens:,}")
    print("| path | wall s, median (min–max) | CPU s | MB/s | M tokens/s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for mode, label in (("raw", "raw tiktoken encode_ordinary_batch"), ("ours", "ours: tokenize_corpus → Parquet")):
        secs = [r["seconds"] for r in runs[mode]]
        mbps = [n_bytes / 1e6 / s for s in secs]
        mtps = [n_tokens / 1e6 / s for s in secs]
        rss = [r["peak_rss_mb"] for r in runs[mode]]
        cpu = [r["cpu_seconds"] for r in runs[mode]]
        print(f"| {label} | {summary(secs)} | {summary(cpu)} | {summary(mbps)} | {summary(mtps)} | {max(rss):,.0f} |")
    ratio = statistics.median(r["seconds"] for r in runs["raw"]) / statistics.median(r["seconds"] for r in runs["ours"])
    print(f"throughput ours / raw (median times): {ratio:.2f}×; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
