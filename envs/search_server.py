"""The offline search backend: a BM25 retrieval server over a JSONL corpus, on 127.0.0.1.

Training must not depend on a paid web API (cost, rate limits, non-determinism), so the project
ships its own retrieval service. It is a real HTTP server so the search tool exercises exactly the
code path (httpx, retries, timeouts, cache) it uses against Tavily or Serper.

Corpus format, one JSON object per line::

    {"id": "doc-1", "title": "Quelport", "text": "Quelport is the capital of Zorvania.", "url": "..."}

Wire format::

    POST /search  {"query": "capital of Zorvania", "top_k": 3}
      -> {"query": ..., "results": [{"id", "title", "text", "url", "score"}, ...]}
    GET  /health  -> {"status": "ok", "documents": N}

Use it from tests and from the main job::

    with RetrievalServer.from_jsonl(path) as server:
        tool = SearchTool(backend="local", base_url=server.url)

or in its own process (:class:`RetrievalServerProcess`, the way the main job should run it, off
the trainer's GIL): ``python -m axpo_rllm.envs.search_server --corpus corpus.jsonl --port 8123``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import select
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "Document",
    "BM25Index",
    "RetrievalServer",
    "RetrievalServerProcess",
    "read_corpus",
    "write_corpus",
    "tokenize",
]

logger = logging.getLogger(__name__)

MAX_TOP_K = 50
"""Upper bound on ``top_k`` per request (a model asking for 10**6 results must not stall the server)."""


@dataclass(frozen=True)
class Document:
    """One retrievable passage."""

    id: str
    title: str
    text: str
    url: str = ""


_TOKEN_RE = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; the same function indexes documents and queries."""
    return _TOKEN_RE.findall(text.casefold())


# --------------------------------------------------------------------------------------------
# Corpus files


def write_corpus(documents: Iterable[Document], path: str | Path) -> Path:
    """Write documents as JSONL (the corpus builder tests and the main job use)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps(asdict(doc), ensure_ascii=False) + "\n")
    return path


def read_corpus(path: str | Path) -> list[Document]:
    """Read a JSONL corpus; a bad line raises with its line number."""
    docs: list[Document] = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                docs.append(
                    Document(
                        id=str(row.get("id", f"doc-{lineno}")),
                        title=str(row.get("title", "")),
                        text=str(row["text"]),
                        url=str(row.get("url", "")),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field, got {line[:80]!r}") from e
    return docs


# --------------------------------------------------------------------------------------------
# BM25


class BM25Index:
    """Okapi BM25 over an in-memory corpus (numpy; ~1 ms per query for 10^4 short passages).

    Per term the index stores the ids of the documents that contain it and their precomputed BM25
    weights, so a query is a few vectorised ``scores[ids] += weights`` and one ``argpartition``.
    """

    def __init__(self, documents: Sequence[Document], k1: float = 1.2, b: float = 0.75) -> None:
        if not documents:
            raise ValueError("BM25Index needs at least one document, got an empty corpus")
        self.documents = list(documents)
        self._postings = self._build_postings(self.documents, k1, b)

    @staticmethod
    def _build_postings(documents: Sequence[Document], k1: float, b: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        counts = [Counter(tokenize(f"{d.title} {d.text}")) for d in documents]
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        avg_len = max(float(lengths.mean()), 1e-9)
        by_term: dict[str, tuple[list[int], list[int]]] = {}
        for doc_id, c in enumerate(counts):
            for term, tf in c.items():
                ids, tfs = by_term.setdefault(term, ([], []))
                ids.append(doc_id)
                tfs.append(tf)
        n = len(documents)
        postings = {}
        for term, (ids, tfs) in by_term.items():
            ids_arr = np.asarray(ids, dtype=np.int64)
            tf_arr = np.asarray(tfs, dtype=np.float64)
            idf = math.log(1.0 + (n - len(ids) + 0.5) / (len(ids) + 0.5))
            norm = k1 * (1.0 - b + b * lengths[ids_arr] / avg_len)
            postings[term] = (ids_arr, idf * tf_arr * (k1 + 1.0) / (tf_arr + norm))
        return postings

    def search(self, query: str, top_k: int = 5) -> list[tuple[Document, float]]:
        """The ``top_k`` best documents with a positive score, best first."""
        scores = np.zeros(len(self.documents), dtype=np.float64)
        for term in set(tokenize(query)):
            hit = self._postings.get(term)
            if hit is not None:
                scores[hit[0]] += hit[1]
        k = min(top_k, len(self.documents))
        candidates = np.argpartition(-scores, k - 1)[:k]
        ranked = candidates[np.argsort(-scores[candidates], kind="stable")]
        return [(self.documents[i], float(scores[i])) for i in ranked if scores[i] > 0.0]


# --------------------------------------------------------------------------------------------
# HTTP server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: httpx reuses connections under load
    disable_nagle_algorithm = True  # headers and body are separate writes: Nagle + delayed ACK cost 40 ms each
    server: "_Server"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        logger.debug("search server: " + format, *args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path == "/health":
            self._send_json(200, {"status": "ok", "documents": len(self.server.index.documents)})
        else:
            self._send_json(404, {"error": f"no route GET {self.path}"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path != "/search":
            self._send_json(404, {"error": f"no route POST {self.path}"})
            return
        try:
            query, top_k = _parse_search_request(raw)
        except ValueError as e:
            self._send_json(400, {"error": str(e)})
            return
        hits = self.server.index.search(query, top_k)
        results = [{**asdict(doc), "score": round(score, 6)} for doc, score in hits]
        self._send_json(200, {"query": query, "results": results})


def _parse_search_request(raw: bytes) -> tuple[str, int]:
    try:
        body = json.loads(raw or b"{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"request body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ValueError(f"request body must be a JSON object, got {type(body).__name__}")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"'query' must be a non-empty string, got {query!r}")
    top_k = body.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"'top_k' must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    return query, top_k


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # 64+ concurrent clients must not be refused by a short backlog

    def __init__(self, address: tuple[str, int], index: BM25Index) -> None:
        self.index = index
        super().__init__(address, _Handler)


class RetrievalServer:
    """A BM25 server in a background thread; ``port=0`` picks a free port.

    Binds 127.0.0.1 by default: the corpus is local data and nothing outside the machine needs it.
    """

    def __init__(self, index: BM25Index, host: str = "127.0.0.1", port: int = 0) -> None:
        self.index = index
        self._host, self._port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_jsonl(cls, path: str | Path, host: str = "127.0.0.1", port: int = 0) -> "RetrievalServer":
        return cls(BM25Index(read_corpus(path)), host=host, port=port)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("RetrievalServer is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RetrievalServer":
        if self._server is not None:
            return self
        self._server = _Server((self._host, self._port), self.index)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="axpo-search-server", daemon=True
        )
        self._thread.start()
        logger.info("search server on %s (%d documents)", self.url, len(self.index.documents))
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "RetrievalServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RetrievalServerProcess:
    """The server in its own process (``python -m axpo_rllm.envs.search_server``).

    For the main job and for load: in-process, the server's handler threads share the GIL with the
    trainer (and with the benchmark's client). The child prints its URL once it is listening.
    """

    def __init__(self, corpus_path: str | Path, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 60.0) -> None:
        self.corpus_path = Path(corpus_path)
        self._args = [sys.executable, "-m", "axpo_rllm.envs.search_server", "--corpus", str(self.corpus_path), "--host", host, "--port", str(port)]
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen | None = None
        self._url = ""

    @property
    def url(self) -> str:
        if self._process is None:
            raise RuntimeError("RetrievalServerProcess is not running; call start() first")
        return self._url

    def start(self) -> "RetrievalServerProcess":
        if self._process is not None:
            return self
        process = subprocess.Popen(self._args, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([process.stdout], [], [], self._startup_timeout_s)
        line = process.stdout.readline().strip() if ready else ""
        if not line.startswith("http://"):
            process.kill()
            process.wait()
            raise RuntimeError(
                f"search server on {self.corpus_path} did not start within {self._startup_timeout_s:g}s "
                f"(exit code {process.returncode}, first line {line!r})"
            )
        self._process, self._url = process, line
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()
        self._process = None

    def __enter__(self) -> "RetrievalServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a corpus until interrupted (the main job can also run it in-process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="JSONL corpus ({id, title, text, url} per line)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = RetrievalServer.from_jsonl(args.corpus, host=args.host, port=args.port).start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
