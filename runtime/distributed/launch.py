"""Run a sharded bundle: rank 0 schedules (it is the caller's process), the other ranks follow.

`sharded_backend(bundle, manifest)` is what `r1c.runtime.load` returns for a bundle whose manifest has
`target_options.distributed`: a step backend (`r1c.runtime.step`) whose `step(io)` first broadcasts the step (the
non-cache inputs, the cache's key and first row, and what rank 0 did to that cache since its last step:
`control.StepChannel`, `cache_replay`) to the followers over the control group, then runs rank 0's share; every
rank's collectives meet inside the step. Each follower replays the cache journal on its own copy of the cache, so
any caller of the step interface runs sharded: `Engine.generate`, and the serving scheduler that moves rows and
changes the capacity bucket in place (`r1c serve`). Steps from several threads are serialised. Launchers:
- default: rank 0 starts ranks 1..W-1 with `torch.multiprocessing` (forkserver on Linux, else spawn) and a
  TCPStore rendezvous on 127.0.0.1 (a free port); they end when rank 0 closes the backend or exits;
- `torchrun --nproc-per-node W ...`: every process calls `load`; rank 0 gets the backend, the others serve
  inside `load` and then exit the process (SystemExit 0) when rank 0 closes.
Backends: gloo for onnxruntime bundles (CPU), NCCL for tensorrt / tensorrt-rtx bundles (GPU, rank r on
cuda:LOCAL_RANK).
A rank that fails breaks the step for all: rank 0 raises BundleError and the world must be loaded again.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from r1c.errors import BundleError
from r1c.graph_io import LOGITS_INDEX
from r1c.manifest import Manifest, read_manifest
from r1c.runtime.distributed.cache_replay import CacheJournals, CacheReplica, cache_inputs
from r1c.runtime.distributed.control import READY, RUN, STOP, Step, StepChannel
from r1c.runtime.step import StepIO, as_step_backend

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0


def _options(manifest: Manifest) -> dict[str, Any]:
    return manifest.target_options["distributed"]


def _session_options(manifest: Manifest, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle's session options; intra-op threads 0 ("all cores") becomes this rank's share of the cores."""
    options = {**manifest.target_options.get("session", {}), **(overrides or {})}
    if int(options.get("intra_op_num_threads", 0)) == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        options["intra_op_num_threads"] = max(1, cores // int(_options(manifest)["world_size"]))
    return options


def _runner(bundle: Path, manifest: Manifest, rank: int, mechanism: str, options: dict[str, Any]) -> Any:
    entry = _options(manifest)["ranks"][rank]
    if manifest.target in ("tensorrt", "tensorrt-rtx"):
        from r1c.runtime.distributed.trt import TensorRTRank

        return TensorRTRank(bundle, manifest, rank)
    from r1c.runtime.distributed.rank import rank_runner

    return rank_runner(bundle / entry["model"], options, mechanism)


def _init(rank: int, manifest: Manifest, store: Any) -> Any:
    """Process groups for `rank`; returns the control group (gloo, for the step broadcasts)."""
    import torch.distributed as dist

    from r1c.runtime.distributed.groups import init_groups

    opts = _options(manifest)
    backend = opts.get("backend", "gloo")
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    init_groups(rank, int(opts["world_size"]), opts["groups"], backend=backend, store=store)
    return dist.new_group(backend="gloo")  # its own group: a step message never meets a collective of the model


def _channel(manifest: Manifest, control: Any) -> StepChannel:
    names = [i["name"] for i in manifest.graph_io["inputs"] if i["name"] not in set(cache_inputs(manifest.graph_io))]
    return StepChannel(control, names)


def follow(bundle: Path, manifest: Manifest, rank: int, mechanism: str, options: dict[str, Any], control: Any) -> None:
    """A follower's loop: receive each step from rank 0, replay its cache journal, run this rank's share into
    output buffers its cache copy keeps (`CacheReplica.step_io`: allocated when a step needs more than before, then
    reused; only the new latents are used, to write the copy)."""
    runner = as_step_backend(_runner(bundle, manifest, rank, mechanism, options))
    replica = CacheReplica(manifest.graph_io)
    channel = _channel(manifest, control)
    channel.send(READY)  # (a broadcast from rank 0: every rank passes it once all have loaded)
    while True:
        kind, step = channel.receive()
        if kind == STOP or step is None:
            break
        replica.apply(step.key, step.words)
        ids, lengths = step.feeds["input_ids"], step.feeds["past_lengths"]
        io = replica.step_io(step.key, step.r0, ids, lengths,  # this cache's output buffers, reused across steps
                             step.feeds.get(LOGITS_INDEX))
        runner.step(io)
        replica.stepped(step.key, io.outputs())


def _spawned_follower(bundle: str, rank: int, port: int, mechanism: str, options: dict[str, Any]) -> None:
    """Entry point of a spawned follower process."""
    import torch

    from r1c.runtime.distributed.groups import close_groups, join_store

    torch.set_num_threads(1)  # torch only runs the collectives here
    manifest = read_manifest(bundle, verify_hashes=False)  # rank 0 verified the files
    store = join_store(port, int(_options(manifest)["world_size"]))
    store.set(f"r1c/alive/{rank}", "1")
    control = _init(rank, manifest, store)
    try:
        follow(Path(bundle), manifest, rank, mechanism, options, control)
    finally:
        close_groups()


# What a follower imports before its first step: the fork server imports it once, then forks each follower.
PRELOAD = ["r1c.runtime.distributed.launch", "r1c.runtime.distributed.rank", "r1c.runtime.distributed.segments",
           "torch.distributed", "onnxruntime", "onnx_ir"]


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start followers without the caller's `__main__`: multiprocessing (spawn, forkserver) would re-run the
    caller's script in each follower (which needs nothing from it), and a script that loads a sharded bundle at
    top level, without `if __name__ == "__main__":`, would then start followers from its followers."""
    main = sys.modules["__main__"]
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        main.__spec__ = None
        if hasattr(main, "__file__"):
            del main.__file__
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


def _process_context(mp: Any) -> Any:
    """`forkserver` where there is one (Linux): a single-threaded server process that has imported PRELOAD
    forks the followers, so each starts in milliseconds and no follower inherits the caller's threads; else
    `spawn` (each follower imports torch and ONNX Runtime itself)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class ShardedBackend:
    """Rank 0's step backend: broadcasts each step to the followers, runs rank 0's share into the step's buffers."""

    def __init__(self, bundle: Path, manifest: Manifest, *, collectives: str | None = None,
                 session_options: dict[str, Any] | None = None) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        from r1c.runtime.distributed.groups import close_groups, open_store

        opts = _options(manifest)
        self.world_size = int(opts["world_size"])
        self.mechanism = collectives or os.environ.get("R1C_DIST_COLLECTIVES") or opts.get("collectives", "split")
        options = _session_options(manifest, session_options)
        self.processes: list[Any] = []
        self._torchrun = dist.is_torchelastic_launched()
        if self._torchrun:
            rank = int(os.environ["RANK"])
            if int(os.environ["WORLD_SIZE"]) != self.world_size:
                raise BundleError(f"bundle: torchrun started {os.environ['WORLD_SIZE']} processes for a bundle of "
                                  f"{self.world_size} ranks")
            control = _init(rank, manifest, None)
            if rank != 0:
                try:
                    follow(bundle, manifest, rank, self.mechanism, options, control)
                finally:
                    close_groups()
                raise SystemExit(0)
        else:
            store = open_store(self.world_size)
            ctx = _process_context(mp)
            with _main_module_hidden():
                for rank in range(1, self.world_size):
                    p = ctx.Process(target=_spawned_follower, name=f"r1c-rank{rank}", daemon=True,
                                    args=(str(bundle), rank, store.port, self.mechanism, options))
                    p.start()
                    self.processes.append(p)
            try:
                _wait_alive(store, self.processes)
                control = _init(0, manifest, store)
            except BaseException:
                _stop(self.processes)
                raise
            self._store = store
        self.journals = CacheJournals()
        self._lock = threading.Lock()  # one step at a time: the followers take the steps in broadcast order
        self.control_s = 0.0  # time spent broadcasting steps (rank 0), and their count: the control overhead
        self.steps = 0
        self._closed = False
        self._broken = False
        self.channel = _channel(manifest, control)
        try:
            self.runner = as_step_backend(_runner(bundle, manifest, 0, self.mechanism, options))
            self._guard(lambda: self.channel.send(READY))  # returns once every rank has loaded
        except BaseException:
            _shutdown(self.processes, self.channel, [True])
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self.processes, self.channel, [False])
        atexit.register(self._finalizer)

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except BaseException as e:  # an interrupt mid-step leaves the followers inside a collective, too
            self._broken = True
            if not isinstance(e, Exception):
                raise
            dead = [f"rank {i + 1} (exit code {p.exitcode})" for i, p in enumerate(self.processes)
                    if not p.is_alive()]
            raise BundleError(f"bundle: the sharded run failed ({type(e).__name__}: {str(e).strip()[:200]})"
                              + (f"; stopped: {', '.join(dead)}" if dead else "")) from e

    def step(self, io: StepIO) -> None:
        """Run one step on every rank (`r1c.runtime.step`); rank 0's share writes its outputs straight into the io's
        buffers (`CustomOpRank` / `SplitRank.step`; a TensorRT rank, which has only `run`, copies them in)."""
        if io.cache is None:
            raise BundleError("bundle: a sharded bundle steps through a StepRunner over a LatentCache (the followers "
                              "replay that cache's journal); this step names no cache")
        with self._lock:
            if self._closed or self._broken:
                raise BundleError("bundle: this sharded engine is closed (or broke on an earlier error); load it "
                                  "again")
            feeds = io.feeds()
            key, words = self.journals.take(io.cache)  # communicates nothing: a refusal leaves the world intact
            step = Step(key, io.r0, words, {name: feeds[name] for name in self.channel.names})
            t0 = time.perf_counter()
            self._guard(lambda: self.channel.send(RUN, step))
            self.control_s += time.perf_counter() - t0
            self.steps += 1
            self._guard(lambda: self.runner.step(io))

    def close(self) -> None:
        """Stop the followers and leave the process groups (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        atexit.unregister(self._finalizer)
        self.journals.close()
        with self._lock:  # a step in flight on another thread finishes first
            _shutdown(self.processes, self.channel, [self._broken])


def _shutdown(processes: list[Any], channel: StepChannel, broken: list[bool]) -> None:
    from r1c.runtime.distributed.groups import close_groups

    if not broken[0]:
        try:
            channel.send(STOP)
        except Exception:  # a follower already gone: nothing left to tell
            broken[0] = True
    _stop(processes, JOIN_TIMEOUT_S if not broken[0] else 1.0)
    close_groups()


def _wait_alive(store: Any, processes: list[Any]) -> None:
    """Wait until every started follower has reached the store; a follower that died first is a BundleError."""
    import time

    from r1c.runtime.distributed.groups import TIMEOUT_S

    keys = [f"r1c/alive/{rank}" for rank in range(1, len(processes) + 1)]
    deadline = time.monotonic() + TIMEOUT_S
    while not store.check(keys):
        dead = [f"rank {i + 1} (exit code {p.exitcode})" for i, p in enumerate(processes) if not p.is_alive()]
        if dead:
            raise BundleError(f"bundle: follower processes stopped before joining: {', '.join(dead)}")
        if time.monotonic() > deadline:
            raise BundleError(f"bundle: followers did not start within {TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _stop(processes: list[Any], grace_s: float = 1.0) -> None:
    for p in processes:
        p.join(timeout=grace_s)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5.0)


def sharded_backend(bundle: Path, manifest: Manifest, session_options: dict[str, Any] | None = None) -> ShardedBackend:
    """The backend `r1c.runtime.load` uses for a sharded bundle."""
    return ShardedBackend(bundle, manifest, session_options=session_options)
