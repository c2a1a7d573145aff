import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llm.data.instructions import Instruction
from llm.errors import LLMError
from llm.evaluation import JudgeConfig, JudgeUnreachable, judge, judge_prompt, parse_score


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions endpoint answering from `server.replies` in turn."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body, self.headers.get("Authorization")))  # type: ignore[attr-defined]
        status, payload = self.server.replies.pop(0)  # type: ignore[attr-defined]
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def completion(text: str) -> tuple[int, dict[str, object]]:
    return 200, {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    srv.requests, srv.replies = [], []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def config_for(srv: ThreadingHTTPServer, **changes: object) -> JudgeConfig:
    return JudgeConfig(url=f"http://127.0.0.1:{srv.server_address[1]}/v1/", model="judge-model", timeout=5, **changes)


ENTRIES = [Instruction(f"Question {i}?", "ctx" if i % 2 else "", f"Answer {i}.") for i in range(4)]


def test_scores_are_parsed_and_garbage_is_counted(server: ThreadingHTTPServer) -> None:
    server.replies += [completion("85"), completion("I think it is quite good"), completion(" 40.\n"), completion("")]
    result = judge(ENTRIES, ["r0", "r1", "r2", "r3"], config_for(server, seed=7), progress=False)
    assert result is not None
    assert result.scores == [85.0, None, 40.0, None] and result.n_unparseable == 2
    assert result.mean_score == pytest.approx(62.5)
    assert len(server.requests) == 4
    path, body, auth = server.requests[0]
    assert path == "/v1/chat/completions" and auth is None
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["seed"] == 7
    assert body["messages"] == [{"role": "user", "content": judge_prompt(ENTRIES[0], "r0")}]
    assert "Answer 0." in judge_prompt(ENTRIES[0], "r0") and "0 to 100" in judge_prompt(ENTRIES[0], "r0")


@pytest.mark.parametrize(
    ("reply", "score"),
    [("100", 100.0), ("0", 0.0), ("73/100", 73.0), ("  12.5 ", 12.5), ("101", None), ("-5", None), ("Score: 80", None)],
)
def test_parse_score(reply: str, score: float | None) -> None:
    assert parse_score(reply) == score


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_judge_is_a_clear_error_or_a_skip() -> None:
    config = JudgeConfig(url=f"http://127.0.0.1:{free_port()}/v1", timeout=5)
    with pytest.raises(JudgeUnreachable, match=r"judge at http://127\.0\.0\.1:\d+/v1/chat/completions is unreachable"):
        judge(ENTRIES, ["a"] * 4, config, progress=False)
    assert (
        judge(ENTRIES, ["a"] * 4, JudgeConfig(url=config.url, timeout=5, on_unreachable="skip"), progress=False) is None
    )


def test_http_errors_and_non_completions_are_errors(server: ThreadingHTTPServer) -> None:
    server.replies += [(404, {"error": "model 'judge-model' not found"}), (200, "<html>not json</html>")]
    with pytest.raises(LLMError, match=r"HTTP 404: .*not found"):
        judge(ENTRIES[:1], ["a"], config_for(server, on_unreachable="skip"), progress=False)
    with pytest.raises(LLMError, match="did not return a chat completion"):
        judge(ENTRIES[:1], ["a"], config_for(server), progress=False)


def test_api_key_comes_from_the_named_environment_variable(
    server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(LLMError, match="JUDGE_TEST_KEY"):
        judge(ENTRIES[:1], ["a"], config_for(server, api_key_env="JUDGE_TEST_KEY"), progress=False)
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    server.replies.append(completion("50"))
    judge(ENTRIES[:1], ["a"], config_for(server, api_key_env="JUDGE_TEST_KEY"), progress=False)
    assert server.requests[-1][2] == "Bearer sk-test"


def test_a_token_is_never_sent_over_plain_http_to_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    config = JudgeConfig(url="http://judge.example.com/v1", api_key_env="JUDGE_TEST_KEY", timeout=5)
    with pytest.raises(
        LLMError, match=r"refusing to send the JUDGE_TEST_KEY token over plain HTTP to judge\.example\.com"
    ):
        judge(ENTRIES[:1], ["a"], config, progress=False)
