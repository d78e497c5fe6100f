"""The GPU check's table: rows with derived rates against the H200's peaks, printed as they come, saved to $OUT."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

# H200 SXM datasheet, dense. "tf32": the router's gate GEMM runs on TF32 tensor cores with its float32 weights
# split into two TF32 parts (plugins/moe_router/plan.py), so its practical roof is half of this.
PEAKS = {"hbm": 4.8e12, "fp8": 1979e12, "bf16": 989e12, "tf32": 494e12, "fp32": 67e12}
COLUMNS = ["step", "item", "tokens", "ms", "TFLOP/s", "% peak", "GB/s", "% HBM", "% floor", "vs bf16", "check",
           "status"]
WIDTHS = [7, 34, 6, 9, 8, 6, 7, 5, 7, 7, 44, 6]


@dataclasses.dataclass
class Row:
    step: str
    item: str
    tokens: int | None = None
    ms: float | None = None
    flops: float | None = None
    peak: str | None = None  # key of PEAKS for the compute roof
    bytes: float | None = None
    baseline_ms: float | None = None
    check: str = ""
    status: str = "ok"  # ok | FAIL | warn | skip

    def cells(self) -> list[str]:
        s = self.ms / 1e3 if self.ms else None
        tflops = self.flops / s / 1e12 if s and self.flops else None
        gbs = self.bytes / s / 1e9 if s and self.bytes else None
        pct_peak = 100 * self.flops / s / PEAKS[self.peak] if s and self.flops and self.peak else None
        pct_hbm = 100 * self.bytes / s / PEAKS["hbm"] if s and self.bytes else None
        floor = max((self.bytes or 0) / PEAKS["hbm"], (self.flops or 0) / PEAKS[self.peak] if self.peak else 0)
        pct_floor = 100 * floor / s if s and floor else None

        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None or not math.isfinite(v) else format(v, fmt)

        return [self.step, self.item, "-" if self.tokens is None else str(self.tokens), f(self.ms, ".4f"),
                f(tflops, ".1f"), f(pct_peak, ".1f"), f(gbs, ".0f"), f(pct_hbm, ".1f"), f(pct_floor, ".1f"),
                f(self.baseline_ms / self.ms if self.baseline_ms and self.ms else None, ".2f"), self.check,
                self.status]


class Table:
    """The one table: each row printed (flushed) as it comes, kept for the final print and the $OUT files."""

    def __init__(self, out: TextIO, out_dir: Path | None) -> None:
        self.rows: list[Row] = []
        self.out = out
        self.out_dir = out_dir
        self.env: dict[str, Any] = {}
        self._line(COLUMNS)
        self._line(["-" * w for w in WIDTHS])

    def _line(self, cells: list[str]) -> None:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, WIDTHS)) + " |", file=self.out, flush=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self._line(row.cells())
        self.save()
        return row

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(r.cells()) + " |" for r in self.rows]
        return "\n".join(lines)

    def save(self) -> None:
        if self.out_dir is None:
            return
        (self.out_dir / "gpu_check.md").write_text(self.markdown() + "\n")
        (self.out_dir / "gpu_check.json").write_text(json.dumps(
            {"env": self.env, "rows": [dataclasses.asdict(r) | {"cells": dict(zip(COLUMNS, r.cells()))}
                                       for r in self.rows]}, indent=1) + "\n")


class Tee:
    """stdout that is also appended to the log file, flushed on every write."""

    def __init__(self, stream: TextIO, path: Path | None) -> None:
        self.stream = stream
        self.file = path.open("a") if path else None

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.stream.flush()
        if self.file:
            self.file.write(text)
            self.file.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class StepTimeout(Exception):
    pass


def check_deadline(deadline: float, what: str) -> None:
    if time.perf_counter() > deadline:
        raise StepTimeout(f"stopped before {what}")


