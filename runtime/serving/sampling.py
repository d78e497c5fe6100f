"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p, penalties, seeds, logprobs.

Order of the logits processing (as in transformers' `generate` and vLLM): penalties on the raw logits, then
temperature, then top-k, top-p and min-p on the tempered distribution, then one draw.
- repetition_penalty r (CTRL, Keskar et al. 2019; HF `RepetitionPenaltyLogitsProcessor`): for every token already
  in the prompt or the output, logit / r if logit > 0 else logit * r;
- presence_penalty p and frequency_penalty f (OpenAI API reference): logit - p * [count > 0] - f * count, counting
  the output tokens only;
- temperature 0 means greedy (argmax of the penalized logits); otherwise softmax(logits / temperature);
- top_k keeps the k most likely tokens (0: all); top_p keeps the smallest set of most likely tokens whose
  probability reaches top_p (Holtzman et al. 2019); min_p keeps tokens with p >= min_p * p_max (Nguyen et al. 2024);
- the draw: one uniform number from the request's own generator (PCG64 seeded with `seed`, or from OS entropy),
  inverted through the kept tokens' cumulative probabilities in descending order (ties by token id), so the same
  seed and the same logits give the same tokens whatever else runs in the batch.
Logprobs are those of the model's raw distribution (log_softmax of the unprocessed logits), as vLLM reports
them by default: the chosen token's and, with logprobs = n > 0, the n most likely tokens'.

Legend: n = rows sampled in a step, V = vocab size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from r1c.errors import RuntimeInputError
from r1c.runtime.step import to_host

MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. `validate()` raises `RuntimeInputError` naming the field."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    @classmethod
    def make(cls, **kw: Any) -> SamplingParams:
        """Build from keyword arguments (None means the default; lists become tuples) and validate."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - fields)
        if unknown:
            raise RuntimeInputError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        clean: dict[str, Any] = {}
        for k, v in kw.items():
            if v is None and k not in ("seed", "logprobs"):
                continue
            if k == "stop" and isinstance(v, str):
                v = (v,)
            if k in ("stop", "stop_token_ids") and isinstance(v, list):
                v = tuple(v)
            clean[k] = v
        p = cls(**clean)
        p.validate()
        return p

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise RuntimeInputError(msg)

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(is_int(self.max_tokens) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got "
                                                                f"{self.max_tokens!r}")
        need(is_num(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        need(is_int(self.top_k) and self.top_k >= -1, f"top_k must be an integer >= 0 (0 or -1: off), got "
                                                      f"{self.top_k!r}")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        need(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**64),
             f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        need(isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop),
             "stop must be a string or a list of non-empty strings")
        need(isinstance(self.stop_token_ids, (tuple, list)) and all(is_int(t) for t in self.stop_token_ids),
             "stop_token_ids must be a list of integers")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            need(not bad, f"stop token id {bad[0] if bad else 0} is out of range [0, {vocab_size})")


class RowState:
    """A request's sampling state: its generator and, only when penalties are on, its token counts."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], vocab_size: int) -> None:
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        self.counts: np.ndarray | None = None
        self.seen: np.ndarray | None = None
        if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
            self.counts = np.zeros(vocab_size, dtype=np.int32)
        if params.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[np.asarray(prompt, dtype=np.int64)] = True

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True


@dataclasses.dataclass
class Choice:
    """One sampled token: its id, its logprob, and the top alternatives (id, logprob) when asked for."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def penalize(x: np.ndarray, st: RowState) -> None:
    """Apply the request's penalties to one row of logits [V] in place."""
    p = st.params
    if st.seen is not None and p.repetition_penalty != 1.0:
        idx = np.flatnonzero(st.seen)
        v = x[idx]
        x[idx] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if st.counts is not None:
        if p.frequency_penalty:
            x -= np.float32(p.frequency_penalty) * st.counts
        if p.presence_penalty:
            x -= np.float32(p.presence_penalty) * (st.counts > 0)


def kept_distribution(x: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) that a non-greedy draw chooses from, most likely first (ties by token id):
    softmax(x / temperature) restricted by top-k, top-p and min-p, renormalized. x: one row of logits [V]."""
    z = x.astype(np.float64) / p.temperature
    v = z.shape[0]
    k = p.top_k if 0 < p.top_k < v else v
    idx = np.argpartition(-z, k - 1)[:k] if k < v else np.arange(v)
    vals = z[idx]
    order = np.lexsort((idx, -vals))  # descending probability, ties by token id: a canonical order
    idx, vals = idx[order], vals[order]
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    keep = np.ones(len(probs), dtype=bool)
    if p.top_p < 1.0:
        keep &= (np.cumsum(probs) - probs) < p.top_p  # the first token is always kept
    if p.min_p > 0.0:
        keep &= probs >= p.min_p * probs[0]
    probs, idx = probs[keep], idx[keep]
    return idx, probs / probs.sum()


def draw(x: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    """One token from one row of (penalized) logits [V]: one uniform number through the kept tokens' CDF."""
    idx, probs = kept_distribution(x, p)
    j = int(np.searchsorted(np.cumsum(probs), rng.random(), side="right"))
    return int(idx[min(j, len(idx) - 1)])


def sample(logits: np.ndarray, states: Sequence[RowState]) -> list[Choice]:
    """Choose one token per row of `logits` [n, V] for the n requests in `states` (same order)."""
    x = to_host(logits).astype(np.float32, copy=False)  # own host copy: the step's buffer is reused
    out: list[Choice] = []
    greedy_rows = [i for i, st in enumerate(states) if st.params.greedy]
    raw: dict[int, np.ndarray] = {}
    for i, st in enumerate(states):
        if st.params.logprobs is not None:
            raw[i] = x[i].copy()
        if st.params.penalized:
            penalize(x[i], st)
    tokens = np.zeros(len(states), dtype=np.int64)
    if greedy_rows:
        tokens[greedy_rows] = x[greedy_rows].argmax(-1)
    for i, st in enumerate(states):
        if not st.params.greedy:
            tokens[i] = draw(x[i], st.params, st.rng)
    for i, st in enumerate(states):
        t = int(tokens[i])
        c = Choice(t)
        if i in raw:
            c.logprob, c.top = _logprobs(raw[i], t, st.params.logprobs or 0)
        out.append(c)
        st.observe(t)
    return out


def _logprobs(row: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]] | None]:
    z = row.astype(np.float64)
    m = z.max()
    lp = z - (m + np.log(np.exp(z - m).sum()))
    if n <= 0:
        return float(lp[token]), None
    top = np.argpartition(-lp, n - 1)[:n]
    top = top[np.lexsort((top, -lp[top]))]
    return float(lp[token]), [(int(t), float(lp[t])) for t in top]
