"""Weights of r1c's CPU kernels in huge-page memory (r1c/runtime/hugepages.py, r1c/runtime/kernel_weights.py,
`OrtBackend`'s `weights_memory`).

The arena loader against ONNX's own reader of external data (the bytes of every tensor equal, for several dtypes
and odd sizes); its refusals (a short weights file, a location outside the model's directory); the advice the
kernel records for the arena (`THPeligible` in /proc/self/smaps); and a tiny bundle whose kernel weights lie in the
arena against the same bundle loaded by ONNX Runtime: logits bitwise equal over a prefill and decode steps (the same
kernels read the same bytes), with exactly the initializers only r1c.cpu nodes read handed over, read by the
session in place (zeroing one through its address changes the logits), alive as long as the session; a truncated
weights file refused in one line naming the tensor.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from r1c.errors import BundleError, RuntimeInputError
from r1c.runtime import load
from r1c.runtime.hugepages import HUGE_PAGE, huge_empty, thp_mode
from r1c.runtime.kernel_weights import ALIGN, kernel_weight_names, load_external


def model_with_external(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """An Identity graph over initializers of several dtypes and odd sizes, all saved to one external file."""
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((3, 37)).astype(np.float32),
              "i8": rng.integers(-128, 127, (5, 13)).astype(np.int8),
              "u8": rng.integers(0, 255, (1001,)).astype(np.uint8),
              "f16": rng.standard_normal((7, 9)).astype(np.float16),
              "bf16": rng.standard_normal((4, 33)).astype(ml_dtypes.bfloat16)}
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    nodes = [onnx.helper.make_node("Identity", [n], [n + ".out"]) for n in arrays]
    outs = [onnx.helper.make_empty_tensor_value_info(n + ".out") for n in arrays]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [], outs, inits))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
              size_threshold=0)
    return path, arrays


def test_load_external_reads_each_tensor_as_stored(tmp_path: Path) -> None:
    path, arrays = model_with_external(tmp_path)
    graph = onnx.load(str(path), load_external_data=False).graph
    got = load_external(path, graph, {*arrays, "not-a-tensor"})
    assert set(got) == set(arrays)
    reference = onnx.load(str(path))  # ONNX's reader of the same external data
    for t in reference.graph.initializer:
        p = got[t.name]
        assert p.elem_type == t.data_type and p.dims == tuple(t.dims)
        assert p.raw.tobytes() == numpy_helper.to_array(t).tobytes(), t.name
        assert p.raw.ctypes.data % ALIGN == 0
    first = min(p.raw.ctypes.data for p in got.values())
    assert first % HUGE_PAGE == 0  # the arena starts on a huge-page boundary
    assert load_external(path, graph, set()) == {}


def test_load_external_refuses_a_short_file_and_a_location_outside(tmp_path: Path) -> None:
    path, arrays = model_with_external(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    model = onnx.load(str(path), load_external_data=False)
    with pytest.raises(BundleError, match="shorter than tensor"):
        load_external(path, model.graph, set(arrays))
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../elsewhere.data"
    with pytest.raises(BundleError, match="outside"):
        load_external(path, model.graph, set(arrays))


def thp_eligible(address: int) -> bool:
    """Whether the mapping holding `address` may get transparent huge pages (its `THPeligible` in
    /proc/self/smaps); fails the test when no mapping holds it."""
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        lo, hi = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
        if lo <= address < hi:
            eligible = re.search(r"THPeligible:\s+(\d)", block)
            return eligible is not None and eligible.group(1) == "1"
    pytest.fail(f"no mapping holds {address:#x} in /proc/self/smaps")


def test_huge_empty_is_advised_for_huge_pages() -> None:
    mode = thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"this kernel offers no transparent huge pages (setting: {mode})")
    buf = huge_empty(3 * HUGE_PAGE)
    buf[:] = 1
    assert thp_eligible(buf.ctypes.data)


def steps(engine: Any) -> list[np.ndarray]:
    """The logits of a 5-token prefill and 3 decode steps through the engine's runner (copies)."""
    runner = engine._runner(1, 16, 8, 8)
    runner.cache.add_row()
    out = [np.array(runner.step(np.array([[3, 9, 4, 1, 7]]), 0, np.array([5])))]
    for token in (5, 2, 8):
        out.append(np.array(runner.step(np.array([[token]]), 0, np.ones(1, np.int64))))
    return out


def test_kernel_weights_in_huge_pages_give_the_same_logits(tiny_bundles: Any) -> None:
    bundle = tiny_bundles["single"]
    model = bundle / "model.onnx"
    graph = onnx.load(str(model), load_external_data=False).graph
    names = kernel_weight_names(graph)
    if not names:
        pytest.skip("this bundle runs no r1c CPU kernel (no compiler or ONNX Runtime headers at build)")
    for node in graph.node:  # handed over only where nothing but r1c's kernels reads them
        if node.domain != "r1c.cpu":
            assert not names & set(node.input), node.op_type
    assert load(bundle).manifest.target_options["session"]["weights_memory"] == "hugepages"  # r1c build's default
    pinned = load(bundle, session_options={"intra_op_num_threads": 1, "weights_memory": "hugepages"})
    plain = load(bundle, session_options={"intra_op_num_threads": 1, "weights_memory": "onnxruntime"})
    assert len(pinned.backend._weights) == len(load_external(model, graph, names)) > 0
    assert not plain.backend._weights
    for a, b in zip(steps(pinned), steps(plain), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeInputError, match=r"load: session_options\.weights_memory"):
        load(bundle, session_options={"weights_memory": "swap"})


def test_the_session_reads_the_arena_in_place_and_keeps_it(tiny_bundles: Any) -> None:
    bundle = tiny_bundles["single"]
    engine = load(bundle, session_options={"intra_op_num_threads": 1})
    if not engine.backend._weights:
        pytest.skip("this bundle runs no r1c CPU kernel (no compiler or ONNX Runtime headers at build)")
    before = steps(engine)
    session = engine.backend.session
    del engine  # the session alone keeps the arena (a dropped backend must not unmap what ORT reads)
    gc.collect()
    again = load(bundle, session_options={"intra_op_num_threads": 1})
    again.backend.session = session
    for a, b in zip(steps(again), before, strict=True):
        np.testing.assert_array_equal(a, b)
    if thp_mode() in ("always", "madvise"):  # the arena, not a copy in ordinary memory
        assert all(thp_eligible(value.data_ptr()) for value in session._r1c_kernel_weights)
    for value in session._r1c_kernel_weights:  # zeroed through their addresses: the session reads them there
        ctypes.memset(value.data_ptr(), 0, int(np.prod(value.shape())) * np.dtype(value.numpy().dtype).itemsize)
    assert not np.array_equal(steps(again)[0], before[0])


def test_a_short_weights_file_is_one_line_naming_the_tensor(tiny_bundles: Any, tmp_path: Path) -> None:
    bundle = tmp_path / "short.bundle"
    shutil.copytree(tiny_bundles["single"], bundle)
    data = bundle / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4096])
    if not kernel_weight_names(onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph):
        pytest.skip("this bundle runs no r1c CPU kernel (no compiler or ONNX Runtime headers at build)")
    with pytest.raises(BundleError, match=r"^bundle: model.onnx.data is shorter than tensor \S+ needs") as e:
        load(bundle, verify_hashes=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["run", "serve"])
def test_run_and_serve_choose_the_weights_memory_per_process(tiny_bundles: Any, monkeypatch: pytest.MonkeyPatch,
                                                             command: str) -> None:
    """`r1c run` / `r1c serve --weights-memory onnxruntime` load the bundle with that session option (the engine's
    backend then holds no arena) and the same tokens come out; without the option the bundle's own choice holds."""
    from click.testing import CliRunner

    import r1c.runtime as runtime
    from r1c.cli import main

    bundle = tiny_bundles["single"]
    if not kernel_weight_names(onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph):
        pytest.skip("this bundle runs no r1c CPU kernel (no compiler or ONNX Runtime headers at build)")
    seen: list[Any] = []
    real_load = runtime.load

    def spy(path: Any, **kw: Any) -> Any:
        engine = real_load(path, **kw)
        seen.append((kw.get("session_options"), engine.backend._weights))
        if command == "serve":  # stop before uvicorn starts: what matters is how the engine was loaded
            raise KeyboardInterrupt
        return engine

    monkeypatch.setattr(runtime, "load", spy)
    if command == "serve":
        import r1c.runtime.serving.engine as serving_engine
        monkeypatch.setattr(serving_engine, "load", spy)
        pytest.importorskip("uvicorn")
    args = {"run": ["run", str(bundle), "--input-ids", "3 9 4", "--max-new-tokens", "4", "--json"],
            "serve": ["serve", str(bundle), "--port", "0"]}[command]
    outputs = []
    for extra in ([], ["--weights-memory", "onnxruntime"]):
        r = CliRunner().invoke(main, [*args, *extra])
        outputs.append(r.output)
        if command == "run":
            assert r.exit_code == 0, r.output
    (default, default_weights), (chosen, chosen_weights) = seen
    assert default is None and default_weights  # the bundle's hugepages
    assert chosen == {"weights_memory": "onnxruntime"} and not chosen_weights
    if command == "run":
        assert outputs[0] == outputs[1]
    r = CliRunner().invoke(main, [*args, "--weights-memory", "swap"])
    assert r.exit_code == 2 and "'swap' is not one of" in r.output


def test_load_external_drops_what_it_read_from_the_page_cache(tmp_path: Path) -> None:
    """The weights file's pages are resident after a plain read and gone after `load_external` read them into the
    arena (util-linux `fincore` counts the resident bytes; the file is large enough that its few edge pages do not
    matter)."""
    import shutil
    import subprocess

    if shutil.which("fincore") is None:
        pytest.skip("util-linux fincore is not installed (it measures the page cache here)")
    arrays = {f"w{i}": np.full((1 << 18,), i, np.float32) for i in range(8)}  # 8 MiB
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    nodes = [onnx.helper.make_node("Identity", [n], [n + ".out"]) for n in arrays]
    outs = [onnx.helper.make_empty_tensor_value_info(n + ".out") for n in arrays]
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [], outs, inits)), str(path),
              save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    data = tmp_path / "m.onnx.data"

    def resident() -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(data)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    with data.open("rb+") as f:  # written back first: the OS drops only clean pages
        os.fsync(f.fileno())
    data.read_bytes()  # in the page cache now
    if resident() < data.stat().st_size // 2:
        pytest.skip("this filesystem does not keep the file in the page cache (nothing to drop)")
    loaded = load_external(path, onnx.load(str(path), load_external_data=False).graph, set(arrays))
    assert set(loaded) == set(arrays)
    np.testing.assert_array_equal(loaded["w7"].raw.view(np.float32), arrays["w7"])
    assert resident() < data.stat().st_size // 16
