"""Pictures of a compiled model: activation step vs timestep, per-layer SQNR, FP vs quantized samples.

Three PNGs, drawn with matplotlib's Agg backend (no display needed):

* ``steps_vs_t.png``: for every activation quantizer that reads a timestep table (TDQ, a free
  per-step table, PTQD's per-width scales), the step size s(t) the deployed graph gathers at each
  integer training timestep t ∈ [0, T) — the table buffer itself, one line per layer;
* ``sqnr.png``: the per-layer output SQNR against FP from the convert-time report (``qm.report()``),
  SQNR = 10·log10(‖y_fp‖² / ‖y_fp − y_q‖²) dB;
* ``plot_ptqd_statistics``: PTQD's k_t and the all-channel bias b̄_t over t with ±z·se bands, the
  raw per-timestep estimates at the measured timesteps, the gated ones and the measured grid;
* ``samples.png``: with an FP model and a ``stepq.Sampling``, FP samples (top row) and the
  quantized model's samples from the same noise, conditions and sampler seed (bottom row).

``timestep_step_tables(qm)`` returns the data of the first plot, read from the graph: what is
plotted is what the model computes with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx

from stepq.compiler import meta, ops
from stepq.compiler.graph_utils import fetch_attr
from stepq.compiler.timesteps import match_timestep_gather

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from stepq.artifact.quantized_model import QuantizedModel
    from stepq.calibration.collect import Sampling
    from stepq.methods.ptqd.statistics import PTQDStats

__all__ = ["plot_model", "plot_ptqd_statistics", "plot_samples", "plot_sqnr", "plot_steps_vs_t", "sample_pair",
           "timestep_step_tables"]


def _layer_of(q: torch.fx.Node) -> str:
    """The layer an activation quantizer feeds (its first annotated user), else its own name."""
    for user in q.users:
        if meta.LAYER in user.meta:
            return str(user.meta[meta.LAYER])
    return str(q.meta.get(meta.ACT_QUANTIZER, q.name))


def timestep_step_tables(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    """``{layer: step table [T]}`` for every activation quantizer whose step is gathered by timestep,
    read from the graph's table buffers (a layer fed by several quantizers gets ``layer#i``)."""
    gm = qm.program.gm
    out: dict[str, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if n.target is not ops.FAKE_QUANT or n.meta.get(meta.QUANTIZER_ROLE) != "activation":
            continue
        g = match_timestep_gather(n.args[1])
        if g is None:
            continue
        name, i = _layer_of(n), 1
        while name in out:
            name, i = f"{_layer_of(n)}#{i}", i + 1
        out[name] = fetch_attr(gm, g.table.target).detach().float().reshape(-1).clone()
    return out


def _figure(width: float, height: float) -> Figure:
    """A figure outside pyplot (no global state, no display): saved through the Agg canvas."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110, bbox_inches="tight")
    return p


def plot_steps_vs_t(qm: QuantizedModel, path: str | os.PathLike[str], *, max_legend: int = 12) -> Figure | None:
    """Write the activation step s(t) of every timestep-indexed quantizer (log scale, one line per
    layer, the table as the graph holds it) to ``path``; returns the figure, or None (nothing
    written) when the model has no timestep tables (a static recipe)."""
    tables = timestep_step_tables(qm)
    if not tables:
        return None
    import matplotlib

    fig = _figure(8, 4.5)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"]
    for i, (name, s) in enumerate(tables.items()):
        ax.plot(np.arange(s.numel()), s.numpy(), lw=0.9, color=cmap(i / max(len(tables) - 1, 1)), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training timestep t")
    ax.set_ylabel("activation step size s(t)")
    ax.set_title(f"stepq {qm.recipe.name}: {len(tables)} timestep-indexed activation quantizers")
    if len(tables) <= max_legend:
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    return fig


def plot_sqnr(qm: QuantizedModel, path: str | os.PathLike[str]) -> Figure | None:
    """Write the per-layer output SQNR (dB, the convert-time report) as a bar chart, coloured by the
    layer's activation bits; returns the figure, or None when the report has no SQNR (``report=False``)."""
    rows = [r for r in qm.report(print_table=False) if r.sqnr_db is not None and math.isfinite(r.sqnr_db)]
    if not rows:
        return None
    fig = _figure(max(6.0, 0.18 * len(rows)), 4.5)
    ax = fig.subplots()
    colours = {4: "tab:red", 8: "tab:blue", None: "tab:gray"}
    ax.bar(range(len(rows)), [float(r.sqnr_db or 0.0) for r in rows],
           color=[colours.get(r.act_bits, "tab:orange") for r in rows])
    ax.set_xticks(range(len(rows)), [r.layer for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("output SQNR vs FP (dB)")
    ax.set_title(f"stepq {qm.recipe.name}: per-layer SQNR (red A4, blue A8, grey float activations)")
    _save(fig, path)
    return fig


@torch.no_grad()
def sample_pair(qm: Callable[..., Any], fp_model: Callable[..., Any], sampling: Sampling, n: int, *,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of ``fp_model`` and of ``qm`` drawn as ``sampling`` says from the same initial
    noise, conditions and sampler seed; returns ``(fp, quantized)``, each ``[n, *sample_shape]``."""
    from stepq.calibration.samplers import fresh_scheduler, make_denoiser, sample

    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *sampling.sample_shape), generator=gen)
    cond: Mapping[str, Any] = dict(sampling.conditions(n, gen)) if sampling.conditions is not None else {}
    un = dict(sampling.uncond(cond)) if sampling.uncond is not None and cond else None
    out = []
    for m in (fp_model, qm):
        fn = make_denoiser(m, make_inputs=sampling.make_inputs, cond=cond, uncond=un,
                           guidance_scale=sampling.guidance_scale,
                           channels=sampling.channels if sampling.channels is not None else sampling.sample_shape[0])
        out.append(sample(fn, fresh_scheduler(sampling.scheduler), noise, sampling.num_inference_steps,
                          seed=seed, eta=sampling.eta))
    return out[0], out[1]


def _to_rgb(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] → [N, H, W, 3] in [0, 1] (first 3 channels; 1 channel as grey)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) / 2).numpy()
    if x.shape[1] >= 3:
        return np.transpose(x[:, :3], (0, 2, 3, 1))
    return np.repeat(np.transpose(x[:, :1], (0, 2, 3, 1)), 3, axis=3)


def plot_samples(fp: torch.Tensor, quantized: torch.Tensor, path: str | os.PathLike[str], *,
                 title: str = "") -> Figure:
    """Write FP samples (top row) above the quantized model's samples from the same seeds (bottom
    row), with the PSNR of each pair, to ``path``; returns the figure."""
    if fp.shape != quantized.shape or fp.dim() != 4:
        raise ValueError(f"fp and quantized samples must be [N, C, H, W] of one shape, got {tuple(fp.shape)} and "
                         f"{tuple(quantized.shape)}")
    n = fp.shape[0]
    a, b = _to_rgb(fp), _to_rgb(quantized)
    fig = _figure(1.2 * n, 2.8)
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        mse = float(np.mean((a[i] - b[i]) ** 2)) * 4.0  # back on the [−1, 1] scale: PSNR with range 2
        psnr = 10 * math.log10(4.0 / mse) if mse > 0 else math.inf
        for row, img in ((0, a[i]), (1, b[i])):
            axes[row, i].imshow(img, interpolation="nearest")
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        axes[1, i].set_xlabel(f"{psnr:.1f} dB", fontsize=7)
    axes[0, 0].set_ylabel("FP", fontsize=8)
    axes[1, 0].set_ylabel("quantized", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return fig


def plot_model(qm: QuantizedModel, folder: str | os.PathLike[str], *, fp_model: Callable[..., Any] | None = None,
               sampling: Sampling | None = None, n: int = 8, seed: int = 0) -> dict[str, Path]:
    """``qm.plot``: write the pictures that apply into ``folder``; returns ``{kind: path}`` with the
    kinds ``"steps_vs_t"`` (timestep-indexed models only), ``"sqnr"`` (when the report has SQNR) and
    ``"samples"`` (when ``fp_model`` and ``sampling`` are given; costs 2·n·steps denoiser calls)."""
    folder = Path(folder)
    out: dict[str, Path] = {}
    if plot_steps_vs_t(qm, folder / "steps_vs_t.png") is not None:
        out["steps_vs_t"] = folder / "steps_vs_t.png"
    if plot_sqnr(qm, folder / "sqnr.png") is not None:
        out["sqnr"] = folder / "sqnr.png"
    if (fp_model is None) != (sampling is None):
        raise ValueError("the sample grid needs both fp_model= and sampling= (stepq.Sampling, e.g. the calibration "
                         "data's .sampling)")
    if fp_model is not None and sampling is not None:
        fp, q = sample_pair(qm, fp_model, sampling, n, seed=seed)
        plot_samples(fp, q, folder / "samples.png", title=f"FP (top) vs stepq {qm.recipe.name} (bottom), same seeds")
        out["samples"] = folder / "samples.png"
    return out


def plot_ptqd_statistics(stats: PTQDStats, path: str | os.PathLike[str], *, z: float = 2.0,
                         title: str | None = None) -> Figure:
    """Write PTQD's statistics ``stats`` (``PTQDStats``, e.g. ``qm.program.state.ptqd``) to ``path``: left
    k_t, right the all-channel bias b̄_t, each the applied table (line) with a ±``z``·se band
    (the estimator's standard errors, when the statistics have them), the raw per-timestep
    estimates at the measured timesteps (dots), the terms the gate set to 0 (crosses) and the
    measured timesteps (ticks on the axis); ``title`` heads the figure. Returns the figure."""
    t = np.arange(stats.num_train_timesteps)
    vis = stats.visited.numpy().astype(bool)
    fig = _figure(11, 3.8)
    ax_k, ax_b = fig.subplots(1, 2)
    raw_k = stats.raw_k if stats.raw_k is not None else stats.k
    raw_b = (stats.raw_bias if stats.raw_bias is not None else stats.bias).double().mean(1)
    pooled = stats.bias_pooled if stats.bias_pooled is not None else stats.bias.double().mean(1)
    panels = ((ax_k, stats.slope.numpy(), stats.k.numpy(), stats.k_se, raw_k.numpy(), stats.k_gated, "k_t"),
              (ax_b, pooled.numpy(), stats.bias.double().mean(1).numpy(), stats.bias_pooled_se, raw_b.numpy(),
               None if stats.bias_gated is None else stats.bias_gated.all(1), "b̄_t (mean over channels)"))
    for ax, centre, applied, se, raw, gated, name in panels:
        if se is not None:
            half = np.where(np.isfinite(se.numpy()), z * se.numpy(), np.nan)
            ax.fill_between(t, centre - half, centre + half, color="tab:blue", alpha=0.2,
                            label=f"estimate ± {z:g} se")
        ax.plot(t, applied, color="tab:blue", lw=1.2, label="applied table")
        ax.plot(t[vis], raw[vis], ".", color="k", ms=3, label="raw per-timestep estimate")
        if gated is not None and bool(gated.any()):
            g = gated.numpy().astype(bool)
            ax.plot(t[g & vis], raw[g & vis], "x", color="tab:red", ms=5, label="gated (set to 0)")
        ax.plot(t[vis], np.zeros(int(vis.sum())), "|", color="tab:gray", ms=8, label="measured timesteps")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("training timestep t")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax_k.set_title(title or "PTQD statistics")
    _save(fig, path)
    return fig
