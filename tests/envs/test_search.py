"""The search tool against real local HTTP servers: the BM25 server and Tavily/Serper look-alikes.

Every server binds 127.0.0.1 on a free port. Fault servers follow a script (one behaviour per
request), so each fault is tested as "fails, is retried, then succeeds" and as "fails every time:
an error observation, nothing cached, and the next good answer is served".
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from axpo_rllm.envs.search_server import (
    BM25Index,
    Document,
    RetrievalServer,
    RetrievalServerProcess,
    read_corpus,
    write_corpus,
)
from axpo_rllm.envs.tools.base import ToolContext
from axpo_rllm.envs.tools.search import SearchCache, SearchTool, normalize_query
from axpo_rllm.demo.facts import make_fact_corpus

CTX = ToolContext()
FAST = {"timeout_s": 0.5, "backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_retries": 2}


def run(coro):
    return asyncio.run(coro)


async def call_and_close(tool: SearchTool, *argument_dicts: dict):
    try:
        return [await tool.call(a, CTX) for a in argument_dicts]
    finally:
        await tool.aclose()


# ---------------------------------------------------------------------------------------------
# A scriptable HTTP server (stdlib, in a thread)


class ScriptedServer:
    """Answers each POST with the next behaviour of ``script`` (the last one repeats).

    A behaviour is ``("ok", body_dict)``, ``("status", code)``, ``("slow", seconds, body_dict)``,
    ``("raw", text)`` (malformed JSON) or a callable ``(path, headers, body) -> (status, dict)``.
    """

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[tuple[str, dict, dict]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw or b"{}")
                with outer._lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    behaviour = outer.script[min(len(outer.requests) - 1, len(outer.script) - 1)]
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    outer._respond(self, behaviour, body)
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @staticmethod
    def _send(handler, status: int, data: bytes):
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        try:
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def _respond(self, handler, behaviour, body):
        if callable(behaviour):
            status, payload = behaviour(handler.path, dict(handler.headers), body)
            return self._send(handler, status, json.dumps(payload).encode())
        kind = behaviour[0]
        if kind == "ok":
            return self._send(handler, 200, json.dumps(behaviour[1]).encode())
        if kind == "status":
            return self._send(handler, behaviour[1], b'{"error": "scripted"}')
        if kind == "slow":
            time.sleep(behaviour[1])
            return self._send(handler, 200, json.dumps(behaviour[2]).encode())
        if kind == "raw":
            return self._send(handler, 200, behaviour[1].encode())
        raise AssertionError(f"unknown behaviour {behaviour!r}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def closed_port_url() -> str:
    """A URL on which nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


LOCAL_OK = ("ok", {"query": "q", "results": [{"title": "Quelport", "text": "Quelport is the capital of Zorvania.", "url": "u"}]})


# ---------------------------------------------------------------------------------------------
# BM25 + the retrieval server


@pytest.fixture(scope="module")
def facts():
    return make_fact_corpus(300, seed=1)


@pytest.fixture(scope="module")
def corpus_server(facts, tmp_path_factory):
    path = write_corpus(facts[0], tmp_path_factory.mktemp("corpus") / "corpus.jsonl")
    with RetrievalServer.from_jsonl(path) as server:
        yield server


def test_corpus_roundtrip_and_bad_line(tmp_path, facts):
    path = write_corpus(facts[0][:5], tmp_path / "c.jsonl")
    assert read_corpus(path) == facts[0][:5]
    path.write_text('{"id": "a", "text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2"):
        read_corpus(path)


def test_bm25_ranks_the_fact_first(facts):
    docs, qa = facts
    index = BM25Index(docs)
    top1 = [answer in index.search(question, 1)[0][0].text for question, answer in qa]
    assert sum(top1) / len(top1) > 0.95
    assert index.search("zzzz-no-such-term", 5) == []


def test_bm25_rejects_empty_corpus():
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index([])


def test_server_wire_format(corpus_server, facts):
    question, answer = facts[1][0]
    with httpx.Client(base_url=corpus_server.url) as client:
        assert client.get("/health").json() == {"status": "ok", "documents": len(facts[0])}
        body = client.post("/search", json={"query": question, "top_k": 2}).json()
        assert len(body["results"]) == 2 and answer in body["results"][0]["text"]
        assert set(body["results"][0]) == {"id", "title", "text", "url", "score"}
        bad = client.post("/search", json={"query": "x", "top_k": 0})
        assert bad.status_code == 400 and "top_k" in bad.json()["error"]
        assert client.post("/search", content=b"not json").status_code == 400


def test_server_binds_loopback_on_free_port():
    with RetrievalServer(BM25Index([Document("a", "t", "text")])) as a, RetrievalServer(BM25Index([Document("a", "t", "x")])) as b:
        assert a.url.startswith("http://127.0.0.1:") and a.url != b.url
    with pytest.raises(RuntimeError, match="not running"):
        _ = a.url


# ---------------------------------------------------------------------------------------------
# The tool on the local backend


def test_local_search_answers_and_caches(corpus_server, facts):
    question, answer = facts[1][3]
    tool = SearchTool(base_url=corpus_server.url)
    first, second = run(call_and_close(tool, {"query": question}, {"query": "  " + question.upper() + "  "}))
    assert not first.is_error and answer in first.text
    assert first.metadata["cache_hit"] is False and first.metadata["attempts"] == 1
    assert second.metadata["cache_hit"] is True and second.text.endswith(first.text.split("\n", 1)[1])


def test_cache_survives_restart(tmp_path, facts):
    docs, qa = facts
    cache_path = tmp_path / "cache.sqlite"
    with RetrievalServer(BM25Index(docs)) as server:
        (first,) = run(call_and_close(SearchTool(base_url=server.url, cache_path=str(cache_path)), {"query": qa[5][0]}))
    # The server is gone: only the cache can answer.
    (again,) = run(call_and_close(SearchTool(base_url=closed_port_url(), cache_path=str(cache_path), **FAST), {"query": qa[5][0]}))
    assert again.metadata["cache_hit"] is True and again.text == first.text


def test_cache_ttl(tmp_path):
    cache = SearchCache(tmp_path / "c.sqlite", ttl_s=0.05)
    key = SearchCache.key("local", "q", 3)
    cache.put(key, [])
    assert cache.get(key) == []
    time.sleep(0.1)
    assert cache.get(key) is None


@pytest.mark.parametrize(
    "a, b",
    [("Capital of  Zorvania?", "capital of zorvania"), ("ＱＵＥＬ\tport", "quel port"), ("x.", " X ")],
)
def test_normalize_query(a, b):
    assert normalize_query(a) == normalize_query(b)


@pytest.mark.parametrize(
    "arguments, needle",
    [({}, "query"), ({"query": "  "}, "query"), ({"query": "x" * 1001}, "1001 characters"), ({"query": "x", "top_k": 0}, "top_k"), ({"query": "x", "top_k": True}, "top_k"), ("q", "JSON object")],
)
def test_bad_arguments_are_error_observations(arguments, needle):
    (result,) = run(call_and_close(SearchTool(base_url="http://127.0.0.1:9"), arguments))
    assert result.is_error and needle in result.error


def test_quoted_top_k_is_accepted(corpus_server, facts):
    (result,) = run(call_and_close(SearchTool(base_url=corpus_server.url), {"query": facts[1][0][0], "top_k": "2"}))
    assert result.metadata["num_results"] == 2


def test_missing_configuration_is_named(monkeypatch):
    monkeypatch.delenv("AXPO_SEARCH_URL", raising=False)
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    (local,) = run(call_and_close(SearchTool(), {"query": "x"}))
    assert local.is_error and "base_url" in local.error and "AXPO_SEARCH_URL" in local.error
    (tavily,) = run(call_and_close(SearchTool(backend="tavily"), {"query": "x"}))
    assert tavily.is_error and "TAVILY_API_KEY" in tavily.error
    with pytest.raises(ValueError, match="'bing'"):
        SearchTool(backend="bing")


# ---------------------------------------------------------------------------------------------
# Web backends: wire formats


def test_tavily_wire_format_with_bearer_key():
    def tavily(path, headers, body):
        assert path == "/search"
        assert headers["Authorization"] == "Bearer tvly-secret" and "api_key" not in body
        assert body == {"query": "who founded quelport", "max_results": 2}
        return 200, {"query": body["query"], "results": [{"title": "T", "url": "https://x", "content": "Founded by Ada.", "score": 0.9}]}

    with ScriptedServer([tavily]) as server:
        tool = SearchTool(backend="tavily", base_url=server.url, api_key="tvly-secret")
        (result,) = run(call_and_close(tool, {"query": "who founded quelport", "top_k": 2}))
    assert not result.is_error and "Founded by Ada." in result.text and "https://x" in result.text


def test_tavily_key_in_body_from_env(monkeypatch):
    monkeypatch.setenv("TAVILY_API_KEY", "tvly-from-env")

    def tavily(path, headers, body):
        assert body["api_key"] == "tvly-from-env" and "Authorization" not in headers
        return 200, {"results": []}

    with ScriptedServer([tavily]) as server:
        (result,) = run(call_and_close(SearchTool(backend="tavily", base_url=server.url, key_in_body=True), {"query": "x"}))
    assert result.text == "No results for 'x'."


def test_serper_wire_format(monkeypatch):
    monkeypatch.setenv("MY_SERPER", "serper-secret")

    def serper(path, headers, body):
        assert path == "/search" and headers["X-API-KEY"] == "serper-secret"
        assert body == {"q": "quelport", "num": 3}
        return 200, {"organic": [{"title": "Quelport", "link": "https://q", "snippet": "A city.", "position": 1}]}

    with ScriptedServer([serper]) as server:
        tool = SearchTool(backend="serper", base_url=server.url, api_key_env="MY_SERPER")
        (result,) = run(call_and_close(tool, {"query": "quelport"}))
    assert "[1] Quelport (https://q)\nA city." in result.text


# ---------------------------------------------------------------------------------------------
# Faults: retried, then an error observation; the cache is never poisoned


FAULTS = {
    "5xx": (("status", 503), "HTTP 503"),
    "429": (("status", 429), "HTTP 429"),
    "timeout": (("slow", 1.0, LOCAL_OK[1]), "timed out"),  # slower than timeout_s=0.5
    "malformed_json": (("raw", "<html>oops"), "malformed JSON"),
    "wrong_shape": (("ok", {"hits": []}), "no 'results' list"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_retried_then_succeeds(fault):
    behaviour, _ = FAULTS[fault]
    with ScriptedServer([behaviour, LOCAL_OK]) as server:
        (result,) = run(call_and_close(SearchTool(base_url=server.url, **FAST), {"query": "capital"}))
        assert len(server.requests) == 2
    assert not result.is_error and result.metadata["attempts"] == 2 and "Quelport" in result.text


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_persistent_fault_is_an_error_and_never_cached(fault, tmp_path):
    behaviour, needle = FAULTS[fault]
    cache_path = str(tmp_path / "cache.sqlite")
    with ScriptedServer([behaviour]) as server:
        tool = SearchTool(base_url=server.url, cache_path=cache_path, **FAST)
        (result,) = run(call_and_close(tool, {"query": "capital"}))
        assert len(server.requests) == FAST["max_retries"] + 1
    assert result.is_error and needle in result.error and "after 3 attempt(s)" in result.error
    assert len(SearchCache(cache_path)) == 0
    with ScriptedServer([LOCAL_OK]) as healthy:
        (good,) = run(call_and_close(SearchTool(base_url=healthy.url, cache_path=cache_path, **FAST), {"query": "capital"}))
    assert not good.is_error and good.metadata["cache_hit"] is False


def test_slow_but_in_time_is_not_retried():
    with ScriptedServer([("slow", 0.2, LOCAL_OK[1])]) as server:
        (result,) = run(call_and_close(SearchTool(base_url=server.url, **FAST), {"query": "capital"}))
        assert len(server.requests) == 1
    assert not result.is_error and result.metadata["attempts"] == 1 and result.metadata["latency_s"] >= 0.2


def test_refused_connection_is_retried_then_reported(tmp_path):
    cache_path = str(tmp_path / "cache.sqlite")
    started = time.perf_counter()
    (result,) = run(call_and_close(SearchTool(base_url=closed_port_url(), cache_path=cache_path, **FAST), {"query": "x"}))
    assert result.is_error and "unreachable" in result.error and "3 attempt(s)" in result.error
    assert time.perf_counter() - started < 5
    assert len(SearchCache(cache_path)) == 0


def test_client_errors_are_not_retried():
    with ScriptedServer([("status", 401)]) as server:
        (result,) = run(call_and_close(SearchTool(backend="serper", base_url=server.url, api_key="k", **FAST), {"query": "x"}))
        assert len(server.requests) == 1
    assert result.is_error and "HTTP 401" in result.error and "1 attempt(s)" in result.error


def test_backoff_grows_exponentially():
    tool = SearchTool(backoff_base_s=0.1, backoff_max_s=0.5)
    delays = [tool.retry.delay(a) for a in range(5)]
    assert 0.1 <= delays[0] <= 0.125 and 0.2 <= delays[1] <= 0.25 and 0.4 <= delays[2] <= 0.5
    assert all(0.5 <= d <= 0.625 for d in delays[3:])


def test_api_key_never_leaks(caplog):
    key = "sk-very-secret-1234"
    echo_key = ("raw", f"<html>bad key {key}</html>")  # a server that echoes the key back
    caplog.set_level(logging.DEBUG)
    with ScriptedServer([echo_key]) as server:
        tool = SearchTool(backend="tavily", base_url=server.url, api_key=key, **FAST)
        (result,) = run(call_and_close(tool, {"query": "x"}))
        assert server.requests[0][1]["Authorization"] == f"Bearer {key}"  # it was sent...
    assert result.is_error and "***" in result.error  # ...and scrubbed from what came back
    for text in (result.error, result.text, repr(result), repr(tool), repr(tool.backend), str(tool.config), caplog.text):
        assert key not in text
    assert "retrying" in caplog.text


def test_concurrency_limit_holds():
    slow_ok = ("slow", 0.1, LOCAL_OK[1])
    with ScriptedServer([slow_ok]) as server:
        tool = SearchTool(base_url=server.url, max_concurrency=3)

        async def many():
            try:
                return await asyncio.gather(*(tool.call({"query": f"q{i}"}, CTX) for i in range(12)))
            finally:
                await tool.aclose()

        results = run(many())
        assert server.max_in_flight <= 3 and len(server.requests) == 12
    assert not any(r.is_error for r in results)


def test_tool_usable_from_several_event_loops(corpus_server, facts):
    """rllm runs env steps in worker threads; each may drive its own loop."""
    tool = SearchTool(base_url=corpus_server.url)
    errors = []

    def worker(i):
        result = asyncio.run(tool.call({"query": facts[1][i][0]}, CTX))
        if result.is_error or facts[1][i][1] not in result.text:
            errors.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_server_process_start_stop(tmp_path, facts):
    docs, qa = facts
    corpus = write_corpus(docs, tmp_path / "corpus.jsonl")
    with RetrievalServerProcess(corpus) as server:
        (result,) = run(call_and_close(SearchTool(base_url=server.url), {"query": qa[7][0]}))
        assert qa[7][1] in result.text
        process = server._process
    assert process.poll() is not None  # stopped, not left running
    (tmp_path / "broken.jsonl").write_text("not json\n")
    with pytest.raises(RuntimeError, match="did not start"):
        RetrievalServerProcess(tmp_path / "broken.jsonl", startup_timeout_s=30).start()
