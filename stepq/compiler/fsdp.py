"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the training loops: parameters sharded for the
length of one loop, the program's plain tensors back after it.

Opt-in (``Recipe.distributed = "fsdp"``); under a process group of N > 1 ranks, a training loop
opens ``fsdp_training`` after it made its parameters (``make_trainable``) and before it builds the
optimizer, and steps the optimizer on the shards. Without a process group (or with ``"ddp"``) the
context is the identity: the loop replicates and averages as before (``average_gradients``).

What is sharded (FSDP2's ``Shard(0)``: rank r holds rows [r·⌈n/N⌉, (r+1)·⌈n/N⌉) of each tensor):
the FSDP units are modules whose ``forward`` runs, because FSDP2 gathers a unit's parameters in a
forward pre-hook. A graph module reads its weights with ``get_attr`` inside its own forward, so
when the loop trains the graph module (QAT, QALoRA, ternary QAT) and the graph has blocks
(``stepq.compiler.block_split``: ``blocks.<i>``, ``transformer_blocks.<i>``, ``down_blocks.<i>``, …),
it is split into one partition per block (each reading its own weights, the graph's own tensor
objects) and the stretches between them; every block partition is a unit, then the split graph
is the root unit (it keeps the weights outside the blocks), and the graph module's ``forward``
calls the split graph for the length of the loop. A graph without blocks is one unit. The TDQ
fit trains only the scale source, which the graph (or the fit's fx Interpreter) calls by
``call_module``: the units are then the modules of that subtree the graph calls (TALSQ's
zero-point source is called on its own), deepest first, as ``fully_shard`` wants. Per unit and
step: the parameters are all-gathered for the forward and for the backward, the gradients
reduce-scattered (the mean over the ranks, as DDP's all-reduce, so a gradient step on N ranks is
still the step on the concatenated batch), the optimizer states live on the shards. The peak is
therefore the root's parameters and one block's, gathered, plus the shards of gradients and
optimizer states (FSDP2 reshards a block after its forward and after its backward; the root
stays gathered from its forward to its backward).

Not sharded (``ignored_params``: the tensors stay the same objects, replicated; a trainable one
has its gradient averaged by ``average_gradients``, which skips the sharded ones):

* 0-dim parameters (per-tensor step sizes): FSDP2 shards dim 0;
* non-contiguous parameters: FSDP2 does not take them;
* the tensors the program borrows from the user's model (``stepq.compiler.borrow``): that model
  holds them whole on every rank anyway, a shard would be a copy, and the loops never write them.

Under the split the graph module's own parameter slots hold the sharded parameters as well (the
split's partitions replaced the same objects), so the graph module keeps no full copy
(``_slots`` and LSQ QAT's ``make_trainable`` lists still reference the original parameters, as
with one unit). After the loop every unit is resharded, every sharded parameter all-gathered
(``full_tensor``, in module order: the same on every rank) into a plain ``nn.Parameter``
registered where it was in the graph module, the split thrown away, and every trace of
``fully_shard`` removed: each module's class, the attributes and the hooks it added (a snapshot
taken before, restored after). ``convert``, ``save`` and the ONNX export see a program that
never was sharded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn

from stepq.compiler.block_split import BlockSplit, split_blocks
from stepq.compiler.borrow import Borrowed
from stepq.compiler.distributed import all_reduce, backend_device, is_distributed, is_dtensor, world_size
from stepq.compiler.errors import PreconditionError, RecipeError

__all__ = ["MODES", "Sharding", "check_mode", "clip_grad_norm", "fsdp_training", "replicate_like"]

#: the values of ``Recipe.distributed``: replicated parameters with averaged gradients, or FSDP2
MODES = ("ddp", "fsdp")


def check_mode(mode: str) -> str:
    """``mode`` when it is one of ``MODES``; a ``RecipeError`` naming it otherwise."""
    if mode not in MODES:
        raise RecipeError(f"distributed must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode


@dataclass
class _Snapshot:
    """What ``fully_shard`` changes on a module: its class, its ``__dict__`` keys, its hook dicts."""

    cls: type
    keys: set[str]
    hooks: dict[str, set[int]]

    @classmethod
    def of(cls, m: nn.Module) -> _Snapshot:
        return cls(type(m), set(vars(m)), {k: set(v) for k, v in vars(m).items()
                                          if "hooks" in k and isinstance(v, dict)})

    def restore(self, m: nn.Module) -> None:
        m.__class__ = self.cls
        for k in set(vars(m)) - self.keys:
            del m.__dict__[k]
        for k, ids in self.hooks.items():
            d = vars(m)[k]
            for h in set(d) - ids:
                del d[h]


@dataclass
class Sharding:
    """The FSDP2 state of one training loop (``fsdp_training``); ``active`` is False when nothing is
    sharded (mode ``"ddp"`` or no process group), and every method is then the identity."""

    active: bool = False
    units: list[nn.Module] = field(default_factory=list)
    _slots: list[tuple[nn.Module, str, nn.Parameter]] = field(default_factory=list)
    _snapshots: list[tuple[nn.Module, _Snapshot]] = field(default_factory=list)
    _new: dict[int, nn.Parameter] = field(default_factory=dict)
    #: the per-block split ``units`` belong to (None: the units are ``gm`` or its submodules)
    _split: BlockSplit | None = None
    _split_classes: list[type] = field(default_factory=list)

    def params(self, ps: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """``ps`` (parameters made before sharding) as the loop must now use them: the sharded
        ``DTensor`` parameter where FSDP2 replaced one, the same object where it did not."""
        return [self._new.get(id(p), p) for p in ps]

    def shard(self, gm: torch.fx.GraphModule, module: nn.Module, ignored: set[nn.Parameter]) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        split = None
        if module is gm:  # its forward reads every weight (get_attr): per block through a split of it, else one unit
            split = split_blocks(gm)
            self.units = [gm] if split is None else [*(b for _, b in split.blocks), split.module]
        else:  # each module of the subtree the graph calls, deepest first
            subtree = {id(m) for m in module.modules()}
            called = {id(m): m for m in (gm.get_submodule(str(n.target)) for n in gm.graph.nodes
                                         if n.op == "call_module") if id(m) in subtree}
            if id(module) not in called:
                raise PreconditionError(f"fsdp_training: no call_module node calls {type(module).__name__}, "
                                        "so FSDP2 could not gather its parameters")
            depth = {id(m): d for d, m in _depths(module)}
            self.units = sorted(called.values(), key=lambda m: -depth[id(m)])
        self._snapshots = [(m, _Snapshot.of(m)) for m in module.modules()]
        self._slots = [(m, leaf, p) for m in module.modules() for leaf, p in m._parameters.items() if p is not None]
        trained = [] if split is None else [(m, leaf, p) for m in split.module.modules()
                                            for leaf, p in m._parameters.items() if p is not None]
        self._split_classes = [type(u) for u in self.units] if split is not None else []
        mesh = init_device_mesh(backend_device().type, (world_size(),))
        for unit in self.units:
            mine = {p for p in unit.parameters()}
            fully_shard(unit, mesh=mesh, ignored_params=ignored & mine)
        if split is not None:  # gm's own slots take the sharded parameters too: no full copy stays alive there
            sharded = {id(old): m._parameters[leaf] for m, leaf, old in trained if m._parameters[leaf] is not old}
            for m, leaf, old in self._slots:
                if id(old) in sharded:
                    m._parameters[leaf] = sharded[id(old)]
            gm.forward = split.module.__call__  # type: ignore[method-assign]  # the loop's prog(...) runs the split graph, under FSDP2's hooks
            self._split = split
        self._new = {id(old): m._parameters[leaf] for m, leaf, old in self._slots  # type: ignore[misc]
                     if m._parameters[leaf] is not old}
        self.active = True

    @torch.no_grad()
    def gather(self) -> None:
        """Every sharded parameter back as a plain full ``nn.Parameter`` (a collective per tensor, in
        module order), and ``fully_shard``'s classes, attributes and hooks removed."""
        if not self.active:
            return
        for unit in self.units:
            unit.reshard()  # type: ignore[operator]  # the sharded parameters registered, not the gathered ones
        full: dict[int, nn.Parameter] = {}
        for m, leaf, _ in self._slots:
            p = m._parameters[leaf]
            if is_dtensor(p):
                assert p is not None
                if id(p) not in full:
                    whole = p.full_tensor()  # type: ignore[attr-defined]  # a collective, the same order on every rank
                    full[id(p)] = nn.Parameter(whole.detach().clone(), requires_grad=p.requires_grad)
                m._parameters[leaf] = full[id(p)]
        for m, snap in self._snapshots:
            snap.restore(m)  # gm's own class and attributes: the split's ``forward`` goes too
        split_units = self.units if self._split is not None else []
        _forget([*(m for m, _ in self._snapshots), *split_units],
                [*(snap.cls for _, snap in self._snapshots), *self._split_classes])
        self.active, self.units, self._slots, self._snapshots, self._new = False, [], [], [], {}
        self._split, self._split_classes = None, []


def _forget(modules: Iterable[nn.Module], classes: Iterable[type]) -> None:
    """Drop what torch keeps about the sharded modules outside them: the composable-API registry's
    module → state entries (a second ``fully_shard`` of the same module, the next training loop,
    would raise "Inserting … more than once") and FSDP2's cache of wrapper classes (a graph
    module's class is its own: the cache would keep it alive). Both are private to torch; where
    one has moved, that part is skipped and the test of a second FSDP loop on one program fails."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        pass
    else:
        for m in modules:
            _module_state_mapping.pop(m, None)
    try:
        from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls
    except ImportError:
        return
    cache = get_cls_to_fsdp_cls()
    for cls in classes:
        cache.pop(cls, None)


def _depths(module: nn.Module, d: int = 0) -> Iterator[tuple[int, nn.Module]]:
    yield d, module
    for child in module.children():
        yield from _depths(child, d + 1)


def _shardable(p: nn.Parameter, borrowed: Borrowed | None, storages: set[int]) -> bool:
    """Whether FSDP2 shards ``p`` (see the module docstring for the ones it leaves)."""
    return p.dim() > 0 and p.is_contiguous() and not (borrowed is not None and borrowed.is_borrowed(p, storages))


@contextmanager
def fsdp_training(gm: torch.fx.GraphModule, mode: str, *, module: nn.Module | None = None,
                  borrowed: Borrowed | None = None) -> Iterator[Sharding]:
    """Shard ``module`` (default: ``gm`` itself) with FSDP2 for the body of the ``with`` when ``mode``
    is ``"fsdp"`` under a process group; gather it back to plain tensors at the end (also when the
    body raises: every rank must leave the same way, as the loops' reduced flags ensure).

    ``borrowed``: the program's borrowed tensors, left unsharded. The parameters every rank shards
    must be equal (the loops broadcast rank 0's first)."""
    check_mode(mode)
    sharding = Sharding()
    if mode == "fsdp" and is_distributed():
        root = gm if module is None else module
        storages = borrowed.storages() if borrowed is not None else set()
        ignored = {p for p in root.parameters() if not _shardable(p, borrowed, storages)}
        sharding.shard(gm, root, ignored)
    try:
        yield sharding
    finally:
        sharding.gather()


def replicate_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (whole on every rank) ready for an elementwise op with ``ref``: ``ref``'s dtype and
    device, and a replicated ``DTensor`` on ``ref``'s mesh when ``ref`` is sharded (DTensor ops do
    not take a plain tensor beside a sharded one). No collective."""
    t = t.to(dtype=ref.dtype, device=ref.device)
    if not is_dtensor(ref):
        return t
    from torch.distributed.tensor import DTensor, Replicate

    mesh = ref.device_mesh  # type: ignore[attr-defined]
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of sharded (``DTensor``) and plain parameters:
    the global 2-norm is √(Σ plain ‖g‖² + Σ_ranks Σ local shard ‖g‖²) (shards are disjoint, one
    all-reduce), and every gradient is scaled by min(1, max_norm / (norm + 1e-6)), as torch does."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_dtensor(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [g.detach().float().pow(2).sum() for g in grads if not is_dtensor(g)]
    local = [g.to_local().detach().float().pow(2).sum() for g in grads if is_dtensor(g)]  # type: ignore[attr-defined]
    sharded = all_reduce(torch.stack(local).sum()) if local else torch.zeros(())
    total = (torch.stack(plain).sum() if plain else torch.zeros(())) + sharded
    norm = total.sqrt()
    coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    for g in grads:
        g.mul_(coef)
    return norm
