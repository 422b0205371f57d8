"""Host any addon script in the lean master (benchmark helper).

Usage: ``python bench/host.py SCRIPT|none [--slow] NAME=VALUE...``.

``SCRIPT`` is a file with ``addons = [...]`` like ``mitmdump -s`` takes; ``none`` hosts no
addon (plain forwarding); ``--slow`` keeps mitmproxy's per-addon hook dispatch.
"""

from __future__ import annotations

import runpy
import sys

from cassette_proxy.lean import run_master


class _Nothing:
    """A placeholder addon for plain forwarding."""


def main(argv: list[str]) -> int:
    script, *rest = argv
    slow = "--slow" in rest
    sets = [a for a in rest if a != "--slow"]
    if "--listen-port" in sets:  # mitmdump's flag, for symmetry in the benchmark
        i = sets.index("--listen-port")
        sets[i : i + 2] = [f"listen_port={sets[i + 1]}"]
    if script == "none":
        addon: object = _Nothing()
    else:
        addon = runpy.run_path(script)["addons"][0]
    return run_master(sets, addon, fast_dispatch=not slow)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
