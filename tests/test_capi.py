"""e2e tier: the C ABI and the C++ example service, built by the project's own build (CMake) in the suite.

- r1c_capi_probe (a C program) calls every function with bad arguments: each returns the right r1c_status and a
  message, never a crash; a greedy run through the C ABI streams the tokens `Engine.generate` gives.
- examples/cpp_server, compiled here, answers the official openai client exactly as `r1c serve` does (same JSON
  apart from id and created; same tokens as the Python API), streaming included, and stops cleanly (exit 0) on
  SIGINT (Ctrl-C) and SIGTERM.
Needs cmake, a C/C++ compiler, Python's headers and libcpp-httplib-dev / nlohmann-json3-dev (.ci/run installs them);
without them the tests skip and say which is missing.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serving_helpers import free_port, http_call, r1c_cmd, server_process, text_bundle, wait_http

from r1c.runtime import load

openai = pytest.importorskip("openai")


def _need(tool: str, path: str | None = None) -> None:
    if shutil.which(tool) is None or (path is not None and not Path(path).exists()):
        pytest.skip(f"needs {path or tool} (apt-get install cmake g++ python3-dev libcpp-httplib-dev "
                    "nlohmann-json3-dev pkg-config)")


@pytest.fixture(scope="module")
def capi(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    _need("cmake")
    _need("cc")
    from r1c.runtime.capi.build import build_capi

    return build_capi(tmp_path_factory.mktemp("capi") / "prefix")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_bundle(tmp_path_factory)


def probe(capi, *args: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    proc = subprocess.run([str(capi.probe), *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


EXPECTED = {  # case -> (status, a piece of the message)
    "open_null_bundle": ("R1C_ERR_INVALID_ARGUMENT", "bundle_dir is NULL"),
    "open_null_out": ("R1C_ERR_INVALID_ARGUMENT", "out is NULL"),
    "open_missing_bundle": ("R1C_ERR_BUNDLE", "is not a directory"),
    "open_bad_json": ("R1C_ERR_INVALID_ARGUMENT", "not JSON"),
    "open_unknown_option": ("R1C_ERR_INVALID_ARGUMENT", "unknown option 'bogus'"),
    "open_ok": ("R1C_OK", ""),
    "submit_null_engine": ("R1C_ERR_INVALID_ARGUMENT", "engine is NULL"),
    "submit_null_ids": ("R1C_ERR_INVALID_ARGUMENT", "ids is NULL"),
    "submit_null_out": ("R1C_ERR_INVALID_ARGUMENT", "out is NULL"),
    "submit_empty_prompt": ("R1C_ERR_INVALID_ARGUMENT", "prompt is empty"),
    "submit_id_out_of_range": ("R1C_ERR_INVALID_ARGUMENT", "out of range [0, 512)"),
    "submit_uninitialized_sampling": ("R1C_ERR_INVALID_ARGUMENT", "r1c_sampling_init"),
    "submit_bad_temperature": ("R1C_ERR_INVALID_ARGUMENT", "temperature must be >= 0"),
    "submit_null_stop_list": ("R1C_ERR_INVALID_ARGUMENT", "stop list is NULL"),
    "submit_never_fits": ("R1C_ERR_OVER_CAPACITY", "more than the cache holds"),
    "submit_bad_utf8": ("R1C_ERR_INVALID_ARGUMENT", "utf-8"),
    "next_null": ("R1C_ERR_INVALID_ARGUMENT", "NULL"),
    "wait_null": ("R1C_ERR_INVALID_ARGUMENT", "NULL"),
    "cancel_null": ("R1C_ERR_INVALID_ARGUMENT", "NULL"),
    "token_str_out_of_range": ("R1C_ERR_INVALID_ARGUMENT", "out of range"),
    "info_null": ("R1C_ERR_INVALID_ARGUMENT", "NULL"),
    "submit_running": ("R1C_OK", ""),
    "submit_waiting": ("R1C_OK", ""),
    "submit_queue_full": ("R1C_ERR_OVER_CAPACITY", "requests are waiting"),
    "next_zero_timeout_on_waiting": ("R1C_ERR_TIMEOUT", "timeout"),
    "cancel_waiting": ("R1C_OK", ""),
    "wait_cancelled": ("R1C_OK", ""),
    "cancelled_finish_reason": ("R1C_OK", "cancelled"),
    "close": ("R1C_OK", ""),
    "close_null": ("R1C_ERR_INVALID_ARGUMENT", "NULL"),
}


def test_bad_arguments_give_codes_and_messages(capi, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    got = {r["case"]: r for r in probe(capi, "errors", str(bundle))}
    assert set(got) == set(EXPECTED)
    for case, (status, piece) in EXPECTED.items():
        assert got[case]["status"] == status, got[case]
        assert piece in got[case]["message"], got[case]
        if status != "R1C_OK":
            assert "Traceback" not in got[case]["message"]


def test_c_abi_streams_the_python_api_tokens(capi, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    engine = load(bundle, session_options={"intra_op_num_threads": 1})
    prompt = [4, 8, 15, 16, 23, 42]
    (out,) = probe(capi, "generate", str(bundle), "10", *map(str, prompt))
    want = engine.generate([prompt], 10)[0]
    assert out["streamed"] == out["token_ids"] == want
    assert out["end"] == "R1C_END" and out["finish_reason"] == "length" and out["prompt_tokens"] == len(prompt)


@pytest.fixture(scope="module")
def cpp_server(capi, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """examples/cpp_server built with CMake against the C ABI prefix: the executable."""
    _need("c++")
    _need("pkg-config", "/usr/include/httplib.h")
    _need("pkg-config", "/usr/include/nlohmann/json.hpp")
    src = Path(__file__).resolve().parents[1] / "examples" / "cpp_server"
    build = tmp_path_factory.mktemp("cpp_server")
    for cmd in (["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_PREFIX_PATH={capi.prefix}"],
                ["cmake", "--build", str(build), "--parallel", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return build / "r1c_cpp_server"


@pytest.fixture(scope="module")
def servers(cpp_server: Path, bundle: Path) -> Iterator[dict[str, str]]:
    py_port, cpp_port = free_port(), free_port()
    py = r1c_cmd("serve", str(bundle), "--port", str(py_port), "--threads", "1", "--model-name", "tiny")
    cpp = [str(cpp_server), str(bundle), "--port", str(cpp_port), "--model-name", "tiny",
           "--options", '{"threads": 1}']
    with server_process(py, py_port) as py_url, server_process(cpp, cpp_port) as cpp_url:
        yield {"python": py_url, "cpp": cpp_url}


@pytest.mark.parametrize("sig, start", [(signal.SIGINT, "default"), (signal.SIGINT, "ignored"),
                                        (signal.SIGTERM, "default")], ids=["SIGINT", "SIGINT-ignored", "SIGTERM"])
def test_cpp_server_stops_cleanly_on_signal(cpp_server: Path, bundle: Path, sig: signal.Signals, start: str) -> None:
    """SIGINT (Ctrl-C) and SIGTERM stop the server: it stops listening, closes the engine and exits 0 (not killed
    by the signal: -2/-15) within a few seconds. "ignored": started with SIGINT ignored, as a background job of
    a non-interactive shell starts it (`server ... &` in a script); its own handler must still take Ctrl-C."""
    port = free_port()
    cmd = [str(cpp_server), str(bundle), "--port", str(port), "--options", '{"threads": 1}']
    if start == "ignored":
        cmd = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        status, _ = http_call("POST", f"http://127.0.0.1:{port}/v1/completions",
                              json.dumps({"model": bundle.name, "prompt": [1, 2], "max_tokens": 2}).encode())
        assert status == 200
        proc.send_signal(sig)
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert code == 0, out
    assert f"{sig.name}, stopping" in out and out.rstrip().endswith("r1c_cpp_server: stopped"), out


def _same(a: Any, b: Any) -> None:
    """Equal JSON apart from id and created (floats to 1e-9: both servers run the same engine code)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (a, b)
        for k in a:
            if k not in ("id", "created"):
                _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-9)
    else:
        assert a == b


REQUESTS: list[dict[str, Any]] = [
    {"prompt": [3, 17, 99, 250, 7], "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}},
    {"prompt": "the lazy dog", "max_tokens": 10, "temperature": 0, "logprobs": 2, "extra_body": {"ignore_eos": True}},
    {"prompt": "hex the fox", "max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "seed": 7, "stop": ["o"]},
    {"prompt": [9, 9, 9], "max_tokens": 6, "temperature": 1.0, "seed": 3, "logprobs": 0,
     "extra_body": {"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.2}},
]


@pytest.mark.parametrize("stream", [False, True])
def test_cpp_server_answers_like_r1c_serve(servers: dict[str, str], bundle: Path, stream: bool) -> None:
    clients = {k: openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0, timeout=60) for k, u in servers.items()}
    engine = load(bundle, session_options={"intra_op_num_threads": 1})
    for req in REQUESTS:
        answers = {}
        for name, c in clients.items():
            kw = dict(req, model="tiny", stream=stream)
            if stream:
                kw["stream_options"] = {"include_usage": True}
                answers[name] = [ch.model_dump() for ch in c.completions.create(**kw)]
            else:
                answers[name] = c.completions.create(**kw).model_dump()
        _same(answers["python"], answers["cpp"])
        if req["temperature"] == 0 and isinstance(req["prompt"], list):
            chunks = answers["cpp"] if stream else [answers["cpp"]]
            ids = [t for ch in chunks for choice in ch["choices"] for t in choice["token_ids"]]
            assert ids == engine.generate([req["prompt"]], req["max_tokens"])[0]


def test_cpp_server_models_health_and_errors(servers: dict[str, str]) -> None:
    for path in ("/health", "/v1/models"):
        a, b = (http_call("GET", u + path) for u in servers.values())
        assert a[0] == b[0] == 200
        _same(json.loads(a[1]), json.loads(b[1]))
    bad = [b'{"model": "nope", "prompt": [1]}', b'{"model": "tiny", "prompt": [1], "temperature": -1}',
           b'{"model": "tiny", "prompt": [100000]}', b'{"model": "tiny", "prompt": [1, 2], "max_tokens": 100000}',
           b'{"model": "tiny", "prompt": []}', b'{"model": "tiny", "prompt": [1], "n": 2}']
    for body in bad:
        a, b = (http_call("POST", u + "/v1/completions", body) for u in servers.values())
        assert a[0] == b[0] and 400 <= a[0] < 500, (body, a, b)
        _same(json.loads(a[1]), json.loads(b[1]))
    for body in (b"{not json", b'{"model": "tiny"}'):  # parser messages differ; status and error shape do not
        a, b = (http_call("POST", u + "/v1/completions", body) for u in servers.values())
        assert a[0] == b[0] == 400 and set(json.loads(a[1])["error"]) == set(json.loads(b[1])["error"])
        if body.startswith(b"{not"):
            assert all(json.loads(x[1])["error"]["message"].startswith("the request body is not valid JSON: ")
                       for x in (a, b)), (a, b)


def test_call_cost_measurement_runs(capi, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    """The C ABI call-cost measurement of `r1c bench-serving` (libr1c loaded into this interpreter by ctypes)."""
    from r1c.runtime.capi.callcost import measure

    got = measure(capi.library, bundle, calls=400, blocks=2)
    assert set(got) == {"engine_info", "next_ready", "submit_cancel"}
    assert all(v["c_us"] > 0 and v["python_us"] > 0 for v in got.values())
