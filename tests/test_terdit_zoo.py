"""The shipped ternary digits DiT: a stepq artefact in the zoo, packed base-3, loaded as a QuantizedModel."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

import stepq
from stepq import zoo
from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import fetch_attr

NAME = "digits-dit-ternary"


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(3, 1, 16, 16, generator=g), "timestep": torch.tensor([0, 500, 999]),
            "class_labels": torch.tensor([0, 9, zoo.NULL_CLASS])}


def test_zoo_load_returns_the_quantized_model():
    qm = zoo.load(NAME)
    assert isinstance(qm, stepq.QuantizedModel)
    assert qm.recipe.name == "ternary-dit" and qm.recipe.terdit.rmsnorm
    assert NAME in zoo.available()
    with torch.no_grad():
        out = qm(**_inputs())[0]
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
    assert zoo.entry(NAME).guidance_scale == zoo.entry("digits-dit").guidance_scale


def test_the_ternary_layers_are_packed_base3_at_1_6_bits():
    qm = zoo.load(NAME)
    numel = stored = layers = 0
    for n in qm.gm.graph.nodes:
        if n.target is ops.DEQUANTIZE and isinstance(n.meta.get(meta.QSPEC), stepq.TernarySpec):
            src = n.args[0]
            assert src.target is ops.UNPACK_BASE3
            packed, alpha = fetch_attr(qm.gm, src.args[0].target), fetch_attr(qm.gm, n.args[1].target)
            numel += math.prod(src.args[1])
            stored += packed.numel() + alpha.numel() * alpha.element_size()
            layers += 1
    assert layers == 4 * 7  # every block: adaLN linear, q, k, v, out, two FF linears
    assert 8 * stored / numel <= 1.61
    size = sum(f.stat().st_size for f in (zoo.CHECKPOINT_DIR / NAME).iterdir())
    assert size < 1_000_000


def test_save_then_load_is_bit_exact(tmp_path):
    qm = zoo.load(NAME)
    qm.save(str(tmp_path / "again"))
    back = stepq.load(str(tmp_path / "again"))
    a, b = load_file(str(zoo.CHECKPOINT_DIR / NAME / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(qm(**_inputs())[0], back(**_inputs())[0])
