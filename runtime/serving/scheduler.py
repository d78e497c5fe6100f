"""The scheduler: continuous batching over one latent cache, with chunked prefill.

One thread runs the loop; callers only touch the waiting queue and the cancel list (under one lock).

Rows of the cache (`r1c.runtime.kvcache`) are kept in two ranges: decode rows [0, Bd) — requests that have a
sampled token to feed — then prefill rows [Bd, B) in arrival order. Each iteration:
1. cancellations: a waiting request leaves the queue; a running one's row is freed (the step in flight, if any,
   finishes first: at most one step's delay);
2. admission (FIFO): the head of the queue gets a row if `max_num_seqs` and the cache allow the worst case
   (every running request and the new one at prompt + max_tokens tokens), so a running request never runs out
   of cache, and if the prefill rows' remaining prompts do not already fill a step's budget; otherwise it waits
   (back-pressure). A request that can never fit is refused at submit;
3. plan: every decode row feeds one token; prefill gets the rest of the token budget
   (`max_tokens_per_step` - Bd, at least `min_prefill_chunk`): the first prefill row's next chunk, then further
   prefill rows while each earlier one completes its prompt in this step and their tokens fit the budget.
   Consecutive rows share one padded call [k, S] when that adds at most `prefill_pad_tokens` padding, else they
   get calls of their own. A long prompt is thus spread over several steps and running streams keep getting
   tokens (chunked prefill); rows that complete are always a prefix of the prefill range, so they join the
   decode range in place;
4. resize the cache's capacity bucket to the longest row after this step, run the calls (each a backend call
   over a contiguous row range: the decode rows [Bd, 1], joined by the first prefill chunk only when that adds at
   most `prefill_pad_tokens` padding, then the prefill calls), sample, stream the tokens;
5. finished rows leave: the last decode rows fill the holes, prefill rows shift down (one row copy per finished
   request, never per step).

Legend: B = rows in the cache, Bd = decode rows, k = prefill rows in a step, S = tokens per row in a step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from r1c.runtime.kvcache import LatentCache, OverCapacityError
from r1c.runtime.serving.request import Observer, Request, SchedulerConfig
from r1c.runtime.serving.sampling import Choice, sample
from r1c.runtime.serving.stream import TokenEvent
from r1c.runtime.serving.text import TextCodec
from r1c.runtime.step import StepRunner, to_host

logger = logging.getLogger(__name__)


class Scheduler:
    """The loop thread and its state. Use it through `r1c.runtime.serving.ServingEngine`."""

    def __init__(self, runner: StepRunner, config: SchedulerConfig, max_len: int, codec: TextCodec | None,
                 observers: list[Observer]) -> None:
        self.runner = runner
        self.cache: LatentCache = runner.cache
        self.config = config
        self.max_len = max_len
        self.codec = codec
        self.observers = observers
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._cancels: list[Request] = []
        self._closing = False
        self._rows: list[Request] = []  # index = cache row
        self._n_decode = 0
        self._max_final = 0  # the longest final_len among running requests
        self.counters = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "cancelled": 0,
                         "relayouts": 0, "row_moves": 0}
        self._snapshot: dict[str, Any] = {}
        self._update_snapshot()
        self._thread = threading.Thread(target=self._run, name="r1c-scheduler", daemon=True)
        self._thread.start()

    # ---- what callers use (any thread) ------------------------------------------------------------------
    def enqueue(self, req: Request) -> None:
        if not self.cache.fits(1, req.final_len):
            raise OverCapacityError(
                f"request needs up to {req.final_len} cache tokens (prompt {len(req.prompt)} + max_tokens "
                f"{req.params.max_tokens}), more than the cache holds for one sequence "
                f"({self.cache.capacity_tokens} tokens in {self.cache.nbytes} bytes)")
        with self._cond:
            if self._closing:
                raise OverCapacityError("the engine is shut down")
            if len(self._waiting) >= self.config.max_queue:
                raise OverCapacityError(f"over capacity: {len(self._waiting)} requests are waiting "
                                        f"(max_queue {self.config.max_queue}); retry later")
            self._waiting.append(req)
            self._cond.notify_all()

    def cancel(self, req: Request) -> None:
        with self._cond:
            if req.cancelled or req.stream.ended:
                return
            req.cancelled = True
            self._cancels.append(req)
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return dict(self._snapshot, waiting=len(self._waiting))

    # ---- the loop -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._rows or self._cancels or self._closing):
                    self._cond.wait()
                cancels, self._cancels = self._cancels, []
                closing = self._closing
                if closing:
                    cancels += list(self._waiting) + [r for r in self._rows if not r.cancelled]
                cancels = self._drop_waiting(cancels)
            self._finish_running(cancels, "cancelled")
            if closing:
                self._update_snapshot()
                return
            with self._cond:
                self._admit()
            try:
                self._iterate()
            except Exception as e:  # a failed step: fail what runs, keep serving
                logger.exception("step failed; failing %d running requests", len(self._rows))
                self._fail_all(e)
            self._update_snapshot()

    def _drop_waiting(self, cancels: list[Request]) -> list[Request]:
        """(lock held) Finish cancelled requests that never got a row; returns those that hold one."""
        running = []
        for req in cancels:
            if req in self._waiting:
                self._waiting.remove(req)
                self._end(req, "cancelled")
            elif not req.stream.ended:
                running.append(req)
        return running

    def _admit(self) -> None:
        """(lock held) Give rows to waiting requests, FIFO, while the worst case fits."""
        while self._waiting:
            req = self._waiting[0]
            longest = max(self._max_final, req.final_len)
            if len(self._rows) >= self.config.max_num_seqs or not self.cache.fits(len(self._rows) + 1, longest):
                return
            if self._prefill_backlog() >= self.config.max_tokens_per_step:
                return  # the next step's prefill budget is already spoken for: wait in the queue, not in a row
            self._waiting.popleft()
            self.cache.add_row()
            self._rows.append(req)
            self._max_final = longest

    def _prefill_backlog(self) -> int:
        """Prompt tokens the prefill rows still have to run."""
        return sum(len(r.prompt) - r.prefilled for r in self._rows[self._n_decode:])

    def _plan(self) -> list[list[tuple[int, int]]]:
        """This step's backend calls, each [(row, tokens)] over consecutive rows (module docstring, step 3): the
        decode rows (1 token each) first, then prefill rows, each joining the previous call when that adds at most
        `prefill_pad_tokens` padding, else opening a call of its own."""
        rows, bd, cfg = self._rows, self._n_decode, self.config
        budget = max(cfg.max_tokens_per_step - bd, cfg.min_prefill_chunk)  # prefill tokens (padding aside)
        calls: list[list[tuple[int, int]]] = [[(r, 1) for r in range(bd)]] if bd else []
        width = 1
        for r in range(bd, len(rows)):
            left = len(rows[r].prompt) - rows[r].prefilled
            take = min(left, budget) if r == bd else left  # only the first prefill row may run a partial chunk
            if take < 1 or take > budget:
                break
            if calls:
                k = len(calls[-1])
                size = (k + 1) * max(width, take)  # the call's tokens if this row joins it
                padding = size - k * width - take  # what joining adds besides `take`
                if padding <= cfg.prefill_pad_tokens and size <= self.runner.max_tokens:
                    calls[-1].append((r, take))
                    width = max(width, take)
                    budget -= take
                    if take < left:
                        break
                    continue
            calls.append([(r, take)])
            width = take
            budget -= take
            if take < left:  # a partial chunk: later rows wait (completed rows must stay a prefix)
                break
        return calls

    def _iterate(self) -> None:
        rows, bd, cache = self._rows, self._n_decode, self.cache
        if not rows:
            return
        calls = self._plan()
        cache.resize(max([int(cache.lengths[r]) + n for call in calls for r, n in call]
                         + [int(cache.lengths[: cache.rows].max())]))
        self.counters["steps"] += 1
        sampled: list[int] = []  # rows that choose a token now: decode rows, and prefill rows whose prompt is done
        last: list[np.ndarray] = []  # their logits (copied: the next call reuses the buffer)
        completed = 0
        for call in calls:
            width = max(n for _, n in call)
            ids = np.zeros((len(call), width), dtype=np.int64)
            for i, (r, n) in enumerate(call):
                req = rows[r]
                if r < bd:
                    ids[i, 0] = req.output[-1]
                else:
                    ids[i, :n] = req.prompt[req.prefilled:req.prefilled + n]
            logits = self.runner.step(ids, call[0][0], np.array([n for _, n in call], dtype=np.int64))
            for i, (r, n) in enumerate(call):
                if r >= bd:
                    rows[r].prefilled += n
                    if rows[r].prefilled < len(rows[r].prompt):
                        continue
                    completed += 1
                    self.counters["prompt_tokens"] += len(rows[r].prompt)
                sampled.append(r)
                last.append(to_host(logits[i, 0]))  # the row's last token (StepRunner.step)
        finished: list[int] = []
        if sampled:
            now_choices = sample(np.stack(last), [rows[r].state for r in sampled])
            now = time.perf_counter()
            for r, ch in zip(sampled, now_choices):
                if self._emit(rows[r], ch, now):
                    finished.append(r)
        self._n_decode += completed  # rows [bd, bd + completed): a prefix of the prefill range
        if finished:
            self._remove(set(finished))

    def _emit(self, req: Request, ch: Choice, now: float) -> bool:
        """Record a sampled token and stream it; True if the request is finished."""
        t = ch.token
        req.output.append(t)
        if ch.logprob is not None:
            req.logprobs.append(ch.logprob)
            if ch.top is not None:
                req.top_logprobs.append(ch.top)
        if req.token_times:
            gap = now - req.token_times[-1]
            for o in self.observers:
                o.token_gap(gap)
        else:
            for o in self.observers:
                o.first_token(now - req.arrival)
        req.token_times.append(now)
        self.counters["generation_tokens"] += 1
        text, reason = "", None
        if req.text is not None:
            text, stopped = req.text.push(t)
            if stopped:
                reason = "stop"
        if t in req.stop_ids:
            reason = "stop"
        elif reason is None and (len(req.output) >= req.params.max_tokens
                                 or len(req.prompt) + len(req.output) >= req.max_len):
            reason = "length"
        if reason is not None and req.text is not None:
            text += req.text.flush()
        req.finish_reason = reason
        req.stream.put(TokenEvent(index=len(req.output) - 1, token_id=t, text=text, logprob=ch.logprob,
                                  top_logprobs=ch.top, finish_reason=reason))
        if reason is not None:
            self._observe_finished(req)
        return reason is not None

    def _end(self, req: Request, reason: str) -> None:
        """Finish a request that produced no further token (cancelled): a final event with no token."""
        req.finish_reason = reason
        text = req.text.flush() if req.text is not None and reason != "cancelled" else ""
        req.stream.put(TokenEvent(index=len(req.output), token_id=-1, text=text, finish_reason=reason))
        self.counters["cancelled" if reason == "cancelled" else "finished"] += 1

    def _observe_finished(self, req: Request) -> None:
        self.counters["finished"] += 1
        out = req.result()
        for o in self.observers:
            o.finished(out)

    def _finish_running(self, reqs: list[Request], reason: str) -> None:
        index = {id(r): i for i, r in enumerate(self._rows)}
        dead = {index[id(r)] for r in reqs if id(r) in index}
        for req in reqs:
            self._end(req, reason)
        if dead:
            self._remove(dead)

    def _remove(self, dead: set[int]) -> None:
        """Free the rows in `dead`: the last live decode rows fill decode holes, prefill rows shift down."""
        rows, bd, cache = self._rows, self._n_decode, self.cache
        decode_live = [r for r in range(bd) if r not in dead]
        prefill_live = [r for r in range(bd, len(rows)) if r not in dead]
        nd = len(decode_live)
        order = list(range(nd))
        holes = [h for h in range(nd) if h in dead]
        movers = [r for r in decode_live if r >= nd]
        for h, r in zip(holes, movers):  # each source lies beyond every destination: no overwrite
            cache.move_row(r, h)
            order[h] = r
        for i, r in enumerate(prefill_live):  # ascending, each destination at or below its source
            cache.move_row(r, nd + i)
            order.append(r)
        self._rows = [rows[r] for r in order]
        self._n_decode = nd
        while cache.rows > len(self._rows):
            cache.pop_row()
        self._max_final = max((r.final_len for r in self._rows), default=0)
        self.counters["row_moves"] = cache.moves

    def _fail_all(self, error: Exception) -> None:
        for req in self._rows:
            req.finish_reason = "error"
            req.stream.put(error)
        self._rows, self._n_decode, self._max_final = [], 0, 0
        while self.cache.rows:
            self.cache.pop_row()

    def _update_snapshot(self) -> None:
        cache = self.cache
        snap = {
            "running": len(self._rows), "decode_rows": self._n_decode, "prefill_rows": len(self._rows) - self._n_decode,
            "cache_capacity_tokens": cache.capacity_tokens, "cache_used_tokens": cache.used_tokens,
            "cache_reserved_tokens": cache.reserved_tokens, "cache_bucket": cache.bucket, "cache_bytes": cache.nbytes,
            **self.counters, "relayouts": cache.relayouts,
        }
        with self._cond:
            self._snapshot = snap
