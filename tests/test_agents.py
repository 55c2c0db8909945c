"""LLMAgent against a tiny OpenAI-compatible server on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from relaydiff.sim.agents import Perception, SurrogateAgent
from relaydiff.sim.agents_llm import LLMAgent, LLMConfigError, parse_answer, persona


class _Stub:
    """Serves POST /v1/chat/completions; each request pops the next scripted reply
    ('json:<content>' a 200 with that message content, 'http:<code>' an error status)."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.default = 'json:{"score": 7, "reason": "fine"}'
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                reply = stub.script.pop(0) if stub.script else stub.default
                kind, _, payload = reply.partition(":")
                if kind == "http":
                    self.send_response(int(payload))
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "scripted failure"}}')
                    return
                data = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": payload}}]}
                raw = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    s = _Stub()
    yield s
    s.close()


TRAITS = np.array([[0.9, 0.1, 0.5, 0.5, 0.7], [0.2, 0.8, 0.3, 0.6, 0.1]])
SEEN = [Perception("a red circle", 0.8, 4.0, 9.0), Perception("two blue squares", 0.6, 12.0, 9.0)]


def test_llm_agent_scores_through_the_endpoint_and_caches(stub) -> None:
    agent = LLMAgent(base_url=stub.url, model="stub-model", timeout_s=5)
    stub.script = ['json:{"score": 9, "reason": "quick and right"}', 'json:{"score": 3, "reason": "too slow"}']
    s = agent.score(TRAITS, SEEN)
    assert s.tolist() == [9.0, 3.0] and agent.reasons == ["quick and right", "too slow"]
    body = stub.requests[0]
    assert body["model"] == "stub-model" and body["response_format"] == {"type": "json_object"}
    assert "very high openness" in body["messages"][1]["content"] and "4.0 s" in body["messages"][1]["content"]
    # the same observation again: from the cache, no request
    assert agent.score(TRAITS, SEEN).tolist() == [9.0, 3.0]
    assert len(stub.requests) == 2 and agent.stats.cache_hits == 2 and agent.stats.fallbacks == 0


def test_malformed_and_failed_answers_retry_then_fall_back(stub) -> None:
    agent = LLMAgent(base_url=stub.url, model="m", retries=1, timeout_s=5)
    stub.script = ["json:score 8, reason: ok", 'json:{"score": 11, "reason": "x"}',  # user 0: two malformed
                   "http:500", 'json:{"score": 4, "reason": "meh"}']  # user 1: a failure, then an answer
    s = agent.score(TRAITS, SEEN)
    surrogate = SurrogateAgent().score(TRAITS[:1], SEEN[:1])[0]
    assert s[0] == pytest.approx(surrogate) and s[1] == 4.0
    st = agent.stats
    assert (st.calls, st.malformed, st.failed, st.fallbacks, st.answered) == (4, 2, 1, 1, 1)


def test_call_budget_and_dead_endpoint_never_crash() -> None:
    agent = LLMAgent(base_url="http://127.0.0.1:9/v1", model="m", retries=0, timeout_s=0.5, max_calls=1)
    s = agent.score(TRAITS, SEEN)  # port 9: connection refused
    assert np.allclose(s, SurrogateAgent().score(TRAITS, SEEN))
    assert agent.stats.failed == 1 and agent.stats.over_budget == 1 and agent.stats.fallbacks == 2


def test_images_go_as_data_urls_when_enabled(stub) -> None:
    agent = LLMAgent(base_url=stub.url, model="m", images=True, json_mode=False, timeout_s=5)
    agent.score(TRAITS[:1], SEEN[:1], images_png=[b"\x89PNG fake"])
    content = stub.requests[0]["messages"][1]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "response_format" not in stub.requests[0]


def test_configuration_and_strict_parsing(monkeypatch) -> None:
    for var in ("RELAYDIFF_LLM_BASE_URL", "RELAYDIFF_LLM_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LLMConfigError, match="RELAYDIFF_LLM_BASE_URL"):
        LLMAgent()
    monkeypatch.setenv("RELAYDIFF_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("RELAYDIFF_LLM_MODEL", "env-model")
    assert LLMAgent().model == "env-model"
    assert parse_answer(' {"score": 10, "reason": "great"} ') == (10, "great")
    for bad in ['{"score": 7}', '{"score": 7.5, "reason": ""}', '{"score": true, "reason": ""}',
                '```json\n{"score": 7, "reason": ""}\n```', '{"score": 7, "reason": "", "extra": 1}', None]:
        with pytest.raises((ValueError, TypeError)):
            parse_answer(bad)
    assert "very low openness (0.00)" in persona(np.zeros(5))
