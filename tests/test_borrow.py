"""Capture borrows the user's tensors instead of cloning them (stepq.compiler.borrow): the program
reads the model's storage until convert, nothing writes it, a write is caught and named, and the
converted model owns its tensors."""

from __future__ import annotations

import itertools

import pytest
import torch

import stepq
from stepq.compiler.borrow import own_tensor
from stepq.compiler.errors import BorrowError
from stepq.compiler.graph_utils import fetch_attr
from stepq.compiler.pass_manager import Pass, PassResult, run_passes
from stepq.testing.families import FAMILIES

FAMILY = FAMILIES["unet"]


def _calibration():
    return [FAMILY.example_inputs(2, t=t, seed=i) for i, t in enumerate((100.0, 800.0))]


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers()) if t.numel()}


def _values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in (*model.named_parameters(), *model.named_buffers())}


def _assert_unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = dict((*model.named_parameters(), *model.named_buffers()))
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def test_capture_shares_the_models_storage_and_records_it():
    model = FAMILY.model()
    prog = stepq.capture(model, FAMILY.example_inputs())
    user = _storages(model)
    params = list(prog.gm.parameters())
    assert params and all(p.untyped_storage().data_ptr() in user for p in params)  # no copy was made
    assert all(not p.requires_grad for p in params)
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags are untouched
    assert len(prog.borrowed) >= len(params)
    assert all(prog.borrowed.is_borrowed(p) for p in params)


def test_a_program_copy_shares_the_borrowed_tensors_and_owns_the_rest():
    model = FAMILY.model()
    prog = stepq.prepare(stepq.capture(model, FAMILY.example_inputs()), "w8a8")
    twin = prog.copy()
    user = _storages(model)
    shared = [p for p in twin.gm.parameters() if p.untyped_storage().data_ptr() in user]
    assert shared and len(shared) == sum(1 for p in prog.gm.parameters() if p.untyped_storage().data_ptr() in user)
    ours = {b.untyped_storage().data_ptr() for b in prog.gm.buffers() if not prog.borrowed.is_borrowed(b)}
    assert ours and not ours & {b.untyped_storage().data_ptr() for b in twin.gm.buffers()}  # scales: copied


class _WriteWeight(Pass):
    """A broken pass: it scales a weight in place (a user pass might)."""

    name = "write_weight"

    def __call__(self, prog):
        node = next(n for n in prog.gm.graph.nodes if n.op == "get_attr" and "weight" in str(n.target))
        with torch.no_grad():
            fetch_attr(prog.gm, node.target).mul_(2.0)
        return PassResult(0)


class _OwnThenWrite(_WriteWeight):
    name = "own_then_write"

    def __call__(self, prog):
        node = next(n for n in prog.gm.graph.nodes if n.op == "get_attr" and "weight" in str(n.target))
        with torch.no_grad():
            own_tensor(prog.borrowed, prog.gm, str(node.target)).mul_(2.0)
        return PassResult(0)


def test_a_pass_writing_a_borrowed_tensor_is_named():
    model = FAMILY.model()
    prog = stepq.capture(model, FAMILY.example_inputs())
    with pytest.raises(BorrowError, match=r"pass 'write_weight' wrote the model's tensor\(s\) '.*weight'"):
        run_passes(prog, [_WriteWeight()])


def test_a_pass_that_owns_first_leaves_the_model_alone():
    model = FAMILY.model()
    before = _values(model)
    prog = stepq.capture(model, FAMILY.example_inputs())
    run_passes(prog, [_OwnThenWrite()])
    _assert_unchanged(before, model)


def test_changing_the_model_after_capture_is_refused_by_name():
    model = FAMILY.model()
    prog = stepq.capture(model, FAMILY.example_inputs())
    name, p = next(iter(model.named_parameters()))
    with torch.no_grad():
        p.add_(1.0)
    with pytest.raises(BorrowError, match=rf"'{name}'.*changed in place after stepq.capture"):
        stepq.prepare(prog, "w8a8")


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w4a8-tdq", "mixed-ptqd"])
def test_each_phase_leaves_the_models_values_and_the_converted_model_owns_its_tensors(recipe):
    model = FAMILY.model()
    before = _values(model)
    r = stepq.get_preset(recipe)
    if r.tdq is not None:
        r = r.replace(tdq=r.tdq.replace(fit_steps=2, time_budget_s=None))
    prog = stepq.capture(model, FAMILY.example_inputs())
    _assert_unchanged(before, model)
    prog = stepq.prepare(prog, r, inplace=True)
    _assert_unchanged(before, model)
    stepq.calibrate(prog, _calibration(), progress=False)
    _assert_unchanged(before, model)
    qm = stepq.convert(prog)
    _assert_unchanged(before, model)
    assert not _storages(qm) & _storages(model)  # nothing aliased: writing qm cannot reach the model
    with torch.no_grad():
        for t in (*qm.parameters(), *qm.buffers()):
            if t.dtype.is_floating_point:
                t.add_(1.0)
    _assert_unchanged(before, model)


def test_training_writes_its_own_copies_never_the_models():
    model = FAMILY.model()
    before = _values(model)
    r = stepq.get_preset("w4a4-qat")
    r = r.replace(qat=r.qat.replace(steps=2, batch_size=2))
    prog = stepq.calibrate(stepq.prepare(stepq.capture(model, FAMILY.example_inputs()), r, inplace=True),
                           _calibration(), progress=False)
    g = torch.Generator().manual_seed(0)

    def batches():
        for i in itertools.count():
            inputs = FAMILY.example_inputs(2, t=float(100 + i % 800), seed=i)
            yield inputs, torch.randn(inputs[prog.sample_arg].shape, generator=g)

    trained_before = {k: v.detach().clone() for k, v in prog.gm.named_parameters()}
    stepq.train(prog, batches(), progress=False)
    moved = [k for k, v in prog.gm.named_parameters() if k in trained_before and not torch.equal(v, trained_before[k])]
    assert moved  # the loop did train the program's weights ...
    _assert_unchanged(before, model)  # ... its own copies of them
    stepq.convert(prog, inplace=True)
    _assert_unchanged(before, model)
