"""The PTQD passes: correct_noise (output correction) and select_bits (per-step activation widths)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import calib_set, count, denoiser_inputs, fake_rerun
from torch import nn

import stepq
from stepq.calibration.qparams import activation_qparams
from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import has_attr
from stepq.compiler.pass_manager import run_passes
from stepq.methods.ptqd import MixedPrecision, PTQDStats, copy_model, set_bits, specialize
from stepq.methods.ptqd.mixed import CalibrateWidths
from stepq.passes import CorrectNoise, RefreshTables, SelectBits
from stepq.passes.correct_noise import BIAS_TABLE, K_TABLE
from stepq.passes.select_bits import BITS_TABLE
from stepq.recipe.specs import PTQDConfig, TDQConfig
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

aten = torch.ops.aten
T = 1000


def _stats(k, b):
    T_, C = b.shape
    z = torch.zeros(T_)
    return PTQDStats(k=k, slope=k, bias=b, sigma=z, snr=z + 1, visited=torch.ones(T_, dtype=torch.bool), count=z)


def _compiled(recipe="w4a8", kind="unet", model=None):
    m = model or build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=1))
    data = calib_set(3)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), recipe), data, progress=False)
    return stepq.convert(prog), m, data


def _with_ptqd(qm, **cfg):
    out = copy_model(qm)
    out.program.recipe = out.program.recipe.replace(ptqd=PTQDConfig(**cfg))
    return out


def test_correct_noise_is_the_identity_without_statistics():
    qm, _, _ = _compiled()
    x = denoiser_inputs(3, (20, 500, 980), seed=1)
    ref = qm(**x)
    before = {op: count(qm.gm, op) for op in (aten.index.Tensor, aten.div.Tensor, aten.sub.Tensor)}
    corrected = _with_ptqd(qm)
    res = run_passes(corrected.program, [CorrectNoise()])[0].result
    assert res.count == 1
    assert {op: count(corrected.gm, op) - n for op, n in before.items()} == {
        aten.index.Tensor: 2, aten.div.Tensor: 1, aten.sub.Tensor: 1}
    assert count(corrected.gm, ops.TIMESTEP_INDEX) == 1
    assert torch.equal(corrected(**x), ref)  # (y − 0) / (1 + 0) is y, bit for bit
    fake_rerun(corrected.program, x)
    again = run_passes(corrected.program, [CorrectNoise()])[0].result
    assert again.count == 0


@pytest.mark.parametrize("flags", [{}, {"correlated": False}, {"bias": False}])
def test_correct_noise_applies_the_tables_per_sample(flags):
    qm, _, _ = _compiled(kind="dit")
    x = denoiser_inputs(3, (20, 500, 980), seed=2)
    y = qm(**x)
    g = torch.Generator().manual_seed(0)
    k, b = torch.rand(T, generator=g) * 0.5, torch.randn(T, 4, generator=g) * 0.1
    corrected = _with_ptqd(qm, **flags)
    corrected.program.state.ptqd = _stats(k, b)
    run_passes(corrected.program, [CorrectNoise()])
    t = x["timestep"]
    kk = k[t] if flags.get("correlated", True) else torch.zeros(3)
    bb = b[t] if flags.get("bias", True) else torch.zeros(3, 4)
    expected = (y - bb[:, :, None, None]) / (1 + kk[:, None, None, None])
    torch.testing.assert_close(corrected(**x), expected)
    # new statistics: correct_noise rewrites nothing, refresh_tables writes the tables that change, then nothing
    corrected.program.state.ptqd = _stats(k * 0, b * 0)
    assert run_passes(corrected.program, [CorrectNoise()])[0].result.count == 0
    res = run_passes(corrected.program, [RefreshTables()])[0].result
    written = {name for name, on in ((K_TABLE, "correlated"), (BIAS_TABLE, "bias")) if flags.get(on, True)}
    assert res.count == len(written) and set(res.details) == {f"{name} <- ptqd" for name in written}
    assert torch.equal(corrected(**x), y)
    assert run_passes(corrected.program, [RefreshTables()])[0].result.count == 0


class _LearnedSigma(nn.Module):
    """Predicts ε and a variance: 2C output channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.emb = nn.Linear(1, 8)

    def forward(self, sample, timestep):
        return self.conv(sample) + self.emb(timestep.float()[:, None] / 1000)[:, :, None, None]


def test_correct_noise_leaves_learned_variance_channels_alone():
    qm, _, _ = _compiled(model=_LearnedSigma().eval())
    x = denoiser_inputs(2, (100, 700), seed=3)
    y = qm(**x)
    k, b = torch.full((T,), 0.25), torch.full((T, 4), 0.1)
    corrected = _with_ptqd(qm)
    corrected.program.state.ptqd = _stats(k, b)
    run_passes(corrected.program, [CorrectNoise()])
    out = corrected(**x)
    assert out.shape == (2, 8, 8, 8)
    torch.testing.assert_close(out[:, :4], (y[:, :4] - 0.1) / 1.25)
    assert torch.equal(out[:, 4:], y[:, 4:])


def _switched(gm):
    return [n for n in gm.graph.nodes if n.target is aten.where.self and n.meta.get(meta.PTQD_NODE) == "select_bits"]


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_select_bits_switches_each_sample_to_the_single_width_model(kind):
    m = build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=1))
    mixed, _, data = _compiled(stepq.get_preset("mixed-ptqd"), model=m)
    a8, _, _ = _compiled("w4a8", model=m)
    a4, _, _ = _compiled("w4a4", model=m)
    assert "select_bits" in mixed.program.history
    where = _switched(mixed.gm)
    act = [n for n in mixed.gm.graph.nodes if n.meta.get(meta.QUANTIZER_ROLE) == "activation"
           and n.meta.get(meta.PTQD_NODE) is None]
    # one switch per activation quantizer the default rule placed; the 8-bit io / time-embedding islands stay
    kept = [n for n in act if not any(u in where for u in n.users)]
    assert where and kept and all(n.meta[meta.QSPEC].bits == 8 for n in kept)
    assert len(where) + len(kept) == len(act)
    x = denoiser_inputs(4, (100, 700, 300, 900), seed=4)
    # without a chosen table every step is at 8 bits: the W4A8 model; pinned to 4 bits, the W4A4 model
    torch.testing.assert_close(mixed(**x), a8(**x), rtol=0, atol=0)
    set_bits(mixed, 4)
    torch.testing.assert_close(mixed(**x), a4(**x), rtol=1e-5, atol=1e-5)
    set_bits(mixed, 8)
    table = torch.where(torch.arange(T) < 500, 4, 8)
    mixed.program.state.ptqd_bits = SimpleNamespace(table=table)
    assert run_passes(mixed.program, [SelectBits()])[0].result.count == 0  # already switched: no rewrite
    # the 4-bit scales recalibrated on the steps that now run at 4 bits (t < 500), then written with the table
    widths, refresh = (r.result for r in run_passes(mixed.program, [CalibrateWidths(), RefreshTables()]))
    assert 0 < widths.count <= len(where)
    assert 1 < refresh.count <= 1 + 2 * len(where) and f"{BITS_TABLE} <- ptqd_bits" in refresh.details
    q4 = where[0].args[1]
    st = mixed.program.state.activation_stats[where[0].meta[meta.ACT_QUANTIZER]]
    seen = [t for t in range(500) if t in st.per_timestep]
    vals = torch.cat([st.samples_at(t) for t in seen])
    s_ref, z_ref = activation_qparams(vals, float(st.min[seen].min()), float(st.max[seen].max()), q4.meta[meta.QSPEC])
    assert torch.equal(mixed.gm.get_buffer(q4.args[1].target), s_ref)
    out = mixed(**x)
    s4, s8 = specialize(mixed, 4), specialize(mixed, 8)
    low = torch.tensor([True, False, True, False])
    torch.testing.assert_close(out[low], s4(**x)[low], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[~low], a8(**x)[~low], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s8(**x), a8(**x), rtol=1e-5, atol=1e-5)
    # specialize: the single-width graphs, without the switch (each branch of the ONNX If)
    assert not _switched(s4.gm) and count(s4.gm, ops.FAKE_QUANT) < count(mixed.gm, ops.FAKE_QUANT)
    assert not has_attr(s4.gm, BITS_TABLE)
    set_bits(mixed, 4)
    torch.testing.assert_close(mixed(**x), s4(**x), rtol=0, atol=0)
    fake_rerun(mixed.program, x)
    res = run_passes(mixed.program, [RefreshTables()])[0].result
    assert res.details == (f"{BITS_TABLE} <- ptqd_bits",)  # the state's table is written back
    assert run_passes(mixed.program, [SelectBits(), RefreshTables()])[0].result.count == 0


def test_select_bits_on_tdq_tables_gathers_a_table_per_width():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    recipe = stepq.get_preset("mixed-tdq-ptqd").replace(tdq=TDQConfig(fit_steps=0))
    mixed, _, _ = _compiled(recipe, model=m)
    a4, _, _ = _compiled("w4a4", model=m)
    where = _switched(mixed.gm)
    low = [w.args[1] for w in where]
    # the 4-bit branch reads its own per-timestep tables with the same index as the 8-bit one
    assert all(q.args[1].target is aten.index.Tensor for q in low)
    x = denoiser_inputs(2, (50, 950), seed=5)
    set_bits(mixed, 4)
    # unfitted TDQ tables are the static steps, so the derived 4-bit tables are the static 4-bit steps
    torch.testing.assert_close(mixed(**x), a4(**x), rtol=1e-4, atol=1e-4)


def test_ptqd_state_and_tables_round_trip_through_save_and_load(tmp_path):
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=1))
    data = calib_set(4)
    qm = stepq.quantize(m, data[0], "mixed-ptqd", calibration=data, progress=False)
    stats, mp = qm.program.state.ptqd, qm.program.state.ptqd_bits
    assert isinstance(mp, MixedPrecision) and stats.normality is not None
    qm.save(tmp_path / "m")
    back = stepq.load(tmp_path / "m")
    s2, mp2 = back.program.state.ptqd, back.program.state.ptqd_bits
    for name, t in stats.tensors().items():
        assert torch.equal(s2.tensors()[name], t), name
    assert mp2.bits == mp.bits and torch.equal(mp2.table, mp.table) and torch.equal(mp2.snr_q, mp.snr_q)
    assert back.recipe.ptqd == qm.recipe.ptqd
    x = denoiser_inputs(3, (20, 500, 980), seed=6)
    torch.testing.assert_close(back(**x), qm(**x), rtol=0, atol=0)
    for name in (K_TABLE, BIAS_TABLE, BITS_TABLE):
        assert torch.equal(back.gm.get_buffer(name), qm.gm.get_buffer(name))
    # the loaded program re-runs the passes without its calibration statistics: nothing to change
    passes = [SelectBits(), CorrectNoise(), RefreshTables()]
    assert [r.result.count for r in run_passes(back.program, passes)] == [0, 0, 0]
