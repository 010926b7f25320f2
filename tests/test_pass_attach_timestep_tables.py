"""attach_timestep_tables: quantizers gather their scale from a table row chosen by round(t)."""

from __future__ import annotations

import pytest
import torch
from helpers import calib_set, count, denoiser_inputs, fake_rerun
from hypothesis import given
from hypothesis import strategies as st

import stepq
from stepq.calibration.probe import collect_layer_outputs
from stepq.compiler import meta, ops
from stepq.compiler.pass_manager import run_passes
from stepq.compiler.state import TimestepTable
from stepq.passes import AttachTimestepTables
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

T = 1000


def _calibrated(kind="dit", recipe="w8a8"):
    m = build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=1))
    data = calib_set(2)
    return m, stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), recipe), data, progress=False)


def _random_tables(prog, seed=0):
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for name in prog.state.activation_stats:
        tables[name] = TimestepTable(torch.rand(T, generator=g) * 0.1 + 0.01,
                                     torch.randint(0, 256, (T,), generator=g).float())
    return tables


@pytest.fixture(scope="module")
def attached():
    m, prog = _calibrated()
    tables = _random_tables(prog)
    prog.state.timestep_tables = tables
    res = run_passes(prog, [AttachTimestepTables()])[0].result
    return m, prog, tables, res


def test_counts_and_one_index_per_forward(attached):
    _, prog, tables, res = attached
    assert res.count == len(tables) > 0
    assert count(prog.gm, ops.TIMESTEP_INDEX) == 1
    assert count(prog.gm, torch.ops.aten.index.Tensor) == 2 * len(tables)
    fake_rerun(prog, denoiser_inputs(2, (1, 2)))
    again = run_passes(prog, [AttachTimestepTables()])[0].result
    assert again.count == 0


@given(ts=st.lists(st.floats(0, 999.49), min_size=1, max_size=3))
def test_gathered_scale_is_the_table_row_of_round_t(attached, ts):
    _, prog, tables, _ = attached
    x = denoiser_inputs(len(ts), [0] * len(ts))
    x["timestep"] = torch.tensor(ts)  # continuous timesteps are rounded to the grid
    fqs = [n for n in prog.gm.graph.nodes if n.target is ops.FAKE_QUANT and n.meta.get(meta.QUANTIZER_ROLE) == "activation"]
    scale_nodes = {n.args[1].name: n for n in fqs}
    outs = collect_layer_outputs(prog, x, set(scale_nodes), bypass=False)
    rows = torch.round(torch.tensor(ts, dtype=torch.float64)).long()
    for s_name, fq in scale_nodes.items():
        expected = tables[fq.meta[meta.ACT_QUANTIZER]].scale[rows]
        assert torch.equal(outs[s_name], expected)  # per sample: x and timestep share the batch


def test_per_sample_scales_in_the_reference_backend(attached):
    m, prog, tables, _ = attached
    x = denoiser_inputs(2, (10, 800), seed=4)
    both = prog(**x)
    one = [prog(sample=x["sample"][i : i + 1], timestep=x["timestep"][i : i + 1]) for i in range(2)]
    torch.testing.assert_close(both, torch.cat(one), rtol=1e-5, atol=1e-5)


def test_out_of_range_timestep_raises_or_clamps(attached):
    _, prog, _, _ = attached
    # the call is refused at the door (stepq.compiler.input_checks) ...
    with pytest.raises(stepq.TimestepRangeError, match=r"argument 'timestep' has timestep 1001 outside \[0, 1000\]"):
        prog(**denoiser_inputs(1, (1001,)))
    # ... and the graph's own timestep_index refuses it too, for a caller that skips the door
    with pytest.raises(stepq.TimestepRangeError, match="timestep 1001 is outside the table range"):
        prog.gm(**denoiser_inputs(1, (1001,)))
    _, prog2 = _calibrated()
    prog2.recipe = prog2.recipe.replace(timestep_policy="clamp")
    tables = _random_tables(prog2)
    prog2.state.timestep_tables = tables
    run_passes(prog2, [AttachTimestepTables()])
    fq = next(n for n in prog2.gm.graph.nodes if n.meta.get(meta.QUANTIZER_ROLE) == "activation")
    with pytest.warns(stepq.compiler.errors.TimestepClampWarning, match=r"timestep 5000 outside \[0, 1000\].*clamping"):
        out = collect_layer_outputs(prog2, denoiser_inputs(1, (5000,)), {fq.args[1].name}, bypass=False)
    # the graph's op clamps on its own as well, visibly
    with pytest.warns(stepq.FallbackWarning, match=r"timestep 5000 is outside the table range \[0, 1000\]; clamping"):
        prog2.gm(**denoiser_inputs(1, (5000,)))
    assert torch.equal(out[fq.args[1].name], tables[fq.meta[meta.ACT_QUANTIZER]].scale[[999]])


def test_wrong_length_table_raises():
    _, prog = _calibrated()
    name = next(iter(prog.state.activation_stats))
    prog.state.timestep_tables = {name: TimestepTable(torch.ones(500), torch.zeros(500))}
    with pytest.raises(stepq.PassError, match=r"has 500 entries; the recipe's num_train_timesteps is 1000"):
        run_passes(prog, [AttachTimestepTables()])
    with pytest.raises(ValueError, match="scales must be positive"):
        TimestepTable(torch.zeros(3), torch.zeros(3))


def test_tables_survive_convert_save_and_load(tmp_path):
    m, prog = _calibrated()
    tables = _random_tables(prog, seed=3)
    prog.state.timestep_tables = tables
    qm = stepq.convert(prog)
    x = denoiser_inputs(2, (7, 700))
    qm.save(tmp_path / "m")
    loaded = stepq.load(tmp_path / "m")
    assert torch.equal(loaded(**x), qm(**x))
    name = next(iter(tables))
    assert torch.equal(loaded.gm.get_buffer(f"{name}_scale_table"), tables[name].scale)
