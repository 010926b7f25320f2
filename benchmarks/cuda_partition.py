"""The CuPy backend's partition tables: which node of which model lowers to which kernel, and why the
others do not. Runs on the CPU (partitioning needs no GPU).

    python benchmarks/cuda_partition.py                       # digits UNet and DiT (zoo), W8A8 / W4A16 / ternary
    python benchmarks/cuda_partition.py --dit-xl              # + a DiT-XL/2-size model (random weights, ~3 GB)

Prints one table per (model, recipe): the count per placement, then each distinct (placement or
reason) with the layers that got it. Writes docs/results/cuda_partition.json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

import stepq
from stepq import zoo
from stepq.backends import get_backend
from stepq.backends.cupy import ops as cupy_ops
from stepq.compiler import meta
from stepq.recipe import LayerRule, LayerSpec, PerGroup, QuantSpec, Recipe, TernarySpec

warnings.filterwarnings("ignore")
BE = get_backend("cupy")


def weight_only_recipe(name: str, weight) -> Recipe:
    """Weights only (activations stay float), attention matmuls float: W4A16 with groups, ternary."""
    return Recipe(name=name, rules=(LayerRule(spec=None, ops=frozenset({"attention"}), name="attention-float"),),
                  default=LayerSpec(weight=weight))


W4A16 = weight_only_recipe("w4a16-g128", QuantSpec(bits=4, signed=True, symmetric=True, granularity=PerGroup(128, 1)))
TERNARY = weight_only_recipe("ternary-base3", TernarySpec())


def dit_inputs(cfg, b: int, t: int, seed: int, classes: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(b, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
            "timestep": torch.full((b,), t), "class_labels": torch.randint(0, classes, (b,), generator=g),
            "return_dict": False}


def unet_inputs(cfg, b: int, t: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return {"sample": torch.randn(b, cfg.in_channels, size, size, generator=g), "timestep": torch.full((b,), t),
            "return_dict": False}


def table(qm, title: str) -> dict:
    low = BE.lower(qm)
    part = low.partition
    lines: dict[str, list[str]] = defaultdict(list)
    for n in low.gm.graph.nodes:
        layer = n.meta.get(meta.LAYER) or n.name
        if n.target is cupy_ops.LINEAR_WEIGHT_ONLY:
            fmt, gs = n.args[5], n.args[9]
            lines[f"linear_weight_only ({fmt}{f', groups of {gs}' if gs else ''})"].append(layer)
        elif n.target is cupy_ops.LINEAR_W8A8:
            lines["linear_w8a8" + (" (timestep table)" if n.args[7] is not None else "")].append(layer)
        elif n.target is cupy_ops.CONV2D_W8A8:
            lines["conv2d_w8a8" + (" (timestep table)" if n.args[7] is not None else "")].append(layer)
    for r in part.rejections:
        lines["left in PyTorch: " + "; ".join(r.reasons)].append(r.layer or r.node)
    print(f"\n### {title}\n")
    print("| placement | count | layers |\n|---|---|---|")
    for what, layers in lines.items():
        shown = ", ".join(layers[:6]) + (f", … ({len(layers) - 6} more)" if len(layers) > 6 else "")
        print(f"| {what} | {len(layers)} | {shown} |")
    return {"counts": part.counts(), "rejections": [str(r) for r in part.rejections],
            "groups": {k: v for k, v in lines.items()}}


def compile_model(model, make_inputs, recipe):
    data = [make_inputs(2, 900, 1), make_inputs(2, 100, 2)]
    return stepq.quantize(model, data[0], recipe, calibration=data, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dit-xl", action="store_true", help="also a DiT-XL/2-size model (random weights)")
    ap.add_argument("--out", default="docs/results/cuda_partition.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {}
    unet = zoo.load("digits-ddpm")
    dit = zoo.load("digits-dit")
    for recipe in ("w8a8", W4A16):
        name = recipe if isinstance(recipe, str) else recipe.name
        results[f"digits-ddpm {name}"] = table(compile_model(unet, lambda b, t, s: unet_inputs(unet.config, b, t, s), recipe),
                                                 f"digits UNet (digits-ddpm), {name}")
        results[f"digits-dit {name}"] = table(
            compile_model(dit, lambda b, t, s: dit_inputs(dit.config, b, t, s, zoo.NUM_CLASSES + 1), recipe),
            f"digits DiT (digits-dit), {name}")
    results["digits-dit-ternary (shipped)"] = table(zoo.load("digits-dit-ternary"), "digits DiT ternary (the shipped digits-dit-ternary)")
    if args.dit_xl:
        from diffusers import DiTTransformer2DModel

        xl = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                   num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
        for recipe in ("w8a8", TERNARY):
            t0 = time.perf_counter()
            qm = compile_model(xl, lambda b, t, s: dit_inputs(xl.config, b, t, s, 1000), recipe)
            name = recipe if isinstance(recipe, str) else recipe.name
            results[f"DiT-XL/2 {name}"] = table(qm, f"DiT-XL/2 size (28 blocks, hidden 1152, random weights), {name}, "
                                                    f"compiled in {time.perf_counter() - t0:.0f}s")
            del qm
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
