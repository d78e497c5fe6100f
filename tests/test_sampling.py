"""unit + e2e tiers: the sampler against transformers' logits processors (the independent reference), seeds,
the draw's frequencies, logprobs against `Engine.forward`, and sampling options through the serving engine.

Tolerances: probabilities 1e-6 absolute (float64 vs float32 softmax); logprobs 1e-4 (the batch changes float
sums at 1e-7); frequencies within 5 standard errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from serving_helpers import text_bundle

from r1c.errors import RuntimeInputError
from r1c.runtime import load
from r1c.runtime.serving import SamplingParams, SchedulerConfig, ServingEngine
from r1c.runtime.serving.sampling import RowState, draw, kept_distribution, penalize, sample

transformers = pytest.importorskip("transformers")
lp = transformers.generation.logits_process


def hf_distribution(x: np.ndarray, p: SamplingParams) -> np.ndarray:
    """transformers' temperature -> top-k -> top-p -> min-p warpers, then softmax: probabilities [V]."""
    scores = torch.from_numpy(x.astype(np.float64))[None]
    ids = torch.zeros((1, 1), dtype=torch.long)
    for w in (lp.TemperatureLogitsWarper(p.temperature),
              lp.TopKLogitsWarper(p.top_k) if p.top_k > 0 else None,
              lp.TopPLogitsWarper(p.top_p) if p.top_p < 1 else None,
              lp.MinPLogitsWarper(p.min_p) if p.min_p > 0 else None):
        if w is not None:
            scores = w(ids, scores)
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=5),
                                dict(temperature=0.9, top_p=0.8), dict(temperature=1.0, min_p=0.05),
                                dict(temperature=0.5, top_k=40, top_p=0.9, min_p=0.02)])
def test_kept_distribution_equals_transformers_warpers(kw: dict) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = (rng.standard_normal(300) * 3).astype(np.float32)
        p = SamplingParams.make(**kw)
        idx, probs = kept_distribution(x, p)
        ours = np.zeros(300)
        ours[idx] = probs
        np.testing.assert_allclose(ours, hf_distribution(x, p), atol=1e-6)


def test_repetition_presence_frequency_penalties() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(50) * 2).astype(np.float32)
    prompt, output = [3, 4, 4, 9], [9, 12, 12, 12]
    st = RowState(SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25), prompt, 50)
    for t in output:
        st.observe(t)
    got = x.copy()
    penalize(got, st)
    ref = lp.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), torch.from_numpy(x.copy())[None])
    want = ref[0].numpy().copy()
    counts = np.bincount(output, minlength=50)  # OpenAI: output tokens only
    want -= 0.5 * (counts > 0) + 0.25 * counts
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_draw_frequencies_follow_the_kept_distribution() -> None:
    x = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))
    p = SamplingParams(temperature=1.0, top_p=0.9)
    idx, probs = kept_distribution(x, p)
    assert list(idx) == [0, 1, 2, 3]  # 0.5 + 0.2 + 0.15 < 0.9: the fourth is needed, the fifth is not
    rng = np.random.Generator(np.random.PCG64(7))
    n = 8000
    freq = np.bincount([draw(x, p, rng) for _ in range(n)], minlength=5) / n
    assert freq[4] == 0
    se = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq[idx] - probs) < 5 * se)


def test_greedy_with_logprobs_and_same_seed_same_tokens() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 64)).astype(np.float32)
    logits[2] = logits[0]
    seeded = [RowState(SamplingParams(seed=5, temperature=1.0), [1], 64) for _ in range(2)]
    greedy = RowState(SamplingParams(temperature=0, logprobs=3), [1], 64)
    a = sample(logits, [seeded[0], greedy, seeded[1]])
    assert a[0].token == a[2].token and a[1].token == int(logits[1].argmax())
    ls = logits[1].astype(np.float64) - np.log(np.exp(logits[1].astype(np.float64)).sum())
    assert a[1].logprob == pytest.approx(ls[a[1].token], abs=1e-9)
    assert [t for t, _ in a[1].top or []] == list(np.argsort(-ls)[:3])


def test_bad_parameters_name_the_field() -> None:
    for kw, field in [(dict(temperature=-1), "temperature"), (dict(max_tokens=0), "max_tokens"),
                      (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"), (dict(repetition_penalty=0), "repetition"),
                      (dict(presence_penalty=3), "presence"), (dict(logprobs=50), "logprobs"), (dict(seed=-1), "seed"),
                      (dict(stop=[""]), "stop"), (dict(bogus=1), "bogus")]:
        with pytest.raises(RuntimeInputError, match=field):
            SamplingParams.make(**kw)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    bundle: Path = text_bundle(tmp_path_factory)
    return load(bundle, session_options={"intra_op_num_threads": 1})


def test_serving_seed_logprobs_and_top_k_one(engine) -> None:  # type: ignore[no-untyped-def]
    prompt = [5, 6, 7, 8, 9]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True, logprobs=2)
    with ServingEngine(engine, SchedulerConfig(max_num_seqs=8, min_bucket=16)) as se:
        others = [se.submit([9, 9, 3 + i] * 5, SamplingParams(max_tokens=20, temperature=1.0)) for i in range(4)]
        a = se.submit(prompt, sampled)
        b = se.submit(prompt, sampled)
        c = se.submit(prompt, SamplingParams.make(max_tokens=12, temperature=1.0, top_p=0.95, seed=99,
                                                  ignore_eos=True))
        k1 = se.submit(prompt, SamplingParams(max_tokens=12, temperature=1.0, top_k=1, ignore_eos=True))
        ra, rb, rc, rk = (h.result(60) for h in (a, b, c, k1))
        for o in others:
            o.result(60)
    assert ra.token_ids == rb.token_ids and ra.logprobs is not None
    assert ra.token_ids != rc.token_ids  # another seed: another sample (12 draws from a random model)
    assert rk.token_ids == engine.generate([prompt], 12)[0]  # top-k 1 is greedy
    logits = engine.forward([prompt + ra.token_ids[:-1]])[0, len(prompt) - 1:].astype(np.float64)
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = ref[np.arange(12), ra.token_ids]
    np.testing.assert_allclose(ra.logprobs, want, atol=1e-4)
    assert ra.top_logprobs is not None and all(len(t) == 2 for t in ra.top_logprobs)
