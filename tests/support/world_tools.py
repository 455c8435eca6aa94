"""The real crop, python and search tools over a synthetic world, search on a live local BM25
server of the world's corpus (shared by the tests that run a world's tasks through the tools)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def world_tools(world: Any, top_k: int, python: dict | None = None) -> Iterator[dict]:
    """Build the three tools for ``world`` (search shows ``top_k`` hits; ``python``: the sandbox's
    config), yield them, then close them and stop the server."""
    from axpo_rllm.envs.env import build_tools, run_sync
    from axpo_rllm.envs.search_server import BM25Index, RetrievalServer

    server = RetrievalServer(BM25Index(world.corpus)).start()
    configs: dict[str, dict] = {"search": {"backend": "local", "base_url": server.url, "top_k": top_k}}
    if python is not None:
        configs["python"] = python
    tools = build_tools(["crop", "python", "search"], configs)
    try:
        yield tools
    finally:
        for tool in tools.values():
            run_sync(tool.aclose())
        server.stop()
