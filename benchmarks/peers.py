"""The peers stepq is compared with, run in the same process on the same inputs.

* ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax or
  Percentile calibration) applied to the FP model's ONNX export;
* PyTorch PT2E W8A8 through torchao 0.18 (PT2E left ``torch.ao`` in torch 2.13): the
  X86InductorQuantizer, or the XNNPACK-style test quantizer where X86 fails (it puts a histogram
  observer on UNet2DModel's int64 ``timestep * ones`` and crashes: FACTS.md Q4).

``OrtDenoiser`` wraps an ``InferenceSession`` so that it can be called like the PyTorch model
(keyword arguments, non-tensor ones ignored) and returns a one-element tuple, which is what
``stepq.calibration.samplers.make_denoiser`` expects.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch.export import Dim

log = logging.getLogger(__name__)

__all__ = ["OrtDenoiser", "export_fp_onnx", "ort_quantize_static", "pt2e_w8a8"]


def _tensor_inputs(inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def export_fp_onnx(model: torch.nn.Module, example: Mapping[str, Any], path: str | Path) -> Path:
    """The FP model as ONNX (dynamo exporter, opset 21, dynamic batch on every tensor input)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dyn = {k: ({0: Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() >= 1 else None) for k, v in example.items()}
    torch.onnx.export(model, (), str(path), kwargs=dict(example), dynamic_shapes=dyn, dynamo=True, opset_version=21,
                      verbose=False, optimize=True)
    return path


class OrtDenoiser:
    """Call an ONNX denoiser like the PyTorch model."""

    def __init__(self, path: str | Path, *, threads: int | None = None, disabled_optimizers: list[str] | None = None):
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=disabled_optimizers or [])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        # what stepq.calibration.samplers.default_make_inputs reads to name the sample argument (hidden_states for a DiT)
        self.signature = types.SimpleNamespace(params=[(name, None) for name in self.inputs])

    def feeds(self, kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        for name, meta in self.inputs.items():
            v = kwargs[name]
            arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if meta.type == "tensor(int64)":
                arr = arr.astype(np.int64)
            elif meta.type == "tensor(float)":
                arr = arr.astype(np.float32)
            out[name] = arr
        return out

    def __call__(self, **kwargs: Any) -> tuple[torch.Tensor]:
        return (torch.from_numpy(self.session.run(None, self.feeds(kwargs))[0]),)


class _Reader:
    def __init__(self, denoiser_inputs: list[dict[str, np.ndarray]]):
        self.items = iter(denoiser_inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)

    def rewind(self) -> None:  # the ORT API asks for it in some versions
        pass


def ort_quantize_static(fp_path: str | Path, out_path: str | Path, calibration: Iterable[Mapping[str, Any]],
                        method: str = "minmax", op_types: list[str] | None = None) -> Path:
    """ORT's own static W8A8 (QDQ, per-channel weights) of the FP ONNX model. ``op_types`` None is
    ORT's default (every op type it can quantize: also Mul/Add/Concat/…, which puts the timestep
    itself and the sinusoidal embedding's inputs on an 8-bit grid); ``["Conv", "MatMul", "Gemm"]``
    quantizes what stepq's presets quantize."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    session_inputs = OrtDenoiser(fp_path)
    feeds = [session_inputs.feeds(c) for c in calibration]
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp_path), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception as e:  # pre-processing is a recommendation, not a requirement
            log.warning("quant_pre_process failed (%s); quantizing the raw export", e)
            src = Path(fp_path)
        quantize_static(str(src), str(out_path), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], op_types_to_quantize=op_types,
                        extra_options={"CalibPercentile": 99.99} if method == "percentile" else {})
    return Path(out_path)


def pt2e_w8a8(model: torch.nn.Module, example: Mapping[str, Any], calibration: Iterable[Mapping[str, Any]],
              quantizer: str = "x86") -> torch.nn.Module:
    """PT2E W8A8 of ``model`` (torchao), calibrated on ``calibration``; a callable GraphModule."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if quantizer == "x86":
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        q = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    else:
        from torchao.testing.pt2e._xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    dyn = {k: ({0: Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() >= 1 else None) for k, v in example.items()}
    gm = torch.export.export(copy.deepcopy(model).eval(), (), dict(example), dynamic_shapes=dyn, strict=False).module()
    gm = prepare_pt2e(gm, q)
    with torch.no_grad():
        for c in calibration:
            gm(**c)
    return convert_pt2e(gm)
