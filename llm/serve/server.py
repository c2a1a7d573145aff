"""Run `llm serve`: load the model, start the engine, serve the app with uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import signal
import sys

import tiktoken

from llm.model import GPT
from llm.serve.app import Limits, build_app
from llm.serve.engine import Engine
from llm.serve.loading import ServedModel, load_served
from llm.tokenizer import EOT_ID, get_tokenizer


def serve(
    source: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    max_batch: int = 8,
    limits: Limits | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    quantize: str | None = None,
) -> None:
    """Serve the model at `source` on http://host:port/v1 (see docs/serving.md); returns after a clean shutdown.
    dtype, quantize: the inference weight format (llm.quantize.for_inference)."""
    import uvicorn

    served = load_served(source, name=name, device=device, dtype=dtype, quantize=quantize)
    tokenizer = get_tokenizer()
    engine = _engine(served, tokenizer, max_batch)
    app = build_app(served, tokenizer, engine, limits or Limits())
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3, lifespan="off", server_header=False
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down on SIGINT/SIGTERM, then re-raises the signal to the handlers it found: make those a no-op,
    # so a requested shutdown ends with exit status 0 instead of a KeyboardInterrupt or a kill.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    url = f"http://{host}:{port}/v1"
    print(f"serving {served.name} ({served.kind} model) at {url}; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        if engine is not None:
            engine.start()
        server.run()
    finally:
        if engine is not None:
            engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _engine(served: ServedModel, tokenizer: tiktoken.Encoding, max_batch: int) -> Engine | None:
    if served.kind == "classifier":
        return None
    model = served.model
    assert isinstance(model, GPT)
    eos = EOT_ID if model.config.vocab_size > EOT_ID else None
    return Engine(model, tokenizer, eos, max_batch)
