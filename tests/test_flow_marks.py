"""What a mitmweb user sees: flows marked and commented with their cassette.

Read two ways: the flow file `mitmdump -w` writes, and the flow as it stands after
every addon ran (what mitmweb shows), captured by a small addon loaded after ours.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Proxy, cassette_files, openai_client
from mitmproxy import http, io
from upstreams import OpenAIUpstream

WATCHER = """
import json, os

class Watch:
    def _note(self, flow):
        with open(os.environ["FLOW_NOTES"], "a") as f:
            f.write(json.dumps([flow.request.path, flow.request.content.decode(),
                                flow.marked, flow.comment]) + "\\n")

    def response(self, flow):
        self._note(flow)

    def error(self, flow):
        self._note(flow)

addons = [Watch()]
"""


def ask(
    proxy: Proxy, upstream: OpenAIUpstream, prompt: str, stream: bool = False
) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as client:
        return client.post(f"{upstream.url}/v1/chat/completions", json=body)


def prompt_of(flow: http.HTTPFlow) -> str:
    return json.loads(flow.request.content or b"{}")["messages"][0]["content"]


def test_recorded_replayed_fallback_and_missed_flows_are_marked(
    tmp_path: Path, proxy_factory: Callable[..., Proxy], upstream: OpenAIUpstream
) -> None:
    watcher = tmp_path / "watch.py"
    watcher.write_text(WATCHER)
    notes, flows = tmp_path / "notes.jsonl", tmp_path / "flows"
    proxy = proxy_factory(
        "-s", str(watcher), "-w", str(flows),
        mode="auto",
        options={"cassette_probe_ttl_ms": 60_000},  # "up" stays cached after the upstream dies
        env={"FLOW_NOTES": str(notes)},
    )  # fmt: skip
    assert ask(proxy, upstream, "whole").status_code == 200
    assert ask(proxy, upstream, "streamed", stream=True).status_code == 200
    client = openai_client(proxy, upstream)
    # The SDK reads to [DONE] and hangs up before the final chunk terminator (held
    # back by the upstream): mitmproxy reports an error, and the stream is still recorded.
    upstream.configure(done_tail_delay=0.5)
    for _ in client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "sdk"}], stream=True
    ):
        pass
    upstream.configure(done_tail_delay=0.0)
    upstream.configure(fail_mode="cut", fail_times=1)
    with pytest.raises(httpx.HTTPError):
        ask(proxy, upstream, "cut", stream=True)
    upstream.stop()
    went_away = ask(proxy, upstream, "whole")  # verdict still "up": server_connect fallback
    offline = ask(proxy, upstream, "streamed", stream=True)  # now known down: probe fallback
    missed = ask(proxy, upstream, "never")
    proxy.stop()
    assert went_away.status_code == offline.status_code == 200 and missed.status_code == 404

    names = {
        json.loads(p.read_text())["request"]["body"]["messages"][0]["content"]: p
        for p in cassette_files(proxy.cassette_dir)
    }  # noqa: E501
    rel = {prompt: str(path.relative_to(proxy.cassette_dir)) for prompt, path in names.items()}
    assert set(rel) == {"whole", "streamed", "sdk"}

    # what mitmweb shows once the hooks ran
    seen = [json.loads(line) for line in notes.read_text().splitlines()]
    final = [
        (json.loads(body)["messages"][0]["content"], marked, comment)
        for _, body, marked, comment in seen
    ]  # noqa: E501
    assert sorted(final[:3]) == sorted(
        (p, ":red_circle:", f"cassette: recorded {rel[p]}") for p in ("whole", "streamed", "sdk")
    )
    cut = final[3]
    assert cut[:2] == ("cut", "") and cut[2].startswith("cassette: not recorded (stream cut short")
    assert final[4:] == [
        ("whole", ":vhs:", f"cassette: {rel['whole']} (upstream went away)"),
        ("streamed", ":vhs:", f"cassette: {rel['streamed']} (upstream offline)"),
        ("never", ":x:", "cassette: miss (upstream offline)"),
    ]

    # what `mitmdump -w` saved: the same (scripts' hooks run before the writer's)
    with flows.open("rb") as f:
        saved = [fl for fl in io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    assert sorted((prompt_of(fl), fl.marked, fl.comment) for fl in saved) == sorted(final)
