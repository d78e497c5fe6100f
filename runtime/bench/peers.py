"""Peers for `r1c bench --peer`: the bundle's own weights and requests through other stacks.

- `transformers`: transformers' model of the bundle's architecture (`DeepseekV3ForCausalLM`, or
  `DeepseekV2ForCausalLM` for a V2 bundle) in eager PyTorch (eager attention, eager experts),
  float32, its own KV cache (`DynamicCache`), greedy `generate`;
- `stock-onnx`: the stock `torch.onnx` (dynamo) export of that model with a KV cache
  (`r1c.exporter.stock.export_stock(..., with_cache=True)`) under ONNX Runtime with the bundle's session
  options, decoded greedily with the cache fed back each step (the way a stock ONNX decoder runs).

Both rebuild the weights from the manifest's `source`: a preset and seed (`random_checkpoint`), or the
checkpoint directory; FP8 bundles' weights are dequantized to float32 (the peers run float32). The weights are
written once to a temporary HF checkpoint (`save_checkpoint`) that transformers loads with `from_pretrained`.
A peer that cannot be set up is returned as an *unavailable* system with the reason, never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import R1CError, RuntimeInputError
from r1c.manifest import Manifest
from r1c.runtime.bench.runner import StepCallback, System

logger = logging.getLogger(__name__)

PEERS = ("transformers", "stock-onnx")


class PeerUnavailable(Exception):
    """A peer cannot be set up; the message is the reason shown in its row."""


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, (PeerUnavailable, R1CError)) else f"{type(e).__name__}: {text}"[:300]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "r1c" / "peers"


def _equal_length(prompts: Sequence[Sequence[int]]) -> int:
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1 or 0 in lengths:
        raise RuntimeInputError("peers take a batch of equal-length, non-empty prompts")
    return lengths.pop()


# ---- the weights -------------------------------------------------------------------------------------
class PeerWeights:
    """The bundle's weights as a temporary float32 HF checkpoint dir, built on first use."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._dir: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def source_digest(self) -> str:
        """Names the weights for caches: the config hash and the source description."""
        text = json.dumps({"config": self.manifest.config_hash, "source": self.manifest.source}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def checkpoint_dir(self) -> Path:
        if self._dir is None:
            from r1c.exporter.checkpoint import save_checkpoint

            config, tensors = rebuild_weights(self.manifest)
            self._tmp = tempfile.TemporaryDirectory(prefix="r1c-peer-ckpt.")
            self._dir = save_checkpoint(Path(self._tmp.name) / "ckpt", config, tensors)
        return self._dir

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._dir = None


def rebuild_weights(manifest: Manifest) -> tuple[Any, dict[str, Any]]:
    """(float32 config, float32 tensors) equal to what the bundle was exported from."""
    from r1c.exporter.checkpoint import dequantized, load_checkpoint, quantize_checkpoint_fp8, random_checkpoint

    source = manifest.source or {}
    precision = source.get("precision", "auto")
    config = manifest.config
    if "preset" in source:
        tensors = random_checkpoint(config, seed=int(source.get("seed", 0)))
        if precision == "fp8":  # the bundle holds these weights rounded to FP8: round them the same way
            _, tensors = quantize_checkpoint_fp8(config, tensors)
    elif "checkpoint" in source:
        path = Path(source["checkpoint"])
        if not path.is_dir():
            raise PeerUnavailable(f"the bundle's source checkpoint {path} is not there")
        ckpt = load_checkpoint(path)
        tensors = ckpt.tensors
        if precision == "fp8" and not ckpt.is_fp8:
            _, tensors = quantize_checkpoint_fp8(ckpt.config, tensors)
        src_plain = ckpt.config.replace(quantization_config=None)
        if src_plain.hash() != config.replace(quantization_config=None).hash():
            raise PeerUnavailable(f"the checkpoint at {path} no longer has the bundle's config")
    else:
        raise PeerUnavailable("the bundle's manifest records no source (preset or checkpoint) to rebuild its "
                              "weights from")
    return config.replace(quantization_config=None), dequantized(tensors, config=config)  # padded FP8 cut back


# ---- transformers -----------------------------------------------------------------------------------
class TransformersPeer:
    """transformers' model of the bundle's architecture (DeepseekV3ForCausalLM or DeepseekV2ForCausalLM), eager,
    float32, greedy `generate` with its KV cache."""

    def __init__(self, checkpoint_dir: Path, config: Any, *, threads: int | None = None) -> None:
        import torch
        import transformers

        from r1c.exporter.stock import hf_model_class

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = hf_model_class(config).from_pretrained(
            str(checkpoint_dir), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
        ).eval()
        gc = self.model.generation_config
        gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, None
        self.info = {"transformers": transformers.__version__, "torch": torch.__version__,
                     "attn_implementation": "eager", "experts_implementation": "eager",
                     "torch_threads": torch.get_num_threads(), "dtype": "float32",
                     "model_class": type(self.model).__name__}

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_step: StepCallback | None = None) -> list[list[int]]:
        from transformers import LogitsProcessor, LogitsProcessorList

        torch = self.torch
        p = _equal_length(prompts)

        class StepClock(LogitsProcessor):  # called once per forward, right after it, before the token is chosen
            def __init__(self) -> None:
                self.step = 0

            def __call__(self, input_ids: Any, scores: Any) -> Any:
                if on_step is not None:
                    on_step(self.step, scores.argmax(-1).numpy())
                self.step += 1
                return scores

        ids = torch.tensor([list(x) for x in prompts], dtype=torch.int64)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, num_beams=1, eos_token_id=eos_token_id, pad_token_id=0,
                                      logits_processor=LogitsProcessorList([StepClock()]), use_cache=True)
        rows: list[list[int]] = out[:, p:].tolist()
        return rows


# ---- stock torch.onnx export under ONNX Runtime --------------------------------------------------------
def stock_onnx_path(weights: PeerWeights, cache_dir: Path) -> Path:
    """The stock export of the bundle's weights with a KV cache, made once per weights and kept in cache_dir."""
    try:
        from r1c.exporter.stock import export_stock
    except ImportError as e:
        raise PeerUnavailable(f"r1c.exporter.stock is not available ({e})") from None
    final = cache_dir / f"stock-{weights.source_digest}"
    model = final / "model.onnx"
    if model.is_file():
        return model
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        export_stock(weights.checkpoint_dir(), tmp / "model.onnx", with_cache=True)
        os.replace(tmp, final)
    except OSError:  # another process finished the same export first
        shutil.rmtree(tmp, ignore_errors=True)
        if not model.is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model


class StockOnnxPeer:
    """Greedy decoding of the stock ONNX export: the cache goes in as inputs and comes back as outputs."""

    def __init__(self, model_path: Path, options: dict[str, Any]) -> None:
        import onnxruntime as ort

        from r1c.runtime.ort_backend import session_options

        self.session = ort.InferenceSession(str(model_path), session_options(options),
                                            providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs or "attention_mask" not in inputs:
            raise PeerUnavailable(f"the stock export has inputs {sorted(inputs)} (expected input_ids, attention_mask, "
                                  "past_key_values.*)")
        self.past = [i for name, i in inputs.items() if name.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        presents = [o for o in self.outputs if o.startswith("present.")]
        if len(presents) != len(self.past) or not self.past:
            raise PeerUnavailable("the stock export has no KV cache (export it with with_cache=True)")
        self.info = {"model": str(model_path), "session": options}

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for i in self.past:  # dims: "batch" -> B, other symbols (the past length) -> 0, numbers as declared
            shape = [batch if d == "batch" else d if isinstance(d, int) else 0 for d in i.shape]
            feeds[i.name] = np.zeros(shape, dtype=np.float32)
        return feeds

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_step: StepCallback | None = None) -> list[list[int]]:
        p = _equal_length(prompts)
        batch = len(prompts)
        ids = np.array(prompts, dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, p), dtype=np.int64), **self._empty_past(batch)}
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch, dtype=bool)
        for step in range(max_new_tokens):
            results = self.session.run(self.outputs, feeds)
            token = results[0][:, -1].argmax(-1).astype(np.int64)
            for row in np.flatnonzero(~done):
                out[row].append(int(token[row]))
            if on_step is not None:
                on_step(step, token)
            if eos_token_id is not None:
                done |= token == eos_token_id
                if done.all():
                    break
            feeds = {"input_ids": token[:, None], "attention_mask": np.ones((batch, p + step + 1), dtype=np.int64)}
            feeds.update({i.name: r for i, r in zip(self.past, results[1:], strict=True)})
        return out


# ---- construction --------------------------------------------------------------------------------------
def make_peers(names: Sequence[str], manifest: Manifest, stack: contextlib.ExitStack, *, threads: int | None = None,
               session: dict[str, Any] | None = None, cache_dir: Path | None = None,
               log: Callable[[str], None] = logger.info) -> list[System]:
    """One System per requested peer; a peer that cannot be built comes back unavailable, with the reason."""
    weights = PeerWeights(manifest)
    stack.callback(weights.close)
    systems: list[System] = []
    for name in dict.fromkeys(names):
        try:
            if name == "transformers":
                log(f"peer transformers: rebuilding the weights and loading {manifest.config.architecture}")
                hf = TransformersPeer(weights.checkpoint_dir(), manifest.config, threads=threads)
                systems.append(System(name, hf, info=hf.info))
            elif name == "stock-onnx":
                log("peer stock-onnx: exporting with torch.onnx (cached after the first run)")
                path = stock_onnx_path(weights, cache_dir or default_cache_dir())
                options = dict(session or {})
                stock = StockOnnxPeer(path, options)
                systems.append(System(name, stock, info=stock.info))
            else:
                raise PeerUnavailable(f"unknown peer (choose from {', '.join(PEERS)})")
        except Exception as e:  # any failure to set a peer up is reported in its row
            reason = _reason(e)
            logger.warning("peer %s unavailable: %s", name, reason)
            systems.append(System(name, None, unavailable=reason))
    return systems
