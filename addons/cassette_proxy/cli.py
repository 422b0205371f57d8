"""``cassette-proxy``: run the proxy, and look after a folder of cassettes.

Exit codes, for every command: 0 done; 1 the command ran and found or hit a problem
(``verify`` found errors, a file could not be read or written, no such cassette);
2 bad usage (an unknown option, a missing file given on the command line). ``run``
returns the proxy's own status: 0 after a clean stop, 1 when it could not start
(port in use), 2 for an option it does not know, a bad value, or replay from a folder
that does not exist.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from . import __version__, answers, catalog, sequence
from .store import key_of

DEFAULT_DIR = "cassettes"
PREFIX = answers.PREFIX  # every error line starts with it
MODES = ("auto", "record", "replay", "record-if-missing", "passthrough")

dir_option = click.option(
    "--cassette-dir",
    "-d",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    envvar="CASSETTE_DIR",
    help="Folder of cassettes (env CASSETTE_DIR).",
)


class Commands(click.Group):
    """The command group, with one error prefix for every command: ``cassette-proxy: ``,
    for click's usage errors too (they said ``Error:``, the proxy ``cassette-proxy:``)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            returned = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            where = f"{e.ctx.command_path} --help" if e.ctx is not None else "--help"
            click.echo(f"{PREFIX}{e.format_message()} (see {where})", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"{PREFIX}{e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo(f"{PREFIX}aborted", err=True)
            sys.exit(1)
        sys.exit(returned if isinstance(returned, int) else 0)


@click.group(
    cls=Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="cassette-proxy")
def cli() -> None:
    """Record LLM inference traffic into cassettes and replay it offline.

    Exit codes: 0 done, 1 a problem was found or hit, 2 bad usage.
    """


def main(argv: Sequence[str] | None = None) -> None:
    if argv is None and _optimize_run(sys.argv[1:]):
        # `run` under -O: mitmproxy checks the type of every header and body it sets with
        # asserts, a real part of its time per request (docs/benchmarks.md). asserts are
        # compiled out or not when a module is first imported, so the process starts
        # again, once, before mitmproxy is imported. PYTHONOPTIMIZE=0 keeps them.
        env = dict(os.environ, PYTHONOPTIMIZE="1")
        argv0 = [sys.executable, "-m", "cassette_proxy.cli", *sys.argv[1:]]
        try:
            os.execve(sys.executable, argv0, env)
        except OSError:
            pass  # run as we are: slower, not wrong
    cli.main(args=list(argv) if argv is not None else None, prog_name="cassette-proxy")


def _optimize_run(args: Sequence[str]) -> bool:
    return (
        bool(args)
        and args[0] == "run"
        and not sys.flags.optimize
        and "PYTHONOPTIMIZE" not in os.environ
        and "mitmproxy" not in sys.modules
    )


# ---- helpers ---------------------------------------------------------------------------


@contextmanager
def progress[T](items: Sequence[T], label: str, minimum: int = 201) -> Iterator[Iterable[T]]:
    """A progress bar on stderr for long work, when a person is watching."""
    if len(items) >= minimum and sys.stderr.isatty():
        with click.progressbar(items, label=label, file=sys.stderr) as bar:
            yield bar
    else:
        yield items


def fail(message: str) -> click.ClickException:
    return click.ClickException(message)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "K", "M"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}G"


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    right = set(right)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def no_folder(path: Path) -> click.UsageError:
    """A folder (or file) that is not there: bad usage (exit 2) for every command, given
    as -d, $CASSETTE_DIR or an argument (``run --mode replay`` says the same)."""
    return click.UsageError(f"no cassette folder at {path}")


def read_folder(cassette_dir: Path, label: str = "reading cassettes") -> list[catalog.Item]:
    if not cassette_dir.exists():
        raise no_folder(cassette_dir)
    paths = catalog.cassette_paths(cassette_dir)
    with progress(paths, label) as bar:
        return [catalog.load_item(p, cassette_dir) for p in bar]


def read_roots(
    paths: Sequence[Path], cassette_dir: Path, label: str = "reading cassettes"
) -> list[catalog.Item]:
    """The cassettes of PATH arguments (files or folders), or of the -d folder."""
    roots = list(paths) or [cassette_dir]
    items: list[catalog.Item] = []
    for root in roots:
        found = read_folder(root, label)
        if len(roots) > 1 and root.is_dir():
            for item in found:  # names relative to their own root would be ambiguous
                item.rel = str(root / item.rel)
        items += found
    return items


paths_argument = click.argument(
    "paths", nargs=-1, type=click.Path(path_type=Path), metavar="[PATH]..."
)


def report_bad(items: Iterable[catalog.Item]) -> int:
    bad = 0
    for item in items:
        if item.cassette is None:
            bad += 1
            click.echo(f"warning: skipped {item.rel}: {item.error}", err=True)
    return bad


# ---- ls --------------------------------------------------------------------------------


@cli.command("ls")
@paths_argument
@dir_option
@click.option("--endpoint", "-e", help="Only endpoints containing this text.")
@click.option("--model", "-m", help="Only models containing this text.")
@click.option("--test", "-t", "test", help="Only test ids containing this text.")
@click.option("--streamed/--not-streamed", default=None, help="Only streamed / whole answers.")
@click.option("--wide", "-w", is_flag=True, help="Do not shorten long cells.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def ls_command(
    paths: tuple[Path, ...],
    cassette_dir: Path,
    endpoint: str | None,
    model: str | None,
    test: str | None,
    streamed: bool | None,
    wide: bool,
    as_json: bool,
) -> None:
    """List cassettes, oldest first: file, when recorded, endpoint, model, streamed,
    chunks, size, test id, and the start of the last user message (or input).

    On a terminal FILE is the shortest prefix that names the file alone (paste it
    into `show`); piped, it is the whole name. Lists PATHS, or the cassette folder.

    \b
    Example:
      cassette-proxy ls --endpoint chat --streamed
    """
    items = read_roots(paths, cassette_dir)
    report_bad(items)
    rows: list[dict[str, Any]] = []
    for item in sorted(items, key=lambda i: (_recorded(i), i.rel)):
        if item.cassette is None:
            continue
        s = catalog.summarize(item.cassette)
        if endpoint and endpoint not in s.endpoint:
            continue
        if model and model not in s.model:
            continue
        if test and test not in (s.test_id or ""):
            continue
        if streamed is not None and s.streamed != streamed:
            continue
        rows.append(
            {
                "file": item.rel,
                "recorded": _when(_recorded(item)),
                "method": s.method,
                "endpoint": s.endpoint,
                "model": s.model,
                "kind": s.kind,
                "streamed": s.streamed,
                "chunks": s.chunks,
                "size": item.size,
                "test_id": s.test_id,
                "prompt": clip(catalog.prompt_of(item.cassette), 200),
            }
        )
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo("no cassettes match", err=True)
        return
    terminal = sys.stdout.isatty() and not wide
    names = _unique_prefixes([i.path.name for i in items]) if terminal else {}

    def cut(text: str, width: int) -> str:
        return clip(text, width) if terminal else text

    cells = [
        [
            names.get(Path(r["file"]).name, r["file"]),
            r["recorded"][:16].replace("T", " "),
            f"{r['method']} {r['endpoint']}",
            cut(r["model"], 32) or "-",
            "yes" if r["streamed"] else "no",
            str(r["chunks"]) if r["streamed"] else "-",
            human_size(r["size"]),
            cut(r["test_id"] or "-", 48),
            clip(r["prompt"], 10_000 if wide else 40) or "-",
        ]
        for r in rows
    ]
    headers = ["FILE", "RECORDED", "ENDPOINT", "MODEL", "STREAMED", "CHUNKS", "SIZE", "TEST ID",
               "PROMPT"]  # fmt: skip
    click.echo(table(headers, cells, right=(5, 6)))
    click.echo(f"{len(rows)} cassette(s)", err=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _recorded(item: catalog.Item) -> float:
    """When a cassette was recorded: its answer's own time, or else when it was written."""
    when = catalog.recorded_at(item.cassette) if item.cassette is not None else None
    return when if when is not None else _mtime(item.path)


def _when(stamp_s: float) -> str:
    """A time, local, to the second."""
    stamp = datetime.fromtimestamp(stamp_s).astimezone()
    return stamp.isoformat(timespec="seconds")


def _unique_prefixes(names: Sequence[str], shortest: int = 8) -> dict[str, str]:
    """Each file name's shortest prefix (without .json) that no other name starts with.

    Two files of the same name (in two test folders) keep their whole names: `show`
    then needs a path.
    """
    stems = sorted(n.removesuffix(".json") for n in names)
    out: dict[str, str] = {}
    for i, stem in enumerate(stems):
        need = shortest
        for j in (i - 1, i + 1):
            if 0 <= j < len(stems):
                other = stems[j]
                common = len(os.path.commonprefix([stem, other]))
                need = max(need, common + 1)
        out[stem + ".json"] = stem if need >= len(stem) else stem[:need]
    return out


# ---- show ------------------------------------------------------------------------------


def find_cassette(target: str, cassette_dir: Path) -> catalog.Item:
    """A cassette by its path, or by a prefix of its file name or of its request key."""
    path = Path(target)
    if path.is_file():
        item = catalog.load_item(path, path.parent)
        item.rel = str(path)
        return item
    # A name cut by a table ("0806aef4…") is pasted with its ellipsis.
    wanted = target.rstrip("…").removesuffix(".json").lower()
    if len(wanted) < 4:
        raise fail(f"no file {target}, and {target!r} is too short a prefix (give 4 or more)")
    if not cassette_dir.is_dir():
        raise fail(f"no file {target}, and no cassette folder at {cassette_dir} to search")
    matches: list[catalog.Item] = []
    for item in read_folder(cassette_dir, "searching"):
        if item.path.name.lower().startswith(wanted) or item.rel.lower().startswith(wanted):
            matches.append(item)
        elif item.cassette is not None and _key(item).startswith(wanted):
            matches.append(item)
    if not matches:
        raise fail(f"no cassette matches {target} in {cassette_dir} (by file name or key)")
    exact = [m for m in matches if m.path.name.lower() == wanted + ".json"]
    if len(matches) > 1 and len(exact) == 1:
        return exact[0]  # a whole file name: not its later answers (<name>.2.json, ...)
    if len(matches) > 1:
        names = ", ".join(m.rel for m in matches[:5])
        more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
        raise fail(f"ambiguous: {len(matches)} match {target}: {names}{more}; give more of it")
    return matches[0]


def _key(item: catalog.Item) -> str:
    assert item.cassette is not None
    session = catalog.session_key_of(item.cassette)
    if session is not None:  # what a session miss names (its x-cassette-miss header)
        return session
    try:
        return key_of(item.cassette)[0]
    except Exception:  # noqa: BLE001 - a cassette that cannot be keyed has no key to match
        return ""


def shorten(value: Any, limit: int = 300) -> Any:
    """Long strings (base64 images, long prompts) cut for reading."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"… ({len(value)} chars)"
    if isinstance(value, dict):
        return {k: shorten(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [shorten(v, limit) for v in value]
    return value


@cli.command("show")
@click.argument("target", metavar="FILE|KEY")
@dir_option
@click.option("--full", is_flag=True, help="Do not shorten long strings.")
@click.option("--json", "as_json", is_flag=True, help="The readable view as JSON.")
@click.option("--raw", is_flag=True, help="The file as it is.")
def show_command(target: str, cassette_dir: Path, full: bool, as_json: bool, raw: bool) -> None:
    """Show a cassette: its request, and its response made readable.

    FILE|KEY is a path, or the first characters of a cassette's file name or of its
    request key (the one in a miss's x-cassette-miss header). Streamed text and tool
    calls are put back together.

    \b
    Example:
      cassette-proxy show 0806aef4
    """
    item = find_cassette(target, cassette_dir)
    if raw:
        click.echo(item.path.read_text(encoding="utf-8", errors="replace"), nl=False)
        return
    if item.cassette is None:
        raise fail(item.error or f"{item.rel} is not a cassette")
    cassette = item.cassette
    request = cassette.request
    body = catalog.request_body_of(request)
    view = catalog.reassemble(cassette)
    if not full:
        # Long strings (base64 images, long prompts) are cut; the answer itself is not.
        body = shorten(body)
        for name in ("body", "data"):
            if name in view:
                view[name] = shorten(view[name])
        if isinstance(view.get("body"), list) and len(view["body"]) > 40:
            view["body"] = [*view["body"][:40], f"… {len(view['body']) - 40} more (--full)"]
    s = catalog.summarize(cassette)
    if as_json:
        doc = {
            "file": item.rel,
            "key": _key(item),
            "test_id": cassette.test_id,
            "answer": dict(zip(("position", "of"), sequence.position_in(item.path), strict=True)),
            "request": {
                "method": s.method,
                "url": request.url,
                "endpoint": s.endpoint,
                "body": body,
            },
            "response": view,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"file      {item.rel}")
    click.echo(f"request   {s.method} {request.url or s.endpoint}")
    click.echo(f"key       {_key(item) or '-'}")
    click.echo(f"test id   {cassette.test_id or '-'}")
    position, answers = sequence.position_in(item.path)
    if answers > 1:
        click.echo(f"answer    {position} of {answers} (identical requests, in recorded order)")
    click.echo(f"model     {s.model or '-'}")
    click.echo("body")
    click.echo(_indent(json.dumps(body, indent=2, ensure_ascii=False)))
    click.echo("")
    click.echo(render_view(view))


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def render_view(view: dict[str, Any]) -> str:
    """The reassembled response as lines for a person."""
    kind = view.get("kind")
    head = f"response  {kind}"
    if "chunks" in view:
        head += f", streamed in {view['chunks']} chunks"
    if view.get("status"):
        head += f", status {view['status']}"
    lines = [head]
    if kind == "error":
        lines.append(_indent(str(view.get("message"))))
    if kind == catalog.SESSION_KIND:  # a WebSocket session (docs/sessions.md)
        frames = view.get("frames") or {}
        lines.append(f"  frames: {frames.get('client', 0)} from the client, "
                     f"{frames.get('server', 0)} from the server")  # fmt: skip
        lines.append(f"  client events: {', '.join(view.get('client_events') or []) or '-'}")
        close = view.get("close") or {}
        lines.append(f"  closed by the {close.get('by', '?')} (code {close.get('code')})")
    if kind == catalog.EVENTSTREAM_KIND:  # AWS eventstream (Bedrock)
        lines.append(f"  events: {', '.join(view.get('events') or []) or '-'}")
        if view.get("stop_reason"):
            lines.append(f"  stop reason: {view['stop_reason']}")
    for choice in view.get("choices", []):
        finish = choice.get("finish_reason")
        lines.append(f"  choice {choice['index']}" + (f" (finish: {finish})" if finish else ""))
        if choice.get("reasoning"):
            lines.append("    reasoning:")
            lines.append(_indent(choice["reasoning"], "      "))
        if choice.get("text"):
            lines.append("    text:")
            lines.append(_indent(choice["text"], "      "))
        for call in choice.get("tool_calls", []):
            lines.append(f"    tool call {call['name']} (id {call['id']}):")
            lines.append(_indent(call["arguments"], "      "))
    if "text" in view and kind not in ("raw", "raw-stream"):
        if view.get("thinking"):
            lines.append("  thinking:")
            lines.append(_indent(view["thinking"], "    "))
        lines.append("  text:")
        lines.append(_indent(view["text"], "    "))
        for call in view.get("tool_calls", []):
            lines.append(f"  tool call: {json.dumps(call)}")
    if "models" in view:
        lines.append(f"  {len(view['models'])} models:")
        lines += [f"    {m}" for m in view["models"]]
    if "embeddings" in view:
        lines.append(f"  {view['embeddings']} embedding(s) of {view.get('dimensions')} dimensions")
    if kind in ("raw", "raw-stream"):
        if view.get("text"):
            lines.append("  text (from the stream's deltas):")
            lines.append(_indent(view["text"], "    "))
        lines.append(_indent(json.dumps(view.get("body"), indent=2, ensure_ascii=False)))
    elif "data" in view:
        lines.append(_indent(json.dumps(view["data"], indent=2, ensure_ascii=False)))
    if view.get("usage"):
        usage = ", ".join(f"{k} {v}" for k, v in view["usage"].items())
        lines.append(f"usage     {usage}")
    return "\n".join(lines)


# ---- verify ----------------------------------------------------------------------------


@cli.command("verify")
@paths_argument
@dir_option
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@click.option("--quiet", "-q", is_flag=True, help="Print only problems and the total.")
def verify_command(paths: tuple[Path, ...], cassette_dir: Path, strict: bool, quiet: bool) -> None:
    """Check cassettes: each parses, its types load, its name is its request's hash.

    Errors (exit 1): a file that is not a cassette, a type that does not exist, data
    that is not an object. Warnings (exit 0 unless --strict): a name that is not the
    hash of its request, two files answering the same request for the same test,
    data that only loads leniently (as the SDKs load it), types not checked because
    their package is not installed. Checks PATHS, or the cassette folder.

    \b
    Example (CI):
      cassette-proxy verify --cassette-dir tests/cassettes
    """
    items = read_roots(paths, cassette_dir, "verifying")
    errors = warnings = 0
    seen: dict[tuple[str, str | None, int], str] = {}
    lines: list[str] = []  # printed after the progress bar, not through it
    with progress(items, "checking") as bar:
        for item in bar:
            found = catalog.verify_item(item)
            if item.cassette is not None and not found.errors:
                # Later answers of one request (<hash>.<n>.json) share its key by design.
                key = (_key(item), item.cassette.test_id, sequence.position_of(item.path))
                if key in seen:
                    found.warnings.append(f"answers the same request as {seen[key]}")
                else:
                    seen[key] = item.rel
            errors += len(found.errors)
            warnings += len(found.warnings)
            # Each file's name once, its findings after it.
            findings = [f"error: {m}" for m in found.errors]
            findings += [f"warning: {m}" for m in found.warnings]
            if findings:
                lines.append(f"{item.rel}: " + "; ".join(findings))
    for line in lines:
        click.echo(line)
    verdict = f"{len(items)} cassette(s): {errors} error(s), {warnings} warning(s)"
    click.echo(verdict, err=quiet)
    if errors or (strict and warnings):
        sys.exit(1)


# ---- stats -----------------------------------------------------------------------------


@cli.command("stats")
@paths_argument
@dir_option
@click.option("--json", "as_json", is_flag=True, help="The numbers as JSON.")
def stats_command(paths: tuple[Path, ...], cassette_dir: Path, as_json: bool) -> None:
    """Counts by endpoint and by model, and the tokens recorded (from ``usage``), of
    PATHS or of the cassette folder.

    \b
    Example:
      cassette-proxy stats
    """
    items = read_roots(paths, cassette_dir)
    bad = report_bad(items)
    by_endpoint: Counter[str] = Counter()
    by_model: Counter[str] = Counter()
    tokens_by_model: dict[str, Counter[str]] = {}
    tokens: Counter[str] = Counter()
    streamed = total_bytes = tests = 0
    test_ids: set[str] = set()
    for item in items:
        if item.cassette is None:
            continue
        s = catalog.summarize(item.cassette)
        by_endpoint[f"{s.method} {s.endpoint}"] += 1
        by_model[s.model or "-"] += 1
        tokens.update(s.usage)
        tokens_by_model.setdefault(s.model or "-", Counter()).update(s.usage)
        streamed += s.streamed
        total_bytes += item.size
        if s.test_id:
            test_ids.add(s.test_id)
    tests = len(test_ids)
    count = sum(by_endpoint.values())
    if as_json:
        doc = {
            "cassettes": count,
            "unreadable": bad,
            "streamed": streamed,
            "bytes": total_bytes,
            "tests": tests,
            "by_endpoint": dict(by_endpoint.most_common()),
            "by_model": dict(by_model.most_common()),
            "tokens": dict(tokens),
            "tokens_by_model": {m: dict(c) for m, c in tokens_by_model.items() if c},
        }
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(
        f"{count} cassette(s), {streamed} streamed, {human_size(total_bytes)}, "
        f"{tests} test id(s)" + (f", {bad} unreadable" if bad else "")
    )
    click.echo("")
    click.echo(
        table(
            ["ENDPOINT", "CASSETTES"],
            [[e, str(n)] for e, n in by_endpoint.most_common()],
            right=(1,),
        )
    )
    click.echo("")
    rows = []
    for model, n in by_model.most_common():
        used = tokens_by_model.get(model, Counter())
        rows.append(
            [model, str(n)]
            + [
                str(used[k]) if k in used else "-"
                for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            ]
        )
    click.echo(
        table(
            ["MODEL", "CASSETTES", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL TOKENS"],
            rows,
            right=(1, 2, 3, 4),
        )
    )
    click.echo("")
    click.echo(
        f"tokens recorded: {tokens['prompt_tokens']} prompt, "
        f"{tokens['completion_tokens']} completion, {tokens['total_tokens']} total"
    )


# ---- prune -----------------------------------------------------------------------------


@cli.command("prune")
@click.argument(
    "folder", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@dir_option
@click.option(
    "--usage-log",
    "-u",
    "usage_logs",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A usage log written by `run --usage-log` (repeatable: their union is kept).",
)
@click.option("--yes", "-y", is_flag=True, help="Delete. Without it, only list what would go.")
def prune_command(
    folder: Path | None, cassette_dir: Path, usage_logs: tuple[Path, ...], yes: bool
) -> None:
    """Remove cassettes that no logged session used. A dry run unless --yes.

    FOLDER (or -d) is the cassette folder the logged proxy ran with; a log written
    for another folder, or naming none of this one's cassettes, is refused.

    Run the proxy (or the test suite's proxy) with a usage log for a full session,
    then prune with that log: every cassette that contributed to no answer of the
    session is listed, and deleted with --yes. Used means served, recorded, kept (a
    success the live upstream's error did not replace), merged into a served model
    list, or an earlier answer of a used sequence. Only valid cassettes are
    candidates: other JSON files in the folder are never removed.

    \b
    Example:
      cassette-proxy run --usage-log used.log    # run the whole suite through it
      cassette-proxy prune --usage-log used.log  # look
      cassette-proxy prune --usage-log used.log --yes
    """
    from .contributions import contributing
    from .usage import read_usage

    cassette_dir = folder or cassette_dir
    if not cassette_dir.is_dir():
        raise fail(f"no cassette folder at {cassette_dir}")
    usage = read_usage(usage_logs, cassette_dir)
    if usage.malformed:
        click.echo(
            f"warning: {usage.malformed} line(s) of the usage log(s) not understood", err=True
        )
    folder = cassette_dir.resolve()
    if usage.folders and folder not in usage.folders:
        logged = ", ".join(str(f) for f in sorted(usage.folders))
        raise fail(
            f"the usage log(s) were written for {logged}, not {folder}; refusing to prune "
            f"(give that folder with -d)"
        )
    # Only valid cassettes are candidates: any other JSON file (test data, a config, a
    # cassette broken by hand) is never removed.
    items = read_folder(cassette_dir, "reading")
    cassettes = {i.path.resolve(): i.cassette for i in items if i.cassette is not None}
    others = [i for i in items if i.cassette is None]
    if others:
        click.echo(f"{len(others)} file(s) not cassettes: never removed", err=True)
    used = contributing(usage.used, cassettes)
    paths = [i.path for i in items if i.cassette is not None]
    unused = [p for p in paths if p.resolve() not in used]
    kept = len(paths) - len(unused)
    if not kept:
        raise fail(
            f"the usage log(s) name none of the {len(paths)} cassette(s) in {cassette_dir}; "
            "refusing to prune everything (is -d the folder the proxy ran with?)"
        )
    root = cassette_dir
    for path in unused:
        click.echo(f"{'removing' if yes else 'would remove'} {path.relative_to(root)}")
    if not yes:
        click.echo(
            f"{len(unused)} unused, {kept} used; nothing removed (dry run: add --yes)", err=True
        )
        return
    click.echo(
        f"{len(unused)} of {len(paths)} cassette(s) in {cassette_dir} go, {kept} stay", err=True
    )
    failed = 0
    with progress(unused, "removing") as bar:
        for path in bar:
            try:
                path.unlink()
            except OSError as e:
                failed += 1
                click.echo(f"{PREFIX}cannot remove {path}: {e.strerror or e}", err=True)
    _remove_empty_folders(cassette_dir)
    click.echo(f"{len(unused) - failed} removed, {kept} kept", err=True)
    if failed:
        sys.exit(1)


def _remove_empty_folders(root: Path) -> None:
    for dirpath, _dirnames, _filenames in sorted(os.walk(root), key=lambda w: -len(w[0])):
        folder = Path(dirpath)
        if folder != root and not folder.name.startswith("."):
            try:
                folder.rmdir()  # only succeeds when empty
            except OSError:
                pass


# ---- import ----------------------------------------------------------------------------


@cli.command("import")
@click.argument(
    "sources", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@dir_option
@click.option("--test-id", help="Record every interaction under this test id.")
@click.option(
    "--record-header",
    "record_headers",
    multiple=True,
    help="Request header to keep, by name (repeatable). Credentials never are.",
)
@click.option("--overwrite", is_flag=True, help="Replace cassettes that already exist.")
def import_command(
    sources: tuple[Path, ...],
    cassette_dir: Path,
    test_id: str | None,
    record_headers: tuple[str, ...],
    overwrite: bool,
) -> None:
    """Turn mitmproxy flow files (mitmdump -w), HAR files or VCR.py / pytest-recording
    cassettes (YAML or JSON) into cassettes.

    Every HTTP interaction with a JSON request is recorded as the proxy would have
    recorded it, under the same file name, credentials redacted the same way. The same
    request more than once is a sequence (<h>.json, <h>.2.json, ...), replayed in
    order. Answers the proxy itself gave (replays, misses), 5xx and 408/409/429
    answers, and streams cut short are skipped. Streamed answers are in a flow file
    only if mitmproxy kept them (--set store_streamed_bodies=true). A request already
    recorded is left alone; --overwrite replaces it, its whole sequence.

    \b
    Example:
      mitmdump -w traffic.flows --set store_streamed_bodies=true
      cassette-proxy import traffic.flows session.har tests/cassettes/test_chat.yaml
    """
    from .importer import import_flows, read_flows

    written: list[Path] = []
    removed: list[Path] = []
    skipped: Counter[str] = Counter()
    for source in sources:
        try:
            flows = read_flows(source)
        except ValueError as e:
            raise fail(f"{source}: {e}") from None
        with progress(flows, f"importing {source.name}") as bar:
            result = import_flows(
                bar,
                cassette_dir,
                test_id=test_id,
                record_headers=list(record_headers),
                overwrite=overwrite,
            )
        written += result.written
        removed += result.removed
        skipped.update(result.skipped)
        for problem in result.failed:
            click.echo(f"{PREFIX}{problem}", err=True)
        if result.failed:
            raise fail(f"{len(result.failed)} cassette(s) from {source} could not be written")
    for path in written:
        click.echo(f"imported {path}")
    for path in removed:
        click.echo(f"removed {path} (a later answer of the sequence replaced)")
    detail = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
    click.echo(
        f"{len(written)} imported, {sum(skipped.values())} skipped"
        + (f" ({detail})" if detail else ""),
        err=True,
    )


# ---- drift -----------------------------------------------------------------------------


def _header(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for spec in values:
        name, sep, value = spec.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise click.BadParameter(f"{spec!r} is not 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def _upstream(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL")
    return value


@cli.command("drift")
@paths_argument
@dir_option
@click.option(
    "--upstream",
    metavar="URL",
    callback=_upstream,
    help="Send every request here (base URL) instead of its recorded host.",
)
@click.option(
    "--header",
    "headers",
    multiple=True,
    callback=_header,
    metavar="'NAME: VALUE'",
    help="A header to send with every request (repeatable), e.g. credentials.",
)
@click.option(
    "--ignore",
    "ignore",
    multiple=True,
    metavar="PATH",
    help="A field not to compare, and all below it (repeatable): usage, choices.logprobs, *.id.",
)
@click.option(
    "--timeout", type=float, default=120.0, show_default=True, help="Seconds per request."
)
def drift_command(
    paths: tuple[Path, ...],
    cassette_dir: Path,
    upstream: str | None,
    headers: dict[str, str],
    ignore: tuple[str, ...],
    timeout: float,
) -> None:
    """Send each cassette's request to the live upstream and say what changed shape.

    Compares field names and JSON types (values ignored; list items as one shape; int
    and float are both numbers; null is no type), each chunk of a stream, and the
    status. Prints, per cassette that drifted: +field (new), -field (gone),
    field: int -> string. Exit 0 when nothing drifted, 1 when something did (or an
    upstream could not be reached), 2 on bad usage. Writes nothing; requests go
    straight to the upstream, not through any proxy. Credentials come only from
    --header, or OPENAI_API_KEY in the environment (as Authorization: Bearer).

    \b
    Example:
      cassette-proxy drift -d tests/cassettes --upstream http://127.0.0.1:8000 \\
        --ignore system_fingerprint
    """
    from . import drift

    items = [i for i in read_roots(paths, cassette_dir, "reading") if i.cassette is not None]
    send = drift.credentials_from_env()
    if any(name.lower() == "authorization" for name in headers):
        send = {}
    send.update(headers)
    drifted = unchanged = failed = 0
    results: list[drift.Result] = []
    with progress(items, "drift", minimum=2) as bar:
        for item in bar:
            assert item.cassette is not None
            result = drift.check(
                item.cassette, item.rel, upstream=upstream, headers=send, ignore=ignore,
                timeout=timeout,
            )  # fmt: skip
            results.append(result)
    for result in results:
        if result.error:
            failed += 1
            click.echo(f"error  {result.file}: {result.error}")
        elif result.changes:
            drifted += 1
            click.echo(f"drift  {result.file}  {result.url}")
            for change in result.changes:
                click.echo(f"  {change}")
        else:
            unchanged += 1
    click.echo(
        f"{len(results)} cassette(s): {drifted} drifted, {unchanged} unchanged"
        + (f", {failed} not checked" if failed else ""),
        err=True,
    )
    if drifted or failed:
        sys.exit(1)


# ---- run -------------------------------------------------------------------------------


def _setting(sets: Sequence[str], name: str) -> str | None:
    """The last value given to a mitmproxy option in ``name=value`` settings."""
    value = None
    for spec in sets:
        key, sep, rest = spec.partition("=")
        if sep and key == name:
            value = rest
    return value


_CHATTER = ("client connect", "client disconnect", "server connect", "server disconnect")


def _no_connection_chatter(record: logging.LogRecord) -> bool:
    """Hide the connect/disconnect lines, keep the rest: a client's protocol error
    (curl's ``authorization: Bearer `` over HTTP/2) is logged there too, at info."""
    return record.levelno > logging.INFO or not record.getMessage().startswith(_CHATTER)


def _client_host(listen_host: str) -> str:
    return "127.0.0.1" if listen_host in ("", "0.0.0.0", "::") else listen_host


def _ca_cert(confdir: Path) -> Path | None:
    """mitmproxy's CA certificate in ``confdir``, made now if it is not there yet."""
    try:
        from mitmproxy.certs import CertStore

        CertStore.from_store(confdir, "mitmproxy", 2048)
    except Exception:  # noqa: BLE001 - the proxy reports it properly when it starts
        return None
    return confdir / "mitmproxy-ca-cert.pem"


def client_lines(url: str, reverse: str | None, ca: Path | None) -> list[str]:
    """What a client needs, as lines to paste into a shell."""
    if reverse:
        lines = [
            f"# reverse proxy to {reverse}: send requests to {url} instead",
            f"export OPENAI_BASE_URL={url}/v1",
        ]
        if not os.environ.get("OPENAI_API_KEY"):
            # The openai SDKs refuse to start without a key; replay needs none.
            lines.append("export OPENAI_API_KEY=sk-placeholder")
        return lines
    lines = [
        f"export {name}={url}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    ]
    if ca is not None:
        lines += [
            f"export {name}={ca}"
            for name in ("SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE")
        ]
    return lines


# run's own options and the mitmproxy option each one sets.
_OWN_OPTIONS = {
    "mode": ("--mode", "cassette_mode"),
    "cassette_dir": ("--cassette-dir", "cassette_dir"),
    "listen_host": ("--listen-host", "listen_host"),
    "listen_port": ("--listen-port", "listen_port"),
    "reverse": ("--reverse", "mode"),
    "confdir": ("--confdir", "confdir"),
    "usage_log": ("--usage-log", "cassette_usage_log"),
}


def _defaulted(ctx: click.Context) -> bool:
    """No folder was asked for: neither -d, $CASSETTE_DIR nor --set cassette_dir."""
    given = ctx.get_parameter_source("cassette_dir") != click.core.ParameterSource.DEFAULT
    return not given and _setting(ctx.params["sets"], "cassette_dir") is None


def _in_own_clone(folder: Path) -> Path | None:
    """The folder, absolute, when it does not exist yet and would be made inside the clone
    this package runs from (an editable install); None otherwise."""
    clone = Path(__file__).resolve().parents[2]
    if not (clone / "pyproject.toml").is_file() or not (clone / "addons").is_dir():
        return None  # installed from a wheel: there is no clone to protect
    where = folder.expanduser().absolute()
    if where.exists() or not where.is_relative_to(clone) or where == clone / DEFAULT_DIR:
        return None  # the shipped cassettes/ folder is the clone's own, asked for by the README
    return where


def _conflict(ctx: click.Context, settings: Sequence[str], sets: Sequence[str]) -> str | None:
    """Two values for one setting (``--mode replay --set cassette_mode=record``): which
    one was meant cannot be guessed, so the command names both and stops."""
    explicit = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    for param, (flag, name) in _OWN_OPTIONS.items():
        if ctx.get_parameter_source(param) not in explicit:
            continue
        ours = _setting(settings, name)
        theirs = _setting(sets, name)
        if theirs is not None and ours is not None and theirs != ours:
            shown = ctx.params[param]
            return f"{flag} {shown} and --set {name}={theirs} disagree; give only one of them"
    return None


def _cassette_mode(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in MODES:
        return value
    choices = ", ".join(MODES)
    if value.startswith(("reverse", "regular", "upstream", "socks5", "transparent", "wire")):
        url = value.removeprefix("reverse").removeprefix(":") or "URL"
        hint = f"; for reverse mode use --reverse {url}" if value.startswith("reverse") else ""
        raise click.BadParameter(
            f"{value!r} is a mitmproxy proxy mode; --mode is the cassette mode ({choices}){hint}"
        )
    raise click.BadParameter(f"{value!r} is not one of {choices}")


@cli.command("run", context_settings={"show_default": True})
@click.option(
    "--mode",
    default="auto",
    callback=_cassette_mode,
    metavar="[" + "|".join(MODES) + "]",
    help="What to do with each request (the cassette mode; see the README's Modes).",
)
@dir_option
@click.option("--listen-host", default="127.0.0.1", help="Address to listen on.")
@click.option(
    "--listen-port", "-p", type=click.IntRange(1, 65535), default=8080, help="Port to listen on."
)
@click.option("--reverse", metavar="URL", help="Reverse mode: act as this upstream (base URL).")
@click.option(
    "--confdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="mitmproxy's folder (its CA). [default: ~/.mitmproxy]",
)
@click.option(
    "--usage-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Log the cassettes used, for `prune`.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="NAME=VALUE",
    help="Any mitmproxy or cassette option (repeatable).",
)
@click.option(
    "--full",
    is_flag=True,
    help="Host the addon in mitmdump's full master (its options, -w) instead of the lean one.",
)
@click.option("--quiet", "-q", is_flag=True, help="Log warnings and errors only.")
@click.option("--verbose", "-v", is_flag=True, help="Log debug lines too.")
def run_command(
    mode: str,
    cassette_dir: Path,
    listen_host: str,
    listen_port: int,
    reverse: str | None,
    confdir: Path | None,
    usage_log: Path | None,
    sets: tuple[str, ...],
    full: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Start the proxy. Stop it with Ctrl-C (or SIGTERM); it prints a summary.

    Once it listens it prints the lines a client needs (proxy variables and the CA
    certificate for curl, Python and Node), then logs one line per interaction: mode,
    hit / miss / recorded / fallback, key prefix and file. --mode replay refuses a
    folder that does not exist (exit 2); the modes that record create it. A port in
    use is exit 1.

    \b
    Examples:
      cassette-proxy run
      cassette-proxy run --mode replay --cassette-dir tests/cassettes
      cassette-proxy run --reverse http://127.0.0.1:8000 --listen-port 8001
    """
    from .addon import CassetteRecorder
    from .lean import run_proxy

    for spec in sets:
        if "=" not in spec:
            raise click.BadParameter(f"{spec!r} is not NAME=VALUE", param_hint="--set")
    settings = [
        f"cassette_mode={mode}",
        f"cassette_dir={cassette_dir}",
        f"listen_host={listen_host}",
        f"listen_port={listen_port}",
    ]
    if reverse:
        settings.append(f"mode=reverse:{reverse}")
    if confdir is not None:
        settings.append(f"confdir={confdir}")
    if usage_log is not None:
        settings.append(f"cassette_usage_log={usage_log.resolve()}")
    if quiet:
        settings.append("termlog_verbosity=warning")
        if full:
            settings.append("flow_detail=0")
    elif verbose:
        settings.append("termlog_verbosity=debug")
    conflict = _conflict(click.get_current_context(), settings, sets)
    if conflict:
        click.echo(f"{PREFIX}{conflict}", err=True)
        sys.exit(2)
    # A --set of an option not given explicitly wins over its default.
    given = {spec.partition("=")[0] for spec in sets}
    settings = [spec for spec in settings if spec.partition("=")[0] not in given] + list(sets)

    listen_host = _setting(settings, "listen_host") or "127.0.0.1"
    url = f"http://{_client_host(listen_host)}:{_setting(settings, 'listen_port')}"
    proxy_mode = _setting(settings, "mode")
    reverse_to = (
        proxy_mode.removeprefix("reverse:")
        if proxy_mode and proxy_mode.startswith("reverse:")
        else None
    )
    conf = Path(_setting(settings, "confdir") or "~/.mitmproxy").expanduser()
    ca = None if reverse_to else _ca_cert(conf)
    folder = Path(_setting(settings, "cassette_dir") or DEFAULT_DIR)
    # Checked here too (the addon checks them for mitmdump): before mitmproxy starts,
    # so the one line printed is the reason, not a reload of the default folder.
    cassette_mode = _setting(settings, "cassette_mode") or "auto"
    if cassette_mode not in MODES:
        click.echo(
            f"cassette-proxy: cassette_mode must be one of {', '.join(MODES)}, "
            f"not {cassette_mode!r}",
            err=True,
        )
        sys.exit(2)
    if cassette_mode == "replay" and not folder.expanduser().exists():
        click.echo(
            f"{PREFIX}cassette folder {folder} does not exist, and replay answers "
            "only from it (check the path given to -d / CASSETTE_DIR, or record first)",
            err=True,
        )
        sys.exit(2)
    unasked = _in_own_clone(folder) if _defaulted(click.get_current_context()) else None
    if unasked is not None and cassette_mode != "passthrough":
        click.echo(
            f"{PREFIX}no cassette folder given, and the default {unasked} would be made inside "
            "cassette-proxy's own clone: give -d FOLDER (or run from your project's folder)",
            err=True,
        )
        sys.exit(2)
    banner = [
        f"# cassette-proxy {_setting(settings, 'cassette_mode')} mode, "
        f"cassettes in {folder.expanduser().absolute()}, "
        f"{'lean' if not full else 'full'} master at {url}",
        *client_lines(url, reverse_to, ca),
    ]

    def listening() -> None:
        # Only once it listens: lines to paste are a promise that something answers.
        click.echo("\n".join(banner))  # one write: a reader never sees half of it
        sys.stdout.flush()

    if not verbose:
        # mitmproxy logs every client connect and disconnect at info; `run` keeps info
        # for one line per interaction, so those lines wait for --verbose.
        logging.getLogger("mitmproxy.proxy.server").addFilter(_no_connection_chatter)
    addon = CassetteRecorder()
    addon.log_summary = False  # printed below, once
    status = run_proxy(settings, lean=not full, addon=addon, on_listening=listening)
    c = addon.counts
    if status == 0 or any(c.values()):  # not after a failed start: the error says it all
        click.echo(answers.summary_line(c))
    sys.exit(status)


if __name__ == "__main__":
    main()
