"""A layer whose float output is zero at initialisation (adaLN-Zero, zero convolutions) is reported
as such, not as an infinite SQNR."""

from __future__ import annotations

import math

import torch
from torch import nn

import stepq
from stepq.artifact.report import format_report


class ZeroOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.temb = nn.Linear(16, 8)
        self.conv_out = nn.Conv2d(8, 4, 1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, sample, timestep):
        freqs = torch.exp(-math.log(10000) * torch.arange(8) / 8)
        args = timestep.float()[:, None] * freqs[None]
        emb = self.temb(torch.cat([args.sin(), args.cos()], -1))
        h = torch.nn.functional.silu(self.conv_in(sample) + emb[:, :, None, None])
        return self.conv_out(h)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 900])}


def test_zero_output_layer_has_a_note_not_inf(tmp_path):
    qm = stepq.quantize(ZeroOut(), _inputs(0), "w8a8", calibration=[_inputs(i) for i in range(2)], progress=False)
    rows = {r.layer: r for r in qm.report(print_table=False)}
    out = rows["conv_out"]
    assert out.sqnr_db is None
    assert "float output is zero on the calibration batch" in out.note and "quantized output is zero too" in out.note
    assert rows["conv_in"].sqnr_db is not None and math.isfinite(rows["conv_in"].sqnr_db) and not rows["conv_in"].note
    text = format_report(list(rows.values()))
    assert "zero out" in text and "1 layers with a zero float output (no SQNR): conv_out" in text
    assert "inf" not in text.split("\n", 2)[2].split()  # no row reads "inf"
    qm.save(tmp_path / "m")  # the note survives the artefact
    loaded = {r.layer: r for r in stepq.load(str(tmp_path / "m")).report(print_table=False)}
    assert loaded["conv_out"].note == out.note
