"""TerDiT on the digits DiT: ternary QAT with and without the inserted RMSNorm, from the FP checkpoint
and from scratch, beside FP and W4 / W2 weight-only PTQ; FD, class accuracy, PSNR vs FP, bits per
weight, artefact / ONNX bytes, ORT latency, loss curves and adaLN modulation magnitudes.

    python benchmarks/terdit.py train --configs ckpt-rmsnorm ckpt-no-rmsnorm      # QAT runs (saved)
    python benchmarks/terdit.py eval --samplers ddim20 --n 1000                   # sample and score
    python benchmarks/terdit.py report                                            # tables + plots

``train`` keeps every trained model as a stepq artefact under ``--work`` (default /tmp/terdit_work)
with its loss curve; ``eval`` scores them (and FP, W4, W2 PTQ) and merges rows into
``docs/results/terdit.json``; ``report`` writes ``docs/results/terdit.md`` and the plots. Every
script run uses one thread (the machine is shared) and fixed seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import stepq
from stepq import metrics, zoo
from stepq.calibration.samplers import default_make_inputs
from stepq.data import load_digits_images
from stepq.methods.qat import denoising_batches
from stepq.recipe.presets import TERNARY_BLOCKS, ternary_recipe, weight_spec

warnings.filterwarnings("ignore")

RESULTS = Path("docs/results/terdit")
#: name: (preset, from scratch?, lr)
TRAINED: dict[str, tuple[str, bool, float]] = {
    "ckpt-rmsnorm": ("ternary-dit", False, 2e-4),
    "ckpt-no-rmsnorm": ("ternary-dit-no-rmsnorm", False, 2e-4),
    "scratch-rmsnorm": ("ternary-dit", True, 5e-4),
    "scratch-no-rmsnorm": ("ternary-dit-no-rmsnorm", True, 5e-4),
}
SAMPLERS = {"ddim20": ("ddim", 20, 0.0), "ddpm100": ("ddpm", 100, None)}


def weight_only_recipe(bits: int) -> stepq.Recipe:
    """W{bits} weight-only PTQ of the same layers TerDiT makes ternary (per-channel, MSE search)."""
    base = ternary_recipe(f"w{bits}-weight-only")
    rules = tuple(dataclasses.replace(r, spec=stepq.LayerSpec(weight=weight_spec(bits)), name=f"block-linears-w{bits}")
                  if r.pattern == TERNARY_BLOCKS else r for r in base.rules)
    return base.replace(rules=rules, qat=None, terdit=None)


def example(model: torch.nn.Module) -> dict[str, Any]:
    return default_make_inputs(model)(torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
                                      torch.tensor([500, 500]), {"class_labels": torch.tensor([1, 2])})


def batches(model: torch.nn.Module, entry: zoo.ZooEntry, batch_size: int, seed: int):
    x0, y = load_digits_images("train")
    return denoising_batches(x0, entry.scheduler, default_make_inputs(model), batch_size=batch_size,
                             cond={"class_labels": y}, cond_dropout=("class_labels", entry.null_class, 0.1), seed=seed)


def fp_model(scratch: bool) -> torch.nn.Module:
    if not scratch:
        return zoo.load("digits-dit")
    cfg = zoo.read_config("digits-dit")
    torch.manual_seed(0)
    return zoo.build_model(cfg["class"], cfg["config"]).eval()


def train(name: str, steps: int, work: Path) -> None:
    preset, scratch, lr = TRAINED[name]
    entry = zoo.entry("digits-dit")
    model = fp_model(scratch)
    recipe = stepq.get_preset(preset)
    recipe = recipe.replace(qat=dataclasses.replace(recipe.qat, steps=steps, lr=lr))
    t0 = time.perf_counter()
    qm = stepq.quantize(model, example(model), recipe, train_data=batches(model, entry, recipe.qat.batch_size, 0),
                        progress=True)
    wall = time.perf_counter() - t0
    out = work / name
    qm.save(str(out))
    (work / f"{name}.json").write_text(json.dumps({"name": name, "preset": preset, "scratch": scratch, "lr": lr,
                                                   "steps": steps, "wall_s": wall,
                                                   "curve": qm.program.state.qat_curve}))
    curve = qm.program.state.qat_curve or []
    print(f"{name}: {steps} steps in {wall:.0f}s; loss (mean of last 50) {sum(curve[-50:]) / max(1, len(curve[-50:])):.4f}",
          flush=True)


# -- evaluation -----------------------------------------------------------------------------------------
def _fp_cache(sampler: str, n: int, seed: int) -> Path:
    # the same file benchmarks/quality.py keeps its FP samples in
    return Path("/tmp/stepq_quality_cache") / f"dit_{sampler}_n{n}_seed{seed}.safetensors"


def _samples(denoiser: Any, sampler: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    kind, steps, eta = SAMPLERS[sampler]
    return zoo.generate(denoiser, zoo.entry("digits-dit"), n, num_inference_steps=steps, scheduler=kind, seed=seed,
                        eta=eta)


def fp_samples(sampler: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    from safetensors.torch import load_file, save_file

    p = _fp_cache(sampler, n, seed)
    if p.is_file():
        d = load_file(str(p))
        return d["images"], d.get("labels")
    images, labels = _samples(zoo.load("digits-dit"), sampler, n, seed)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous()} | ({} if labels is None else {"labels": labels.contiguous()}), str(p))
    return images, labels


def ternary_bits(qm: Any) -> dict[str, float]:
    """Bits per weight of the ternary layers: packed codes + their α, over the weights' count."""
    from stepq.compiler import meta, ops
    from stepq.compiler.graph_utils import fetch_attr

    gm = qm.gm
    numel = stored = stored_2bit = 0
    for n in gm.graph.nodes:
        if n.target is not ops.DEQUANTIZE or not isinstance(n.meta.get(meta.QSPEC), stepq.TernarySpec):
            continue
        src, alpha = n.args[0], n.args[1]
        packed = fetch_attr(gm, src.args[0].target)
        a = fetch_attr(gm, alpha.target)
        k = math.prod(int(d) for d in (src.args[1] if src.target is ops.UNPACK_BASE3 else src.args[3]))
        numel += k
        stored += packed.numel() * packed.element_size() + a.numel() * a.element_size()
        stored_2bit += math.ceil(k / 4) + a.numel() * a.element_size()  # the same layer with packing="2bit"
    return {"ternary_weights": numel, "ternary_bytes": stored, "bits_per_weight": 8 * stored / max(1, numel),
            "bits_per_weight_2bit": 8 * stored_2bit / max(1, numel)}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def score(images: torch.Tensor, labels: torch.Tensor | None, fp: torch.Tensor | None) -> dict[str, Any]:
    classifier = zoo.load("digits-classifier")
    test_x, _ = load_digits_images("test")
    return {"fd": metrics.fd(images, test_x, classifier),
            "accuracy": metrics.class_accuracy(images, labels, classifier) if labels is not None else None,
            "psnr_vs_fp": metrics.psnr(images, fp) if fp is not None else None}


def build(config: str, work: Path) -> Any:
    """The denoiser of a row: the FP model, a trained ternary artefact, or W4 / W2 weight-only PTQ."""
    if config == "fp32":
        return zoo.load("digits-dit")
    if config in TRAINED:
        path = work / config
        while not (path / "manifest.json").is_file():  # trained by a `train` run in the background
            time.sleep(20)
        return stepq.load(str(path))
    bits = {"w4-ptq": 4, "w2-ptq": 2}[config]
    model = zoo.load("digits-dit")
    return stepq.quantize(model, example(model), weight_only_recipe(bits), progress=False)


def evaluate(configs: list[str], samplers: list[str], n: int, seed: int, work: Path) -> None:
    out = RESULTS.with_suffix(".json")
    for config in configs:
        t0 = time.perf_counter()
        den = build(config, work)
        for sampler in samplers:
            fp, _ = fp_samples(sampler, n, seed)
            t1 = time.perf_counter()
            if config == "fp32":
                images, labels = fp_samples(sampler, n, seed)
            else:
                images, labels = _samples(den, sampler, n, seed)
            row: dict[str, Any] = {"config": config, "sampler": sampler, "n": n,
                                   **score(images, labels, None if config == "fp32" else fp),
                                   "sample_s": round(time.perf_counter() - t1, 1)}
            if config != "fp32":
                row["weight_bytes"] = den.weight_bytes()
                row.update(ternary_bits(den))
            else:
                row["weight_bytes"] = sum(p.numel() * 4 for p in den.parameters())
            if config in TRAINED:
                row["artefact_bytes"] = _dir_bytes(work / config)
                row.update({k: v for k, v in json.loads((work / f"{config}.json").read_text()).items()
                            if k in ("steps", "lr", "wall_s", "scratch")})
            metrics.save_grid(images[:100], RESULTS.parent / "grids" / f"terdit_{sampler}_{config}.png", nrow=10)
            _merge_row(out, row)
            print(f"{config:20s} {sampler:8s} FD {row['fd']:.3f} acc {row['accuracy']:.3f} PSNR "
                  f"{row['psnr_vs_fp'] if row['psnr_vs_fp'] is None else round(row['psnr_vs_fp'], 2)} "
                  f"({row['sample_s']}s, built in {t1 - t0:.0f}s)", flush=True)


def _merge_row(path: Path, row: dict[str, Any], key: str = "rows") -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    rows = [r for r in data.get(key, []) if (r.get("config"), r.get("sampler")) != (row.get("config"), row.get("sampler"))]
    data[key] = rows + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


# -- measurements beside the samples ----------------------------------------------------------------------
@torch.no_grad()
def modulation_magnitudes(prog: Any, inputs: dict[str, Any]) -> dict[str, list[float]]:
    """Per block: RMS of the adaLN modulation linear's output, and of the modulation that reaches the
    chunk into shift / scale / gate (after the RMSNorm where there is one)."""
    from stepq.passes.insert_rmsnorm import find_modulations

    mods = [m for m in find_modulations(prog) if m.edge is not None]
    want = {m.producer: "linear" for m in mods} | {m.chunk.args[0]: "chunk_input" for m in mods}
    seen: dict[Any, torch.Tensor] = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n in want:
                seen[n] = out
            return out

    Probe(prog.gm).run(*prog.flat_inputs((), inputs))
    rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
    return {"linear": [rms(seen[m.producer]) for m in mods], "chunk_input": [rms(seen[m.chunk.args[0]]) for m in mods]}


def _onnx_bytes(path: Path) -> int:
    """The .onnx file and its external-data file, if the exporter wrote one (the FP model's weights)."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())


def _latency(fn: Any, inputs: dict[str, Any], repeats: int) -> float:
    fn(**inputs)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(**inputs)
    return (time.perf_counter() - t0) / repeats


def measure(configs: list[str], work: Path, batch: int, repeats: int) -> None:
    """adaLN magnitudes of every model; ONNX bytes, MatMulNBits count and ORT latency of the shipped
    configuration against the FP32 ONNX model (one thread each)."""
    import onnx

    import stepq.backends.onnx as sx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import OrtDenoiser, export_fp_onnx

    entry = zoo.entry("digits-dit")
    x0, y = load_digits_images("train")
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, x0.shape[0], (batch,), generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    fp = zoo.load("digits-dit")
    noisy = entry.scheduler.add_noise(x0[idx], torch.randn(x0[idx].shape, generator=g), t)
    inputs = default_make_inputs(fp)(noisy, t, {"class_labels": y[idx]})
    out = RESULTS.with_suffix(".json")
    data = json.loads(out.read_text()) if out.is_file() else {}
    mags = data.get("modulation", {})
    mags["fp32"] = modulation_magnitudes(stepq.capture(fp, example(fp)), inputs)
    for preset, key in (("ternary-dit-no-rmsnorm", "init-no-rmsnorm"), ("ternary-dit", "init-rmsnorm")):
        # the FP checkpoint's weights ternarised (α = γ), before any training: where the paper's blow-up shows
        prog = stepq.prepare(stepq.capture(fp, example(fp)), preset)
        stepq.calibrate(prog, [example(fp)], progress=False)
        mags[key] = modulation_magnitudes(prog, inputs)
    for c in configs:
        if (work / c / "manifest.json").is_file():
            mags[c] = modulation_magnitudes(stepq.load(str(work / c)).program, inputs)
    data["modulation"] = mags
    qm = stepq.load(str(work / "ckpt-rmsnorm"))
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = export_fp_onnx(fp, example(fp), Path(tmp) / "fp.onnx")
        q_path = Path(tmp) / "ternary.onnx"
        qm.export_onnx(q_path)
        nodes = [nd for nd in onnx.load(str(q_path)).graph.node if nd.op_type == "MatMulNBits"]
        bits = [{a.name: a.i for a in nd.attribute}["bits"] for nd in nodes]
        counts = sx.count_kernels(q_path)
        lat_fp = _latency(OrtDenoiser(fp_path, threads=1), inputs, repeats)
        lat_q = _latency(OrtDenoiser(q_path, threads=1), inputs, repeats)
        lat_ref = _latency(qm, inputs, repeats)
        lat_torch_fp = _latency(fp, inputs, repeats)
        data["onnx"] = {"fp32_bytes": _onnx_bytes(fp_path), "ternary_bytes": _onnx_bytes(q_path),
                        "matmul_nbits": len(nodes), "matmul_nbits_2bit": bits.count(2),
                        "matmul_nbits_8bit": bits.count(8), "float_kernels": dict(counts.float),
                        "quantized_in_float": list(counts.quantized_in_float),
                        "batch": batch, "repeats": repeats, "ort_fp32_s": lat_fp, "ort_ternary_s": lat_q,
                        "ort_ratio_ternary_over_fp32": lat_q / lat_fp, "torch_fp32_s": lat_torch_fp,
                        "torch_reference_ternary_s": lat_ref}
    data["artefact"] = {"fp32_checkpoint_bytes": zoo.checkpoint_paths("digits-dit")[0].stat().st_size,
                        "ternary_artefact_bytes": _dir_bytes(zoo.CHECKPOINT_DIR / "digits-dit-ternary")
                        if (zoo.CHECKPOINT_DIR / "digits-dit-ternary").is_dir() else None,
                        **ternary_bits(qm)}
    fresh = json.loads(out.read_text()) if out.is_file() else {}  # an eval run may have added rows meanwhile
    fresh.update({k: data[k] for k in ("onnx", "artefact", "modulation")})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fresh, indent=1))
    print(json.dumps({k: data[k] for k in ("onnx", "artefact", "modulation")}, indent=1), flush=True)


# -- report ------------------------------------------------------------------------------------------------
LABELS = {"fp32": "FP32", "w4-ptq": "W4 weight-only PTQ", "w2-ptq": "W2 weight-only PTQ",
          "init-no-rmsnorm": "FP ckpt ternarised, no RMSNorm, before QAT",
          "init-rmsnorm": "FP ckpt ternarised + RMSNorm, before QAT",
          "ckpt-rmsnorm": "ternary + RMSNorm, from FP ckpt", "ckpt-no-rmsnorm": "ternary, no RMSNorm, from FP ckpt",
          "scratch-rmsnorm": "ternary + RMSNorm, from scratch", "scratch-no-rmsnorm": "ternary, no RMSNorm, from scratch"}


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(RESULTS.with_suffix(".json").read_text())
    order = list(LABELS)
    rows = sorted(data.get("rows", []), key=lambda r: (r["sampler"], order.index(r["config"]) if r["config"] in order else 99))
    lines = ["# TerDiT on the digits DiT", "",
             "Generated by `benchmarks/terdit.py` (train / eval / measure / report). FD against the held-out "
             "digits in the digit classifier's feature space; class accuracy of the classifier on the requested "
             "label; PSNR against the FP model's samples from the same seeds. Ternary runs: 64 images per step, "
             "denoising loss, CFG label dropout 0.1; FP checkpoint runs lr 2e-4, from scratch lr 5e-4 (the "
             "paper's); α lr 1e-4.", "",
             "| sampler | N | config | QAT steps | FD | class acc | PSNR vs FP (dB) | bits/weight (ternary layers) | weight bytes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bpw = r.get("bits_per_weight") or None
        lines.append(f"| {r['sampler']} | {r['n']} | {LABELS.get(r['config'], r['config'])} | {r.get('steps', '-')} | "
                     f"{r['fd']:.3f} | {_f(r['accuracy'], '.3f')} | {_f(r['psnr_vs_fp'], '.2f')} | "
                     f"{_f(bpw, '.4f')} | {r['weight_bytes']:,} |")
    if "artefact" in data:
        a, o = data["artefact"], data.get("onnx", {})
        lines += ["", "## Sizes and latency (the shipped model, `digits-dit-ternary`)", "",
                  f"- ternary layers: {a['ternary_weights']:,} weights in {a['ternary_bytes']:,} bytes (base-3 codes + α) "
                  f"= **{a['bits_per_weight']:.4f} bits/weight** (floor log2 3 = 1.585; the same layers with "
                  f"packing=\"2bit\": {a.get('bits_per_weight_2bit', float('nan')):.4f})",
                  f"- artefact (safetensors + JSON manifest): {a['ternary_artefact_bytes']:,} bytes vs the FP32 "
                  f"checkpoint's {a['fp32_checkpoint_bytes']:,} ({a['fp32_checkpoint_bytes'] / a['ternary_artefact_bytes']:.1f}× smaller)"]
        if o:
            lines += [f"- ONNX: {o['ternary_bytes']:,} bytes vs FP32 ONNX {o['fp32_bytes']:,}; {o['matmul_nbits']} "
                      f"com.microsoft.MatMulNBits ({o['matmul_nbits_2bit']} with bits=2: the ternary layers; "
                      f"{o['matmul_nbits_8bit']} with bits=8), float kernels {o['float_kernels']}, "
                      f"quantized but run in float: {o['quantized_in_float']}",
                      f"- ORT CPU latency, batch {o['batch']}, 1 thread, mean of {o['repeats']} calls: ternary "
                      f"{o['ort_ternary_s'] * 1e3:.1f} ms vs FP32 {o['ort_fp32_s'] * 1e3:.1f} ms: "
                      f"**ratio {o['ort_ratio_ternary_over_fp32']:.2f}** (PyTorch: FP32 {o['torch_fp32_s'] * 1e3:.1f} ms, "
                      f"reference backend {o['torch_reference_ternary_s'] * 1e3:.1f} ms)"]
    if "modulation" in data:
        lines += ["", "## adaLN modulation RMS per block", "",
                  "RMS of the adaLN linear's output / of what reaches the chunk into shift, scale, gate "
                  "(after the RMSNorm where there is one), on 32 noised training images at random t.", "",
                  "| model | " + " | ".join(f"block {i}" for i in range(4)) + " |", "|---|" + "---|" * 4]
        for c, m in data["modulation"].items():
            cells = [f"{a:.3f} / {b:.3f}" for a, b in zip(m["linear"], m["chunk_input"])]
            lines.append(f"| {LABELS.get(c, c)} | " + " | ".join(cells) + " |")
    out = RESULTS.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    # plots
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in TRAINED:
        f = work / f"{c}.json"
        if not f.is_file():
            continue
        curve = torch.tensor(json.loads(f.read_text())["curve"])
        k = 25
        smooth = torch.nn.functional.avg_pool1d(curve[None, None], k, stride=1)[0, 0]
        ax.plot(range(k - 1, len(curve)), smooth, label=LABELS[c])
    ax.set_yscale("log")
    ax.set_xlabel("QAT step")
    ax.set_ylabel("denoising loss (moving mean of 25)")
    ax.axhline(0.02613, color="gray", ls=":", label="FP training loss (final)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS.parent / "terdit_loss_curves.png", dpi=120)
    if "modulation" in data:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharey=True)
        mods = data["modulation"]
        width = 0.8 / max(1, len(mods))
        for j, (c, m) in enumerate(mods.items()):
            for ax, key in zip(axes, ("linear", "chunk_input")):
                ax.bar([i + j * width for i in range(len(m[key]))], m[key], width, label=LABELS.get(c, c))
        axes[0].set_title("adaLN linear output (RMS)")
        axes[1].set_title("modulation at the chunk (RMS)")
        n_blocks = len(next(iter(mods.values()))["linear"])
        for ax in axes:
            ax.set_xlabel("block")
            ax.set_yscale("log")
            ax.set_xticks([i + (len(mods) - 1) * width / 2 for i in range(n_blocks)], [str(i) for i in range(n_blocks)])
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
        fig.tight_layout(rect=(0, 0.14, 1, 1))
        fig.savefig(RESULTS.parent / "terdit_adaln_magnitude.png", dpi=120)
    print(out.read_text())


def ship(config: str, work: Path) -> None:
    """Re-save a trained artefact into the zoo as ``digits-dit-ternary`` (through the public API)."""
    qm = stepq.load(str(work / config))
    target = zoo.CHECKPOINT_DIR / "digits-dit-ternary"
    qm.save(str(target))
    bits = ternary_bits(qm)
    print(f"shipped {config} as {target}: {_dir_bytes(target)} bytes, {bits['bits_per_weight']:.4f} bits/weight "
          f"over {bits['ternary_weights']} ternary weights", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--configs", nargs="+", default=list(TRAINED), choices=list(TRAINED))
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--work", default="/tmp/terdit_work")
    e = sub.add_parser("eval")
    e.add_argument("--configs", nargs="+", default=["fp32", "w4-ptq", "w2-ptq", *TRAINED])
    e.add_argument("--samplers", nargs="+", default=["ddim20"], choices=list(SAMPLERS))
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--work", default="/tmp/terdit_work")
    sh = sub.add_parser("ship")
    sh.add_argument("--config", default="ckpt-rmsnorm", choices=list(TRAINED))
    sh.add_argument("--work", default="/tmp/terdit_work")
    me = sub.add_parser("measure")
    me.add_argument("--configs", nargs="+", default=list(TRAINED))
    me.add_argument("--batch", type=int, default=32)
    me.add_argument("--repeats", type=int, default=20)
    me.add_argument("--work", default="/tmp/terdit_work")
    rp = sub.add_parser("report")
    rp.add_argument("--work", default="/tmp/terdit_work")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.cmd == "train":
        for name in args.configs:
            train(name, args.steps, work)
    elif args.cmd == "eval":
        evaluate(args.configs, args.samplers, args.n, args.seed, work)
    elif args.cmd == "measure":
        measure(args.configs, work, args.batch, args.repeats)
    elif args.cmd == "report":
        report(work)
    elif args.cmd == "ship":
        ship(args.config, work)


if __name__ == "__main__":
    main()
