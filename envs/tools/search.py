"""The ``search`` tool: retrieval over HTTP with a persistent cache, retries and a concurrency cap.

Backends (``backend=`` in the tool config):

- ``local`` (default): the project's own BM25 server (:mod:`axpo_rllm.envs.search_server`);
  free and deterministic, so RL training never depends on a paid API.
- ``tavily``: ``POST {base_url}/search`` with ``{"query", "max_results"}``; the key goes in an
  ``Authorization: Bearer`` header (or in the body as ``api_key`` with ``key_in_body: true``).
- ``serper``: ``POST {base_url}/search`` with ``{"q", "num"}`` and an ``X-API-KEY`` header;
  answers ``{"organic": [{"title", "link", "snippet"}]}``.

Why each piece exists: RL issues the same queries thousands of times (search API cost is the
users' top complaint), hence the cache keyed by the normalised query, kept in sqlite so it
survives restarts. Remote calls fail transiently, hence retries with exponential backoff; a
failure that persists becomes an error observation the model sees, and is never cached. API keys
live in a :class:`Secret` whose ``repr`` is masked, and every error text is scrubbed of the key.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import unicodedata
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx

from axpo_rllm.envs.tools.base import Tool, ToolContext, ToolResult

__all__ = [
    "SearchTool",
    "SearchHit",
    "SearchError",
    "SearchCache",
    "SearchBackend",
    "LocalBackend",
    "TavilyBackend",
    "SerperBackend",
    "Secret",
    "normalize_query",
    "BACKENDS",
]

logger = logging.getLogger(__name__)

MAX_TOP_K = 10
"""More results than this only lengthens the observation; the model gets no more signal."""


class Secret:
    """An API key that never shows up in reprs, logs or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def scrub(self, text: str) -> str:
        """``text`` with every occurrence of the key replaced by ``***``."""
        return text.replace(self._value, "***") if self._value else text


@dataclass(frozen=True)
class SearchHit:
    title: str
    snippet: str
    url: str = ""


class SearchError(Exception):
    """A failed backend request; ``retryable`` says whether trying again can help."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def normalize_query(query: str) -> str:
    """The cache key of a query: Unicode-normalised, case-folded, single-spaced, no trailing ``?.!``.

    Models restate the same question with different case and spacing; those must share one
    cache entry (and one paid API call).
    """
    text = unicodedata.normalize("NFKC", query).casefold()
    return re.sub(r"\s+", " ", text).strip(" ?.!")


# --------------------------------------------------------------------------------------------
# Backends: wire formats only (request building and response parsing), no I/O.


class SearchBackend(abc.ABC):
    """How one search service is spoken to."""

    name: str
    default_base_url: str = ""
    api_key_env: str = ""
    """Environment variable read when the config gives no ``api_key``."""

    def __init__(self, base_url: str = "", api_key: str | None = None, **options: Any) -> None:
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        key = api_key if api_key is not None else os.environ.get(options.pop("api_key_env", "") or self.api_key_env, "")
        self.api_key = Secret(key or "")
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key={self.api_key!r})"

    requires_api_key: ClassVar[bool] = False
    """Paid web APIs: a missing key is a configuration problem, reported before any request."""

    def config_problem(self) -> str:
        """Why this backend cannot send requests ('' when it can); shown to the model as an error."""
        if self.requires_api_key and not self.api_key:
            return f"search backend {self.name!r} has no API key (set {self.api_key_env} or the tool config 'api_key')"
        if not self.base_url:
            return f"search backend {self.name!r} has no base_url configured"
        return ""

    @abc.abstractmethod
    def build_request(self, query: str, top_k: int) -> tuple[str, dict, dict]:
        """``(url, json_body, headers)`` of one search request."""

    results_key: ClassVar[str] = "results"
    """Where the wire format keeps its list of hits, and which fields of a hit hold what we show."""
    snippet_field: ClassVar[str] = "text"
    url_field: ClassVar[str] = "url"

    def parse_response(self, body: Any) -> list[SearchHit]:
        """Hits from the decoded JSON body; raises ``ValueError`` naming what was malformed."""
        return [
            SearchHit(title=str(r.get("title", "")), snippet=str(r.get(self.snippet_field, "")), url=str(r.get(self.url_field, "")))
            for r in _expect_list(body, self.results_key, self.name)
        ]


def _expect_list(body: Any, key: str, backend: str) -> list:
    if not isinstance(body, dict) or not isinstance(body.get(key), list):
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise ValueError(f"{backend} response has no {key!r} list (got {got})")
    return body[key]


class LocalBackend(SearchBackend):
    """The project's BM25 server (``search_server.py``); ``AXPO_SEARCH_URL`` is the fallback URL."""

    name = "local"

    def __init__(self, base_url: str = "", api_key: str | None = None, **options: Any) -> None:
        super().__init__(base_url or os.environ.get("AXPO_SEARCH_URL", ""), api_key="", **options)

    def config_problem(self) -> str:
        if not self.base_url:
            return (
                "search backend 'local' has no base_url: start axpo_rllm.envs.search_server and pass its "
                "url as the tool config 'base_url' (or set AXPO_SEARCH_URL)"
            )
        return ""

    def build_request(self, query: str, top_k: int) -> tuple[str, dict, dict]:
        return f"{self.base_url}/search", {"query": query, "top_k": top_k}, {}



class TavilyBackend(SearchBackend):
    name = "tavily"
    default_base_url = "https://api.tavily.com"
    api_key_env = "TAVILY_API_KEY"
    requires_api_key = True
    snippet_field = "content"

    def build_request(self, query: str, top_k: int) -> tuple[str, dict, dict]:
        body: dict[str, Any] = {"query": query, "max_results": top_k}
        headers: dict[str, str] = {}
        if self.options.get("key_in_body"):
            body["api_key"] = self.api_key.reveal()
        else:
            headers["Authorization"] = f"Bearer {self.api_key.reveal()}"
        return f"{self.base_url}/search", body, headers



class SerperBackend(SearchBackend):
    name = "serper"
    default_base_url = "https://google.serper.dev"
    api_key_env = "SERPER_API_KEY"
    requires_api_key = True
    results_key, snippet_field, url_field = "organic", "snippet", "link"

    def build_request(self, query: str, top_k: int) -> tuple[str, dict, dict]:
        return f"{self.base_url}/search", {"q": query, "num": top_k}, {"X-API-KEY": self.api_key.reveal()}



BACKENDS: dict[str, type[SearchBackend]] = {b.name: b for b in (LocalBackend, TavilyBackend, SerperBackend)}


# --------------------------------------------------------------------------------------------
# Cache


class SearchCache:
    """Successful results keyed by ``(namespace, normalised query, top_k)``; sqlite, so it survives restarts.

    ``path=None`` keeps it in memory. Thread-safe (one connection behind a lock: a lookup is tens of
    microseconds, far below the ≤ 1 ms budget of a cache hit). Only :meth:`put` writes, and the tool
    calls it only with a successful backend answer, so an error can never be served from the cache.
    """

    def __init__(self, path: str | Path | None = None, ttl_s: float | None = None) -> None:
        self.path = Path(path) if path else None
        self.ttl_s = ttl_s
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False)
        with self._lock, self._db:
            if self.path is not None:
                # WAL + synchronous=NORMAL: a commit is no fsync (~10 ms each on this disk, and it would
                # block the event loop). A crash can lose the last few entries, never corrupt the file.
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS search_cache (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)")

    @staticmethod
    def key(namespace: str, query: str, top_k: int) -> str:
        return json.dumps([namespace, normalize_query(query), top_k])

    def get(self, key: str) -> list[SearchHit] | None:
        with self._lock:
            row = self._db.execute("SELECT value, created FROM search_cache WHERE key = ?", (key,)).fetchone()
        if row is None or (self.ttl_s is not None and time.time() - row[1] > self.ttl_s):
            return None
        return [SearchHit(**h) for h in json.loads(row[0])]

    def put(self, key: str, hits: list[SearchHit]) -> None:
        value = json.dumps([asdict(h) for h in hits])
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO search_cache VALUES (?, ?, ?)", (key, value, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM search_cache").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------------------------
# The tool


@dataclass(frozen=True)
class _RetryPolicy:
    max_retries: int
    backoff_base_s: float
    backoff_max_s: float

    def delay(self, attempt: int) -> float:
        """Exponential backoff with up to 25% jitter (so K concurrent retries do not stampede)."""
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * (1.0 + 0.25 * random.random())


class SearchTool(Tool):
    """Search a text corpus or the web; returns the top passages as text.

    Config keys (all optional): ``backend`` (local|tavily|serper), ``base_url``, ``api_key``,
    ``api_key_env``, ``key_in_body`` (tavily), ``top_k`` (default 3), ``timeout_s`` (10),
    ``max_retries`` (3), ``backoff_base_s`` (0.5), ``backoff_max_s`` (8), ``max_concurrency``
    (16 per event loop), ``cache_path`` (sqlite file; absent = in-memory), ``cache_ttl_s``,
    ``cache_namespace`` (default: the backend name), ``max_snippet_chars`` (600),
    ``max_query_chars`` (1000; a runaway model must not send megabytes to a paid API).

    A missing URL or key does not stop construction (the environment builds every discovered
    tool); each call then answers with an error observation that names the missing setting.
    """

    name = "search"
    description = "Search for text passages relevant to a query. Returns the top results with their titles and sources."
    parameters = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to search for, in a few keywords or a short question."},
            "top_k": {"type": "integer", "description": f"Number of results, 1 to {MAX_TOP_K} (default 3)."},
        },
        "required": ["query"],
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        backend_name = config.get("backend", "local")
        if backend_name not in BACKENDS:
            raise ValueError(f"unknown search backend {backend_name!r}; expected one of {sorted(BACKENDS)}")
        backend_options = {k: config[k] for k in ("base_url", "api_key", "api_key_env", "key_in_body") if k in config}
        self.backend = BACKENDS[backend_name](**backend_options)
        self.config.pop("api_key", None)  # the Secret in the backend is the only copy we keep
        self.top_k = int(config.get("top_k", 3))
        self.timeout_s = float(config.get("timeout_s", 10.0))
        self.max_concurrency = int(config.get("max_concurrency", 16))
        self.max_snippet_chars = int(config.get("max_snippet_chars", 600))
        self.max_query_chars = int(config.get("max_query_chars", 1000))
        self.retry = _RetryPolicy(
            max_retries=int(config.get("max_retries", 3)),
            backoff_base_s=float(config.get("backoff_base_s", 0.5)),
            backoff_max_s=float(config.get("backoff_max_s", 8.0)),
        )
        self.cache = SearchCache(config.get("cache_path"), config.get("cache_ttl_s"))
        self.cache_namespace = str(config.get("cache_namespace", self.backend.name))
        # httpx clients and asyncio semaphores belong to one event loop; the tool may be called from
        # several (rllm runs env steps in threads, verl in its agent loop), so keep one set per loop.
        self._per_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, asyncio.Semaphore]]" = (
            weakref.WeakKeyDictionary()
        )
        if self.backend.config_problem():
            logger.warning("search tool is not usable yet: %s", self.backend.config_problem())

    def __repr__(self) -> str:
        return f"SearchTool(backend={self.backend!r}, top_k={self.top_k}, cache={self.cache.path})"

    # ---- the call ----------------------------------------------------------------------------

    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        parsed = self._parse_arguments(arguments)
        if isinstance(parsed, ToolResult):
            return parsed
        query, top_k = parsed
        started = time.perf_counter()
        key = SearchCache.key(self.cache_namespace, query, top_k)
        hits = self.cache.get(key)
        if hits is not None:
            return self._result(query, hits, cache_hit=True, attempts=0, started=started)
        problem = self.backend.config_problem()
        if problem:
            return ToolResult.fail(problem, backend=self.backend.name)
        try:
            hits, attempts = await self._fetch_with_retries(query, top_k)
        except SearchError as e:
            message = self.backend.api_key.scrub(str(e))
            return ToolResult.fail(message, backend=self.backend.name, latency_s=time.perf_counter() - started)
        self.cache.put(key, hits)
        return self._result(query, hits, cache_hit=False, attempts=attempts, started=started)

    def _parse_arguments(self, arguments: Any) -> tuple[str, int] | ToolResult:
        if not isinstance(arguments, dict):
            return ToolResult.fail(f"search arguments must be a JSON object, got {type(arguments).__name__}")
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            return ToolResult.fail(f"search needs a non-empty string 'query', got {query!r}")
        if len(query) > self.max_query_chars:
            return ToolResult.fail(f"search 'query' is {len(query)} characters long; at most {self.max_query_chars} are accepted")
        top_k = arguments.get("top_k", self.top_k)
        if isinstance(top_k, str) and top_k.strip().isdigit():
            top_k = int(top_k)  # models often quote numbers
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
            return ToolResult.fail(f"search 'top_k' must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
        return query.strip(), top_k

    def _result(self, query: str, hits: list[SearchHit], cache_hit: bool, attempts: int, started: float) -> ToolResult:
        return ToolResult(
            text=self.format_hits(query, hits),
            metadata={
                "cache_hit": cache_hit,
                "attempts": attempts,
                "backend": self.backend.name,
                "num_results": len(hits),
                "latency_s": time.perf_counter() - started,
            },
        )

    def format_hits(self, query: str, hits: list[SearchHit]) -> str:
        if not hits:
            return f"No results for {query!r}."
        lines = [f"Results for {query!r}:"]
        for i, hit in enumerate(hits, 1):
            snippet = hit.snippet if len(hit.snippet) <= self.max_snippet_chars else hit.snippet[: self.max_snippet_chars] + "..."
            source = f" ({hit.url})" if hit.url else ""
            lines.append(f"[{i}] {hit.title}{source}\n{snippet}")
        return "\n".join(lines)

    # ---- transport ---------------------------------------------------------------------------

    def _loop_resources(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        resources = self._per_loop.get(loop)
        if resources is None:
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            resources = (httpx.AsyncClient(timeout=self.timeout_s, limits=limits), asyncio.Semaphore(self.max_concurrency))
            self._per_loop[loop] = resources
        return resources

    async def _fetch_with_retries(self, query: str, top_k: int) -> tuple[list[SearchHit], int]:
        """Hits and the number of attempts used; raises the last ``SearchError`` once retries run out."""
        client, semaphore = self._loop_resources()
        attempts = self.retry.max_retries + 1
        for attempt in range(attempts):
            try:
                async with semaphore:
                    return await self._fetch_once(client, query, top_k), attempt + 1
            except SearchError as e:
                message = self.backend.api_key.scrub(str(e))
                if not e.retryable or attempt == attempts - 1:
                    raise SearchError(
                        f"search failed after {attempt + 1} attempt(s): {message}", retryable=False
                    ) from None
                delay = self.retry.delay(attempt)
                logger.warning("search attempt %d/%d failed (%s); retrying in %.2fs", attempt + 1, attempts, message, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _fetch_once(self, client: httpx.AsyncClient, query: str, top_k: int) -> list[SearchHit]:
        url, body, headers = self.backend.build_request(query, top_k)
        where = f"backend {self.backend.name!r}"
        try:
            response = await client.post(url, json=body, headers=headers)
        except httpx.TimeoutException:
            raise SearchError(f"{where} timed out after {self.timeout_s:g}s", retryable=True) from None
        except httpx.TransportError as e:
            raise SearchError(f"{where} unreachable ({type(e).__name__})", retryable=True) from None
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise SearchError(f"{where} answered HTTP {response.status_code}", retryable=True)
        if response.status_code >= 400:
            raise SearchError(f"{where} rejected the request: HTTP {response.status_code}", retryable=False)
        try:
            return self.backend.parse_response(response.json())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SearchError(f"{where} returned malformed JSON ({response.text[:80]!r})", retryable=True) from None
        except (ValueError, AttributeError, TypeError) as e:
            raise SearchError(f"{where} returned an unexpected body: {e}", retryable=True) from None

    async def aclose(self) -> None:
        """Close this loop's HTTP client and the cache; clients of other, finished loops are dropped."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        resources = self._per_loop.pop(loop, None) if loop is not None else None
        if resources is not None:
            await resources[0].aclose()
        self._per_loop.clear()
        self.cache.close()
