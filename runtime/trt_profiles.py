"""What a TensorRT engine is built for: the optimization profile (batch, new tokens, cache capacity) and the target
compute capability (`--arch sm89`, `8.9`, 89, ...), with the architectures that have FP8 tensor cores.
"""

from __future__ import annotations

from typing import Any

from r1c.config import ModelConfig
from r1c.errors import BuildError
from r1c.graph_io import LOGITS_INDEX

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada; Hopper 9.0; Blackwell 10.x / 12.x

# Every dimension runs from 1 up to max_*; TensorRT tunes for opt_* (default: decode, one new token per row at full
# batch and capacity). None means "derived from the model config".
PROFILE_OPTIONS: dict[str, int | None] = {
    "max_batch": 8,
    "max_seq": None,  # min(1024, max_position_embeddings)
    "max_capacity": None,  # min(4096, max_position_embeddings)
    "opt_batch": None,  # max_batch
    "opt_seq": 1,
    "opt_capacity": None,  # max_capacity
}


def profile_shapes(config: ModelConfig, input_names: list[str], options: dict[str, Any] | None = None
                   ) -> dict[str, dict[str, list[int]]]:
    """The optimization profile: input name -> {"min", "opt", "max"} shapes.

    input_ids [batch, seq]; past_lengths [batch]; logits_index [batch, kept] (kept: 1 for a sampling step, up to
    seq for scoring; opt 1); past_c.{l} [batch, kv_lora_rank, capacity];
    past_pe.{l} [batch, qk_rope_head_dim, capacity]. Capacity 1 is the "no cache" call (`Engine.forward`).
    """
    opts = {**PROFILE_OPTIONS, **(options or {})}
    unknown = set(opts) - set(PROFILE_OPTIONS)
    if unknown:
        raise BuildError(f"build: unknown TensorRT profile options {sorted(unknown)} "
                         f"(known: {sorted(PROFILE_OPTIONS)})")
    mpe = config.max_position_embeddings
    max_batch = int(opts["max_batch"] or 1)
    max_seq = int(opts["max_seq"] or min(1024, mpe))
    max_cap = int(opts["max_capacity"] or min(4096, mpe))
    opt_batch = int(opts["opt_batch"] or max_batch)
    opt_seq = int(opts["opt_seq"] or 1)
    opt_cap = int(opts["opt_capacity"] or max_cap)
    for name, v, top in (("batch", opt_batch, max_batch), ("seq", opt_seq, max_seq), ("capacity", opt_cap, max_cap)):
        if not 1 <= v <= top:
            raise BuildError(f"build: TensorRT profile needs 1 <= opt_{name} ({v}) <= max_{name} ({top})")
    if max_seq > mpe or max_cap > mpe:
        raise BuildError(f"build: max_seq ({max_seq}) and max_capacity ({max_cap}) must not exceed the model's "
                         f"max_position_embeddings ({mpe})")

    def dims(batch: int, seq: int, cap: int, kept: int) -> dict[str, list[int]]:
        d = {"input_ids": [batch, seq], "past_lengths": [batch], LOGITS_INDEX: [batch, kept]}
        for layer in range(config.num_hidden_layers):
            d[f"past_c.{layer}"] = [batch, config.kv_lora_rank, cap]
            d[f"past_pe.{layer}"] = [batch, config.qk_rope_head_dim, cap]
        return d

    low, opt, high = dims(1, 1, 1, 1), dims(opt_batch, opt_seq, opt_cap, 1), dims(max_batch, max_seq, max_cap, max_seq)
    missing = [n for n in input_names if n not in low]
    if missing:
        raise BuildError(f"build: no optimization profile rule for graph inputs {missing}")
    return {n: {"min": low[n], "opt": opt[n], "max": high[n]} for n in input_names}


def max_tokens(profile: dict[str, dict[str, list[int]]]) -> int:
    """The most tokens one engine call processes (batch x new tokens at the profile's maximum)."""
    batch, seq = profile["input_ids"]["max"]
    return int(batch) * int(seq)


def parse_compute_capability(value: str | int | tuple[int, int]) -> tuple[int, int]:
    """(major, minor) from "sm89", "SM_89", "8.9", 89, "sm120" or (8, 9)."""
    if isinstance(value, tuple):
        return int(value[0]), int(value[1])
    text = str(value).strip().lower().removeprefix("sm").lstrip("_")
    try:
        if "." in text:
            major, minor = text.split(".", 1)
            return int(major), int(minor)
        n = int(text)
    except ValueError:
        raise BuildError(f"build: cannot read compute capability {value!r} (write e.g. sm89 or 8.9)") from None
    return n // 10, n % 10


def arch_name(cc: tuple[int, int]) -> str:
    """The `--arch` spelling of a compute capability: (8, 9) -> "sm89"."""
    return f"sm{cc[0]}{cc[1]}"


def has_fp8(cc: tuple[int, int]) -> bool:
    return cc >= FP8_MIN_COMPUTE_CAPABILITY
