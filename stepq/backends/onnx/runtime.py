"""``load(path)``: an exported stepq ONNX model as a callable with the original model's signature.

    model = stepq.backends.onnx.load("dit.onnx")            # CPU
    model = stepq.backends.onnx.load("dit.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    out = model(hidden_states=x, timestep=t, class_labels=y, return_dict=False)   # a tuple, like qm(...)

The call is bound exactly as ``QuantizedModel`` binds it (``InputSignature`` from the file's
metadata: positional or keyword arguments, the captured constants, a scalar timestep broadcast to
the batch); outputs are torch tensors in the model's output structure, so the callable is a drop-in
``model`` for ``stepq.calibration.samplers.make_denoiser``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch.utils import _pytree as pytree

from stepq.backends.onnx.postprocess import read_metadata
from stepq.compiler.errors import ArtifactError
from stepq.compiler.input_checks import TimestepRange, check_call
from stepq.compiler.program import InputSignature

__all__ = ["DISABLED_OPTIMIZERS", "OnnxModel", "load", "session_options", "u8s8_saturates"]

_NP = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
       "tensor(double)": np.float64, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


def u8s8_saturates(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """Whether ONNX Runtime's uint8 × int8 integer GEMM on this CPU can saturate: an x86 CPU without
    AVX512-VNNI, AVX-VNNI or AMX, where MLAS multiplies with VPMADDUBSW, which adds each pair of u8·s8
    products in saturating int16 (measured on an AVX2 AMD EPYC: errors up to 63 247 in a K = 256 dot
    product; the u8 × u8 kernel was exact; ORT's quantization docs advise 7-bit weights there).
    False on other architectures and where the flags cannot be read (not x86 Linux)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return bool(flags) and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


#: ORT's MatMulAddFusion rewrites a Q/DQ-fed MatMul + bias Add into a float Gemm, or fails session
#: creation with int8 activations and per-channel weights (FACTS Q3). stepq emits its integer kernels
#: directly, so this only matters for Q/DQ fallbacks; float layers lose the MatMul+Add → Gemm fusion.
DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


def session_options(*, threads: int | None = None, optimized_model_path: str | os.PathLike[str] | None = None,
                    log_severity: int = 3) -> ort.SessionOptions:
    """The session options stepq's ONNX models need: every graph optimisation on (the QDQ fusions
    and constant folding of Cast(INT4 → INT8) run at level ≥ basic), float32 compute in ORT's own
    MatMulNBits fusions, optional thread count, and optionally ``optimized_model_filepath`` to
    inspect what ORT made of the graph."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = log_severity
    # ORT's own DQ(INT4/INT8) → MatMul fusion into MatMulNBits (Q/DQ fallbacks) would otherwise use
    # accuracy level 4, requantizing activations to int8 blockwise; 0 keeps float32 like the reference.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    return opts


def _providers(providers: Sequence[str] | None) -> list[str]:
    if providers is None:
        return ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"execution providers {missing} are not available in this onnxruntime "
                         f"(available: {sorted(available)}); CUDA needs the onnxruntime-gpu package")
    return list(providers)


class OnnxModel:
    """An ONNX Runtime session called like the compiled model."""

    def __init__(self, path: str | os.PathLike[str], *, providers: Sequence[str] | None = None,
                 threads: int | None = None, options: ort.SessionOptions | None = None,
                 optimized_model_path: str | os.PathLike[str] | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise ArtifactError(f"no ONNX model at {self.path}")
        opts = options or session_options(threads=threads, optimized_model_path=optimized_model_path)
        self.session = ort.InferenceSession(str(self.path), opts, providers=_providers(providers),
                                            disabled_optimizers=list(DISABLED_OPTIMIZERS))
        meta = read_metadata(self.session.get_modelmeta().custom_metadata_map)
        if "signature" not in meta:
            raise ArtifactError(f"{self.path} has no stepq metadata; export it with QuantizedModel.export_onnx")
        self.metadata = meta
        self.signature = InputSignature.from_dict(meta["signature"])
        self.sample_arg: str | None = meta.get("sample_arg")
        self.timestep_range = (TimestepRange(int(meta["num_train_timesteps"]), float(meta.get("timestep_scale", 1.0)),
                                             str(meta.get("timestep_policy", "error")))
                               if "num_train_timesteps" in meta else None)
        self._inputs = [(n, k) for n, k in meta["inputs"]]
        self._types = {i.name: _NP.get(i.type, np.float32) for i in self.session.get_inputs()}
        self._out_spec = pytree.treespec_loads(meta["out_spec"]) if meta.get("out_spec") else None

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = check_call(self.signature, self.signature.bind(args, kwargs, timesteps=self.timestep_range),
                           sample_arg=self.sample_arg)
        batch = None
        if self.sample_arg is not None and isinstance(bound.get(self.sample_arg), torch.Tensor):
            batch = bound[self.sample_arg].shape[0]
        return self.signature.expand_timestep(bound, batch)

    def feeds(self, bound: dict[str, Any]) -> dict[str, np.ndarray]:
        leaves, _ = pytree.tree_flatten_with_path(((), bound))
        by_path = {pytree.keystr(p): v for p, v in leaves}
        out: dict[str, np.ndarray] = {}
        for name, keypath in self._inputs:
            v = by_path[keypath]
            arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            out[name] = np.ascontiguousarray(arr, dtype=self._types[name])
        return out

    def run_raw(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outputs = [torch.from_numpy(np.asarray(o)) for o in self.run_raw(self.feeds(self.bind(args, kwargs)))]
        if self._out_spec is None:
            return tuple(outputs)
        return pytree.tree_unflatten(outputs, self._out_spec)

    def __repr__(self) -> str:
        return (f"OnnxModel({str(self.path)!r}, model={self.metadata.get('model_name')}, "
                f"recipe={self.metadata.get('recipe')!r}, providers={self.session.get_providers()})")


def load(path: str | os.PathLike[str], *, providers: Sequence[str] | None = None, threads: int | None = None,
         optimized_model_path: str | os.PathLike[str] | None = None) -> OnnxModel:
    """Open an exported stepq ONNX model in ONNX Runtime (see ``OnnxModel``)."""
    return OnnxModel(path, providers=providers, threads=threads, optimized_model_path=optimized_model_path)
