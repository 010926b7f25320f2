"""The user's model is never mutated by compiling it: parameters and buffers (values, dtype, device,
requires_grad, identity), every module's training flag, and its hooks, over the model families and
the recipes (static, TDQ, PTQD, QALoRA and composed rule lists)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stepq
from stepq.compiler.errors import StepqError
from stepq.testing import strategies as sqs


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "params": {k: (id(p), p.detach().clone(), p.dtype, p.device, p.requires_grad)
                   for k, p in model.named_parameters()},
        "buffers": {k: (id(b), b.detach().clone(), b.dtype) for k, b in model.named_buffers()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for k, m in model.named_modules()},
        "modules": {k: type(m) for k, m in model.named_modules()},
    }


def _assert_same(before: dict, model: torch.nn.Module) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["params"].keys() == before["params"].keys()
    for k, (ident, value, dtype, device, grad) in before["params"].items():
        a = after["params"][k]
        assert (a[0], a[2], a[3], a[4]) == (ident, dtype, device, grad), k
        assert torch.equal(a[1], value), f"parameter {k} changed"
    assert after["buffers"].keys() == before["buffers"].keys()
    for k, (ident, value, dtype) in before["buffers"].items():
        assert after["buffers"][k][0] == ident and after["buffers"][k][2] == dtype, k
        assert torch.equal(after["buffers"][k][1], value), f"buffer {k} changed"


_calls: list[int] = []


def _hook(module, args, output):
    _calls.append(1)


@settings(max_examples=6)
@given(case=sqs.denoisers(), recipe=sqs.recipes(fit_steps=1), train_mode=st.booleans(), hooked=st.booleans(),
       frozen=st.booleans())
def test_compiling_never_mutates_the_model(case, recipe, train_mode, hooked, frozen):
    model = case.model()
    model.train(train_mode)
    if frozen:
        model.requires_grad_(False)
    handle = model.register_forward_hook(_hook) if hooked else None
    try:
        before = _snapshot(model)
        try:
            qm = stepq.quantize(model, case.example_inputs, recipe, calibration=case.calibration(2), progress=False)
        except StepqError:
            qm = None  # a typed refusal is allowed; it must not leave the model changed either
        _assert_same(before, model)
        if qm is not None:  # and the compiled model does not share storage with it
            with torch.no_grad():
                for p in qm.parameters():
                    assert all(p.data_ptr() != q.data_ptr() for q in model.parameters())
    finally:
        if handle is not None:
            handle.remove()
        model.train(False).requires_grad_(True)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["unet", "dit"])
def test_compiling_a_diffusers_family_never_mutates_it(family):
    from stepq.testing.families import FAMILIES

    f = FAMILIES[family]
    model = f.model()
    model.train(True)
    before = _snapshot(model)
    stepq.quantize(model, f.example_inputs(2), "w8a8", calibration=[f.example_inputs(2, t=t, seed=i)
                                                                    for i, t in enumerate((100.0, 800.0))],
                   progress=False)
    _assert_same(before, model)
