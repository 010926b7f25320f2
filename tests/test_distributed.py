"""Calibration, PTQD statistics, collect and a training step on 2 gloo ranks against one process.

One spawn of 2 processes (``dist_cases.run_ranks``) runs a group of cases; each test compares a
case's result on the ranks with the same case run here, without a process group, on all the data.
Both sides run on one thread: a convolution's accumulation order depends on the thread count, and
the min-max comparison is bit for bit.

Tolerances where the reservoirs' sampling enters (layers that saw more values than their
reservoir's K = 65536; the others keep every value and match exactly):

* percentile: the two runs' reservoirs are independent samples of K values of one population, so
  the rank of a sample quantile has standard deviation sqrt(q(1 − q)/K) in each; the 2-rank
  sample's q-quantile must lie within 4·√2 of those standard deviations (in rank) of the
  one-process sample's;
* MSE: the search picks one of 80 clipping ratios in [0.2, 1] (steps of 1%); the scales may move by
  two steps plus what the sample's extremes move: 3%, and a zero point by one level;
* TDQ: the fit draws other mini-batches on 2 ranks (each from its share), so its tables are compared
  with the spread of the one-process fit over seeds: gap = max |table − one-process table|, as a ratio
  to the gap of a one-process fit with another seed; ≤ 1 on average over the tables, ≤ 2 for each;
* PTQD bit selection: the 4-bit scales of each step range come from an MSE search on the merged
  per-timestep reservoirs (512 values each), so SNR^Q at 4 bits moves by up to ≈10% (measured): within
  15%, and the same bits at every timestep.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from dist_cases import CASES, errors, load, model, run_ranks
from helpers import calib_set

WORLD = 2
RESERVOIR = 1 << 16
FAST = ["minmax", "minmax_uneven", "reservoir", "ptqd", "qat_step", "collect", "dtensor", "nan"]  # the error case last
SLOW = ["percentile", "mse", "ptqd_mixed", "tdq"]
#: FSDP2 training (Recipe.distributed = "fsdp"), each loop beside its "ddp" run on the same 2 ranks
FSDP = ["qat_step_fsdp", "qat_step_fsdp_dit", "tdq_fit", "qalora", "ternary"]


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spawn(tmp_path_factory, names):
    out = tmp_path_factory.mktemp("dist")
    run_ranks(names, out, world=WORLD, timeout=300)  # a deadlock fails here, after 300 s
    for r in range(WORLD):
        unexpected = {k: v for k, v in errors(out, r).items() if k != "nan"}
        assert not unexpected, f"rank {r} failed: {unexpected}"
    return out


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    return _spawn(tmp_path_factory, FAST)


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    return _spawn(tmp_path_factory, SLOW)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _spawn(tmp_path_factory, FSDP)


def _ranks(out, name):
    """Rank 0's result, after checking that every rank holds the same, bit for bit."""
    a, b = load(out, name, 0), load(out, name, 1)
    a.pop("seconds"), b.pop("seconds")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}: the ranks disagree on {k}"
    return a


def _reference(name, **kw):
    return _here(name, 0, 1, tuple(sorted(kw.items())))


@functools.cache
def _here(name, rank, world, kw):
    """A case run in this process, without a process group, once per session (the tests only read
    the result): ``world=1`` is the one-process reference, ``rank, world`` one rank's share alone."""
    return CASES[name](rank, world, **dict(kw))


def test_minmax_scales_are_bit_identical_to_one_process(fast, one_thread):
    got, ref = _ranks(fast, "minmax"), _reference("minmax")
    assert got.keys() == ref.keys()
    assert any(k.endswith("input_scale") for k in got)
    for k in ref:
        if k.endswith((".sum", ".sumsq")):  # float64 sums in another order
            torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=0)
        else:  # scales, zero points, weights, counts, min, max
            assert torch.equal(got[k], ref[k]), k


def test_a_rank_without_data_is_carried_by_the_counts(fast, one_thread):
    got, ref = _ranks(fast, "minmax_uneven"), _reference("minmax")
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_merged_reservoirs_are_a_sample_of_all_the_ranks_data(fast):
    got = _ranks(fast, "reservoir")
    assert torch.equal(got["overall"], got["again"])  # deterministic for a seed and a world size
    for key, size in [("overall", RESERVOIR)] + [(f"t{100 * t}", 512) for t in range(4)]:
        sample, population = got[key], got["all" if key == "overall" else f"all_{key}"]
        assert sample.numel() == size < population.numel()
        assert torch.isin(sample, population).all()
        srt = population.sort().values
        for q in (0.01, 0.1, 0.5, 0.9, 0.99):
            rank = torch.searchsorted(srt, sample.quantile(q)).item() / srt.numel()
            assert abs(rank - q) <= 4 * math.sqrt(q * (1 - q) / size), (key, q, rank)


def test_ptqd_statistics_equal_one_process(fast, one_thread):
    got, ref = _ranks(fast, "ptqd"), _reference("ptqd")
    assert got.keys() == ref.keys() and "ptqd.k" in got
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    assert int(got["ptqd.visited"].sum()) == 32


LR = 1e-3  # the QAT case's lr and scale_lr


def _check_adam_first_step(got, ref):
    """Adam's first step moves each element by lr·g/(|g| + ε) (ε = 1e-8): ±lr wherever |g| ≫ ε, so
    parameters agree within 1% of the lr where the one-process gradient is ≥ 1e-6; where it is
    smaller the step amplifies the gradients' 1e-4 relative difference (measured on the AMD machine:
    one element of 18,432 in down.0.conv1.weight, |g| = 5e-9, moved 1.8e-5 apart), and only the bound
    of the step itself holds: within lr."""
    for k in ref:
        if not k.startswith("param."):
            continue
        diff = (got[k] - ref[k]).abs()
        g = ref.get(f"grad.{k[6:]}")
        sharp = g.abs() >= 1e-6 if g is not None else torch.ones_like(diff, dtype=torch.bool)
        assert (diff[sharp] <= 1e-5).all(), k
        assert diff.max() <= LR, k


def test_one_training_step_on_2_ranks_is_the_step_on_the_concatenated_batch(fast, one_thread):
    got, ref = _ranks(fast, "qat_step"), _reference("qat_step")
    assert got.keys() == ref.keys()
    grads = [k for k in ref if k.startswith("grad.")]
    assert any("weight_scale" in k for k in grads) and any("input_scale" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-7, msg=k)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=0)
    _check_adam_first_step(got, ref)
    # and not the step on one rank's half of the batch (what a rank would take without the all-reduce)
    half = _here("qat_step", 0, 2, ())
    assert any(not torch.allclose(got[k], half[k], rtol=1e-3) for k in grads)


def test_collect_deals_the_batches_to_the_ranks(fast):
    from safetensors.torch import load_file

    shares = [load_file(str(fast / f"collect.{r}.safetensors")) for r in range(WORLD)]
    ref = _reference("collect")
    steps = 3
    assert [int(s["n"]) for s in shares] == [2 * steps, steps]  # batches 0, 2 and batch 1
    batches = ref["sample"].split(steps)
    assert torch.equal(shares[0]["sample"], torch.cat([batches[0], batches[2]]))
    assert torch.equal(shares[1]["sample"], batches[1])


def test_weight_scales_of_a_sharded_weight_are_the_full_weights(fast):
    got, ref = _ranks(fast, "dtensor"), _reference("dtensor")
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    # what a rank would compute on its own shard of the columns is another scale
    from stepq.calibration.qparams import weight_qparams
    from stepq.recipe.presets import weight_spec

    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 32)
    assert not torch.allclose(weight_qparams(w[:, :16], weight_spec(4))[0], ref["channel.scale"])


def test_a_nan_on_rank_1_raises_on_every_rank_without_deadlock(fast):
    for r in range(WORLD):
        msg = errors(fast, r)["nan"]
        assert re.match(r"CalibrationError: 1 of 2 ranks failed: rank 1: non-finite values .* layer "
                        r"'conv_in.input' at timestep 456", msg), msg


@pytest.mark.slow
def test_percentile_scales_within_the_reservoirs_sampling_tolerance(slow, one_thread):
    got, ref = _ranks(slow, "percentile"), _reference("percentile")
    sampled = 0
    for k in ref:
        if not k.startswith("res."):
            continue
        layer = k[4:]
        a, b = got[k], ref[k]
        if int(got[f"n.{layer}"]) <= RESERVOIR:  # the reservoir kept everything: exact
            assert torch.equal(a.sort().values, b.sort().values), layer
            for s in ("scale", "zero_point"):
                assert torch.equal(got[f"{layer}_{s}"], ref[f"{layer}_{s}"]), layer
            continue
        sampled += 1
        srt = b.sort().values
        for q in (0.01, 0.99):
            rank = torch.searchsorted(srt, a.quantile(q)).item() / srt.numel()
            assert abs(rank - q) <= 4 * math.sqrt(2 * q * (1 - q) / RESERVOIR), (layer, q, rank)
    assert sampled >= 3


@pytest.mark.slow
def test_mse_scales_within_the_search_grid(slow, one_thread):
    got, ref = _ranks(slow, "mse"), _reference("mse")
    for k in ref:
        if k.endswith("input_scale"):
            torch.testing.assert_close(got[k], ref[k], rtol=0.03, atol=0, msg=k)
        elif k.endswith("input_zero_point"):
            assert (got[k] - ref[k]).abs().max() <= 1, k
        elif not k.startswith(("res.", "n.")):
            assert torch.equal(got[k], ref[k]), k


@pytest.mark.slow
def test_ptqd_bit_selection_matches_one_process(slow, one_thread):
    got, ref = _ranks(slow, "ptqd_mixed"), _reference("ptqd_mixed")
    assert torch.equal(got["bits"], ref["bits"]) and torch.equal(got["visited"], ref["visited"])
    v = ref["visited"]
    torch.testing.assert_close(got["snr_q"][:, v], ref["snr_q"][:, v], rtol=0.15, atol=0)


@pytest.mark.slow
def test_tdq_tables_within_the_one_process_spread_over_seeds(slow, one_thread):
    got, ref, other = _ranks(slow, "tdq"), _reference("tdq"), _reference("tdq", seed=1)
    tables = [k for k in ref if k.endswith("input_scale_table")]
    assert tables
    ratios = {k: float((got[k] - ref[k]).abs().max() / (other[k] - ref[k]).abs().max()) for k in tables}
    assert max(ratios.values()) <= 2.0, ratios
    assert sum(ratios.values()) / len(ratios) <= 1.0, ratios


@pytest.mark.slow
def test_the_documented_torchrun_command_runs_on_2_gloo_processes(tmp_path):
    """docs/DISTRIBUTED.md's command at the tiny size: calibrate + QALoRA fine-tune on 2 ranks."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import stepq

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "examples" / "distributed.py"), "--size", "tiny", "--samples", "4", "--steps", "3",
           "--batch-size", "2", "--recipe", "w4a8-qalora", "--finetune-steps", "2", "--out", str(out)]
    # this checkout's stepq, whatever the environment has installed (the script's folder is examples/)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    # a session of its own, so that a hang is ended with every rank torchrun started, not only torchrun
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert Path(run["stepq"]) == root / "stepq"
    # 4 trajectories in batches of 2: rank 0 records batch 0, 3 steps (one process: 6 calls). Batches of 1
    # would capture the model at batch 1, which torch.export specializes (training at batch 4 then fails)
    assert run["world_size"] == 2 and run["calls_on_rank0"] == 3
    assert run["checksums"][0] == run["checksums"][1]  # both ranks compiled the same model
    assert run["calibrate_s"] > 0 and run["train_s"] > 0
    qm = stepq.load(str(out / "model"))
    x = {"hidden_states": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([10, 900]),
         "class_labels": torch.tensor([1, 2]), "return_dict": False}
    y = qm(**x)
    assert torch.isfinite(y[0]).all() and y[0].shape == (2, 8, 16, 16)


def _sharded(got, prefix="", world=WORLD):
    """The optimizer stepped on FSDP2 shards: some parameters are DTensors, and no rank holds more
    than its 1/world of them (plus the row split's rounding: ≤ 0.6 at 2 ranks) beside the replicated ones."""
    opt = {k[len(prefix) + 4:]: int(v) for k, v in got.items() if k.startswith(f"{prefix}opt.")}
    assert opt["sharded"] > 0, prefix
    local = opt["local_max"] - opt["replicated_numel"]
    assert local <= 0.6 * opt["sharded_numel"] * 2 / world, (prefix, local, opt["sharded_numel"])
    return opt


#: the FSDP QAT step's models: the UNet (one FSDP2 unit: no block names) and the DiT (one unit per block)
QAT_MODELS = pytest.mark.parametrize("kind", ["", "_dit"], ids=["unet", "dit"])


@QAT_MODELS
def test_an_fsdp_qat_step_on_2_ranks_is_the_step_on_the_concatenated_batch(fsdp, one_thread, kind):
    """As the DDP step (the same tolerances): FSDP2 all-gathers the weights for the forward and
    reduce-scatters the mean gradient; the 0-dim step sizes stay replicated and are averaged."""
    got, ref = _ranks(fsdp, f"qat_step_fsdp{kind}"), _reference(f"qat_step{kind}")
    _sharded(got)
    assert int(got["opt.replicated_numel"]) > 0  # the per-tensor (0-dim) activation steps
    grads = [k for k in ref if k.startswith("grad.")]
    assert any("weight_scale" in k for k in grads) and any("input_scale" in k for k in grads)
    assert sorted(grads) == sorted(k for k in got if k.startswith("grad."))
    for k in grads:  # the LSQ gradient scale applied to the sharded step sizes too
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-7, msg=k)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=0)
    _check_adam_first_step(got, ref)
    half = _here(f"qat_step{kind}", 0, 2, ())  # one rank's half of the batch: what a missing reduction would give
    assert any(not torch.allclose(got[k], half[k], rtol=1e-3) for k in grads)


def test_an_fsdp_dit_gathers_one_block_at_a_time(fsdp):
    """The DiT's graph is split per block: its 2 blocks and the split graph's root are FSDP2 units
    whose forward runs, and at no point of the forward are all the sharded parameters whole. The
    root (patch embedding, timestep MLP, final linear: 3,184 weight and bias elements and 112
    per-channel step sizes) stays gathered for the forward, each block (12,640 and 352) is gathered
    for its own forward only: the peak is the root and one block, 16,288 of 29,280 elements (55.6%
    of the sharded bytes; at depth d it would be (3,296 + 12,992) / (3,296 + d·12,992)). The UNet
    (no block names) is one unit: 100%."""
    dit, unet = _ranks(fsdp, "qat_step_fsdp_dit"), _ranks(fsdp, "qat_step_fsdp")
    assert int(dit["units"]) == 3 and int(unet["units"]) == 1
    assert int(unet["unsharded_peak"]) == int(unet["unsharded_total"]) > 0
    peak, total = int(dit["unsharded_peak"]), int(dit["unsharded_total"])
    assert total == 4 * (3_184 + 112 + 2 * (12_640 + 352))  # float32 bytes: every weight, bias, per-channel step
    assert peak == 4 * (3_184 + 112 + 12_640 + 352), peak / total


@QAT_MODELS
def test_after_fsdp_training_the_program_is_a_plain_program_that_converts(fsdp, one_thread, kind):
    got, ref = _ranks(fsdp, f"qat_step_fsdp{kind}"), _reference(f"qat_step_fsdp{kind}")
    for k in ("trace.dtensors", "trace.fsdp_modules", "trace.changed_modules", "trace.requires_grad"):
        assert int(got[k]) == 0, k  # no DTensor, no FSDP class, classes / attributes / hooks as before
    param_keys = {k for k in got if k.startswith("param.")}
    assert param_keys == {k for k in ref if k.startswith("param.")}  # every parameter back under its name
    assert torch.equal(got["converted"], got["reloaded"])  # save → load is exact
    # a weight one Adam step moved by ≤ lr can cross a rounding boundary of its integer grid; measured 1.1e-3
    err = float((got["converted"] - ref["converted"]).norm() / ref["converted"].norm())
    assert err < 1e-2, err


def test_without_a_process_group_fsdp_runs_as_one_process(one_thread):
    got, ref = _reference("qat_step_fsdp"), _reference("qat_step")
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert int(got["opt.sharded"]) == 0


def _modes(out, name):
    """A pair case's "fsdp" and "ddp" runs (on copies of one program on the same 2 ranks), after
    checking that they are bit-identical but for what the optimizer stepped on (``opt.*``).

    Bit-identical: with 2 ranks, FSDP2's reduce-scatter and the all-reduce add the same two
    gradients and divide by 2 (exact), the forward reads the all-gathered copy of the very same
    values, and Adam is elementwise (measured: equal)."""
    both = _ranks(out, name)
    fsdp = {k[5:]: v for k, v in both.items() if k.startswith("fsdp.")}
    ddp = {k[4:]: v for k, v in both.items() if k.startswith("ddp.")}
    keys = [k for k in ddp if ".opt." not in f".{k}"]
    assert keys == [k for k in fsdp if ".opt." not in f".{k}"]
    for k in keys:
        assert torch.equal(fsdp[k], ddp[k]), k
    return fsdp, ddp


def test_an_fsdp_tdq_fit_equals_the_ddp_fit(fsdp):
    got, ddp = _modes(fsdp, "tdq_fit")  # the network-output objective (graph forward), then the layer-wise one
    for objective in ("output.", "layer."):
        _sharded(got, objective)  # the scale source (its generators' stacked weights) sharded
        assert int(ddp[f"{objective}opt.sharded"]) == 0
    assert len(got["output.curve"]) == 3 and len(got["layer.curve"]) == 2
    source = [k[len("layer."):] for k in got if k.startswith("layer.source.")]
    assert source and any(not torch.equal(got[f"output.{k}"], got[f"layer.{k}"]) for k in source)  # both fits trained


def test_an_fsdp_qalora_distillation_equals_the_ddp_one_and_keeps_the_teacher(fsdp):
    got, ddp = _modes(fsdp, "qalora")
    _sharded(got)  # adapters, TALSQ tables (clamped beside replicated bounds), weight steps
    assert int(ddp["opt.sharded"]) == 0
    assert int(got["teacher_changed"]) == 0
    assert int(got["borrowed"]) > 0 and int(got["borrowed_kept"]) == int(got["borrowed"])  # never sharded


def test_fsdp_ternary_qat_matches_ddp_with_clipping_over_shards(fsdp):
    """TerDiT's loop clips the global gradient norm (here every step: clip 1e-2, norm ≈ 1), which
    over shards is summed in another order: the runs agree within rounding. Measured ≤ 1.5e-8
    absolute after 2 Adam steps of lr 2e-4; allowed 1% of the lr, for elements whose |g| is near
    Adam's ε, where the clipping coefficient's last bits move the step (1.1e-6 on the diffusers tiny DiT)."""
    both = _ranks(fsdp, "ternary")
    got = {k[5:]: v for k, v in both.items() if k.startswith("fsdp.")}
    ref = {k[4:]: v for k, v in both.items() if k.startswith("ddp.")}
    opt = _sharded(got)
    assert opt["replicated_numel"] > 0 and int(ref["opt.sharded"]) == 0  # the 0-dim α stay replicated
    torch.testing.assert_close(got["curve"], ref["curve"], rtol=1e-6, atol=0)
    for k in ref:
        if k.startswith("state."):
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-6, msg=k)


def test_a_bad_distributed_setting_is_a_recipe_error():
    import stepq
    from stepq.compiler.fsdp import MODES
    from stepq.methods.qat import train_qat
    from stepq.recipe.specs import DISTRIBUTED_MODES, Recipe

    assert MODES == DISTRIBUTED_MODES == ("ddp", "fsdp")
    with pytest.raises(stepq.RecipeError, match=r"^Recipe.distributed must be one of 'ddp', 'fsdp', got 'zero3'$"):
        Recipe(name="r", distributed="zero3")
    with pytest.raises(stepq.RecipeError, match="got 'zero3'"):
        Recipe.from_dict({"name": "r", "distributed": "zero3"})
    r = Recipe(name="r", distributed="fsdp")
    assert Recipe.from_dict(r.to_dict()) == r and "distributed" not in Recipe(name="r").to_dict()
    prog = stepq.calibrate(stepq.prepare(stepq.capture(model(), calib_set(1)[0]), "w8a8"), calib_set(1),
                           progress=False)
    with pytest.raises(stepq.RecipeError, match=r"^distributed must be one of 'ddp', 'fsdp', got 'FSDP'$"):
        train_qat(prog, iter(()), steps=1, distributed="FSDP")
    assert not any(p.requires_grad for p in prog.gm.parameters())  # raised before anything was made trainable


def test_without_a_process_group_every_collective_is_the_identity():
    from stepq.compiler import distributed as d

    assert not d.is_distributed() and d.rank() == 0 and d.world_size() == 1 and d.rank_seed(5) == 5
    t = torch.arange(6.0).reshape(3, 2)
    assert d.all_reduce(t) is t and d.gather_rows(t)[0] is t and d.any_rank(True) and not d.any_rank(False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    d.average_gradients([p])
    d.broadcast_parameters([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(p.detach(), torch.ones(3))
    import stepq

    with pytest.raises(stepq.CalibrationError, match="^x$"):  # the rank's own error, as it is
        d.raise_on_any_rank(stepq.CalibrationError("x"), stepq.CalibrationError)
    d.raise_on_any_rank(None, stepq.CalibrationError)


def test_gradient_buckets_keep_one_dtype_and_the_size_bound(monkeypatch):
    from stepq.compiler import distributed as d

    monkeypatch.setattr(d, "BUCKET", 10)
    ts = [torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(4), torch.zeros(30)]
    buckets = d._buckets(ts)
    assert sorted(i for b in buckets for i in b) == list(range(5))
    for b in buckets:
        assert len({ts[i].dtype for i in b}) == 1
        assert sum(ts[i].numel() for i in b) <= 10 or len(b) == 1
