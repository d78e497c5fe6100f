"""Shared by the sharding / distributed tests: exporting the tiny preset, feeds with a past, comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import ModelConfig

# float32 throughout: a sharded run adds its partial sums in another order than one rank (and the all-reduce in
# yet another), so results differ by rounding only; 1e-5 of the largest |value| bounds that with margin.
REL_TOL = 1e-5
# (tensor_parallel, expert_parallel): TP, EP and mixed layouts on 2 and 4 ranks
LAYOUTS = [(2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def export(out: Path, *extra: str) -> Path:
    code, _, err = cli("export", "--preset", "tiny", "--seed", "3", "-o", str(out), *extra)
    assert code == 0, err
    return out


class TinyBundles:
    """The tiny preset (seed 3) exported once and built on first use as one rank (`single`) or sharded (`tp2`,
    `ep2`, `tp2ep2`), under `root` (the session fixture `tiny_bundles` in conftest.py shares one)."""

    LAYOUTS: ClassVar[dict[str, list[str]]] = {
        "single": [], "tp2": ["--tensor-parallel", "2"], "ep2": ["--expert-parallel", "2"],
        "tp2ep2": ["--tensor-parallel", "2", "--expert-parallel", "2"]}

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def export(self) -> Path:
        if not (self.root / "export" / "model.onnx").is_file():
            export(self.root / "export")
        return self.root / "export"

    def __getitem__(self, name: str) -> Path:
        out = self.root / name
        if not (out / "manifest.json").is_file():
            code, _, err = cli("build", str(self.export), "-o", str(out), "--threads", "1", *self.LAYOUTS[name])
            assert code == 0, err
        return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def feeds_with_past(config: ModelConfig, batch: int = 2, new: int = 4, capacity: int = 6, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """A step of `new` tokens per row over a random cache (rows filled to different lengths), logits at every
    position."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, config.vocab_size, (batch, new)).astype(np.int64),
             "past_lengths": np.arange(batch, dtype=np.int64) % (capacity + 1),
             "logits_index": np.tile(np.arange(new, dtype=np.int64), (batch, 1))}
    for layer in range(config.num_hidden_layers):
        feeds[f"past_c.{layer}"] = rng.standard_normal((batch, config.kv_lora_rank, capacity)).astype(np.float32)
        feeds[f"past_pe.{layer}"] = rng.standard_normal((batch, config.qk_rope_head_dim, capacity)).astype(np.float32)
    return feeds
