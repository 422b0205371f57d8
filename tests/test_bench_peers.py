"""The peers section of the benchmark (``bench/bench.py --smoke --only peers``, issue 21)
runs end to end: real tools record from the bench upstream, replay with it gone, under
real load, and the table has a row per tool that ran. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH_DIR))

from peers import answers_cell, compare, dechunk, peers_table  # noqa: E402
from report import render  # noqa: E402

PYTHON_TOOLS = ("cassette-proxy run", "mitmdump + recorder", "mitmproxy --server-replay")
NODE_TOOLS = ("Proxay", "Talkback")


def test_peers_section_prints_a_row_per_tool(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench.py"), "--smoke", "--only", "peers",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    peers = result["peers"]
    assert peers["table"] in render(result)  # bench/report.py shows it too
    table_rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    shown = [line.split("|")[1].strip() for line in table_rows]
    assert shown == peers["tools"], done.stdout

    # The Python tools always run; each Node peer either ran or has its one-line note.
    assert set(PYTHON_TOOLS) <= set(peers["tools"])
    for node_tool in NODE_TOOLS:
        ran = any(t.startswith(node_tool) for t in peers["tools"])
        noted = any(node_tool.lower() in n.lower() for n in peers["notes"])
        assert ran != noted, (node_tool, peers["tools"], peers["notes"])
        for note in peers["notes"]:
            assert f"peers: {note}" in done.stdout  # one line on the terminal

    # Every tool answered every column without an error, upstream gone.
    for tool in peers["tools"]:
        cells = {(r["kind"], r["conns"]) for r in peers["rows"] if r["tool"] == tool}
        assert cells == {("json", 1), ("json", 16), ("sse", 1), ("sse", 16)}, tool
    for row in peers["rows"]:
        assert row["requests"] > 0 and row["errors"] == 0, row

    # The answers are the recorded bytes; Talkback's re-formatted JSON is reported.
    for tool, checks in peers["checks"].items():
        for kind, c in checks.items():
            assert c["status"] == 200, (tool, kind, c)
            if tool.startswith("Talkback") and kind == "json":
                assert c["note"].startswith("same JSON, re-formatted"), c
            else:
                assert c["same"] is True, (tool, kind, c)


def test_compare_names_what_differs():
    body = b'{"a": 1, "b": [1, 2]}'
    assert compare(body, 200, {}, body)["same"] is True
    pretty = compare(body, 200, {}, b'{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}')
    assert pretty["same"] is False and pretty["note"].startswith("same JSON, re-formatted")
    other = compare(body, 200, {"transfer-encoding": "chunked"}, b'{"a": 2}')
    assert other["note"].startswith("DIFFERENT bytes") and other["framing"] == "chunked"
    assert compare(body, 404, {}, b"")["note"] == "status 404"


def test_dechunk_joins_the_chunks():
    assert dechunk(b"3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n") == b"abcde"


def test_table_ratios_are_to_the_best_peer_of_each_column():
    names = ["cassette-proxy run", "Proxay 1.9.0", "Talkback 4.2.0"]
    rows = []
    for name, rps, p50 in (("cassette-proxy run", 3000, 0.2), ("Proxay 1.9.0", 2000, 0.4),
                           ("Talkback 4.2.0", 6000, 0.1)):  # fmt: skip
        for kind in ("json", "sse"):
            for conns in (1, 16):
                rows.append({"tool": name, "kind": kind, "conns": conns, "rps": rps,
                             "p50_ms": p50, "errors": 0})  # fmt: skip
    same = {"json": {"same": True}, "sse": {"same": True}}
    checks = {n: same for n in names}
    table = peers_table(rows, names, checks).splitlines()
    assert len(table) == 2 + len(names)
    ours = table[2].split("|")
    assert ours[1].strip() == "cassette-proxy run"
    assert ours[2].strip() == "3,000 (0.50x)"  # 3000 / 6000, Talkback the best peer
    assert ours[6].strip() == "0.200 ms (0.50x)"  # 0.1 ms best peer / 0.2 ms
    assert table[4].split("|")[2].strip() == "6,000 (1.00x)"
    assert answers_cell(same) == "same bytes"
