"""`cassette-proxy run` as a subprocess, for tests that go through the real CLI.

The environment a client gets is parsed from the `export NAME=value` lines the
command prints at start, so every test that uses `CliProxy.env` also proves those
lines are right.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import HOST, LANE_OFF, ensure_ca, free_port

CLI = Path(sys.executable).parent / "cassette-proxy"
_PROXY_VARS = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
)  # fmt: skip


class CliProxy:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def exports(self) -> dict[str, str]:
        """The `export NAME=value` lines printed at start."""
        found = {}
        for line in self.output().splitlines():
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                found[name] = value
        return found

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ without foreign proxy settings, plus the printed lines."""
        base = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
        return base | self.exports() | extra

    def wait_for(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in cassette-proxy output:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_cli_proxy(
    tmp_path: Path,
    *args: str,
    confdir: Path | None = None,
    startup_timeout: float = 30.0,
) -> CliProxy:
    """`cassette-proxy run --listen-port <free> --confdir <confdir> *args`, ready to serve."""
    confdir = confdir or tmp_path / "mitm-confdir"
    ensure_ca(confdir)
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    for attempt in range(3):  # free_port() can race with another process
        port = free_port()
        log_path = tmp_path / f"cassette-proxy-{port}.log"
        argv = [str(CLI), "run", "--listen-port", str(port), "--confdir", str(confdir), *args]
        if LANE_OFF and "cassette_lane=false" not in args:
            argv += ["--set", "cassette_lane=false"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=tmp_path,
            )  # fmt: skip
        proxy = CliProxy(proc, port, log_path)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                socket.create_connection((HOST, port), timeout=0.2).close()
                # The client lines follow the port's opening (printed once it listens).
                proxy.wait_for("# cassette-proxy ", max(deadline - time.monotonic(), 1.0))
                return proxy
            time.sleep(0.05)
        if proc.poll() is None:
            proxy.stop()
            raise AssertionError(f"cassette-proxy not listening:\n{proxy.output()}")
        if "address already in use" not in proxy.output() or attempt == 2:
            raise AssertionError(f"cassette-proxy exited ({proc.returncode}):\n{proxy.output()}")
    raise AssertionError("unreachable")
