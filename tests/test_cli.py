"""`cassette-proxy ls | show | verify | stats` on real cassette files (click's CliRunner,
and the installed console script once), with their exit codes and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cassette_proxy import catalog
from cassette_proxy.cassette import make_cassette, write_cassette
from cassette_proxy.cli import cli
from cassette_proxy.keys import recording_hash
from cassette_proxy.store import key_of
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "cassettes" / "0806aef47037.json"
CORPUS = REPO / "tests" / "fixtures" / "llama-stack"
CLI = Path(sys.executable).parent / "cassette-proxy"
COMMANDS = ["run", "ls", "show", "verify", "stats", "prune", "import", "drift"]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), prog_name="cassette-proxy", catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The seed and the llama-stack sample, as a user's cassette folder."""
    root = tmp_path / "cassettes"
    shutil.copytree(CORPUS, root)
    shutil.copy(SEED, root)
    return root


def usage_cassette(root: Path, prompt: str, usage: dict[str, int], model: str = "m1") -> Path:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    data = {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"echo {prompt}"},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }
    cassette = make_cassette(
        test_id=None,
        method="POST",
        url="http://127.0.0.1:8000/v1/chat/completions",
        headers={},
        body=body,
        endpoint="/v1/chat/completions",
        model=model,
        response={
            "body": {
                "__type__": "openai.types.chat.chat_completion.ChatCompletion",
                "__data__": data,
            },
            "is_streaming": False,
        },
    )
    path = root / (recording_hash("POST", "/v1/chat/completions", body) + ".json")
    write_cassette(path, cassette)
    return path


def test_help_everywhere_from_the_installed_script() -> None:
    top = subprocess.run([str(CLI), "--help"], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert f"  {name} " in top.stdout
    for name in COMMANDS:
        code, out, _ = invoke(name, "--help")
        assert code == 0, name
        assert "Usage: cassette-proxy " in out and "Example" in out, name
    version = subprocess.run([str(CLI), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("cassette-proxy, version ")


def test_ls_lists_and_filters(folder: Path) -> None:
    code, out, err = invoke("ls", "-d", str(folder), "--wide")
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == [
        "FILE",
        "RECORDED",
        "ENDPOINT",
        "MODEL",
        "STREAMED",
        "CHUNKS",
        "SIZE",
        "TEST",
        "ID",
        "PROMPT",
    ]
    seed = next(line for line in lines if line.startswith("0806aef47037.json"))
    assert seed.split()[3:8] == [
        "POST",
        "/v1/chat/completions",
        "meta-llama/Llama-3.2-1B-Instruct",
        "yes",
        "9",
    ]
    assert len(lines) == 1 + 55  # every file of the folder reads as a cassette
    assert err.strip().endswith("55 cassette(s)")

    _, out, _ = invoke("ls", "-d", str(folder), "--json", "--endpoint", "/api/")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows and all("/api/" in r["endpoint"] for r in rows)
    assert {"file", "endpoint", "model", "streamed", "chunks", "size", "test_id"} <= set(rows[0])

    _, out, _ = invoke("ls", "-d", str(folder), "--json", "--streamed", "--model", "Llama-3.2-1B")
    assert [json.loads(line)["file"] for line in out.splitlines()] == ["0806aef47037.json"]

    _, out, _ = invoke("ls", "-d", str(folder), "--json", "--not-streamed", "--test", "test_files")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows and all(not r["streamed"] and "test_files" in r["test_id"] for r in rows)


def test_ls_missing_folder_is_a_one_line_error(tmp_path: Path) -> None:
    code, out, err = invoke("ls", "-d", str(tmp_path / "nope"))
    assert code == 2  # bad usage, as for a missing PATH and for ``run --mode replay``
    assert err.strip().splitlines() == [
        f"cassette-proxy: no cassette folder at {tmp_path / 'nope'} (see cassette-proxy ls --help)"
    ]


def test_show_puts_the_stream_back_together(folder: Path) -> None:
    code, out, _ = invoke("show", "0806aef4", "-d", str(folder))
    assert code == 0
    assert "request   POST http://localhost:8000/v1/v1/chat/completions" in out
    assert "ChatCompletionChunk, streamed in 9 chunks" in out
    assert "tool call get_weather (id chatcmpl-tool-52543da3e42a4dee83901fc943dd4797):" in out
    assert '{"location": "San Francisco, CA"}' in out
    assert "(finish: tool_calls)" in out

    # by request key prefix (the one a miss names), and by path; --json
    key = key_of(catalog.load_item(SEED, SEED.parent).cassette)[0]  # type: ignore[arg-type]
    code, out, _ = invoke("show", key[:10], "-d", str(folder), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["key"] == key and doc["file"] == "0806aef47037.json"
    [choice] = doc["response"]["choices"]
    assert choice["tool_calls"][0]["arguments"] == '{"location": "San Francisco, CA"}'
    code, out, _ = invoke("show", str(folder / "0806aef47037.json"), "--raw")
    assert out == SEED.read_text()


def test_show_text_of_streams_and_other_kinds(folder: Path) -> None:
    code, out, _ = invoke("show", "0248ff8a", "-d", str(folder), "--json")
    [choice] = json.loads(out)["response"]["choices"]
    assert choice["text"].startswith("<think>\nOkay, the user is asking about the weather")
    assert choice["tool_calls"][0]["name"] == "get_weather"
    _, out, _ = invoke("show", "f1592dee", "-d", str(folder))  # an Ollama chat
    assert "response  ChatResponse" in out and "golden retriever puppy" in out
    assert "usage     prompt_tokens 18, completion_tokens 110, total_tokens 128" in out
    _, out, _ = invoke("show", "ccc13d66", "-d", str(folder))  # a recorded error
    assert "response  error, status 400" in out and "Invalid image (base64) data." in out
    _, out, _ = invoke("show", "2cb6caa8", "-d", str(folder))  # a raw SSE stream
    assert "response  raw-stream" in out and "1, 2, 3, 4, 5" in out


def test_show_errors_are_one_line(folder: Path) -> None:
    code, _, err = invoke("show", "ffffffffff", "-d", str(folder))
    assert code == 1 and err.count("\n") == 1 and "no cassette matches ffffffffff" in err
    code, _, err = invoke("show", "models-64a2277c", "-d", str(folder))
    assert code == 1 and err.count("\n") == 1 and "ambiguous: 2 match models-64a2277c" in err
    code, _, err = invoke("show", "no/such/file.json", "-d", str(folder))
    assert code == 1 and err.count("\n") == 1


def test_verify_sorts_errors_from_warnings(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    shutil.copy(SEED, root)
    good = usage_cassette(
        root, "hello", {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    )
    code, out, err = invoke("verify", "-d", str(root))
    assert (code, out) == (0, "2 cassette(s): 0 error(s), 0 warning(s)\n")

    # a name that is not its hash: a warning, fatal only with --strict
    shutil.copy(good, root / "renamed.json")
    code, out, _ = invoke("verify", "-d", str(root))
    assert code == 0
    [line] = [line for line in out.splitlines() if line.startswith("renamed.json")]
    assert "warning: name does not match the hash of its request" in line
    assert f"(expected {good.name})" in line
    assert "warning: answers the same request as" in line
    code, _, _ = invoke("verify", "-d", str(root), "--strict")
    assert code == 1
    (root / "renamed.json").unlink()

    # data the SDK parses only leniently: a warning
    lenient = json.loads(good.read_text())
    lenient["request"]["body"]["messages"][0]["content"] = "lenient"
    lenient["response"]["body"]["__data__"]["object"] = ""
    body = lenient["request"]["body"]
    (root / (recording_hash("POST", "/v1/chat/completions", body) + ".json")).write_text(
        json.dumps(lenient)
    )
    code, out, _ = invoke("verify", "-d", str(root))
    assert code == 0 and "loads only leniently as ChatCompletion" in out

    # errors: not JSON, not a cassette, a type that does not exist
    (root / "broken.json").write_text("{not json")
    (root / "other.json").write_text('{"hello": 1}')
    unknown = json.loads(SEED.read_text())
    for chunk in unknown["response"]["body"]:
        chunk["__type__"] = "openai.types.chat.NoSuchChunk"
    (root / "0806aef47037.json").write_text(json.dumps(unknown))
    code, out, _ = invoke("verify", "-d", str(root))
    assert code == 1
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert len(errors) == 3
    assert any("broken.json: " in e and "not valid JSON" in e for e in errors)
    assert any("other.json: " in e and "not a cassette" in e for e in errors)
    assert any("unknown type openai.types.chat.NoSuchChunk" in e for e in errors)
    assert out.splitlines()[-1] == "5 cassette(s): 3 error(s), 1 warning(s)"


def test_verify_the_llama_stack_sample(folder: Path) -> None:
    """Real recordings: only the non-HTTP ones (tool calls, file processors) are errors."""
    code, out, _ = invoke("verify", "-d", str(folder))
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert code == 1
    assert len(errors) == 2 and all("unknown type" in e for e in errors)
    assert "ogx_api.tools.ToolInvocationResult" in out
    # names: full hash, 12-char prefix and models-<hash>-<digest8> are all recognised
    names_ok = [
        "0806aef47037.json",
        "3ca695048bee.json",
        "0248ff8a1be5ff5ba88046947059ffbde15a1c52adbeea456bb42abdfc931bd1.json",
        "models-d98e7566147f9d534bc0461f2efe61e3f525c18360a07bb3dda397579e25c27b-bba2e758.json",
    ]
    for name in names_ok:
        assert f"{name}: warning: name does not match" not in out


def test_stats_counts_and_tokens(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    usage_cassette(root, "a", {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}, "m1")
    usage_cassette(
        root, "b", {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}, "m1"
    )
    usage_cassette(root, "c", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "m2")
    shutil.copy(SEED, root)  # a stream without usage
    code, out, _ = invoke("stats", "-d", str(root), "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["cassettes"] == 4 and doc["streamed"] == 1
    assert doc["by_endpoint"] == {"POST /v1/chat/completions": 4}
    assert doc["by_model"] == {"m1": 2, "m2": 1, "meta-llama/Llama-3.2-1B-Instruct": 1}
    assert doc["tokens"] == {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}
    assert doc["tokens_by_model"]["m1"]["total_tokens"] == 18
    code, out, _ = invoke("stats", "-d", str(root))
    assert "tokens recorded: 8 prompt, 12 completion, 20 total" in out
    assert any(line.split() == ["m1", "2", "7", "11", "18"] for line in out.splitlines())


def test_stats_of_the_llama_stack_sample_counts_ollama_tokens(folder: Path) -> None:
    code, out, _ = invoke("stats", "-d", str(folder), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["cassettes"] == 55
    # f1592dee71e5.json, an Ollama chat: prompt_eval_count 18, eval_count 110
    assert doc["tokens_by_model"]["llama3.2-vision:11b"] == {
        "prompt_tokens": 18,
        "completion_tokens": 110,
        "total_tokens": 128,
    }


def test_bad_usage_exits_2() -> None:
    code, _, err = invoke("ls", "--no-such-option")
    assert code == 2 and "No such option" in err
    code, _, err = invoke("run", "--mode", "sometimes")
    assert code == 2 and "'sometimes' is not one of" in err
    code, _, err = invoke("prune")
    assert code == 2 and "--usage-log" in err


def test_modes_are_the_addons() -> None:
    """The CLI and the plugin spell the modes out (so `ls` need not import mitmproxy)."""
    from cassette_proxy import addon, pytest_plugin
    from cassette_proxy import cli as cli_module

    assert cli_module.MODES == addon.MODES == pytest_plugin.MODES
