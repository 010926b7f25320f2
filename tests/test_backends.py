"""The backend table and ``qm.export(backend, path)``: lookup, typed errors, the reference, ONNX and
CuPy backends behind one protocol."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
import torch
from helpers import calib_set, denoiser_inputs

import stepq
import stepq.backends as backends
from stepq.backends.onnx.export import ExportResult, OnnxInput, tensor_leaves
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


@pytest.fixture(scope="module")
def qm():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))
    data = calib_set(3)
    return stepq.quantize(m, data[0], "w8a8", calibration=data, progress=False)


# -- the table ---------------------------------------------------------------------------------


def test_table_lists_reference_onnx_and_cupy():
    assert [e.name for e in backends.BACKENDS] == ["reference", "onnx", "cupy"]
    assert backends.available() == ("reference", "onnx", "cupy")  # cupy partitions and lowers anywhere
    text = backends.describe()
    [cupy] = [line for line in text.splitlines() if line.startswith("cupy")]
    assert "CUDA device" in cupy and "emulation" in cupy and "; available" in cupy
    for name in backends.available():
        b = backends.get_backend(name)
        assert isinstance(b, backends.Backend) and b.name == name and b.table


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(backends.UnknownBackendError, match=r"unknown backend 'tensorrt'; available backends: "
                                                          r"reference, onnx, cupy$"):
        backends.get_backend("tensorrt")


def test_a_slot_raises_a_typed_error(monkeypatch):
    slot = backends.BackendEntry("later", None, "a backend not written yet", planned="the next issue")
    monkeypatch.setattr(backends.table, "_BY_NAME", {**backends.table._BY_NAME, "later": slot})
    monkeypatch.setattr(backends.table, "BACKENDS", (*backends.BACKENDS, slot))
    with pytest.raises(backends.BackendNotImplementedError, match="'later' is not available: not implemented yet: "
                                                                  "the next issue"):
        backends.get_backend("later")


def test_importing_stepq_and_the_table_loads_no_onnx_runtime():
    code = ("import sys, stepq, stepq.backends as b; b.available(); b.describe(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'onnxscript', 'onnx_ir', 'cupy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_backend_object_plugs_in_without_the_table(qm, tmp_path):
    class Recording:
        name = "recording"
        table = backends.get_backend("reference").table

        def __init__(self):
            self.calls: list[str] = []

        def partition(self, qm, *, strict=False):
            return backends.PartitionResult(self.name)

        def lower(self, qm, *, strict=False):
            return backends.Lowered(self.name, qm.gm, self.partition(qm))

        def export(self, qm, path, **options):
            self.calls.append(f"export {path.name} {options}")
            return "written"

        def load(self, path, **options):
            return qm

    b = Recording()
    assert isinstance(b, backends.Backend)
    assert qm.export(b, tmp_path / "x", level=3) == "written" and b.calls == ["export x {'level': 3}"]


# -- reference ---------------------------------------------------------------------------------


def test_reference_export_writes_the_artefact_and_loads_an_equal_model(qm, tmp_path):
    ref = backends.get_backend("reference")
    result = qm.export("reference", tmp_path / "ref")
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["manifest.json", "model.safetensors"]
    assert result.path == tmp_path / "ref" and result.file_bytes > 0
    assert not result.partition.rejections and result.partition.count("pytorch") > 0
    loaded = ref.load(tmp_path / "ref")
    assert isinstance(loaded, stepq.QuantizedModel)
    for b, ts in ((2, (5, 900)), (3, (0, 500, 999))):
        x = denoiser_inputs(b, ts, seed=b)
        assert torch.equal(loaded(**x), qm(**x))
    lowered = ref.lower(qm)
    assert lowered.gm is not qm.gm and not lowered.counts
    x = denoiser_inputs(2, (100, 100))
    assert torch.equal(lowered.gm(**qm.program.bind((), x)), qm(**x))
    with pytest.raises(TypeError, match="no export options"):
        qm.export("reference", tmp_path / "r2", opset=21)


# -- onnx --------------------------------------------------------------------------------------


def test_export_onnx_is_export_onnx_backend(qm, tmp_path):
    from stepq.backends.onnx import count_kernels, load

    a = qm.export("onnx", tmp_path / "a.onnx")
    b = qm.export_onnx(tmp_path / "b.onnx")
    assert type(a) is type(b) is ExportResult
    assert a.partition.counts() == b.partition.counts() and a.lowered == b.lowered and a.translator == b.translator
    assert a.inputs == b.inputs and a.file_bytes == b.file_bytes
    ka, kb = count_kernels(tmp_path / "a.onnx"), count_kernels(tmp_path / "b.onnx")
    assert ka.integer == kb.integer and ka.float == kb.float and ka.n_integer == len(qm.quantized_layers())
    ma, mb = load(tmp_path / "a.onnx", threads=1), load(tmp_path / "b.onnx", threads=1)
    x = denoiser_inputs(2, (300, 300), seed=2)
    assert torch.equal(ma(**x), mb(**x))
    assert [i.op_type for i in onnx.load(str(tmp_path / "a.onnx")).graph.node] == \
           [i.op_type for i in onnx.load(str(tmp_path / "b.onnx")).graph.node]


def test_onnx_lowering_runs_in_pytorch_and_equals_reference(qm):
    lowered = backends.get_backend("onnx").lower(qm)
    assert lowered.backend == "onnx" and lowered.counts["linear_integer"] > 0
    assert not any(n.target is torch.ops.stepq.fake_quant.default for n in lowered.gm.graph.nodes)
    x = denoiser_inputs(2, (100, 100))
    torch.testing.assert_close(lowered.gm(**qm.program.bind((), x)), qm(**x), rtol=1e-5, atol=1e-5)


def test_inputs_map_onnx_names_to_whole_call_arguments():
    t = torch.zeros(2)
    leaves = tensor_leaves({"sample": t, "timestep": t, "added_cond_kwargs": {"timestep": t, "text": t}})
    assert [(arg, whole) for _, arg, whole in leaves] == [
        ("sample", True), ("timestep", True), ("added_cond_kwargs", False), ("added_cond_kwargs", False)]
    result = ExportResult(None, backends.PartitionResult("onnx"), {}, [], 0, 0.0, False,  # type: ignore[arg-type]
                          inputs=[OnnxInput("cond_t", "added_cond_kwargs", "[1]['added_cond_kwargs']['timestep']",
                                            False),
                                  OnnxInput("ts", "timestep", "[1]['timestep']", True)])
    assert result.input_name("timestep") == "ts"  # not the nested one whose key path also says 'timestep'
    with pytest.raises(KeyError) as e:
        result.input_name("sample")
    assert e.value.args[0].startswith("no ONNX input is the argument 'sample'; inputs: [('cond_t'")
