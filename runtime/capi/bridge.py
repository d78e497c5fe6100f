"""The Python side of the C ABI (include/r1c/r1c.h): what libr1c calls, holding the GIL, for each C function.

Every function returns `(status, message, value)` and never raises, so the C side needs no exception handling:
status is an `r1c_status` code (OK, END, TIMEOUT or an error whose message goes to `r1c_last_error`). Values are
plain tuples, lists, ints, floats and UTF-8 bytes that the C side unpacks with `PyArg_ParseTuple`-style calls.
"""

from __future__ import annotations

import json
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any

from r1c.errors import BundleError, R1CError, RuntimeInputError
from r1c.runtime.kvcache import OverCapacityError

logger = logging.getLogger(__name__)

OK, END, INVALID, BUNDLE, OVER, TIMEOUT, CLOSED, RUNTIME, PYTHON, INTERNAL = range(10)
Result = tuple[int, str, Any]


def _guard(fn: Callable[..., Any]) -> Callable[..., Result]:
    def call(*args: Any) -> Result:
        try:
            return OK, "", fn(*args)
        except TimeoutError:
            return TIMEOUT, "no event within the timeout", None
        except OverCapacityError as e:
            return (CLOSED if "shut down" in str(e) else OVER), str(e), None
        except BundleError as e:
            return BUNDLE, str(e), None
        except (RuntimeInputError, ValueError, TypeError) as e:
            return INVALID, str(e), None
        except R1CError as e:
            return RUNTIME, str(e), None
        except Exception as e:  # the boundary: nothing propagates into C
            logger.exception("C ABI call %s failed", fn.__name__)
            return INTERNAL, f"{type(e).__name__}: {e}", None

    call.__name__ = fn.__name__
    return call


OPENED: weakref.WeakSet[Any] = weakref.WeakSet()  # engines opened through the C ABI (the benchmark reaches them)

OPTIONS = {"max_num_seqs": int, "max_tokens_per_step": int, "kv_cache_bytes": (int, str), "max_model_len": int,
           "max_queue": int, "threads": int}


@_guard
def open_engine(bundle: str, options_json: str | None) -> Any:
    from r1c.runtime.kvcache import parse_bytes
    from r1c.runtime.serving import SchedulerConfig, ServingEngine

    opts: dict[str, Any] = {}
    if options_json:
        try:
            opts = json.loads(options_json)
        except json.JSONDecodeError as e:
            raise RuntimeInputError(f"options_json is not JSON: {e}") from None
        if not isinstance(opts, dict):
            raise RuntimeInputError("options_json must be a JSON object")
    for k, v in opts.items():
        if k not in OPTIONS:
            raise RuntimeInputError(f"unknown option {k!r} (known: {', '.join(OPTIONS)})")
        if not isinstance(v, OPTIONS[k]) or isinstance(v, bool):  # type: ignore[arg-type]
            raise RuntimeInputError(f"option {k} has the wrong type ({type(v).__name__})")
    cfg = SchedulerConfig(**{k: opts[k] for k in ("max_num_seqs", "max_tokens_per_step", "max_model_len",
                                                  "max_queue") if k in opts},
                          cache_bytes=parse_bytes(opts["kv_cache_bytes"]) if "kv_cache_bytes" in opts else None)
    threads = opts.get("threads")
    engine = ServingEngine.from_bundle(bundle, cfg, session_options=None if threads is None else
                                       {"intra_op_num_threads": threads})
    OPENED.add(engine)
    return engine


@_guard
def close_engine(engine: Any) -> None:
    engine.close()


@_guard
def info(engine: Any) -> tuple[int, int, int, int]:
    codec = engine.codec
    return (engine.vocab_size, engine.max_model_len, int(codec is not None),
            int(codec is not None and codec.chat_template is not None))


@_guard
def token_str(engine: Any, token_id: int) -> bytes:
    if not 0 <= token_id < engine.vocab_size:
        raise RuntimeInputError(f"token id {token_id} is out of range [0, {engine.vocab_size})")
    s = engine.codec.token_str(token_id) if engine.codec is not None else f"token_id:{token_id}"
    return bytes(s.encode("utf-8"))


def _params(p: tuple[Any, ...]) -> Any:
    from r1c.runtime.serving import SamplingParams

    (max_tokens, temperature, top_k, top_p, min_p, rep, pres, freq, seed, stop_ids, stop, ignore_eos, logprobs) = p
    return SamplingParams.make(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq, seed=seed,
                               stop_token_ids=list(stop_ids), stop=[s.decode("utf-8") for s in stop],
                               ignore_eos=bool(ignore_eos), logprobs=None if logprobs < 0 else logprobs)


@_guard
def submit(engine: Any, ids: list[int] | None, text: bytes | None, params: tuple[Any, ...] | None) -> Any:
    from r1c.runtime.serving import SamplingParams

    sp = SamplingParams() if params is None else _params(params)
    prompt: Any = ids if text is None else text.decode("utf-8")
    return engine.submit(prompt, sp)


@_guard
def next_event(handle: Any, timeout_s: float | None) -> tuple[Any, ...] | None:
    """(index, token_id, text bytes, logprob, top ids, top logprobs, finish_reason bytes or None); None at the end."""
    ev = handle.next(timeout_s)
    if ev is None:
        return None
    top = ev.top_logprobs or []
    return (ev.index, ev.token_id, ev.text.encode("utf-8"), math.nan if ev.logprob is None else ev.logprob,
            [t for t, _ in top], [v for _, v in top], None if ev.finish_reason is None else ev.finish_reason.encode())


@_guard
def wait(handle: Any, timeout_s: float | None) -> tuple[int, list[int], bytes, bytes]:
    out = handle.result(timeout_s)
    return len(out.prompt_ids), out.token_ids, out.text.encode("utf-8"), out.finish_reason.encode()


@_guard
def cancel(handle: Any) -> None:
    handle.cancel()
