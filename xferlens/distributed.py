"""Data parallelism on ``torch.distributed``: one process per device, launched by torchrun.

Every helper here works with and without a process group: a single process is rank 0 of
a world of 1, and the collectives then do nothing. So library code calls them
unconditionally and one code path serves a laptop and a cluster.

* :func:`init` joins the group that ``torchrun`` describes in the environment (``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``...), with a timeout so that no rank waits forever for
  one that died; the backend follows the device (``gloo`` on CPU; ``cpu:gloo,cuda:nccl``
  on CUDA, so CPU tensors such as fitted moments still reduce), and on CUDA each process
  takes the GPU of its ``LOCAL_RANK``.
* :func:`shard_indices` gives each rank its disjoint share of ``n`` items;
  :func:`balanced_share` a contiguous run of items of about equal total cost, and
  :func:`batch_share` such a run of whole batches (of about equal padded tokens).
* :func:`all_reduce_` sums tensors (float64 moments, counts) across ranks in place;
  :func:`all_gather_objects`, :func:`gather_objects` (to one rank) and
  :func:`broadcast_object` carry small records.
* :func:`agree` is the failure protocol: at a sync point every rank says whether it
  failed; if any did, *every* rank raises (the failing one its own error, the others a
  :class:`RankError` naming the failing rank and its message), so no rank goes on to
  wait in a later collective for a rank that is gone.
* :func:`run` wraps a job's main function: it joins the group, runs the function, and on
  an exception logs it with the rank and leaves the process group so peers blocked in a
  collective fail at once instead of at the timeout; torchrun then ends the job non-zero
  and reports that rank's error (``record``).

Example (``torchrun --nproc-per-node 2 job.py``)::

    from xferlens import distributed as xd

    def main():
        store = pairs_to_disk(src, tgt, texts, 12, 10, "runs/pairs")  # each rank pairs its share
        mapper, _ = fit_mapper(store, "affine")                       # moments all-reduced
        if xd.is_main():
            mapper.save("runs/mapper")

    xd.run(main, device="cuda")
"""

import datetime
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from xferlens.errors import XferlensError

logger = logging.getLogger(__name__)

#: seconds a collective (and joining the group) may wait for the slowest rank
DEFAULT_TIMEOUT_S = 1800.0
#: seconds a rank that only echoes another rank's failure waits before exiting
PEER_GRACE_S = 2.0

T = TypeVar("T")


class RankError(XferlensError, RuntimeError):
    """Raised on every rank when another rank failed at a point where all must agree."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one that writes shared files and shows progress."""
    return rank() == 0


def active(distributed: bool | None = None) -> bool:
    """Whether to work data-parallel: ``None`` (the library default) when a process group
    of more than one rank is initialised; ``False`` never; ``True`` also only then (a
    single process is rank 0 of 1, so there is nothing to split)."""
    if distributed is False:
        return False
    return world_size() > 1


def backend_for(device: str | torch.device | None = None) -> str:
    """``gloo`` for CPU jobs; ``cpu:gloo,cuda:nccl`` for CUDA (NCCL for GPU tensors, gloo
    for the CPU tensors that fits and manifests reduce)."""
    dev = torch.device(device) if device is not None else None
    cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def device_for_rank(device: str | torch.device | None = None) -> torch.device:
    """The device this rank should use: ``cuda:LOCAL_RANK`` on CUDA, else ``device`` (CPU)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available: pass device='cpu'")
        n = torch.cuda.device_count()
        if local_rank() >= n:
            raise ValueError(
                f"LOCAL_RANK={local_rank()} but this machine has {n} GPU(s): "
                f"start at most {n} processes per node (torchrun --nproc-per-node {n})"
            )
        return torch.device("cuda", local_rank())
    return dev if dev is not None else torch.device("cpu")


def init(device: str | torch.device | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group described by torchrun's environment; return whether one was
    joined. Without ``WORLD_SIZE`` (a plain ``python`` run) or when already initialised,
    do nothing. On CUDA, select the GPU of ``LOCAL_RANK`` first."""
    if is_initialized() or "WORLD_SIZE" not in os.environ:
        return False
    dev = device_for_rank(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend=backend_for(dev),
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": dev} if dev.type == "cuda" else {}),
    )
    logger.info("rank %d of %d joined (%s, %s)", rank(), world_size(), backend_for(dev), dev)
    return True


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def shard_indices(
    n: int, rank: int | None = None, world: int | None = None, *, strided: bool = False
) -> range:
    """This rank's share of ``range(n)``: disjoint across ranks, together all of it.

    Contiguous by default (rank ``r`` of ``w`` gets ``[r n / w, (r+1) n / w)``, sizes
    differing by at most one), so concatenating the ranks' results in rank order keeps the
    original order; ``strided=True`` gives ``r, r + w, r + 2w, ...`` instead.

    >>> [list(shard_indices(5, r, 2)) for r in range(2)]
    [[0, 1, 2], [3, 4]]
    >>> list(shard_indices(5, 1, 2, strided=True))
    [1, 3]
    """
    r = globals()["rank"]() if rank is None else rank
    w = world_size() if world is None else world
    if n < 0 or w < 1 or not 0 <= r < w:
        raise ValueError(f"shard_indices: need n >= 0 and 0 <= rank < world, got n={n}, rank={r}, world={w}")
    if strided:
        return range(r, n, w)
    return range(r * n // w, (r + 1) * n // w)


def _op(op: str):
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"unknown reduction {op!r}; use one of {sorted(ops)}")
    return ops[op]


def all_reduce_(*tensors: Tensor, op: str = "sum") -> None:
    """Reduce ``tensors`` across ranks, in place (every rank gets the result). Same-dtype
    tensors travel in one flat message. Nothing happens in a single process."""
    if world_size() == 1 or not tensors:
        return
    by_kind: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=_op(op))
        start = 0
        for t in group:
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()


def all_reduce_scalars(values: list[float], op: str = "sum") -> list[float]:
    """Python numbers reduced across ranks in float64 (counts below 2**53 stay exact)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    all_reduce_(t, op=op)
    return t.tolist()


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (small JSON-like records: file lists, messages), in rank order.
    Not for tensors of data (use :func:`all_reduce_`) nor for anything untrusted."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list | None:
    """Every rank's ``obj`` on rank ``dst``, in rank order; ``None`` on the other ranks
    (results that one rank joins: per-prompt records, selected CPU rows). Picklable
    records only, nothing untrusted; call it on every rank, like any collective."""
    if world_size() == 1:
        return [obj]
    out: list | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (a small JSON-like record)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (bounded by the group's timeout)."""
    if world_size() > 1:
        dist.barrier()


def agree(error: BaseException | None, what: str) -> None:
    """Every rank reports whether ``what`` failed on it; if any did, every rank raises.

    The failing rank re-raises its own ``error``; the others raise :class:`RankError`
    naming the first failing rank and its message. A single process just re-raises.
    """
    if world_size() == 1:
        if error is not None:
            raise error
        return
    msgs = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if not failed:
        return
    if error is not None:
        raise error
    r, m = failed[0]
    more = f" (and on rank(s) {[f for f, _ in failed[1:]]})" if len(failed) > 1 else ""
    raise RankError(f"{what} failed on rank {r} of {world_size()}{more}: {m}")


@contextmanager
def collectively(what: str, spread: bool = True) -> Iterator[None]:
    """Run the block on every rank and :func:`agree` at its end: if it raised on any rank,
    it raises on all (call it on every rank, like any collective). ``spread=False``: just
    run the block (a process that works alone, e.g. a library call with
    ``distributed=False`` inside a process group)."""
    if not spread:
        yield
        return
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised by agree on this rank
        agree(e, what)
        raise  # unreachable: agree re-raises e
    agree(None, what)


def run(
    fn: Callable[..., T],
    *args,
    device: str | torch.device | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs,
) -> T:
    """Run ``fn(*args, **kwargs)`` as one rank of the job torchrun started (or as a plain
    single process): join the group, run, leave the group.

    An exception on this rank is logged with the rank and re-raised, so the process exits
    non-zero; leaving the group makes peers blocked in a collective fail at once (gloo)
    instead of waiting out ``timeout_s``, and torchrun stops the other ranks and reports
    this rank's error as the root cause.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    joined = init(device, timeout_s=timeout_s)
    try:
        return record(fn)(*args, **kwargs)
    except BaseException as e:
        logger.error("rank %d of %d failed: %s: %s", rank(), world_size(), type(e).__name__, e)
        if isinstance(e, RankError):
            # the rank that failed first exits too: let it go first, so that torchrun names
            # it (with its own traceback) as the root cause rather than this echo of it
            time.sleep(PEER_GRACE_S)
        raise
    finally:
        if joined:
            shutdown()


def balanced_owner(sizes: Tensor, world: int) -> Tensor:
    """For items (texts) of ``sizes`` rows, in order, the rank that owns each: contiguous
    runs holding about ``sum(sizes) / world`` rows each (rank ``r`` owns the items whose
    first row falls in ``[r N / w, (r+1) N / w)``).

    >>> balanced_owner(torch.tensor([5, 1, 1, 1, 1, 1]), 2).tolist()
    [0, 1, 1, 1, 1, 1]
    """
    sizes = sizes.to(torch.int64)
    total = int(sizes.sum())
    if total == 0:
        return torch.zeros(len(sizes), dtype=torch.int64)
    before = torch.cumsum(sizes, 0) - sizes
    return (before * world) // total


def balanced_share(sizes, rank: int | None = None, world: int | None = None) -> range:
    """This rank's items of ``sizes`` (costs, in order) as a range: the contiguous run
    :func:`balanced_owner` gives it, about ``sum(sizes) / world`` of the cost (possibly
    empty). Handing out whole batches this way keeps each batch on one rank.

    >>> [balanced_share([5, 1, 1, 1, 1, 1], r, 2) for r in range(2)]
    [range(0, 1), range(1, 6)]
    """
    r = globals()["rank"]() if rank is None else rank
    w = world_size() if world is None else world
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"balanced_share: need 0 <= rank < world, got rank={r}, world={w}")
    # (items of size 0 after all the cost would belong to rank w: the last rank takes them)
    owner = balanced_owner(torch.tensor(list(sizes), dtype=torch.int64), w).clamp_max(w - 1).tolist()
    mine = [i for i, o in enumerate(owner) if o == r]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


def batch_share(
    batches: list[list[int]],
    lengths,
    *,
    extra: int = 0,
    rank: int | None = None,
    world: int | None = None,
) -> list[list[int]]:
    """This rank's batches of ``batches`` (lists of indices into ``lengths``, the batching
    one process uses): a contiguous run of whole batches holding about ``1 / world`` of
    the padded tokens, ``len(batch) * (longest + extra)`` each (``extra``: tokens each
    item adds, e.g. generated ones). Every item is computed in the very padded batch it
    gets in one process, so results are equal bit for bit, not merely to rounding.

    >>> batch_share([[0, 1], [2], [3]], [4, 4, 2, 1], rank=1, world=2)
    [[2], [3]]
    """
    cost = [len(b) * (max(lengths[i] for i in b) + extra) for b in batches]
    return [batches[i] for i in balanced_share(cost, rank, world)]
