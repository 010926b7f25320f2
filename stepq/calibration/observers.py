"""Activation observers: identity modules in the prepared graph that record what flows through.

An observer node is ``call_module[<layer>.input_observer](x, timestep)``; it returns ``x`` and
records, overall and per integer training timestep:

* min, max, sum, sum of squares and count (per sample, scattered to the sample's timestep);
* a weighted reservoir sample of the values (Efraimidis–Spirakis A-ES: each kept value carries the
  number of values it stands for, and the K values with the largest keys u^(1/w) are kept), so
  that percentile and MSE observers see an unbiased sample of everything that went through.

The per-timestep statistics are what timestep-indexed scales (TDQ, PTQD mixed precision) start
from. A non-finite value raises ``CalibrationError`` naming the layer and the timestep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from stepq.compiler.errors import CalibrationError
from stepq.compiler.timesteps import timestep_index
from stepq.recipe.specs import QuantSpec

__all__ = ["ActivationObserver", "ActivationStats", "Reservoir", "observer_nodes"]


@dataclass
class Reservoir:
    """A weighted uniform sample of at most ``size`` values (compacted lazily, amortised O(1))."""

    size: int
    _values: list[Tensor] = field(default_factory=list)
    _keys: list[Tensor] = field(default_factory=list)
    _pending: int = 0
    _threshold: float = float("-inf")

    def add(self, x: Tensor, generator: torch.Generator) -> None:
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        if n == 0:
            return
        m = min(n, self.size)
        idx = torch.randint(0, n, (m,), generator=generator) if m < n else None
        u = torch.rand(m, generator=generator).clamp_min(1e-30)
        keys = u.log() * (m / n)  # log(u^(1/w)) with w = n/m: larger is kept
        if self._threshold > float("-inf"):
            # a full reservoir never takes a key below its smallest one; the values are gathered
            # after this filter, so a late call copies only what it keeps
            keep = keys > self._threshold
            keys = keys[keep]
            idx = keep.nonzero().reshape(-1) if idx is None else idx[keep]
        vals = flat.clone() if idx is None else flat[idx]
        self._values.append(vals)
        self._keys.append(keys)
        self._pending += keys.numel()
        if self._pending > 4 * self.size:
            self._compact()

    def _compact(self) -> None:
        vals, keys = torch.cat(self._values), torch.cat(self._keys)
        if vals.numel() > self.size:
            top = torch.topk(keys, self.size).indices
            vals, keys = vals[top], keys[top]
            self._threshold = float(keys.min())
        self._values, self._keys, self._pending = [vals], [keys], vals.numel()

    @property
    def values(self) -> Tensor:
        if not self._values:
            return torch.empty(0)
        if len(self._values) > 1 or self._values[0].numel() > self.size:
            self._compact()
        return self._values[0]

    def sample(self) -> tuple[Tensor, Tensor]:
        """(values, keys) of the kept sample."""
        v = self.values
        return v, (self._keys[0] if self._keys else torch.empty(0))

    def merge(self, values: Tensor, keys: Tensor) -> None:
        """Keep the ``size`` largest keys of this sample and (``values``, ``keys``), another A-ES sample
        (another rank's): A-ES of the union of both streams, as if one reservoir had seen them all."""
        v, k = self.sample()
        self._values, self._keys, self._pending = [torch.cat([v, values.float()])], [torch.cat([k, keys.float()])], 0
        self._threshold = float("-inf")
        self._pending = self._values[0].numel()
        if self._pending > self.size:
            self._compact()


@dataclass
class ActivationStats:
    """Everything an observer saw. Per-timestep arrays have one entry per training timestep."""

    num_train_timesteps: int
    count: Tensor = field(init=False)
    min: Tensor = field(init=False)
    max: Tensor = field(init=False)
    sum: Tensor = field(init=False)
    sumsq: Tensor = field(init=False)
    overall: Reservoir = field(default_factory=lambda: Reservoir(1 << 16))
    per_timestep: dict[int, Reservoir] = field(default_factory=dict)
    per_timestep_size: int = 512

    def __post_init__(self) -> None:
        T = self.num_train_timesteps
        self.count = torch.zeros(T, dtype=torch.float64)
        self.min = torch.full((T,), float("inf"))
        self.max = torch.full((T,), float("-inf"))
        self.sum = torch.zeros(T, dtype=torch.float64)
        self.sumsq = torch.zeros(T, dtype=torch.float64)

    @property
    def visited(self) -> Tensor:
        """The training timesteps seen, ascending."""
        return torch.nonzero(self.count > 0).reshape(-1)

    @property
    def total(self) -> int:
        return int(self.count.sum())

    @property
    def global_min(self) -> float:
        return float(self.min.min())

    @property
    def global_max(self) -> float:
        return float(self.max.max())

    def mean_std(self) -> tuple[Tensor, Tensor]:
        n = self.count.clamp_min(1)
        mean = self.sum / n
        var = (self.sumsq / n - mean**2).clamp_min(0)
        return mean.float(), var.sqrt().float()

    def samples_at(self, t: int) -> Tensor:
        r = self.per_timestep.get(int(t))
        return r.values if r is not None else torch.empty(0)


class ActivationObserver(torch.nn.Module):
    """Identity module that records the statistics of its input (see module docstring)."""

    def __init__(self, layer: str, spec: QuantSpec, *, num_train_timesteps: int = 1000,
                 timestep_scale: float = 1.0, timestep_policy: str = "clamp", seed: int = 0):
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.timestep_scale = timestep_scale
        self.timestep_policy = timestep_policy
        self.seed = seed
        self.stats = ActivationStats(num_train_timesteps)
        self._gen = torch.Generator().manual_seed(seed)

    def _sample_timesteps(self, x: Tensor, t: Tensor) -> Tensor:
        T = self.stats.num_train_timesteps
        idx = timestep_index(t.reshape(-1), scale=self.timestep_scale, num_train_timesteps=T,
                             policy=self.timestep_policy, where=f"observer of {self.layer}")
        b = x.shape[0] if x.dim() else 1
        if idx.numel() == b:
            return idx
        if idx.numel() == 1:
            return idx.expand(b)
        if idx.numel() and b % idx.numel() == 0:
            return idx.repeat_interleave(b // idx.numel())
        # a batch layout the observer cannot split: attribute everything to the first timestep
        return idx[:1].expand(b)

    @torch.no_grad()
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if not x.dtype.is_floating_point or is_fake(x):
            return x
        rows = x.detach().reshape(x.shape[0], -1) if x.dim() >= 1 else x.detach().reshape(1, 1)
        ts = self._sample_timesteps(rows, t)
        rows_f = rows.float()
        lo, hi = rows_f.amin(dim=1), rows_f.amax(dim=1)
        # amin / amax propagate NaN and keep ±inf: a row is finite iff both of its extremes are
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        if not bool(finite.all()):
            bad = int(ts[~finite][0])
            raise CalibrationError(f"non-finite values (NaN or Inf) in the input of layer {self.layer!r} at "
                                   f"timestep {bad}")
        st = self.stats
        st.min.scatter_reduce_(0, ts, lo, reduce="amin")
        st.max.scatter_reduce_(0, ts, hi, reduce="amax")
        rows_d = rows.double()
        st.sum.index_add_(0, ts, rows_d.sum(dim=1))
        st.sumsq.index_add_(0, ts, (rows_d * rows_d).sum(dim=1))
        st.count.index_add_(0, ts, torch.full_like(ts, rows.shape[1], dtype=torch.float64))
        st.overall.add(rows, self._gen)
        steps = torch.unique(ts).tolist()
        if len(steps) == 1:  # the usual batch: every sample at one step, no copy of the rows
            st.per_timestep.setdefault(int(steps[0]), Reservoir(st.per_timestep_size)).add(rows, self._gen)
            return x
        for tv in steps:
            res = st.per_timestep.setdefault(int(tv), Reservoir(st.per_timestep_size))
            res.add(rows[ts == tv], self._gen)
        return x

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, bits={self.spec.bits}, observer={self.spec.observer.kind}"


def observer_nodes(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, ActivationObserver]]:
    """The graph's observer nodes with their modules, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, ActivationObserver):
                out.append((node, mod))
    return out
