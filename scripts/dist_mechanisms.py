"""The two ways an ONNX Runtime rank runs its collectives, side by side in one process, without a peer.

    python scripts/dist_mechanisms.py BUNDLE [--rank 0] [--steps 200]

Loads rank `--rank` of a sharded bundle twice in this process — `split` (sub-graphs between the collectives,
collectives in Python) and `custom_op` (one session, collectives as onnxruntime-extensions Python ops) — in a
torch.distributed world of ONE process (gloo), where every group is this process alone: the collectives return
their input at once, so what is timed is each mechanism's own cost (session runs, marshaling), not the network
or the other ranks. Decode steps (batch 1, one new token over a cache of --context) alternate between the two,
and a prefill of --prefill tokens shows the cost that grows with the tensors (the logits all-gather).
The outputs are not the model's (the reductions see one rank's share) and are not checked here. An AllGather
over G ranks is stood in for by concatenating this rank's share G times (the same output shape and copy; the
real one refuses a group of one process since the node was sharded for G).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click
import numpy as np


@click.command(help=(__doc__ or "").replace("\n\n", "\n\n\b\n"))  # \b: click prints the paragraph as written
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=0, show_default=True, help="which rank of the sharded bundle to load")
@click.option("--steps", type=int, default=200, show_default=True, help="timed decode steps per mechanism")
@click.option("--context", type=int, default=64, show_default=True, help="KV cache length of a decode step")
@click.option("--prefill", type=int, default=64, show_default=True, help="prompt tokens of a timed prefill")
def main(bundle: Path, rank: int, steps: int, context: int, prefill: int) -> None:
    import torch

    from r1c.manifest import read_manifest
    from r1c.runtime.distributed.groups import close_groups, init_groups, open_store
    from r1c.runtime.distributed.rank import MECHANISMS, rank_runner

    torch.set_num_threads(1)
    m = read_manifest(bundle)
    entry = m.target_options["distributed"]["ranks"][rank]
    init_groups(0, 1, {"tp": [[0]], "world": [[0]]}, store=open_store(1))
    _stand_in_gathers()
    options = {**m.target_options["session"], "intra_op_num_threads": 1}
    runners = {mech: rank_runner(bundle / entry["model"], options, mech) for mech in MECHANISMS}
    c = m.config

    def feeds(new: int) -> dict[str, np.ndarray]:
        f = {"input_ids": np.full((1, new), 5, np.int64), "past_lengths": np.array([context - new], np.int64),
             "logits_index": np.array([[new - 1]], np.int64)}  # the last token's logits, as a sampling step
        for layer in range(c.num_hidden_layers):
            f[f"past_c.{layer}"] = np.zeros((1, c.kv_lora_rank, context), np.float32)
            f[f"past_pe.{layer}"] = np.zeros((1, c.qk_rope_head_dim, context), np.float32)
        return f

    times: dict[str, dict[str, list[float]]] = {mech: {"decode": [], "prefill": []} for mech in runners}
    for kind, new, reps in (("decode", 1, steps), ("prefill", prefill, max(5, steps // 20))):
        f = feeds(new)
        for runner in runners.values():
            runner.run(f)  # warm-up
        for _ in range(reps):
            for mech, runner in runners.items():
                start = time.perf_counter()
                runner.run(f)
                times[mech][kind].append(time.perf_counter() - start)
    close_groups()
    print(f"{bundle.name} rank {rank}: median ms per run (interleaved; one process, no peer)")
    for kind in ("decode", "prefill"):
        split, custom = (statistics.median(times[m][kind]) * 1e3 for m in ("split", "custom_op"))
        print(f"  {kind:7} split {split:8.3f}   custom_op {custom:8.3f}   custom_op / split {custom / split:5.2f}")


def _stand_in_gathers() -> None:
    """Both mechanisms' AllGather (imported by name in `rank` and `ort_collectives`) -> the share repeated
    group_size times along the axis, written into `out` when given (no peers in a one-process world)."""
    from r1c.runtime.distributed import ort_collectives, rank

    def gather(x: np.ndarray, group_name: str, axis: int, group_size: int, out: np.ndarray | None = None,
               parts: object = None) -> np.ndarray:
        return np.concatenate([np.ascontiguousarray(x)] * int(group_size), axis=int(axis), out=out)

    rank.all_gather = gather  # type: ignore[assignment]
    ort_collectives.all_gather = gather  # type: ignore[assignment]


if __name__ == "__main__":
    main()
