"""Bad input, one table: every case is a command line of export, optimize, inspect, build, run, bench, verify, serve,
capi or bench-serving that must
fail with exactly one line `r1c: error: ...` naming the problem, the exit code in the table (1: bad input,
2: a command line click cannot parse; bench's 3 is for a real regression only, never for an input error), and
leave every file it could touch as it was (the test snapshots the case's directory and the shared export and
bundle, bytes included, before and after: nothing half-written, no hidden partial directory, a pre-existing
output untouched).

To add a case (e.g. for `r1c serve`): one `Case(...)` row; `args` gets the `World` (paths of a tiny checkpoint,
its export and bundle, and the case's own empty directory, where it may prepare inputs) and returns the
command line. `python -m pytest tests/test_bad_input.py -k <id>` runs one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import cli, error_line

from r1c.config import preset
from r1c.exporter.checkpoint import random_checkpoint, save_checkpoint

CONFIG = preset("tiny")
VOCAB = CONFIG.vocab_size


@dataclasses.dataclass(frozen=True)
class World:
    """What a case may use: shared artifacts (read-only for the case) and its own empty directory `tmp`."""

    ckpt: Path
    export: Path
    bundle: Path
    foreign: Path  # an `r1c optimize` output of a foreign model (no config.json)
    tmp: Path


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[World], list[str | Path]]
    message: str  # a piece of the one error line
    code: int = 1
    env: Callable[[World], dict[str, str]] | None = None  # environment variables the command runs with


# ---- helpers that prepare inputs inside the case's directory ---------------------------------------------------
def _ckpt_with(w: World, name: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Path:
    tensors = random_checkpoint(CONFIG, seed=1)
    tensors[name] = edit(tensors[name])
    save_checkpoint(w.tmp / "ckpt", CONFIG, tensors)
    return w.tmp / "ckpt"


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[5] = float("-inf")
    return t


def _file(w: World, name: str, content: bytes | str = b"") -> Path:
    path = w.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _copy(src: Path, w: World, name: str, edit: Callable[[Path], None] | None = None) -> Path:
    dst = w.tmp / name
    shutil.copytree(src, dst)
    if edit is not None:
        edit(dst)
    return dst


def _edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        d = json.loads((directory / name).read_text())
        change(d)
        (directory / name).write_text(json.dumps(d))
    return edit


def _write(name: str, content: bytes | str) -> Callable[[Path], None]:
    """An edit for `_copy`: the copy's file `name` replaced by `content`."""
    def edit(directory: Path) -> None:
        (directory / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return edit


def _set(key: str, value: object) -> Callable[[dict], object]:
    return lambda d: d.__setitem__(key, value)


def _session(key: str, value: object) -> Callable[[dict], object]:
    """A manifest edit: target_options.session[key] = value."""
    return lambda d: d["target_options"]["session"].__setitem__(key, value)


def _existing_output(w: World) -> Path:
    out = w.tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


def _read_only_parent(w: World) -> Path:
    """A directory this process cannot create entries in (root ignores modes: then a read-only mount)."""
    parent = w.tmp / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        (parent / "probe").mkdir()
    except OSError:
        return parent / "out"
    (parent / "probe").rmdir()
    for candidate in (Path("/sys"), Path("/proc/sys")):
        try:
            (candidate / "r1c-probe").mkdir()
        except OSError:
            return candidate / "r1c-out"
        (candidate / "r1c-probe").rmdir()
    pytest.skip("no directory here refuses to be written (running as root on writable mounts)")


def _bench(w: World, *args: str | Path) -> list[str | Path]:
    return ["bench", w.bundle, "--warmup", "0", "--repeat", "3", "--no-roofline", "--no-progress", *args]


def _run(w: World, *args: str | Path) -> list[str | Path]:
    return ["run", w.bundle, *args]


def _serve(w: World, *args: str | Path) -> list[str | Path]:
    """`r1c serve` on the shared bundle, port 0 unless a case names one (every case must fail before it listens)."""
    return ["serve", w.bundle, "--port", "0", *args]


def _bench_serving(w: World, *args: str | Path) -> list[str | Path]:
    return ["bench-serving", w.bundle, "--capi-calls", "0", "--bucket-rows", "0", "--long-prompt", "0", *args]


_HELD: list[socket.socket] = []  # sockets a case keeps listening while it runs (closed after each case)


def _busy_port(w: World) -> str:
    """A port of 127.0.0.1 that a listening socket of this process holds."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    _HELD.append(s)
    return str(s.getsockname()[1])


CASES = [
    # export
    Case("export-missing-checkpoint", lambda w: ["export", w.tmp / "nope", "-o", w.tmp / "out"], "not found"),
    Case("export-checkpoint-and-preset", lambda w: ["export", w.ckpt, "--preset", "tiny", "-o", w.tmp / "out"],
         "not both"),
    Case("export-no-source", lambda w: ["export", "-o", w.tmp / "out"], "either a checkpoint directory"),
    Case("export-output-empty-string", lambda w: ["export", "--preset", "tiny", "-o", ""],
         "it must name a new directory"),
    Case("export-output-parent-is-a-file",
         lambda w: ["export", "--preset", "tiny", "-o", _file(w, "file") / "out"], "is not a directory"),
    Case("export-output-parent-read-only", lambda w: ["export", "--preset", "tiny", "-o", _read_only_parent(w)],
         "cannot create"),
    Case("export-output-exists", lambda w: ["export", "--preset", "tiny", "-o", _existing_output(w)],
         "exists and is not an empty directory"),
    Case("export-output-is-a-file", lambda w: ["export", "--preset", "tiny", "-o", _file(w, "out", "x")],
         "exists and is a file"),
    Case("export-config-not-json", lambda w: ["export", _copy(w.ckpt, w, "c", _write("config.json", "{oops")),
                                              "-o", w.tmp / "out"],
         "not valid JSON"),
    Case("export-int32-weight", lambda w: ["export", _ckpt_with(w, "model.norm.weight", lambda t: t.to(torch.int32)),
                                           "-o", w.tmp / "out"], "tensor model.norm.weight has dtype int32"),
    Case("export-uint8-weight", lambda w: ["export", _ckpt_with(w, "lm_head.weight", lambda t: t.to(torch.uint8)),
                                           "-o", w.tmp / "out"], "tensor lm_head.weight has dtype uint8"),
    Case("export-nan-weight", lambda w: ["export", _ckpt_with(w, "model.layers.0.self_attn.o_proj.weight", _nan),
                                         "-o", w.tmp / "out"],
         "model.layers.0.self_attn.o_proj.weight holds 1 non-finite"),
    Case("export-inf-weight", lambda w: ["export", _ckpt_with(w, "model.embed_tokens.weight", _inf),
                                         "-o", w.tmp / "out"], "model.embed_tokens.weight holds 1 non-finite"),
    Case("export-truncated-shard", lambda w: ["export", _copy(w.ckpt, w, "c", _write("model.safetensors", b"\x10\x00")),
                                              "-o", w.tmp / "out"],
         "truncated or corrupt"),
    Case("export-unknown-preset", lambda w: ["export", "--preset", "huge", "-o", w.tmp / "out"],
         "Invalid value for '--preset'", 2),
    Case("export-r1-preset-random-weights", lambda w: ["export", "--preset", "r1", "-o", w.tmp / "out"],
         "cannot be made here"),
    # optimize and inspect
    Case("optimize-empty-onnx", lambda w: ["optimize", _file(w, "m.onnx"), "-o", w.tmp / "out"], "is empty (0 bytes)"),
    Case("optimize-not-onnx", lambda w: ["optimize", _file(w, "m.onnx", b"\x08junk\xff"), "-o", w.tmp / "out"],
         "cannot read"),
    Case("optimize-missing-model", lambda w: ["optimize", w.tmp / "nope.onnx", "-o", w.tmp / "out"], "is not a file"),
    Case("optimize-missing-weights-file",
         lambda w: ["optimize", _copy(w.export, w, "e", lambda d: (d / "model.onnx.data").unlink()) / "model.onnx",
                    "-o", w.tmp / "out"], "model.onnx.data, which is missing"),
    Case("optimize-output-empty-string", lambda w: ["optimize", w.export / "model.onnx", "-o", ""],
         "it must name a new directory"),
    Case("optimize-output-exists", lambda w: ["optimize", w.export / "model.onnx", "-o", _existing_output(w)],
         "exists and is not an empty directory"),
    Case("optimize-output-parent-is-a-file",
         lambda w: ["optimize", w.export / "model.onnx", "-o", _file(w, "f") / "out"], "is not a directory"),
    Case("optimize-unknown-dump-pass", lambda w: ["optimize", w.export / "model.onnx", "-o", w.tmp / "out",
                                                  "--dump-after", "fuse_everything"], "is not a pass"),
    Case("optimize-unknown-target", lambda w: ["optimize", w.export / "model.onnx", "-o", w.tmp / "out",
                                               "--target", "gpu"], "Invalid value for '--target'", 2),
    Case("inspect-empty-onnx", lambda w: ["inspect", _file(w, "m.onnx")], "is empty (0 bytes)"),
    Case("inspect-missing-model", lambda w: ["inspect", w.tmp / "nope.onnx"], "is not a file"),
    # build
    Case("build-missing-export", lambda w: ["build", w.tmp / "nope", "-o", w.tmp / "out"], "is not a directory"),
    Case("build-no-model", lambda w: ["build", _file(w, "e/readme.txt").parent, "-o", w.tmp / "out"],
         "has no model.onnx"),
    Case("build-zero-byte-model", lambda w: ["build", _copy(w.export, w, "e", _write("model.onnx", b"")),
                                             "-o", w.tmp / "out"],
         "is empty (0 bytes)"),
    Case("build-graph-io-not-json",
         lambda w: ["build", _copy(w.export, w, "e", _write("graph_io.json", '{"inputs": [')), "-o", w.tmp / "out"],
         "graph_io.json is not valid JSON"),
    Case("build-graph-io-not-an-object", lambda w: ["build", _copy(w.export, w, "e", _write("graph_io.json", "[]")),
                                                    "-o", w.tmp / "out"],
         "does not hold a JSON object"),
    Case("build-graph-io-field-type", lambda w: ["build", _copy(w.export, w, "e", _edit_json("graph_io.json",
                                                                _set("inputs", 3))), "-o", w.tmp / "out"],
         "field 'inputs' must be list"),
    Case("build-graph-io-cache-kind", lambda w: ["build", _copy(w.export, w, "e", _edit_json(
        "graph_io.json", lambda d: d["kv_cache"].__setitem__("kind", "paged"))), "-o", w.tmp / "out"],
         "kv_cache.kind 'paged'"),
    Case("build-source-json-not-json",
         lambda w: ["build", _copy(w.export, w, "e", _write("source.json", "preset: tiny")), "-o", w.tmp / "out"],
         "source.json is not valid JSON"),
    Case("build-config-not-json", lambda w: ["build", _copy(w.export, w, "e", _write("config.json", "")),
                                             "-o", w.tmp / "out"],
         "not valid JSON"),
    Case("build-threads-negative", lambda w: ["build", w.export, "-o", w.tmp / "out", "--threads", "-3"],
         "Invalid value for '--threads': -3 is not in the range x>=0", 2),
    Case("build-threads-not-a-number", lambda w: ["build", w.export, "-o", w.tmp / "out", "--threads", "many"],
         "Invalid value for '--threads'", 2),
    Case("build-output-empty-string", lambda w: ["build", w.export, "-o", ""], "it must name a new directory"),
    Case("build-output-parent-read-only", lambda w: ["build", w.export, "-o", _read_only_parent(w)], "cannot create"),
    Case("build-output-parent-is-a-file", lambda w: ["build", w.export, "-o", _file(w, "f") / "b"],
         "is not a directory"),
    Case("build-output-exists", lambda w: ["build", w.export, "-o", _existing_output(w)],
         "exists and is not an empty directory"),
    Case("build-cpu-moe-unknown", lambda w: ["build", w.export, "-o", w.tmp / "out", "--cpu-moe", "fast"],
         "Invalid value for '--cpu-kernels' / '--cpu-moe'", code=2),
    Case("build-cpu-moe-r1c-for-tensorrt-rtx",
         lambda w: ["build", w.export, "-o", w.tmp / "out", "--target", "tensorrt-rtx", "--cpu-moe", "r1c"],
         "--cpu-moe r1c is for a one-rank onnxruntime bundle"),
    Case("build-cpu-moe-r1c-tensor-parallel",
         lambda w: ["build", w.export, "-o", w.tmp / "out", "--tensor-parallel", "2", "--cpu-moe", "r1c"],
         "--cpu-moe r1c is for a one-rank onnxruntime bundle"),
    Case("build-cpu-moe-r1c-ort-include-junk",  # a set R1C_ORT_INCLUDE is not passed over for another place
         lambda w: [_file(w, "junk/onnxruntime_cxx_api.h", "#error junk") and "build", w.export, "-o", w.tmp / "out",
                    "--cpu-moe", "r1c"],
         "does not hold ONNX Runtime's onnxruntime_cxx_api.h, onnxruntime_c_api.h",
         env=lambda w: {"R1C_ORT_INCLUDE": str(w.tmp / "junk")}),
    Case("build-cpu-moe-r1c-no-compiler", lambda w: ["build", w.export, "-o", w.tmp / "out", "--cpu-moe", "r1c"],
         "--cpu-moe r1c: no C++ compiler: CXX='/nonexistent' is not a program",
         env=lambda w: {"CXX": "/nonexistent"}),
    Case("build-unknown-dump-pass", lambda w: ["build", w.export, "-o", w.tmp / "out", "--dump-after", "nope"],
         "is not a pass"),
    Case("build-foreign-for-tensorrt", lambda w: ["build", w.foreign, "-o", w.tmp / "out", "--target", "tensorrt"],
         "builds for onnxruntime on one rank only"),
    Case("build-foreign-not-a-language-model",
         lambda w: ["build", _copy(w.foreign, w, "f", lambda d: (d / "graph_io.json").unlink() or _rename_input(d)),
                    "-o", w.tmp / "out"], "no input named input_ids"),
    # run
    Case("run-missing-bundle", lambda w: ["run", w.tmp / "nope", "--input-ids", "1"], "is not a directory"),
    Case("run-manifest-not-json", lambda w: ["run", _copy(w.bundle, w, "b", _write("manifest.json", "{")),
                                             "--input-ids", "1"], "not valid JSON"),
    Case("run-manifest-files-type", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json("manifest.json",
                                                            _set("files", "model.onnx"))), "--input-ids", "1"],
         "manifest field 'files' must be dict"),
    Case("run-manifest-graph-io-type", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json("manifest.json",
                                                               _set("graph_io", []))), "--input-ids", "1"],
         "manifest field 'graph_io' must be dict"),
    Case("run-manifest-model-config-type", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", _set("model_config", 5))), "--input-ids", "1"], "'model_config' must be dict or null"),
    Case("run-manifest-target-options-model-type", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", lambda d: d["target_options"].__setitem__("model", 3))), "--input-ids", "1"],
         "target_options must name the model"),
    Case("run-manifest-threads-negative", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", _session("intra_op_num_threads", -3))), "--input-ids", "1"],
         "manifest.json: target_options.session.intra_op_num_threads must be an integer >= 0 (0: ONNX Runtime picks), "
         "got -3"),
    Case("run-manifest-threads-word", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", _session("intra_op_num_threads", "many"))), "--input-ids", "1"],
         'target_options.session.intra_op_num_threads must be an integer >= 0 (0: ONNX Runtime picks), got "many"'),
    Case("run-manifest-inter-op-threads-float", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", _session("inter_op_num_threads", 1.5))), "--input-ids", "1"],
         "target_options.session.inter_op_num_threads must be an integer >= 0"),
    Case("run-manifest-weights-memory-word", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", _session("weights_memory", "swap"))), "--input-ids", "1"],
         'target_options.session.weights_memory must be one of hugepages, onnxruntime, got "swap"'),
    Case("run-manifest-session-misspelt", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", _session("intra_op_thread", 2))), "--input-ids", "1"],
         "target_options.session.intra_op_thread is not a session option r1c knows (did you mean "
         "intra_op_num_threads?)"),
    Case("run-manifest-cpu-kernel-outside-kernels", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", lambda d: d["target_options"].update(cpu_kernels={"x86-64-v3": "../model.onnx"}))),
        "--input-ids", "1"], "target_options.cpu_kernels must map x86-64 levels to library files under kernels/"),
    Case("run-manifest-cpu-kernels-type", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", lambda d: d["target_options"].update(cpu_kernels=5))), "--input-ids", "1"],
        "target_options.cpu_kernels must map x86-64 levels to library files under kernels/"),
    Case("run-manifest-file-outside-bundle", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", lambda d: d["files"].__setitem__("../../etc/passwd", "0" * 64))), "--input-ids", "1"],
         "expected a relative path"),
    Case("run-bundle-from-another-release", lambda w: ["run", _copy(w.bundle, w, "b", _edit_json(
        "manifest.json", _set("r1c_version", "0.0.1"))), "--input-ids", "1"], "built by r1c 0.0.1"),
    Case("run-edited-weights", lambda w: ["run", _copy(w.bundle, w, "b", _flip_byte), "--input-ids", "1"], "sha256"),
    Case("run-token-beyond-int64", lambda w: _run(w, "--input-ids", "1 99999999999999999999"), "is not a token id"),
    Case("run-token-negative", lambda w: _run(w, "--input-ids", "1 -2"), "is not a token id"),
    Case("run-token-beyond-vocabulary", lambda w: _run(w, "--input-ids", f"1 {VOCAB}"),
         f"--input-ids: token id {VOCAB} is out of range [0, {VOCAB})"),
    Case("run-token-not-a-number", lambda w: _run(w, "--input-ids", "1 two"), "must be integers"),
    Case("run-no-tokens", lambda w: _run(w, "--input-ids", " "), "--input-ids is empty"),
    Case("run-eos-beyond-vocabulary", lambda w: _run(w, "--input-ids", "1", "--eos", str(VOCAB)),
         f"--eos {VOCAB} is not a token"),
    Case("run-max-new-tokens-negative", lambda w: _run(w, "--input-ids", "1", "--max-new-tokens", "-1"),
         "Invalid value for '--max-new-tokens': -1 is not in the range x>=1", 2),
    Case("run-max-new-tokens-zero", lambda w: _run(w, "--input-ids", "1", "--max-new-tokens", "0"),
         "Invalid value for '--max-new-tokens': 0 is not in the range x>=1", 2),
    Case("run-too-long", lambda w: _run(w, "--input-ids", "1", "--max-new-tokens", "100000"),
         "max_position_embeddings"),
    Case("run-logits-out-missing-directory", lambda w: _run(w, "--input-ids", "1", "--logits-out",
                                                            w.tmp / "nope" / "l.npy"), "does not exist"),
    Case("run-logits-out-onto-directory", lambda w: _run(w, "--input-ids", "1", "--logits-out",
                                                         _file(w, "d/x").parent), "is a directory"),
    Case("run-logits-out-kept-on-error", lambda w: _run(w, "--input-ids", f"{VOCAB + 5}", "--logits-out",
                                                        _file(w, "l.npy", b"earlier")), "out of range"),
    # bench
    Case("bench-missing-bundle", lambda w: ["bench", w.tmp / "nope", "--repeat", "3"], "is not a directory"),
    Case("bench-baseline-not-json", lambda w: _bench(w, "--baseline", _file(w, "b.json", "{1:")), "not valid JSON"),
    Case("bench-baseline-missing", lambda w: _bench(w, "--baseline", w.tmp / "b.json"), "not found"),
    Case("bench-baseline-not-a-report", lambda w: _bench(w, "--baseline", _file(w, "b.json", '{"a": 1}')),
         "not an `r1c bench --json` report"),
    Case("bench-batch-zero", lambda w: _bench(w, "--batch", "0"), "values must be >= 1"),
    Case("bench-batch-not-a-number", lambda w: _bench(w, "--batch", "1,x"), "--batch takes integers"),
    Case("bench-max-regression-typo", lambda w: _bench(w, "--max-regression", "10%%"), "--max-regression"),
    Case("bench-max-regression-word", lambda w: _bench(w, "--max-regression", "ten"), "--max-regression"),
    Case("bench-threads-negative", lambda w: _bench(w, "--threads", "-3"),
         "Invalid value for '--threads': -3 is not in the range x>=0", 2),
    Case("bench-repeat-too-few", lambda w: _bench(w, "--repeat", "1"),
         "benchmark: --repeat must be >= 3 (a median needs samples), got 1"),
    Case("bench-warmup-negative", lambda w: _bench(w, "--warmup", "-1"), "benchmark: --warmup must be >= 0, got -1"),
    Case("bench-budget-negative", lambda w: _bench(w, "--budget", "-2"),
         "benchmark: --budget must be >= 0 seconds, got -2"),
    Case("bench-missing-bundle-before-options", lambda w: ["bench", w.tmp / "nope", "--repeat", "2"],
         "is not a directory"),
    Case("bench-compare-missing-bundle", lambda w: _bench(w, "--compare", w.tmp / "nope"), "is not a directory"),
    Case("bench-json-onto-directory", lambda w: _bench(w, "--json", _file(w, "d/x").parent), "is a directory"),
    # verify
    Case("verify-missing-bundle", lambda w: ["verify", w.tmp / "nope"], "is not a directory"),
    Case("verify-edited-weights", lambda w: ["verify", _copy(w.bundle, w, "b", _flip_byte), "--no-progress"],
         "sha256"),
    Case("verify-manifest-not-json", lambda w: ["verify", _copy(w.bundle, w, "b", lambda d: (d / "manifest.json")
                                                             .write_text("{"))], "not valid JSON"),
    # serve (each fails before it listens: a case that served would never return)
    Case("serve-missing-bundle", lambda w: ["serve", w.tmp / "nope", "--port", "0"], "is not a directory"),
    Case("serve-port-out-of-range", lambda w: ["serve", w.bundle, "--port", "70000"], "Invalid value for '--port'", 2),
    Case("serve-port-negative", lambda w: ["serve", w.bundle, "--port", "-1"], "Invalid value for '--port'", 2),
    Case("serve-port-in-use", lambda w: ["serve", w.bundle, "--port", _busy_port(w)], "Address already in use"),
    Case("serve-host-unresolvable", lambda w: _serve(w, "--host", "no-such-host.invalid"), "does not resolve"),
    Case("serve-threads-negative", lambda w: _serve(w, "--threads", "-2"),
         "Invalid value for '--threads': -2 is not in the range x>=0", 2),
    Case("serve-kv-cache-bytes-word", lambda w: _serve(w, "--kv-cache-bytes", "lots"), "not a size in bytes"),
    Case("serve-kv-cache-bytes-zero", lambda w: _serve(w, "--kv-cache-bytes", "0"),
         "--kv-cache-bytes) must be an integer >= 1"),
    Case("serve-kv-cache-too-small", lambda w: _serve(w, "--kv-cache-bytes", "1KiB"), "holds 1 tokens"),
    Case("serve-max-num-seqs-zero", lambda w: _serve(w, "--max-num-seqs", "0"), "(--max-num-seqs) must be"),
    Case("serve-max-tokens-per-step-zero", lambda w: _serve(w, "--max-tokens-per-step", "0"),
         "(--max-tokens-per-step) must be"),
    Case("serve-model-name-empty", lambda w: _serve(w, "--model-name", " "), "--model-name must not be empty"),
    Case("serve-manifest-not-json", lambda w: ["serve", _copy(w.bundle, w, "b", lambda d: (d / "manifest.json")
                                                              .write_text("{")), "--port", "0"], "not valid JSON"),
    # capi (refused before CMake runs)
    Case("capi-dest-is-a-file", lambda w: ["capi", "--dest", _file(w, "prefix", "x")], "exists and is a file"),
    Case("capi-dest-holds-other-files", lambda w: ["capi", "--dest", _existing_output(w)],
         "holds files of something else"),
    Case("capi-dest-parent-is-a-file", lambda w: ["capi", "--dest", _file(w, "f") / "prefix"], "is not a directory"),
    # bench-serving
    Case("bench-serving-missing-bundle", lambda w: ["bench-serving", w.tmp / "nope"], "is not a directory"),
    Case("bench-serving-threads-negative", lambda w: _bench_serving(w, "--threads", "-1"),
         "Invalid value for '--threads': -1 is not in the range x>=0", 2),
    Case("bench-serving-streams-word", lambda w: _bench_serving(w, "--streams", "1,x"), "--streams takes integers"),
    Case("bench-serving-streams-zero", lambda w: _bench_serving(w, "--streams", "0"), "positive integers"),
    Case("bench-serving-requests-zero", lambda w: _bench_serving(w, "--requests", "0"), "--requests and --rounds"),
    Case("bench-serving-kv-cache-bytes-word", lambda w: _bench_serving(w, "--kv-cache-bytes", "2XB"),
         "not a size in bytes"),
    Case("bench-serving-long-prompt-too-long", lambda w: ["bench-serving", w.bundle, "--long-prompt", "100000",
                                                          "--capi-calls", "0"], "--long-prompt 100000 does not fit"),
    Case("bench-serving-json-onto-directory", lambda w: _bench_serving(w, "--json", _file(w, "d/x").parent),
         "is a directory"),
]


def _flip_byte(directory: Path) -> None:
    with (directory / "model.onnx.data").open("r+b") as f:
        f.seek(64)
        b = f.read(1)
        f.seek(64)
        f.write(bytes([b[0] ^ 0xFF]))


def _rename_input(directory: Path) -> None:
    import onnx_ir as ir

    model = ir.load(directory / "model.onnx")
    model.graph.inputs[0].name = "tokens"
    ir.save(model, directory / "model.onnx")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from foreign_models import toy_model

    root = tmp_path_factory.mktemp("bad_input")
    save_checkpoint(root / "ckpt", CONFIG, random_checkpoint(CONFIG, seed=1))
    for args in (["export", root / "ckpt", "-o", root / "export"], ["build", root / "export", "-o", root / "bundle"],
                 ["optimize", toy_model(root / "toy" / "model.onnx", cache=False), "-o", root / "foreign"]):
        code, _, err = cli(*args)
        assert code == 0, err
    return {"ckpt": root / "ckpt", "export": root / "export", "bundle": root / "bundle", "foreign": root / "foreign"}


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots` -> the sha256 of its bytes (or 'dir')."""
    seen: dict[str, str] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            seen[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


@pytest.fixture(autouse=True)
def _release_held_sockets() -> Iterator[None]:
    yield
    while _HELD:
        _HELD.pop().close()


def test_the_table_covers_every_stage() -> None:
    stages = {c.id.split("-")[0] for c in CASES}
    assert {"export", "optimize", "inspect", "build", "run", "bench", "verify", "serve", "capi"} <= stages
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, shared: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "case"
    work.mkdir()
    world = World(tmp=work, **shared)
    args = case.args(world)
    for name, value in (case.env(world) if case.env else {}).items():
        monkeypatch.setenv(name, value)
    before = _snapshot(work, *shared.values())
    code, out, err = cli(*args)
    line = error_line(code, err)
    assert code == case.code, (code, line)
    assert case.message in line, line
    assert out == "", out
    for p in work.rglob("*"):
        p.chmod(0o755) if p.is_dir() else None  # undo the read-only case before comparing (and cleanup)
    after = _snapshot(work, *shared.values())
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    for stray in (Path("/sys/r1c-out"), Path("/proc/sys/r1c-out")):
        assert not stray.exists()


def test_logits_out_writes_whole_file(shared: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = cli("run", shared["bundle"], "--input-ids", "1 2 3", "--logits-out", tmp_path / "l.npy")
    assert code == 0, err
    assert np.load(tmp_path / "l.npy").shape == (3, VOCAB)
    assert [p.name for p in tmp_path.iterdir()] == ["l.npy"]  # no partial file beside it
    assert os.access(tmp_path / "l.npy", os.R_OK)


@pytest.mark.parametrize(("session", "message"), [
    ({"intra_op_num_threads": -3}, "build: session.intra_op_num_threads must be an integer >= 0 (0: ONNX Runtime "
                                   "picks), got -3"),
    ({"inter_op_num_threads": 1.5}, "build: session.inter_op_num_threads must be an integer >= 0"),
    ({"intra_op_num_threads": True}, "build: session.intra_op_num_threads must be an integer >= 0"),
    ({"weights_memory": "disk"}, 'build: session.weights_memory must be one of hugepages, onnxruntime, got "disk"'),
    ({"intra_op_threads": 2}, "build: session.intra_op_threads is not a session option r1c knows (did you mean "
                              "intra_op_num_threads?)"),
])
def test_build_bundle_refuses_bad_session(session: dict[str, object], message: str, shared: dict[str, Path],
                                          tmp_path: Path) -> None:
    """The Python API's own check (the CLI's --threads is refused by click before it): the rule of
    `r1c.manifest.check_session`, so a bundle that builds is one `read_manifest` accepts."""
    from r1c.errors import BuildError
    from r1c.runtime.build import build_bundle

    with pytest.raises(BuildError) as e:
        build_bundle(shared["export"], tmp_path / "out", session=session)
    assert message in str(e.value), e.value
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("options", "message"), [
    ({"native_decoder": False}, "load: session_options.native_decoder is not a session option r1c knows (did you "
                                "mean native_decode?)"),
    ({"NATIVE_DECODE": False}, "load: session_options.NATIVE_DECODE is not a session option r1c knows (did you "
                               "mean native_decode?)"),
    ({"colour": "blue"}, "load: session_options.colour is not a session option r1c knows; r1c reads "
                         "graph_optimization_level, intra_op_num_threads, inter_op_num_threads"),
    ({"intra_op_num_threads": -1}, "load: session_options.intra_op_num_threads must be an integer >= 0"),
])
def test_load_refuses_unknown_or_bad_session_options(options: dict[str, object], message: str,
                                                     shared: dict[str, Path]) -> None:
    """load()'s session_options go through the same rule as a manifest's, named as the caller's: a misspelt
    option is refused, naming the closest one r1c reads, rather than ignored."""
    from r1c.errors import RuntimeInputError
    from r1c.runtime import load

    with pytest.raises(RuntimeInputError) as e:
        load(shared["bundle"], session_options=options)
    assert message in str(e.value), e.value


def test_session_option_names_and_defaults_are_one_list() -> None:
    """The names check_session accepts are exactly the ones the ONNX Runtime backend has defaults for."""
    from r1c.runtime.ort_backend import DEFAULT_OPTIONS
    from r1c.targets import SESSION_OPTIONS

    assert sorted(DEFAULT_OPTIONS) == sorted(SESSION_OPTIONS)


def main() -> None:
    """Print the table (case | exit code | the error line) as markdown: `python tests/test_bad_input.py`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="r1c-bad-input-") as d:
        root = Path(d)

        class _Factory:
            def mktemp(self, name: str) -> Path:
                (root / name).mkdir()
                return root / name

        paths = shared.__wrapped__(_Factory())  # type: ignore[attr-defined]
        print("| case | exit | error line |\n| --- | --- | --- |")
        for i, case in enumerate(CASES):
            work = root / f"case{i}"
            work.mkdir()
            try:
                world = World(tmp=work, **paths)
                args = case.args(world)
            except pytest.skip.Exception as e:
                print(f"| {case.id} | skipped | {e} |")
                continue
            with pytest.MonkeyPatch.context() as env:
                for name, value in (case.env(world) if case.env else {}).items():
                    env.setenv(name, value)
                code, _, err = cli(*args)
            line = err.strip().replace(str(root), "$TMP").replace("|", "\\|")
            print(f"| {case.id} | {code} | `{line}` |")
            for p in work.rglob("*"):
                if p.is_dir():
                    p.chmod(0o755)


if __name__ == "__main__":
    main()
