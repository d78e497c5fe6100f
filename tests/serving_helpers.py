"""Shared by the serving tests: a tiny checkpoint with a tokenizer, exported and built once per test session;
greedy references from `Engine.generate`; a server process on 127.0.0.1 with bounded waits.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import preset
from r1c.exporter.checkpoint import random_checkpoint, save_checkpoint

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
# Near-tie tolerance for "same greedy tokens": the batch changes ONNX Runtime's MoE sums at the 1e-7 level, so a
# token may differ only where the reference's top-2 logits are closer than this.
TIE_TOL = 1e-4


def make_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE (the kind DeepSeek ships) over an ASCII alphabet, trained to exactly `vocab_size` tokens,
    <bos> = 0 and <eos> = 1 like the presets, with a chat template in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ascii_alphabet = [chr(b) for b in range(33, 127)] + ["Ġ", "Ċ"]  # byte-level images of printable ASCII, space, \n
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bumpkins near "
             "misty harbors and amber fields of golden wheat under silver clouds").split()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, size=12)) + f" {i} {i * 7919 % 1000}." for i in range(3000)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<|user|>",
                                                                         "<|assistant|>", "<|system|>"],
                                  initial_alphabet=ascii_alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "chat_template": CHAT_TEMPLATE}))


def cli(*args: str) -> None:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.stderr


def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset (seed 3) with a tokenizer, exported and built once per session (shared by test modules)."""
    root = tmp_path_factory.getbasetemp() / "serving-tiny"
    bundle = root / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    root.mkdir(parents=True, exist_ok=True)
    config = preset("tiny")
    save_checkpoint(root / "ckpt", config, random_checkpoint(config, seed=3))
    make_tokenizer(root / "ckpt", config.vocab_size)
    cli("export", str(root / "ckpt"), "-o", str(root / "export"), "--no-progress")
    cli("build", str(root / "export"), "-o", str(bundle), "--threads", "1")
    return bundle


def mixed_requests(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of mixed lengths: prompts 1..60 tokens, outputs 1..20 tokens."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(2, vocab, size=int(rng.integers(1, 61))).tolist(), int(rng.integers(1, 21)))
            for _ in range(n)]


def greedy_margins(engine, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The reference's top-1 minus top-2 logit at each generated position (one forward over prompt + tokens)."""
    logits = engine.forward([list(prompt) + list(tokens)])[0, len(prompt) - 1:]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def assert_same_greedy(engine, prompt: Sequence[int], got: Sequence[int], want: Sequence[int]) -> bool:  # type: ignore[no-untyped-def]
    """`got` equals `want`, or first differs where the reference's top-2 logits are within TIE_TOL (a float tie).
    Returns True if they are identical."""
    if list(got) == list(want):
        return True
    assert len(got) == len(want), (got, want)
    first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    margin = greedy_margins(engine, prompt, want)[first]
    assert margin < TIE_TOL, f"greedy tokens differ at {first} where the reference margin is {margin}: {got} {want}"
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_call(method: str, url: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, str]:
    """(status, body text) of one request (stdlib http.client: no client library of its own in the way)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body,
                     headers={"Content-Type": "application/json"} if body is not None else {})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def openai_client(url: str) -> Any:
    """The official openai client for a server's base URL (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(url: str, name: str) -> float:
    """One sample of a server's /metrics (the first line of that name)."""
    for line in http_call("GET", url + "/metrics")[1].splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"server exited with {proc.returncode}: {out[-3000:]}")
        with contextlib.suppress(OSError):
            if http_call("GET", url, timeout=2.0)[0] == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a server command until the block ends; yields its base URL once /health answers."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def r1c_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "r1c.cli", *args]
