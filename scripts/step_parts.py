#!/usr/bin/env python
"""Where a decode step's time goes beyond its weight streams: the bundle's graph taken apart and timed in parts.

One decode step of an ONNX Runtime bundle (1 row, `--filled` cached tokens) is run once with every intermediate
value kept; then models of chosen nodes are cut from the bundle's graph, their other inputs fed from those values,
and timed in interleaved rounds (blocks of 20 runs, 3 untimed, 50 ms apart) beside the whole step (through
`r1c.runtime.load`) and a read probe of the step's weight bytes (`torch.sum` over huge-page memory, as the
benchmark's floor):

\b
  streaming     the nodes that stream weights (r1c.cpu Linear, MoE, MLABlock, MLA attention and its int8 form) alone
  +N identity   the same with N Identity nodes after each (`--pad`): what any node between two of them costs
  others        every other node alone (the small ops, warm: their inputs fed, nothing streamed between them)
  step          the whole step (the native decoder's where the bundle has one, r1c.runtime.native_decode)
  step, ORT     the whole step through ONNX Runtime (native_decode off)

\b
Prints each part's median time and its share of the probe's (the floor for the step's bytes), over all rounds and
over the rounds whose probe read at this VM's faster level (the upper half of the range seen). The weights of every
part lie where `load()` puts them (`r1c.runtime.kernel_weights`). Not a test: run it on a quiet machine. Measured
with it: the README's paragraph on the floor and the closing note of issue 11.

\b
    python scripts/step_parts.py BUNDLE [--threads 2] [--filled 140] [--rounds 12] [--pad 1,4,16]
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

STREAMING = {"Linear", "MoE", "MLAAttention", "MLAAttentionInt8", "MLABlock"}


def cut(graph: Any, keep: list[Any], values: dict[str, np.ndarray], pad: int = 0) -> tuple[Any, dict[str, Any]]:
    """A GraphProto of the nodes `keep` (with `pad` Identity nodes after each), inputs not produced among them fed
    from `values`; its outputs are the outputs no kept node reads. Returns (graph, feeds)."""
    import onnx

    nodes = []
    for n in keep:
        n = copy.deepcopy(n)
        if pad:
            out = n.output[0]
            n.output[0] = f"{out}.pad0"
            nodes.append(n)
            names = [f"{out}.pad{j}" for j in range(pad)] + [out]
            nodes += [onnx.helper.make_node("Identity", [names[j]], [names[j + 1]]) for j in range(pad)]
        else:
            nodes.append(n)
    inits = {t.name for t in graph.initializer}
    produced = {o for n in nodes for o in n.output}
    read = {i for n in nodes for i in n.input}
    feeds = {i: values[i] for n in nodes for i in n.input if i and i not in inits and i not in produced}
    inputs = [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in feeds.items()]
    outputs = [onnx.helper.make_empty_tensor_value_info(o) for n in nodes for o in n.output if o and o not in read]
    used = [t for t in graph.initializer if t.name in read]
    return onnx.helper.make_graph(nodes, "part", inputs, outputs, used), feeds


@click.command(help=__doc__)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--threads", default=2, show_default=True, help="ONNX Runtime intra-op threads (and the probe's).")
@click.option("--filled", default=140, show_default=True, help="Cached tokens before the step.")
@click.option("--rounds", default=12, show_default=True, help="Interleaved rounds (one block of each part each).")
@click.option("--pad", default="1,4,16", show_default=True, help="Identity counts after each streaming node.")
def main(bundle: Path, threads: int, filled: int, rounds: int, pad: str) -> None:
    import onnx
    import torch

    from r1c.runtime import load
    from r1c.runtime.bench.roofline import huge_ones
    from r1c.runtime.build import custom_op_libraries
    from r1c.runtime.ort_backend import OrtBackend

    engine = load(bundle, session_options={"intra_op_num_threads": threads})
    ort_engine = load(bundle, session_options={"intra_op_num_threads": threads, "native_decode": False})
    m = engine.manifest
    if m.target != "onnxruntime" or "distributed" in m.target_options:
        raise click.UsageError("step_parts: a one-rank onnxruntime bundle")
    model_path = bundle / m.target_options["model"]
    libraries = custom_op_libraries(bundle, m.target_options, m.files)
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    ids, n_new = np.full((1, 1), 7), np.ones(1, np.int64)

    def stepper(e: Any) -> tuple[Any, Callable[[], None]]:
        r = e._runner(1, filled + 1, 1, 64)
        r.cache.add_row()
        r.cache.resize(filled + 1)

        def step() -> None:
            r.cache.lengths[:1] = filled
            r.step(ids, 0, n_new)

        return r, step

    _, step = stepper(engine)
    runner, ort_step = stepper(ort_engine)
    ort_step()  # ONNX Runtime's run fills the io's inputs (the native decoder reads the cache's lengths in place)
    runner.cache.lengths[:1] = filled
    io = runner.io(0, 1, 1, 1)
    feeds = {k: np.ascontiguousarray(v) for k, v in io.feeds().items()}
    with tempfile.TemporaryDirectory(dir=bundle.parent, prefix=".step-parts-") as tmp:
        work = Path(tmp)
        for f in {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}:
            os.link(bundle / f, work / f)  # the same file: parts read the bytes the bundle holds

        def session(g: Any, name: str) -> Any:  # a part's session as load() makes the bundle's
            path = work / f"{name}.onnx"
            onnx.save(onnx.helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version),
                      str(path))
            return OrtBackend(path, {**m.target_options.get("session", {}), "intra_op_num_threads": threads},
                              libraries).session

        everything = copy.deepcopy(graph)  # every intermediate value of one step
        known = {o.name for o in everything.output}
        everything.output.extend(onnx.helper.make_empty_tensor_value_info(o) for n in everything.node for o in n.output
                                 if o and o not in known)
        s = session(everything, "all")
        values = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds), strict=True)) | feeds
        del s
        streaming = [n for n in graph.node if n.op_type in STREAMING]
        others = [n for n in graph.node if n.op_type not in STREAMING]
        parts: dict[str, Callable[[], Any]] = {"step": step, "step, ORT": ort_step}
        for name, nodes, n_pad in [("streaming", streaming, 0),
                                   *((f"+{p} identity", streaming, int(p)) for p in pad.split(",") if p),
                                   ("others", others, 0)]:
            g, part_feeds = cut(graph, nodes, values, n_pad)
            s = session(g, name.replace(" ", "_").replace("+", "pad"))
            binding = s.io_binding()
            for k, v in part_feeds.items():
                binding.bind_cpu_input(k, v)
            for o in s.get_outputs():
                binding.bind_output(o.name, "cpu")
            parts[f"{name} ({len(g.node)} nodes)"] = lambda s=s, b=binding: s.run_with_iobinding(b)
        from r1c.runtime.bench.roofline import bundle_reads, decode_floor  # the step's bytes, as the benchmark counts

        reads, _ = bundle_reads(bundle, m)
        step_bytes = decode_floor(reads, m.config, 1, filled, 2, bandwidth=1.0, capacity=filled + 1).bytes_executed
        torch.set_num_threads(threads)
        words = int(step_bytes) // 4
        buf = huge_ones(2 * words)
        windows = [buf[:words], buf[words:]]
        turn = [0]

        def probe() -> None:
            turn[0] += 1
            float(windows[turn[0] % 2].sum())

        parts["probe"] = probe
        times: dict[str, list[float]] = {k: [] for k in parts}
        for _ in range(rounds):
            for name, fn in parts.items():
                time.sleep(0.05)  # ONNX Runtime's workers spin for ~20-30 ms after a run: let them stop
                for _ in range(3):
                    fn()
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                times[name].append((time.perf_counter() - t0) / 20)
    print(f"{bundle.name}: decode step, 1 row, {filled} cached, {threads} thread(s), {rounds} rounds; "
          f"{step_bytes / 1e6:.1f} MB a step")
    # this VM's read bandwidth switches between two levels: the rounds whose probe read in the upper half of the
    # range seen (when the fastest round is 1.3x the slowest) are also summarized alone
    rates = [step_bytes / t / 1e9 for t in times["probe"]]
    level = (min(rates) + max(rates)) / 2 if max(rates) > 1.3 * min(rates) else float("inf")
    fast = [i for i, r in enumerate(rates) if r >= level]
    print(f"probe {statistics.median(rates):.1f} GB/s (rounds {min(rates):.1f}-{max(rates):.1f}); "
          f"{len(fast)} round(s) at >= {level:.1f} GB/s")
    print("| part | median ms | probe / part | probe / part, fast rounds |\n| --- | ---: | ---: | ---: |")
    for name, t in times.items():
        ratios = [p / x for p, x in zip(times["probe"], t, strict=True)]
        at_fast = f"{statistics.median(ratios[i] for i in fast):.0%}" if fast else "-"
        print(f"| {name} | {statistics.median(t) * 1e3:.3f} | {statistics.median(ratios):.0%} | {at_fast} |")


if __name__ == "__main__":
    main()
