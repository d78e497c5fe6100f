"""TensorRT for RTX: builds and checks in a child process whose loader can find the ONNX parser's library.

TensorRT for RTX's builder runs without a GPU for an explicit compute capability, so on any machine it proves that
what r1c feeds TensorRT parses with every r1c op bound to its plugin, and it builds the `tensorrt-rtx` target. Its
ONNX parser dlopen()s `libtensorrt_rtx.so` (see `trt_lib`): unless that name is reachable, the work runs in
`python -m r1c.runtime.trt_rtx ...` with LD_LIBRARY_PATH holding a temporary directory with the link, and the
result comes back as JSON.

    check_with_tensorrt_rtx(model_path, config, compute_capability="sm89", build=True, **profile) -> NetworkReport
    build_tensorrt_rtx(work_dir, config, arch="sm89", **options) -> (target_options, libraries)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from r1c.config import ModelConfig
from r1c.errors import BuildError, R1CError
from r1c.runtime.trt_build import ENGINE_FILE, NetworkReport, build_tensorrt, parse_and_build
from r1c.runtime.trt_lib import (
    RTX_INSTALL,
    has_tensorrt_rtx,
    import_tensorrt_rtx,
    link_rtx_library,
    rtx_library_dir,
    rtx_parser_library_reachable,
)
from r1c.runtime.trt_profiles import arch_name, parse_compute_capability
from r1c.targets import DEFAULT_RTX_COMPUTE_CAPABILITY

logger = logging.getLogger(__name__)


def _require_rtx() -> Path:
    if not has_tensorrt_rtx():  # a clear error before anything else
        raise BuildError(f"TensorRT for RTX is not installed (no module tensorrt_rtx_bindings): {RTX_INSTALL}")
    return rtx_library_dir()


def _in_child(args: list[str], tmp: Path, timeout_s: float) -> dict[str, Any]:
    """Run `python -m r1c.runtime.trt_rtx ARGS --report FILE` with the parser's library linked; the JSON report."""
    libs = tmp / "lib"
    libs.mkdir(exist_ok=True)
    link_rtx_library(rtx_library_dir(), libs)
    report_path = tmp / "report.json"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    import r1c  # the child imports this same r1c, installed or not

    root = str(Path(r1c.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "r1c.runtime.trt_rtx", *args, "--report", str(report_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BuildError(f"build: TensorRT for RTX took more than {timeout_s:.0f} s") from None
    if not report_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BuildError(f"build: the TensorRT for RTX child process exited with code {proc.returncode}: "
                         f"{' | '.join(tail) or 'no output'}")
    raw = json.loads(report_path.read_text())
    if "error" in raw:
        raise BuildError(raw["error"])
    return raw


def check_with_tensorrt_rtx(model_path: str | Path, config: ModelConfig, *,
                            compute_capability: str | int | tuple[int, int] = DEFAULT_RTX_COMPUTE_CAPABILITY,
                            build: bool = True, timeout_s: float = 600.0, **profile_options: Any) -> NetworkReport:
    """Parse (and build, unless build=False) `model_path` with TensorRT for RTX for `compute_capability`.

    Works on a copy of the model file (the external data is read in place), so `model_path` is not changed; the
    engine is built into a temporary directory and discarded. Raises BuildError when the model does not parse or
    an r1c node did not become a plugin layer; a failed build is reported in `build_error` (the caller decides).
    """
    src = Path(model_path)
    if not src.is_file():
        raise BuildError(f"build: {src} not found")
    lib_dir = _require_rtx()
    arch = arch_name(parse_compute_capability(compute_capability))
    with tempfile.TemporaryDirectory(prefix="r1c-trt-rtx-") as tmp_name:
        tmp = Path(tmp_name)
        model_copy = _copy_model(src, tmp)
        engine = tmp / ENGINE_FILE if build else None
        if rtx_parser_library_reachable(lib_dir):
            return _check(model_copy, config, arch, engine, profile_options)
        (tmp / "config.json").write_text(config.to_json())
        args = ["check", str(model_copy), "--config", str(tmp / "config.json"), "--arch", arch,
                "--options", json.dumps(profile_options)]
        if not build:
            args.append("--no-build")
        return NetworkReport(**_in_child(args, tmp, timeout_s))


def build_tensorrt_rtx(work_dir: str | Path, config: ModelConfig, *, arch: str | int | tuple[int, int],
                       timeout_s: float = 3600.0, **options: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """`build_tensorrt` with TensorRT for RTX for `arch` (in a child process where the parser needs one)."""
    lib_dir = _require_rtx()
    arch_s = arch_name(parse_compute_capability(arch))
    if rtx_parser_library_reachable(lib_dir):
        return build_tensorrt(work_dir, config, module=import_tensorrt_rtx(), compute_capability=arch_s, **options)
    with tempfile.TemporaryDirectory(prefix="r1c-trt-rtx-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "config.json").write_text(config.to_json())
        raw = _in_child(["build", str(Path(work_dir).resolve()), "--config", str(tmp / "config.json"), "--arch",
                         arch_s, "--options", json.dumps(options)], tmp, timeout_s)
        return raw["target_options"], raw["libraries"]


def supported_onnx_ops(timeout_s: float = 120.0) -> dict[str, Any]:
    """{"parser": version, "ops": sorted default-domain ONNX ops TensorRT for RTX's parser supports}: what
    `passes/tensorrt_ops.py` records (its test compares the two)."""
    lib_dir = _require_rtx()
    if rtx_parser_library_reachable(lib_dir):
        return _supported_ops()
    with tempfile.TemporaryDirectory(prefix="r1c-trt-rtx-") as tmp_name:
        return _in_child(["ops"], Path(tmp_name), timeout_s)


def _supported_ops() -> dict[str, Any]:
    from onnx import defs

    from r1c.runtime.trt_lib import make_logger, parser_version

    trt = import_tensorrt_rtx()
    log = make_logger(trt)
    parser = trt.OnnxParser(trt.Builder(log).create_network(0), log)
    names = sorted({s.name for s in defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx")})
    return {"parser": parser_version(trt), "ops": [n for n in names if parser.supports_operator(n)]}


def _copy_model(src: Path, into: Path) -> Path:
    """Copy the model file into `into`, with symlinks to its external data files (the weights are not copied)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    for rel in sorted(locations):
        target, link = (src.parent / rel).resolve(), into / rel
        if not target.is_file() or not link.resolve().is_relative_to(into.resolve()):
            raise BuildError(f"build: external data {rel!r} of {src.name} is missing or outside its folder")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    dst = into / src.name
    with src.open("rb") as fin, dst.open("wb") as fout:  # the model proto only (weights are external)
        while chunk := fin.read(1 << 22):
            fout.write(chunk)
    return dst


def _check(model_path: Path, config: ModelConfig, arch: str, engine: Path | None,
           options: dict[str, Any]) -> NetworkReport:
    return parse_and_build(import_tensorrt_rtx(), model_path, config, compute_capability=arch,
                           profile_options=options, engine_path=engine)


# ---- the child process ------------------------------------------------------------------------------------------
def _reporting(report: Path, work: Callable[[], dict[str, Any]]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report.write_text(json.dumps(work()))
    except R1CError as e:
        report.write_text(json.dumps({"error": str(e)}))
        sys.exit(1)


@click.group()
def main() -> None:
    """TensorRT for RTX in a child process (run by r1c.runtime.trt_rtx; not a user command)."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("--arch", default=DEFAULT_RTX_COMPUTE_CAPABILITY)
@click.option("--options", default="{}", help="profile options as JSON")
@click.option("--no-build", is_flag=True)
@click.option("--report", type=click.Path(path_type=Path), required=True)
def check(model: Path, config_path: Path, arch: str, options: str, no_build: bool, report: Path) -> None:
    """Parse (and build) MODEL; write the NetworkReport as JSON."""
    engine = None if no_build else model.parent / ENGINE_FILE
    _reporting(report, lambda: dataclasses.asdict(_check(model, ModelConfig.from_json(config_path), arch, engine,
                                                         json.loads(options))))


@main.command()
@click.option("--report", type=click.Path(path_type=Path), required=True)
def ops(report: Path) -> None:
    """Write the ONNX ops the parser supports (`supported_onnx_ops`) as JSON."""
    _reporting(report, _supported_ops)


@main.command()
@click.argument("work_dir", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("--arch", required=True)
@click.option("--options", default="{}", help="build options as JSON")
@click.option("--report", type=click.Path(path_type=Path), required=True)
def build(work_dir: Path, config_path: Path, arch: str, options: str, report: Path) -> None:
    """Build WORK_DIR's engine and kernels; write the manifest's target options and libraries as JSON."""

    def work() -> dict[str, Any]:
        target_options, libraries = build_tensorrt(work_dir, ModelConfig.from_json(config_path),
                                                   module=import_tensorrt_rtx(), compute_capability=arch,
                                                   **json.loads(options))
        return {"target_options": target_options, "libraries": libraries}

    _reporting(report, work)


if __name__ == "__main__":
    main()
