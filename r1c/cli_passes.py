"""Click commands of the passes stage; `r1c.cli` registers them on the `r1c` group.

They import `r1c.passes` (and so onnxscript) only when they run, so `r1c --help` stays fast.

    r1c inspect MODEL [--json]
    r1c passes [--target T]
    r1c optimize FOREIGN.onnx -o DIR [-v] [--target T] [--dump-after PASS]
Errors are r1c errors (PassError); the `r1c` group turns them into one line and an exit code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

# the names of `r1c.passes.pipelines.PIPELINES` (a test checks they agree)
TARGETS = ("r1c", "onnxruntime", "tensorrt")


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
def inspect_cmd(model: Path, as_json: bool) -> None:
    """Op histogram, parameters by dtype, custom ops (function body / plugin) and graph I/O of MODEL."""
    from r1c.passes.inspect_model import format_report, inspect_model

    info = inspect_model(model)
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))


@click.command("passes")
@click.option("--target", type=click.Choice(TARGETS), default=None, help="One pipeline (default: all).")
def passes_cmd(target: str | None) -> None:
    """Print the pass pipeline of each target, in the order the passes run."""
    from r1c.passes.pipelines import PIPELINES, pass_name

    for name in [target] if target else list(TARGETS):
        click.echo(f"{name}:")
        for i, factory in enumerate(PIPELINES[name]):
            doc = (factory.__doc__ or "").strip().splitlines()
            click.echo(f"  {i:2d} {pass_name(factory):<34} {doc[0] if doc else ''}")


@click.command("optimize")
@click.argument("foreign", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory (must not exist or be empty); written whole or not at all.")
@click.option("--target", type=click.Choice(TARGETS), default="r1c", show_default=True,
              help="r1c: the r1c form that `r1c build` takes; onnxruntime / tensorrt: that target's lowering.")
@click.option("--dump-after", metavar="PASS", default=None, help="Also write the model after PASS (into DIR/dumps).")
@click.option("-v", "--verbose", is_flag=True, help="Log each pass and why fusions did not fire.")
def optimize_cmd(foreign: Path, out: Path, target: str, dump_after: str | None, verbose: bool) -> None:
    """Fuse and lower a foreign ONNX model (e.g. the stock torch.onnx export of DeepseekV3).

    A model below ONNX opset 21 is converted up (ONNX's version converter) when a fusion puts an r1c op
    into it. The output directory also gets graph_io.json (the model's inputs and outputs as `r1c build`
    and the runtime need them, described from the graph) and passes.json (what each pass did).
    """
    import time

    from r1c.cli import _progress, _summary
    from r1c.passes.optimize import optimize

    start = time.perf_counter()
    if verbose:
        logging.getLogger("r1c").setLevel(logging.INFO)
    verbose = logging.getLogger("r1c").getEffectiveLevel() <= logging.INFO  # this -v or `r1c -v`
    path = optimize(foreign, out, target=target, dump_after=dump_after, verbose=verbose, progress=_progress())
    report = json.loads((path.parent / "passes.json").read_text())["graph_io"]
    kind = report["kind"] or f"none ({report['reason']})"
    click.echo(_summary("optimized", path.parent, start, f" ({target}; graph I/O: {kind})"))
