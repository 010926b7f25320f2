"""Tools for testing stepq and passes written for it: contract checks, pipeline points, random models.

Check a pass against its contract on a program at the point where it runs::

    import stepq
    from stepq.testing import check_pass, program_at

    prog = stepq.capture(model, example_inputs)
    before = program_at(prog, "w8a8", calibration, after="annotate_layers")
    report = check_pass(MyPass(), before, inputs)   # raises PassCheckError naming the property
    print(report)

and as a property over random denoisers, recipes and timesteps (``pip install stepq[dev]`` for
hypothesis; ``stepq.testing.strategies`` is imported on its own so the rest works without it)::

    from hypothesis import given
    from stepq.testing import strategies as sqs

    @given(case=sqs.denoisers(), recipe=sqs.static_recipes())
    def test_my_pass(case, recipe):
        prog = stepq.capture(case.model(), case.example_inputs)
        before = program_at(prog, recipe, case.calibration(), after="annotate_layers")
        check_pass(MyPass(), before, case.inputs(batch=3))

``check_pipeline`` runs ``check_pass`` on every pass a recipe runs. See docs/PASSES.md.

Modules: ``check`` (``check_pass``), ``staging`` (``program_at``, ``check_pipeline``),
``strategies`` (hypothesis), ``random_models`` (tiny DiT/UNet-like denoisers), ``families`` (tiny
diffusers models of six families), ``onnx_cases`` (models and recipes for the ONNX tests).
"""

from stepq.testing.check import (
    PROPERTIES,
    CheckReport,
    NotApplicableError,
    PassCheckError,
    check_pass,
    contract_of,
    copy_program,
    fake_rerun,
    relative_l2,
)
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser
from stepq.testing.staging import check_pipeline, pipeline_names, program_at, walk_pipeline

__all__ = [
    "PROPERTIES",
    "CheckReport",
    "NotApplicableError",
    "PassCheckError",
    "RandomDenoiserConfig",
    "build_random_denoiser",
    "check_pass",
    "check_pipeline",
    "contract_of",
    "copy_program",
    "fake_rerun",
    "pipeline_names",
    "program_at",
    "relative_l2",
    "walk_pipeline",
]
