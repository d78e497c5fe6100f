"""Weights of r1c's CPU kernels in huge-page memory (r1c/runtime/hugepages.py, `OrtBackend`'s `weights_memory`).

The arena loader against ONNX's own reader of external data (the bytes of every tensor equal, for several dtypes
and odd sizes); its refusals (a short weights file, a location outside the model's directory); the advice the
kernel records for the arena (`THPeligible` in /proc/self/smaps); and a tiny bundle whose kernel weights lie in the
arena against the same bundle loaded by ONNX Runtime: logits bitwise equal over a prefill and decode steps (the same
kernels read the same bytes), with exactly the initializers only r1c.cpu nodes read handed over.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from r1c.errors import BundleError
from r1c.runtime import load
from r1c.runtime.hugepages import ALIGN, HUGE_PAGE, huge_empty, load_external, thp_mode
from r1c.runtime.ort_backend import kernel_weight_names


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
    got = load_external(path, [*arrays, "not-a-tensor"])
    assert set(got) == set(arrays)
    reference = onnx.load(str(path))  # ONNX's reader of the same external data
    for t in reference.graph.initializer:
        raw, elem_type, dims = got[t.name]
        assert elem_type == t.data_type and dims == tuple(t.dims)
        assert raw.tobytes() == numpy_helper.to_array(t).tobytes(), t.name
        assert raw.ctypes.data % ALIGN == 0
    first = min(raw.ctypes.data for raw, _, _ in got.values())
    assert first % HUGE_PAGE == 0  # the arena starts on a huge-page boundary


def test_load_external_refuses_a_short_file_and_a_location_outside(tmp_path: Path) -> None:
    path, arrays = model_with_external(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(BundleError, match="shorter than tensor"):
        load_external(path, arrays)
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../elsewhere.data"
    onnx.save(model, str(path))
    with pytest.raises(BundleError, match="outside"):
        load_external(path, arrays)


def test_huge_empty_is_advised_for_huge_pages() -> None:
    mode = thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"this kernel offers no transparent huge pages (setting: {mode})")
    buf = huge_empty(3 * HUGE_PAGE)
    buf[:] = 1
    start = buf.ctypes.data
    smaps = Path("/proc/self/smaps").read_text()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps):
        lo, hi = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
        if lo <= start < hi:
            eligible = re.search(r"THPeligible:\s+(\d)", block)
            assert eligible is not None and eligible.group(1) == "1", block
            return
    pytest.fail("the arena's mapping is not in /proc/self/smaps")


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
    names = kernel_weight_names(model)
    if not names:
        pytest.skip("this bundle runs no r1c CPU kernel (no compiler or ONNX Runtime headers at build)")
    graph = onnx.load(str(model), load_external_data=False).graph
    for node in graph.node:  # handed over only where nothing but r1c's kernels reads them (no ORT prepacking)
        if node.domain != "r1c.cpu":
            assert not names & set(node.input), node.op_type
    assert load(bundle).manifest.target_options["session"]["weights_memory"] == "hugepages"  # r1c build's default
    pinned = load(bundle, session_options={"intra_op_num_threads": 1, "weights_memory": "hugepages"})
    plain = load(bundle, session_options={"intra_op_num_threads": 1, "weights_memory": "onnxruntime"})
    assert len(pinned.backend._weights) == len(names & set(load_external(model, names))) > 0
    assert not plain.backend._weights
    for a, b in zip(steps(pinned), steps(plain), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(BundleError, match="weights_memory"):
        load(bundle, session_options={"weights_memory": "swap"})
