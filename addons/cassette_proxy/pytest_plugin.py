"""The pytest plugin: a cassette proxy for the test session, a test id per test.

Loaded by the ``pytest11`` entry point once cassette-proxy is installed. Nothing starts
until a test asks for one of its fixtures:

``cassette_proxy`` (session)
    ``cassette-proxy run`` in a subprocess, in the mode and folder configured (ini
    ``cassette_mode`` / ``cassette_dir``, or ``--cassette-mode`` / ``--cassette-dir``),
    and the printed client environment (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``SSL_CERT_FILE``, ...) set in ``os.environ`` for the session, so subprocesses a
    test starts (curl, node, a server under test) go through it.
``cassette_test_id``, ``cassette_headers``
    the test's node id, and ``{"X-Cassette-Test-Id": node id}`` for any client.
``cassette_http_client``, ``cassette_openai_client``
    an ``httpx.Client`` / ``openai.OpenAI`` wired to the proxy that sends the test id
    with every request, so each test's cassettes go in a folder of their own.
``@pytest.mark.cassette_fault("status=429,times=1")``
    sends ``X-Cassette-Fault`` with every request of the test's clients (and puts it in
    ``cassette_headers``): the proxy answers with that fault (faults.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MODES = ("auto", "record", "replay", "record-if-missing", "passthrough")
SCOPES = ("lenient", "strict")
TEST_ID_HEADER = "X-Cassette-Test-Id"
FAULT_HEADER = "X-Cassette-Fault"
_PROXY_VARS = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
)  # fmt: skip
_SUMMARY = pytest.StashKey["CassetteProxy"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cassette-proxy", "cassette-proxy: record and replay LLM traffic")
    group.addoption("--cassette-mode", choices=MODES, help="Overrides ini cassette_mode.")
    group.addoption("--cassette-dir", help="Overrides ini cassette_dir.")
    group.addoption("--cassette-reverse", metavar="URL", help="Overrides ini cassette_reverse.")
    group.addoption("--cassette-usage-log", help="Log the cassettes used (for `prune`).")
    group.addoption(
        "--cassette-test-scope", choices=SCOPES, help="Overrides ini cassette_test_scope."
    )
    parser.addini("cassette_mode", f"Proxy mode: {', '.join(MODES)}.", default="auto")
    parser.addini("cassette_dir", "Cassette folder, relative to the rootdir.", default="cassettes")
    parser.addini("cassette_reverse", "Reverse mode: the upstream's base URL.", default="")
    parser.addini(
        "cassette_test_scope",
        "strict: a test is answered only from its own recordings; lenient (default): "
        "from another test's when it has none.",
        default="lenient",
    )
    parser.addini(
        "cassette_openai_base_url",
        "Base URL of cassette_openai_client in forward mode.",
        default="http://127.0.0.1:8000/v1",
    )
    parser.addini("cassette_proxy_args", "More `cassette-proxy run` arguments.", type="args")
    parser.addini(
        "cassette_set_env", "Set HTTP(S)_PROXY etc. for the session.", type="bool", default=True
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cassette_fault(spec): send X-Cassette-Fault: spec (status=NNN, delay-ms=N, "
        "cut-after=N, times=N; comma-separated) with every request of this test's "
        "cassette clients",
    )


@dataclass
class CassetteProxy:
    """A running ``cassette-proxy run``."""

    url: str  # where the proxy listens
    mode: str
    cassette_dir: Path
    reverse: str | None
    ca_cert: Path
    env: dict[str, str]  # the lines it printed for clients
    proc: subprocess.Popen[bytes]
    log_path: Path
    summary: str = field(default="")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for line in self.output().splitlines():
            if line.startswith("cassette-proxy: ") and " hits, " in line:
                self.summary = line
        return self.proc.returncode


def _setting(config: pytest.Config, name: str) -> Any:
    given = config.getoption(f"--{name.replace('_', '-')}", default=None)
    return given if given not in (None, "") else config.getini(name)


def _given_port(args: list[str]) -> int | None:
    """A port the user put in ``cassette_proxy_args`` (``--listen-port N``, ``-p N``,
    ``--listen-port=N``, ``--set listen_port=N``): the proxy listens there, as asked."""
    port = None
    for i, arg in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else ""
        if arg in ("--listen-port", "-p"):
            port = nxt
        elif arg.startswith("--listen-port="):
            port = arg.partition("=")[2]
        elif arg == "--set" and nxt.startswith("listen_port="):
            port = nxt.partition("=")[2]
    if port is None:
        return None
    try:
        return int(port)
    except ValueError:
        raise pytest.UsageError(f"cassette_proxy_args: {port!r} is not a port") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_proxy(config: pytest.Config, workdir: Path, timeout: float = 30.0) -> CassetteProxy:
    mode = str(_setting(config, "cassette_mode"))
    if mode not in MODES:
        raise pytest.UsageError(f"cassette_mode must be one of {', '.join(MODES)}, not {mode!r}")
    folder = Path(str(_setting(config, "cassette_dir")))
    if not folder.is_absolute():
        folder = config.rootpath / folder
    reverse = str(_setting(config, "cassette_reverse") or "") or None
    confdir = workdir / "confdir"
    base = [sys.executable, "-m", "cassette_proxy.cli", "run", "--mode", mode]
    base += ["-d", str(folder), "--confdir", str(confdir)]
    if reverse:
        base += ["--reverse", reverse]
    usage = config.getoption("--cassette-usage-log", default=None)
    if usage:
        base += ["--usage-log", str(Path(usage).resolve())]
    scope = str(_setting(config, "cassette_test_scope"))
    if scope not in SCOPES:
        raise pytest.UsageError(
            f"cassette_test_scope must be one of {', '.join(SCOPES)}, not {scope!r}"
        )
    if scope != "lenient":
        base += ["--set", f"cassette_test_scope={scope}"]
    extra = list(config.getini("cassette_proxy_args") or [])
    base += extra
    wanted = _given_port(extra)
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    for attempt in range(3):  # a free port can be taken before the proxy binds it
        port = wanted or _free_port()
        log_path = workdir / f"cassette-proxy-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                base if wanted else [*base, "--listen-port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            time.sleep(0.05)
        # The client lines are printed just after the port opens (`run` prints them once
        # it listens): wait for them.
        while time.monotonic() < deadline and proc.poll() is None:
            if "# cassette-proxy " in log_path.read_text(errors="replace"):
                break
            time.sleep(0.05)
        output = log_path.read_text(errors="replace")
        if proc.poll() is None and time.monotonic() < deadline:
            exports = dict(
                line.removeprefix("export ").split("=", 1)
                for line in output.splitlines()
                if line.startswith("export ")
            )
            return CassetteProxy(
                url=f"http://127.0.0.1:{port}",
                mode=mode,
                cassette_dir=folder,
                reverse=reverse,
                ca_cert=confdir / "mitmproxy-ca-cert.pem",
                env=exports,
                proc=proc,
                log_path=log_path,
            )
        if proc.poll() is None:
            proc.kill()
        if "address already in use" not in output or attempt == 2 or wanted:
            # Once for the session, not once per test that asks for the proxy: the
            # reason (a replay folder that is not there, a port taken) is the same.
            pytest.exit(f"cassette-proxy did not start:\n{output.strip()}", returncode=4)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def cassette_proxy(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CassetteProxy]:
    """The session's cassette proxy; its client environment is set while it runs."""
    proxy = start_proxy(pytestconfig, tmp_path_factory.mktemp("cassette-proxy"))
    pytestconfig.stash[_SUMMARY] = proxy
    with pytest.MonkeyPatch.context() as mp:
        if pytestconfig.getini("cassette_set_env"):
            for name, value in proxy.env.items():
                mp.setenv(name, value)
            if not proxy.reverse:
                for name in ("NO_PROXY", "no_proxy"):  # a local upstream must not bypass it
                    mp.delenv(name, raising=False)
        try:
            yield proxy
        finally:
            proxy.stop()


@pytest.fixture
def cassette_test_id(request: pytest.FixtureRequest) -> str:
    """The id this test's cassettes are recorded and looked up under: its node id."""
    return request.node.nodeid


@pytest.fixture
def cassette_fault(request: pytest.FixtureRequest) -> str | None:
    """The ``X-Cassette-Fault`` value this test's ``cassette_fault`` marker asks for."""
    marker = request.node.get_closest_marker("cassette_fault")
    if marker is None:
        return None
    parts = [str(a).strip() for a in marker.args if str(a).strip()]
    if not parts or marker.kwargs:
        raise pytest.UsageError(
            f'{request.node.nodeid}: write @pytest.mark.cassette_fault("status=429"), '
            "one or more strings, comma-separated"
        )
    return ",".join(parts)


@pytest.fixture
def cassette_headers(cassette_test_id: str, cassette_fault: str | None) -> dict[str, str]:
    """Headers that tie a request to this test (and its fault marker); add them to any
    client."""
    headers = {TEST_ID_HEADER: cassette_test_id}
    if cassette_fault:
        headers[FAULT_HEADER] = cassette_fault
    return headers


@pytest.fixture
def cassette_http_client(
    cassette_proxy: CassetteProxy, cassette_headers: dict[str, str]
) -> Iterator[Any]:
    """An ``httpx.Client`` through the proxy (or at it, in reverse mode) with the test id."""
    import httpx

    if cassette_proxy.reverse:
        client = httpx.Client(
            base_url=cassette_proxy.url, headers=cassette_headers, trust_env=False, timeout=60
        )
    else:
        verify = ssl.create_default_context(cafile=str(cassette_proxy.ca_cert))
        client = httpx.Client(
            proxy=cassette_proxy.url,
            verify=verify,
            headers=cassette_headers,
            trust_env=False,
            timeout=60,
        )
    with client:
        yield client


@pytest.fixture
def cassette_openai_client(
    cassette_proxy: CassetteProxy, cassette_http_client: Any, pytestconfig: pytest.Config
) -> Any:
    """An ``openai.OpenAI`` client whose requests carry the test id.

    Its base URL is ini ``cassette_openai_base_url`` (forward mode) or the proxy's
    ``/v1`` (reverse mode); the API key is ``OPENAI_API_KEY`` or a placeholder.
    """
    import openai

    if cassette_proxy.reverse:
        base_url = f"{cassette_proxy.url}/v1"
    else:
        base_url = str(pytestconfig.getini("cassette_openai_base_url"))
    return openai.OpenAI(
        base_url=base_url,
        api_key=os.environ.get("OPENAI_API_KEY") or "sk-cassette-placeholder",
        http_client=cassette_http_client,
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test that failed on a cassette miss is told how to record its request."""
    outcome = yield
    report = outcome.get_result()
    proxy = item.config.stash.get(_SUMMARY, None)
    if proxy is None or not report.failed or call.excinfo is None:
        return
    from .answers import MISS_START, pytest_miss_hint

    if MISS_START in str(call.excinfo.value) or MISS_START in report.longreprtext:
        report.sections.append(("cassette-proxy", pytest_miss_hint(proxy.mode)))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    proxy = config.stash.get(_SUMMARY, None)
    if proxy is not None and proxy.summary:
        terminalreporter.write_line(f"{proxy.summary} ({proxy.mode} mode, {proxy.cassette_dir})")
