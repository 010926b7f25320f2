"""The cases of tests/test_distributed.py: each runs on one rank's share of the data and returns
tensors (or raises a stepq error). ``run_ranks`` spawns a gloo process group and runs every case on
every rank; calling a case with ``world=1`` (no process group) is the one-process reference.

Kept out of the test module so that ``torch.multiprocessing.spawn`` can import the worker by name.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import calib_set, denoiser_inputs
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import stepq
from stepq.calibration.distributed import reduce_observers, reseed_observers
from stepq.calibration.observers import ActivationObserver
from stepq.compiler.distributed import all_reduce, full_weight, is_dtensor, rank_seed
from stepq.recipe.presets import weight_spec
from stepq.recipe.specs import (
    LayerRule,
    LayerSpec,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PTQDConfig,
    QATConfig,
    QuantSpec,
    Recipe,
    TDQConfig,
)
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

Case = Callable[[int, int], dict[str, torch.Tensor]]

#: the calibration set every case splits: 8 calls of 4 samples, 32 distinct timesteps
FULL = 8


def model(kind: str = "unet") -> torch.nn.Module:
    """The random UNet (its ``down`` / ``up`` are no block names: FSDP2 takes its graph as one unit),
    or with ``"dit"`` the random DiT of depth 2 (``blocks.0``, ``blocks.1``: one unit per block)."""
    return build_random_denoiser(RandomDenoiserConfig(kind=kind, depth=2))


def share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def recipe(observer, *, a_bits: int = 8, **sections) -> Recipe:
    act = QuantSpec(bits=a_bits, signed=False, symmetric=False, observer=observer)
    return Recipe(name=f"dist-{observer.kind}", rules=(LayerRule(spec=None, ops=frozenset({"attention"})),),
                  default=LayerSpec(weight=weight_spec(8), activation=act), **sections)


def _calibrated(r: Recipe, rank: int, world: int, items: list | None = None, kind: str = "unet") -> stepq.Program:
    data = calib_set(FULL) if items is None else items
    prog = stepq.prepare(stepq.capture(model(kind), data[0]), r)
    return stepq.calibrate(prog, share(data, rank, world), progress=False)


def _state(prog_or_gm) -> dict[str, torch.Tensor]:
    gm = getattr(prog_or_gm, "gm", prog_or_gm)
    return {k: v.detach().clone().contiguous() for k, v in gm.state_dict().items()}


def _stats(prog: stepq.Program) -> dict[str, torch.Tensor]:
    out = {}
    for name, st in prog.state.activation_stats.items():
        for f in ("count", "min", "max", "sum", "sumsq"):
            out[f"stats.{name}.{f}"] = getattr(st, f).clone()
    return out


def case_minmax(rank: int, world: int) -> dict[str, torch.Tensor]:
    prog = _calibrated(recipe(MinMaxObserver()), rank, world)
    return {**_state(prog), **_stats(prog)}


def case_minmax_uneven(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank 0 has every call, the other ranks none: the counts carry it."""
    data = calib_set(FULL)
    prog = stepq.prepare(stepq.capture(model(), data[0]), recipe(MinMaxObserver()))
    stepq.calibrate(prog, data if rank == 0 else [], progress=False)
    return {**_state(prog), **_stats(prog)}


def _with_samples(prog: stepq.Program) -> dict[str, torch.Tensor]:
    """The program's buffers, each observer's overall sample (``res.<layer>``) and value count (``n.``)."""
    out = _state(prog)
    for name, st in prog.state.activation_stats.items():
        out[f"res.{name}"] = st.overall.values.clone()
        out[f"n.{name}"] = torch.tensor([st.total])
    return out


def case_percentile(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _with_samples(_calibrated(recipe(PercentileObserver(99.0)), rank, world))


def case_mse(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _with_samples(_calibrated(recipe(MSEObserver(), a_bits=4), rank, world))


def case_reservoir(rank: int, world: int) -> dict[str, torch.Tensor]:
    """An observer fed 2^18 heavy-tailed values (4x its reservoir) at 4 timesteps, split over the ranks."""
    g = torch.Generator().manual_seed(7)
    calls = [(_t3(g, (16, 1024)), torch.tensor([100 * (i % 4)] * 16)) for i in range(16)]

    def observe() -> ActivationObserver:
        obs = ActivationObserver("probe", QuantSpec(bits=8), seed=3)
        reseed_observers([obs])
        for x, t in share(calls, rank, world):
            obs(x, t)
        reduce_observers([obs])
        return obs

    st, again = observe().stats, observe().stats
    out = {"overall": st.overall.values.clone(), "again": again.overall.values.clone(),
           "all": torch.cat([x for x, _ in calls]).reshape(-1)}
    for t in range(4):
        out[f"t{100 * t}"] = st.samples_at(100 * t).clone()
        out[f"all_t{100 * t}"] = torch.cat([x for i, (x, _) in enumerate(calls) if i % 4 == t]).reshape(-1)
    return out


def _t3(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Student-t samples with 3 degrees of freedom (z / sqrt(χ²₃/3)), from ``g``."""
    z = torch.randn(shape, generator=g)
    chi = (torch.randn((3, *shape), generator=g) ** 2).sum(0)
    return z / (chi / 3).sqrt()


def case_ptqd(rank: int, world: int) -> dict[str, torch.Tensor]:
    """PTQD's noise correction on a min-max W8A4 model: the quantized model is the same for any
    number of ranks, so the statistics differ only by the order of the float64 sums."""
    data = calib_set(FULL)
    r = recipe(MinMaxObserver(), a_bits=4, ptqd=PTQDConfig(normality_samples=2000))
    qm = stepq.quantize(model(), data[0], r, calibration=share(data, rank, world), progress=False)
    return {f"ptqd.{k}": v.clone() for k, v in qm.program.state.ptqd.tensors().items()}


def case_ptqd_mixed(rank: int, world: int) -> dict[str, torch.Tensor]:
    """PTQD's step-aware bit selection (4 / 8-bit activations): the 4-bit scales come from an MSE
    search on the merged reservoirs, so SNR^Q and the bits are compared within sampling tolerance."""
    data = calib_set(FULL)
    r = recipe(MinMaxObserver(), ptqd=PTQDConfig(mixed_bits=(4, 8), normality_samples=200))
    qm = stepq.quantize(model(), data[0], r, calibration=share(data, rank, world), progress=False)
    mp = qm.program.state.ptqd_bits
    return {"bits": mp.table.clone(), "snr_q": mp.snr_q.clone(), "visited": mp.visited.clone()}


def case_tdq(rank: int, world: int, seed: int = 0) -> dict[str, torch.Tensor]:
    r = recipe(PercentileObserver(99.0), tdq=TDQConfig(fit_steps=8, fit_batch=4, fit_rows=2, seed=seed))
    data = calib_set(FULL)
    prog = stepq.prepare(stepq.capture(model(), data[0]), r)
    stepq.calibrate(prog, share(data, rank, world), progress=False)
    qm = stepq.convert(prog, report=False)
    return {k: v for k, v in _state(qm.program).items() if "table" in k or "scale" in k}


def qat_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    x = denoiser_inputs(8, range(0, 800, 100), seed=11)
    return x, torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(12))


@contextmanager
def _watch_optimizer(out: dict[str, torch.Tensor], prefix: str = ""):
    """Record what the first optimizer step stepped on (keys ``<prefix>opt.*``): ``sharded``
    parameters (DTensors), their ``sharded_numel`` elements in all, the ``replicated_numel`` of
    the others, and the most elements any one rank holds (``local_max``: the optimizer states are
    that size)."""
    key = f"{prefix}opt."

    def hook(opt, args, kwargs):
        if f"{key}sharded" in out:
            return
        ps = [p for g in opt.param_groups for p in g["params"]]
        sharded = [p for p in ps if is_dtensor(p)]
        out[f"{key}sharded"] = torch.tensor(len(sharded))
        out[f"{key}sharded_numel"] = torch.tensor(sum(p.numel() for p in sharded))
        out[f"{key}replicated_numel"] = torch.tensor(sum(p.numel() for p in ps if not is_dtensor(p)))
        local = sum((p.to_local() if is_dtensor(p) else p).numel() for p in ps)
        out[f"{key}local_max"] = all_reduce(torch.tensor(local), dist.ReduceOp.MAX)

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _layout(gm: torch.nn.Module) -> dict[str, tuple]:
    """Every module's class, attribute names and hooks: what ``fully_shard`` changes."""
    return {name: (type(m), sorted(vars(m)), {k: sorted(v) for k, v in vars(m).items()
                                              if "hooks" in k and isinstance(v, dict)})
            for name, m in gm.named_modules()}


@contextmanager
def _watch_units(out: dict[str, torch.Tensor]):
    """Record, over the forwards in the body, the FSDP2 units whose forward ran (``units``), the bytes
    of the parameters FSDP2 shards (``unsharded_total``: every parameter that is a DTensor when the
    root's forward starts) and the most of those bytes unsharded at once (``unsharded_peak``).

    Measured in global forward hooks, which run before a module's own: at a unit's post-forward
    FSDP2 has not resharded it yet. The unsharded bytes are those of the plain (not DTensor)
    parameters of dim ≥ 1 beyond the ones plain from the start (the parameters FSDP2 ignores)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    root: list[torch.nn.Module] = []
    units: set[int] = set()
    seen = {"peak": 0, "total": 0, "plain": 0}

    def plain(m: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters() if not is_dtensor(p) and p.dim() > 0)

    def pre(m, args):
        if isinstance(m, FSDPModule) and not root:
            root.append(m)
            seen["total"] = sum(p.numel() * p.element_size() for p in m.parameters() if is_dtensor(p))
            seen["plain"] = plain(m)

    def post(m, args, result):
        if isinstance(m, FSDPModule) and root:
            units.add(id(m))
            seen["peak"] = max(seen["peak"], plain(root[0]) - seen["plain"])

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    out["units"] = torch.tensor(len(units))
    out["unsharded_peak"], out["unsharded_total"] = torch.tensor(seen["peak"]), torch.tensor(seen["total"])


def _qat_step(rank: int, world: int, distributed: str, kind: str = "unet"
              ) -> tuple[stepq.Program, dict[str, torch.Tensor], dict[str, tuple]]:
    """One LSQ QAT step; the program, the tensors of ``case_qat_step``, the layout before training."""
    r = recipe(MinMaxObserver(), a_bits=8, qat=QATConfig(steps=1, lr=1e-3, scale_lr=1e-3, batch_size=8))
    prog = _calibrated(r.replace(distributed=distributed), 0, 1, kind=kind)  # every rank calibrates on all the data
    inputs, target = qat_batch()
    k = 8 // world
    rows = slice(rank * k, (rank + 1) * k)
    mine = ({n: v[rows] for n, v in inputs.items()}, target[rows])
    grads: dict[str, torch.Tensor] = {}

    def hook(opt, args, kwargs):
        names = {id(p): n for n, p in prog.gm.named_parameters()}  # step sizes became parameters by now
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:  # a sharded gradient (FSDP2) is gathered: a collective, every rank here
                    grads[f"grad.{names.get(id(p), '?')}"] = full_weight(p.grad.detach()).clone()

    layout = _layout(prog.gm)
    watched: dict[str, torch.Tensor] = {}
    handle = register_optimizer_step_pre_hook(hook)
    try:
        with _watch_optimizer(watched), _watch_units(watched):
            stepq.train(prog, itertools.repeat(mine), progress=False)
    finally:
        handle.remove()
    after = {f"param.{n}": p.detach().clone() for n, p in prog.gm.named_parameters()}
    if distributed == "ddp":  # case_qat_step's tensors as they were
        watched = {}
    return prog, {**grads, **after, **watched, "loss": torch.tensor(prog.state.qat_curve)}, layout


def case_qat_step(rank: int, world: int) -> dict[str, torch.Tensor]:
    """One LSQ QAT step on this rank's rows of one batch of 8; the gradients the optimizer stepped with."""
    return _qat_step(rank, world, "ddp")[1]


def case_qat_step_dit(rank: int, world: int) -> dict[str, torch.Tensor]:
    """``case_qat_step`` on the random DiT (two blocks)."""
    return _qat_step(rank, world, "ddp", "dit")[1]


def _qat_step_fsdp(rank: int, world: int, kind: str) -> dict[str, torch.Tensor]:
    """``case_qat_step`` with ``Recipe.distributed = "fsdp"``; then what is left of FSDP in the program
    (``trace.*``: counts that must be 0), and the converted model's output before and after save → load
(the ONNX export reads the same converted program; it is left out here for its 6 s per rank)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    prog, out, before = _qat_step(rank, world, "fsdp", kind)
    gm = prog.gm
    tensors = [*gm.parameters(), *gm.buffers(), *gm.state_dict().values()]
    after = _layout(gm)
    out["trace.dtensors"] = torch.tensor(sum(isinstance(t, DTensor) for t in tensors))
    out["trace.fsdp_modules"] = torch.tensor(sum(isinstance(m, FSDPModule) for m in gm.modules()))
    out["trace.changed_modules"] = torch.tensor(sum(after.get(k) != v for k, v in before.items()) + len(after.keys() - before))
    out["trace.requires_grad"] = torch.tensor(sum(p.requires_grad for p in gm.parameters()))
    qm = stepq.convert(prog, report=False)
    x = denoiser_inputs(2, (30, 700), seed=4)
    out["converted"] = qm(**x)
    with tempfile.TemporaryDirectory() as d:
        qm.save(str(Path(d) / "m"))
        out["reloaded"] = stepq.load(str(Path(d) / "m"))(**x)
    return out


def case_qat_step_fsdp(rank: int, world: int) -> dict[str, torch.Tensor]:
    """``_qat_step_fsdp`` on the random UNet: one FSDP2 unit (no block names)."""
    return _qat_step_fsdp(rank, world, "unet")


def case_qat_step_fsdp_dit(rank: int, world: int) -> dict[str, torch.Tensor]:
    """``_qat_step_fsdp`` on the random DiT: one FSDP2 unit per block, then the split graph's root."""
    return _qat_step_fsdp(rank, world, "dit")


#: the two ways a training loop runs under a process group; the pair cases run both on copies of one program
MODES = ("ddp", "fsdp")


def case_tdq_fit(rank: int, world: int) -> dict[str, torch.Tensor]:
    """TDQ fits on copies of one calibrated program (min-max calibration on this rank's share: the
    same scales on any number of ranks), once per mode (``<mode>.*``): 3 steps on the network output,
    then 2 on the layer-wise objective (the scale source called by an fx Interpreter, not by the
    graph's forward); the scale source after each."""
    from stepq.methods.tdq.fit import fit_scale_source

    prog = _calibrated(recipe(MinMaxObserver(), tdq=TDQConfig(fit_steps=0)), rank, world)
    items = share(calib_set(FULL), rank, world)
    out: dict[str, torch.Tensor] = {}
    for mode in MODES:
        p = prog.copy()
        src = p.gm.get_submodule("activation_scale_source")
        got: dict[str, torch.Tensor] = {}
        for objective, steps in (("output", 3), ("layer", 2)):
            with _watch_optimizer(got, prefix=f"{objective}."):
                curve = fit_scale_source(p, items, steps=steps, lr=5e-3, batch=2, rows=2, objective=objective,
                                         distributed=mode, progress=False).curve
            got.update({f"{objective}.source.{k}": v.detach().clone() for k, v in src.state_dict().items()})
            got[f"{objective}.curve"] = torch.tensor(curve, dtype=torch.float64)
        out.update({f"{mode}.{k}": v for k, v in got.items()})
    return out


def case_qalora(rank: int, world: int) -> dict[str, torch.Tensor]:
    """3 QALoRA distillation steps (TALSQ tables, weight steps, adapters) along this rank's
    trajectories, on copies of one calibrated program, once per mode (``<mode>.*``). ``borrowed_kept``:
    the parameters borrowed from the teacher that are the same objects after training (FSDP leaves
    them unsharded)."""
    from diffusers import DDIMScheduler

    from stepq.calibration import Sampling
    from stepq.recipe.presets import qalora_recipe
    from stepq.testing.random_models import RandomDenoiserConfig as Cfg

    cfg = Cfg(kind="dit", depth=1)
    m = build_random_denoiser(cfg)
    data = calib_set(3)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), qalora_recipe(4, 8, talsq=True, steps=3,
                                                                                  batch_size=2)), data, progress=False)
    teacher = {k: v.clone() for k, v in m.state_dict().items()}
    sampling = Sampling(DDIMScheduler(num_train_timesteps=1000), 3, (cfg.channels, cfg.size, cfg.size), eta=0.0)
    out: dict[str, torch.Tensor] = {}
    for mode in MODES:
        p = prog.copy()
        p.recipe = p.recipe.replace(distributed=mode)
        storages = p.borrowed.storages()
        borrowed = {n: t for n, t in p.gm.named_parameters() if p.borrowed.is_borrowed(t, storages)}
        got: dict[str, torch.Tensor] = {}
        with _watch_optimizer(got):
            stepq.train(p, fp_model=m, sampling=sampling, progress=False)
        got.update({f"state.{k}": v.detach().clone() for k, v in p.gm.state_dict().items()})
        got["curve"] = torch.tensor(p.state.distill_curve, dtype=torch.float64)
        got["teacher_changed"] = torch.tensor(sum(not torch.equal(v, teacher[k]) for k, v in m.state_dict().items()))
        got["borrowed"] = torch.tensor(len(borrowed))
        got["borrowed_kept"] = torch.tensor(sum(p.gm.get_parameter(n) is t for n, t in borrowed.items()))
        out.update({f"{mode}.{k}": v for k, v in got.items()})
    return out


def case_ternary(rank: int, world: int) -> dict[str, torch.Tensor]:
    """2 steps of TerDiT's ternary QAT (the gradient clipped over shards and the replicated 0-dim α)
    on a tiny DiT, each rank on its own batches, on copies of one program, once per mode."""
    import dataclasses

    r = stepq.get_preset("ternary-dit")
    # a clip far below the gradient's norm (≈ 1 here): every step is clipped
    r = r.replace(qat=dataclasses.replace(r.qat, steps=2, batch_size=4),
                  terdit=dataclasses.replace(r.terdit, grad_clip=1e-2))
    data = calib_set(1)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(build_random_denoiser(RandomDenoiserConfig(kind="dit",
                                                                                               depth=1)), data[0]), r),
                           data, progress=False)
    out: dict[str, torch.Tensor] = {}
    for mode in MODES:
        p = prog.copy()
        p.recipe = p.recipe.replace(distributed=mode)
        x = denoiser_inputs(4, range(0, 400, 100), seed=rank_seed(11))
        eps = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(rank_seed(12)))
        got: dict[str, torch.Tensor] = {}
        with _watch_optimizer(got):
            stepq.train(p, itertools.repeat((x, eps)), progress=False)
        got.update({f"state.{k}": v.detach().clone() for k, v in p.gm.state_dict().items()})
        got["curve"] = torch.tensor(p.state.qat_curve, dtype=torch.float64)
        out.update({f"{mode}.{k}": v for k, v in got.items()})
    return out


def case_collect(rank: int, world: int) -> dict[str, torch.Tensor]:
    from diffusers import DDIMScheduler

    def make(x, t, cond):
        return {"sample": x, "timestep": torch.as_tensor(t).reshape(-1).expand(x.shape[0]).round().long()}

    data = stepq.calibration.collect(model(), DDIMScheduler(), num_samples=6, num_inference_steps=3, batch_size=2,
                                     make_inputs=make, sample_shape=(4, 8, 8), seed=5, progress=False)
    out = {"n": torch.tensor([len(data)])}
    if len(data):
        out["sample"] = torch.stack([d["sample"] for d in data])
        out["timestep"] = torch.stack([d["timestep"] for d in data])
    return out


def case_dtensor(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Per-channel and per-group weight scales of a weight sharded along its input columns (FSDP2
    shards dim 0; columns are the hard case: every channel's range spans the shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stepq.calibration.qparams import weight_qparams
    from stepq.recipe.specs import PerGroup

    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 32)
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        w = distribute_tensor(w, mesh, [Shard(1)])
    out = {}
    for name, spec in [("channel", weight_spec(4)), ("group", QuantSpec(bits=4, granularity=PerGroup(8, axis=1)))]:
        s, z, _, _ = weight_qparams(w, spec)
        out[f"{name}.scale"], out[f"{name}.zero_point"] = s, z
    return out


def case_nan(rank: int, world: int) -> dict[str, torch.Tensor]:
    """A NaN in the last rank's share (its second call, sample 1 at timestep 456)."""
    data = calib_set(4)
    bad = denoiser_inputs(2, (123, 456))
    bad["sample"][1, 0, 0, 0] = float("nan")
    items = share(data, rank, world) + ([bad] if rank == world - 1 else [])
    prog = stepq.prepare(stepq.capture(model(), data[0]), recipe(MinMaxObserver()))
    stepq.calibrate(prog, items, progress=False)
    return {}


CASES: dict[str, Case] = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def _worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    errors: dict[str, str] = {}
    try:
        for name in names:
            try:
                start = time.perf_counter()
                tensors = CASES[name](rank, world)
                tensors["seconds"] = torch.tensor([time.perf_counter() - start])
                save_file(tensors, str(Path(out) / f"{name}.{rank}.safetensors"))
            except stepq.StepqError as e:
                errors[name] = f"{type(e).__name__}: {e}"
            except Exception:
                errors[name] = "UNEXPECTED " + traceback.format_exc()
    finally:
        (Path(out) / f"errors.{rank}.json").write_text(json.dumps(errors))
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(names: list[str], out: Path, world: int = 2, timeout: float = 240.0) -> None:
    """Run the cases ``names`` on ``world`` gloo ranks; results under ``out``. Raises when a rank
    does not finish within ``timeout`` seconds (a deadlock) or dies."""
    ctx = mp.start_processes(_worker, args=(world, free_port(), str(out), names), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {world} ranks did not finish within {timeout:.0f}s (deadlock?)")


def load(out: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{name}.{rank}.safetensors"))


def errors(out: Path, rank: int) -> dict[str, str]:
    return json.loads((out / f"errors.{rank}.json").read_text())
