"""CPU time of one recording, in-process: no proxy, no sockets, no load generator.

``python bench/percassette.py [LABEL]`` feeds the bench upstream's answers (a chat
completion, SSE streams of 40 and 100 chunks) to the family's recorder, builds the
cassette and writes it (no fsync), and prints one JSON line per answer: CPU microseconds
(best of 5 runs of 50) for the whole and its parts. Steadier than req/s on a busy
machine. ``PYTHONPATH=OLD/addons python bench/percassette.py before`` measures another
checkout's package the same way.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cassette_proxy.cassette import write_cassette  # noqa: E402
from cassette_proxy.families import classify  # noqa: E402
from cassette_proxy.recording import new_recording, whole_response  # noqa: E402
from upstream import CHAT, chunk_event  # noqa: E402

PATH = "/v1/chat/completions"


def cpu_us(fn: Any, number: int = 50) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5, timer=time.process_time)) / number * 1e6


def measure(root: Path, chunks: int) -> dict[str, Any]:
    family = classify("POST", PATH)
    body = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}],
            "stream": bool(chunks)}  # fmt: skip
    if not chunks:
        raw = json.dumps(CHAT).encode()

        def parse() -> dict[str, Any]:
            return whole_response(family, PATH, body, 200, json.loads(raw))
    else:
        raw = b"".join(chunk_event(i, chunks) for i in range(chunks)) + b"data: [DONE]\n\n"

        def parse() -> dict[str, Any]:
            recorder = family.stream_recorder(PATH, body, "text/event-stream")
            recorder.feed(raw)
            return recorder.response(True)

    def build(response: dict[str, Any]) -> Any:
        url = "http://127.0.0.1" + PATH
        return new_recording(
            root, method="POST", path=PATH, body=body, test_id=None, url=url, headers={},
            response=response,
        )  # fmt: skip

    response = parse()
    path, cassette = build(response)
    parts = {
        "parse_us": cpu_us(parse),
        "model_us": cpu_us(lambda: build(response)),
        "text_us": cpu_us(cassette.to_json),
    }
    total = cpu_us(lambda: write_cassette(path, build(parse())[1], durable=False))
    parts["file_us"] = max(0.0, total - sum(parts.values()))
    return {"bytes": len(cassette.to_json()), "total_us": total, **parts}


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
    root = Path(tempfile.mkdtemp(prefix="percassette-"))
    for chunks in (0, 40, 100):
        answer = f"SSE, {chunks} chunks" if chunks else "plain JSON"
        result = {k: round(v) if isinstance(v, float) else v
                  for k, v in measure(root, chunks).items()}  # fmt: skip
        print(json.dumps({"code": label, "answer": answer, **result}), flush=True)


if __name__ == "__main__":
    main()
