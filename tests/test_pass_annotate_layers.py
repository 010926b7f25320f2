"""annotate_layers: module paths, op kinds, structural roles, first-match recipe decisions."""

from __future__ import annotations

import torch
from helpers import op_counts

import stepq
from stepq.compiler import meta
from stepq.compiler.pass_manager import run_passes
from stepq.passes import AnnotateLayers, CanonicalizeExport
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def _annotated(prog):
    return {n.meta[meta.LAYER] + ("" if n.meta[meta.OP_KIND] != "attention" else "#attn"): n
            for n in prog.gm.graph.nodes if meta.LAYER in n.meta}


def test_roles_and_kinds_on_a_unet_like_model():
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=2))
    prog = stepq.capture(m, {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([3, 4])})
    run_passes(prog, [CanonicalizeExport()])
    before = op_counts(prog.gm)
    res = run_passes(prog, [AnnotateLayers(stepq.get_preset("w4a4"))])[0].result
    layers = _annotated(prog)
    # 2 time linears + conv_in + 2 resblocks (conv1, time_proj, conv2, one skip) + attn (4 linears + sdpa)
    # + up resblock (conv1, time_proj, conv2, skip) + conv_out
    assert res.count == len(layers) == 2 + 1 + 7 + 5 + 4 + 1
    assert op_counts(prog.gm) == before  # annotation only writes meta
    roles = {k: n.meta[meta.ROLES] for k, n in layers.items()}
    assert roles["conv_in"] == {"input"}
    assert roles["conv_out"] == {"output"}
    assert roles["time.linear_1"] == {"conditioning", "timestep_embedding"}
    assert roles["time.linear_2"] == {"conditioning", "timestep_embedding"}
    assert roles["down.0.time_proj"] == {"conditioning"}
    assert roles["down.0.conv1"] == frozenset()
    assert layers["attn#attn"].meta[meta.OP_KIND] == "attention"
    # the preset's rules
    assert layers["conv_in"].meta[meta.LAYER_SPEC].weight.bits == 8
    assert layers["time.linear_2"].meta[meta.RULE] == "timestep-mlp-8bit"
    assert layers["down.0.conv1"].meta[meta.LAYER_SPEC].weight.bits == 4
    assert layers["attn#attn"].meta[meta.LAYER_SPEC] is None


def test_second_run_changes_nothing_and_graph_is_untouched():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit"))
    prog = stepq.capture(m, {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([3, 4])})
    run_passes(prog, [CanonicalizeExport()])
    before = op_counts(prog.gm)
    recipe = stepq.get_preset("w8a8")
    first = run_passes(prog, [AnnotateLayers(recipe)])[0].result
    second = run_passes(prog, [AnnotateLayers(recipe)])[0].result
    assert first.count > 0 and second.count == 0
    assert op_counts(prog.gm) == before
    # a different recipe changes every decision it touches
    r2 = stepq.Recipe(name="all-float", default=None)
    third = run_passes(prog, [AnnotateLayers(r2)])[0].result
    assert third.count == first.count


def test_dit_adaln_is_conditioning_not_timestep_mlp():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=2))
    prog = stepq.capture(m, {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([3, 4])})
    run_passes(prog, [AnnotateLayers(stepq.get_preset("w4a8"))])
    layers = _annotated(prog)
    assert layers["blocks.0.adaln"].meta[meta.ROLES] == {"conditioning"}
    assert layers["patch"].meta[meta.ROLES] == {"input"}
    assert layers["out"].meta[meta.ROLES] == {"output"}
    assert layers["blocks.1.fc2"].meta[meta.ROLES] == frozenset()
