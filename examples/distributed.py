"""Calibrate and fine-tune a class-conditional DiT on N processes with torch.distributed.

    torchrun --nproc_per_node 8 examples/distributed.py --size dit-xl --samples 256 --steps 50 \\
        --recipe w4a8-qalora --finetune-steps 400 --out out/dit-xl-w4a8

Every rank builds the same model (random weights from one seed here: no weights can be
downloaded; load your checkpoint instead), records its share of the FP trajectories
(``stepq.calibration.collect`` deals the trajectory batches to the ranks), calibrates on it
(``stepq.calibrate`` reduces every observer over the ranks, so all ranks hold the statistics of
all the trajectories), and, for a training recipe, trains with its gradients averaged over the
ranks at every step (``--distributed fsdp``: with the program's parameters sharded by FSDP2 while
it trains); rank 0 saves the compiled model. NCCL when CUDA is available, gloo otherwise.

It prints (rank 0) and writes ``<out>/run.json``: the phases' wall times, the CPU seconds summed
over the ranks, the world size and a checksum of every rank's compiled model (they must agree).

    --size tiny     2 layers, hidden 64, 16x16x4 latents (the test runs this on 2 gloo processes)
    --size dit-s2   DiT-S/2: 12 layers, hidden 384, 6 heads, patch 2, 32x32x4 latents
    --size dit-xl   DiT-XL/2: 28 layers, hidden 1152, 16 heads, patch 2, 32x32x4 latents
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers import DDIMScheduler, DiTTransformer2DModel

import stepq
from stepq.calibration import collect
from stepq.recipe.presets import get_preset

warnings.filterwarnings("ignore")

#: (layers, heads, head dim, latent size)
SIZES = {"tiny": (2, 4, 16, 16), "dit-s2": (12, 6, 64, 32), "dit-xl": (28, 16, 72, 32)}
CLASSES = 1000


def make_model(size: str) -> DiTTransformer2DModel:
    layers, heads, head_dim, sample = SIZES[size]
    torch.manual_seed(0)  # the same random weights on every rank
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                 out_channels=8, num_layers=layers, sample_size=sample, patch_size=2,
                                 num_embeds_ada_norm=CLASSES).eval()


def make_inputs(x: torch.Tensor, t: Any, cond: dict[str, Any]) -> dict[str, Any]:
    t = torch.as_tensor(t).reshape(-1).round().long()
    return {"hidden_states": x, "timestep": t.expand(x.shape[0]) if t.numel() == 1 else t, **cond,
            "return_dict": False}


def conditions(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"class_labels": torch.randint(0, CLASSES, (n,), generator=g)}


def checksum(qm: stepq.QuantizedModel) -> float:
    return float(sum(v.double().sum() for v in qm.gm.state_dict().values() if v.is_floating_point()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--recipe", default="w8a8", help="a stepq preset (a -qalora one fine-tunes)")
    ap.add_argument("--samples", type=int, default=8, help="calibration trajectories, over all ranks")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps per trajectory")
    ap.add_argument("--batch-size", type=int, default=None, help="trajectories per batch (default: samples / ranks)")
    ap.add_argument("--finetune-steps", type=int, default=20, help="QALoRA distillation steps (-qalora recipes)")
    ap.add_argument("--distributed", choices=("ddp", "fsdp"), default="ddp",
                    help="training: replicated parameters with averaged gradients, or FSDP2-sharded ones")
    ap.add_argument("--out", default="out/distributed")
    args = ap.parse_args()

    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = Path(args.out)
    cpu0 = time.process_time()
    times: dict[str, float] = {}

    model = make_model(args.size)
    recipe = get_preset(args.recipe).replace(distributed=args.distributed)
    if recipe.qalora is not None:
        recipe = recipe.replace(qalora=recipe.qalora.replace(steps=args.finetune_steps, batch_size=max(1, 8 // world)))

    t = time.perf_counter()
    sample = SIZES[args.size][3]
    data = collect(model, DDIMScheduler(), num_samples=args.samples, num_inference_steps=args.steps,
                   make_inputs=make_inputs, conditions=conditions, sample_shape=(4, sample, sample), channels=4,
                   batch_size=args.batch_size, seed=0, progress=False)
    times["collect_s"] = time.perf_counter() - t

    t = time.perf_counter()
    prog = stepq.prepare(stepq.capture(model, data[0]), recipe)
    times["capture_prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stepq.calibrate(prog, data, progress=False)
    times["calibrate_s"] = time.perf_counter() - t
    if recipe.qalora is not None or recipe.qat is not None:
        t = time.perf_counter()
        stepq.train(prog, fp_model=model, sampling=data.sampling, progress=False)
        times["train_s"] = time.perf_counter() - t
    qm = stepq.convert(prog)

    cpu = torch.tensor([time.process_time() - cpu0], dtype=torch.float64)
    sums = [torch.tensor([checksum(qm)], dtype=torch.float64) for _ in range(world)]
    if dist.is_initialized():
        dist.all_reduce(cpu)
        dist.all_gather(sums, sums[rank])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        qm.save(str(out / "model"))
        run = {"size": args.size, "recipe": recipe.name, "distributed": recipe.distributed, "world_size": world,
               "samples": args.samples,
               "steps": args.steps, "calls_on_rank0": len(data), **{k: round(v, 3) for k, v in times.items()},
               "cpu_s_all_ranks": round(float(cpu), 3), "checksums": [float(s) for s in sums],
               "stepq": str(Path(stepq.__file__).resolve().parent)}
        (out / "run.json").write_text(json.dumps(run, indent=1))
        print(json.dumps(run))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
