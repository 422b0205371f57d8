"""Cassettes: the pydantic models of llama-stack's recording format, and atomic file I/O.

One cassette file holds one interaction. Files are written exactly as
``json.dumps(obj, indent=2) + "\\n"`` with the format's key order, so
re-recording the same answer gives a byte-identical file.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency; json alone works, slower
    orjson = None  # type: ignore[assignment]
from pydantic import BaseModel, ConfigDict, Field

from .jsontext import orjson_reads_alike

# Temp files start with this prefix; the store ignores them and removes stale ones.
# A writer names its own ``<prefix><host>-<pid>-<n>.partial`` (see ``stale_temp``).
TEMP_PREFIX = ".cassette-tmp-"
# A temp file lives for the milliseconds between its write and its rename: one this old
# was left by a crash, whoever wrote it (another machine on a shared volume too).
STALE_TEMP_SECONDS = 10 * 60
# The largest cassette file read or written. The largest of llama-stack's 3,316 is under
# 1 MB; a bigger file is a mistake (a 50 MB upload) that would slow every start and every
# git clone. The proxy never writes a file it would refuse to load.
MAX_CASSETTE_BYTES = 32 * 1024 * 1024


def _umask() -> int:
    # Read once: os.umask can only be read by setting it, which races with other threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp makes its file 0600; a cassette gets the mode open() would give it (0644 under
# umask 022), so another CI user or a container can read it.
FILE_MODE = 0o666 & ~_umask()


class RecordedRequest(BaseModel):
    """The request half. Old raw-HTTP cassettes use ``payload`` instead of ``body``."""

    model_config = ConfigDict(extra="allow")

    method: str = "POST"
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None
    endpoint: str | None = None
    model: str | None = None


class RecordedResponse(BaseModel):
    """The response half: a typed object, a list of typed chunks, a raw dict or SSE lines."""

    model_config = ConfigDict(extra="allow")

    body: Any = None
    is_streaming: bool = False


class Cassette(BaseModel):
    model_config = ConfigDict(extra="allow")

    test_id: str | None = None
    request: RecordedRequest
    response: RecordedResponse

    def to_json(self) -> str:
        """The file text: the format's key order, fields a file did not have left out."""
        return self.to_json_bytes().decode("ascii")

    def to_json_bytes(self) -> bytes:
        """``to_json()`` as the file's bytes (ASCII), without a copy of the text.

        Raises NotJSONError for a value JSON cannot hold: an upstream's ``-1e400`` is
        read as -inf, which json.dumps would write as ``-Infinity``.
        """
        try:
            return dumps_indented_bytes(plain(self), newline=True, allow_nan=False)
        except ValueError as e:
            raise NotJSONError(
                "it holds a number JSON cannot represent (NaN or infinite, such as 1e400)"
            ) from e


def plain(model: BaseModel) -> Any:
    """What ``model.model_dump(exclude_unset=True)`` gives for a cassette, without copying
    the JSON values inside it (the bodies are plain JSON already; model_dump walks and
    copies all of them, 0.13 ms for a 100-chunk stream).

    Set fields in the model's order, then extra fields in their order, as pydantic does.
    A value that is not plain JSON is left to pydantic's dump.
    """
    out: dict[str, Any] = {}
    fields_set = model.model_fields_set
    for name in type(model).model_fields:
        if name in fields_set:
            value = getattr(model, name)
            out[name] = plain(value) if isinstance(value, BaseModel) else value
    for name, value in (model.__pydantic_extra__ or {}).items():
        if isinstance(value, BaseModel):
            return model.model_dump(exclude_unset=True)
        out[name] = value
    return out


# orjson writes what json.dumps(indent=2) writes but for: characters from U+007F up
# (json escapes them as \uXXXX, surrogate pairs above U+FFFF), and floats below 1e-4
# (json: repr, "1e-05"; orjson "0.00001" or "1e-7"). Both are fixed up below. What orjson
# refuses (integers beyond 64 bits, non-string keys, lone surrogates) goes to json; so does
# anything but plain JSON types, and NaN or infinity, which orjson would write as null
# (``_plain_json`` looks; reading the whole text back to compare took longer than the
# rest together).
_NOT_ASCII = re.compile("[\x7f-\U0010ffff]")
# A float orjson writes differently, as the value of its own line (JSON strings cannot
# span lines, so a string's content never matches a whole line). Found by two searches
# with a literal prefix (fast), then checked line by line.
_EXPONENT = re.compile(rb"e-\d")
_FOUR_ZEROS = re.compile(rb"0\.0000")
_SMALL_FLOAT_LINE = re.compile(
    rb'( *(?:"(?:[^"\\\n]|\\.)*": )?)(-?(?:0\.0000\d*|\d+(?:\.\d+)?e-\d+))(,?)'
)


def _escape(match: re.Match[str]) -> str:
    n = ord(match.group())
    if n < 0x10000:
        return f"\\u{n:04x}"
    n -= 0x10000
    return f"\\u{0xD800 | (n >> 10):04x}\\u{0xDC00 | (n & 0x3FF):04x}"


def _fix_small_floats(out: bytes) -> bytes:
    """orjson's text with each float below 1e-4 written as json writes it (repr)."""
    lines = set()
    for pattern in (_EXPONENT, _FOUR_ZEROS):
        for m in pattern.finditer(out):
            lines.add(out.rfind(b"\n", 0, m.start()) + 1)
    if not lines:
        return out
    pieces, done = [], 0
    for start in sorted(lines):
        end = out.find(b"\n", start)
        end = len(out) if end < 0 else end
        m = _SMALL_FLOAT_LINE.fullmatch(out, start, end)
        if m is not None:
            number = repr(float(m.group(2))).encode()
            pieces += [out[done:start], m.group(1), number, m.group(3)]
            done = end
    pieces.append(out[done:])
    return b"".join(pieces)


class FiniteList(list):  # type: ignore[type-arg]
    """A list of values read by orjson, which reads no NaN, no infinity and only plain
    JSON types: ``dumps_indented`` need not look inside (a stream's chunks)."""

    __slots__ = ()


_SCALARS = frozenset({str, int, bool, type(None)})


def _plain_json(obj: Any) -> bool:
    """Whether obj holds only dicts, lists, strings, numbers, booleans and None, and no
    NaN or infinity: then orjson writes it as json does (but for the fix-ups)."""
    stack = [obj]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float:
            if item - item != 0:  # NaN or infinity: json writes NaN, orjson null
                return False
        elif kind not in _SCALARS and kind is not FiniteList:
            return False
    return True


def dumps_indented(obj: Any) -> str:
    """Exactly ``json.dumps(obj, indent=2)``, about 20 times faster where orjson can."""
    return dumps_indented_bytes(obj).decode("ascii")


def dumps_indented_bytes(obj: Any, newline: bool = False, allow_nan: bool = True) -> bytes:
    """``json.dumps(obj, indent=2)`` (plus "\\n" if ``newline``) as ASCII bytes.

    ``allow_nan=False``: a NaN or infinity raises ValueError, as in json.dumps."""
    end = "\n" if newline else ""
    if orjson is None or not _plain_json(obj):
        return (json.dumps(obj, indent=2, allow_nan=allow_nan) + end).encode("ascii")
    try:
        option = orjson.OPT_INDENT_2 | (orjson.OPT_APPEND_NEWLINE if newline else 0)
        out = orjson.dumps(obj, option=option)
    except TypeError:  # orjson.JSONEncodeError is one
        return (json.dumps(obj, indent=2, allow_nan=allow_nan) + end).encode("ascii")
    out = _fix_small_floats(out)
    if not out.isascii() or b"\x7f" in out:
        out = _NOT_ASCII.sub(_escape, out.decode()).encode("ascii")
    return out


def typed(type_name: str, data: Any) -> dict[str, Any]:
    """A typed object as the format stores it."""
    return {"__type__": type_name, "__data__": data}


def make_cassette(
    *,
    test_id: str | None,
    method: str,
    url: str,
    headers: dict[str, str],
    body: Any,
    endpoint: str,
    model: str | None,
    response: dict[str, Any],
) -> Cassette:
    """A new cassette with every field set in the format's order.

    ``response`` is the response half as a plain dict (``body``, ``is_streaming`` and,
    for errors and raw HTTP, ``status`` / ``is_exception`` / ``exception_data``).
    """
    doc: dict[str, Any] = {}
    if test_id is not None:
        doc["test_id"] = test_id
    doc["request"] = {
        "method": method,
        "url": url,
        "headers": headers,
        "body": body,
        "endpoint": endpoint,
        "model": model or "",
    }
    doc["response"] = response
    doc["id_normalization_mapping"] = {}
    return Cassette.model_validate(doc)


class CassetteError(Exception):
    """A file that is not a readable cassette; the message names the file and the reason."""


class NotJSONError(CassetteError):
    """A cassette that would not be valid JSON: it is never written."""


_HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def temp_prefix(pid: int | None = None) -> str:
    """The start of the temp file names this process (or ``pid``) writes on this host."""
    return f"{TEMP_PREFIX}{_HOST}-{os.getpid() if pid is None else pid}-"


def stale_temp(path: Path, now: float | None = None) -> bool:
    """Whether a temp file was left behind by a writer that is gone.

    Several proxies may share a folder (pytest-xdist, CI jobs on one volume): another
    one's temp file is in flight and must stay. A temp file is stale when its writer
    was a process on this host that no longer runs, or when it is older than
    STALE_TEMP_SECONDS (a writer on another host, or a name from an older version).
    """
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False  # already gone (renamed or removed by its writer)
    if age > STALE_TEMP_SECONDS:
        return True
    host, _, rest = path.name[len(TEMP_PREFIX) :].partition("-")
    pid, _, _ = rest.partition("-")
    if host != _HOST or not pid.isdigit():
        return False
    return not _running(int(pid))


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def _parse_json(raw: bytes) -> Any:
    """json.loads, sped up by orjson: every cassette is parsed once when the proxy starts.

    What orjson refuses (NaN, UTF-16, ...) goes to json, so a file is accepted or refused
    exactly as json.loads decides; so does a file with an integer beyond 64 bits, which
    orjson would read as a float (``jsontext``).
    """
    if orjson is not None and orjson_reads_alike(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def read_cassette(path: Path) -> Cassette:
    try:
        size = path.stat().st_size
        if size > MAX_CASSETTE_BYTES:
            raise CassetteError(
                f"{path}: too large ({size / 2**20:.1f} MiB; a cassette may hold "
                f"{MAX_CASSETTE_BYTES // 2**20} MiB), skipped"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise CassetteError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        doc = _parse_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CassetteError(f"{path}: not valid JSON: {e}") from e
    except RecursionError as e:
        raise CassetteError(f"{path}: JSON nested too deeply to read") from e
    if not isinstance(doc, dict) or "request" not in doc or "response" not in doc:
        raise CassetteError(f"{path}: not a cassette (needs 'request' and 'response' objects)")
    try:
        return Cassette.model_validate(doc)
    except ValueError as e:
        first = str(e).splitlines()
        raise CassetteError(f"{path}: wrong shape: {' '.join(first[:3])}") from e


def write_cassette(
    path: Path,
    cassette: Cassette,
    durable: bool = True,
    temp: tuple[int, str] | None = None,
    keep_unchanged: bool = False,
) -> os.stat_result:
    """Write atomically: temp file in the same folder, fsync, rename, fsync the folder.

    A crash at any point leaves either the old file or the new one, never half of one.
    ``durable=False`` skips both fsyncs: the file then survives a crash of the process
    (the kernel holds it) but not of the machine until ``sync_cassette`` has run; the
    stream tap uses it because it must not wait for the disk on the event loop.
    Raises CassetteError for a cassette larger than MAX_CASSETTE_BYTES, OSError when
    the disk refuses; nothing is left behind either way. Returns the file's stat (what
    the store keeps to see it change). ``temp``: a temp file opened for it beforehand
    (``open_temp`` in the same folder or one on the same file system); it is used up
    either way. ``keep_unchanged``: a file at ``path`` that holds the same answer, volatile
    fields aside, is left as it is (``churn.kept``), and its stat returned.
    """
    try:
        data = cassette.to_json_bytes()
        if keep_unchanged:
            from .churn import kept  # churn logs; cassette.py stays free of logging

            stat = kept(path, data, plain(cassette))
            if stat is not None:
                if temp is not None:
                    discard_temp(temp)
                return stat
        if len(data) > MAX_CASSETTE_BYTES:
            raise CassetteError(
                f"{path}: the cassette would be {len(data) / 2**20:.1f} MiB, over the "
                f"{MAX_CASSETTE_BYTES // 2**20} MiB a cassette may hold"
            )
    except BaseException:
        if temp is not None:
            discard_temp(temp)
        raise
    try:
        first = temp if temp is not None else open_temp(path.parent)
        stat = _write_renamed(data, path, first, durable)
    except FileNotFoundError:
        if temp is None:
            raise
        # The temp file opened while the request was upstream is gone: another proxy
        # starting on this folder took it for a crash's (a request upstream for over
        # STALE_TEMP_SECONDS). The bytes are still here: once more, with a new one.
        stat = _write_renamed(data, path, open_temp(path.parent), durable)
    if durable:
        _fsync_folder(path.parent)
    return stat


def _write_renamed(
    data: bytes, path: Path, temp: tuple[int, str], durable: bool
) -> os.stat_result:
    """Write ``data`` into the open temp file, fsync it if ``durable``, rename it."""
    fd, tmp = temp
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
            stat = os.fstat(fd)  # the same inode, size and mtime once renamed
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return stat


_temp_names = itertools.count()


def open_temp(folder: Path, make: bool = True) -> tuple[int, str]:
    """A new temp file in ``folder`` (made if missing, unless not ``make``), created
    exclusively.

    Named by host, pid and a counter (``stale_temp`` reads the first two); a name left
    by an older process with the same pid is skipped. Cheaper than ``tempfile.mkstemp``
    (random names, a chmod), which was a tenth of a small recording's time.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    made = False
    while True:
        tmp = os.path.join(folder, f"{temp_prefix()}{next(_temp_names)}.partial")
        try:
            return os.open(tmp, flags, FILE_MODE), tmp
        except FileExistsError:
            continue
        except FileNotFoundError:
            if made or not make:
                raise
            folder.mkdir(parents=True, exist_ok=True)
            made = True


def discard_temp(temp: tuple[int, str]) -> None:
    """Close and remove a temp file from ``open_temp`` that was not used."""
    fd, tmp = temp
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(tmp)
    except OSError:
        pass


def sync_cassette(path: Path) -> None:
    """Flush a cassette written with ``durable=False`` (and its folder entry) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sync_cassettes(paths: list[Path]) -> list[OSError | None]:
    """``sync_cassette`` for many cassettes; the error (or None) of each path, in order.

    Where the system has ``syncfs`` (Linux), several cassettes are flushed with one call
    for their file system: one journal commit instead of one per file. One by one, on
    the shared test machine (an fsync took up to 6 ms), the flushes fell seconds behind
    the recordings, and each commit held up the next file's creation.
    """
    if len(paths) > 1 and _syncfs is not None:
        if all(_sync_file_system(folder) is None for folder in _one_per_device(paths)):
            return [None] * len(paths)
    errors: list[OSError | None] = []
    folders: dict[Path, OSError | None] = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            errors.append(None)
        except OSError as e:
            errors.append(e)
        folders.setdefault(path.parent, None)
    for folder in folders:
        try:
            _fsync_folder(folder)
        except OSError as e:
            folders[folder] = e
    return [error or folders[path.parent] for path, error in zip(paths, errors, strict=True)]


def _one_per_device(paths: list[Path]) -> list[Path]:
    """A folder of ``paths`` on each file system they are on (a test's folder may be a
    link to another disk)."""
    folders: dict[int, Path] = {}
    for folder in dict.fromkeys(path.parent for path in paths):
        try:
            folders.setdefault(os.stat(folder).st_dev, folder)
        except OSError:
            folders.setdefault(-len(folders) - 1, folder)  # its syncfs says what is wrong
    return list(folders.values())


def _load_syncfs() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def _sync_file_system(folder: Path) -> OSError | None:
    """``syncfs`` for the file system holding ``folder``: None, or why it failed (the
    caller then flushes file by file, which tells which file failed)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        return e
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            return OSError(err, os.strerror(err))
        return None
    finally:
        os.close(fd)
