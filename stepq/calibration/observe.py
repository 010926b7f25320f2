"""The calibration step: the data runs through the prepared program and its observers record.

Every item is one denoiser call (a dict of keyword arguments or an argument tuple) recorded along
FP sampler trajectories (``stepq.calibration.collect``). The first call is kept for convert's
per-layer report; with ``keep_calls`` every bound call is kept for a later fit (TDQ's PTQ fit
replays them).

Under a torch.distributed process group each rank runs its own share of the data (what
``collect`` returned on that rank) and the observers are then reduced over the ranks
(``stepq.calibration.distributed``), so every rank holds the statistics of all the data. An error
on one rank (a NaN in a layer's input) is raised on every rank, naming the failing rank.

Weights are static while the data runs, so the calls run through a copy of the graph in which
every weight quantizer whose operands are all attributes (``fake_quant(W, s, z)``,
``ternary(W, α)``) is computed once (``fold_weight_quantizers``): the same tensors, bit for bit,
without re-quantizing every weight at every call. The copy shares every parameter, buffer and
observer with the program's module, which is not modified; the folded weights stay within
``FOLD_BUDGET_BYTES`` (beyond it the remaining quantizers run per call, as before).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.fx
from tqdm.auto import tqdm

from stepq.calibration.distributed import reduce_observers, reseed_observers
from stepq.calibration.observers import observer_nodes
from stepq.compiler import ops
from stepq.compiler.distributed import all_reduce, is_distributed, raise_on_any_rank, world_size
from stepq.compiler.errors import CalibrationError
from stepq.compiler.graph_utils import fold_constant_calls
from stepq.compiler.pass_manager import CompileInputs, Contract, PassResult, StageIs, Step
from stepq.compiler.program import Program

__all__ = ["FOLD_BUDGET_BYTES", "Observe", "as_call", "fold_weight_quantizers"]

#: the most bytes of quantized weights held at once by ``fold_weight_quantizers``
FOLD_BUDGET_BYTES = 1 << 30
_WEIGHT_QUANTIZERS = (ops.FAKE_QUANT, ops.TERNARY)


def as_call(item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of one calibration item."""
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise CalibrationError(f"a calibration item must be a dict of keyword arguments or a tuple, got {type(item).__name__}")


def fold_weight_quantizers(gm: torch.fx.GraphModule, budget: int = FOLD_BUDGET_BYTES
                           ) -> tuple[torch.fx.GraphModule, int]:
    """A module running ``gm``'s graph with every weight quantizer whose tensor operands are all
    ``get_attr`` nodes replaced by its value, computed once (up to ``budget`` bytes of them), and
    the number folded. ``gm`` is not modified: the copy shares its parameters, buffers and
    submodules (the observers, which therefore record into ``gm``'s own)."""
    return fold_constant_calls(gm, _WEIGHT_QUANTIZERS, prefix="_observe_folded", budget=budget)


class Observe(Step):
    """Run ``inputs.calibration`` through the program; count = calibration calls seen."""

    name = "observe"
    contract: ClassVar[Contract] = Contract(requires=(StageIs(("prepared",)),), writes=("report_batch",))

    def __init__(self, keep_calls: bool = False):
        self.keep_calls = keep_calls

    @torch.no_grad()
    def __call__(self, prog: Program, inputs: CompileInputs) -> PassResult:
        data = inputs.calibration
        if data is None:
            raise CalibrationError("calibration data is None; pass an iterable of input dicts")
        observers = observer_nodes(prog.gm)
        total = len(data) if hasattr(data, "__len__") else None
        if inputs.max_batches is not None and total is not None:
            total = min(total, inputs.max_batches)
        reseed_observers([m for _, m in observers])
        run = fold_weight_quantizers(prog.gm)[0] if observers else prog.gm
        first = None
        n = 0
        error: Exception | None = None
        try:
            for item in tqdm(data, total=total, desc="calibrate", disable=not inputs.progress or not observers,
                             leave=False):
                if inputs.max_batches is not None and n >= inputs.max_batches:
                    break
                args, kwargs = as_call(item)
                bound = prog.bind(args, kwargs)
                if first is None:
                    first = bound
                if observers:
                    run(**bound)
                if self.keep_calls:
                    inputs.kept.append(prog.bind(args, kwargs))
                n += 1
        except Exception as e:  # under a process group: every rank learns of it before anyone raises
            if not is_distributed():
                raise
            error = e
        raise_on_any_rank(error, CalibrationError)
        # a rank may have no share of the data; the calibration as a whole may not
        if int(all_reduce(torch.tensor([n], dtype=torch.int64))) == 0:
            raise CalibrationError("calibration data is empty: it yielded no batches"
                                   + (f" on any of the {world_size()} ranks" if is_distributed() else ""))
        reduce_observers([m for _, m in observers])
        prog.state.report_batch = first
        return PassResult(n)
