"""A fresh proxy's first request as quick as its second: nothing starts on it.

Measured on a fresh ``mitmdump -s addons/recorder.py`` (issue 19): the first recorded
request and the first paced replay were 100-250 ms late, the second on time. What the
first request waited for:

* mitmproxy's ``tlsconfig`` reads its CA again at ``running`` (after the port listens;
  a FIXME there), and cryptography's check of the RSA key takes ~110 ms on the test
  machine, on the event loop. ``reuse_ca_store`` keeps the store read moments before
  (at ``configure``) when the CA files are unchanged;
* threads and servers made on first use: the writer's and fsync threads, the temp-file
  thread, the local replay server of paced and cut answers, the offline stand-in;
* modules imported on first use.

``WarmStart`` (a child addon of ``CassetteRecorder``) starts them at ``running``
(``CassetteRecorder.warm_start``).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("cassette_proxy")

# Imported on a first request otherwise (encodings.idna: mitmproxy's host names).
LATE_MODULES = ("encodings.idna", "cassette_proxy.churn")


_last: dict[str, Any] = {}  # the store read last, and what it was read from


def _stamp(folder: Path, basename: str) -> tuple[tuple[int, int, int], ...]:
    files = (folder / f"{basename}-{n}.pem" for n in ("ca", "dhparam"))
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, files))


def reuse_ca_store(seed: tuple[Any, str, int, bytes | None, Any] | None = None) -> None:
    """Let mitmproxy's ``CertStore.from_store`` give back the store it read last when the
    CA files and arguments are the same (installed once). ``seed``: (path, basename,
    key_size, passphrase, store), a store read already (``tlsconfig``'s, read at its
    ``configure`` before this module was loaded). Any surprise: left as it is."""
    try:
        from mitmproxy import certs
    except ImportError:  # pragma: no cover - mitmproxy is a dependency
        return
    if seed is not None:
        path, basename, key_size, passphrase, store = seed
        try:
            stamp = _stamp(Path(path), basename)
        except OSError:
            return
        _last.update(key=(str(Path(path)), basename, key_size, passphrase, stamp), store=store)
    original = certs.CertStore.__dict__.get("from_store")
    if not isinstance(original, classmethod) or getattr(original.__func__, "_reused", False):
        return
    read = original.__func__
    last = _last

    @functools.wraps(read)
    def from_store(
        cls: Any, path: Any, basename: str, key_size: int, passphrase: bytes | None = None
    ) -> Any:
        folder = Path(path)
        try:
            stamp = _stamp(folder, basename)
        except OSError:
            return read(cls, path, basename, key_size, passphrase)
        key = (str(folder), basename, key_size, passphrase, stamp)
        if last.get("key") == key:
            return last["store"]
        store = read(cls, path, basename, key_size, passphrase)
        last.update(key=key, store=store)
        return store

    from_store._reused = True  # type: ignore[attr-defined]
    certs.CertStore.from_store = classmethod(from_store)  # type: ignore[method-assign]


class WarmStart:
    """Starts at ``running`` what a first request would otherwise start."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    def load(self, loader: Any) -> None:
        self._seed()  # mitmdump -s: tlsconfig has read its store already

    def configure(self, updated: set[str]) -> None:
        if not _last:
            self._seed()  # the lean master: tlsconfig reads it in the first configure

    def _seed(self) -> None:
        seed = _tls_seed()
        if seed is not None:  # else tlsconfig reads its store as it always did
            reuse_ca_store(seed)

    async def running(self) -> None:
        for name in LATE_MODULES:
            importlib.import_module(name)
        try:
            await self.recorder.warm_start()
        except Exception as e:  # noqa: BLE001 - each starts on first use all the same
            log.debug("warm start incomplete: %s", e)


def _tls_seed() -> tuple[Any, str, int, bytes | None, Any] | None:
    """tlsconfig's store and the arguments it reads it with (``TlsConfig.configure``)."""
    try:
        from mitmproxy import ctx
        from mitmproxy.addons.tlsconfig import CONF_BASENAME

        tlsconfig = ctx.master.addons.get("tlsconfig")
        store = getattr(tlsconfig, "certstore", None)
        if store is None:
            return None
        opts = ctx.options
        passphrase = opts.cert_passphrase.encode("utf8") if opts.cert_passphrase else None
        if opts.emudhra or opts.emudhra_old:
            return None  # tlsconfig changes that store after reading it
        path = os.path.expanduser(opts.confdir)
        return path, CONF_BASENAME, opts.key_size, passphrase, store
    except Exception:  # noqa: BLE001 - no seed: the store is read again, as before
        return None
