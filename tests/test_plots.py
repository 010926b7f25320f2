"""qm.plot: activation step vs timestep (the model's own tables), per-layer SQNR, FP vs quantized samples."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from torch import nn

import stepq
from stepq.artifact.plots import plot_steps_vs_t, sample_pair, timestep_step_tables
from stepq.calibration.collect import Sampling
from stepq.recipe.specs import TDQConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Denoiser(nn.Module):
    """A conv denoiser whose activation range grows with t (so TDQ's tables are not flat)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_mid = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, sample, timestep):
        gain = (1.0 + timestep.float() / 100.0)[:, None, None, None]
        h = torch.relu(self.conv_in(sample)) * gain
        return self.conv_out(torch.relu(self.conv_mid(h)))


def _calib(n=6, batch=4):
    g = torch.Generator().manual_seed(0)
    return [{"sample": torch.randn(batch, 1, 8, 8, generator=g),
             "timestep": torch.full((batch,), int(999 * i / (n - 1)), dtype=torch.int64)} for i in range(n)]


@pytest.fixture(scope="module")
def tdq_model():
    torch.manual_seed(0)
    model = _Denoiser().eval()
    recipe = stepq.get_preset("w8a4-tdq").replace(tdq=TDQConfig(fit_steps=20, fit_batch=2, fit_rows=2))
    calib = _calib()
    return model, stepq.quantize(model, calib[0], recipe, calibration=calib, progress=False)


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        if f.read(8) != PNG_MAGIC:
            return False
    with Image.open(path) as im:
        im.verify()
    return True


def test_plot_writes_three_valid_pngs(tdq_model, tmp_path):
    model, qm = tdq_model
    sampling = Sampling(DDIMScheduler(num_train_timesteps=1000), 3, (1, 8, 8))
    paths = qm.plot(tmp_path / "plots", fp_model=model, sampling=sampling, n=3)
    assert set(paths) == {"steps_vs_t", "sqnr", "samples"}
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 1000 and _is_png(p)
    with Image.open(paths["samples"]) as im:  # two rows of three samples: wider than tall
        assert im.width > im.height


def test_plotted_steps_are_the_models_tables(tdq_model, tmp_path):
    _, qm = tdq_model
    fig = plot_steps_vs_t(qm, tmp_path / "s.png")
    assert fig is not None
    lines = fig.axes[0].lines
    state = qm.program.state.timestep_tables  # what freeze_scale_source wrote, independent of the graph walk
    assert len(lines) == len(state) == len(timestep_step_tables(qm)) > 0
    plotted = sorted(tuple(line.get_ydata()) for line in lines)
    expected = sorted(tuple(t.scale.float().numpy()) for t in state.values())
    for p, e in zip(plotted, expected):
        torch.testing.assert_close(torch.tensor(p), torch.tensor(e))
    assert all(len(line.get_xdata()) == qm.recipe.num_train_timesteps for line in lines)
    # the first layer's step grows with t, as its input's range does
    first = timestep_step_tables(qm)["conv_mid"]
    assert float(first[900]) > 1.5 * float(first[50])


def test_the_step_plot_is_what_the_graph_computes_with(tdq_model):
    """Changing a table buffer changes the plotted data: the plot reads the deployed graph."""
    _, qm = tdq_model
    tables = timestep_step_tables(qm)
    name = next(iter(tables))
    gm = qm.program.gm
    buf = next(b for n, b in gm.named_buffers() if n.endswith("_scale_table") and torch.equal(b, tables[name]))
    old = buf.clone()
    try:
        buf.mul_(2.0)
        torch.testing.assert_close(timestep_step_tables(qm)[name], 2.0 * old)
    finally:
        buf.copy_(old)


def test_static_model_has_no_step_plot_and_samples_need_both_arguments(tmp_path):
    model = _Denoiser().eval()
    calib = _calib(3)
    qm = stepq.quantize(model, calib[0], "w8a8", calibration=calib, progress=False)
    paths = qm.plot(tmp_path)
    assert set(paths) == {"sqnr"} and _is_png(paths["sqnr"])
    with pytest.raises(ValueError, match="fp_model= and sampling="):
        qm.plot(tmp_path, fp_model=model)


def test_sample_pair_shares_the_seed(tdq_model):
    model, _ = tdq_model
    sampling = Sampling(DDIMScheduler(num_train_timesteps=1000), 2, (1, 8, 8))
    a, b = sample_pair(model, model, sampling, 2, seed=3)
    assert torch.equal(a, b) and a.shape == (2, 1, 8, 8)
