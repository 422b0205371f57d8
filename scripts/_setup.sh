# Sourced by scripts/run, scripts/test and scripts/bench: make .venv/ on first use.
# Needs Python 3.12+ (mitmproxy 12). Set CASSETTE_PYTHON to choose the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local candidates=()
    [ -n "${CASSETTE_PYTHON:-}" ] && candidates+=("$CASSETTE_PYTHON")
    candidates+=(python3.13 python3.12 python3.14)
    local root
    if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then
        candidates+=("$root"/versions/3.1[2-9]*/bin/python3)
    fi
    candidates+=("$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3 /usr/bin/python3 python3)
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 && python_ok "$c"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    local stamp="$VENV/.installed" want
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ] || ! python_ok "$VENV/bin/python"; then
        local py
        if ! py="$(find_python)"; then
            echo "cassette-proxy needs Python 3.12 or newer (mitmproxy 12 does), and none was found." >&2
            echo "Install one (e.g. 'pyenv install 3.12'), or set CASSETTE_PYTHON=/path/to/python3.12." >&2
            exit 1
        fi
        echo "setting up $VENV with $py ($("$py" --version 2>&1))" >&2
        rm -rf "$VENV"
        "$py" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2 || true
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" >&2
    # scripts/run starts the proxy with -O: compile that bytecode once, so a start does not
    # recompile mitmproxy (e.g. where PYTHONDONTWRITEBYTECODE is set).
    "$VENV/bin/python" -O -m compileall -q -j 0 "$VENV/lib" >/dev/null 2>&1 || true
    echo "$want" > "$stamp"
}

ensure_venv
