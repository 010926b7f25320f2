"""The real data stepq is evaluated on: scikit-learn's handwritten digits.

``sklearn.datasets.load_digits()`` ships 1,797 real 8×8 grey-level digits (values 0..16) inside
scikit-learn, so nothing is downloaded. Each image is scaled to [0, 1] (÷16), upsampled 8→16 with
bilinear interpolation (``align_corners=False``), then mapped to the diffusion range
``x ↦ 2x − 1`` ∈ [−1, 1].

The held-out split is fixed: a stratified 80/20 split with ``random_state=0`` (train 1,437,
test 360, every class in the same proportion in both), so the classifier, the diffusion models,
the benchmarks and the tests all see the same held-out digits.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NUM_CLASSES", "SPLIT_SEED", "TEST_FRACTION", "load_digits_images"]

NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_SPLITS = ("train", "test", "all")


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images 8×8 in [0, 1], labels, train indices, test indices), computed once per process."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, stratify=labels,
                                           random_state=SPLIT_SEED)
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def load_digits_images(split: str = "train", size: int = 16) -> tuple[Tensor, Tensor]:
    """Digits of ``split`` as ``(images float32 [N, 1, size, size] in [−1, 1], labels int64 [N])``.

    Args:
        split: ``"train"`` (1,437 images), ``"test"`` (360, the fixed held-out set) or ``"all"`` (1,797).
        size: output side; 8 keeps the original pixels, anything else is a bilinear resize.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    images, labels, train_idx, test_idx = _raw()
    idx = {"train": train_idx, "test": test_idx, "all": np.arange(len(labels))}[split]
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()
    return x, torch.from_numpy(labels[idx]).clone()
