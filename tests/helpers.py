"""Shared test helpers: op counts, fake-tensor re-runs, small calibration sets."""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from stepq.compiler import ops
from stepq.compiler.program import Program
from stepq.passes.materialize_quantizers import observer_nodes


def op_counts(gm: torch.fx.GraphModule) -> Counter:
    c: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            c[str(n.target)] += 1
        elif n.op == "call_module":
            c[type(gm.get_submodule(n.target)).__name__] += 1
    return c


def count(gm: torch.fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def n_fake_quant(gm, role=None) -> int:
    from stepq.compiler import meta

    return sum(1 for n in gm.graph.nodes if n.target is ops.FAKE_QUANT
               and (role is None or n.meta.get(meta.QUANTIZER_ROLE) == role))


def n_observers(gm) -> int:
    return len(observer_nodes(gm))


def fake_rerun(prog: Program, inputs: dict) -> None:
    """Re-run the graph on FakeTensors: shapes and dtypes still propagate after a pass."""
    flat = prog.flat_inputs((), inputs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
    FakeTensorProp(copy.deepcopy(prog.gm), mode).propagate(*fake)  # on a copy: it rewrites meta["val"]


def denoiser_inputs(batch: int, ts, channels: int = 4, size: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, channels, size, size, generator=g),
            "timestep": torch.tensor(list(ts), dtype=torch.int64)}


def calib_set(n: int = 4, batch: int = 4, seed: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        ts = [int(999 * (i * batch + j) / (n * batch)) for j in range(batch)]
        out.append(denoiser_inputs(batch, ts, seed=seed + i))
    return out
