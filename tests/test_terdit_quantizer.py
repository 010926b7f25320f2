"""The ternary quantizer (TerDiT): its values, its straight-through gradient, and its spec in recipes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import stepq
from stepq.compiler.ternary_ops import ternary, ternary_codes, ternary_gamma
from stepq.recipe.presets import ternary_recipe


def test_values_follow_gamma_round_and_clip():
    w = torch.tensor([[0.0, 0.2, -0.2, 0.9], [-2.0, 0.6, 0.05, -0.4]])
    gamma = w.abs().mean()  # 0.54375
    expected = torch.clamp(torch.round(w / (gamma + 1e-6)), -1, 1)
    assert torch.equal(ternary_codes(w).float(), expected)
    assert set(ternary_codes(w).unique().tolist()) <= {-1, 0, 1}
    alpha = torch.tensor(0.7)
    torch.testing.assert_close(ternary(w, alpha), 0.7 * expected, rtol=0, atol=0)
    # 0.2 / 0.54 rounds to 0, 0.6 / 0.54 to 1, −2 clips to −1
    assert ternary_codes(w).tolist() == [[0, 0, 0, 1], [-1, 1, 0, -1]]


def test_per_output_channel_gamma_and_alpha():
    w = torch.tensor([[1.0, 1.0, 0.1], [10.0, -10.0, 5.0]])
    g = ternary_gamma(w, 0)
    torch.testing.assert_close(g, w.abs().mean(dim=1))
    codes = ternary_codes(w, 0)
    assert codes.tolist() == [[1, 1, 0], [1, -1, 1]]
    assert ternary_codes(w).tolist() == [[0, 0, 0], [1, -1, 1]]  # one γ for both rows zeroes the small row
    out = ternary(w, torch.tensor([0.5, 3.0]), 0)
    torch.testing.assert_close(out, codes.float() * torch.tensor([[0.5], [3.0]]))


@given(seed=st.integers(0, 2**16), per_channel=st.booleans())
def test_straight_through_gradient(seed, per_channel):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 7, generator=g, requires_grad=True)
    axis = 0 if per_channel else None
    alpha = (torch.rand(5, generator=g) + 0.1 if per_channel else torch.rand((), generator=g) + 0.1).requires_grad_()
    up = torch.randn(5, 7, generator=g)
    (ternary(w, alpha, axis) * up).sum().backward()
    a = alpha.detach().reshape(-1, 1) if per_channel else alpha.detach()
    torch.testing.assert_close(w.grad, up * a)  # identity STE, no clipping mask
    codes = ternary_codes(w.detach(), axis).float()
    want = (up * codes).sum(1) if per_channel else (up * codes).sum()
    torch.testing.assert_close(alpha.grad, want)


def test_signed_zero_is_canonical():
    w = torch.tensor([-0.01, 1.0, -1.0])  # −0.01/γ rounds to −0
    out = ternary(w, torch.tensor(1.0))
    assert not torch.signbit(out[0])


def test_spec_round_trips_and_mixes_with_integer_rules():
    spec = stepq.TernarySpec(granularity=stepq.PerChannel(0), packing="2bit")
    assert stepq.TernarySpec.from_dict(spec.to_dict()) == spec
    recipe = stepq.Recipe(name="mixed", rules=(
        stepq.LayerRule(spec=stepq.LayerSpec(weight=stepq.TernarySpec()), pattern=r".*attn.*"),
        stepq.LayerRule(spec=stepq.LayerSpec(weight=stepq.QuantSpec(bits=4, granularity=stepq.PerChannel(0))),
                        pattern=r".*ff.*"),
    ), default=stepq.LayerSpec(weight=stepq.QuantSpec(bits=8)))
    again = stepq.Recipe.from_dict(recipe.to_dict())
    assert again == recipe
    assert isinstance(again.rules[0].spec.weight, stepq.TernarySpec)
    assert isinstance(again.rules[1].spec.weight, stepq.QuantSpec)
    for name in ("ternary-dit", "ternary-dit-no-rmsnorm"):
        r = stepq.get_preset(name)
        assert stepq.Recipe.from_dict(r.to_dict()) == r
    assert stepq.get_preset("ternary-dit").terdit.rmsnorm and not stepq.get_preset("ternary-dit-no-rmsnorm").terdit.rmsnorm


def test_a_recipe_without_terdit_serialises_as_before():
    assert "terdit" not in stepq.get_preset("w8a8").to_dict()


@pytest.mark.parametrize("bad", [dict(granularity=stepq.PerChannel(1)), dict(granularity=stepq.PerGroup(16)),
                                 dict(packing="3bit"), dict(eps=0.0)])
def test_invalid_specs_raise_recipe_errors(bad):
    with pytest.raises(stepq.RecipeError, match="TernarySpec"):
        stepq.TernarySpec(**bad)


def test_ternary_recipe_keeps_embedders_and_final_layer_at_8_bits():
    r = ternary_recipe("t")
    spec, rule = r.spec_for("transformer_blocks.0.norm1.linear", "linear", {"conditioning"})
    assert isinstance(spec.weight, stepq.TernarySpec) and rule == "block-linears-ternary"
    spec, rule = r.spec_for("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "linear",
                            {"conditioning", "timestep_embedding"})
    assert spec.weight.bits == 8 and rule == "timestep-mlp-w8"
    spec, rule = r.spec_for("proj_out_1", "linear", {"conditioning"})
    assert spec.weight.bits == 8 and spec.activation is None and rule == "default"
