"""stepq.compiler.timesteps: the graph's one timestep index, the one gather form and its recogniser."""

from __future__ import annotations

import torch
from helpers import calib_set, count, denoiser_inputs

import stepq
from stepq.calibration.probe import collect_layer_outputs
from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import register_tensor
from stepq.compiler.timesteps import gather_timestep_table, match_timestep_gather, timestep_index_node
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

aten = torch.ops.aten
T = 1000


def _prog():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    data = calib_set(1)
    return stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), "w8a8"), data, progress=False)


def _consumers(prog):
    """An activation (shares the timestep's batch) and a weight (does not)."""
    fqs = [n for n in prog.gm.graph.nodes if n.target is ops.FAKE_QUANT]
    act = next(n.args[0] for n in fqs if n.meta[meta.QUANTIZER_ROLE] == "activation")
    weight = next(n.args[0] for n in fqs if n.meta[meta.QUANTIZER_ROLE] == "weight")
    return act, weight


def test_one_index_node_per_graph():
    prog = _prog()
    idx = timestep_index_node(prog)
    assert timestep_index_node(prog) is idx and count(prog.gm, ops.TIMESTEP_INDEX) == 1
    assert idx.args == (prog.timestep_node, T, float(prog.timestep_scale), False)
    assert idx.meta[meta.STEPQ_INSERTED]


def test_per_sample_and_one_row_forms_and_their_recogniser():
    prog = _prog()
    act, weight = _consumers(prog)
    table = torch.arange(T, dtype=torch.float32) * 2
    name = register_tensor(prog.gm, "probe_table", table)
    out = next(n for n in prog.gm.graph.nodes if n.op == "output")
    per_sample = gather_timestep_table(prog, name, act, before=out, extra_meta={meta.PTQD_NODE: "probe"})
    one_row = gather_timestep_table(prog, name, weight, before=out)
    idx = timestep_index_node(prog)
    g1, g2 = match_timestep_gather(per_sample), match_timestep_gather(one_row)
    assert g1 is not None and g1.per_sample and g1.index is idx and g1.gather is per_sample and g1.view is None
    assert g1.table.target == name and per_sample.meta[meta.PTQD_NODE] == "probe"
    assert g2 is not None and not g2.per_sample and g2.index is idx
    first = one_row.args[1][0]
    assert first.target is aten.select.int and first.args == (idx, 0, 0) and first.prev is idx
    # a second one-row gather shares the select; a broadcast gather carries its view
    again = gather_timestep_table(prog, name, weight, before=out)
    assert again.args[1][0] is first
    viewed = gather_timestep_table(prog, name, act, broadcast=True, before=out)
    gv = match_timestep_gather(viewed)
    assert viewed.target is aten.view.default and gv is not None and gv.view is viewed and gv.per_sample
    rank = act.meta["val"].dim()
    assert viewed.args[1] == [-1] + [1] * (rank - 1)
    prog.gm.graph.lint()
    prog.gm.recompile()
    x = denoiser_inputs(2, (7, 700))
    outs = collect_layer_outputs(prog, x, {per_sample.name, one_row.name}, bypass=False)
    assert torch.equal(outs[per_sample.name], torch.tensor([14.0, 1400.0]))
    assert torch.equal(outs[one_row.name], torch.tensor(14.0))


def test_the_recogniser_rejects_other_indexing():
    prog = _prog()
    act, _ = _consumers(prog)
    g = prog.gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    name = register_tensor(prog.gm, "probe_table", torch.ones(T))
    with g.inserting_before(out):
        attr = g.get_attr(name)
        by_t = g.call_function(aten.index.Tensor, (attr, [prog.timestep_node]))  # not the timestep index
        second = g.call_function(aten.select.int, (timestep_index_node(prog), 0, 1))
        by_second = g.call_function(aten.index.Tensor, (attr, [second]))  # not the first sample
    assert match_timestep_gather(by_t) is None and match_timestep_gather(by_second) is None
    assert match_timestep_gather(act) is None and match_timestep_gather(None) is None
