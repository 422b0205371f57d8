"""Render a benchmark result (bench-results/latest.json) as the Markdown tables of
docs/benchmarks.md: ``python bench/report.py [FILE]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(d: dict[str, Any]) -> str:
    m = d["machine"]
    out = [
        f"Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}, mitmproxy "
        f"{m['mitmproxy']}, load generator {m['load_generator'].split(' Copyright')[0]}; "
        f"load average {' '.join(m['loadavg_start'])} at start, "
        f"{' '.join(m.get('loadavg_end', []))} at the end; the run took {d['seconds']:.0f} s.",
        "",
    ]
    if "replay" in d:
        base = {
            (r["kind"], r["conns"], r["host"]): r["rps"]
            for r in d["replay"]
            if r["host"].endswith("baseline")
        }
        rows = []
        for r in d["replay"]:
            host = r["host"]
            ratio = ""
            if host.endswith("recorder"):
                b = base.get((r["kind"], r["conns"], host.split("+")[0] + "+baseline"))
                ratio = f"{r['rps'] / b:.2f}x" if b else ""
            rows.append(
                [
                    "plain JSON" if r["kind"] == "json" else "SSE, 100 chunks",
                    str(r["conns"]),
                    host,
                    f"{r['rps']:,.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    ratio,
                    "/".join(f"{x:,.0f}" for x in r.get("trials_rps", [])),
                ]
            )
        out += [
            "### Replay",
            "",
            table(
                [
                    "answer",
                    "conns",
                    "host",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "ours / baseline (same host)",
                    "trials req/s",
                ],
                rows,
            ),  # fmt: skip
            "",
        ]
    if "ablation" in d:
        rows = [
            [r["host"], f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
             "/".join(f"{x:,.0f}" for x in r.get("trials_rps", []))]
            for r in d["ablation"]
        ]  # fmt: skip
        out += [
            "### What the lean master's parts buy (baseline addon, plain JSON, 16 connections)",
            "",
            table(["host", "req/s", "p50 ms", "p99 ms", "trials req/s"], rows),
            "",
        ]
    if "record" in d:
        names = {"json": "plain JSON", "sse": "SSE, 100 chunks", "sse40": "SSE, 40 chunks",
                 "sse100": "SSE, 100 chunks"}  # fmt: skip
        passthrough = {
            (r["kind"], r["conns"]): r["rps"]
            for r in d["record"]
            if r["host"] == "lean+recorder passthrough"
        }
        rows = []
        for r in d["record"]:
            base = passthrough.get((r["kind"], r["conns"]))
            ratio = f"{r['rps'] / base:.2f}x" if base and r.get("mode") == "record" else ""
            rows.append(
                [
                    names.get(r["kind"], r["kind"]),
                    str(r.get("conns", 16)),
                    r["host"],
                    f"{r['rps']:,.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    ratio,
                    str(r.get("cpu_us_per_req", "")),
                    str(r["cassettes"]),
                    "/".join(f"{x:,.0f}" for x in r.get("trials_rps", [])),
                ]
            )
        out += [
            "### Record (every request a new cassette) against passthrough, same proxy",
            "",
            table(
                [
                    "answer",
                    "conns",
                    "host",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "record / passthrough",
                    "proxy CPU us/request",
                    "cassettes written",
                    "trials req/s",
                ],
                rows,
            ),  # fmt: skip
            "",
        ]
    for label, title in (("stall", "this code"), ("stall_before", "before (--before)")):
        if label not in d:
            continue
        st = d[label]
        rows = []
        for i, (idle, busy) in enumerate(zip(st["idle"], st["busy"], strict=True)):
            rows.append(
                [str(i), f"{idle['n']}", f"{idle['p50_ms']:.2f}", f"{idle['p99_ms']:.2f}",
                 f"{idle['max_ms']:.1f}", f"{busy['n']}", f"{busy['p50_ms']:.2f}",
                 f"{busy['p99_ms']:.2f}", f"{busy['max_ms']:.1f}", f"{busy['window_s']:.1f}",
                 str(busy["stream"].get("cassette_in_place_at_done"))]
            )  # fmt: skip
        ratio = st["busy_p99_ms"] / st["idle_p99_ms"]
        out += [
            f"### No stall ({title}): replay latency while a {st['chunks']:,}-chunk stream "
            f"and a {st['json_mb']:.0f} MB answer are recorded",
            "",
            table(
                [
                    "round",
                    "idle n",
                    "idle p50 ms",
                    "idle p99 ms",
                    "idle max ms",
                    "busy n",
                    "busy p50 ms",
                    "busy p99 ms",
                    "busy max ms",
                    "window s",
                    "stream's cassette in place at [DONE]",
                ],
                rows,
            ),  # fmt: skip
            "",
            f"Median p99: idle {st['idle_p99_ms']:.2f} ms, while recording "
            f"{st['busy_p99_ms']:.2f} ms ({ratio:.1f}x).",
            "",
        ]
    if "ttft" in d:
        t = d["ttft"]
        rows = [
            [
                r["target"],
                str(r["n"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['added_p50_ms']:+.1f}",
                f"{r['added_p99_ms']:+.1f}",
            ]
            for r in t["rows"]
        ]
        out += [
            f"### Time to first token (first event after {t['first_event_ms']} ms, then one "
            f"every {t['every_ms']} ms; {t['events']} events)",
            "",
            table(["path", "n", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms"], rows),
            "",
        ]
    if "cold_start" in d:
        rows = [
            [
                f"{r['cassettes']:,}",
                f"{r['bytes'] / 1e6:.1f} MB",
                r["host"],
                r["start"],
                f"{r['seconds']:.2f}",
                f"{r['rss_mb']:.0f}",
                "/".join(f"{x:.2f}" for x in r.get("trials_s", [])),
            ]
            for r in d["cold_start"]
        ]
        out += [
            "### Cold start (process start until the first replay is served)",
            "",
            table(
                [
                    "cassettes",
                    "on disk",
                    "host",
                    "start",
                    "seconds (median)",
                    "RSS MB (max)",
                    "trials s",
                ],
                rows,
            ),  # fmt: skip
            "",
        ]
    if "soak" in d:
        s = d["soak"]
        out += [
            "### Soak",
            "",
            f"{s['replays']:,} replays (plain and streamed, 128 cassettes, 16 connections) "
            f"in {s['seconds']:.0f} s, {s['errors']} errors: RSS {s['rss_before_mb']:.1f} MB "
            f"before, {s['rss_after_mb']:.1f} MB after ({s['growth_mb']:+.1f} MB); samples "
            + ", ".join(f"{x:.1f}" for x in s["rss_samples_mb"])
            + " MB.",
            "",
        ]
    if "record_soak" in d:
        s = d["record_soak"]
        out += [
            "### Record soak",
            "",
            f"{s['recordings']:,} recordings (256 distinct requests, plain and streamed, "
            f"recorded over and over; 16 connections) in {s['seconds']:.0f} s, "
            f"{s['errors']} errors, {s['cassettes']} cassette files: RSS "
            f"{s['rss_before_mb']:.1f} MB before, {s['rss_after_mb']:.1f} MB after "
            f"({s['growth_mb']:+.1f} MB); samples "
            + ", ".join(f"{x:.1f}" for x in s["rss_samples_mb"])
            + " MB.",
            "",
        ]
    if isinstance(d.get("profile"), dict):
        for what, p in d["profile"].items():
            if not isinstance(p, dict) or "areas_pct" not in p:
                continue
            rows = [[k, f"{v:.1f}%"] for k, v in p["areas_pct"].items() if v]
            out += [
                f"### Where the CPU goes: lean proxy, {what} ({p['samples']:,} busy samples)",
                "",
                table(["area", "share of busy samples"], rows),
                "",
            ]
    if isinstance(d.get("peers"), dict) and "table" in d["peers"]:
        out += ["### Replay against peers (reverse mode)", "", d["peers"]["table"], ""]
        out += [f"- {note}" for note in d["peers"].get("notes", [])]
    return "\n".join(out)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench-results" / "latest.json"
    print(render(json.loads(path.read_text())))
