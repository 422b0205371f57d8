"""Tool-level recordings that answer an HTTP request: OGX's Tavily ``web_search``.

OGX (llama-stack's successor) records a tool call, not its HTTP request:
``request: {"provider": "tavily", "tool_name": "web_search", "kwargs": {"query": ...}}``,
answered by a ``ToolInvocationResult`` whose ``content`` is the JSON text
``{"query": ..., "top_k": [...results]}``. Its Tavily provider makes that call as
``POST https://api.tavily.com/search`` with ``{"api_key", "query"}`` (plus
``include_domains`` for ``allowed_domains`` and ``max_results`` for
``search_context_size``), and builds ``content`` from Tavily's answer as
``{"query": answer["query"], "top_k": answer["results"]}``, written by ``json.dumps``.

So the recording holds all that Tavily's HTTP search for that query must say: here it is
read as that HTTP request (``tool_wire``) and answered in Tavily's shape
(``tavily_wire``), so that the provider builds exactly the recorded ``content`` again.
"""

from __future__ import annotations

import json
from typing import Any

from .cassette import Cassette

SEARCH_PATH = "/search"  # https://api.tavily.com/search
RESULT_TYPE = "ToolInvocationResult"  # ogx_api.tools.ToolInvocationResult (any package)
# OGX's search_context_size -> Tavily's max_results.
CONTEXT_SIZES = {"low": 3, "medium": 5, "high": 10}


def tavily_request(cassette: Cassette) -> tuple[str, str, dict[str, Any]] | None:
    """(method, path, body) of the Tavily search a tool-level ``web_search`` recording
    answers; None for any other recording. The key is the body's ``api_key`` redacted, as
    every request's is (``redact_body``)."""
    extra = cassette.request.model_extra or {}
    if extra.get("provider") != "tavily" or extra.get("tool_name") != "web_search":
        return None
    kwargs = extra.get("kwargs")
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("query"), str):
        return None
    body: dict[str, Any] = {"api_key": "REDACTED", "query": kwargs["query"]}
    if kwargs.get("allowed_domains"):
        body["include_domains"] = kwargs["allowed_domains"]
    size = kwargs.get("search_context_size")
    if isinstance(size, str) and size in CONTEXT_SIZES:
        body["max_results"] = CONTEXT_SIZES[size]
    return "POST", SEARCH_PATH, body


def is_tool_result(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and str(body.get("__type__", "")).rsplit(".", 1)[-1] == RESULT_TYPE
        and isinstance(body.get("__data__"), dict)
    )


def tavily_answer(result: dict[str, Any]) -> dict[str, Any]:
    """Tavily's JSON answer for a recorded ``ToolInvocationResult``'s data.

    Raises ValueError when its ``content`` is not the ``{"query", "top_k"}`` text OGX
    writes (or the call failed: ``error_message``): then there is no answer to give."""
    if result.get("error_message"):
        raise ValueError(f"the recorded search failed: {result['error_message']}")
    content = result.get("content")
    data = json.loads(content) if isinstance(content, str) else None
    if not isinstance(data, dict) or "query" not in data or not isinstance(data.get("top_k"), list):
        raise ValueError("content is not the {'query', 'top_k'} text of a Tavily search")
    return {
        "query": data["query"],
        "follow_up_questions": None,
        "answer": None,
        "images": [],
        "results": data["top_k"],
        "response_time": 0.0,
    }
