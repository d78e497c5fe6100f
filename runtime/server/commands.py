"""The serving commands of the `r1c` CLI: `r1c serve`, `r1c capi`, `r1c bench-serving` (and the `--weights-memory`
option `r1c run` shares with `r1c serve`).

Heavy imports happen inside the commands, so `r1c --help` stays fast. `register(group)` adds them to the CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from r1c.targets import WEIGHTS_MEMORY

# `r1c serve` and `r1c run`: the session's thread count (the session option intra_op_num_threads)
THREADS_OPTION = click.option(
    "--threads", type=click.IntRange(min=0), default=None,
    help="ONNX Runtime intra-op threads, and the native decode step's (0: one per physical core; default: the "
         "bundle's).")

SCHEDULER_OPTIONS = [
    click.option("--max-num-seqs", type=int, default=64, show_default=True, help="Sequences running at once."),
    click.option("--max-tokens-per-step", type=int, default=256, show_default=True,
                 help="Tokens one step runs (decode rows + prefill chunk, padding from a shared call aside: see "
                      "--prefill-pad-tokens): bounds every stream's inter-token gap."),
    click.option("--kv-cache-bytes", default=None,
                 help="Latent KV cache budget, e.g. 512MiB or 2GiB (default: max-num-seqs sequences of "
                      "max-model-len tokens, at most 1 GiB). Allocated once."),
    click.option("--max-model-len", type=int, default=None, help="Prompt + output limit (default: the model's)."),
    click.option("--max-queue", type=int, default=4096, show_default=True,
                 help="Waiting requests beyond which new ones get an over-capacity error (HTTP 503)."),
    click.option("--prefill-pad-tokens", type=int, default=4, show_default=True,
                 help="Padding a prompt chunk may add to share a backend call with the rows before it (one call "
                      "reads the weights once; padding repeats each row's last real token)."),
    THREADS_OPTION,
]


def scheduler_options(f: Any) -> Any:
    for opt in reversed(SCHEDULER_OPTIONS):
        f = opt(f)
    return f


def make_config(max_num_seqs: int, max_tokens_per_step: int, kv_cache_bytes: str | None, max_model_len: int | None,
                max_queue: int, prefill_pad_tokens: int = 4) -> Any:
    """The scheduler's config from the options, checked before anything is loaded (`RuntimeInputError`)."""
    from r1c.runtime.kvcache import parse_bytes
    from r1c.runtime.serving import SchedulerConfig

    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_tokens_per_step=max_tokens_per_step,
                             cache_bytes=None if kv_cache_bytes is None else parse_bytes(kv_cache_bytes),
                             max_model_len=max_model_len, max_queue=max_queue, prefill_pad_tokens=prefill_pad_tokens)
    config.validate()
    return config


def listen_socket(host: str, port: int) -> Any:
    """A socket bound to (host, port) and listening, made before the bundle loads (so that an address in use or a
    host that does not resolve fails at once, and port 0 picks a free port); `RuntimeInputError` otherwise."""
    import socket

    from r1c.errors import RuntimeInputError

    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RuntimeInputError(f"serve: cannot listen on {where}: host {host!r} does not resolve ({reason})") \
            from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise RuntimeInputError(f"serve: cannot listen on {where}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client", "tokenizers", "jinja2")  # pyproject.toml's serve extra

# `r1c serve` and `r1c run`: where this process keeps the weights of r1c's CPU kernels (a session option of the
# ONNX Runtime backend, r1c.runtime.ort_backend; the bundle's own choice, `r1c build --weights-memory`, otherwise)
WEIGHTS_MEMORY_OPTION = click.option(
    "--weights-memory", type=click.Choice(WEIGHTS_MEMORY), default=None,
    help="Where this process keeps the weights of r1c's CPU kernels (default: the bundle's, r1c build "
         "--weights-memory): hugepages (read into this process's memory in huge pages: the fastest decode) or "
         "onnxruntime (mapped from model.onnx.data: one copy in the page cache shared by every process that serves "
         "the bundle).")


# `r1c serve` and `r1c run`: decode steps through r1c's native decoder (the default, where the bundle's graph is one
# it computes) or through ONNX Runtime (r1c.runtime.native_decode)
NATIVE_DECODE_OPTION = click.option(
    "--native-decode/--no-native-decode", default=None,
    help="Run decode steps (one token a row) of an fp32 bundle built with r1c's CPU kernels as one call into "
         "r1c's kernel library instead of an ONNX Runtime run (same logits within 1e-5; bundles it does not "
         "compute always use ONNX Runtime). Default: the bundle's session option native_decode, on unless its "
         "manifest says otherwise.")


def session_choices(threads: int | None, weights_memory: str | None, native_decode: bool | None = None
                    ) -> dict[str, Any] | None:
    """The ONNX Runtime session options the command line asked for (None: the bundle's own)."""
    session: dict[str, Any] = {}
    if threads is not None:
        session["intra_op_num_threads"] = threads
    if weights_memory is not None:
        session["weights_memory"] = weights_memory
    if native_decode is not None:
        session["native_decode"] = native_decode
    return session or None


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: a free one, printed at start).")
@click.option("--model-name", default=None, help="The model id clients send (default: the bundle's folder name).")
@scheduler_options
@WEIGHTS_MEMORY_OPTION
@NATIVE_DECODE_OPTION
def serve_cmd(bundle: Path, host: str, port: int, model_name: str | None, max_num_seqs: int, max_tokens_per_step: int,
              kv_cache_bytes: str | None, max_model_len: int | None, max_queue: int, prefill_pad_tokens: int,
              threads: int | None, weights_memory: str | None, native_decode: bool | None) -> None:
    """Serve a bundle over HTTP with the OpenAI API: /v1/completions, /v1/chat/completions (with a chat
    template), /v1/models, /health, /metrics (Prometheus). Requests are batched continuously; `stream: true`
    answers as server-sent events; a client that disconnects cancels its request.

    \b
    Example:
      r1c serve out/tiny.bundle --port 8000
      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "tiny.bundle", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0}'
    """
    from r1c.errors import RuntimeInputError, require_extra

    require_extra("serve", SERVE_MODULES, "r1c serve")
    import uvicorn

    from r1c.runtime.server.app import create_app
    from r1c.runtime.server.metrics import Metrics
    from r1c.runtime.serving import ServingEngine

    config = make_config(max_num_seqs, max_tokens_per_step, kv_cache_bytes, max_model_len, max_queue,
                         prefill_pad_tokens)
    if model_name is not None and not model_name.strip():
        raise RuntimeInputError("--model-name must not be empty")
    sock = listen_socket(host, port)
    serving = None
    try:
        metrics = Metrics()
        session = session_choices(threads, weights_memory, native_decode)
        serving = ServingEngine.from_bundle(bundle, config, session_options=session, observers=[metrics])
        metrics.attach(serving.stats)
        name = model_name or bundle.resolve().name
        app = create_app(serving, name, metrics)
        bound = sock.getsockname()[1]
        ranks = getattr(serving.engine.backend, "world_size", 1)
        click.echo(f"r1c: serving {name} on http://{host}:{bound} (cache {serving.stats()['cache_capacity_tokens']} "
                   f"tokens, {'text and ids' if serving.codec else 'token ids only'}"
                   f"{f', {ranks} ranks' if ranks > 1 else ''})", err=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    finally:
        sock.close()
        if serving is not None:
            serving.close()
            close = getattr(serving.engine.backend, "close", None)
            if close is not None:
                close()  # a sharded bundle's follower ranks stop with the server


@click.command("capi", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cflags", is_flag=True, help="Print the compiler flags (include path).")
@click.option("--libs", is_flag=True, help="Print the linker flags (library path, rpath, -lr1c).")
@click.option("--prefix", "show_prefix", is_flag=True, help="Print the install prefix (for CMAKE_PREFIX_PATH).")
@click.option("--build", "force", is_flag=True, help="Rebuild the library even if it is up to date.")
@click.option("--dest", type=click.Path(path_type=Path), default=None,
              help="Install prefix (default: $R1C_CAPI_PREFIX or ~/.cache/r1c/capi/<key>).")
def capi_cmd(cflags: bool, libs: bool, show_prefix: bool, force: bool, dest: Path | None) -> None:
    """The C ABI (libr1c.so, r1c.h, r1c.hpp): build it on first use (CMake) and print how to use it.

    \b
    Examples:
      cc app.c $(r1c capi --cflags --libs) -o app
      cmake -DCMAKE_PREFIX_PATH=$(r1c capi --prefix) ..     # find_package(r1c) -> r1c::r1c
    """
    from r1c.runtime.capi.build import build_capi

    inst = build_capi(dest, force=force, progress=lambda line: click.echo(line, err=True))
    parts = []
    if cflags:
        parts.append(f"-I{inst.include_dir}")
    if libs:
        parts.append(f"-L{inst.lib_dir} -Wl,-rpath,{inst.lib_dir} -lr1c")
    if show_prefix:
        parts.append(str(inst.prefix))
    if not parts:
        parts.append(f"built {inst.library} (header {inst.include_dir / 'r1c' / 'r1c.h'})")
    click.echo(" ".join(parts))


@click.command("bench-serving", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--streams", "streams_text", default="1,8,32,64", show_default=True,
              help="Concurrent streams, comma-separated.")
@click.option("--requests", "n_requests", type=int, default=64, show_default=True,
              help="Requests per concurrency level (the same requests at every level).")
@click.option("--prompt-len", "prompt_text", default="16,128", show_default=True,
              help="Prompt lengths: min,max (uniform, seeded).")
@click.option("--new-tokens", "new_text", default="16,64", show_default=True,
              help="Output lengths: min,max (uniform, seeded).")
@click.option("--long-prompt", type=int, default=2000, show_default=True,
              help="Tokens of the prompt that arrives while a stream runs (0: skip that measurement).")
@click.option("--chunk-budgets", "budgets_text", default="5,17", show_default=True,
              help="Step token budgets for the long-prompt measurement (it also runs unchunked).")
@click.option("--capi-calls", type=int, default=20000, show_default=True,
              help="Calls timed for the C ABI call cost (0: skip; needs CMake and a C compiler).")
@click.option("--rounds", type=int, default=1, show_default=True, help="Interleaved rounds of all levels.")
@click.option("--bucket-rows", type=int, default=32, show_default=True,
              help="Rows of the capacity-bucket measurement (0: skip).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report here.")
@click.option("--seed", type=int, default=0, show_default=True)
@scheduler_options
def bench_serving_cmd(bundle: Path, streams_text: str, n_requests: int, prompt_text: str, new_text: str,
                      long_prompt: int, budgets_text: str, capi_calls: int, rounds: int, bucket_rows: int,
                      json_out: Path | None, seed: int, max_num_seqs: int, max_tokens_per_step: int,
                      kv_cache_bytes: str | None, max_model_len: int | None, max_queue: int,
                      prefill_pad_tokens: int, threads: int | None) -> None:
    """Serving benchmark: tokens/s, TTFT and inter-token latency (p50/p99) at each concurrency against the same
    requests run one at a time (with 1 and 8 streams also the mean ITL at 8 over the single-stream TPOT, beside
    the bytes an 8-row decode step reads over a 1-row step's by the bundle's roofline); a running stream's
    inter-token gap while a long prompt arrives, beside the same stream's gaps before it arrives; the capacity
    bucket against reading the whole cache; the cost of one C ABI call over the Python call. Not a test: run it
    on a quiet machine (levels are interleaved by round; ratios are within a round)."""
    from r1c.errors import BenchError
    from r1c.outdir import atomic_output_file, check_output_file
    from r1c.runtime.serving.bench import BenchSettings, run_bench

    if json_out is not None:
        check_output_file(json_out, BenchError, "--json")  # before the long part
    config = make_config(max_num_seqs, max_tokens_per_step, kv_cache_bytes, max_model_len, max_queue,
                         prefill_pad_tokens)
    settings = BenchSettings.parse(streams_text, n_requests, prompt_text, new_text, long_prompt, budgets_text,
                                   capi_calls, rounds, bucket_rows, seed)
    report = run_bench(bundle, config, settings, threads=threads, log=lambda s: click.echo(s, err=True))
    click.echo(report.table())
    if json_out is not None:
        with atomic_output_file(json_out, BenchError, "--json") as tmp:
            tmp.write_text(report.to_json())


def register(group: click.Group) -> None:
    group.add_command(serve_cmd, "serve")
    group.add_command(capi_cmd, "capi")
    group.add_command(bench_serving_cmd, "bench-serving")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve_cmd())
