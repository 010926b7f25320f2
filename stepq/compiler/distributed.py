"""torch.distributed, the few collectives stepq's calibration and training loops need.

Every function is a no-op (or the identity) when no process group is initialised or the world has
one rank, so the single-process code path is exactly what it was. Under a process group (torchrun:
NCCL on GPUs, gloo on CPU) every rank must call the same functions in the same order; the callers
guarantee that by running the same pipeline on every rank and by agreeing on anything that would
make ranks diverge (a time budget, an error) through a reduced flag first (``any_rank``,
``raise_on_any_rank``), never by one rank leaving a loop or raising alone, which would leave the
others waiting in the next collective.

Tensors travel on the backend's device (CUDA for NCCL, the CPU otherwise) and come back to the
caller's device and dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from stepq.compiler.errors import StepqError

__all__ = [
    "all_gather_sizes",
    "all_reduce",
    "any_rank",
    "average_gradients",
    "backend_device",
    "broadcast_parameters",
    "full_weight",
    "gather_rows",
    "is_distributed",
    "is_dtensor",
    "mean_over_ranks",
    "or_bool_buffers",
    "raise_on_any_rank",
    "rank",
    "rank_seed",
    "world_size",
]

#: multiplier that separates the random streams of ranks (rank 0 keeps the single-process seed)
_RANK_STRIDE = 1_000_003


def is_distributed() -> bool:
    """A process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank_seed(seed: int) -> int:
    """A seed for this rank's random stream: ``seed`` on rank 0 (and without a process group), so a
    one-process run is unchanged, and a different, deterministic stream on every other rank."""
    return int(seed) + rank() * _RANK_STRIDE


def backend_device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """``t`` reduced over the ranks with ``op`` (a new tensor; ``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    buf = t.detach().to(backend_device(), copy=True).contiguous()
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a MAX all-reduce of one integer)."""
    if not is_distributed():
        return flag
    return bool(all_reduce(torch.tensor([int(flag)], dtype=torch.int32), dist.ReduceOp.MAX).item())


def raise_on_any_rank(error: BaseException | None, kind: Callable[[str], StepqError]) -> None:
    """Agree on failure: when ``error`` is set on any rank, raise ``kind`` on every rank, naming
    every failing rank and its message. Without a process group, re-raise ``error`` as it is.

    A flag is reduced first, so ranks that did not fail do not block in a later collective while
    the failing one has left."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    if not any_rank(error is not None):
        return
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    lines = [f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
    raise kind(f"{len(lines)} of {world_size()} ranks failed: " + "; ".join(lines)) from error


def gather_rows(t: Tensor) -> list[Tensor]:
    """Every rank's ``t`` (same trailing shape and dtype, any number of rows), in rank order."""
    if not is_distributed():
        return [t]
    n = all_gather_sizes(t.shape[0])
    dev = backend_device()
    pad = torch.zeros((max(n), *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t.to(dev)
    out = [torch.empty_like(pad) for _ in n]
    dist.all_gather(out, pad)
    return [o[:k].to(t.device) for o, k in zip(out, n)]


def all_gather_sizes(n: int) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.int64, device=backend_device()) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=backend_device()))
    return [int(s.item()) for s in sizes]


#: elements per all-reduce bucket (DDP's 25 MB buckets, for float32)
BUCKET = 1 << 22


def _buckets(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped into buckets of one dtype and at most ``BUCKET`` elements
    (a larger tensor is a bucket of its own)."""
    out: list[list[int]] = []
    open_: dict[torch.dtype, tuple[list[int], int]] = {}
    for i, t in enumerate(tensors):
        idx, n = open_.get(t.dtype, ([], 0))
        if idx and n + t.numel() > BUCKET:
            out.append(idx)
            idx, n = [], 0
        idx.append(i)
        open_[t.dtype] = (idx, n + t.numel())
    out.extend(idx for idx, _ in open_.values() if idx)
    return out


def _collective(tensors: Sequence[Tensor], fn: Callable[[Tensor], None]) -> list[Tensor]:
    """Run ``fn`` (an in-place collective) on flattened buckets of ``tensors``; the results, one per
    tensor, on the tensors' devices."""
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    dev = backend_device()
    for idx in _buckets(tensors):
        buf = torch.cat([tensors[i].detach().reshape(-1).to(dev) for i in idx])
        fn(buf)
        off = 0
        for i in idx:
            k = tensors[i].numel()
            out[i] = buf[off: off + k].reshape(tensors[i].shape).to(tensors[i].device)
            off += k
    return out


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its mean over the ranks (bucketed all-reduces of the
    flattened gradients). A parameter without a gradient on a rank counts as a zero gradient there
    and receives the mean, so every rank's optimizer steps the same parameters.

    With equal per-rank batches and a loss that is a mean over the batch, the result is the
    gradient of the loss on the concatenated batch: DDP's reduction, for a graph module whose
    parameters (step sizes, scale generators, LoRA) DDP would not all see.

    A sharded (``DTensor``) parameter is skipped: FSDP2 reduce-scattered its gradient already
    (``stepq.compiler.fsdp``); what is averaged here are the parameters it leaves replicated."""
    if not is_distributed():
        return
    ps = [p for p in params if p.requires_grad and not is_dtensor(p)]
    if not ps:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
    w = world_size()

    def mean(buf: Tensor) -> None:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf /= w

    for p, g in zip(ps, _collective(grads, mean)):
        p.grad = g


def mean_over_ranks(x: float) -> float:
    """The mean of a scalar (a loss) over the ranks."""
    if not is_distributed():
        return x
    return float(all_reduce(torch.tensor([x], dtype=torch.float64))) / world_size()


@torch.no_grad()
def broadcast_parameters(params: Iterable[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values into every rank's ``params`` (the start of a training loop: every
    rank steps from the same point, whatever its random initialisation did)."""
    if not is_distributed():
        return
    ps = list(params)
    for p, v in zip(ps, _collective(ps, lambda buf: dist.broadcast(buf, src=src))):
        p.copy_(v)


@torch.no_grad()
def or_bool_buffers(module: torch.nn.Module) -> int:
    """OR every boolean buffer of ``module`` over the ranks, in place; the number of buffers.

    The training loops' scale sources record which timesteps they saw (``visited``: the table rows
    that were trained, the others are interpolated); each rank saw its own timesteps, and every rank
    must interpolate from the union."""
    if not is_distributed():
        return 0
    bufs = [b for b in module.buffers() if b.dtype == torch.bool]
    for b in bufs:
        b.copy_(all_reduce(b.to(torch.uint8), dist.ReduceOp.MAX).bool())
    return len(bufs)


def is_dtensor(t: object) -> bool:
    """``t`` is a ``DTensor`` (a parameter FSDP2 sharded, ``stepq.compiler.fsdp``)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_weight(w: Tensor) -> Tensor:
    """The whole of a weight. A ``DTensor`` (FSDP2's sharded parameters, tensor parallelism) is
    all-gathered (``DTensor.full_tensor``, a collective: every rank calls it for the same weights
    in the same order, as the pipeline does); a plain tensor is returned as it is.

    Per-channel weight scales must see every input column of a channel and per-tensor ones every
    element: computed on a shard they would be the shard's range (the misaligned-amax bug of
    other tools under FSDP2)."""
    from torch.distributed.tensor import DTensor

    if isinstance(w, DTensor):
        return w.full_tensor()
    return w
