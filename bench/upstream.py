"""A fast fake OpenAI-compatible upstream for the benchmark (asyncio, HTTP/1.1 keep-alive).

Run as its own process (``python bench/upstream.py --port 0``; it prints its port), so it
does not share a GIL with the load generator or the proxy. ``POST .../chat/completions``
answers a fixed chat completion; with ``"stream": true`` in the body, a 100-chunk SSE
stream (``--chunks``), the first event after ``--first-ms`` and then one every
``--every-ms`` (both 0 by default: the whole stream in one write). A body that names
``BIG-STREAM`` gets a stream of ``--big-chunks`` chunks, one that names ``BIG-JSON`` a
chat completion of about ``--big-json-mb`` MB (a long content, and logprobs for 20,000
tokens: small objects and floats); both made once, on first use. Anything else: 404.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

CHAT = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "The quick brown fox. " * 20},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 100, "total_tokens": 112},
}


def chunk_event(i: int, n: int) -> bytes:
    delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f"tok{i} "}
    data = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "delta": delta if i < n - 1 else {},
                "finish_reason": None if i < n - 1 else "stop",
                "logprobs": None,
            }
        ],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def big_json(mb: float) -> bytes:
    """A chat completion of about ``mb`` MB: a long answer with per-token logprobs (its
    cassette, indented, stays under the 32 MiB a cassette may hold)."""
    token = {"token": "tok", "logprob": -0.0123456, "bytes": [116, 111, 107], "top_logprobs": []}
    n = min(20000, int(mb * 1e6 / 10 / len(json.dumps(token))))
    doc = json.loads(json.dumps(CHAT))
    doc["choices"][0]["logprobs"] = {"content": [dict(token, logprob=-i / n) for i in range(n)]}
    rest = int(mb * 1e6) - len(json.dumps(doc))
    doc["choices"][0]["message"]["content"] = ("The quick brown fox. " * (rest // 21 + 1))[:rest]
    return json.dumps(doc).encode()


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream(asyncio.Protocol):
    def __init__(self, args: argparse.Namespace, events: list[bytes], body: bytes) -> None:
        self.args = args
        self.events = events
        self.json_response = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.sse_head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        self.sse_whole = self.sse_head + b"".join(http_chunk(e) for e in events) + b"0\r\n\r\n"
        self.buf = b""
        self.big: dict[str, bytes] = BIG
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._serve()

    def _serve(self) -> None:
        while not self.busy:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].lower()
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                eol = head.find(b"\r\n", i)
                length = int(head[i + 15 : eol if eol > 0 else None])
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            body = self.buf[head_end + 4 : end]
            self.buf = self.buf[end:]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        line = head.split(b"\r\n", 1)[0]
        if not line.startswith(b"post") or b"/completions" not in line:
            msg = b'{"error": {"message": "not found"}}'
            self.transport.write(
                b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(msg), msg)
            )
            return
        if b"BIG-STREAM" in body:
            if "stream" not in self.big:
                n = self.args.big_chunks
                events = b"".join(http_chunk(chunk_event(i, n)) for i in range(n))
                self.big["stream"] = events + http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
            self.transport.write(self.sse_head + self.big["stream"])
            return
        if b"BIG-JSON" in body:
            if "json" not in self.big:
                self.big["json"] = big_json(self.args.big_json_mb)
            big = self.big["json"]
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(big), big)
            )
            return
        if b'"stream": true' not in body and b'"stream":true' not in body:
            self.transport.write(self.json_response)
            return
        if not self.args.first_ms and not self.args.every_ms:
            self.transport.write(self.sse_whole)
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self._paced())

    async def _paced(self) -> None:
        assert self.transport is not None
        self.transport.write(self.sse_head)
        await asyncio.sleep(self.args.first_ms / 1000)
        for i, event in enumerate(self.events):
            if i:
                await asyncio.sleep(self.args.every_ms / 1000)
            if self.transport.is_closing():
                return
            self.transport.write(http_chunk(event))
        self.transport.write(b"0\r\n\r\n")
        self.busy = False
        self._serve()


BIG: dict[str, bytes] = {}  # the big answers, shared by all connections


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--first-ms", type=float, default=0.0)
    p.add_argument("--every-ms", type=float, default=0.0)
    p.add_argument("--big-chunks", type=int, default=60000)
    p.add_argument("--big-json-mb", type=float, default=25.0)
    args = p.parse_args()
    n = args.chunks
    events = [chunk_event(i, n) for i in range(n)] + [b"data: [DONE]\n\n"]
    body = json.dumps(CHAT).encode()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Upstream(args, events, body), "127.0.0.1", args.port, backlog=1024
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    sys.stdout.close()
    await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
