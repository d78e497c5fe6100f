"""Where one step of an ONNX Runtime bundle spends its time: ONNX Runtime's own profiler, by op type.

Loads the bundle as `r1c.runtime.load` does (its session options, r1c's CPU kernels), replaces the session by one
with ORT's profiler on, and runs `--steps` steps through the runtime's own `StepRunner` on `--rows` rows whose
cache holds `--filled` tokens each before every step (contents unused: the time does not depend on them): decode
steps (1 token per row, logits at that token) or, with `--tokens N`, prefill steps of N tokens per row (logits at
each row's last).
Prints the step's wall time (median), the node time by op type (ms per step, node count per step) and the total.
Not a test: run it on a quiet machine; the profiler itself adds a little per node.

    python scripts/profile_step.py BUNDLE [--rows 1] [--tokens 1] [--filled 64] [--threads 2] [--steps 20]
"""

from __future__ import annotations

import collections
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np


@click.command(help=__doc__)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rows", default=1, show_default=True, help="Sequences in the step (batch).")
@click.option("--tokens", default=1, show_default=True, help="New tokens per row (1: decode; more: a prefill).")
@click.option("--filled", default=64, show_default=True, help="Cached tokens per row before the step.")
@click.option("--threads", default=0, show_default=True, help="ONNX Runtime intra-op threads (0: the bundle's).")
@click.option("--steps", default=20, show_default=True, help="Profiled steps (after 3 untimed ones).")
def main(bundle: Path, rows: int, tokens: int, filled: int, threads: int, steps: int) -> None:
    from r1c.runtime import load
    from r1c.runtime.build import custom_op_libraries
    from r1c.runtime.ort_backend import OrtBackend

    # ONNX Runtime runs every step here (the native decoder's steps, r1c.runtime.native_decode, would bypass the
    # profiler: scripts/step_parts.py times those)
    options: dict[str, Any] = {"native_decode": False, **({"intra_op_num_threads": threads} if threads else {})}
    engine = load(bundle, session_options=options)
    m = engine.manifest
    if m.target != "onnxruntime" or "distributed" in m.target_options:
        raise click.UsageError("profile_step: a one-rank onnxruntime bundle")
    with tempfile.TemporaryDirectory(prefix="r1c-profile-") as tmp:

        class Profiled(OrtBackend):  # the session load() makes (weights where it puts them), profiler on
            def _session_options(self, opts: dict[str, Any]) -> Any:
                so = super()._session_options(opts)
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(tmp) / "step")
                return so

        session = Profiled(bundle / m.target_options["model"], {**m.target_options.get("session", {}), **options},
                           custom_op_libraries(bundle, m.target_options, m.files)).session
        engine.backend.session = session
        runner = engine._runner(rows, filled + tokens, rows * tokens, 64)
        cache = runner.cache
        for _ in range(rows):
            cache.add_row()
        cache.lengths[:rows] = filled
        cache.resize(filled + tokens)
        rng = np.random.default_rng(0)
        ids = rng.integers(2, engine.vocab_size, size=(rows, tokens))
        n_new = np.full(rows, tokens, np.int64)
        walls = []
        for i in range(steps + 3):  # every step from the same cache length (the first 3 untimed)
            cache.lengths[:rows] = filled
            t0 = time.perf_counter()
            runner.step(ids, 0, n_new)
            if i >= 3:
                walls.append(time.perf_counter() - t0)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = steps + 3
    by_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    total = sum(by_op.values()) / runs / 1e3
    print(f"{bundle.name}: {rows} row(s) x {tokens} token(s), {filled} cached, threads "
          f"{threads or m.target_options.get('session', {}).get('intra_op_num_threads', 0)}")
    print(f"step wall time (median of {steps}): {statistics.median(walls) * 1e3:.2f} ms; node time {total:.2f} ms; "
          f"nodes per step {sum(count.values()) // runs}")
    print("| op | ms per step | share | nodes per step |\n| --- | ---: | ---: | ---: |")
    for op, us in by_op.most_common():
        ms = us / runs / 1e3
        print(f"| {op} | {ms:.3f} | {ms / total:.0%} | {count[op] // runs} |")


if __name__ == "__main__":
    main()
