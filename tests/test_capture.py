"""Capture: torch.export front end, timestep discovery, signature binding, the user's model untouched."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import stepq
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def _inputs(batch=2, t=(10, 700)):
    return {"sample": torch.randn(batch, 4, 8, 8), "timestep": torch.tensor(t[:batch])}


def test_capture_is_bit_exact_and_finds_the_timestep():
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet"))
    prog = stepq.capture(m, _inputs())
    assert prog.timestep_arg == "timestep" and prog.sample_arg == "sample"
    x = _inputs()
    assert torch.equal(prog(**x), m(**x))
    # dynamic batch: other batch sizes run, bit-exact
    for b, t in ((1, (5,)), (3, (1, 2, 3))):
        x = {"sample": torch.randn(b, 4, 8, 8), "timestep": torch.tensor(t)}
        assert torch.equal(prog(**x), m(**x))


def test_positional_example_inputs_and_positional_calls():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit"))
    x = _inputs()
    prog = stepq.capture(m, (x["sample"], x["timestep"]))
    assert prog.timestep_arg == "timestep"
    assert torch.equal(prog(x["sample"], x["timestep"]), m(x["sample"], x["timestep"]))
    assert torch.equal(prog(x["sample"], timestep=x["timestep"]), m(**x))


class _Renamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, noise_level):
        return self.lin(x) * noise_level[:, None]


def test_explicit_timestep_argument():
    prog = stepq.capture(_Renamed(), {"x": torch.randn(2, 8), "noise_level": torch.tensor([1.0, 2.0])},
                         timestep_arg="noise_level")
    assert prog.timestep_arg == "noise_level"


def test_missing_and_nonexistent_timestep_arguments_raise_capture_error():
    m = _Renamed()
    inputs = {"x": torch.randn(2, 8), "noise_level": torch.tensor([1.0, 2.0])}
    with pytest.raises(stepq.CaptureError, match=r"no timestep input found.*timestep_arg="):
        stepq.capture(m, inputs)
    with pytest.raises(stepq.CaptureError, match="timestep argument 'sigma_t' is not among the example inputs"):
        stepq.capture(m, inputs, timestep_arg="sigma_t")
    with pytest.raises(stepq.CaptureError, match="'y' is not a parameter of _Renamed.forward"):
        stepq.capture(m, {**inputs, "y": 1}, timestep_arg="noise_level")
    with pytest.raises(stepq.CaptureError, match="example_inputs must be a dict"):
        stepq.capture(m, 3)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, sample, timestep):
        if sample.sum() > 0:  # branches on a tensor's value: torch.export cannot capture this
            return self.lin(sample)
        return sample


def test_untraceable_model_raises_capture_error_naming_the_source_line():
    with pytest.raises(stepq.CaptureError) as e:
        stepq.capture(_DataDependent(), {"sample": torch.randn(2, 8), "timestep": torch.tensor([1, 2])})
    msg = str(e.value)
    assert "could not capture _DataDependent" in msg
    src_line = inspect.getsourcelines(_DataDependent.forward)[1] + 1
    assert f"test_capture.py:{src_line}" in msg and "if sample.sum() > 0" in msg
    assert "what to try" in msg


def test_user_model_is_not_mutated_by_quantize():
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet"))
    m.train()
    calls = []
    handle = m.conv_in.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
    flags = {n: mod.training for n, mod in m.named_modules()}
    hooks = {n: dict(mod._forward_hooks) for n, mod in m.named_modules()}
    data = [_inputs(4, (1, 2, 3, 4)), _inputs(4, (500, 600, 700, 800))]
    qm = stepq.quantize(m, _inputs(), "w4a4", calibration=data, progress=False)
    assert {n: mod.training for n, mod in m.named_modules()} == flags
    assert {n: dict(mod._forward_hooks) for n, mod in m.named_modules()} == hooks
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) and ptrs[k] == after[k].data_ptr() for k in before)
    # the compiled model owns its tensors: changing it does not reach the user's model
    for p in qm.parameters():
        p.data.add_(1.0)
    assert all(torch.equal(before[k], after[k]) for k in before)
    handle.remove()


def test_signature_errors_on_call():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit"))
    prog = stepq.capture(m, _inputs())
    with pytest.raises(stepq.InputSignatureError, match="unknown argument 'noise'"):
        prog(sample=torch.randn(2, 4, 8, 8), noise=1)
    with pytest.raises(stepq.InputSignatureError, match="missing argument 'timestep'"):
        prog(sample=torch.randn(2, 4, 8, 8))
    with pytest.raises(stepq.InputSignatureError, match="must have 4 dimensions"):
        prog(sample=torch.randn(2, 4, 8), timestep=torch.tensor([1, 2]))


def test_constant_arguments_are_checked():
    from stepq.testing.families import FAMILIES

    f = FAMILIES["dit"]
    m = f.model()
    prog = stepq.capture(m, f.example_inputs())
    x = f.example_inputs()
    assert torch.equal(prog(**x)[0], m(**x)[0])
    with pytest.raises(stepq.InputSignatureError, match="captured as the constant False"):
        prog(**{**x, "return_dict": True})


def test_scalar_and_python_timesteps_are_normalised():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit"))
    prog = stepq.capture(m, _inputs())
    x = torch.randn(2, 4, 8, 8)
    ref = m(x, torch.tensor([7, 7]))
    assert torch.equal(prog(sample=x, timestep=7), ref)
    assert torch.equal(prog(sample=x, timestep=torch.tensor(7)), ref)
    assert torch.equal(prog(sample=x, timestep=torch.tensor([7])), ref)
