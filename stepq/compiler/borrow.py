"""The tensors a program borrows from the user's model: shared read-only, never written.

``ep.module()`` shares the model's parameter and buffer storage. Capture keeps that sharing (a
DiT-XL/2 is 2.8 GB of float weights: a copy per program doubled the compile's memory) and records
every shared tensor here. The rule that keeps the user's model unmodified is copy on write:

* a pass or step that writes a tensor of the graph module in place first makes it the program's
  own (``own_tensor``: a clone replaces the attribute; the training loops ``own_all``);
* a pass that computes a new weight registers it or replaces the attribute (``replace_tensor``),
  it never ``copy_`` s into a borrowed one;
* ``stepq.convert`` ends with ``own_all``: a QuantizedModel shares no storage with the model.

The rule is also checked: every in-place write bumps a tensor's version counter, which the
borrowed view shares with the user's tensor (``detach()``), so ``check`` finds a write through the
program (after every pass, ``run_passes``) and one by the user between capture and convert, and
raises ``BorrowError`` naming the tensor. Entries are weak: a tensor the graph dropped (a float
weight replaced by its integer form) is no longer watched or kept alive.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from stepq.compiler.errors import BorrowError
from stepq.compiler.graph_utils import owner

__all__ = ["Borrowed", "own_all", "own_tensor", "replace_tensor"]


@dataclass
class _Entry:
    name: str
    ref: weakref.ref[torch.Tensor]
    version: int


@dataclass
class Borrowed:
    """The user's tensors a program's graph module reads without owning (shared by its copies)."""

    entries: list[_Entry] = field(default_factory=list)

    def record(self, name: str, tensor: torch.Tensor) -> None:
        self.entries.append(_Entry(name, weakref.ref(tensor), tensor._version))

    def _live(self) -> list[tuple[_Entry, torch.Tensor]]:
        out = []
        for e in self.entries:
            t = e.ref()
            if t is not None:
                out.append((e, t))
        return out

    def storages(self) -> set[int]:
        """The storage addresses of the live borrowed tensors."""
        return {t.untyped_storage().data_ptr() for _, t in self._live() if t.numel()}

    def is_borrowed(self, t: torch.Tensor, storages: set[int] | None = None) -> bool:
        """Whether ``t`` reads the storage of a borrowed tensor (a live entry's storage cannot be
        reused); ``storages``: ``self.storages()`` when the caller asks about many tensors."""
        if not self.entries or t.numel() == 0:
            return False
        return t.untyped_storage().data_ptr() in (self.storages() if storages is None else storages)

    def __len__(self) -> int:
        return len(self._live())

    def written(self) -> list[str]:
        """The borrowed tensors written in place since capture (version counter moved)."""
        return [e.name for e, t in self._live() if t._version != e.version]

    def check(self, after: str | None) -> None:
        """Raise ``BorrowError`` when a borrowed tensor was written in place; ``after`` names the
        pass that just ran (None: checked before a phase, so the writer was the caller)."""
        names = self.written()
        if not names:
            return
        listed = ", ".join(repr(n) for n in names[:5]) + (", …" if len(names) > 5 else "")
        if after is not None:
            raise BorrowError(
                f"pass {after!r} wrote the model's tensor(s) {listed} in place: the program borrows the user's "
                "parameters read-only; a pass replaces a tensor (stepq.compiler.borrow.replace_tensor) or owns it "
                "first (own_tensor), it never writes one in place. The user's model now differs from before")
        raise BorrowError(
            f"the model's tensor(s) {listed} changed in place after stepq.capture: the program reads the model's "
            "parameters until stepq.convert (it shares them instead of copying them); capture again after "
            "changing the model")


def _swap(gm: torch.nn.Module, qualname: str, value: torch.Tensor) -> torch.Tensor:
    mod, leaf = owner(gm, qualname)
    old = getattr(mod, leaf)
    if isinstance(old, torch.nn.Parameter):
        new: torch.Tensor = torch.nn.Parameter(value, requires_grad=old.requires_grad)
        mod._parameters[leaf] = new  # type: ignore[assignment]
    elif leaf in mod._buffers:
        new = value
        mod._buffers[leaf] = new
    else:
        new = value
        setattr(mod, leaf, new)
    return new


def replace_tensor(gm: torch.nn.Module, qualname: str, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` where the tensor ``qualname`` is (a parameter stays a parameter, with its
    ``requires_grad``); the old tensor is left as it was. Returns the tensor now in the module."""
    return _swap(gm, qualname, value.detach())


def own_tensor(borrowed: Borrowed, gm: torch.nn.Module, qualname: str) -> torch.Tensor:
    """The tensor ``qualname`` of ``gm``, made the program's own first when it is borrowed (a clone
    takes its place): what a pass calls before writing it in place."""
    t = getattr(*owner(gm, qualname))
    if not borrowed.is_borrowed(t):
        return t
    return _swap(gm, qualname, t.detach().clone())


def own_all(borrowed: Borrowed, gm: torch.nn.Module) -> int:
    """Clone every borrowed tensor of ``gm`` into its place (before training writes them, and at the
    end of convert); returns how many were cloned."""
    if not len(borrowed):
        return 0
    storages = borrowed.storages()
    count = 0
    for mod in gm.modules():
        for kind in (mod._parameters, mod._buffers):
            for name, t in list(kind.items()):
                if t is not None and t.numel() and t.untyped_storage().data_ptr() in storages:
                    if isinstance(t, torch.nn.Parameter):
                        kind[name] = torch.nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                    else:
                        kind[name] = t.detach().clone()  # type: ignore[assignment]  # a buffer
                    count += 1
        for name, v in list(vars(mod).items()):
            if (isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) and v.numel()
                    and v.untyped_storage().data_ptr() in storages):
                setattr(mod, name, v.detach().clone())
                count += 1
    return count
