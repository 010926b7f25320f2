"""Every built-in pass through ``stepq.testing.check_pass``, and ``check_pass`` catching broken passes.

The built-ins are taken from ``stepq.passes.__all__`` and from the pipelines, so a new pass is
checked once it is exported and listed in ``stepq.compiler.pipeline``; a pass exported but in no
pipeline fails the coverage test (give it a check of its own here, as the PTQD refreshes below).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given

import stepq
import stepq.passes
from stepq.compiler.pass_manager import (
    Contract,
    NodesHave,
    Pass,
    PassResult,
    Skip,
    StageIs,
    StateHas,
    Step,
)
from stepq.compiler.pipeline import build_pipeline
from stepq.methods.ptqd import MixedPrecision, PTQDStats
from stepq.passes import AttachTimestepTables, CorrectNoise, RefreshTables, SelectBits, SpecializeBits
from stepq.testing import (
    NotApplicableError,
    PassCheckError,
    check_pass,
    check_pipeline,
    pipeline_names,
    program_at,
    relative_l2,
    walk_pipeline,
)
from stepq.testing import strategies as sqs
from stepq.testing.onnx_cases import attach_synthetic_tables
from stepq.testing.random_models import RandomDenoiserConfig

aten = torch.ops.aten
T = 1000

#: program state the built-ins write (stepq/compiler/state.py's table) until their contracts say so
#: one recipe per method family; together their pipelines hold every built-in pass
FAMILY_RECIPES = ("w4a8", "w4a4-tdq", "w8a8-steptable", "mixed-tdq-ptqd", "w4a4-ptqd", "w4a4-qalora", "ternary-dit")

_SMALL = dict(width=16, temb_dim=16, depth=1)
FAMILY_CASES = {
    "w4a8": sqs.DenoiserCase(RandomDenoiserConfig(kind="dit", num_classes=5, **_SMALL), 2, torch.tensor([3, 870])),
    "w4a4-tdq": sqs.DenoiserCase(RandomDenoiserConfig(kind="unet", context_dim=12, **_SMALL), 2,
                                 torch.tensor([10.5, 999.0])),
    "w8a8-steptable": sqs.DenoiserCase(RandomDenoiserConfig(kind="dit", context_dim=12, **_SMALL), 3,
                                       torch.tensor(400)),
    "mixed-tdq-ptqd": sqs.DenoiserCase(RandomDenoiserConfig(kind="dit", num_classes=5, context_dim=12, **_SMALL),
                                       2, torch.tensor([100, 700])),
    "w4a4-ptqd": sqs.DenoiserCase(RandomDenoiserConfig(kind="unet", num_classes=5, **_SMALL), 2,
                                  torch.tensor(250.0)),
    "w4a4-qalora": sqs.DenoiserCase(RandomDenoiserConfig(kind="unet", context_dim=12, **_SMALL), 2,
                                    torch.tensor([20, 640])),
    "ternary-dit": sqs.DenoiserCase(RandomDenoiserConfig(kind="dit", num_classes=5, **_SMALL), 2, torch.tensor([3, 870])),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only contend on a shared CI box (restored for the other tests)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _exported_passes() -> list[type]:
    return [obj for name in stepq.passes.__all__ if inspect.isclass(obj := getattr(stepq.passes, name))
            and callable(obj) and isinstance(getattr(obj, "name", None), str)]


def _pipeline_types(recipe) -> set[type]:
    return {type(s.item) for s in build_pipeline(recipe) if not isinstance(s.item, (Skip, Step))}


#: passes no pipeline runs (a backend runs them on its copy), each with its own check_pass test below
CHECKED_OUTSIDE_THE_PIPELINE = {SpecializeBits}


def test_the_family_recipes_cover_every_exported_pass():
    exported = _exported_passes()
    assert len(exported) >= 10
    covered = set().union(*(_pipeline_types(sqs.shorten(stepq.get_preset(r))) for r in FAMILY_RECIPES))
    covered |= CHECKED_OUTSIDE_THE_PIPELINE
    missing = sorted(p.__name__ for p in exported if p not in covered)
    assert not missing, f"exported passes no family recipe runs (add a recipe or a check here): {missing}"


def _check(case: sqs.DenoiserCase, recipe) -> list:
    prog = stepq.capture(case.model(), case.example_inputs)
    # checked at another batch than the capture's: the graph has a symbolic batch
    return check_pipeline(prog, recipe, case.calibration(2), case.inputs(case.batch + 1))


@pytest.mark.parametrize("recipe", FAMILY_RECIPES)
def test_every_pass_of_a_family_keeps_its_contract(recipe):
    reports = _check(FAMILY_CASES[recipe], sqs.shorten(stepq.get_preset(recipe)))
    r = sqs.shorten(stepq.get_preset(recipe))
    assert [rep.name for rep in reports] == pipeline_names(r)
    for rep in reports:
        assert "idempotent" in rep.checked or "idempotent" in rep.skipped, rep


@given(case=sqs.denoisers(), recipe=sqs.recipes())
def test_every_pass_keeps_its_contract_on_random_models_and_recipes(case, recipe):
    _check(case, recipe)


# -- the PTQD and table passes with state that moves their buffers ----------------------------


def _converted(recipe: str, case_name: str = "mixed-tdq-ptqd"):
    case = FAMILY_CASES[case_name]
    prog = walk_pipeline(stepq.capture(case.model(), case.example_inputs), sqs.shorten(stepq.get_preset(recipe)),
                         case.calibration(2))
    return prog, case


def test_correct_noise_and_select_bits_with_measured_state():
    prog, case = _converted("mixed-tdq-ptqd")
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(T)
    prog.state.ptqd = PTQDStats(k=torch.rand(T, generator=g) * 0.3, slope=z, bias=torch.randn(T, 4, generator=g) * 0.1,
                                sigma=z, snr=z + 1, visited=torch.ones(T, dtype=torch.bool), count=z)
    prog.state.ptqd_bits = MixedPrecision(bits=(4, 8), table=torch.where(torch.arange(T) < 500, 4, 8),
                                          snr_q=torch.ones(2, T), snr_f=torch.ones(T), visited=torch.ones(T, dtype=torch.bool))
    inputs = case.inputs(3, [50, 450, 900])
    # convert inserted the switch and the correction: with new state they rewrite nothing ...
    for p in (SelectBits(), CorrectNoise()):
        assert check_pass(p, prog, inputs).result.count == 0
    # ... and refresh_tables writes the bits table (t < 500 now runs at 4 bits) and K, B into them
    rep = check_pass(RefreshTables(), prog, inputs)
    assert rep.result.count >= 3 and rep.error is not None and rep.error > 0


def test_specialize_bits_keeps_the_steps_of_its_width():
    prog, case = _converted("mixed-ptqd")
    prog.state.ptqd_bits = MixedPrecision(bits=(4, 8), table=torch.where(torch.arange(T) < 500, 4, 8),
                                          snr_q=torch.ones(2, T), snr_f=torch.ones(T), visited=torch.ones(T, dtype=torch.bool))
    prog = check_pass(RefreshTables(), prog, case.inputs(2)).program  # t < 500 runs at 4 bits
    low, high = case.inputs(3, [50, 200, 450]), case.inputs(3, [600, 800, 990])

    def out(p, x):
        y = p(**x)
        return [y] if isinstance(y, torch.Tensor) else list(y)

    for bits, same, other in ((4, low, high), (8, high, low)):
        rep = check_pass(SpecializeBits(bits), prog, same)  # no switch left, lint, fake re-run, idempotent
        assert rep.result.count > 0
        assert relative_l2(out(prog, same), out(rep.program, same)) == 0.0  # the steps of its width: identical
        assert relative_l2(out(prog, other), out(rep.program, other)) > 0.0  # the others now run at `bits`
    with pytest.raises(PassCheckError, match="cannot specialize to 6 bits"):
        check_pass(SpecializeBits(6), prog, low)


def test_attach_timestep_tables_with_per_step_tables():
    case = FAMILY_CASES["w4a8"]
    prog = program_at(stepq.capture(case.model(), case.example_inputs), "w4a8", case.calibration(2),
                      before="attach_timestep_tables")
    assert attach_synthetic_tables(prog) > 0
    rep = check_pass(AttachTimestepTables(), prog, case.inputs(3))
    assert rep.result.count > 0 and rep.error > 0


# -- check_pass catches broken passes ---------------------------------------------------------


@pytest.fixture(scope="module")
def captured():
    case = sqs.DenoiserCase(RandomDenoiserConfig(kind="dit", attention=False, **_SMALL), 2, torch.tensor([1, 2]))
    return stepq.capture(case.model(), case.example_inputs), case.inputs(3)


def _output(prog) -> torch.fx.Node:
    return next(n for n in prog.gm.graph.nodes if n.op == "output")


def _scale_output(prog, factor: float) -> None:
    out = _output(prog)
    y = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    with prog.gm.graph.inserting_before(out):
        scaled = prog.gm.graph.call_function(aten.mul.Tensor, (y, factor))
    out.replace_input_with(y, scaled)


class AppendsIdentity(Pass):
    """Multiplies the output by 1.0 on every run: honest counts, but never settles."""

    name = "appends_identity"
    contract = Contract(preserves_semantics=True, idempotent=True)

    def __call__(self, prog):
        _scale_output(prog, 1.0)
        return PassResult(1)


class ScalesOutput(Pass):
    """Claims to preserve semantics but multiplies the output by 1.5."""

    name = "scales_output"
    contract = Contract(preserves_semantics=True, tolerance=0.1, idempotent=False)

    def __call__(self, prog):
        _scale_output(prog, 1.5)
        return PassResult(1)


def _is_linear(n) -> bool:
    return n.op == "call_function" and n.target is aten.linear.default


class ClaimsTag(Pass):
    """Claims to tag every linear with a meta key, and tags none."""

    name = "claims_tag"
    contract = Contract(produces=(NodesHave("user.tag", on=_is_linear, what="linear"),))

    def __call__(self, prog):
        return PassResult(0)


def test_a_non_idempotent_pass_fails_idempotence(captured):
    prog, x = captured
    with pytest.raises(PassCheckError, match=r"pass 'appends_identity' fails 'idempotent': a second run reported "
                                             r"1 rewrite") as e:
        check_pass(AppendsIdentity(), prog, x)
    assert isinstance(e.value, AssertionError) and e.value.property == "idempotent"


def test_a_pass_that_changes_outputs_fails_semantics(captured):
    prog, x = captured
    with pytest.raises(PassCheckError, match=r"pass 'scales_output' fails 'semantics': outputs changed by relative "
                                             r"L2 0\.5 > tolerance 0\.1"):
        check_pass(ScalesOutput(), prog, x)
    with pytest.raises(PassCheckError, match=r"fails 'semantics': outputs are not bit-identical"):
        check_pass(ScalesOutput(), prog, x, tolerance=0.0)


def test_a_pass_that_does_not_produce_its_meta_key_fails_produces(captured):
    prog, x = captured
    with pytest.raises(PassCheckError, match=r"pass 'claims_tag' fails 'produces': .*every linear carries "
                                             r"'user\.tag': node '\w+' has no 'user\.tag'"):
        check_pass(ClaimsTag(), prog, x)


class _Custom(Pass):
    def __init__(self, name, fn, contract: Contract | None = None):
        self.name, self.fn, self.contract = name, fn, contract or Contract()  # type: ignore[misc]

    def __call__(self, prog):
        return self.fn(prog)


def _scaled(count, factor=2.0):
    def fn(prog):
        _scale_output(prog, factor)
        return PassResult(count)
    return fn


def _data_dependent(prog):
    out = _output(prog)
    y = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    with prog.gm.graph.inserting_before(out):
        z = prog.gm.graph.call_function(_times_its_mean, (y,))
    out.replace_input_with(y, z)
    return PassResult(1)


def _times_its_mean(y):
    return y * float(y.mean())  # a Python float of a tensor value: no FakeTensor can give it


def _writes_state(prog):
    prog.state.fit_curve = [1.0]
    return PassResult(1)


def _raises(prog):
    raise ValueError("boom")


@pytest.mark.parametrize("p, prop, message", [
    (_Custom("hides_rewrites", _scaled(0)), "honest_count", "reported 0 rewrites but changed the graph"),
    (_Custom("invents_rewrites", lambda prog: PassResult(3)), "honest_count",
     "reported 3 rewrite\\(s\\) but changed nothing"),
    (_Custom("edits_in_place", _scaled(1), Contract(inplace=False, idempotent=False)), "inplace",
     "inplace=False but the pass changed the graph"),
    (_Custom("writes_state", _writes_state, Contract(idempotent=False)), "untouched", "program state 'fit_curve'"),
    (_Custom("raises", _raises), "runs", "ValueError: boom"),
    (_Custom("data_dependent", _data_dependent, Contract(idempotent=False)), "fake_rerun",
     "does not re-run on FakeTensors"),
    (_Custom("not_a_result", lambda prog: 3), "runs", "returned int, not a PassResult"),
])
def test_check_pass_names_the_pass_and_the_broken_property(captured, p, prop, message):
    prog, x = captured
    with pytest.raises(PassCheckError, match=f"pass {p.name!r} fails {prop!r}: .*{message}") as e:
        check_pass(p, prog, x)
    assert e.value.pass_name == p.name and e.value.property == prop


def test_a_declared_state_write_is_allowed(captured):
    prog, x = captured
    p = _Custom("writes_state", _writes_state, Contract(produces=(StateHas("fit_curve"),), idempotent=False))
    rep = check_pass(p, prog, x)
    assert rep.program.state.fit_curve == [1.0] and prog.state.fit_curve is None  # the caller's program is untouched


def test_a_case_outside_the_requires_is_not_applicable(captured):
    prog, x = captured
    p = _Custom("needs_converted", lambda prog: PassResult(0), Contract(requires=(StageIs(("converted",)),)))
    with pytest.raises(NotApplicableError, match="pass 'needs_converted' is not applicable to this program: it "
                                                 "requires a program at stage 'converted', but the program is at "
                                                 "stage 'captured'"):
        check_pass(p, prog, x)


def test_a_good_pass_passes_and_the_caller_program_is_not_modified(captured):
    prog, x = captured
    nodes = len(prog.gm.graph.nodes)
    rep = check_pass(_Custom("noop", lambda prog: PassResult(0), Contract(preserves_semantics=True)), prog, x)
    assert rep.result.count == 0 and rep.error == 0.0 and "semantics" in rep.checked
    assert len(prog.gm.graph.nodes) == nodes and prog.history == []
