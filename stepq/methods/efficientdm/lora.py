"""QALoRA adapters (EfficientDM, He et al. ICLR 2024): the low-rank weight update B·A.

The adapter of a Linear [out, in] holds A [r, in] and B [out, r]; of a Conv2d [out, in, kh, kw],
A [r, in, kh, kw] (the layer's kernel) and B [out, r] (a 1×1 conv). ``forward()`` returns the
update shaped like the weight, B·A (for a conv: B ⊗ A, i.e. the conv A followed by the 1×1 conv B
as one kernel), which the graph adds to the pre-quantized weight before the weight quantizer:

    W = fake_quant(deq(W₀) + B·A, Δ_w, z_w)

Initialisation as in the authors' code: A Kaiming-uniform (a = √5), B zero, so the adapter starts as
the identity update; no α/r scaling, no dropout. The rank is capped at min(out, fan_in), where a
larger one adds no capacity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LoRADelta"]


class LoRADelta(nn.Module):
    """B·A of one layer (see module docstring)."""

    def __init__(self, weight_shape: tuple[int, ...] | torch.Size, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        shape = tuple(int(d) for d in weight_shape)
        if len(shape) not in (2, 4):
            raise ValueError(f"LoRADelta takes a Linear [out, in] or Conv2d [out, in, kh, kw] weight, got shape {shape}")
        out, fan_in = shape[0], math.prod(shape[1:])
        self.weight_shape = shape
        self.rank = min(int(rank), out, fan_in)
        self.A = nn.Parameter(torch.empty(self.rank, *shape[1:]))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B = nn.Parameter(torch.zeros(out, self.rank))

    def forward(self) -> Tensor:
        return (self.B @ self.A.flatten(1)).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, rank={self.rank}"
