"""The six diffusers families, quantized end to end with calibration on a real scheduler."""

from __future__ import annotations

import pytest
import torch

import stepq
from stepq.calibration import collect
from stepq.calibration.probe import sqnr_db
from stepq.compiler import meta
from stepq.testing.families import FAMILIES

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_quantizes_with_w8a8(name):
    f = FAMILIES[name]
    m = f.model()
    data = collect(m, f.scheduler(), num_samples=8, num_inference_steps=6, make_inputs=f.make_inputs,
                   conditions=f.conditions, sample_shape=f.sample_shape, channels=f.channels, progress=False)
    qm = stepq.quantize(m, data[0], "w8a8", calibration=data, timestep_scale=f.timestep_scale, progress=False)
    # every Linear and Conv2d is quantized (attention matmuls stay float in the preset)
    kinds = [n.meta[meta.OP_KIND] for n in qm.gm.graph.nodes if meta.OP_KIND in n.meta]
    n_weighted = sum(k in ("linear", "conv2d") for k in kinds)
    assert len(qm.quantized_layers()) == n_weighted > 5
    x = f.example_inputs(batch=2, t=300.0, seed=5)
    ref, out = m(**x)[0], qm(**x)[0]
    assert out.shape == ref.shape
    assert sqnr_db(ref, out) > 20.0
    rows = qm.report(print_table=False)
    assert len(rows) == len(kinds) and all(r.sqnr_db is not None for r in rows)
    # one timestep table grid for all: flow-matching timesteps (t = 1000 first) land on it
    st = qm.program.state.activation_stats
    assert all(int(s.visited.max()) <= 999 for s in st.values())
    assert torch.isfinite(out).all()
