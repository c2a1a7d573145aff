"""`llm serve` under concurrent clients: aggregate completion tokens/s with 1 and with N clients.

Starts a real `llm serve` process on 127.0.0.1 (a free port) and drives it with C client threads, each sending
`--requests` chat completions back to back over its own keep-alive connection (greedy, `--max-tokens` each, a
different instruction per request). tokens/s = completion tokens (from each response's `usage`) / wall time of
the whole measurement. Rounds alternate the client counts, so a shared machine's load drifts hit both alike.

    python bench/serve.py                              # models/instruct, 1 vs 8 clients
    python bench/serve.py --model DIR --clients 1,2,4,8

Without `--model` and without models/instruct (no `make run` yet), it serves a randomly initialised model of the
default architecture (params.yaml `model:` and `sample.context_length`) saved as an instruct model: decoding
speed does not depend on the weights, but a random model seldom stops early, so its replies are full length.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize`: look in this folder after the stdlib.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Any

import harness
import yaml

DEFAULT_MODEL = harness.REPO / "models" / "instruct"
INSTRUCTIONS = [
    "Name a colour.", "Convert 45 kilometers to meters.", "Give a synonym for 'happy'.", "Name the capital of Italy.",
    "Rewrite the sentence in passive voice: The cat chased the mouse.", "List three fruits.",
    "Translate 'thank you' into Spanish.", "Classify the following as a mammal or a bird: eagle.",
]  # fmt: skip


def default_model(tmp: Path) -> tuple[Path, str]:
    """(models/instruct, its description), or a random model of the pipeline's default architecture in `tmp`."""
    if DEFAULT_MODEL.is_dir():
        return DEFAULT_MODEL, f"{DEFAULT_MODEL.relative_to(harness.REPO)} (trained by the pipeline)"
    import torch

    from llm.config import get_preset
    from llm.model import GPT
    from llm.model_dir import provenance, save_model

    params = yaml.safe_load((harness.REPO / "params.yaml").read_text(encoding="utf-8"))
    spec, context = params["model"], params["sample"]["context_length"]
    config = get_preset(spec["preset"], **{"context_length": context, **spec.get("overrides", {})})
    torch.manual_seed(0)
    save_model(GPT(config), tmp / "instruct", extra=provenance("finetune_instructions", {}))
    shape = f"{spec['preset']} + {spec.get('overrides', {})}, context {context}"
    return tmp / "instruct", f"randomly initialised, default architecture ({shape}): no models/instruct here"


def start_server(model: Path, port: int, max_batch: int, threads: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "llm.cli", "serve", "--model", str(model), "--port", str(port), "--name", "bench",
           "--max-batch", str(max_batch), "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(harness.REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llm serve exited with code {proc.returncode}:\n{log.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"llm serve did not answer /health within 120 s:\n{log.read_text()}")


def client(port: int, requests: int, max_tokens: int, offset: int, tokens: list[int]) -> None:
    """Send `requests` greedy chat completions over one connection; append each reply's completion tokens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for i in range(requests):
        instruction = INSTRUCTIONS[(offset + i) % len(INSTRUCTIONS)]
        body = {"model": "bench", "messages": [{"role": "user", "content": instruction}], "max_tokens": max_tokens,
                "temperature": 0}  # fmt: skip
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {reply}")
        tokens.append(reply["usage"]["completion_tokens"])
    conn.close()


def measure(port: int, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """Completion tokens/s of `clients` concurrent clients sending `requests` requests each."""
    tokens: list[int] = []
    threads = [threading.Thread(target=client, args=(port, requests, max_tokens, c, tokens)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if len(tokens) != clients * requests:
        raise SystemExit(f"{clients} clients: {clients * requests - len(tokens)} requests failed (see above)")
    return {"tokens": sum(tokens), "seconds": seconds, "tokens_per_s": sum(tokens) / seconds}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: models/instruct)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default %(default)s)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default %(default)s)")
    parser.add_argument("--max-batch", type=int, default=8, help="llm serve --max-batch (default %(default)s)")
    parser.add_argument("--threads", type=int, default=harness.default_threads(), help="llm serve --threads")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds (default %(default)s)")
    parser.add_argument("--json", help="also write all measurements to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, about = (args.model, str(args.model)) if args.model else default_model(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        info = harness.machine_info()
        print(
            f"# llm serve: {', '.join(map(str, counts))} concurrent clients, {args.requests} chat completions each, "
            f"max_tokens {args.max_tokens}, greedy, --max-batch {args.max_batch}, --threads {args.threads}\n"
        )
        print(f"model: {about}")
        harness.print_machine(info)
        server = start_server(model, port, args.max_batch, args.threads, Path(tmp) / "serve.log")
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
        try:
            measure(port, max(counts), 1, args.max_tokens)  # warm-up
            for i, order in enumerate(harness.rounds(args.repeats, counts)):
                for n in order:
                    runs[n].append(measure(port, n, args.requests, args.max_tokens))
                print(f"  round {i + 1}/{args.repeats} done, load {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    report({"machine": info, "model": about, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs})
    harness.write_json(args.json, {"machine": info, "model": about, "runs": runs})


def report(results: dict[str, Any]) -> None:
    runs = results["runs"]
    speeds = {f"{n} client{'s' * (n > 1)}": [r["tokens_per_s"] for r in rs] for n, rs in runs.items()}
    rows = [
        [label, f"{statistics.mean(r['tokens'] for r in rs):,.0f}", harness.fmt_range(harness.summary(speed), 1)]
        for (label, speed), rs in zip(speeds.items(), runs.values(), strict=True)
    ]
    print(f"\nload average after: {os.getloadavg()}\n")
    print(harness.table(["clients", "completion tokens per round", "tokens/s median (min–max)"], rows))
    print("\nRatios (row / column), of medians and (range of per-round ratios):")
    print(harness.ratio_table(speeds, list(speeds), list(speeds)))


if __name__ == "__main__":
    main()
