"""The digit classifier whose features and predictions score generated digits.

A small CNN on 16×16 images in [−1, 1]:

    conv3×3(1→c) · GN · SiLU → conv3×3(c→c) · GN · SiLU → avgpool 2      (16 → 8)
    conv3×3(c→2c) · GN · SiLU → conv3×3(2c→2c) · GN · SiLU → avgpool 2   (8 → 4)
    flatten → linear(2c·16 → d) · SiLU  = features(x) ∈ R^d   (the Fréchet-distance space)
    linear(d → 10)                      = forward(x), the logits

GroupNorm rather than BatchNorm: its output does not depend on the other images of the batch or
on running statistics, so the features of a generated image are the same whatever it is batched
with, and train/eval mode only differ by dropout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DigitClassifier"]


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]


class DigitClassifier(nn.Module):
    """CNN classifier of 16×16 digits; ``features`` is the penultimate layer."""

    def __init__(self, channels: int = 32, feature_dim: int = 128, num_classes: int = 10,
                 image_size: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.config = {"channels": channels, "feature_dim": feature_dim, "num_classes": num_classes,
                       "image_size": image_size, "dropout": dropout}
        c = channels
        self.body = nn.Sequential(
            *_conv(1, c), *_conv(c, c), nn.AvgPool2d(2),
            *_conv(c, 2 * c), *_conv(2 * c, 2 * c), nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * c * (image_size // 4) ** 2, feature_dim), nn.SiLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[N, feature_dim]`` of images ``[N, 1, H, W]`` in [−1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted class of each image (int64 ``[N]``)."""
        return self.forward(x).argmax(dim=1)
