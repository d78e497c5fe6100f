"""How a model is split over ranks: `--tensor-parallel T --expert-parallel E` on T x E ranks.

The ranks form a grid: rank r is expert partition e = r // T and tensor-parallel index t = r % T.
- Attention (MLA heads: q_b_proj / kv_b_proj / o_proj), the dense MLPs, the shared expert, the embedding and the
  LM head (both along the vocabulary) are split T ways within a tensor-parallel group (the T ranks with the same
  e); the E groups hold the same split (attention is replicated across expert partitions: one request stream
  has nothing else to give them; data-parallel attention, DeepSeek's serving layout, is not built).
- Routed experts are split E x T ways: partition e holds experts [e*E/E_p, (e+1)*E/E_p) (E_p = expert_parallel)
  and, within it, rank t holds the slice t of every expert's intermediate dimension (MoE tensor parallelism).
  Every rank thus holds 1/(T*E) of the routed weights; one all-reduce over the whole world combines them.
- The shared expert is added on the ranks of partition 0 only (its TP slices), so the world all-reduce counts
  it once; ranks of other partitions do not hold it.
Supported: any T, E >= 1 whose splits divide the config (checked by `check`); T = 1 is pure EP, E = 1 pure TP.

Collective groups, named by the `group` attribute of `r1c::AllReduce` / `r1c::AllGather`:
    tp     the T ranks of this rank's tensor-parallel group   (attention, dense MLP, embedding, LM head)
    world  all T*E ranks                                      (the MoE layer: routed + shared experts)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from r1c.config import ModelConfig
from r1c.errors import PassError

GROUP_NAMES = ("tp", "world")


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    tensor_parallel: int = 1
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1 or self.expert_parallel < 1:
            raise PassError(f"shard: --tensor-parallel and --expert-parallel must be >= 1, got "
                            f"{self.tensor_parallel} and {self.expert_parallel}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.expert_parallel

    def coords(self, rank: int) -> tuple[int, int]:
        """(expert partition e, tensor-parallel index t) of `rank`."""
        if not 0 <= rank < self.world_size:
            raise PassError(f"shard: rank {rank} is outside [0, {self.world_size})")
        return divmod(rank, self.tensor_parallel)

    def groups(self) -> dict[str, list[list[int]]]:
        """Each collective group name -> its rank lists (every rank is in exactly one list per name)."""
        t, e = self.tensor_parallel, self.expert_parallel
        return {"tp": [[p * t + i for i in range(t)] for p in range(e)], "world": [list(range(self.world_size))]}

    def group_ranks(self, name: str, rank: int) -> list[int]:
        for ranks in self.groups()[name]:
            if rank in ranks:
                return ranks
        raise PassError(f"shard: rank {rank} is in no {name!r} group")

    def check(self, config: ModelConfig) -> None:
        """Raise PassError naming the first config size that the layout does not divide."""
        t, e, c = self.tensor_parallel, self.expert_parallel, config
        need = [("num_attention_heads", c.num_attention_heads, t), ("vocab_size", c.vocab_size, t)]
        if c.first_k_dense_replace:
            need.append(("intermediate_size", c.intermediate_size, t))
        if c.num_moe_layers:
            need += [("moe_intermediate_size", c.moe_intermediate_size, t), ("n_routed_experts", c.n_routed_experts, e)]
        elif e > 1:
            raise PassError("shard: --expert-parallel needs a model with MoE layers")
        for field, size, parts in need:
            if size % parts:
                raise PassError(f"shard: {field} = {size} does not split into {parts} equal parts")

    def to_dict(self) -> dict[str, Any]:
        return {"tensor_parallel": self.tensor_parallel, "expert_parallel": self.expert_parallel,
                "world_size": self.world_size, "groups": self.groups()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardLayout:
        return cls(int(d["tensor_parallel"]), int(d["expert_parallel"]))

    def __str__(self) -> str:
        return f"TP{self.tensor_parallel}xEP{self.expert_parallel}"
