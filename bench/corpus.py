"""Make N cassettes of realistic sizes by varying the fixtures in bench/fixtures/.

The fixtures are real llama-stack recordings (chat streamed and not, tool calls,
completions, embeddings, a model list). Each copy changes the last prompt text (or
the test id, for bodies without text) so every file has its own request key, and is
named by the documented request hash, as the recorder would name it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from cassette_proxy import keys

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# How often each fixture appears in the mix: mostly small chats, some long streams.
WEIGHTS = {
    "cab3ed24be7e": 3,  # chat, openai, 3.9 KB
    "e4621930a1f8": 2,  # chat + tool call, openai, 2.8 KB
    "77cf21828360": 2,  # chat, vllm, 2.6 KB
    "4b7d758e7ce5": 2,  # chat stream, openai, 15 KB
    "fe17937cb02f": 2,  # chat stream, ollama, 4.1 KB
    "8567635651a5": 1,  # completions stream, 27 KB
    "68e9f69920e6": 1,  # embeddings, 43 KB
    "0248ff8a1be5": 1,  # chat stream + tools, vllm, 86 KB
    "models-14c09": 1,  # model list, 1.3 KB
}


def _fixtures() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(FIXTURES.glob("*.json")):
        docs += [json.loads(path.read_text())] * WEIGHTS.get(path.name[:12], 1)
    return docs


def _vary_text(value: Any, suffix: str) -> bool:
    """Append ``suffix`` to the last piece of prompt text in ``value``; False if none."""
    if isinstance(value, dict):
        for k in ("content", "text", "prompt", "input"):
            v = value.get(k)
            if isinstance(v, str):
                value[k] = v + suffix
                return True
            if isinstance(v, list | dict) and _vary_text(v, suffix):
                return True
        for k in ("messages",):
            if isinstance(value.get(k), list) and _vary_text(value[k], suffix):
                return True
        return False
    if isinstance(value, list):
        for i in range(len(value) - 1, -1, -1):
            if isinstance(value[i], str):
                value[i] = value[i] + suffix
                return True
            if _vary_text(value[i], suffix):
                return True
    return False


def variant(doc: dict[str, Any], i: int) -> tuple[str, dict[str, Any]]:
    """The i-th variant of a fixture, and its file name."""
    doc = copy.deepcopy(doc)
    request = doc["request"]
    body = request.get("body")
    if not _vary_text(body, f" (variant {i})"):
        doc["test_id"] = f"{doc.get('test_id') or 'bench'}[variant-{i}]"
    endpoint = request.get("endpoint") or "/"
    name = keys.recording_hash(request["method"], endpoint, body, doc.get("test_id"))
    return name + ".json", doc


def make_cassettes(folder: Path, n: int) -> int:
    """Write n cassettes into folder (made if needed); returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = _fixtures()
    total = 0
    for i in range(n):
        name, doc = variant(docs[i % len(docs)], i)
        text = json.dumps(doc, indent=2) + "\n"
        (folder / name).write_text(text)
        total += len(text)
    return total
