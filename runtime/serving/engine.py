"""`ServingEngine`: many callers, one model. Submit from any thread or from asyncio, stream tokens, cancel.

    engine = ServingEngine.from_bundle("out/tiny.bundle", SchedulerConfig(max_num_seqs=32))
    h = engine.submit([1, 2, 3], SamplingParams(max_tokens=8, temperature=0))   # or a text prompt
    for ev in h: print(ev.token_id, ev.text)          # blocking iteration, any thread
    out = await engine.submit("Hello", params).aresult()   # asyncio: `async for ev in handle` streams
    h.cancel()                                          # frees the request's cache at the next step boundary

Requests join and leave the running batch at any step (continuous batching, `scheduler.Scheduler`); the latent
cache is allocated once (`SchedulerConfig.cache_bytes`). A greedy request (temperature 0) gets the tokens it would
get alone up to floating-point ties: the batch changes the order of sums in ONNX Runtime's MoE kernel at the 1e-7
level, so two candidates whose logits agree to that level can swap.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BundleError, RuntimeInputError
from r1c.runtime.engine import Engine, load
from r1c.runtime.kvcache import LatentCache, budget_for
from r1c.runtime.serving.request import Observer, Request, SchedulerConfig, stop_ids_for
from r1c.runtime.serving.sampling import RowState, SamplingParams
from r1c.runtime.serving.scheduler import Scheduler
from r1c.runtime.serving.stream import RequestOutput, TokenEvent
from r1c.runtime.serving.text import TextCodec, TextStream
from r1c.runtime.step import StepRunner, backend_alloc

logger = logging.getLogger(__name__)

DEFAULT_CACHE_CAP = 1 << 30  # bytes, when SchedulerConfig.cache_bytes is None


class RequestHandle:
    """A submitted request: iterate (sync or async) over its `TokenEvent`s, or wait for its `RequestOutput`."""

    def __init__(self, engine: ServingEngine, req: Request) -> None:
        self._engine = engine
        self._req = req

    @property
    def id(self) -> str:
        return self._req.id

    @property
    def prompt_ids(self) -> list[int]:
        return list(self._req.prompt)

    def next(self, timeout: float | None = None) -> TokenEvent | None:
        """The next event (None after the last); raises `TimeoutError` after `timeout` seconds."""
        return self._req.stream.get(timeout)

    def __iter__(self) -> Iterator[TokenEvent]:
        while (ev := self._req.stream.get()) is not None:
            yield ev

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while (ev := await self._req.stream.aget()) is not None:
            yield ev

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Wait for the end (consuming the remaining events); raises `TimeoutError` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._req.stream.get(left) is None:
                return self._req.result()

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return self._req.result()

    def cancel(self) -> None:
        """Stop the request; its cache row is freed at the next step boundary (within one step)."""
        self._engine.scheduler.cancel(self._req)


class ServingEngine:
    """The thread-safe serving front of one loaded bundle (see the module docstring)."""

    def __init__(self, engine: Engine, config: SchedulerConfig | None = None,
                 observers: Sequence[Observer] = ()) -> None:
        if not isinstance(engine, Engine):
            raise BundleError("serving needs an r1c bundle with a latent cache; a foreign model's bundle "
                              "(r1c optimize) runs only through Engine.forward / generate")
        self.engine = engine
        self.config = cfg = config or SchedulerConfig()
        model_max = engine.config.max_position_embeddings
        self.max_model_len = min(cfg.max_model_len or model_max, model_max)
        cfg.validate()
        layout = engine.cache_layout
        budget = cfg.cache_bytes
        if budget is None:
            budget = min(budget_for(layout, cfg.max_num_seqs, self.max_model_len), DEFAULT_CACHE_CAP)
        alloc = backend_alloc(engine.backend)  # device tensors for a device-resident backend
        cache = LatentCache(layout, budget, max_rows=cfg.max_num_seqs, max_len=self.max_model_len,
                            min_bucket=cfg.min_bucket, alloc=alloc)
        # output buffers for the largest call: the budget, or the decode rows with a chunk riding along
        step_tokens = max(cfg.max_tokens_per_step, cfg.min_prefill_chunk) + cfg.max_num_seqs + cfg.prefill_pad_tokens
        runner = StepRunner(engine.backend, cache, engine.vocab_size, step_tokens, alloc=alloc,
                            logits_index=engine.selects_logits)
        self.codec = TextCodec.from_dir(engine.bundle_dir)
        eos = engine.config.eos_token_id
        self.eos_token_ids = [eos] if eos is not None else []
        if self.codec is not None and self.codec.eos_token_id is not None \
                and self.codec.eos_token_id not in self.eos_token_ids:
            self.eos_token_ids.append(self.codec.eos_token_id)
        self.scheduler = Scheduler(runner, cfg, self.max_model_len, self.codec, list(observers))
        self._ids = itertools.count()
        logger.info("serving: cache %d tokens (%d bytes), max %d sequences, %d tokens per step",
                    cache.capacity_tokens, cache.nbytes, cfg.max_num_seqs, cfg.max_tokens_per_step)

    @classmethod
    def from_bundle(cls, bundle: str | Path, config: SchedulerConfig | None = None, *,
                    session_options: dict[str, Any] | None = None, observers: Sequence[Observer] = ()
                    ) -> ServingEngine:
        return cls(load(bundle, session_options=session_options), config, observers)  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def tokenize(self, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt (needs the bundle's tokenizer) or a checked copy of an id prompt."""
        if isinstance(prompt, str):
            if self.codec is None:
                raise RuntimeInputError("this bundle has no tokenizer (tokenizer.json): send token ids")
            ids = self.codec.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise RuntimeInputError("a prompt is a string or a list of integer token ids") from None
        if not ids:
            raise RuntimeInputError("the prompt is empty (it needs at least one token)")
        self.engine.check_ids(np.asarray(ids, dtype=np.int64))
        return ids

    def chat_prompt(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        """Token ids of a chat (the tokenizer's chat template, then encoded without adding special tokens)."""
        if self.codec is None:
            raise RuntimeInputError("this bundle has no tokenizer (tokenizer.json): chat needs one")
        text = self.codec.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        return self.tokenize(text, add_special_tokens=False)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
               request_id: str | None = None) -> RequestHandle:
        """Queue a request (thread-safe). Raises `RuntimeInputError` for a bad prompt or parameters and
        `OverCapacityError` when the request can never fit or the queue is full."""
        params = params or SamplingParams()
        params.validate(self.vocab_size)
        ids = self.tokenize(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RuntimeInputError(f"this model's maximum context length is {self.max_model_len} tokens; the "
                                    f"prompt has {len(ids)} and max_tokens is {params.max_tokens}")
        text = None
        if self.codec is not None:
            text = TextStream(self.codec, params.stop, params.skip_special_tokens)
        elif params.stop:
            raise RuntimeInputError("stop strings need the bundle's tokenizer; use stop_token_ids")
        req = Request(request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}", ids, params,
                      RowState(params, ids, self.vocab_size), text, stop_ids_for(params, self.eos_token_ids),
                      self.max_model_len)
        self.scheduler.enqueue(req)
        return RequestHandle(self, req)

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                 timeout: float | None = None) -> list[RequestOutput]:
        """Submit every prompt at once and wait for all (a convenience over `submit`)."""
        handles = [self.submit(p, params) for p in prompts]
        return [h.result(timeout) for h in handles]

    def stats(self) -> dict[str, Any]:
        """Queue length, running sequences, cache use and counters (a consistent snapshot)."""
        return self.scheduler.stats()

    def close(self) -> None:
        """Cancel everything and stop the scheduler thread."""
        self.scheduler.close()

    def __enter__(self) -> ServingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
