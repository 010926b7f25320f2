"""insert_quantizers: weight fake-quants and activation observers where the annotations ask."""

from __future__ import annotations

import torch
from helpers import calib_set, denoiser_inputs, fake_rerun, n_fake_quant, n_observers
from torch import nn

import stepq
from stepq.calibration.probe import sqnr_db
from stepq.compiler import meta, ops
from stepq.compiler.pass_manager import run_passes
from stepq.passes import AnnotateLayers, CanonicalizeExport, InsertQuantizers
from stepq.recipe.specs import LayerRule, LayerSpec, PerGroup, QuantSpec, Recipe
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def _prepared(cfg, recipe):
    m = build_random_denoiser(cfg)
    x = denoiser_inputs(2, (3, 900))
    prog = stepq.capture(m, x)
    prog.recipe = recipe
    results = run_passes(prog, [CanonicalizeExport(), AnnotateLayers(recipe), InsertQuantizers()])
    return m, x, prog, results[-1].result


def test_counts_on_a_dit_like_model():
    cfg = RandomDenoiserConfig(kind="dit", depth=2, attention=True)
    m, x, prog, res = _prepared(cfg, stepq.get_preset("w8a8"))
    # linears: time (2), per block adaln, q, k, v, out, fc1, fc2 (7 x 2), out (1); conv: patch (1)
    n_weights = 2 + 7 * 2 + 1 + 1
    # activations: q/k/v share one input per block, so per block adaln, qkv, out, fc1, fc2 = 5;
    # time linear_1 and linear_2; patch; out
    n_acts = 5 * 2 + 2 + 1 + 1
    assert n_fake_quant(prog.gm, "weight") == n_weights
    assert n_observers(prog.gm) == n_acts
    assert res.count == n_weights + n_acts
    fake_rerun(prog, x)
    # observers are identities: before calibration only the weights are quantized
    torch.testing.assert_close(prog(**x), m(**x), atol=5e-2, rtol=0)
    # idempotent
    again = run_passes(prog, [InsertQuantizers()])[0].result
    assert again.count == 0


def test_shared_input_gets_one_quantizer_with_one_spec():
    cfg = RandomDenoiserConfig(kind="dit", depth=1, attention=True)
    _, _, prog, _ = _prepared(cfg, stepq.get_preset("w8a8"))
    qkv = [n for n in prog.gm.graph.nodes if n.meta.get(meta.LAYER, "").endswith(("to_q", "to_k", "to_v"))]
    assert len(qkv) == 3
    assert len({n.args[0] for n in qkv}) == 1


def test_attention_rule_quantizes_sdpa_operands():
    a8 = QuantSpec(bits=8, signed=False, symmetric=False)
    recipe = Recipe(name="attn", rules=(LayerRule(spec=LayerSpec(activation=a8), ops=frozenset({"attention"})),))
    _, x, prog, res = _prepared(RandomDenoiserConfig(kind="dit", depth=1), recipe)
    assert n_observers(prog.gm) == 3 and n_fake_quant(prog.gm) == 0
    names = sorted(n.meta[meta.ACT_QUANTIZER] for n in prog.gm.graph.nodes if n.op == "call_module")
    assert names == ["blocks.0.attn.k_input", "blocks.0.attn.q_input", "blocks.0.attn.v_input"]


class _IntMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, sample, timestep):
        idx = timestep.long()[:, None, None].expand(-1, 8, 8)
        counts = torch.matmul(idx, idx)  # int64 x int64 "attention-like" matmul: never quantized
        return self.lin(sample) + counts.float()


def test_int64_operands_are_never_quantized():
    a8 = QuantSpec(bits=8, signed=False, symmetric=False)
    recipe = Recipe(name="all", default=LayerSpec(weight=QuantSpec(bits=8), activation=a8))
    m = _IntMatmul().eval()
    x = {"sample": torch.randn(2, 8, 8), "timestep": torch.tensor([1, 2])}
    prog = stepq.capture(m, x)
    prog.recipe = recipe
    run_passes(prog, [AnnotateLayers(recipe), InsertQuantizers()])
    quantized_inputs = [n.args[0] for n in prog.gm.graph.nodes if n.op == "call_module"]
    assert all(q.meta["val"].dtype.is_floating_point for q in quantized_inputs)
    mm = [n for n in prog.gm.graph.nodes if n.target is torch.ops.aten.matmul.default]
    assert mm and not any(a.op == "call_module" for a in mm[0].args)
    assert n_observers(prog.gm) == 1


def test_per_group_weights_and_float_rules():
    w4g = QuantSpec(bits=4, granularity=PerGroup(group_size=16))
    recipe = Recipe(name="g", rules=(LayerRule(spec=None, pattern=r"blocks\.0\..*"),),
                    default=LayerSpec(weight=w4g))
    _, x, prog, _ = _prepared(RandomDenoiserConfig(kind="dit", depth=2, width=32), recipe)
    fqs = [n for n in prog.gm.graph.nodes if n.target is ops.FAKE_QUANT]
    assert fqs and all(n.args[5] == 1 and n.args[6] == 16 for n in fqs)
    kept = [n for n in prog.gm.graph.nodes if n.meta.get(meta.LAYER, "").startswith("blocks.0.")]
    assert kept and all(not any(getattr(a, "target", None) is ops.FAKE_QUANT for a in n.args) for n in kept)
    assert n_observers(prog.gm) == 0


def test_w8a8_sqnr_after_calibration_is_high():
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet"))
    data = calib_set()
    qm = stepq.quantize(m, data[0], "w8a8", calibration=data, progress=False)
    x = denoiser_inputs(3, (50, 400, 950), seed=7)
    assert sqnr_db(m(**x), qm(**x)) > 25.0
