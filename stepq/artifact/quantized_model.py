"""QuantizedModel: the compiled denoiser, an ``nn.Module`` with the original call signature.

It runs the converted graph in PyTorch (the reference backend: simulated quantization with integer
weights dequantized on the fly), and is what ``save``/``load`` and the other backends start from
(``qm.export(backend, path)``).

It stands in for the module it replaces inside a diffusers pipeline (docs/DIFFUSERS.md): ``config``
is the source model's config (a diffusers ``FrozenDict``, saved in the artefact), its entries read as
attributes too (``qm.in_channels``), ``dtype`` / ``device`` are those of its tensors, and a call
takes ``return_dict`` whatever the graph was captured with: ``True`` (the default of a diffusers
model) returns the model's own output class (``UNet2DOutput``, ``Transformer2DModelOutput``),
``False`` a tuple. It computes in float32 only: ``.half()`` / ``.to(torch.bfloat16)`` raise
``UnsupportedConversionError``; ``.to(device)`` moves its tensors and the devices the graph names.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from stepq.artifact.dequantized import cached_graph
from stepq.artifact.report import LayerReport, format_report
from stepq.artifact.store import load_program, save_program
from stepq.compiler import meta
from stepq.compiler.errors import ArtifactError, UnsupportedConversionError
from stepq.compiler.graph_utils import fetch_attr
from stepq.compiler.noise import contained_noise
from stepq.compiler.program import Program

if TYPE_CHECKING:
    from stepq.backends.base import Backend, Exported

__all__ = ["QuantizedModel", "load"]

log = logging.getLogger(__name__)

#: the one dtype a compiled model computes in (scales, dequantized weights, the stepq ops' outputs)
COMPUTE_DTYPE = torch.float32
_RETURN_DICT = "return_dict"


def output_class(qualname: str | None) -> type | None:
    """The output dataclass recorded at capture (``module:qualname``). Only diffusers dataclasses are
    imported, so an artefact cannot name arbitrary code."""
    if qualname is None:
        return None
    module, _, name = qualname.partition(":")
    if not module.startswith("diffusers.") or not name:
        raise ArtifactError(f"refusing output class {qualname!r}: only diffusers output dataclasses are allowed")
    try:
        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as e:
        raise ArtifactError(f"output class {qualname!r} is not in this diffusers: {e}") from None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ArtifactError(f"output class {qualname!r} is not a dataclass")
    return cls


def _as_tuple(out: Any) -> tuple[Any, ...]:
    if isinstance(out, tuple):
        return out
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return tuple(getattr(out, f.name) for f in dataclasses.fields(out) if getattr(out, f.name) is not None)
    return (out,)


def _retarget(gm: torch.fx.GraphModule, device: torch.device) -> int:
    """Point every ``device=`` argument of the graph (``arange``, ``zeros``, ``to`` ... captured on
    the device of capture) at ``device``; returns how many changed."""
    changed = 0

    def swap(v: Any) -> Any:
        nonlocal changed
        if isinstance(v, torch.device) and v != device:
            changed += 1
            return device
        return v

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = pytree.tree_map(swap, node.args)
            node.kwargs = pytree.tree_map(swap, node.kwargs)
    if changed:
        gm.recompile()
    return changed


class QuantizedModel(torch.nn.Module):
    """A converted program. Call it like the original model; put it where the original model was
    (a diffusers pipeline's ``unet`` / ``transformer``)."""

    def __init__(self, program: Program):
        super().__init__()
        if program.stage != "converted":
            raise ValueError(f"QuantizedModel needs a converted program, got stage {program.stage!r}")
        self.program = program
        self.gm = program.gm
        self._output_class = output_class(program.output_class)
        self._config: Any = None
        object.__setattr__(self, "_cached", None)  # cache_dequantized's graph: not a submodule (not saved, not moved)
        self.eval()

    # -- what diffusers reads -----------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The source model's config (a diffusers ``FrozenDict``: items and attributes), or None when
        the model had none."""
        if self._config is None and self.program.model_config is not None:
            with contained_noise():  # diffusers imports torchao, which reports its missing CUDA extensions
                from diffusers.configuration_utils import FrozenDict

            self._config = FrozenDict(self.program.model_config)
        return self._config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            cfg = self.__dict__.get("program")
            config = getattr(cfg, "model_config", None) if cfg is not None else None
            if config is not None and not name.startswith("_") and name in config:
                return self.config[name]
            raise

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (float32; its integer weights are stored narrower)."""
        return COMPUTE_DTYPE

    @property
    def device(self) -> torch.device:
        for t in (*self.gm.parameters(), *self.gm.buffers()):
            return t.device
        return torch.device("cpu")

    def to(self, *args: Any, **kwargs: Any) -> QuantizedModel:  # type: ignore[override]
        """``.to(device)`` moves the tensors and retargets the graph's ``device=`` arguments;
        ``.to(torch.float32)`` is a no-op; any other dtype raises ``UnsupportedConversionError``."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        self._check_dtype(dtype, ".to")
        if device is not None:
            cached = self._cached is not None
            self.cache_dequantized(False)  # rebuilt from the moved tensors below
            super().to(device, non_blocking=non_blocking)
            _retarget(self.gm, torch.device(device))
            self.cache_dequantized(cached)
        return self

    def cuda(self, device: Any = None) -> QuantizedModel:  # type: ignore[override]
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def cpu(self) -> QuantizedModel:  # type: ignore[override]
        return self.to("cpu")

    def half(self) -> QuantizedModel:  # type: ignore[override]
        self._check_dtype(torch.float16, ".half")
        return self

    def bfloat16(self) -> QuantizedModel:  # type: ignore[override]
        self._check_dtype(torch.bfloat16, ".bfloat16")
        return self

    def double(self) -> QuantizedModel:  # type: ignore[override]
        self._check_dtype(torch.float64, ".double")
        return self

    def float(self) -> QuantizedModel:  # type: ignore[override]
        return self

    def type(self, dst_type: Any) -> QuantizedModel:  # type: ignore[override]
        self._check_dtype(dst_type if isinstance(dst_type, torch.dtype) else None, ".type")
        return self

    def _check_dtype(self, dtype: torch.dtype | None, call: str) -> None:
        if dtype is not None and dtype != COMPUTE_DTYPE:
            raise UnsupportedConversionError(
                f"{call}({dtype}) on a stepq QuantizedModel ({self.program.model_name}, recipe "
                f"{self.recipe.name!r}): a compiled model computes in float32 only (its scales, dequantized "
                "weights and quantizer ops are float32); supported: .to(device), .to(torch.float32). Cast the "
                "inputs instead, or keep the pipeline in float32")

    # -- calling -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call it as the source model. ``return_dict`` (when the model has it) is honoured whatever
        the graph was captured with: the captured value goes to the graph, the output is then made
        into the model's output class (True) or a tuple (False)."""
        return_dict = self._pop_return_dict(kwargs)
        gm = self._cached if self._cached is not None else self.gm
        out = gm(**self.program.bind(args, kwargs))
        return out if return_dict is None else self._format_output(out, return_dict)

    def cache_dequantized(self, enabled: bool = True) -> QuantizedModel:
        """Keep every quantized weight dequantized in memory (``enabled``), or stop (``False``).

        The forward then reads each weight as a float tensor computed once, instead of dequantizing
        (and unpacking) it on every call: bit for bit the same outputs, at the cost of one float32
        copy of the quantized weights (the FP model's weight bytes) beside the integer ones, which stay
        what ``save``, ``export`` and ``weight_bytes`` read. The measured latency: docs/SPEED.md, "The
        PyTorch path". ``load(..., cache_dequantized=True)`` loads with it on. Returns ``self``."""
        if not enabled:
            object.__setattr__(self, "_cached", None)
        elif self._cached is None:
            cached, n = cached_graph(self.gm)
            object.__setattr__(self, "_cached", cached.train(self.training))
            log.debug("%s: %d weights kept dequantized", self.program.model_name, n)
        return self

    def train(self, mode: bool = True) -> QuantizedModel:
        super().train(mode)
        if self._cached is not None:
            self._cached.train(mode)
        return self

    @property
    def dequantized_cached(self) -> bool:
        """Whether ``cache_dequantized`` is on."""
        return self._cached is not None

    def _pop_return_dict(self, kwargs: dict[str, Any]) -> bool | None:
        sig = self.program.signature
        if _RETURN_DICT not in {n for n, _ in sig.params}:
            return None
        value = kwargs.pop(_RETURN_DICT, None)
        if value is None:
            value = sig.defaults.get(_RETURN_DICT, True)
        return bool(value)

    def _format_output(self, out: Any, return_dict: bool) -> Any:
        if return_dict and self._output_class is not None:
            return out if isinstance(out, self._output_class) else self._output_class(*_as_tuple(out))
        return _as_tuple(out) if not return_dict else out

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
        with contained_noise():  # torch.onnx's torchvision / nn_module_stack lines; stepq's warnings stay
            return backend.export(self, path, **options)

    def export_onnx(self, path: str | os.PathLike[str], **options: Any) -> Any:
        """Write quantized ONNX for ONNX Runtime: ``export("onnx", path, **options)``; a PTQD
        mixed-precision model becomes one file with an If over its widths (docs/ONNX.md)."""
        return self.export("onnx", path, **options)

    def extra_repr(self) -> str:
        return f"model={self.program.model_name}, recipe={self.recipe.name!r}, timestep={self.program.timestep_arg!r}"


def load(path: str | os.PathLike[str], *, device: str | torch.device | None = None,
         map_location: str | torch.device | None = None, cache_dequantized: bool = False) -> QuantizedModel:
    """Load a QuantizedModel saved with ``QuantizedModel.save`` (safetensors + JSON, checked).

    Args:
        path: the artefact directory.
        device: where it runs (default CPU): its tensors are read onto that device and the graph's
            ``device=`` arguments point at it.
        map_location: the same, under ``torch.load``'s name (give one of the two).
        cache_dequantized: keep the weights dequantized in memory (``QuantizedModel.cache_dequantized``):
            the same outputs, a faster PyTorch forward, the FP weights' bytes more memory.
    """
    if device is not None and map_location is not None and torch.device(device) != torch.device(map_location):
        raise TypeError(f"load: device={device!r} and map_location={map_location!r} disagree; give one")
    where = device if device is not None else map_location
    if isinstance(where, Mapping):
        raise TypeError("load: map_location must be a device (a str or torch.device), not a mapping")
    qm = QuantizedModel(load_program(path, device=where))
    if where is not None:
        _retarget(qm.gm, torch.device(where))
    return qm.cache_dequantized(cache_dequantized)
