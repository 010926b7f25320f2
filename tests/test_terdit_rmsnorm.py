"""insert_rmsnorm: an RMSNorm after every adaLN modulation linear, found by dataflow, on the diffusers
families, the digits DiT and hand-made negative cases."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

import stepq
from stepq import zoo
from stepq.calibration.samplers import default_make_inputs
from stepq.compiler import analysis, meta
from stepq.compiler.graph_utils import fetch_attr
from stepq.passes.insert_rmsnorm import RMS_NORM, InsertRMSNorm, chunk_consumers
from stepq.testing import check_pass
from stepq.testing.families import FAMILIES

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def expected_count(model: nn.Module) -> int:
    """From the modules, not the graph: one per gated adaLN (AdaLayerNormZero, Flux's single-block
    AdaLayerNormZeroSingle), and one per block reading PixArt's shared adaLN-single."""
    names = [type(m).__name__ for m in model.modules()]
    n = names.count("AdaLayerNormZero") + names.count("AdaLayerNormZeroSingle")
    if "AdaLayerNormSingle" in names:
        n += len(model.transformer_blocks)
    return n


def _canonical(gm: torch.fx.GraphModule, drop: set[torch.fx.Node] = frozenset()) -> list[tuple]:
    """(op, target, args with nodes as their position) of every node, with ``drop`` bypassed."""
    def resolve(n: torch.fx.Node) -> torch.fx.Node:
        while n in drop:
            n = n.args[0]
        return n

    kept = [n for n in gm.graph.nodes if n not in drop and not (n.op == "get_attr" and all(u in drop for u in n.users)
                                                                   and n.users)]
    index = {n: i for i, n in enumerate(kept)}

    def norm(a):
        if isinstance(a, torch.fx.Node):
            return ("node", index[resolve(a)])
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, norm(v)) for k, v in a.items()))
        return a

    return [(n.op, str(n.target) if n.op != "get_attr" else "attr", norm(n.args), norm(n.kwargs)) for n in kept]


def _capture(name: str):
    fam = FAMILIES[name]
    model = fam.model()
    return model, stepq.capture(model, fam.example_inputs(), timestep_scale=fam.timestep_scale), fam


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3", "flux"])
def test_one_rmsnorm_per_gated_modulation_between_the_linear_and_every_chunk_consumer(name):
    model, prog, fam = _capture(name)
    before = _canonical(prog.gm)
    result = InsertRMSNorm()(prog)
    n_blocks = len(model.transformer_blocks) + len(getattr(model, "single_transformer_blocks", ()))
    assert result.count == expected_count(model) >= n_blocks > 0
    norms = [n for n in prog.gm.graph.nodes if n.target is RMS_NORM and n.meta.get(meta.STEPQ_INSERTED)]
    assert len(norms) == result.count
    g = nx.DiGraph([(i, n) for n in prog.gm.graph.nodes for i in n.all_input_nodes])
    for rms in norms:
        linear = rms.args[0]
        assert linear.target is aten.linear.default and linear.args[0].target is aten.silu.default
        assert rms.args[1] == [linear.meta["val"].shape[-1]]
        weight = fetch_attr(prog.gm, rms.args[2].target)
        assert isinstance(weight, nn.Parameter) and torch.equal(weight, torch.ones_like(weight))
        chunks = [c for c in nx.descendants(g, rms) if c.target is aten.chunk.default and nx.has_path(g, rms, c)
                  and all(p is rms or p.target in (aten.view.default, aten.add.Tensor, aten.reshape.default)
                          for p in nx.shortest_path(g, rms, c)[:-1])]
        assert len(chunks) == 1
        consumers = chunk_consumers(chunks[0])
        assert consumers and all(nx.has_path(g, rms, c) for c in consumers)
        # the linear reaches the chunk only through its RMSNorm
        g_wo = g.copy()
        g_wo.remove_node(rms)
        assert not nx.has_path(g_wo, linear, chunks[0])
    # nothing else changed: bypassing the norms gives back the original graph
    assert _canonical(prog.gm, set(norms)) == before
    assert InsertRMSNorm()(prog).count == 0  # idempotent


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3", "flux", "unet"])
def test_the_pass_keeps_its_contract_on_the_families(name):
    _, prog, fam = _capture(name)
    report = check_pass(InsertRMSNorm(), prog, fam.example_inputs(batch=3, t=300.0))
    assert report.result.count == (0 if name == "unet" else report.result.count)


def test_final_layer_modulations_are_reported_and_left_alone():
    _, prog, _ = _capture("sd3")
    result = InsertRMSNorm()(prog)
    left = [d for d in result.details if "final-layer modulation" in d]
    assert any("norm_out.linear" in d for d in left)  # AdaLayerNormContinuous: shift, scale
    assert any("norm1_context.linear" in d for d in left)  # the last block's context stream


@pytest.mark.parametrize("name", ["unet", "unet_cond"])
def test_a_model_without_adaln_is_unchanged(name):
    _, prog, _ = _capture(name)
    before = _canonical(prog.gm)
    result = InsertRMSNorm()(prog)
    assert result.count == 0 and not result.modified
    assert _canonical(prog.gm) == before


def test_the_digits_dit_gets_one_per_block():
    model = zoo.load("digits-dit")
    mk = default_make_inputs(model)
    prog = stepq.capture(model, mk(torch.randn(2, 1, 16, 16), torch.tensor([1, 900]), {"class_labels": torch.tensor([0, 10])}))
    assert InsertRMSNorm()(prog).count == len(model.transformer_blocks) == 4


class _Block(nn.Module):
    """A DiT-like block whose modulation is ``SiLU(c) @ W`` (not a Linear) or a Linear without SiLU."""

    def __init__(self, d: int = 8, kind: str = "matmul"):
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.randn(d, 6 * d) * 0.1)
        self.lin = nn.Linear(d, 6 * d)
        self.t = nn.Linear(1, d)
        self.proj = nn.Linear(d, d)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        c = self.t(timestep.float()[:, None])
        m = torch.nn.functional.silu(c) @ self.w if self.kind == "matmul" else self.lin(c)
        shift, scale, gate, s2, sc2, g2 = m.chunk(6, dim=1)
        h = sample * (1 + scale[:, None]) + shift[:, None]
        h = sample + gate[:, None] * self.proj(h)
        return h * (1 + sc2[:, None]) + s2[:, None] + g2[:, None]


@pytest.mark.parametrize("kind,why", [("matmul", "not a Linear"), ("no-silu", "not fed by SiLU")])
def test_a_modulation_that_is_not_a_silu_linear_is_left_alone_and_reported(kind, why):
    m = _Block(kind=kind).eval()
    x = {"sample": torch.randn(2, 5, 8), "timestep": torch.tensor([3, 400])}
    prog = stepq.capture(m, x)
    before = _canonical(prog.gm)
    result = InsertRMSNorm()(prog)
    assert result.count == 0
    assert any(why in d for d in result.details), result.details
    assert _canonical(prog.gm) == before


def test_rmsnorm_with_unit_weight_normalises_the_modulation():
    _, prog, fam = _capture("dit")
    InsertRMSNorm()(prog)
    rms = next(n for n in prog.gm.graph.nodes if n.target is RMS_NORM)
    seen = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is rms or n is rms.args[0]:
                seen[n] = out
            return out

    Probe(prog.gm).run(*prog.flat_inputs((), fam.example_inputs()))
    m = seen[rms.args[0]]
    torch.testing.assert_close(seen[rms], m / torch.sqrt(m.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert analysis.op_kind(rms) is None  # not a quantizable op: no recipe rule sees it
