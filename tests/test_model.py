"""The PyTorch model against transformers' DeepseekV3ForCausalLM, and the op references by hand.

Tolerances: float32 logits within 1e-4 of the largest |logit| (max |ours - theirs| <= 1e-4 * max |theirs|);
hand-computed router cases within 1e-6 (sigmoid of a logit round trip); experts vs float64 within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from r1c.config import ModelConfig, preset
from r1c.exporter.checkpoint import load_checkpoint, model_from_checkpoint, random_checkpoint
from r1c.exporter.model import DeepseekV3ForCausalLM, rope_parameters
from r1c.plugins.fp8 import quantize
from r1c.plugins.moe_experts import moe_experts_reference
from r1c.plugins.moe_router import moe_router_reference

transformers = pytest.importorskip("transformers")

RTOL = 1e-4  # relative to the largest |logit| of the reference


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    bound = RTOL * ref.abs().max().item()
    assert err <= bound, f"max |diff| {err:.3g} > {bound:.3g} (rtol {RTOL} of max |logit|)"


def tiny(**kw: object) -> ModelConfig:
    return preset("tiny").replace(**kw)


def decode_stepwise(model: DeepseekV3ForCausalLM, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [B, S, V] from a prefill of `prefill` tokens, then one token at a time through the latent cache."""
    cache = model.new_cache()
    out = [model(ids[:, :prefill], cache)]
    for i in range(prefill, ids.shape[1]):
        out.append(model(ids[:, i : i + 1], cache))
    assert cache.length == ids.shape[1]
    return torch.cat(out, dim=1)


# ---- against transformers --------------------------------------------------------------------------
def negative_bias(tensors: dict[str, torch.Tensor]) -> None:
    g = torch.Generator().manual_seed(7)
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias"):
            t.copy_(-(0.1 + 0.5 * torch.rand(t.shape, generator=g)))  # all negative; many c = s + b below 0


CASES = {
    "tiny": (tiny(), None),
    "no_q_lora": (tiny(q_lora_rank=None), None),
    "negative_bias": (tiny(), negative_bias),
    "one_group": (tiny(n_group=1, topk_group=1), None),
    "top_k_all_kept": (tiny(num_experts_per_tok=16 // 4 * 2), None),  # E / n_group * topk_group
    "no_rope_interleave_no_yarn": (tiny(rope_interleave=False, rope_scaling=None), None),
}


def hf_model(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    d = config.to_hf_dict()
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**d)).eval()
    result = hf.load_state_dict(tensors, strict=True)  # router weight and bias included: nothing left at init
    assert not result.missing_keys and not result.unexpected_keys
    return hf


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case: str, tmp_path: Path) -> None:
    config, tweak = CASES[case]
    tensors = random_checkpoint(config, seed=1)
    if tweak is not None:
        tweak(tensors)
    hf = hf_model(config, tensors)
    hf.save_pretrained(tmp_path)  # transformers writes DeepSeek's per-expert names: loading must fuse them
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.config == config
    model = model_from_checkpoint(ckpt)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().min() > 0 and (bias < 0).any()  # the bias really reached our model

    routed: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: routed.append(o[2]))
             for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        for h in hooks:
            h.remove()
        assert routed and all(r.unique().numel() > config.num_experts_per_tok for r in routed), \
            "transformers routed every token to the same experts: the test would not notice routing bugs"
        assert ref.std() > 0.3  # logits are not flat
        assert_logits_close(model(ids), ref)
        assert_logits_close(decode_stepwise(model, ids, prefill=6), ref)
        # transformers' own cache agrees too (so both caches implement the same positions)
        out = hf(ids[:, :6], use_cache=True)
        steps, cache = [out.logits], out.cache
        for i in range(6, ids.shape[1]):
            out = hf(ids[:, i : i + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
        assert_logits_close(torch.cat(steps, dim=1), ref)


def test_matches_transformers_far_positions() -> None:
    """Positions past YaRN's original context (128) and near max_position_embeddings (512)."""
    config = tiny()
    tensors = random_checkpoint(config, seed=2)
    hf = hf_model(config, tensors)
    model = DeepseekV3ForCausalLM(config).eval()
    model.load_state_dict(tensors, strict=True)
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    pos = (torch.arange(9) * 50 + 60)[None]  # 60 .. 460
    with torch.no_grad():
        assert_logits_close(model(ids, position_ids=pos), hf(ids, position_ids=pos).logits)


@pytest.mark.parametrize("name", ["tiny", "small", "r1"])
def test_rope_parameters_match_transformers(name: str) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = preset(name)
    hf_config = transformers.DeepseekV3Config(**config.to_hf_dict())
    ref_inv_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    inv_freq, factor = rope_parameters(config)
    torch.testing.assert_close(inv_freq, ref_inv_freq, rtol=0, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


# ---- cache, padding, meta ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model() -> DeepseekV3ForCausalLM:
    config = tiny()
    model = DeepseekV3ForCausalLM(config).eval()
    model.load_state_dict(random_checkpoint(config, seed=3), strict=True)
    return model


def test_chunked_prefill_and_decode_equal_full_forward(tiny_model: DeepseekV3ForCausalLM) -> None:
    ids = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = tiny_model(ids)
        cache = tiny_model.new_cache()
        chunks = [tiny_model(ids[:, a:b], cache) for a, b in ((0, 4), (4, 9), (9, 10), (10, 12))]
    assert_logits_close(torch.cat(chunks, dim=1), full)
    assert [t.shape for t in cache.layers if t is not None] == [(3, 12, tiny_model.config.latent_dim)] * 3


def test_right_padded_batch_equals_rows_alone(tiny_model: DeepseekV3ForCausalLM) -> None:
    g = torch.Generator().manual_seed(4)
    lengths, width, new = [7, 4, 1], 7, 3
    rows = [torch.randint(0, 512, (n + new,), generator=g) for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        ids[r, :n], mask[r, :n] = row[:n], 1
    with torch.no_grad():
        cache = tiny_model.new_cache()
        prefill = tiny_model(ids, cache, attention_mask=mask)  # [B, width, V]
        steps = []
        for j in range(new):
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            token = torch.stack([row[n + j] for row, n in zip(rows, lengths)])[:, None]
            steps.append(tiny_model(token, cache, attention_mask=mask)[:, 0])
        for r, (row, n) in enumerate(zip(rows, lengths)):
            alone = tiny_model(row[None])[0]  # [n + new, V]
            assert_logits_close(prefill[r, :n], alone[:n])
            assert_logits_close(torch.stack([s[r] for s in steps]), alone[n:])


def test_r1_builds_on_meta_with_the_configs_parameter_count() -> None:
    config = preset("r1")
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    names = set(model.state_dict())
    assert "model.layers.3.mlp.experts.gate_up_proj" in names and "model.layers.2.mlp.gate_proj.weight" in names
    assert "model.layers.60.self_attn.kv_a_proj_with_mqa.weight" in names and "model.layers.61.mlp" not in str(names)


def test_parameter_count_matches_config_for_tiny_variants() -> None:
    for config in (tiny(), tiny(q_lora_rank=None), tiny(tie_word_embeddings=True), tiny(n_shared_experts=0)):
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(config)
        assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


# ---- r1c::MoERouter by hand ---------------------------------------------------------------------------
def route(scores: list[list[float]], bias: list[float], **attrs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Router inputs whose sigmoid scores are `scores`: gate = identity, hidden = logit(scores)."""
    s = torch.tensor(scores, dtype=torch.float64)
    hidden = torch.logit(s).to(torch.float32)  # [T, E]; sigmoid(hidden @ I) == s (to ~1e-7)
    e = s.shape[1]
    kw: dict = dict(top_k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=0)
    kw.update(attrs)
    return moe_router_reference(hidden, torch.eye(e), torch.tensor(bias, dtype=torch.float32), **kw)


def check_route(got: tuple[torch.Tensor, torch.Tensor], weights: list[list[float]], ids: list[list[int]]) -> None:
    w, i = got
    assert i.dtype == torch.int32 and w.dtype == torch.float32
    assert i.tolist() == ids
    torch.testing.assert_close(w, torch.tensor(weights), rtol=0, atol=1e-6)


def test_router_top_k_plain() -> None:
    check_route(route([[0.1, 0.7, 0.4, 0.9]], [0, 0, 0, 0]), [[0.9, 0.7]], [[3, 1]])


def test_router_normalisation_and_scaling() -> None:
    got = route([[0.1, 0.7, 0.4, 0.9]], [0, 0, 0, 0], norm_topk_prob=1, routed_scaling_factor=2.5)
    check_route(got, [[0.9 / 1.6 * 2.5, 0.7 / 1.6 * 2.5]], [[3, 1]])  # 1.40625, 1.09375
    got = route([[0.1, 0.7, 0.4, 0.9]], [0, 0, 0, 0], norm_topk_prob=0, routed_scaling_factor=2.5)
    check_route(got, [[2.25, 1.75]], [[3, 1]])


def test_router_ties_go_to_the_lower_index() -> None:
    check_route(route([[0.5, 0.5, 0.5, 0.5]], [0, 0, 0, 0], top_k=3), [[0.5, 0.5, 0.5]], [[0, 1, 2]])
    # equal selection scores from the bias; weights stay the unbiased scores
    check_route(route([[0.5, 0.5, 0.5, 0.5]], [0, 0.25, 0.25, 0], top_k=3), [[0.5, 0.5, 0.5]], [[1, 2, 0]])
    # tied groups: groups 0 and 1 are kept (lower index), experts 0..3 compete
    check_route(route([[0.5] * 8], [0] * 8, top_k=3, n_group=4, topk_group=2), [[0.5] * 3], [[0, 1, 2]])


def test_router_negative_bias_selects_but_does_not_weigh() -> None:
    # c = s + b = [0.2, 0.8, 0.3, 0.2]: expert 0 (s = 0.9) loses to expert 2 (s = 0.3)
    got = route([[0.9, 0.8, 0.3, 0.2]], [-0.7, 0, 0, 0], norm_topk_prob=1)
    check_route(got, [[0.8 / 1.1, 0.3 / 1.1]], [[1, 2]])
    # every c negative but one: c = [-0.1, -0.2, -0.7, 0.2]
    check_route(route([[0.9, 0.8, 0.3, 0.2]], [-1, -1, -1, 0]), [[0.2, 0.9]], [[3, 0]])


def test_router_masks_groups() -> None:
    # 4 groups of 2; group scores (sum of both) = 1.0, 1.2, 0.85, 0.5 -> keep groups 1 and 0.
    # Expert 4 (0.8) is the 2nd best overall but its group is dropped; 2 and 3 tie -> 2.
    scores = [[0.9, 0.1, 0.6, 0.6, 0.8, 0.05, 0.3, 0.2]]
    got = route(scores, [0] * 8, n_group=4, topk_group=2, norm_topk_prob=1)
    check_route(got, [[0.6, 0.4]], [[0, 2]])
    # With one group there is no masking: expert 4 is chosen.
    check_route(route(scores, [0] * 8, norm_topk_prob=1), [[0.9 / 1.7, 0.8 / 1.7]], [[0, 4]])


def test_router_group_score_is_the_sum_of_the_two_largest() -> None:
    # group 0: max 0.9, top-2 sum 1.2, full sum 1.8; group 1: max 0.65, top-2 sum 1.3, full sum 1.3.
    # Only the top-2 sum prefers group 1.
    scores = [[0.9, 0.3, 0.3, 0.3, 0.65, 0.65, 0.01, 0.01]]
    got = route(scores, [0] * 8, n_group=2, topk_group=1, norm_topk_prob=1, routed_scaling_factor=2.0)
    check_route(got, [[1.0, 1.0]], [[4, 5]])


def test_router_top_k_equals_all_kept_experts() -> None:
    # 4 groups of 2, keep 2 groups, top_k = 4: exactly the experts of the kept groups, by descending c.
    scores = [[0.9, 0.1, 0.6, 0.7, 0.8, 0.05, 0.3, 0.2]]  # group scores 1.0, 1.3, 0.85, 0.5
    got = route(scores, [0] * 8, top_k=4, n_group=4, topk_group=2)
    check_route(got, [[0.9, 0.7, 0.6, 0.1]], [[0, 3, 2, 1]])


def test_router_several_tokens_independently() -> None:
    got = route([[0.1, 0.7, 0.4, 0.9], [0.9, 0.8, 0.3, 0.2]], [0, 0, 0, 0])
    check_route(got, [[0.9, 0.7], [0.9, 0.8]], [[3, 1], [0, 1]])


def route_logits(logits: list[list[float]], **attrs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Router inputs whose logits are `logits` exactly (gate = identity); no bias."""
    hidden = torch.tensor(logits, dtype=torch.float32)
    e = hidden.shape[1]
    kw: dict = dict(top_k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=0,
                    scoring="softmax", topk_method="greedy")
    kw.update(attrs)
    return moe_router_reference(hidden, torch.eye(e), torch.zeros(e), **kw)


def test_router_v2_greedy_is_softmax_top_k_scaled_not_normalised() -> None:
    logits = [[0.0, 1.0, 2.0, 3.0]]
    s = torch.tensor(logits).softmax(-1)[0]
    got = route_logits(logits, routed_scaling_factor=16.0, n_group=3, topk_group=2)  # greedy ignores the groups
    check_route(got, [[float(s[3]) * 16, float(s[2]) * 16]], [[3, 2]])


def test_router_v2_group_limited_greedy_scores_groups_by_their_max() -> None:
    # 4 groups of 2. Group maxima 3.0, 2.5, 2.45, 0.0 -> keep groups 0 and 1; the top-2 sums of the softmax scores
    # (V3's rule: e^3 + e^-5 = 20.1, e^2.5 + e^2.4 = 23.2, e^2.45 + e^2.44 = 23.1, 2, over Z) would keep groups 1
    # and 2. Expert 4 (2.45) beats expert 3 (2.4) overall, but its group is dropped.
    logits = [[3.0, -5.0, 2.5, 2.4, 2.45, 2.44, 0.0, 0.0]]
    s = torch.tensor(logits).softmax(-1)[0]  # the weights: softmax over all 8 experts, not over the kept ones
    got = route_logits(logits, top_k=3, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                       routed_scaling_factor=2.0)
    check_route(got, [[float(s[0]) * 2, float(s[2]) * 2, float(s[3]) * 2]], [[0, 2, 3]])
    check_route(route_logits(logits, top_k=3), [[float(s[0]), float(s[2]), float(s[4])]], [[0, 2, 4]])  # greedy
    v3 = route_logits(logits, top_k=3, n_group=4, topk_group=2, topk_method="noaux_tc")  # top-2 sums, zero bias
    assert v3[1].tolist() == [[2, 4, 5]]


def test_router_v2_methods_refuse_norm_topk_prob() -> None:
    for method in ("greedy", "group_limited_greedy"):
        with pytest.raises(ValueError, match=f"norm_topk_prob=1 with topk_method '{method}'"):
            route_logits([[0.0, 1.0]], norm_topk_prob=1, topk_method=method)


def test_router_plugin_covers_the_modes_and_refuses_by_name() -> None:
    """The TensorRT plugin's checks (no TensorRT needed): every mode accepted with its own group rule, the undefined
    ones refused naming the attribute."""
    from r1c.plugins.moe_router import SPEC
    from r1c.plugins.moe_router.tensorrt import MoERouterOp

    op = MoERouterOp()
    for method in ("noaux_tc", "greedy", "group_limited_greedy"):
        attrs = SPEC.attrs(scoring="softmax", topk_method=method, norm_topk_prob=int(method == "noaux_tc"),
                           top_k=6, n_group=4, topk_group=2)
        op.validate(attrs)
        op.check_shapes(attrs, [(-1, 32), (16, 32), (16,)])
    op.check_shapes(SPEC.attrs(topk_method="greedy", norm_topk_prob=0, top_k=12, n_group=3), [(5, 32), (16, 32), (16,)])
    with pytest.raises(ValueError, match="top_k=12 exceeds"):  # 16 experts / 4 groups * 2 kept = 8
        op.check_shapes(SPEC.attrs(top_k=12, n_group=4, topk_group=2), [(5, 32), (16, 32), (16,)])
    for bad, fragment in ((dict(topk_method="greedy"), "norm_topk_prob=1 with topk_method 'greedy'"),
                          (dict(topk_method="top_p"), "unknown topk_method 'top_p'"),
                          (dict(scoring="tanh"), "unknown scoring 'tanh'")):
        with pytest.raises(ValueError, match=fragment):
            op.validate(SPEC.attrs(**bad))


def test_v2_router_has_no_correction_bias() -> None:
    config = tiny(architecture="DeepseekV2ForCausalLM", scoring_func="softmax", topk_method="greedy",
                  norm_topk_prob=False, rope_scaling=None)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    names = set(model.state_dict())
    assert not any("e_score_correction_bias" in n for n in names) and "model.layers.1.mlp.gate.weight" in names
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


# ---- r1c::MoEExperts against a dense float64 computation -------------------------------------------------
def dequant64(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[E, R, C] fp8 and [E, ceil(R/128), ceil(C/128)] scales -> float64, one element's block at a time."""
    rows = torch.arange(w.shape[1]) // 128
    cols = torch.arange(w.shape[2]) // 128
    return w.to(torch.float64) * scale.to(torch.float64)[:, rows][:, :, cols]


def dense_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor) -> torch.Tensor:
    x, w13, w2 = x.double(), w13.double(), w2.double()
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
            out[t] += float(weights[t, j]) * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("quant", ["none", "fp8_block128"])
def test_experts_reference_matches_dense_float64(quant: str) -> None:
    g = torch.Generator().manual_seed(5)
    t, h, inter, e, k = 9, 160, 96, 5, 3  # H and I not multiples of 128: partial scale blocks
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e, 2 * inter, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, inter, generator=g) / inter**0.5
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    ids[0] = torch.tensor([4, 4 - 1, 0])  # unsorted ids in a row
    weights = torch.rand(t, k, generator=g)
    if quant == "none":
        got = moe_experts_reference(x, weights, ids, w13, w2)
        ref = dense_experts(x, weights, ids, w13, w2)
    else:
        q13, s13 = quantize(w13)
        q2, s2 = quantize(w2)
        assert q13.dtype == torch.float8_e4m3fn and s13.shape == (e, 2, 2) and s2.shape == (e, 2, 1)
        got = moe_experts_reference(x, weights, ids, q13, q2, s13, s2, quant="fp8_block128")
        ref = dense_experts(x, weights, ids, dequant64(q13, s13), dequant64(q2, s2))
        # and the dequantized weights are close to the originals (e4m3: 3 mantissa bits, <= 1/16 relative)
        assert (dequant64(q13, s13) - w13.double()).abs().max() <= w13.abs().max() / 16
    assert got.dtype == torch.float32 and got.shape == (t, h)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_experts_reference_with_no_tokens_for_some_experts() -> None:
    x = torch.ones(2, 4)
    w13 = torch.zeros(3, 4, 4)
    w13[1, :2] = 1.0  # gate rows of expert 1: G x = [4, 4]
    w13[1, 2:] = 0.5  # up rows: U x = [2, 2]
    w2 = torch.zeros(3, 4, 2)
    w2[1] = 1.0
    ids = torch.tensor([[1], [1]], dtype=torch.int32)
    weights = torch.tensor([[1.0], [0.5]])
    got = moe_experts_reference(x, weights, ids, w13, w2)
    per_unit = 2 * (4 / (1 + torch.exp(torch.tensor(-4.0)))) * 2  # W2 sums 2 entries of silu(4) * 2
    torch.testing.assert_close(got, torch.stack([per_unit.expand(4), 0.5 * per_unit.expand(4)]))
