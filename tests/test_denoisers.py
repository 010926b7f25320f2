"""A few of the diffusers classes beyond the six (benchmarks/denoisers.py runs all of them):
W8A8 reaches 20 dB output SQNR, or the class is refused with a typed error naming the reason."""

from __future__ import annotations

import pytest
import torch

import stepq
from stepq.calibration.probe import sqnr_db
from stepq.calibration.samplers import model_output
from stepq.compiler.errors import CaptureError
from stepq.testing.denoisers import CASES


def _w8a8_sqnr(name: str) -> tuple[float, stepq.QuantizedModel]:
    case = CASES[name]
    model = case.model()
    qm = stepq.quantize(model, case.inputs(2, 500.0, 0), "w8a8", calibration=case.calibration(), progress=False,
                        **case.capture_options)
    evals = [case.inputs(2, t, 100 + i) for i, t in enumerate((100.0, 900.0))]
    with torch.no_grad():
        ref = torch.cat([model_output(model(**d)).flatten() for d in evals])
        out = torch.cat([model_output(qm(**d)).flatten() for d in evals])
    return sqnr_db(ref, out), qm


def test_cogvideox_at_w8a8():
    db, _ = _w8a8_sqnr("CogVideoXTransformer3DModel")
    assert db >= 20.0


@pytest.mark.slow
def test_stable_cascade_timestep_ratio_found_by_dataflow_at_w8a8():
    db, qm = _w8a8_sqnr("StableCascadeUNet")
    assert qm.program.timestep_arg == "timestep_ratio"  # no name matched: found by dataflow
    assert db >= 20.0


@pytest.mark.parametrize("name, reason", [
    ("HiDreamImageTransformer2DModel", r"(?s)transformer_hidream_image.py:\d+ in moe_infer.*mixture-of-experts dispatch"),
    ("Lumina2Transformer2DModel", r"(?s)transformer_lumina2.py:\d+ in forward.*turns tensor values into Python numbers"),
])
def test_uncapturable_classes_are_refused_with_the_reason(name, reason):
    case = CASES[name]
    with pytest.raises(CaptureError, match=reason):
        stepq.capture(case.model(), case.inputs(2, 500.0, 0), **case.capture_options)
