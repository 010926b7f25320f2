"""QuantizedModel: the compiled denoiser, an ``nn.Module`` with the original call signature.

It runs the converted graph in PyTorch (the reference backend: simulated quantization with integer
weights dequantized on the fly), and is what ``save``/``load`` and the other backends start from
(``qm.export(backend, path)``).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from stepq.artifact.report import LayerReport, format_report
from stepq.artifact.store import load_program, save_program
from stepq.compiler import meta
from stepq.compiler.graph_utils import fetch_attr
from stepq.compiler.program import Program

if TYPE_CHECKING:
    from stepq.backends.base import Backend, Exported

__all__ = ["QuantizedModel", "load"]

log = logging.getLogger(__name__)


class QuantizedModel(torch.nn.Module):
    """A converted program. Call it like the original model."""

    def __init__(self, program: Program):
        super().__init__()
        if program.stage != "converted":
            raise ValueError(f"QuantizedModel needs a converted program, got stage {program.stage!r}")
        self.program = program
        self.gm = program.gm
        self.eval()

    # -- calling -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.gm(**self.program.bind(args, kwargs))

    @property
    def recipe(self):
        return self.program.recipe

    @property
    def signature(self):
        return self.program.signature

    # -- inspection ----------------------------------------------------------------------------
    def report(self, *, print_table: bool = True) -> list[LayerReport]:
        """Per-layer bits, scale ranges and output SQNR against FP; printed and returned."""
        rows: list[LayerReport] = self.program.state.report
        if print_table:
            print(format_report(rows, title=f"stepq {self.recipe.name} — {self.program.model_name}"))
        return rows

    def weight_bytes(self) -> int:
        """Bytes of every tensor the deployed graph reads (integer weights, scales, biases, tables)."""
        targets = {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}
        return sum(t.numel() * t.element_size() for t in (fetch_attr(self.gm, q) for q in targets))

    def quantized_layers(self) -> list[str]:
        out = []
        for n in self.gm.graph.nodes:
            spec = meta.get_layer_spec(n)
            if meta.LAYER in n.meta and spec is not None and not spec.is_float:
                out.append(n.meta[meta.LAYER])
        return out

    def plot(self, path: str | os.PathLike[str], *, fp_model: Any = None, sampling: Any = None, n: int = 8,
             seed: int = 0) -> dict[str, Any]:
        """Write PNGs into the folder ``path`` (matplotlib, Agg) and return ``{kind: path}``:

        * ``steps_vs_t``: the activation step s(t) of every timestep-indexed quantizer, t ∈ [0, T),
          read from the graph's tables (TDQ / step-table / PTQD models; absent for static recipes);
        * ``sqnr``: the per-layer output SQNR against FP of the convert-time report;
        * ``samples``: with ``fp_model`` (the model this one was compiled from) and ``sampling``
          (a ``stepq.Sampling``, e.g. the calibration data's ``.sampling``), ``n`` FP samples above
          ``n`` samples of this model from the same noise and ``seed``; costs 2·n·steps model calls.
        """
        from stepq.artifact.plots import plot_model

        return dict(plot_model(self, path, fp_model=fp_model, sampling=sampling, n=n, seed=seed))

    # -- artefacts -----------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write a directory with ``model.safetensors`` and ``manifest.json`` (never pickle)."""
        save_program(self.program, path)

    def export(self, backend: str | Backend, path: str | os.PathLike[str], **options: Any) -> Exported:
        """Lower this model for ``backend`` and write its artefact at ``path``; returns the backend's
        export result. ``backend`` is a name from ``stepq.backends``' table (``"reference"``,
        ``"onnx"``; ``stepq.backends.describe()`` lists them) or a ``Backend`` object."""
        if isinstance(backend, str):
            # the one upward import the layering allows: a backend resolved by name, when asked for
            from stepq.backends import get_backend

            backend = get_backend(backend)
        return backend.export(self, path, **options)

    def export_onnx(self, path: str | os.PathLike[str], **options: Any) -> Any:
        """Write quantized ONNX for ONNX Runtime: ``export("onnx", path, **options)``; a PTQD
        mixed-precision model becomes one file with an If over its widths (docs/ONNX.md)."""
        return self.export("onnx", path, **options)

    def extra_repr(self) -> str:
        return f"model={self.program.model_name}, recipe={self.recipe.name!r}, timestep={self.program.timestep_arg!r}"


def load(path: str) -> QuantizedModel:
    """Load a QuantizedModel saved with ``QuantizedModel.save`` (safetensors + JSON, checked)."""
    return QuantizedModel(load_program(path))
