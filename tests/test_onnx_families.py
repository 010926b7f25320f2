"""Every quantized Linear/Conv of the six diffusers families and the digits models becomes an
integer kernel in ONNX Runtime, and one session matches the reference backend at several timesteps.

Numerics: relative L2 ≤ 1e-2. The two UNet families (tiny, random weights) are chaotic under
float reordering: the reference backend differs from itself by ~1e-2 when PyTorch's oneDNN
convolutions are switched off (``floor``), because a rounding flip of one activation level
propagates. For them the bound is 2× that floor (see docs/ONNX.md, "Numerics").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stepq.backends.onnx as sx
from stepq.calibration.samplers import model_output
from stepq.testing.onnx_cases import available_cases, get_case, quantized_case, rel_l2

TIMESTEPS = (990, 500, 30)
KERNEL_TABLE = Path(__file__).parents[1] / "docs" / "results" / "onnx_kernels.md"


def recorded_kernels() -> dict[tuple[str, str], dict[str, int]]:
    """The kernel counts docs/results/onnx_kernels.md recorded (benchmarks/onnx_kernels.py) before the
    compiler was reshaped: (model, recipe) -> quantized layers, integer, weight-only, float, in float."""
    lines = [ln for ln in KERNEL_TABLE.read_text().splitlines() if ln.startswith("|") and not ln.startswith("|-")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[1:]:
        row = dict(zip(head, (c.strip() for c in ln.strip("|").split("|"))))
        out[(row["model"], row["recipe"])] = {k: int(row[k]) for k in ("quantized layers", "integer", "weight-only",
                                                                      "float", "quantized in float")}
    return out


def test_the_kernel_table_covers_every_case():
    assert {m for m, _ in recorded_kernels()} == set(available_cases())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8+tables"])
@pytest.mark.parametrize("name", available_cases())
def test_family_integer_kernels_and_numerics(tmp_path, name, recipe):
    case = get_case(name)
    calib = [case.inputs(2, t, i) for i, t in enumerate((950, 700, 400, 100))]
    qm = quantized_case(case, recipe, calib)
    res = qm.export_onnx(tmp_path / "m.onnx", strict=True)  # strict: no quantized layer may stay in float
    assert not res.partition.rejections
    counts = sx.count_kernels(tmp_path / "m.onnx")
    assert counts.integer["MatMulIntegerToFloat"] == len(qm.quantized_layers()) > 0
    assert counts.quantized_in_float == []
    # the same kernels as recorded in docs/results/onnx_kernels.md
    assert {"quantized layers": len(qm.quantized_layers()), "integer": counts.n_integer,
            "weight-only": counts.n_weight_only, "float": counts.n_float,
            "quantized in float": len(counts.quantized_in_float)} == recorded_kernels()[(name, recipe)]
    om = sx.load(tmp_path / "m.onnx", threads=1)
    inputs = [case.inputs(2, t, 17) for t in TIMESTEPS]
    refs = [model_output(qm(**x)) for x in inputs]
    bound = 1e-2
    if name in ("unet", "unet_cond"):
        # the model's own float-reordering noise: the drift is random, so take it over all inputs
        with torch.backends.mkldnn.flags(enabled=False):
            floor = max(rel_l2(model_output(qm(**x)), ref) for x, ref in zip(inputs, refs))
        bound = max(bound, 2 * floor)
    for t, x, ref in zip(TIMESTEPS, inputs, refs):
        err = rel_l2(model_output(om(**x)), ref)
        assert err <= bound, f"{name} {recipe} t={t}: rel L2 {err:.2e} > {bound:.2e}"
