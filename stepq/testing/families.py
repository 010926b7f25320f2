"""Tiny-config diffusers denoisers of six families (random weights, built from a config only) and
how to call and sample them with a real scheduler. Shared by the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

__all__ = ["FAMILIES", "Family"]


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    sample_shape: tuple[int, ...]
    make_inputs: Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], dict[str, Any]]
    conditions: Callable[[int, torch.Generator], dict[str, Any]] | None
    scheduler: Callable[[], Any]
    channels: int
    timestep_scale: float = 1.0

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def example_inputs(self, batch: int = 2, t: float = 500.0, seed: int = 0) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((batch, *self.sample_shape), generator=g)
        cond = self.conditions(batch, g) if self.conditions else {}
        return self.make_inputs(x, torch.full((batch,), float(t)), cond)


def _t_batch(x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(t)
    t = torch.round(t).to(dtype) if not dtype.is_floating_point else t.to(dtype)
    return t.reshape(-1).expand(x.shape[0]).contiguous() if t.numel() == 1 else t


def flow() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000)


def ddpm() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000)


# -- UNet2DModel ---------------------------------------------------------------------------------
def _unet() -> Any:
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=16)


def _unet_inputs(x, t, cond):
    return {"sample": x, "timestep": _t_batch(x, t, torch.int64), "return_dict": False}


# -- UNet2DConditionModel -------------------------------------------------------------------------
def _unet_cond() -> Any:
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _text(n: int, g: torch.Generator, dim: int = 32, length: int = 8) -> torch.Tensor:
    return torch.randn((n, length, dim), generator=g)


def _unet_cond_inputs(x, t, cond):
    return {"sample": x, "timestep": _t_batch(x, t, torch.int64), **cond, "return_dict": False}


# -- DiT ------------------------------------------------------------------------------------------
def _dit() -> Any:
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                 norm_num_groups=8)


def _dit_inputs(x, t, cond):
    return {"hidden_states": x, "timestep": _t_batch(x, t, torch.int64), **cond, "return_dict": False}


# -- PixArt ---------------------------------------------------------------------------------------
def _pixart() -> Any:
    return PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=16, patch_size=2, caption_channels=32,
                                    cross_attention_dim=64, norm_num_groups=8)


def _pixart_inputs(x, t, cond):
    return {"hidden_states": x, "timestep": _t_batch(x, t, torch.int64), **cond,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}


# -- SD3 ------------------------------------------------------------------------------------------
def _sd3() -> Any:
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)


def _sd3_cond(n, g):
    return {"encoder_hidden_states": _text(n, g), "pooled_projections": torch.randn((n, 16), generator=g)}


def _sd3_inputs(x, t, cond):
    return {"hidden_states": x, "timestep": _t_batch(x, t, torch.float32), **cond, "return_dict": False}


# -- Flux -----------------------------------------------------------------------------------------
_FLUX_TOKENS, _FLUX_TXT = 16, 8


def _flux() -> Any:
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6))


def _flux_cond(n, g):
    return {"encoder_hidden_states": _text(n, g), "pooled_projections": torch.randn((n, 16), generator=g)}


def _flux_inputs(x, t, cond):
    side = int(_FLUX_TOKENS**0.5)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).reshape(-1, 3).float()
    txt_ids = torch.zeros(_FLUX_TXT, 3)
    return {"hidden_states": x, "timestep": _t_batch(x, t, torch.float32) / 1000.0, **cond,
            "img_ids": img_ids, "txt_ids": txt_ids, "return_dict": False}


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("unet", _unet, (3, 16, 16), _unet_inputs, None, ddpm, 3),
        Family("unet_cond", _unet_cond, (4, 16, 16), _unet_cond_inputs,
               lambda n, g: {"encoder_hidden_states": _text(n, g)}, ddim, 4),
        Family("dit", _dit, (4, 16, 16), _dit_inputs,
               lambda n, g: {"class_labels": torch.randint(0, 10, (n,), generator=g)}, ddim, 4),
        Family("pixart", _pixart, (4, 16, 16), _pixart_inputs,
               lambda n, g: {"encoder_hidden_states": _text(n, g)}, ddim, 4),
        Family("sd3", _sd3, (4, 16, 16), _sd3_inputs, _sd3_cond, flow, 4),
        Family("flux", _flux, (_FLUX_TOKENS, 16), _flux_inputs, _flux_cond, flow, 16, timestep_scale=1000.0),
    )
}
