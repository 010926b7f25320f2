"""A QuantizedModel in place of the diffusers model it replaces: config, attributes, dtype / device,
both return_dict conventions, any batch (a batch-1 example included), the artefact round trip
(config, output class, FakeTensor metadata: the same integer kernels in ONNX), load's device."""

from __future__ import annotations

import copy
import warnings

import onnx
import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d import UNet2DOutput

import stepq
from stepq.backends import get_backend
from stepq.backends.onnx import count_kernels
from stepq.calibration.samplers import model_output
from stepq.compiler.errors import FallbackWarning, UnsupportedConversionError
from stepq.testing.families import FAMILIES

FAMILY = FAMILIES["unet"]


def _calib(model, n_items: int = 3, batch: int = 2) -> list[dict]:
    return [FAMILY.example_inputs(batch=batch, t=t, seed=i) for i, t in enumerate((900.0, 500.0, 100.0)[:n_items])]


@pytest.fixture(scope="module")
def model():
    return FAMILY.model()


@pytest.fixture(scope="module")
def qm(model):
    data = _calib(model)
    return stepq.quantize(model, data[0], "w8a8", data, progress=False)


@pytest.fixture(scope="module")
def loaded(qm, tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "m"
    qm.save(str(path))
    return stepq.load(str(path))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _x(batch: int, seed: int = 7):
    return torch.randn((batch, *FAMILY.sample_shape), generator=torch.Generator().manual_seed(seed))


def test_config_and_its_attributes(qm, model):
    assert isinstance(qm.config, FrozenDict)
    assert dict(qm.config) == {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items()}
    assert qm.config.sample_size == qm.sample_size == model.config.sample_size == 16
    assert qm.in_channels == 3 and qm.config["block_out_channels"] == [32, 64]
    with pytest.raises(AttributeError, match="no_such_entry"):
        _ = qm.no_such_entry


def test_return_dict_both_ways_whatever_was_captured(qm, model):
    assert qm.program.signature.constants == {"return_dict": False}  # captured as the pipelines' loops call
    x, t = _x(3), torch.tensor(400)
    default, as_dict = qm(x, t), qm(x, t, return_dict=True)
    as_tuple = qm(x, t, return_dict=False)
    assert isinstance(default, UNet2DOutput) and isinstance(as_dict, UNet2DOutput)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(default.sample, as_tuple[0]) and torch.equal(as_dict.sample, as_tuple[0])
    with torch.no_grad():
        fp = model(x, t).sample
    assert _rel(as_tuple[0], fp) < 0.1


def test_captured_with_return_dict_true_also_serves_false(model):
    data = [{k: v for k, v in d.items() if k != "return_dict"} for d in _calib(model, 2)]
    q = stepq.quantize(model, data[0], "w8a8", data, progress=False)
    x, t = _x(2), torch.tensor([300, 300])
    assert isinstance(q(x, t), UNet2DOutput)
    assert torch.equal(q(x, t, return_dict=False)[0], q(x, t).sample)


def test_dtype_device_and_conversions(qm):
    assert qm.dtype == torch.float32 and qm.device == torch.device("cpu")
    x, t = _x(2), torch.tensor(250)
    before = qm(x, t).sample
    assert qm.to("cpu") is qm and qm.to(torch.float32) is qm and qm.float() is qm and qm.cpu() is qm
    assert torch.equal(qm(x, t).sample, before)
    for convert, call in ((lambda m: m.half(), ".half"), (lambda m: m.to(torch.bfloat16), ".to"),
                          (lambda m: m.to("cpu", torch.float16), ".to"), (lambda m: m.double(), ".double")):
        with pytest.raises(UnsupportedConversionError, match=rf"\{call}\(torch\.\w+\).*float32 only.*\.to\(device\)"):
            convert(qm)
    assert all(p.dtype != torch.float16 for p in qm.gm.parameters())  # nothing was converted half-way
    assert torch.equal(qm(x, t).sample, before)


def test_any_batch_including_twice_the_calibration_batch(qm):
    x = _x(4)  # calibrated at batch 2
    t = torch.tensor(600)
    whole = qm(x, t, return_dict=False)[0]
    rows = torch.cat([qm(x[i:i + 1], t, return_dict=False)[0] for i in range(4)])
    # the same up to a few activations rounded to the neighbouring level (float sums differ by batch)
    assert whole.shape == rows.shape and _rel(whole, rows) < 3e-2


@pytest.mark.slow
def test_a_batch_one_example_keeps_the_batch_dynamic(model, tmp_path):
    data = _calib(model, 2, batch=1)
    q = stepq.quantize(model, data[0], "w8a8", data, progress=False)
    sample = q.program.placeholder("sample").meta["val"]
    assert isinstance(sample.shape[0], torch.SymInt)
    x, t = _x(3), torch.tensor(700)
    whole = q(x, t, return_dict=False)[0]
    rows = torch.cat([q(x[i:i + 1], t, return_dict=False)[0] for i in range(3)])
    assert whole.shape == rows.shape and _rel(whole, rows) < 3e-2
    # ... and in the ONNX file: a symbolic batch, run at batch 3
    from stepq.backends.onnx import load as load_onnx

    q.export_onnx(tmp_path / "b1.onnx")
    dim0 = onnx.load(str(tmp_path / "b1.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    out = model_output(load_onnx(tmp_path / "b1.onnx", threads=1)(sample=x, timestep=torch.full((3,), 700),
                                                                  return_dict=False))
    assert out.shape == whole.shape
    assert _rel(out, whole) < 3e-2


def test_artefact_keeps_config_output_class_and_fake_metadata(qm, loaded):
    assert dict(loaded.config) == dict(qm.config) and loaded.in_channels == 3
    x, t = _x(2), torch.tensor(123)
    assert isinstance(loaded(x, t), UNet2DOutput)
    assert torch.equal(loaded(x, t).sample, qm(x, t).sample)
    had = {n.name for n in qm.gm.graph.nodes if n.op in ("placeholder", "call_function") and n.meta.get("val") is not None}
    has = {n.name for n in loaded.gm.graph.nodes if n.meta.get("val") is not None}
    assert had and had <= has, sorted(had - has)[:5]
    assert loaded.program.placeholder("return_dict").meta["val"] is False
    assert isinstance(loaded.program.placeholder("sample").meta["val"].shape[0], torch.SymInt)


@pytest.mark.slow
def test_loaded_artefact_exports_the_same_integer_kernels(qm, loaded, tmp_path):
    onnx_backend = get_backend("onnx")
    mem, disk = onnx_backend.partition(qm), onnx_backend.partition(loaded)
    assert mem.counts() == disk.counts() and not disk.rejections
    assert mem.counts()["conv2d_integer"] == 25
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # no fallback, so no warning
        qm.export_onnx(tmp_path / "mem.onnx")
        loaded.export_onnx(tmp_path / "disk.onnx")
    a, b = count_kernels(tmp_path / "mem.onnx"), count_kernels(tmp_path / "disk.onnx")
    assert a.integer == b.integer and a.n_integer >= 25
    assert len(a.quantized_in_float) == len(b.quantized_in_float)


@pytest.mark.slow
def test_a_fallback_to_float_kernels_is_a_warning(qm, tmp_path):
    broken = copy.deepcopy(qm)
    conv = next(n for n in broken.gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    conv.args[0].meta.pop("val")  # what a loaded graph looked like before its metadata was restored
    with pytest.warns(FallbackWarning, match=r"(?s)1 quantized node\(s\) run as float kernels.*not a known 4-D tensor"):
        broken.export_onnx(tmp_path / "fallback.onnx")


def test_load_takes_a_device(tmp_path, qm, loaded):
    path = tmp_path / "m"
    qm.save(str(path))
    x, t = _x(2), torch.tensor(42)
    for kw in ({"device": "cpu"}, {"map_location": "cpu"}, {"map_location": torch.device("cpu")}):
        q = stepq.load(str(path), **kw)
        assert q.device == torch.device("cpu") and torch.equal(q(x, t).sample, qm(x, t).sample)
    with pytest.raises(TypeError, match="disagree"):
        stepq.load(str(path), device="cpu", map_location="meta")
    with pytest.raises(TypeError, match="mapping"):
        stepq.load(str(path), map_location={"cuda:0": "cpu"})


@pytest.mark.slow
def test_cli_quantize_with_one_calibration_sample_keeps_the_batch(tmp_path):
    from stepq.backends.onnx import load as load_onnx
    from stepq.cli import main

    out = tmp_path / "ddpm-w8a8"
    assert main(["quantize", "digits-ddpm", "w8a8", str(out), "--calib-samples", "1", "--steps", "2", "--quiet"]) == 0
    q = stepq.load(str(out))
    assert q.program.signature.tensors["sample"].shape[0] == 1  # calibrated at batch 1 ...
    assert isinstance(q.program.placeholder("sample").meta["val"].shape[0], torch.SymInt)  # ... batch symbolic
    x = torch.randn(3, 1, 16, 16)
    ref = q(x, torch.tensor(500), return_dict=False)[0]
    assert main(["export-onnx", str(out), str(tmp_path / "m.onnx")]) == 0
    dim0 = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param
    got = model_output(load_onnx(tmp_path / "m.onnx", threads=1)(sample=x, timestep=torch.full((3,), 500),
                                                                  return_dict=False))
    assert got.shape == ref.shape and _rel(got, ref) < 3e-2
