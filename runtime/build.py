"""`r1c build`: turn an exported model directory into an engine bundle for one target.

Input: the output of `r1c export` (model.onnx, graph_io.json, config.json, source.json) or of `r1c optimize`
on a foreign model (model.onnx and the graph_io.json described from its graph; no config.json). A directory
with a model.onnx alone is described from its graph here (r1c/graph_io.py). Foreign models build for
ONNX Runtime only.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from typing import Any

from r1c import graph_io as gio
from r1c.config import ModelConfig
from r1c.errors import BuildError, BundleError
from r1c.jsonfile import read_json_object
from r1c.manifest import TARGETS, Manifest, check_session, file_records, host_device
from r1c.outdir import atomic_output_dir, check_output_dir

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


def _read_export(export_dir: Path) -> tuple[ModelConfig | None, dict[str, Any], dict[str, Any]]:
    """(config or None for a foreign model, graph I/O, source) of an export directory; BuildError on bad input."""
    if not export_dir.is_dir():
        raise BuildError(f"build: {export_dir} is not a directory (expected the output of `r1c export` or "
                         "`r1c optimize`)")
    model = export_dir / MODEL_FILE
    if not model.is_file():
        raise BuildError(f"build: {export_dir} has no {MODEL_FILE} (expected the output of `r1c export` or "
                         "`r1c optimize`)")
    config_path, io_path = export_dir / "config.json", export_dir / gio.FILE
    if io_path.is_file():
        graph_io = gio.check_graph_io(read_json_object(io_path, BuildError, "build"), BuildError, f"build: {io_path}")
    else:
        from r1c.passes.model_file import read_model

        try:
            graph_io = gio.describe_foreign(read_model(model, "build"), BuildError)
        except BuildError as e:
            raise BuildError(f"build: {export_dir} has no {gio.FILE}, and its graph cannot be described: {e}") from None
    config = None
    if not gio.is_foreign(graph_io):
        if not config_path.is_file():
            raise BuildError(f"build: {export_dir} has no config.json (expected the output of `r1c export`)")
        config = ModelConfig.from_json(config_path)
    source_path = export_dir / "source.json"
    source = read_json_object(source_path, BuildError, "build") if source_path.is_file() else {}
    return config, graph_io, source


def _lower(export_dir: Path, work: Path, target: str, dump_after: str | None, dump_dir: Path, verbose: bool,
           progress: bool, threads: int = 0, precision: str = "auto",
           max_file_bytes: int | None = None, cpu_moe: str = "ort") -> dict[str, Any]:
    """Run the target's pass pipeline from export_dir/model.onnx into work/model.onnx (+ its data files); returns
    what the passes reported (under "quantize_weights": the bundle's precision and the quantization errors)."""
    from r1c.passes.pipelines import BuildOptions, lower_file

    target = "tensorrt" if target == "tensorrt-rtx" else target  # one lowering; the builds differ (library, arch)
    options = BuildOptions(threads=threads, precision=precision, cpu_moe=cpu_moe)
    lower_file(export_dir / MODEL_FILE, work / MODEL_FILE, target=target, dump_after=dump_after,
               dump_dir=dump_dir if dump_after else None, verbose=verbose, progress=progress, options=options,
               max_file_bytes=max_file_bytes)
    return options.report


QUANTIZATION_FILE = "quantization.json"
KERNELS_DIR = "kernels"


def resolve_cpu_moe(cpu_moe: str, target: str, ranks: int, progress: bool = False) -> tuple[str, dict[str, Path]]:
    """`--cpu-moe` for this build: ("r1c", the compiled libraries, level -> path in r1c's cache) or ("ort", {}).
    `auto` is r1c's CPU kernel where it builds (one-rank onnxruntime bundles; r1c/plugins/cpu_moe/library.py says
    what it needs: the libraries are compiled into its cache here), else ORT's MoE, and says why (a warning).
    BuildError: `r1c` where the kernel cannot be built. `progress`: say on stderr when a library is compiled (the
    first build on a machine: about a minute)."""
    from r1c.plugins.cpu_moe.library import KernelLibraryError, compile_libraries
    from r1c.targets import CPU_MOE_CHOICES

    if cpu_moe not in CPU_MOE_CHOICES:
        raise BuildError(f"build: --cpu-moe {cpu_moe!r} (choose from {', '.join(CPU_MOE_CHOICES)})")
    if target != "onnxruntime" or ranks > 1:
        if cpu_moe == "r1c":
            raise BuildError("build: --cpu-moe r1c is for a one-rank onnxruntime bundle")
        return "ort", {}
    if cpu_moe == "ort":
        return "ort", {}
    try:
        # into r1c's cache, before any lowering: a failure is known before anything is written
        def notice(message: str) -> None:
            print(f"build: {message}", file=sys.stderr, flush=True)

        return "r1c", compile_libraries(notice if progress else None)
    except KernelLibraryError as e:
        why = str(e).removeprefix("build: ")
        if cpu_moe == "r1c":
            raise BuildError(f"build: --cpu-moe r1c: {why}") from None
        logger.warning("build: routed experts on ONNX Runtime's MoE, not r1c's CPU kernel: %s", why)
        return "ort", {}


def custom_op_libraries(bundle: Path, target_options: dict[str, Any], listed: Collection[str] | None = None
                        ) -> list[Path]:
    """The custom-op libraries a bundle's ONNX Runtime session registers: r1c's CPU kernels, built for the
    highest x86-64 level this host runs. `listed`: the manifest's files (each library must be one of them, so
    that its hash was checked; None while building). BundleError if `target_options.cpu_kernels` is not
    {level: file name under kernels/} of listed files, or the host runs none of its levels."""
    files = target_options.get("cpu_kernels")
    if files is None:
        if target_options.get("cpu_moe") == "r1c":
            raise BundleError("bundle: target_options.cpu_moe is r1c but cpu_kernels names no library")
        return []
    if not isinstance(files, dict) or not files or not all(
            isinstance(level, str) and isinstance(name, str) and name and PurePosixPath(name).name == name
            and name not in (".", "..") and (listed is None or f"{KERNELS_DIR}/{name}" in listed)
            for level, name in files.items()):
        raise BundleError(f"bundle: target_options.cpu_kernels must map x86-64 levels to library files under "
                          f"{KERNELS_DIR}/ that the manifest lists, got {json.dumps(files, default=repr)[:80]}")
    from r1c.plugins.cpu_moe.library import for_host

    return [bundle / KERNELS_DIR / for_host(files)]


def build_tensorrt_target(work: Path, config: ModelConfig, *, target: str, arch: str | None,
                          options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """work/model.onnx (lowered) -> work/model.engine + work/kernels/ for `tensorrt` or `tensorrt-rtx`: the one
    TensorRT build of single-rank bundles and of each rank of a sharded bundle. Returns the manifest's
    (target_options, libraries). `arch`: tensorrt-rtx default sm89 (`DEFAULT_RTX_COMPUTE_CAPABILITY`), tensorrt
    default the current GPU; `options`: profile and build options (`trt_profiles.PROFILE_OPTIONS`, keep_onnx)."""
    if target == "tensorrt-rtx":
        from r1c.runtime.trt_rtx import build_tensorrt_rtx
        from r1c.targets import DEFAULT_RTX_COMPUTE_CAPABILITY

        return build_tensorrt_rtx(work, config, arch=arch or DEFAULT_RTX_COMPUTE_CAPABILITY, **(options or {}))
    from r1c.runtime.trt_build import build_tensorrt

    return build_tensorrt(work, config, compute_capability=arch, **(options or {}))


def build_bundle(export_dir: str | Path, out_dir: str | Path, *, target: str = "onnxruntime",
                 session: dict[str, Any] | None = None, dump_after: str | None = None,
                 verbose: bool = False, arch: str | None = None,
                 tensorrt_options: dict[str, Any] | None = None, tensor_parallel: int = 1,
                 expert_parallel: int = 1, progress: bool = False, precision: str = "auto",
                 max_file_bytes: int | None = None, cpu_moe: str = "auto") -> Path:
    """Build `out_dir` (created whole or not at all) from the export at `export_dir`; BuildError on bad input.

    `arch` (TensorRT targets): the compute capability to build for (`sm89`, `sm90`, `sm120`, ...; tensorrt-rtx
    default sm89, tensorrt default the current GPU); `tensorrt_options`: profile options (see
    `r1c.runtime.trt_profiles.PROFILE_OPTIONS`). tensor_parallel x expert_parallel > 1: one bundle with every
    rank's files (`r1c.runtime.distributed.build`). `precision` (onnxruntime, one rank): the bundle's weights,
    "auto" | "fp32" | "int8" | "int4" (see `r1c.passes.pipelines.BuildOptions`); a quantized bundle holds
    `quantization.json` with each tensor's relative error and its manifest's `precision` says "int8"/"int4".
    `max_file_bytes`: the most weight bytes per data file of the lowered model (default 16 GiB; see
    passes/pipelines.save_model); the manifest records each file. `cpu_moe` (onnxruntime, one rank): "r1c" runs
    the float routed experts on r1c's CPU kernel (r1c/plugins/cpu_moe; the bundle carries the library under
    `kernels/`, its manifest's `target_options.cpu_kernels` names it), "ort" on ONNX Runtime's MoE, "auto" the
    first where it builds (`resolve_cpu_moe`).
    """
    src, out = Path(export_dir), Path(out_dir)
    if target not in TARGETS:
        raise BuildError(f"build: unknown target {target!r} (choose from {', '.join(TARGETS)})")
    check_session(session or {}, BuildError, "build: session")
    if precision != "auto" and (target != "onnxruntime" or tensor_parallel * expert_parallel > 1):
        raise BuildError(f"build: --precision {precision} is for a one-rank onnxruntime bundle (this one keeps the "
                         "export's weights)")
    cpu_moe, cpu_kernels = resolve_cpu_moe(cpu_moe, target, tensor_parallel * expert_parallel, progress)
    check_output_dir(out, BuildError, "build")
    config, graph_io, source = _read_export(src)
    if config is None and (target != "onnxruntime" or tensor_parallel * expert_parallel > 1):
        raise BuildError(f"build: {src} holds a foreign model (no config.json); it builds for onnxruntime on one "
                         "rank only (TensorRT and sharding need r1c's model config)")
    dumps = out.with_name(out.name + ".dumps")  # --dump-after writes here, beside the bundle
    with atomic_output_dir(out, BuildError, "build") as tmp:
        libraries: dict[str, str] = {}
        target_options: dict[str, Any]
        bundle_precision = graph_io.get("weights_quant", "none")
        if tensor_parallel * expert_parallel > 1:
            from r1c.runtime.distributed.build import build_ranks

            assert config is not None  # refused above for a foreign model
            target_options, libraries = build_ranks(src, tmp, config, target=target, tensor_parallel=tensor_parallel,
                                                    expert_parallel=expert_parallel, session=session, verbose=verbose,
                                                    arch=arch, tensorrt_options=tensorrt_options)
        elif target == "onnxruntime":
            import onnxruntime as ort

            from r1c.runtime.ort_backend import DEFAULT_OPTIONS, OrtBackend

            session_opts = {**DEFAULT_OPTIONS, **(session or {})}
            report = _lower(src, tmp, target, dump_after, dumps, verbose, progress,
                            threads=int(session_opts["intra_op_num_threads"]), precision=precision,
                            max_file_bytes=max_file_bytes, cpu_moe=cpu_moe)
            libraries["onnxruntime"] = ort.__version__
            if cpu_moe == "r1c" and not any(report.get(p, {}).get("nodes")
                                            for p in ("use_cpu_moe_kernel", "use_cpu_linear_kernel",
                                                      "use_cpu_attention_kernel")):
                cpu_moe = "ort"  # no node in a form r1c's kernels take (each pass logs why): no library
            target_options = {"model": MODEL_FILE, "session": session_opts, "cpu_moe": cpu_moe}
            if cpu_moe == "r1c":
                from r1c.plugins.cpu_moe.library import copy_libraries

                target_options["cpu_kernels"] = copy_libraries(cpu_kernels, tmp / KERNELS_DIR)
            quant = report.get("quantize_weights") or {}
            if quant.get("tensors"):
                bundle_precision = str(quant["precision"])
                (tmp / QUANTIZATION_FILE).write_text(json.dumps(quant, indent=2) + "\n")
                target_options["quantization"] = {k: quant[k] for k in ("format", "bits", "block_size", "tensors",
                                                                        "mean_relative_error", "max_relative_error")}
            elif quant.get("precision") == "fp32":
                bundle_precision = "none"
            # Load once now so a bundle that ONNX Runtime cannot run is never written (ONNX Runtime mapping the
            # weights is enough for that: no huge-page arena of every weight at build time)
            backend = OrtBackend(tmp / MODEL_FILE, {**target_options["session"], "weights_memory": "onnxruntime"},
                                 custom_op_libraries(tmp, target_options))
            if gio.is_foreign(graph_io) and graph_io.get("vocab_size") is None:
                from r1c.runtime.foreign import probe_vocab_size

                graph_io = {**graph_io, "vocab_size": probe_vocab_size(backend, graph_io)}
        else:
            assert config is not None
            _lower(src, tmp, target, dump_after, dumps, verbose, progress, max_file_bytes=max_file_bytes)
            target_options, libraries = build_tensorrt_target(tmp, config, target=target, arch=arch,
                                                              options=tensorrt_options)
        import onnx

        from r1c.runtime.serving.text import copy_tokenizer_files

        copy_tokenizer_files(src, tmp)  # tokenizer.json & co. from the export, hashed in the manifest like the rest
        libraries["onnx"] = onnx.__version__
        files, sizes, fingerprints = file_records(tmp, progress)  # hashed once; a load checks sizes + fingerprints
        manifest = Manifest(
            target=target,
            precision=bundle_precision,
            model_config=None if config is None else config.to_hf_dict(),
            config_hash=gio.foreign_hash(graph_io) if config is None else config.hash(),
            graph_io=graph_io,
            files=files,
            libraries=libraries,
            device=host_device(),
            target_options=target_options,
            source=source,
            file_sizes=sizes,
            file_fingerprints=fingerprints,
        )
        manifest.write(tmp)
    logger.info("built %s bundle at %s", target, out)
    return out
