"""The torch.distributed process groups of a sharded bundle: one default group, one per collective group name.

Rendezvous: a `torch.distributed.TCPStore` that rank 0 opens on 127.0.0.1 (port 0: the OS picks a free one; the
followers it spawns get the port) or, under `torchrun`, the launcher's `env://` rendezvous. Backend: gloo on CPUs,
NCCL on GPUs. `GROUPS` maps each name of the bundle's layout (`tp`, `world`) to the group holding this rank; the
collectives (`ort_collectives`, `segments` runs, the TensorRT plugins) look their group up there.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch.distributed as dist

from r1c.errors import BundleError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
TIMEOUT_S = float(os.environ.get("R1C_DIST_TIMEOUT_S", "600"))  # a collective waits this long for its peers
GROUPS: dict[str, Any] = {}


def open_store(world_size: int) -> Any:
    """Rank 0's TCPStore on 127.0.0.1 with a free port (`store.port`)."""
    return dist.TCPStore(HOST, 0, world_size, is_master=True, timeout=datetime.timedelta(seconds=TIMEOUT_S),
                         wait_for_workers=False)


def join_store(port: int, world_size: int) -> Any:
    return dist.TCPStore(HOST, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def init_groups(rank: int, world_size: int, groups: dict[str, list[list[int]]], *, backend: str = "gloo",
                store: Any = None) -> dict[str, Any]:
    """Initialise the default group (through `store`, or `env://` when None) and one group per name.

    Every rank calls this with the same `groups` (the manifest's): `new_group` is collective over the world.
    """
    if dist.is_initialized():
        raise BundleError("bundle: this process already belongs to a torch.distributed world (one sharded bundle "
                          "per process; close the other engine first)")
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    if store is None:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    GROUPS.clear()
    for name, rank_lists in sorted(groups.items()):
        for ranks in rank_lists:
            group = dist.group.WORLD if len(ranks) == world_size else dist.new_group(ranks, backend=backend)
            if rank in ranks:
                GROUPS[name] = group
        if name not in GROUPS:
            raise BundleError(f"bundle: rank {rank} is in no {name!r} group of the manifest")
    logger.debug("rank %d/%d: groups %s (%s)", rank, world_size, sorted(GROUPS), backend)
    return GROUPS


def group(name: str) -> Any:
    try:
        return GROUPS[name]
    except KeyError:
        raise BundleError(f"bundle: collective over group {name!r}, which this rank does not have "
                          f"(known: {sorted(GROUPS)})") from None


def close_groups() -> None:
    GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
