#!/usr/bin/env python
"""Two ONNX Runtime bundles' step time side by side: A/B ratios of one step (decode or prefill) at given cache lengths.

Both bundles are loaded in one process and stepped through the runtime's own `StepRunner` on `--rows` rows whose
cache holds `--filled` tokens before every step (contents unused: the time does not depend on them), in alternating
blocks of `--steps` steps, 50 ms apart (the first 3 of each block untimed: a block's thread pool spins up, the
other's has gone idle, so two pools never compete for the cores). Prints the median step time of each and A / B
(> 1: B is faster), and the median over block pairs of A's block median / the B block's next to it (the pairs
alternate which runs first), with a 95% bootstrap interval (this VM's read bandwidth switches between two levels
within seconds; a ratio of back-to-back blocks is what survives that). Not a test: run it on a quiet machine.
Example: two revisions of r1c (or two build options) on one export,

    r1c build EXPORT -o before.bundle   (with the older revision checked out)
    r1c build EXPORT -o after.bundle    (with the newer one)
    python scripts/ab_step.py before.bundle after.bundle --threads 1 --filled 64,512,2000

(README's A/B of the attention kernel compared a build whose `use_cpu_attention_kernel` swapped nothing with a
normal one, both with r1c's other kernels; `--cpu-kernels ort` against the default would compare all three.)
The weights of r1c's CPU kernels are read at load into each process's own huge-page memory (the default
`weights_memory`, r1c.runtime.kernel_weights), so the page cache's state does not reach them. A bundle built with
`--weights-memory onnxruntime` (or without r1c's kernels) reads its weights where ONNX Runtime maps them, from its
`model.onnx.data` in the page cache, and the state of those pages (which physical pages the file's cache holds)
moved a decode step by 20-35% between identical copies here (e.g. 8.3 vs 10.2 ms); to compare kernel code alone
there, let the two bundles share one weights file: `ln A/model.onnx.data B/model.onnx.data` (replacing B's) when
the two builds wrote the same bytes (`cmp` them), so both sessions read the same physical pages.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import click
import numpy as np


def runner(bundle: Path, threads: int, rows: int, tokens: int, filled: int, native: bool = True
           ) -> tuple[Any, Any]:
    from r1c.runtime import load

    options: dict[str, Any] = {"intra_op_num_threads": threads} if threads else {}
    engine = load(bundle, session_options={**options, "native_decode": native})
    step = engine._runner(rows, filled + tokens, rows * tokens, 64)
    for _ in range(rows):
        step.cache.add_row()
    step.cache.lengths[:rows] = filled
    step.cache.resize(filled + tokens)
    return engine, step


@click.command()
@click.argument("bundle_a", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("bundle_b", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--threads", type=int, default=0, show_default=True, help="intra-op threads (0: the bundles')")
@click.option("--rows", type=int, default=1, show_default=True, help="sequences per step (batch)")
@click.option("--tokens", type=int, default=1, show_default=True, help="new tokens per row (1: decode)")
@click.option("--filled", default="64,512,2000", show_default=True, help="cached tokens per row, comma-separated")
@click.option("--blocks", type=int, default=4, show_default=True, help="blocks of steps per bundle")
@click.option("--steps", type=int, default=15, show_default=True, help="steps per block (3 untimed)")
@click.option("--b-onnxruntime", is_flag=True,
              help="B's decode steps through ONNX Runtime (native_decode off; A keeps the default): with BUNDLE_B "
                   "the same bundle, the native decoder against ONNX Runtime's run of its graph")
def main(bundle_a: Path, bundle_b: Path, threads: int, rows: int, tokens: int, filled: str, blocks: int,
         steps: int, b_onnxruntime: bool) -> None:
    """Step time of BUNDLE_A and BUNDLE_B, interleaved in blocks, and their ratio A / B (< 1: A is faster), with a
    95% interval over block pairs. Not a test: run it on a quiet machine (the module's docstring says more)."""
    from r1c.runtime.bench.stats import median_ci

    if steps < 4 or blocks < 1:
        raise click.BadParameter("need at least 4 steps per block and 1 block")
    for length in (int(v) for v in filled.split(",")):
        pairs = [runner(bundle_a, threads, rows, tokens, length),
                 runner(bundle_b, threads, rows, tokens, length, native=not b_onnxruntime)]
        vocab = pairs[0][0].vocab_size
        ids = np.random.default_rng(0).integers(2, vocab, size=(rows, tokens))
        n_new = np.full(rows, tokens, np.int64)
        times: list[list[float]] = [[], []]
        blocks_ms: list[list[float]] = [[], []]  # each block's median step, A's and B's blocks back to back
        for blk in range(blocks):
            order = [0, 1] if blk % 2 == 0 else [1, 0]  # A first, then B first: an order effect cancels
            for k in order:
                (_, step), out, per_block = pairs[k], times[k], blocks_ms[k]
                time.sleep(0.05)  # the other's workers stop spinning first (ONNX Runtime's spin for ~20-30 ms)
                block = []
                for i in range(steps):
                    step.cache.lengths[:rows] = length
                    t0 = time.perf_counter()
                    step.step(ids, 0, n_new)
                    if i >= 3:
                        block.append(time.perf_counter() - t0)
                out += block
                per_block.append(statistics.median(block) * 1e3)
        a, b = (statistics.median(t) * 1e3 for t in times)
        paired = ""
        if blocks > 1:  # each A block over the B block next to it: the machine's slower drifts cancel
            mid, low, high = median_ci([x / y for x, y in zip(*blocks_ms, strict=True)])
            paired = f"; median of block pairs' A/B {mid:.3f} [95% {low:.3f}, {high:.3f}]"
        print(f"filled {length}, rows {rows}, tokens {tokens}, threads {threads or 'bundle'}: "
              f"A {a:.2f} ms, B {b:.2f} ms, A/B {a / b:.3f}{paired}", flush=True)
        del pairs


if __name__ == "__main__":
    main()
