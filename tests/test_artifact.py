"""save/load: safetensors + JSON, bit-exact round trips, typed errors, nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import calib_set, denoiser_inputs

import stepq
from stepq.artifact import store as artifact
from stepq.testing.families import FAMILIES
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


@pytest.fixture(scope="module")
def qm():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=2))
    data = calib_set(2)
    return stepq.quantize(m, data[0], "w4a8", calibration=data, progress=False)


def test_round_trip_is_bit_exact(qm, tmp_path):
    qm.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["manifest.json", "model.safetensors"]
    loaded = stepq.load(tmp_path / "m")
    for b, ts in ((2, (5, 900)), (3, (0, 1, 999))):
        x = denoiser_inputs(b, ts, seed=b)
        assert torch.equal(loaded(**x), qm(**x))
    assert loaded.recipe == qm.recipe
    assert [r.layer for r in loaded.report(print_table=False)] == [r.layer for r in qm.report(print_table=False)]
    assert loaded.quantized_layers() == qm.quantized_layers()
    # saving again over an existing artefact replaces it
    loaded.save(tmp_path / "m")
    assert torch.equal(stepq.load(tmp_path / "m")(**denoiser_inputs(2, (1, 2))), qm(**denoiser_inputs(2, (1, 2))))


def test_round_trip_of_a_diffusers_model_with_dict_inputs(tmp_path):
    f = FAMILIES["pixart"]
    m = f.model()
    x = f.example_inputs()
    q = stepq.quantize(m, x, "w8a8", calibration=[x, f.example_inputs(t=100, seed=1)], progress=False)
    q.save(tmp_path / "pixart")
    loaded = stepq.load(tmp_path / "pixart")
    assert torch.equal(loaded(**x)[0], q(**x)[0])


def test_corrupt_and_missing_files_raise_artifact_errors(qm, tmp_path):
    d = tmp_path / "m"
    qm.save(d)
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(stepq.ArtifactError, match="model.safetensors: checksum mismatch"):
        stepq.load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(stepq.ArtifactError, match="tensor file is missing"):
        stepq.load(d)
    with pytest.raises(stepq.ArtifactError, match="no manifest"):
        stepq.load(tmp_path / "nowhere")


def test_manifest_cannot_smuggle_code(qm, tmp_path):
    d = tmp_path / "m"
    qm.save(d)
    manifest = json.loads((d / "manifest.json").read_text())
    node = next(n for n in manifest["graph"]["nodes"] if n["op"] == "call_function")
    node["target"] = "os.system"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(stepq.ArtifactError, match="manifest was edited"):  # the digest refuses it first
        stepq.load(d)
    # and with the digest recomputed, the closed set of call targets still does
    from stepq.artifact.store import _manifest_sha256

    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(stepq.ArtifactError, match="refusing to load call target 'os.system'"):
        stepq.load(d)
    manifest["version"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(stepq.ArtifactError, match="version 99 is not supported"):
        stepq.load(d)


def test_failed_save_leaves_the_previous_artefact_and_no_temporaries(qm, tmp_path, monkeypatch):
    d = tmp_path / "m"
    qm.save(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        qm.save(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(OSError):
        qm.save(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_refuses_to_overwrite_a_foreign_directory(qm, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(stepq.ArtifactError, match="not a stepq artefact; refusing to overwrite"):
        qm.save(d)
    assert (d / "notes.txt").read_text() == "keep me"
