"""PTQD's stages in the pipeline (``stepq.compiler.pipeline``, phase "ptqd")."""

from __future__ import annotations

from typing import ClassVar

from stepq.artifact.quantized_model import QuantizedModel
from stepq.compiler.errors import PreconditionError
from stepq.compiler.pass_manager import CompileInputs, Contract, PassResult, RecipeHas, StageIs, Step
from stepq.compiler.program import Program
from stepq.methods.ptqd.apply import apply

__all__ = ["MeasurePTQD"]


class MeasurePTQD(Step):
    """Statistics of the converted program against the FP model fill the PTQD tables (count = 1)."""

    name = "measure_ptqd"
    contract: ClassVar[Contract] = Contract(requires=(RecipeHas("ptqd"), StageIs(("converted",))))

    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        if inputs.fp_model is None:
            raise PreconditionError("PTQD measures the quantized model against the FP model; none was given")
        data = inputs.ptqd_data if inputs.ptqd_data is not None else inputs.calibration
        apply(QuantizedModel(prog), inputs.fp_model, data, scheduler=inputs.ptqd_scheduler)
        return PassResult(1)
