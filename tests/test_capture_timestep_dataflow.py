"""The timestep input found by dataflow when no name matches: the one input feeding a sin/cos
projection through no learned op. A name is still accepted and wins."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stepq
from stepq.calibration.probe import sqnr_db
from stepq.compiler.errors import CaptureError
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

CFG = RandomDenoiserConfig(kind="dit", width=16, depth=1, heads=1, temb_dim=16)


def _sinusoid(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Renamed(nn.Module):
    """A denoiser whose timestep is called ``noise_level``, with a distractor 1-D input (a scale
    that goes through a Linear first) and a rotary-like sin over token positions after a matmul."""

    def __init__(self):
        super().__init__()
        self.inner = build_random_denoiser(CFG)
        self.gain = nn.Linear(1, 4)

    def forward(self, latents, noise_level, strength):
        g = self.gain(strength[:, None])  # 1-D, but through a Linear before any sin
        out = self.inner(latents, noise_level)
        rot = torch.sin(latents.flatten(2) @ latents.flatten(2).transpose(1, 2)).mean()
        return out * (1 + 0.01 * g[:, :, None, None]) + 0.0 * rot


class TwoClocks(Renamed):
    def forward(self, latents, noise_level, strength):
        return self.inner(latents, noise_level) + _sinusoid(strength).mean()


def _inputs(batch=2):
    return {"latents": torch.randn(batch, 4, 8, 8), "noise_level": torch.tensor([10, 700]),
            "strength": torch.tensor([0.5, 0.7])}


def test_timestep_found_by_dataflow():
    prog = stepq.capture(Renamed().eval(), _inputs())
    assert prog.timestep_arg == "noise_level"
    assert prog.signature.timestep == "noise_level"
    assert prog.sample_arg == "latents"


def test_found_timestep_drives_tables_and_range_checks():
    model = Renamed().eval()
    calib = [_inputs() for _ in range(2)]
    qm = stepq.quantize(model, _inputs(), recipe="w8a8", calibration=calib)
    x = _inputs()
    ref = model(**x)
    assert sqnr_db(ref, qm(**x)) > 20
    with pytest.raises(stepq.TimestepRangeError, match="argument 'noise_level' has timestep 1001"):
        qm(**{**x, "noise_level": torch.tensor([1001, 3])})


def test_a_name_still_wins():
    prog = stepq.capture(Renamed().eval(), _inputs(), timestep_arg="noise_level")
    assert prog.timestep_arg == "noise_level"


def test_two_sinusoid_inputs_are_ambiguous():
    with pytest.raises(CaptureError, match=r"several inputs feed a sinusoidal projection \(\['noise_level', 'strength'\]\)"
                                           r".*pass timestep_arg="):
        stepq.capture(TwoClocks().eval(), _inputs())
    assert stepq.capture(TwoClocks().eval(), _inputs(), timestep_arg="noise_level").timestep_arg == "noise_level"


def test_no_sinusoid_at_all_is_refused():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, latents, level):
            return self.conv(latents) * level[:, None, None, None]

    with pytest.raises(CaptureError, match="no input of at most one dimension feeds a sinusoidal"):
        stepq.capture(Plain(), {"latents": torch.randn(2, 4, 8, 8), "level": torch.tensor([1.0, 2.0])})


class Routed(nn.Module):
    """A mixture-of-experts feed-forward with value-dependent dispatch (HiDream's ``moe_infer``)."""

    def __init__(self):
        super().__init__()
        self.inner = build_random_denoiser(CFG)
        self.gate = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, sample, timestep):
        h = self.inner(sample, timestep)
        tokens = h.permute(0, 2, 3, 1).reshape(-1, 4)
        idx = self.gate(tokens).argmax(-1)
        counts = idx.bincount(minlength=2).cpu().numpy().cumsum(0)  # the routed dispatch
        out = torch.zeros_like(tokens)
        order = idx.argsort()
        start = 0
        for e, end in enumerate(counts):
            sel = order[start:end]
            out[sel] = self.experts[e](tokens[sel])
            start = end
        return out.reshape(h.shape[0], h.shape[2], h.shape[3], 4).permute(0, 3, 1, 2)


def test_value_routed_experts_are_refused_naming_the_line():
    x = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([3, 500])}
    with pytest.raises(CaptureError, match=r"(?s)could not capture Routed.*test_capture_timestep_dataflow.py:\d+ in "
                                           r"forward: counts = idx.bincount.*mixture-of-experts dispatch.*dense dispatch"):
        stepq.capture(Routed().eval(), x)
