"""What one C ABI call costs over the Python call it wraps, measured in one process, interleaved.

libr1c is loaded with ctypes into the running interpreter (it joins it instead of starting one) and opens an
engine; the benchmark reaches that same `ServingEngine` from Python (`bridge.OPENED`), so the C calls and the
Python calls hit one scheduler under the same load. Blocks of C calls and of Python calls alternate; the figure
is the median over blocks of (C block time - Python block time) / calls, in CPU time of the calling thread
(`time.thread_time`: what the call costs, without the time the OS gives other processes on a shared machine;
wall-clock medians are kept beside it). ctypes' own overhead (~1 us) counts on the C side, so the figure is an
upper bound of what a C program pays.

Calls: r1c_engine_info; r1c_next on an event that is already there (the tokens a stream reads); and
r1c_submit_ids + r1c_cancel + r1c_request_free of a request that waits in the queue (both rows are held by two
long requests, whose steps run meanwhile).
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r1c.errors import BenchError

OK, END = 0, 1


class Sampling(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("max_tokens", ctypes.c_int32), ("temperature", ctypes.c_double),
                ("top_k", ctypes.c_int32), ("top_p", ctypes.c_double), ("min_p", ctypes.c_double),
                ("repetition_penalty", ctypes.c_double), ("presence_penalty", ctypes.c_double),
                ("frequency_penalty", ctypes.c_double), ("has_seed", ctypes.c_int32), ("seed", ctypes.c_uint64),
                ("stop_token_ids", ctypes.POINTER(ctypes.c_int32)), ("n_stop_token_ids", ctypes.c_size_t),
                ("stop", ctypes.POINTER(ctypes.c_char_p)), ("n_stop", ctypes.c_size_t),
                ("ignore_eos", ctypes.c_int32), ("logprobs", ctypes.c_int32)]


class Token(ctypes.Structure):
    _fields_ = [("index", ctypes.c_int32), ("token_id", ctypes.c_int32), ("text", ctypes.c_char_p),
                ("text_len", ctypes.c_size_t), ("logprob", ctypes.c_double), ("n_top", ctypes.c_int32),
                ("top_ids", ctypes.POINTER(ctypes.c_int32)), ("top_logprobs", ctypes.POINTER(ctypes.c_double)),
                ("finish_reason", ctypes.c_char_p)]


class Info(ctypes.Structure):
    _fields_ = [("vocab_size", ctypes.c_int32), ("max_model_len", ctypes.c_int32), ("has_tokenizer", ctypes.c_int32),
                ("has_chat_template", ctypes.c_int32)]


def _lib(path: Path) -> Any:
    lib = ctypes.CDLL(str(path))  # CDLL: the GIL is released around each call, as for a C caller
    vp, pvp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    lib.r1c_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, pvp]
    lib.r1c_close.argtypes = [vp]
    lib.r1c_engine_info.argtypes = [vp, ctypes.POINTER(Info)]
    lib.r1c_sampling_init.argtypes = [ctypes.POINTER(Sampling)]
    lib.r1c_sampling_init.restype = None
    lib.r1c_submit_ids.argtypes = [vp, ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t, ctypes.POINTER(Sampling), pvp]
    lib.r1c_next.argtypes = [vp, ctypes.c_int32, ctypes.POINTER(Token)]
    lib.r1c_cancel.argtypes = [vp]
    lib.r1c_request_free.argtypes = [vp]
    lib.r1c_request_free.restype = None
    lib.r1c_last_error.restype = ctypes.c_char_p
    return lib


def measure(library: Path, bundle: Path, calls: int, blocks: int = 20,
            log: Callable[[str], None] = lambda s: None) -> dict[str, dict[str, float]]:
    """{call: {"c_us", "python_us", "added_us"}} per call (medians over `blocks` alternating blocks)."""
    from r1c.runtime.capi import bridge
    from r1c.runtime.serving.sampling import SamplingParams

    lib = _lib(library)
    eng = ctypes.c_void_p()
    if lib.r1c_open(str(bundle).encode(), b'{"threads": 1, "max_num_seqs": 3}', ctypes.byref(eng)) != OK:
        raise BenchError(f"benchmark: r1c_open failed: {lib.r1c_last_error().decode()}")
    try:
        se = [e for e in bridge.OPENED if not e.scheduler._closing][-1]
        out: dict[str, dict[str, float]] = {}

        def interleave(name: str, c_call: Callable[[], Any], py_call: Callable[[], Any], n: int) -> None:
            samples: dict[str, list[float]] = {"c_us": [], "python_us": [], "c_wall_us": [], "python_wall_us": []}
            for _ in range(blocks):
                for side, call in (("c", c_call), ("python", py_call)):
                    w0, t0 = time.perf_counter(), time.thread_time()
                    for _ in range(n):
                        call()
                    samples[f"{side}_us"].append((time.thread_time() - t0) / n * 1e6)
                    samples[f"{side}_wall_us"].append((time.perf_counter() - w0) / n * 1e6)
            row = {k: statistics.median(v) for k, v in samples.items()}
            row["added_us"] = statistics.median(c - p for c, p in zip(samples["c_us"], samples["python_us"]))
            out[name] = {**row, "calls": n * blocks}
            log(f"  {name}: C {row['c_us']:.1f} us, Python {row['python_us']:.1f} us (CPU time of the calling thread)")

        info = Info()
        interleave("engine_info", lambda: lib.r1c_engine_info(eng, ctypes.byref(info)), lambda: bridge.info(se),
                   max(calls // blocks, 1))

        sp = Sampling()
        lib.r1c_sampling_init(ctypes.byref(sp))
        if sp.struct_size != ctypes.sizeof(Sampling):
            raise BenchError("benchmark: r1c_sampling's layout differs from r1c.h")
        ids = (ctypes.c_int32 * 4)(5, 6, 7, 8)

        def c_submit(max_tokens: int) -> ctypes.c_void_p:
            sp.max_tokens, sp.temperature, sp.ignore_eos = max_tokens, 0.0, 1
            r = ctypes.c_void_p()
            if lib.r1c_submit_ids(eng, ids, 4, ctypes.byref(sp), ctypes.byref(r)) != OK:
                raise BenchError(f"benchmark: r1c_submit_ids failed: {lib.r1c_last_error().decode()}")
            return r

        def py_params(max_tokens: int) -> SamplingParams:
            return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        # r1c_next on ready events: a C request and a Python request decode in the same steps as a third one;
        # when the third is done, both have all their events queued
        per = 10
        n_events = min(per * blocks, se.max_model_len - 8)
        creq = c_submit(n_events)
        preq = se.submit([5, 6, 7, 8], py_params(n_events))
        se.submit([5, 6, 7, 8], py_params(n_events)).result()
        tok = Token()
        interleave("next_ready", lambda: lib.r1c_next(creq, -1, ctypes.byref(tok)), preq.next,
                   max(n_events // blocks, 1))
        lib.r1c_request_free(creq)

        # submit + cancel + free of a request that waits in the queue: three long requests hold the rows
        holders = [se.submit([5, 6, 7, 8], py_params(se.max_model_len - 8)) for _ in range(3)]
        for h in holders:
            h.next()

        def c_submit_cancel() -> None:
            r = c_submit(4)
            lib.r1c_cancel(r)
            lib.r1c_request_free(r)

        interleave("submit_cancel", c_submit_cancel, lambda: se.submit([5, 6, 7, 8], py_params(4)).cancel(),
                   max(calls // 20 // blocks, 1))
        for h in holders:
            h.cancel()
        return out
    finally:
        lib.r1c_close(eng)
