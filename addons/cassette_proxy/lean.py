"""A lean mitmproxy master for the cassette addon: only what the proxy needs, dispatched fast.

``mitmdump`` loads ~36 built-in addons and, for every hook of every request, walks all
of them asking each for a handler (``getattr`` per addon per call) and then fires an
``update`` hook the same way. Almost none of them do anything for us, yet that walk is
about half of mitmdump's CPU per request (see docs/benchmarks.md). This master loads:

  termlog      our info/warning lines on stdout, ``termlog_verbosity``
  proxyserver  listening, connections, HTTP/1 and HTTP/2, ``mode``
  nextlayer    picks the protocol layers (without it every request hangs)
  tlsconfig    HTTPS: the CA in ``confdir`` (``~/.mitmproxy`` by default), certificates
  errorcheck   a startup error (port in use, bad option) exits with status 1
  CassetteRecorder

and resolves each hook name to its handlers once (``_HookTable``), so a hook costs one
call per addon that actually implements it. What it gives up, on purpose: mitmweb and
the console, ``-w``/``-r``, scripts and their hot reload, ``config.yaml``, the options
of the addons it does not load (asked for, they get a clear one-line error), and
``block_global`` -- so it listens on 127.0.0.1 unless told otherwise.
``run_proxy(..., lean=False)`` hosts the same addon in a full DumpMaster instead.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import inspect
import logging
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks, master, options
from mitmproxy.addons import errorcheck, next_layer, proxyserver, termlog, tlsconfig

from .addon import CassetteRecorder

log = logging.getLogger("cassette_proxy")

DEFAULT_LISTEN_HOST = "127.0.0.1"
_Handler = tuple[Callable[..., Any], bool]  # (bound hook method, is a coroutine function)


_ARG_NAMES: dict[type, tuple[str, ...]] = {}


def _hook_args(event: hooks.Hook) -> list[Any]:
    """``event.args()``: the hook's dataclass fields in order, their names looked up once
    per hook class (``dataclasses.fields`` on every call cost more than our own hooks)."""
    names = _ARG_NAMES.get(type(event))
    if names is None:
        names = _ARG_NAMES[type(event)] = tuple(f.name for f in dataclasses.fields(event))
    return [getattr(event, name) for name in names]


class _HookTable(addonmanager.AddonManager):
    """An AddonManager that resolves ``hook name -> handlers`` once, not per addon per call.

    The table is dropped whenever an addon is added or removed. Semantics kept from
    mitmproxy: chain order, async and sync handlers, ``AddonHalt`` stops the hook,
    ``OptionsError`` propagates, any other exception is logged as an addon error and
    the next handler still runs.
    """

    def __init__(self, master: master.Master) -> None:
        super().__init__(master)
        self._table: dict[str, list[_Handler]] = {}

    def register(self, addon: Any) -> Any:
        self._table.clear()
        return super().register(addon)

    def add(self, *addons: Any) -> None:
        super().add(*addons)
        self._table.clear()

    def remove(self, addon: Any) -> None:
        super().remove(addon)
        self._table.clear()

    def clear(self) -> None:
        super().clear()
        self._table.clear()

    def handlers(self, name: str) -> list[_Handler]:
        found = self._table.get(name)
        if found is None:
            found = []
            for a in addonmanager.traverse(self.chain):
                func = getattr(a, name, None)
                if func is None or not callable(func):
                    continue  # also skips modules named like a hook (``import log``)
                found.append((func, inspect.iscoroutinefunction(func)))
            self._table[name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        handlers = self.handlers(event.name)
        if not handlers:
            return
        args = _hook_args(event)
        for func, is_async in handlers:
            try:
                result = func(*args)
                if is_async or (result is not None and inspect.isawaitable(result)):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:  # noqa: BLE001 - mitmproxy's rule: log, keep serving
                log.error("Addon error: %s", e, exc_info=True)

    def trigger(self, event: hooks.Hook) -> None:
        handlers = self.handlers(event.name)
        if not handlers:
            return
        args = _hook_args(event)
        for func, is_async in handlers:
            if is_async:
                raise exceptions.AddonManagerError(
                    f"Async handler {event.name} ({func}) cannot be called from sync context"
                )
            try:
                func(*args)
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:  # noqa: BLE001
                log.error("Addon error: %s", e, exc_info=True)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        # mitmproxy follows every flow hook with an ``update`` hook for the UIs; no addon
        # here has one, so skip building it.
        if self.handlers("update"):
            (message, *_) = event.args()
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


class _TermLog(termlog.TermLog):
    """mitmproxy's termlog, plus: the root logger's level follows ``termlog_verbosity``.

    mitmproxy leaves the root logger at DEBUG and filters in each handler, so every
    ``log.info`` builds a record even when nothing prints it; here a quiet proxy skips
    that work. (errorcheck only needs ERROR, which every verbosity lets through.)
    """

    def configure(self, updated: set[str]) -> None:
        super().configure(updated)
        if "termlog_verbosity" in updated:
            logging.getLogger().setLevel(self.logger.level)


class _ErrorCheck(errorcheck.ErrorCheck):
    """errorcheck, without the extra "Error logged during startup, exiting..." line: the
    error itself is on the terminal already, in one line."""

    name = "errorcheck"

    async def shutdown_if_errored(self) -> None:
        await asyncio.sleep(0)  # as mitmproxy's: let pending log records arrive first
        if self.logger.has_errored:
            sys.exit(1)


class _PortInUse(logging.Filter):
    """mitmproxy's "address already in use" names ``--mode regular@PORT``, which is not
    how this proxy takes a port: say it in one line, naming --listen-port and PORT=."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "address already in use" in text:
            where = re.search(r"failed to listen on (\S+?):(\d+)", text)
            host, port = where.groups() if where else ("127.0.0.1", "the port")
            record.msg = (
                f"cassette-proxy: cannot listen on {host}:{port}: address already in use "
                "(another proxy running?); pick another port with --listen-port N "
                "(scripts/run: PORT=N)"
            )
            record.args = ()
        return True


class _Listening:
    """Calls back once the proxy listens (mitmproxy's ``running``: servers are up)."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def running(self) -> None:
        self.callback()


class _FreezeStartup:
    """Once the proxy listens, the objects of its start (modules, the cassette index) go
    out of the garbage collector's sight (``gc.freeze``): each full collection walked
    them all again, and at 1 connection every one was a replay's 10-40 ms p99 tail in the
    first seconds (docs/benchmarks.md). They are still freed when nothing refers to them.

    The full collection runs when the index is loaded (``configure``), before the port
    listens: at ``running`` it held a fresh proxy's first request up by ~0.1 s (issue 19,
    ``warmup.py``). ``running`` only freezes, which costs nothing."""

    def __init__(self) -> None:
        self._started = False

    def configure(self, updated: set[str]) -> None:
        if not self._started and "cassette_dir" in updated:  # the index was just loaded
            gc.collect()

    def running(self) -> None:
        self._started = True
        gc.freeze()


class LeanMaster(master.Master):
    """A mitmproxy Master with only the built-in addons the cassette proxy needs."""

    def __init__(self, opts: options.Options, *, fast_dispatch: bool = True) -> None:
        super().__init__(opts, with_termlog=False)
        if fast_dispatch:
            # Swap the manager while it is still empty.
            opts.changed.disconnect(self.addons._configure_all)
            self.addons = _HookTable(self)
        # The deprecated add_log hook costs a call_soon + a hook per log line; nothing
        # here listens to it.
        self._legacy_log_events.uninstall()
        self._termlog_addon = _TermLog()
        self.addons.add(
            self._termlog_addon,
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            _ErrorCheck(),
        )

    async def done(self) -> None:
        await self.addons.trigger_event(hooks.DoneHook())
        if self._termlog_addon is not None:
            self._termlog_addon.uninstall()


def _full_option_names() -> set[str]:
    """Every option mitmdump knows (only asked for to word an error)."""
    from mitmproxy.addons import default_addons
    from mitmproxy.addons.dumper import Dumper
    from mitmproxy.addons.keepserving import KeepServing

    opts = options.Options()

    class _Loader:
        def add_option(self, name: str, typespec: Any, default: Any, *a: Any, **k: Any) -> None:
            if name not in opts:
                opts.add_option(name, typespec, default, "")

        def add_command(self, *a: Any) -> None:
            pass

    for a in [*default_addons(), Dumper(), KeepServing(), termlog.TermLog()]:
        for each in addonmanager.traverse([a]):
            if hasattr(each, "load"):
                try:
                    each.load(_Loader())
                except Exception:  # noqa: BLE001 - best effort, for a message only
                    pass
    return set(opts.keys())


def _option_names(sets: Sequence[str]) -> list[str]:
    return [spec.split("=", 1)[0] for spec in sets]


def _unknown_options_error(unknown: list[str], lean: bool) -> str:
    if lean:
        full = _full_option_names()
        elsewhere = [n for n in unknown if n in full]
        if elsewhere:
            names = ", ".join(elsewhere)
            word = "option" if len(elsewhere) == 1 else "options"
            verb = "is" if len(elsewhere) == 1 else "are"
            return f"{word} {names} {verb} not supported by the lean proxy; use --full / mitmdump"
    return f"unknown option(s): {', '.join(unknown)} (see mitmdump --options)"


def _configure_logging() -> None:
    # As mitmproxy's own tools do: records flow to the handlers, which filter by level.
    logging.getLogger().setLevel(logging.DEBUG)
    for name in ("asyncio", "hpack", "quic", "tornado"):
        logging.getLogger(name).setLevel(logging.WARNING)


# How much one socket read may take. asyncio reads up to 256 KiB, and mitmproxy handles
# all of it before the loop runs anything else: 256 KiB of a fast stream is ~1,200 SSE
# chunks, each its own event, which held every other client 150-300 ms at a time. So
# while other work waits in the loop, a read takes 2 KiB (~10 chunks, under a
# millisecond). Alone, a connection reads big: each read costs mitmproxy ~0.2 ms however
# small it is. The price of the fairness: up to 22% fewer req/s for 16-64 clients whose
# answers all come in bursts (docs/benchmarks.md, "the stall").
BIG_READ = 256 * 1024
SMALL_READ = 2048


class _ReadSize:
    """``max_size`` of asyncio's TCP transports: ``SMALL_READ`` while other callbacks wait
    in the loop's ready queue, ``BIG_READ`` otherwise."""

    def __get__(self, transport: Any, owner: type | None = None) -> int:
        if transport is None:
            return BIG_READ
        return SMALL_READ if getattr(transport._loop, "_ready", None) else BIG_READ


def _read_fairly() -> None:
    """Give asyncio's TCP transports the read size above. Private to asyncio (the same
    in 3.12 and 3.13): where it is not there, reads stay as asyncio makes them."""
    from asyncio import selector_events

    transport = getattr(selector_events, "_SelectorSocketTransport", None)
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = _ReadSize()  # TCP only: datagram transports keep theirs


def _quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """At exit, connections still open are cancelled, and asyncio's stream callback
    then reports each CancelledError with a traceback; that is noise, not an error."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def _serve(
    sets: list[str],
    lean: bool,
    addon: Any,
    fast_dispatch: bool = True,
    on_listening: Callable[[], None] | None = None,
) -> int:
    _configure_logging()
    opts = options.Options()
    if lean:
        m: master.Master = LeanMaster(opts, fast_dispatch=fast_dispatch)
    else:
        from mitmproxy.tools.dump import DumpMaster

        m = DumpMaster(opts)
    m.addons.add(addon, _FreezeStartup())
    lane = getattr(addon, "lane", None)
    if lean and lane is not None:
        lane.host()  # before the servers start: the port's connections go to it first
    if on_listening is not None:
        m.addons.add(_Listening(on_listening))

    names = _option_names(sets)
    unknown = sorted({n for n in names if n not in opts})
    if unknown:
        print(f"cassette-proxy: {_unknown_options_error(unknown, lean)}", file=sys.stderr)
        return 2
    if "listen_host" not in names:
        sets = [f"listen_host={DEFAULT_LISTEN_HOST}", *sets]
    try:
        opts.set(*sets)
        # Like mitmdump's script loader: the addon sees every option once, at start. The
        # ones just set were already passed to ``configure`` by ``opts.set``.
        m.addons.invoke_addon_sync(
            addon, hooks.ConfigureHook(set(opts.keys()) - set(_option_names(sets)))
        )
    except exceptions.OptionsError as e:
        print(f"cassette-proxy: {e}", file=sys.stderr)
        return 2

    _read_fairly()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_cancellations)
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, m.shutdown)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on Linux
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(m.shutdown))
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a client gone must not kill us
    try:
        await m.run()
    except SystemExit as e:  # errorcheck exits on startup errors (port in use, ...)
        return e.code if isinstance(e.code, int) else 1
    return 0


def run_proxy(
    sets: Sequence[str],
    *,
    lean: bool = True,
    addon: CassetteRecorder | None = None,
    on_listening: Callable[[], None] | None = None,
) -> int:
    """Run the cassette proxy until SIGINT/SIGTERM; return the process exit status.

    ``sets`` are mitmproxy ``name=value`` settings (``listen_port=8080``,
    ``mode=reverse:http://127.0.0.1:8000``, ``cassette_mode=replay``, ...). The listen
    host defaults to 127.0.0.1. ``lean=False`` hosts the addon in mitmdump's full
    DumpMaster. Pass ``addon`` to read ``addon.counts`` after the proxy stops;
    ``on_listening`` is called once it listens (not at all when it fails to start).
    """
    chosen = addon if addon is not None else CassetteRecorder()
    return run_master(sets, chosen, lean=lean, on_listening=on_listening)


def run_master(
    sets: Sequence[str],
    addon: Any,
    *,
    lean: bool = True,
    fast_dispatch: bool = True,
    on_listening: Callable[[], None] | None = None,
) -> int:
    """``run_proxy`` for any one addon object (the benchmark hosts its baseline this way;
    ``fast_dispatch=False`` keeps mitmproxy's own per-addon hook dispatch, to measure it)."""
    port_in_use = _PortInUse()
    logging.getLogger("mitmproxy.addons.proxyserver").addFilter(port_in_use)
    try:
        return asyncio.run(_serve(list(sets), lean, addon, fast_dispatch, on_listening))
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        return 130
    finally:
        logging.getLogger("mitmproxy.addons.proxyserver").removeFilter(port_in_use)


def _parse_args(argv: Sequence[str]) -> tuple[list[str], bool]:
    parser = argparse.ArgumentParser(
        prog="python -m cassette_proxy.lean",
        description="The cassette proxy in a lean mitmproxy master (mitmdump-like flags).",
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--mode", "-m", dest="modes", action="append", default=[])
    parser.add_argument("--listen-host", dest="listen_host")
    parser.add_argument("--listen-port", "-p", dest="listen_port", type=int)
    parser.add_argument("--confdir")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines")
    parser.add_argument("--full", action="store_true", help="use mitmdump's full master")
    args = parser.parse_args(argv)
    sets = list(args.sets)
    sets += [f"mode={m}" for m in args.modes]
    if args.listen_host is not None:
        sets.append(f"listen_host={args.listen_host}")
    if args.listen_port is not None:
        sets.append(f"listen_port={args.listen_port}")
    if args.confdir is not None:
        sets.append(f"confdir={args.confdir}")
    if args.quiet:
        sets.append("termlog_verbosity=error")
        if args.full:
            sets.append("flow_detail=0")
    elif args.verbose:
        sets.append("termlog_verbosity=debug")
    return sets, args.full


def main(argv: Sequence[str] | None = None) -> int:
    sets, full = _parse_args(sys.argv[1:] if argv is None else argv)
    return run_proxy(sets, lean=not full)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DEFAULT_LISTEN_HOST", "LeanMaster", "main", "run_master", "run_proxy"]
