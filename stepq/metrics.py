"""Quality metrics for generated digits.

Fréchet distance between two feature sets with means μ₁, μ₂ and covariances Σ₁, Σ₂ (the FID formula,
here in the penultimate feature space of :class:`stepq.zoo.classifier.DigitClassifier`):

    FD = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁Σ₂)^½)

``(Σ₁Σ₂)^½`` is computed with ``scipy.linalg.sqrtm`` in float64; its tiny imaginary parts (round-off
on a product of two PSD matrices) are dropped, a singular product is retried with ε·I added to both
covariances, and the result is clamped at 0 so that FD(X, X) is 0 and never −1e−12.

Pixel metrics, for images in [−1, 1] (``data_range = 2``), over all pixels of the batch:

    MSE = mean((a − b)²),   PSNR = 10·log10(data_range² / MSE)   (+∞ when MSE = 0)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

__all__ = ["class_accuracy", "extract_features", "fd", "frechet_distance", "mse", "predict", "psnr", "save_grid"]

logger = logging.getLogger(__name__)

_EPS = 1e-6


def _as_images(images: Tensor) -> Tensor:
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W] (or [N, H, W]), got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def _batched(call: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    x = _as_images(images)
    out = [call(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def _eval_mode(classifier: nn.Module) -> bool:
    was_training = classifier.training
    classifier.eval()
    return was_training


def extract_features(images: Tensor, classifier: nn.Module, *, batch_size: int = 500) -> np.ndarray:
    """Penultimate features (float64 ``[N, d]``) of ``images``, in eval mode and without gradients.

    The classifier is put back in training mode afterwards if it was in it.
    """
    was_training = _eval_mode(classifier)
    try:
        feats = _batched(cast(Callable[[Tensor], Tensor], classifier.features), images, batch_size)
    finally:
        classifier.train(was_training)
    return feats.double().numpy()


def predict(images: Tensor, classifier: nn.Module, *, batch_size: int = 500) -> Tensor:
    """Predicted class (int64 ``[N]``) of each image."""
    was_training = _eval_mode(classifier)
    try:
        logits = _batched(classifier, images, batch_size)
    finally:
        classifier.train(was_training)
    return logits.argmax(dim=1)


def _as_features(feats: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(feats, Tensor):
        return feats.detach().double().cpu().numpy()
    return np.asarray(feats, dtype=np.float64)


def frechet_distance(feats_a: np.ndarray | Tensor, feats_b: np.ndarray | Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, d]`` and ``[M, d]``."""
    a, b = _as_features(feats_a), _as_features(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, d] and [M, d] with the same d, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {a.shape[0]} and {b.shape[0]}")
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        logger.warning("FD: singular covariance product; adding %g to the diagonals", _EPS)
        offset = np.eye(s1.shape[0]) * _EPS
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def fd(images_a: Tensor, images_b: Tensor, classifier: nn.Module, *, batch_size: int = 500) -> float:
    """Fréchet distance between two image sets in ``classifier``'s penultimate feature space."""
    return frechet_distance(extract_features(images_a, classifier, batch_size=batch_size),
                            extract_features(images_b, classifier, batch_size=batch_size))


def class_accuracy(images: Tensor, labels: Tensor, classifier: nn.Module, *, batch_size: int = 500) -> float:
    """Fraction of ``images`` that ``classifier`` assigns to their ``labels``."""
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.numel() != _as_images(images).shape[0]:
        raise ValueError(f"got {_as_images(images).shape[0]} images but {labels.numel()} labels")
    return float((predict(images, classifier, batch_size=batch_size) == labels).double().mean())


def mse(a: Tensor, b: Tensor) -> float:
    """Mean squared error over every element of ``a`` and ``b`` (same shape)."""
    a, b = torch.as_tensor(a).detach().double().cpu(), torch.as_tensor(b).detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).pow(2).mean())


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10·log10(data_range² / MSE)``; +∞ for identical inputs."""
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    err = mse(a, b)
    return math.inf if err == 0.0 else 10.0 * math.log10(data_range ** 2 / err)


def save_grid(images: Tensor, path: str | Path, *, nrow: int = 10, scale: int = 4, padding: int = 1,
              value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Write ``images`` ``[N, 1, H, W]`` as a PNG grid of ``nrow`` images per row, each pixel
    enlarged ``scale`` times (nearest neighbour), on a white ``padding``; returns the path."""
    import matplotlib.pyplot as plt

    x = _as_images(images)[:, 0].numpy()
    if x.shape[0] == 0:
        raise ValueError("no images to save")
    lo, hi = value_range
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    n, h, w = x.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.ones((nrows * (h + padding) + padding, ncol * (w + padding) + padding), dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top:top + h, left:left + w] = x[i]
    if scale > 1:
        grid = np.kron(grid, np.ones((scale, scale)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)
    return path
