"""stepq.zoo and stepq.data: the shipped checkpoints load offline and behave as documented."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from stepq import zoo
from stepq.data import load_digits_images


@pytest.fixture
def offline(monkeypatch):
    """No hub and no network: loading must only read the files shipped in the package."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access during a zoo test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _inputs(name: str) -> dict[str, torch.Tensor]:
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 500, 999])
    if name == "digits-ddpm":
        return {"sample": x, "timestep": t}
    return {"hidden_states": x, "timestep": t, "class_labels": torch.tensor([0, 9, zoo.NULL_CLASS])}


@pytest.mark.parametrize("name", zoo.MODELS)
def test_every_checkpoint_loads_offline(name, offline):
    model = zoo.load(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert zoo.info(name)["parameters"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        if name == "digits-classifier":
            x, _ = load_digits_images("test")
            assert model(x[:5]).shape == (5, 10)
            assert model.features(x[:5]).shape == (5, model.config["feature_dim"])
        else:
            out = model(**_inputs(name)).sample
            assert out.shape == (3, 1, 16, 16)
            assert torch.isfinite(out).all()


def test_unknown_name_raises_a_typed_error():
    with pytest.raises(zoo.UnknownModelError, match="digits-ddpm") as info:
        zoo.load("digits-gan")
    assert isinstance(info.value, KeyError)
    assert "digits-gan" in str(info.value)
    with pytest.raises(KeyError):
        zoo.entry("nope")


def test_entry_of_a_non_denoiser_raises():
    with pytest.raises(ValueError, match="not a diffusion model"):
        zoo.entry("digits-classifier")


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(zoo.CheckpointError, match=r"digits-ddpm\.json"):
        zoo.load("digits-ddpm", tmp_path)
    _, cfg = zoo.checkpoint_paths("digits-ddpm")
    shutil.copy(cfg, tmp_path / cfg.name)
    with pytest.raises(zoo.CheckpointError, match=r"digits-ddpm\.safetensors"):
        zoo.load("digits-ddpm", tmp_path)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    weights, cfg = zoo.checkpoint_paths("digits-classifier")
    shutil.copy(cfg, tmp_path / cfg.name)
    (tmp_path / weights.name).write_bytes(b"\x00garbage, not a safetensors file")
    with pytest.raises(zoo.CheckpointError, match=r"digits-classifier\.safetensors"):
        zoo.load("digits-classifier", tmp_path)
    (tmp_path / cfg.name).write_text("{not json")
    with pytest.raises(zoo.CheckpointError, match=r"digits-classifier\.json"):
        zoo.load("digits-classifier", tmp_path)


def test_weights_that_do_not_match_the_config_are_reported(tmp_path):
    weights, cfg = zoo.checkpoint_paths("digits-classifier")
    shutil.copy(weights, tmp_path / weights.name)
    record = json.loads(cfg.read_text())
    record["config"]["feature_dim"] = 64
    (tmp_path / cfg.name).write_text(json.dumps(record))
    with pytest.raises(zoo.CheckpointError, match="do not match"):
        zoo.load("digits-classifier", tmp_path)


def test_entry_matches_the_training_setup():
    from diffusers import DDIMScheduler, DDPMScheduler

    ddpm, dit = zoo.entry("digits-ddpm"), zoo.entry("digits-dit")
    for spec in (ddpm, dit):
        assert isinstance(spec.scheduler, DDPMScheduler)
        assert spec.scheduler.config.num_train_timesteps == 1000
        assert spec.scheduler.config.prediction_type == "epsilon"
        assert spec.sample_shape == (1, 16, 16)
        assert isinstance(spec.make_scheduler("ddim"), DDIMScheduler)
    assert zoo.entry("digits-ddpm").scheduler is not ddpm.scheduler  # a fresh scheduler every time
    assert ddpm.conditions is None and ddpm.uncond is None and ddpm.guidance_scale == 1.0
    assert (dit.num_classes, dit.null_class) == (10, 10)
    assert dit.guidance_scale == zoo.read_config("digits-dit")["guidance_scale"]
    cond = dit.conditions(25, torch.Generator().manual_seed(0))
    labels = cond["class_labels"]
    assert labels.shape == (25,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 5 + [2] * 5  # balanced
    assert (dit.uncond(cond)["class_labels"] == zoo.NULL_CLASS).all()


def test_shipped_dit_has_no_per_block_label_dropout():
    model = zoo.load("digits-dit")
    embedders = [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]
    assert len(embedders) == model.config.num_layers
    assert all(m.dropout_prob == 0.0 and m.embedding_table.num_embeddings == 11 for m in embedders)
    kw = _inputs("digits-dit")
    with torch.no_grad():
        ref = model(**kw).sample
        model.train()
        torch.testing.assert_close(model(**kw).sample, ref)  # train mode no longer drops labels
    model.eval()


def test_generate_is_seeded_and_shaped():
    model, spec = zoo.load("digits-dit"), zoo.entry("digits-dit")
    a, la = zoo.generate(model, spec, 4, num_inference_steps=2, scheduler="ddim", eta=0.0, seed=3)
    b, lb = zoo.generate(model, spec, 4, num_inference_steps=2, scheduler="ddim", eta=0.0, seed=3)
    assert a.shape == (4, 1, 16, 16) and a.abs().max() <= 1.0
    torch.testing.assert_close(a, b)
    assert torch.equal(la, lb)
    with pytest.raises(ValueError, match="labels"):
        zoo.generate(model, spec, 4, num_inference_steps=2, labels=torch.zeros(3, dtype=torch.long))


def test_digits_split_is_fixed_stratified_and_scaled():
    x_tr, y_tr = load_digits_images("train")
    x_te, y_te = load_digits_images("test")
    x_all, _ = load_digits_images("all")
    assert (x_tr.shape, x_te.shape, x_all.shape) == ((1437, 1, 16, 16), (360, 1, 16, 16), (1797, 1, 16, 16))
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    per_class = torch.bincount(torch.cat([y_tr, y_te]), minlength=10)
    assert (torch.bincount(y_te, minlength=10) - 0.2 * per_class).abs().max() <= 1  # stratified
    torch.testing.assert_close(load_digits_images("test")[0], x_te)  # the same split on every call
    x8, _ = load_digits_images("test", size=8)
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float()
    # 8×8 keeps the original pixels: every held-out image is one of the raw digits, mapped v ↦ v/8 − 1
    flat = (raw / 8 - 1).reshape(len(raw), -1)
    dist = torch.cdist(x8.reshape(len(x8), -1), flat).min(dim=1).values
    assert dist.max() < 1e-5
    with pytest.raises(ValueError, match="split"):
        load_digits_images("valid")


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpmsolver++", "euler_a"])
def test_make_scheduler_keeps_the_training_noise_schedule(kind):
    """Every sampler kind is built over the model's own β schedule (so a sampler changes how the
    timesteps are visited, never what ᾱ_t means), with the kind's algorithm."""
    spec = zoo.entry("digits-ddpm")
    s = spec.make_scheduler(kind)
    torch.testing.assert_close(s.alphas_cumprod, spec.scheduler.alphas_cumprod, rtol=0, atol=0)
    assert s.config.num_train_timesteps == 1000
    if kind == "dpmsolver++":
        assert s.config.algorithm_type == "dpmsolver++"
    s.set_timesteps(20)
    t = s.timesteps.float()
    assert len(t) == 20 and t.max() <= 999 and t.min() >= 0 and (t.diff() < 0).all()


def test_make_scheduler_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match=r"scheduler kind must be one of .*'euler_a'.*got 'heun'"):
        zoo.entry("digits-ddpm").make_scheduler("heun")
