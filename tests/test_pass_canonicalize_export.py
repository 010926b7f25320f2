"""canonicalize_export: no-op squeezes, eval dropout and the guards closure go; numerics stay."""

from __future__ import annotations

import torch
from helpers import count
from torch import nn

import stepq
from stepq.compiler.pass_manager import run_passes
from stepq.passes import CanonicalizeExport
from stepq.testing.families import FAMILIES

aten = torch.ops.aten


class _Fixture(nn.Module):
    """ops_before: squeeze.dim 2 (one no-op, one real), dropout 1; ops_after: squeeze.dim 1, dropout 0."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.1)

    def forward(self, sample, timestep):
        h = self.lin(sample).squeeze(1)          # [B, 64, 16]: dim 1 has size 64, a no-op
        h = self.drop(h)
        return h.unsqueeze(-1).squeeze(-1) + timestep[:, None, None]  # a real squeeze: kept


def test_rewrites_counted_and_numerics_kept():
    m = _Fixture().eval()
    x = {"sample": torch.randn(2, 64, 16), "timestep": torch.tensor([1.0, 2.0])}
    prog = stepq.capture(m, x)
    assert count(prog.gm, aten.squeeze.dim) == 2
    assert count(prog.gm, aten.dropout.default) == 1
    [(name, res)] = [(r.name, r.result) for r in run_passes(prog, [CanonicalizeExport()])]
    assert res.count == 3  # _guards_fn + the no-op squeeze + dropout
    assert count(prog.gm, aten.squeeze.dim) == 1
    assert count(prog.gm, aten.dropout.default) == 0
    assert not any(n.op == "call_module" for n in prog.gm.graph.nodes)
    assert torch.equal(prog(**x), m(**x))
    # idempotent
    again = run_passes(prog, [CanonicalizeExport()])[0].result
    assert not again.modified and again.count == 0


def test_pixart_squeeze_is_removed():
    f = FAMILIES["pixart"]
    m = f.model()
    x = f.example_inputs()
    prog = stepq.capture(m, x)
    before = count(prog.gm, aten.squeeze.dim)
    assert before >= 1
    run_passes(prog, [CanonicalizeExport()])
    assert count(prog.gm, aten.squeeze.dim) < before
    torch.testing.assert_close(prog(**x)[0], m(**x)[0], rtol=0, atol=0)
