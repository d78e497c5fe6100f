"""e2e tier: `r1c serve` (a subprocess on 127.0.0.1) against the official `openai` client — completions with
token-id and text prompts, streaming, chat — and against raw HTTP for errors, metrics and client disconnects.

References: the same requests through the Python API (`Engine.generate` greedy; the bundle's tokenizer for text).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_helpers import free_port, http_call, metric, r1c_cmd, server_process, text_bundle
from serving_helpers import openai_client as client

from r1c.runtime import load
from r1c.runtime.serving.text import TextCodec

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[str]:
    port = free_port()
    cmd = r1c_cmd("serve", str(bundle), "--port", str(port), "--threads", "1", "--max-num-seqs", "8",
                  "--model-name", "tiny")
    with server_process(cmd, port) as url:
        yield url


@pytest.fixture(scope="module")
def ref(bundle: Path):  # type: ignore[no-untyped-def]
    engine = load(bundle, session_options={"intra_op_num_threads": 1})
    return engine, TextCodec.from_dir(bundle)


def test_completions_ids_and_text_match_the_python_api(server: str, ref) -> None:  # type: ignore[no-untyped-def]
    engine, codec = ref
    c = client(server)
    prompt = [3, 17, 99, 250, 7]
    want = engine.generate([prompt], 12)[0]
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].model_extra["token_ids"] == want
    assert r.choices[0].text == codec.decode(want) and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12

    chunks = list(c.completions.create(model="tiny", prompt="the lazy dog", max_tokens=10, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True}))
    ids = codec.encode("the lazy dog")
    want = engine.generate([ids], 10)[0]
    assert [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]] == want
    assert "".join(ch.choices[0].text for ch in chunks) == codec.decode(want)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_streaming_ids_and_nonstreaming_text_agree(server: str, ref) -> None:  # type: ignore[no-untyped-def]
    engine, codec = ref
    c = client(server)
    stream = c.completions.create(model="tiny", prompt=[40, 41, 42], max_tokens=8, temperature=0, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    got = [t for ch in chunks[:-1] for t in ch.choices[0].model_extra["token_ids"]]
    assert got == engine.generate([[40, 41, 42]], 8)[0]
    whole = c.completions.create(model="tiny", prompt=codec.decode([40, 41, 42]), max_tokens=8, temperature=0,
                                 logprobs=2, extra_body={"ignore_eos": True})
    lp = whole.choices[0].logprobs
    assert len(lp.token_logprobs) == 8 and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.tokens == [codec.token_str(t) for t in whole.choices[0].model_extra["token_ids"]]


def test_chat_completions(server: str, ref) -> None:  # type: ignore[no-untyped-def]
    engine, codec = ref
    c = client(server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hex the fox"}]
    ids = codec.encode(codec.apply_chat_template(messages), add_special_tokens=False)
    want = engine.generate([ids], 9)[0]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == codec.decode(want) and r.usage.prompt_tokens == len(ids)
    deltas = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == codec.decode(want)


def test_models_health_metrics(server: str) -> None:
    assert http_call("GET", server + "/health")[0] == 200
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    client(server).completions.create(model="tiny", prompt=[5, 6], max_tokens=3)
    text = http_call("GET", server + "/metrics")[1]
    for name in ("r1c_queue_length", "r1c_running_sequences", "r1c_cache_usage_ratio", "r1c_cache_used_tokens",
                 "r1c_time_to_first_token_seconds_bucket", "r1c_time_per_output_token_seconds_bucket",
                 "r1c_generation_tokens_total"):
        assert name in text, name
    assert metric(server, "r1c_time_to_first_token_seconds_count") >= 1


def test_bad_requests_get_openai_errors(server: str) -> None:
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt=[1], max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="tiny", prompt=[1], max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="out of range"):
        c.completions.create(model="tiny", prompt=[100000], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="stop token id 100000 is out of range"):
        c.completions.create(model="tiny", prompt=[1], max_tokens=2, extra_body={"stop_token_ids": [100000]})
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.completions.create(model="tiny", prompt=[1, 2], max_tokens=100000)
    for body, status in ((b"{not json", 400), (b'{"model": "tiny"}', 400), (b'{"model": "tiny", "prompt": []}', 400)):
        code, text = http_call("POST", server + "/v1/completions", body)
        assert code == status and set(json.loads(text)["error"]) == {"message", "type", "param", "code"}, text
    for body, message in ((b"{not json", "the request body is not valid JSON: Expecting property name enclosed in "
                                         "double quotes (at character 1)"),
                          (b'{"model": "tiny",}', "the request body is not valid JSON: Expecting property name "
                                                  "enclosed in double quotes (at character 17)"),
                          (b"", "the request body is empty (expected a JSON object)")):
        code, text = http_call("POST", server + "/v1/completions", body)
        assert code == 400 and json.loads(text)["error"]["message"] == message, text
    code, text = http_call("GET", server + "/v1/nothing")
    assert code == 404 and "error" in json.loads(text)


def test_client_disconnect_cancels_and_frees_the_cache(server: str) -> None:
    cancelled = metric(server, "r1c_requests_cancelled_total")
    body = {"model": "tiny", "prompt": list(range(2, 50)), "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    host, port = server.removeprefix("http://").split(":")
    for stream in (True, False):  # a stream the client stops reading, and a whole answer it stops waiting for
        raw = json.dumps({**body, "stream": stream}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
            if stream:
                assert b"data: " in s.recv(65536) or b"data: " in s.recv(65536)
            deadline = time.monotonic() + 20
            while metric(server, "r1c_running_sequences") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
    deadline = time.monotonic() + 20
    while not (metric(server, "r1c_requests_cancelled_total") >= cancelled + 2
               and metric(server, "r1c_running_sequences") == 0 and metric(server, "r1c_cache_used_tokens") == 0):
        assert time.monotonic() < deadline, "the disconnected requests were not cancelled"
        time.sleep(0.05)
