"""`llm serve`: the chat template, the continuous-batching engine against `generate`, and real `llm serve` processes
driven with the `openai` client, raw HTTP and the evaluate stage's judge (tiny random models, free ports)."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml
from test_data_stages import make_env
from test_e2e import smoke_params

from llm.chat import Message, render_chat
from llm.classifier import ClassifierConfig, GPTClassifier, classify, export_merged, load_classifier
from llm.cli import main
from llm.config import GPTConfig
from llm.data.instructions import PREAMBLE, Instruction, format_prompt, load_instructions, split_entries
from llm.errors import LLMError
from llm.evaluation import JudgeConfig, judge
from llm.generate import GenerationConfig, generate
from llm.io import write_json
from llm.model import GPT
from llm.model_dir import provenance, save_model
from llm.serve.engine import Delta, Done, Engine, Job
from llm.serve.loading import load_served, model_kind
from llm.tokenizer import EOT_ID, get_tokenizer

KEY = "sk-test-key"
TOKENIZER = get_tokenizer()


def tiny_gpt(context: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50257, context_length=context, emb_dim=32, n_heads=2, n_layers=2)).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    stderr: Path  # stdout and stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def request(self, method: str, path: str, body: bytes | str | None = None, headers: dict[str, str] | None = None):
        """(status, decoded JSON or raw text) of one raw HTTP request, authenticated unless headers say otherwise."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body, {"Authorization": f"Bearer {KEY}", **(headers or {})})
        response = conn.getresponse()
        raw = response.read().decode()
        conn.close()
        try:
            return response.status, json.loads(raw)
        except json.JSONDecodeError:
            return response.status, raw

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")[1]


def start(model_dir: Path, tmp: Path, *extra: str) -> Server:
    """`llm serve` of `model_dir` on a free port, with `extra` options; the API key comes from $LLM_API_KEY unless
    `extra` gives --api-key."""
    port = free_port()
    stderr = tmp / f"serve-{port}.err"
    env = {**os.environ, "LLM_API_KEY": "" if "--api-key" in extra else KEY}
    with stderr.open("wb") as err:
        cmd = [sys.executable, "-m", "llm.cli", "serve", "--model", str(model_dir), "--port", str(port), *extra]
        proc = subprocess.Popen([*cmd, "--threads", "1"], stdout=err, stderr=err, env=env)  # access log: stdout
    return Server(proc, port, stderr)


def wait_ready(server: Server, timeout: float = 60) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.stderr.read_text()
        try:
            if server.health()["status"] == "ok":
                return server
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"llm serve did not start: {server.stderr.read_text()}")


def stop(server: Server, sig: int = signal.SIGTERM) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(sig)
    try:
        return server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An instruct model (context 512), a base model and a merged classifier, all tiny and random."""
    root = tmp_path_factory.mktemp("serve-models")
    save_model(tiny_gpt(512), root / "instruct", extra=provenance("finetune_instructions", {}))
    save_model(tiny_gpt(64, seed=1), root / "base", extra=provenance("pretrain", {}))
    classifier = GPTClassifier(tiny_gpt(64, seed=2), ClassifierConfig(method="full", max_length=32))
    export_merged(classifier, root / "classifier")
    return {name: root / name for name in ("instruct", "base", "classifier")}


@pytest.fixture(scope="module")
def servers(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """One `llm serve` per model kind, started together (each with LLM_API_KEY set)."""
    tmp = tmp_path_factory.mktemp("serve-logs")
    started = {
        "instruct": start(models["instruct"], tmp, "--max-tokens", "600", "--max-body-bytes", "20000"),
        "classifier": start(models["classifier"], tmp, "--api-key", KEY, "--name", "spam"),
    }
    try:
        yield {name: wait_ready(server) for name, server in started.items()}
    finally:
        stop_all(started.values())


def stop_all(servers: Iterable[Server], sig: int = signal.SIGTERM) -> list[int]:
    """Signal every server, then wait for each: their exit codes."""
    servers = list(servers)
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(sig)
    return [stop(server) for server in servers]


@pytest.fixture(scope="module")
def client(servers: dict[str, Server]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=servers["instruct"].url, api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


def reference(model: GPT, text: str, max_new_tokens: int, **settings: Any) -> str:
    """What `generate` answers to `text` (no stop strings)."""
    settings = GenerationConfig(max_new_tokens, eos_id=EOT_ID, **settings)
    return TOKENIZER.decode(generate(model, [TOKENIZER.encode_ordinary(text)], settings)[0])


def test_chat_template() -> None:
    assert render_chat([Message("user", "Name a colour.")]) == format_prompt(Instruction("Name a colour.", "", ""))
    system = render_chat([Message("system", "Be brief."), Message("user", "Hi")])
    assert system == "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n"
    turns = render_chat([Message("user", "A?"), Message("assistant", "B."), Message("user", "C?")])
    exchange = "### Instruction:\nA?\n\n### Response:\nB.\n\n"
    assert turns == f"{PREAMBLE}\n\n{exchange}### Instruction:\nC?\n\n### Response:\n"
    for bad in ([Message("assistant", "x")], [Message("user", "a"), Message("user", "b")], [Message("system", "s")]):
        with pytest.raises(LLMError, match="user"):
            render_chat(bad)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread while the engine's thread and the clients' run (two contend badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_engine_decodes_joining_requests_as_generate_does() -> None:
    """Requests joining a running batch at different steps, more than fit (max_batch 2), one filling the context:
    greedy texts equal `generate`'s one prompt at a time, and a seeded sampled request equals its seeded run."""
    model = tiny_gpt(48)
    engine = Engine(model, TOKENIZER, EOT_ID, max_batch=2)
    engine.start()
    texts = ["Hello there", "The quick brown fox jumps over the lazy dog and then", "A", "Once upon a time", "x y"]
    lengths = [10, 40, 20, 6, 30]  # the second fills the context: its prompt has 11 tokens
    results: dict[int, tuple[str, Done]] = {}

    def run(i: int, settings: GenerationConfig) -> None:
        time.sleep(0.003 * i)
        events: queue.SimpleQueue[Delta | Done] = queue.SimpleQueue()
        engine.submit(Job(TOKENIZER.encode_ordinary(texts[i]), settings, events.put))
        pieces = []
        while isinstance(event := events.get(timeout=30), Delta):
            pieces.append(event.text)
        results[i] = "".join(pieces), event

    threads = [threading.Thread(target=run, args=(i, GenerationConfig(n, 0.0))) for i, n in enumerate(lengths)]
    threads.append(threading.Thread(target=run, args=(5, GenerationConfig(12, 1.0, top_p=0.9, seed=7))))
    texts.append("Seeded")
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.stop()
    for i, n in enumerate(lengths):
        room = 48 - len(TOKENIZER.encode_ordinary(texts[i])) + 1
        assert results[i][0] == reference(model, texts[i], min(n, room), temperature=0.0)
        assert results[i][1].finish_reason == "length"
    assert results[1][1].completion_tokens == 48 - 11 + 1  # up to the context, then "length"
    assert results[5][0] == reference(model, "Seeded", 12, temperature=1.0, top_p=0.9, seed=7)


def test_model_kinds_and_uris(models: dict[str, Path], store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert [model_kind(models[k]) for k in ("instruct", "base", "classifier")] == ["instruct", "base", "classifier"]
    with pytest.raises(LLMError, match="cannot resolve models:/instruct/1"):  # no such registered model
        load_served("models:/instruct/1")
    assert main(["serve", "--model", "models:/instruct/1"]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_openai_chat_matches_the_library(client: openai.OpenAI, models: dict[str, Path]) -> None:
    model = load_served(str(models["instruct"])).model
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model="instruct", messages=messages, max_tokens=20, temperature=0)
    expected = reference(model, format_prompt(Instruction("Name a colour.", "", "")), 20, temperature=0.0)
    assert reply.choices[0].message.content == expected.split("###")[0]
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    prompt_tokens = len(TOKENIZER.encode_ordinary(format_prompt(Instruction("Name a colour.", "", ""))))
    assert reply.usage is not None and reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    stream = client.chat.completions.create(
        model="instruct", messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_stop_seed_and_raw_stream(client: openai.OpenAI, servers: dict[str, Server]) -> None:
    first = client.completions.create(model="instruct", prompt="Once upon a time", max_tokens=30, temperature=0)
    text = first.choices[0].text
    assert first.choices[0].finish_reason == "length" and first.usage and first.usage.completion_tokens == 30
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    prompt = "Once upon a time"
    cut = client.completions.create(model="instruct", prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model="instruct", prompt="Hi", max_tokens=12, seed=5, top_p=0.8).choices[0].text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    body = json.dumps({"model": "instruct", "prompt": "Hi", "max_tokens": 3, "stream": True})
    status, raw = servers["instruct"].request("POST", "/v1/completions", body)
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]" and len(events) == 5  # 3 tokens, the finish chunk, [DONE]
    assert json.loads(events[0])["object"] == "text_completion"


def test_concurrent_clients_get_their_own_answers(client: openai.OpenAI, models: dict[str, Path]) -> None:
    model = load_served(str(models["instruct"])).model
    prompts = [f"Story number {i}:{' and' * i}" for i in range(8)]

    def ask(i: int) -> str:
        return client.completions.create(model="instruct", prompt=prompts[i], max_tokens=8 + 3 * i, temperature=0)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    for i, reply in enumerate(replies):
        assert reply.choices[0].text == reference(model, prompts[i], 8 + 3 * i, temperature=0.0)


def test_a_client_that_disconnects_stops_its_generation(servers: dict[str, Server]) -> None:
    server = servers["instruct"]
    body = {"model": "instruct", "prompt": "Go on", "max_tokens": 500, "temperature": 0}
    status, whole = server.request("POST", "/v1/completions", json.dumps(body))  # it would go on for 500 tokens
    assert status == 200 and whole["usage"]["completion_tokens"] == 500
    before = server.health()["generated_tokens"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}), {"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    conn.close()
    deadline = time.monotonic() + 10
    while (health := server.health())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["running"] == 0 and health["generated_tokens"] - before < 450


CHAT, COMPLETE = "/v1/chat/completions", "/v1/completions"
USER_X = {"role": "user", "content": "x"}
BAD_REQUESTS: list[tuple[str, str, Any, dict[str, str], int, str | None]] = [
    # (method, path, body, headers, status, param)
    ("POST", CHAT, "{not json", {}, 400, None),
    ("POST", CHAT, "[1, 2]", {}, 400, None),
    ("POST", CHAT, {"model": "instruct"}, {}, 400, "messages"),
    ("POST", CHAT, {"model": "gpt-4", "messages": [USER_X]}, {}, 404, "model"),
    ("POST", CHAT, {"model": "instruct", "messages": "hi"}, {}, 400, "messages"),
    ("POST", CHAT, {"model": "instruct", "messages": [USER_X | {"role": "robot"}]}, {}, 400, "messages.0.role"),
    ("POST", CHAT, {"model": "instruct", "messages": [USER_X | {"role": "assistant"}]}, {}, 400, "messages"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "temperature": -0.5}, {}, 400, "temperature"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "temperature": "hot"}, {}, 400, "temperature"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "top_p": 0}, {}, 400, "top_p"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "top_p": 1.5}, {}, 400, "top_p"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "max_tokens": 0}, {}, 400, "max_tokens"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "max_tokens": 601}, {}, 400, "max_tokens"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "max_tokens": 2.5}, {}, 400, "max_tokens"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "n": 2}, {}, 400, "n"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "stream": "yes"}, {}, 400, "stream"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "stop": ""}, {}, 400, "stop"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "stop": ["s" * 1001]}, {}, 400, "stop"),
    ("POST", COMPLETE, '{"model": "instruct", "prompt": "x", "extra": ' + "[" * 5000 + "]" * 5000 + "}", {}, 400, None),
    ("POST", COMPLETE, '{"model": "instruct", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}", {}, 400, None),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "seed": -1}, {}, 400, "seed"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x", "logit_bias": {}}, {}, 400, "logit_bias"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": ["a", "b"]}, {}, 400, "prompt"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "word " * 600}, {}, 400, "prompt"),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x" * 30000}, {}, 413, None),
    ("POST", "/v1/classifications", {"model": "instruct", "input": ["x"]}, {}, 404, None),
    ("POST", COMPLETE, {"model": "instruct", "prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, None),
    ("GET", "/v1/models", None, {"Authorization": ""}, 401, None),
    ("GET", COMPLETE, None, {}, 405, None),
    ("GET", "/v2/anything", None, {}, 404, None),
]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(servers: dict[str, Server]) -> None:
    server = servers["instruct"]
    for method, path, body, headers, status, param in BAD_REQUESTS:
        data = body if body is None or isinstance(body, str) else json.dumps(body)
        got, reply = server.request(method, path, data, headers)
        assert got == status, (body, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"], reply
        assert reply["error"]["param"] == param, (body, reply)
    good = {"model": "instruct", "prompt": "x", "max_tokens": 2}
    ok, reply = server.request("POST", "/v1/completions", json.dumps(good))
    assert ok == 200 and reply["usage"]["completion_tokens"] == 2
    assert "Traceback" not in server.stderr.read_text()


def test_models_and_classifications(servers: dict[str, Server], models: dict[str, Path]) -> None:
    status, listing = servers["instruct"].request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in listing["data"]] == ["instruct"]
    texts = ["WINNER!! Claim your prize now", "see you at lunch", "ok"]
    body = json.dumps({"model": "spam", "input": texts})
    status, reply = servers["classifier"].request("POST", "/v1/classifications", body)
    expected = classify(load_classifier(models["classifier"]), texts, TOKENIZER)
    assert status == 200 and [(d["label"], d["probability"]) for d in reply["data"]] == expected
    chat = {"model": "spam", "messages": [{"role": "user", "content": "x"}]}
    status, reply = servers["classifier"].request("POST", "/v1/chat/completions", json.dumps(chat))
    assert status == 404 and reply["error"]["code"] == "unsupported_endpoint"
    assert servers["classifier"].request("GET", "/v1/models", headers={"Authorization": "Bearer no"})[0] == 401


def test_the_evaluate_judge_talks_to_llm_serve(servers: dict[str, Server], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", KEY)
    entries = [Instruction("Name a colour.", "", "Red."), Instruction("Add 2 and 3.", "", "5")]
    config = JudgeConfig(url=servers["instruct"].url, model="instruct", timeout=30, api_key_env="JUDGE_KEY")
    result = judge(entries, ["Blue.", "5"], config, progress=False)
    assert result is not None and len(result.replies) == 2 and all(isinstance(r, str) for r in result.replies)


def test_the_cli_imports_no_web_stack() -> None:
    code = "import sys; from llm import cli; cli.build_parser(); print({'starlette', 'uvicorn'} & set(sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "set()"


@pytest.mark.slow
def test_the_evaluate_stage_judges_through_llm_serve(models: dict[str, Path], mirror: Path, tmp_path: Path) -> None:
    """The real evaluate stage, in a temporary repository holding tiny models and the smoke params, with
    `evaluate.judge.url` pointing at a running `llm serve`: it completes and writes reports/judge.json."""
    server = start(models["instruct"], tmp_path, "--name", "judge", "--max-tokens", "3")
    repo = tmp_path / "repo"
    params = smoke_params()
    params["evaluate"]["judge"] |= {"url": server.url, "model": "judge", "api_key_env": "JUDGE_KEY"}
    (repo / "data/raw/heldout").mkdir(parents=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    book = sorted((mirror / "heldout").glob("*.txt"))[0]
    (repo / "data/raw/heldout" / book.name).symlink_to(book)
    (repo / "data/raw/instruction-data.json").symlink_to(mirror / "instruction-data.json")
    (repo / "data/raw/tokenizer").mkdir()
    (repo / "data/raw/tokenizer/r50k_base.tiktoken").symlink_to(mirror / "tokenizer/r50k_base.tiktoken")
    for name in ("base", "instruct"):
        save_model(tiny_gpt(params["sample"]["context_length"]), repo / "models" / name)
    entries = load_instructions(mirror / "instruction-data.json")
    test_split = split_entries(entries, params["finetune_instructions"]["split_seed"])["test"]
    responses = [
        {"instruction": e.instruction, "input": e.input, "reference": e.output, "response": "Yes."} for e in test_split
    ]
    write_json(repo / "reports/responses.json", responses)
    write_json(repo / "metrics/finetune_classifier.json", {"test": {"accuracy": 0.5}})
    env = make_env(tmp_path, JUDGE_KEY=KEY, LLM_MLFLOW="off")
    try:
        wait_ready(server)
        stage = [sys.executable, "-m", "stages.evaluate"]
        out = subprocess.run(stage, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop(server)
    assert out.returncode == 0, out.stderr[-3000:]
    replies = json.loads((repo / "reports/judge.json").read_text())
    assert len(replies) == len(test_split) and all(set(r) == {"score", "reply"} for r in replies)
    assert server.stderr.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200') == len(test_split)
    assert "judge_score" in json.loads((repo / "metrics/evaluate.json").read_text())["instruct"]


def test_sigint_and_sigterm_shut_down_cleanly(servers: dict[str, Server]) -> None:
    """It stops the module's servers (the tests using them come first): SIGINT for one, SIGTERM for the other."""
    assert stop_all([servers["instruct"]], signal.SIGINT) + stop_all([servers["classifier"]], signal.SIGTERM) == [0, 0]
    for server in servers.values():
        log = server.stderr.read_text()
        assert "Traceback" not in log and "Finished server process" in log, log
