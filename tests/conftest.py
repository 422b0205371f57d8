"""Shared fixtures: real mitmdump subprocesses + fake upstreams, loopback only.

Plain helpers (`start_proxy`, `openai_client`, `async_openai_client`,
`cassette_files`, `free_port`) are importable with `from conftest import ...`
(pytest puts tests/ on sys.path since it has no __init__.py); fixtures wrap
them with automatic cleanup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from upstreams import (
    OllamaUpstream,
    OpenAIUpstream,
    start_ollama_upstream,
    start_openai_upstream,
    start_tls_openai_upstream,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RECORDER_SCRIPT = REPO_ROOT / "addons" / "recorder.py"
# The venv's bin dir, so the mitmdump matching the running interpreter is used.
PYTHON_BIN = Path(sys.executable).parent
MITMDUMP = PYTHON_BIN / "mitmdump"
HOST = "127.0.0.1"
# CASSETTE_TEST_MASTER=lean runs the proxies of start_proxy in the lean master
# (``python -m cassette_proxy.lean``, as ``cassette-proxy run`` does: the fast lane on)
# instead of mitmdump, wherever a test asks for nothing only mitmdump has;
# CASSETTE_TEST_LANE=off turns the lane off there and in ``cassette-proxy run``.
TEST_MASTER = os.environ.get("CASSETTE_TEST_MASTER", "mitmdump")
LANE_OFF = os.environ.get("CASSETTE_TEST_LANE", "on") == "off"
_LEAN_FLAGS = ("--set", "--mode", "--listen-host", "--listen-port", "-q", "-v")
_MITMDUMP_ONLY = ("flow_detail", "save_stream_file", "dumper_filter", "anticache")

_PROXY_VARS = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
)  # fmt: skip


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature; start_proxy retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cassette_files(directory: Path | str) -> list[Path]:
    """Sorted list of *.json files below `directory`, recursively."""
    d = Path(directory)
    return sorted(d.rglob("*.json")) if d.exists() else []


def wait_until(check: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll `check` until it returns something truthy (generous: a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            assert got, f"not within {timeout}s: {what}"
            return got
        time.sleep(0.1)


def wait_for_files(directory: Path, n: int, timeout: float = 10.0) -> list[Path]:
    """The cassettes below `directory` once there are `n` (or what is there at timeout).

    Cassettes can land just after the client has its answer (fsync, a stream's end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = cassette_files(directory)
        if len(files) >= n:
            return files
        time.sleep(0.05)
    return cassette_files(directory)


def ensure_ca(confdir: Path) -> Path:
    """Create mitmproxy's CA in `confdir` once (in-process, fast) so parallel or
    repeated mitmdump starts never race on generating it. Returns the cert path."""
    from mitmproxy.certs import CertStore

    CertStore.from_store(confdir, "mitmproxy", 2048)
    return confdir / "mitmproxy-ca-cert.pem"


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class Proxy:
    """A running `mitmdump` subprocess."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        port: int,
        cassette_dir: Path,
        confdir: Path,
        log_path: Path,
        argv: list[str],
    ) -> None:
        self.proc = proc
        self.port = port
        self.cassette_dir = cassette_dir
        self.confdir = confdir
        self.log_path = log_path
        self.argv = argv

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until `needle` appears in the log (addon output is asynchronous)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in mitmdump log:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (mitmdump shuts down addons cleanly), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill9(self) -> int | None:
        """SIGKILL: simulates a crash, no addon `done` hook runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        return self.proc.returncode

    def proxy_env(self, inherit: bool = True) -> dict[str, str]:
        """Environment for a client subprocess that should go through this proxy.

        With inherit=True it is os.environ (minus foreign proxy settings) plus the
        proxy/CA variables; with inherit=False only the proxy/CA variables."""
        base = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS} if inherit else {}
        ca = str(self.ca_cert)
        return base | {
            "HTTP_PROXY": self.url,
            "HTTPS_PROXY": self.url,
            "http_proxy": self.url,
            "https_proxy": self.url,
            "NO_PROXY": "",
            "no_proxy": "",
            "SSL_CERT_FILE": ca,
            "CURL_CA_BUNDLE": ca,
            "NODE_EXTRA_CA_CERTS": ca,
            "REQUESTS_CA_BUNDLE": ca,
        }

    def __repr__(self) -> str:
        return f"<Proxy {self.url} pid={self.proc.pid} rc={self.proc.poll()}>"


def start_proxy(
    tmp_path: Path,
    *extra_args: str,
    mode: str | None = None,
    cassette_dir: Path | str | None = None,
    options: Mapping[str, Any] | None = None,
    reverse: str | None = None,
    env: Mapping[str, str] | None = None,
    script: Path | str | None = None,
    confdir: Path | None = None,
    port: int | None = None,
    startup_timeout: float = 30.0,
) -> Proxy:
    """Launch `mitmdump -s <script>` on 127.0.0.1 and wait until it accepts TCP.

    mode        -> --set cassette_mode=<mode>
    options     -> --set k=v each (bools as true/false, lists/tuples repeat --set)
    reverse     -> --mode reverse:<reverse>   (e.g. upstream.url)
    env         -> extra environment variables for mitmdump
    script      -> addon script; defaults to addons/recorder.py of this repo
    port        -> fixed listen port (e.g. restart on the same port); random otherwise
    extra_args  -> appended verbatim to the mitmdump command line
    """
    tmp_path = Path(tmp_path)
    confdir = confdir or tmp_path / "mitm-confdir"
    ensure_ca(confdir)
    cdir = Path(cassette_dir) if cassette_dir is not None else tmp_path / "cassettes"
    cdir.mkdir(parents=True, exist_ok=True)
    script_path = Path(script) if script is not None else RECORDER_SCRIPT

    proc_env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    proc_env["PYTHONUNBUFFERED"] = "1"  # log_text() must see output promptly
    proc_env.update(env or {})

    attempts = 1 if port is not None else 3  # free_port() can race; retry on EADDRINUSE
    for attempt in range(attempts):
        p = port if port is not None else free_port()
        argv = [
            str(MITMDUMP),
            "-s", str(script_path),
            "--listen-host", HOST,
            "--listen-port", str(p),
            "--set", f"confdir={confdir}",
            "--set", f"cassette_dir={cdir}",
        ]  # fmt: skip
        if _lean_can_host(script_path, extra_args, options or {}):
            argv[:3] = [sys.executable, "-m", "cassette_proxy.lean"]
            if LANE_OFF:
                argv += ["--set", "cassette_lane=false"]
        if mode is not None:
            argv += ["--set", f"cassette_mode={mode}"]
        for k, v in (options or {}).items():
            for item in v if isinstance(v, list | tuple) else [v]:
                argv += ["--set", f"{k}={_fmt_value(item)}"]
        if reverse is not None:
            argv += ["--mode", f"reverse:{reverse}"]
        argv += list(extra_args)

        n = 0
        while (log_path := tmp_path / f"mitmdump-{p}-{n}.log").exists():
            n += 1
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=proc_env,
                cwd=tmp_path,
            )
        proxy = Proxy(proc, p, cdir, confdir, log_path, argv)
        try:
            _wait_ready(proxy, startup_timeout)
            return proxy
        except _EarlyExit as e:
            if "address already in use" in e.log.lower() and attempt + 1 < attempts:
                continue
            raise AssertionError(
                f"mitmdump exited early (rc={proc.returncode}): {argv}\n{e.log}"
            ) from None
    raise AssertionError("unreachable")


def _lean_can_host(script: Path, extra_args: tuple[str, ...], options: Mapping[str, Any]) -> bool:
    """Whether CASSETTE_TEST_MASTER=lean may run this proxy in the lean master: our own
    addon, and only flags and options the lean master takes."""
    if TEST_MASTER != "lean" or script != RECORDER_SCRIPT:
        return False
    if any(name in options or f"{name}=" in " ".join(extra_args) for name in _MITMDUMP_ONLY):
        return False
    return all(not a.startswith("-") or a in _LEAN_FLAGS for a in extra_args)


class _EarlyExit(Exception):
    def __init__(self, log: str) -> None:
        self.log = log


def _wait_ready(proxy: Proxy, timeout: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proxy.proc.poll() is not None:
            raise _EarlyExit(proxy.log_text())
        # Prefer mitmdump's "listening at" line: a TCP probe would show up as a
        # client connection in the addon's log. Probe only if the line never
        # comes (e.g. a test lowered termlog_verbosity).
        if "listening at" in proxy.log_text():
            return
        if time.monotonic() - start > 5.0:
            with contextlib.suppress(OSError):
                socket.create_connection((HOST, proxy.port), timeout=0.2).close()
                return
        time.sleep(0.02)
    proxy.kill9()
    raise AssertionError(f"mitmdump not listening after {timeout}s:\n{proxy.log_text()}")


def _url_of(target: Any) -> str:
    return target if isinstance(target, str) else str(target.url)


def openai_client(
    proxy: Proxy | str | None,
    upstream: OpenAIUpstream | Proxy | str,
    *,
    api_key: str = "sk-test-cassette-0000",
    timeout: float = 30.0,
    max_connections: int = 100,
    **kwargs: Any,
) -> openai.OpenAI:
    """Sync OpenAI SDK client for `upstream` (base_url <upstream>/v1).

    proxy=None -> direct (or reverse mode: pass the Proxy as `upstream`).
    trust_env=False so stray *_PROXY variables never reroute traffic."""
    http = httpx.Client(
        proxy=_url_of(proxy) if proxy is not None else None,
        trust_env=False,
        timeout=timeout,
        limits=httpx.Limits(max_connections=max_connections),
    )
    return openai.OpenAI(
        base_url=_url_of(upstream) + "/v1",
        api_key=api_key,
        http_client=http,
        max_retries=0,
        **kwargs,
    )


def async_openai_client(
    proxy: Proxy | str | None,
    upstream: OpenAIUpstream | Proxy | str,
    *,
    api_key: str = "sk-test-cassette-0000",
    timeout: float = 30.0,
    max_connections: int = 500,
    **kwargs: Any,
) -> openai.AsyncOpenAI:
    """Async variant, sized for many concurrent requests from one client."""
    http = httpx.AsyncClient(
        proxy=_url_of(proxy) if proxy is not None else None,
        trust_env=False,
        timeout=timeout,
        limits=httpx.Limits(max_connections=max_connections),
    )
    return openai.AsyncOpenAI(
        base_url=_url_of(upstream) + "/v1",
        api_key=api_key,
        http_client=http,
        max_retries=0,
        **kwargs,
    )


def ollama_client(
    proxy: Proxy | str | None,
    upstream: OllamaUpstream | Proxy | str,
    *,
    test_id: str | None = None,
    timeout: float = 30.0,
) -> ollama.Client:
    """The real ollama client for `upstream`, through `proxy` (None: direct / reverse mode).

    test_id -> sent as X-Cassette-Test-Id on every request."""
    return ollama.Client(
        host=_url_of(upstream),
        proxy=_url_of(proxy) if proxy is not None else None,
        trust_env=False,
        timeout=timeout,
        headers={"X-Cassette-Test-Id": test_id} if test_id else None,
    )


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_env_proxies(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A proxy inherited from the environment would send test traffic off-box.
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    # Proxies started by tests keep their index cache out of the user's ~/.cache.
    if "CASSETTE_PROXY_CACHE_DIR" not in os.environ:
        monkeypatch.setenv(
            "CASSETTE_PROXY_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "index-cache")
        )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def python_bin() -> Path:
    return PYTHON_BIN


@pytest.fixture(scope="session")
def mitmdump_bin() -> Path:
    return MITMDUMP


@pytest.fixture(scope="session")
def mitm_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mitmproxy confdir (and CA) for the whole session."""
    confdir = tmp_path_factory.mktemp("mitm-confdir")
    ensure_ca(confdir)
    return confdir


@pytest.fixture
def proxy_factory(tmp_path: Path, mitm_confdir: Path) -> Iterator[Callable[..., Proxy]]:
    """`proxy_factory(*extra_args, mode=..., cassette_dir=..., options=...,
    reverse=..., env=..., script=..., port=...) -> Proxy`; all stopped at teardown.
    Default cassette_dir is tmp_path/"cassettes", shared by all proxies of a test."""
    started: list[Proxy] = []

    def factory(*extra_args: str, **kwargs: Any) -> Proxy:
        kwargs.setdefault("confdir", mitm_confdir)
        proxy = start_proxy(tmp_path, *extra_args, **kwargs)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()
        # Shown by pytest only when the test failed: the mitmdump side of the story.
        print(f"---- {proxy!r} log {proxy.log_path} ----\n{proxy.log_text()[-6000:]}")


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., OpenAIUpstream]]:
    """`upstream_factory(tag="A", **knobs) -> OpenAIUpstream`; stopped at teardown."""
    started: list[OpenAIUpstream] = []

    def factory(tag: str = "A", **knobs: Any) -> OpenAIUpstream:
        up = start_openai_upstream(tag, **knobs)
        started.append(up)
        return up

    yield factory
    for up in started:
        up.stop()


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[OpenAIUpstream]:
    """The fake OpenAI upstream over TLS, with a self-signed certificate (``.cert``)."""
    server = start_tls_openai_upstream(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def upstream(upstream_factory: Callable[..., OpenAIUpstream]) -> OpenAIUpstream:
    """A default fake OpenAI upstream with tag "A"."""
    return upstream_factory("A")


@pytest.fixture
def ollama_upstream() -> Iterator[OllamaUpstream]:
    """A fake Ollama server (native /api/...) with tag "A"; stopped at teardown."""
    up = start_ollama_upstream("A")
    yield up
    up.stop()
