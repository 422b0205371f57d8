"""The benchmark runs end to end (``bench/bench.py --smoke``): every section, real
proxies, real load. No timing is asserted; the numbers live in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


def run_bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_smoke_runs_every_section(tmp_path):
    result = run_bench(tmp_path)
    assert result["smoke"] is True and result["machine"]["nproc"] >= 1

    replay = result["replay"]
    hosts = {r["host"] for r in replay}
    assert hosts == {
        "mitmdump+baseline", "mitmdump+recorder", "lean+baseline", "lean+recorder", "direct"
    }  # fmt: skip
    assert {r["kind"] for r in replay} == {"json", "sse"}
    for row in replay:
        assert row["requests"] > 0 and row["errors"] == 0, row

    assert {r["host"] for r in result["record"]} == {
        "lean+recorder passthrough", "lean+recorder record"
    }  # fmt: skip
    for row in result["record"]:
        assert row["requests"] > 0 and row["errors"] == 0, row
        if row["mode"] == "record":
            assert row["cassettes"] > 0, row  # it really recorded
        else:
            assert row["cassettes"] == 0, row

    stall = result["stall"]
    for busy in stall["busy"]:
        assert busy["n"] > 0 and busy["cassettes"] == 2, busy  # the big stream and answer
        assert busy["stream"]["status"] == 200 and busy["json"]["status"] == 200, busy
        # The stream's cassette was in place when its end marker reached the client.
        assert busy["stream"]["cassette_in_place_at_done"] is True, busy
    assert all(r["n"] > 0 for r in stall["idle"])
    record_soak = result["record_soak"]
    assert record_soak["recordings"] >= 300 and record_soak["errors"] == 0
    assert record_soak["cassettes"] > 0

    ttft = {r["target"]: r for r in result["ttft"]["rows"]}
    assert set(ttft) == {"direct", "lean+recorder passthrough", "lean+recorder record",
                         "mitmdump+recorder record"}  # fmt: skip
    assert all(r["n"] > 0 and r["p50_ms"] >= 200 for r in ttft.values())  # the upstream's pace

    for row in result["cold_start"]:
        assert row["seconds"] > 0 and row["rss_mb"] > 0, row
    assert {r["start"] for r in result["cold_start"]} == {"first start", "restart"}

    soak = result["soak"]
    assert soak["replays"] >= 500 and soak["errors"] == 0
    assert soak["rss_after_mb"] > 0 and "ratios" in result


def test_bench_falls_back_to_its_own_load_generator_without_wrk(tmp_path):
    result = run_bench(tmp_path, "--only", "soak", env={"BENCH_NO_WRK": "1"})
    assert result["soak"]["replays"] >= 500 and result["soak"]["errors"] == 0
