"""Pass contracts: every built-in pass declares one, and the manager checks requires / produces,
naming the pass and the node."""

from __future__ import annotations

import pytest
from helpers import calib_set

import stepq
from stepq import passes
from stepq.compiler import meta, ops
from stepq.compiler.errors import PostconditionError, PreconditionError
from stepq.compiler.pass_manager import (
    Contract,
    OpAbsent,
    Pass,
    PassResult,
    RecipeHas,
    StateCovers,
    run_passes,
)
from stepq.methods.ptqd.mixed import CalibrateWidths
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


@pytest.mark.parametrize("name", passes.__all__)
def test_every_built_in_pass_declares_a_contract(name):
    cls = getattr(passes, name)
    assert issubclass(cls, Pass) and cls.name != Pass.name
    c = cls.contract
    assert isinstance(c, Contract) and c.inplace
    assert c.tolerance == 0.0 or c.preserves_semantics
    for cond in (*c.requires, *c.produces):
        assert cond.describe()


def _captured():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    return stepq.capture(m, calib_set(1)[0])


def test_a_missing_requirement_names_the_pass_and_the_node():
    prog = _captured()
    prog.recipe = stepq.get_preset("w8a8")
    with pytest.raises(PreconditionError, match=r"pass 'insert_quantizers' requires every quantizable op carries "
                                                r"'stepq.layer_spec': node '\w+' has no 'stepq.layer_spec'"):
        run_passes(prog, [passes.InsertQuantizers()])


def test_a_missing_recipe_section_is_a_precondition_error():
    prog = stepq.calibrate(stepq.prepare(_captured(), "w8a8"), calib_set(1), progress=False)
    with pytest.raises(PreconditionError, match=r"pass 'select_bits' requires a recipe with a 'ptqd' section: "
                                                r"recipe 'w8a8' has no 'ptqd' section"):
        run_passes(prog, [passes.SelectBits()])


def test_state_the_pass_needs_is_named_per_node():
    prog = stepq.calibrate(stepq.prepare(_captured(), "mixed-ptqd"), calib_set(1), progress=False)
    with pytest.raises(PreconditionError, match=r"pass 'select_bits' requires an entry in program state "
                                                r"'ptqd_scales' .*: node '\w+' \(switchable activation quantizer "
                                                r"'[\w.]+'\) has no entry"):
        run_passes(prog, [passes.SelectBits()])
    # computing the widths first fills exactly what select_bits asks for
    records = run_passes(prog, [CalibrateWidths(), passes.SelectBits()])
    assert records[0].result.count > 0 and records[1].result.count > 0


class _LeavesAQuantizer(Pass):
    """Claims to remove every activation fake_quant, and removes none."""

    name = "leaves_a_quantizer"
    contract = Contract(produces=(OpAbsent(lambda n: n.target is ops.FAKE_QUANT
                                           and n.meta.get(meta.QUANTIZER_ROLE) == "activation",
                                           "activation fake_quant"),))

    def __call__(self, prog):
        return PassResult(0)


def test_a_broken_guarantee_names_the_pass_and_the_node():
    prog = stepq.calibrate(stepq.prepare(_captured(), "w8a8"), calib_set(1), progress=False)
    with pytest.raises(PostconditionError, match=r"pass 'leaves_a_quantizer' must leave no activation fake_quant: "
                                                 r"node '\w+' is a activation fake_quant"):
        run_passes(prog, [_LeavesAQuantizer()])
    run_passes(prog, [_LeavesAQuantizer()], check=False)  # the check can be turned off


def test_conditions_describe_themselves():
    cond = StateCovers("ptqd_scales", lambda prog: [], "switchable activation quantizer")
    assert cond.describe() == "an entry in program state 'ptqd_scales' for every switchable activation quantizer"
    assert RecipeHas("tdq").describe() == "a recipe with a 'tdq' section"
