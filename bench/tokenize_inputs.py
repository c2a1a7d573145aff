"""Benchmark: the tokenize stage's JSONL input path against its plain-folder path, on the same text.

Builds, in a temporary folder, `--mb` MB (default 2,000) of text by repeating the real corpus (the data mirror's
books, boilerplate stripped), twice: as a folder of .txt files (one per book copy) and as one JSONL file whose
rows are the same text cut into ~`--row-kb` KB documents (`{"id": n, "text": ...}`). Then runs, `--repeats`
times and alternating, one worker subprocess per path: `tokenize_corpus` on that input with `--threads`
threads, writing Parquet. Each worker reports wall time, tokens and peak RSS (`ru_maxrss`); the stage's memory
allocator is used (`llm.allocator`). Prints MB/s of input text, the JSONL/folder throughput ratio and peak RSS.

    .venv/bin/python bench/tokenize_inputs.py [--mb 2000] [--row-kb 4] [--repeats 1] [--threads N]
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from llm.data.corpus import tokenize_corpus  # noqa: E402
from llm.data.inputs import CorpusInput, list_files  # noqa: E402
from llm.data.text import read_text, strip_gutenberg  # noqa: E402
from llm.paths import find_mirror  # noqa: E402
from llm.tokenizer import get_tokenizer  # noqa: E402

PATHS = {"folder": "folder of .txt files", "jsonl": "one JSONL file"}


def build(source: Path, dest: Path, target_mb: float, row_kb: float) -> int:
    """dest/folder/*.txt and dest/corpus.jsonl holding the same text (books repeated to `target_mb` MB); → bytes."""
    books = [strip_gutenberg(read_text(f)) for f in list_files(source)]
    (dest / "folder").mkdir(parents=True)
    row_chars, written, copy, row_id = int(row_kb * 1000), 0, 0, 0
    with open(dest / "corpus.jsonl", "w", encoding="utf-8") as jsonl:
        while written < target_mb * 1e6:
            for i, book in enumerate(books):
                (dest / "folder" / f"{copy:04d}_{i:02d}.txt").write_text(book, encoding="utf-8")
                written += len(book.encode())
                # Rows end at a space that follows a non-space character: the rows then encode to exactly the
                # book's tokens (see llm.data.corpus.split_text), so both paths yield the same token count.
                start = 0
                while start < len(book):
                    cut = book.find(" ", start + row_chars)
                    while cut > 0 and book[cut - 1].isspace():
                        cut = book.find(" ", cut + 1)
                    end = len(book) if cut < 0 else cut
                    jsonl.write(json.dumps({"id": row_id, "text": book[start:end]}) + "\n")
                    start, row_id = end, row_id + 1
            copy += 1
    return written


def worker(path: str, data: Path, threads: int) -> dict[str, float]:
    item = CorpusInput(path=str(data / "folder")) if path == "folder" else CorpusInput(path=str(data / "corpus.jsonl"))
    enc = get_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        stats = tokenize_corpus([item], Path(tmp) / "corpus.parquet", enc, num_threads=threads, progress=False)
        seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    return {"seconds": seconds, "tokens": stats.tokens, "documents": stats.documents, "peak_rss_mb": peak_mb}


def run_worker(path: str, data: Path, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", path, "--data", str(data), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=2000.0, help="text to build, MB (each path reads this much)")
    parser.add_argument("--row-kb", type=float, default=4.0, help="JSONL row size, KB")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--corpus", type=Path, help="folder of .txt books (default: the data mirror's corpus/)")
    parser.add_argument("--worker", choices=list(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from llm.allocator import reexec_with_best_allocator

        reexec_with_best_allocator()
        print(json.dumps(worker(args.worker, args.data, args.threads)))
        return

    source = args.corpus or (find_mirror() or Path("data/raw")) / "corpus"
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-inputs-") as tmp:
        started = time.perf_counter()
        n_bytes = build(source, Path(tmp), args.mb, args.row_kb)
        jsonl_mb = (Path(tmp) / "corpus.jsonl").stat().st_size / 1e6
        print(f"text: {n_bytes / 1e6:,.1f} MB (JSONL file {jsonl_mb:,.1f} MB, ~{args.row_kb:g} KB rows), "
              f"built in {time.perf_counter() - started:.0f} s; threads: {args.threads}")  # fmt: skip
        runs: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
        for i in range(args.repeats):
            for path in PATHS:
                result = run_worker(path, Path(tmp), args.threads)
                runs[path].append(result)
                print(f"  run {i + 1} {path:6}: {result['seconds']:.1f} s, {result['documents']:,} documents, "
                      f"{result['peak_rss_mb']:.0f} MB peak RSS")  # fmt: skip
    tokens = {path: {r["tokens"] for r in results} for path, results in runs.items()}
    assert tokens["folder"] == tokens["jsonl"] and len(tokens["folder"]) == 1, f"token counts differ: {tokens}"
    print(f"tokens: {tokens['folder'].pop():,}")
    print("| input | wall s, median (min–max) | MB/s of text | peak RSS MB |")
    print("|---|---|---|---|")
    medians = {}
    for path, label in PATHS.items():
        secs = [r["seconds"] for r in runs[path]]
        medians[path] = statistics.median(secs)
        print(f"| {label} | {medians[path]:,.1f} ({min(secs):,.1f}–{max(secs):,.1f}) | "
              f"{n_bytes / 1e6 / medians[path]:,.1f} | {max(r['peak_rss_mb'] for r in runs[path]):,.0f} |")  # fmt: skip
    print(f"throughput JSONL / folder (median times): {medians['folder'] / medians['jsonl']:.2f}×; "
          f"load average after: {os.getloadavg()[0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
