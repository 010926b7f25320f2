"""The `stepq` command: quantize a shipped model, report, export ONNX, typed errors as exit code 2."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from stepq.cli import main


def test_presets_lists_every_method(capsys):
    assert main(["presets"]) == 0
    names = capsys.readouterr().out.split()
    assert {"w8a8", "w4a4", "w4a4-tdq", "w4a4-tdq-qat", "mixed-ptqd"} <= set(names)


def test_quantize_report_export_round_trip(tmp_path, capsys):
    art, path = tmp_path / "m", tmp_path / "m.onnx"
    assert main(["quantize", "digits-ddpm", "w8a8", str(art), "--calib-samples", "1", "--steps", "3", "--quiet"]) == 0
    assert (art / "manifest.json").is_file() and (art / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["report", str(art)]) == 0
    table = capsys.readouterr().out
    assert "stepq w8a8" in table and "conv_in" in table
    assert main(["export-onnx", str(art), str(path)]) == 0
    onnx.checker.check_model(str(path))
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QuantizeLinear" in kinds or "DynamicQuantizeLinear" in kinds
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("argv, needle", [
    (["quantize", "digits-ddpm", "w3a3", "OUT"], "unknown preset 'w3a3'"),
    (["quantize", "digits-nope", "w8a8", "OUT"], "digits-nope"),
    (["report", "MISSING"], "MISSING"),
])
def test_typed_errors_exit_2_with_the_culprit_named(argv, needle, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("OUT", "MISSING") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("stepq: error:") and needle in err
    assert not (tmp_path / "OUT").exists()
