"""ONNX's own backend node cases (`onnx.backend.test.case.node`) through a pass pipeline, checked under ONNX Runtime.

Any valid ONNX must come out of `r1c optimize` computing what it computed before. For every generated
node case that ONNX Runtime runs as it is, `check_pipeline` runs the target's pipeline on the model, runs
the result on the same inputs in ONNX Runtime and compares with ONNX Runtime's outputs of the original
model (not with ONNX's expected outputs: the claim is that the passes change nothing, whatever ORT's own
deviations). Equality per dtype: |a - b| <= tol * (1 + |b|) with tol from TOLERANCE (float16 at its rounding,
2^-10), NaN where the reference has NaN; integers, booleans and strings exactly; sequences element-wise.

A case also counts as "left untouched" when a pass logged that it could not handle a construct and left it
as it was (a log record carrying `untouched=True`, e.g. fold_constants on an evaluator failure).

    python -m r1c.passes.onnx_backend_cases [TARGET ...]    # prints the counts per pipeline
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from r1c.passes.pipelines import run_pipeline

TOLERANCE = {"float16": 2.0**-10, "float32": 1e-6, "float64": 1e-12}
PASSES_LOGGER = "r1c.passes"


@dataclasses.dataclass(frozen=True)
class Reference:
    """One node case that ONNX Runtime runs: its model, input sets and ORT's outputs for each."""

    name: str
    model: onnx.ModelProto
    inputs: list[list[Any]]
    outputs: list[list[Any]]


@dataclasses.dataclass(frozen=True)
class CaseResult:
    name: str
    status: str  # equal | differs | pipeline failed | ort failed
    untouched: bool
    detail: str = ""


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # a thread pool per session costs more than these tiny graphs
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run_all(model: onnx.ModelProto, inputs: list[list[Any]]) -> list[list[Any]]:
    session = _session(model)
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, dict(zip(names, values))) for values in inputs]


def collect_references() -> tuple[list[Reference], int]:
    """The node cases ONNX Runtime runs (with its outputs) and the number of cases in all."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators overflow casts on purpose
        cases = collect_testcases(None)
    refs: list[Reference] = []
    for case in cases:
        assert case.model is not None and case.data_sets is not None
        inputs = [list(data_in) for data_in, _ in case.data_sets]
        try:
            outputs = _run_all(case.model, inputs)
        except Exception:  # ORT does not implement the op, type or version: not a case for this check
            continue
        refs.append(Reference(case.name, case.model, inputs, outputs))
    return refs, len(cases)


def equal(a: Any, b: Any) -> bool:
    """ORT output `a` equals reference `b` (TOLERANCE per float dtype; sequences element-wise)."""
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(equal, a, b))
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.name not in TOLERANCE:
        return bool(np.array_equal(a, b))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nan = np.isnan(b64)
    if not np.array_equal(np.isnan(a64), nan):
        return False
    with np.errstate(invalid="ignore"):
        close = (a64 == b64) | (np.abs(a64 - b64) <= TOLERANCE[a.dtype.name] * (1 + np.abs(b64)))
    return bool(np.all(close | nan))


class _UntouchedRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "untouched", False):
            self.count += 1


@contextlib.contextmanager
def _watch_untouched() -> Iterator[_UntouchedRecords]:
    log = logging.getLogger(PASSES_LOGGER)
    handler, level = _UntouchedRecords(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def check_case(ref: Reference, target: str) -> CaseResult:
    with _watch_untouched() as watch:
        try:
            model = run_pipeline(ir.serde.deserialize_model(ref.model), target)
            proto = ir.serde.serialize_model(model)
        except Exception as e:
            return CaseResult(ref.name, "pipeline failed", watch.count > 0, f"{type(e).__name__}: {e}")
    untouched = watch.count > 0
    try:
        outputs = _run_all(proto, ref.inputs)
    except Exception as e:
        return CaseResult(ref.name, "ort failed", untouched, str(e).strip().splitlines()[0][:300])
    same = all(len(o) == len(r) and all(map(equal, o, r)) for o, r in zip(outputs, ref.outputs))
    return CaseResult(ref.name, "equal" if same else "differs", untouched)


def check_pipeline(refs: Sequence[Reference], target: str) -> list[CaseResult]:
    return [check_case(ref, target) for ref in refs]


def summary(results: Sequence[CaseResult]) -> dict[str, int]:
    counts = collections.Counter(r.status for r in results)
    return {"run": len(results), "equal": counts["equal"], "left untouched": sum(r.untouched for r in results),
            "failed": len(results) - counts["equal"]}


def main(argv: Sequence[str]) -> int:
    for noisy in ("onnxscript", "onnx_ir"):  # they warn about every op they skip
        logging.getLogger(noisy).setLevel(logging.ERROR)
    start = time.perf_counter()
    refs, total = collect_references()
    print(f"{total} node cases, {len(refs)} run by onnxruntime {ort.__version__} (onnx {onnx.__version__})")
    failed = 0
    for target in argv or ["r1c", "onnxruntime"]:
        results = check_pipeline(refs, target)
        print(f"{target}: " + ", ".join(f"{k} {v}" for k, v in summary(results).items()))
        for r in results:
            if r.status != "equal":
                failed += 1
                print(f"  {r.name}: {r.status} {r.detail}")
            elif r.untouched:
                print(f"  {r.name}: equal, a construct left untouched")
    print(f"{time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
