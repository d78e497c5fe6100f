"""A request's state inside the scheduler, the scheduler's limits, and the observer hooks (metrics)."""

from __future__ import annotations

import dataclasses
import time

from r1c.errors import RuntimeInputError
from r1c.runtime.serving.sampling import RowState, SamplingParams
from r1c.runtime.serving.stream import RequestOutput, RequestStream
from r1c.runtime.serving.text import TextStream


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one serving engine.

    max_num_seqs: sequences running at once (cache rows); max_tokens_per_step: tokens one step may run (decode rows
    + prefill chunk tokens; padding from shared calls aside, see prefill_pad_tokens), the knob that bounds how long
    a step — and so every stream's inter-token gap — can take; cache_bytes: the latent cache's budget (None: enough
    for max_num_seqs sequences of max_model_len tokens, at most 1 GiB); max_model_len: prompt + output limit (None:
    the model's max_position_embeddings); max_queue: waiting requests before new ones are refused as over capacity;
    min_bucket: the smallest cache capacity bucket; min_prefill_chunk: prefill tokens a step runs even when the
    decode rows use up the budget (so waiting prompts always progress); prefill_pad_tokens: how many padding tokens
    a prompt chunk may add to share a call with the rows before it (the decode rows or the previous prompt). A
    shared call reads the weights once for both; the padding runs as copies of each row's last real token
    (`StepRunner.step`), which route to the experts that token reads. Default 4: a few-token chunk joins the decode
    rows (r1c bench-serving, small preset, 2 threads, one stream while a 2,000-token prompt arrives 2 tokens a step:
    the stream's median gap 1.6-1.9x its usual one against 2.3-2.4x with separate calls, p99 2.2-3.0x against
    3.3-3.6x); with 16-token chunks joining neither gains nor loses (median gap 25.1-26.3 ms either way).
    """

    max_num_seqs: int = 64
    max_tokens_per_step: int = 256
    cache_bytes: int | None = None
    max_model_len: int | None = None
    max_queue: int = 4096
    min_bucket: int = 64
    min_prefill_chunk: int = 16
    prefill_pad_tokens: int = 4

    def validate(self) -> None:
        """Raises `RuntimeInputError` naming the first field (and its `r1c serve` option) out of range."""
        limits = [("max_num_seqs", 1, False), ("max_tokens_per_step", 1, False), ("cache_bytes", 1, True),
                  ("max_model_len", 1, True), ("max_queue", 1, False), ("min_bucket", 1, False),
                  ("min_prefill_chunk", 1, False), ("prefill_pad_tokens", 0, False)]
        for name, low, optional in limits:
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                option = "--" + ("kv-cache-bytes" if name == "cache_bytes" else name.replace("_", "-"))
                raise RuntimeInputError(f"{name} ({option}) must be an integer >= {low}, got {value!r}")


class Request:
    """One request's state, owned by the scheduler thread once admitted."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, state: RowState,
                 text: TextStream | None, stop_ids: frozenset[int], max_len: int) -> None:
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.state = state
        self.text = text
        self.stop_ids = stop_ids
        self.final_len = min(len(prompt) + params.max_tokens, max_len)  # tokens it may ever hold
        self.max_len = max_len
        self.stream = RequestStream()
        self.prefilled = 0
        self.output: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.token_times: list[float] = []
        self.cancelled = False

    def result(self) -> RequestOutput:
        """The finished request (valid once its stream has ended)."""
        lp = self.params.logprobs is not None
        text = self.text.text if self.text is not None else ""
        return RequestOutput(
            request_id=self.id, prompt_ids=list(self.prompt), token_ids=list(self.output), text=text,
            logprobs=list(self.logprobs) if lp else None,
            top_logprobs=list(self.top_logprobs) if lp and self.params.logprobs else None,
            finish_reason=self.finish_reason or "cancelled",
            ttft_s=(self.token_times[0] - self.arrival) if self.token_times else None,
            e2e_s=(self.token_times[-1] if self.token_times else time.perf_counter()) - self.arrival,
            token_times=list(self.token_times))


class Observer:
    """Hooks the scheduler thread calls (metrics); every method must return quickly."""

    def first_token(self, ttft_s: float) -> None: ...
    def token_gap(self, seconds: float) -> None: ...
    def finished(self, output: RequestOutput) -> None: ...


def stop_ids_for(params: SamplingParams, eos_ids: list[int]) -> frozenset[int]:
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(eos_ids)
    return frozenset(ids)
