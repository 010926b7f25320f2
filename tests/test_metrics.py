"""stepq.metrics: Fréchet distance, class accuracy, MSE/PSNR and sample grids.

Expected values are computed independently of the code under test: closed forms (1-D Fréchet
distance, PSNR of constant images) or a direct argmax over the classifier's logits.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from stepq import metrics, zoo
from stepq.data import load_digits_images


@pytest.fixture(scope="module")
def classifier():
    return zoo.load("digits-classifier")


@pytest.fixture(scope="module")
def heldout():
    return load_digits_images("test")


def test_fd_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(400, 32)) @ np.random.default_rng(1).normal(size=(32, 32))
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(torch.from_numpy(feats), feats) == pytest.approx(0.0, abs=1e-6)


def test_fd_in_one_dimension_is_the_closed_form():
    # For 1-D Gaussians FD = (μ₁ − μ₂)² + (σ₁ − σ₂)², with σ the unbiased sample std (np.cov's ddof=1).
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.5, 2.0, size=(300, 1)), rng.normal(-1.0, 0.5, size=(200, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_fd_is_symmetric_and_nonnegative_for_rank_deficient_sets():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(10, 20))  # fewer samples than dimensions: singular covariances
    b = rng.normal(size=(12, 20)) + 0.3
    ab, ba = metrics.frechet_distance(a, b), metrics.frechet_distance(b, a)
    assert ab >= 0.0 and math.isfinite(ab)
    assert ab == pytest.approx(ba, rel=1e-4)


def test_fd_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same d"):
        metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_fd_grows_with_noise(classifier, heldout):
    x, _ = heldout
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    sigmas = (0.0, 0.15, 0.4, 1.0)
    fds = [metrics.fd((x + s * noise).clamp(-1, 1), x, classifier) for s in sigmas]
    assert fds[0] == pytest.approx(0.0, abs=1e-6)
    assert all(lo < hi for lo, hi in itertools.pairwise(fds)), fds


def test_class_accuracy_equals_direct_heldout_accuracy(classifier, heldout):
    x, y = heldout
    with torch.no_grad():
        direct = (classifier(x).argmax(dim=1) == y).float().mean().item()
    acc = metrics.class_accuracy(x, y, classifier)
    assert acc == pytest.approx(direct, abs=1e-12)
    assert acc == pytest.approx(zoo.info("digits-classifier")["heldout_accuracy"], abs=1e-12)
    assert acc >= 0.97


def test_features_are_batch_invariant_and_restore_training_mode(classifier, heldout):
    x, _ = heldout
    classifier.train()
    try:
        small = metrics.extract_features(x[:50], classifier, batch_size=7)
        assert classifier.training
        whole = metrics.extract_features(x[:50], classifier, batch_size=500)
    finally:
        classifier.eval()
    assert small.shape == (50, classifier.config["feature_dim"])
    np.testing.assert_allclose(small, whole, rtol=1e-5, atol=1e-6)


def test_mse_and_psnr_on_known_inputs():
    a, b = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    assert metrics.mse(a, b) == pytest.approx(0.25)
    assert metrics.psnr(a, b) == pytest.approx(12.041199826559248)  # 10·log10(2² / 0.25) = 10·log10(16)
    a, b = torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 1.0])
    assert metrics.mse(a, b) == pytest.approx(2.0)  # (2² + 0) / 2
    assert metrics.psnr(a, b) == pytest.approx(3.010299956639812)  # 10·log10(4 / 2)
    assert metrics.psnr(a, b, data_range=1.0) == pytest.approx(-3.010299956639812)
    assert metrics.psnr(a, a) == math.inf


def test_pixel_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mse(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(torch.zeros(2), torch.ones(2), data_range=0.0)


def test_save_grid_writes_a_png_of_the_expected_size(tmp_path):
    import matplotlib.image

    images = torch.linspace(-1, 1, 7 * 16 * 16).reshape(7, 1, 16, 16)
    path = metrics.save_grid(images, tmp_path / "grid.png", nrow=3, scale=2, padding=1)
    img = matplotlib.image.imread(path)
    rows, cols = 3, 3  # 7 images, 3 per row
    assert img.shape[:2] == ((rows * 17 + 1) * 2, (cols * 17 + 1) * 2)
