"""More diffusers denoiser classes with tiny configs (random weights), beyond the six of
``stepq.testing.families``: how to build each and call it. ``benchmarks/denoisers.py`` runs every
one through ``stepq.quantize`` at W8A8 and tabulates the output SQNR or the typed error;
``tests/test_denoisers.py`` runs a few.

A case's ``inputs(batch, t, seed)`` gives the call at one timestep (t in [0, 1000]); the
calibration set is a few such calls at spread timesteps (random inputs, not sampler trajectories:
this is a capture / quantize smoke table, not a quality benchmark).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CASES", "DenoiserCase"]


@dataclass(frozen=True)
class DenoiserCase:
    name: str  # the diffusers class
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, float, int], dict[str, Any]]
    capture_options: dict[str, Any] = field(default_factory=dict)  # timestep_scale, timestep_arg, ...

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def calibration(self, n: int = 4, batch: int = 2) -> list[dict[str, Any]]:
        return [self.inputs(batch, 999.0 * (i + 0.5) / n, i + 1) for i in range(n)]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _t(batch: int, t: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((batch,), float(t)).round().to(dtype) if not dtype.is_floating_point else torch.full((batch,), float(t), dtype=dtype)


# -- UNets ---------------------------------------------------------------------------------------
def _unet1d():
    from diffusers import UNet1DModel

    return UNet1DModel(sample_size=32, in_channels=2, out_channels=2, block_out_channels=(32, 32, 32),
                       down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
                       up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
                       mid_block_type="UNetMidBlock1D", time_embedding_type="fourier", extra_in_channels=64)


def _unet1d_inputs(batch, t, seed):
    return {"sample": _randn(_g(seed), batch, 2, 32), "timestep": _t(batch, t), "return_dict": False}


def _unet3d():
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


def _unet3d_inputs(batch, t, seed):
    g = _g(seed)
    return {"sample": _randn(g, batch, 4, 2, 8, 8), "timestep": _t(batch, t, torch.int64),
            "encoder_hidden_states": _randn(g, batch, 4, 16), "return_dict": False}


def _cascade():
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=16, patch_size=1,
                             conditioning_dim=32, block_out_channels=(32, 32), num_attention_heads=(2, 2),
                             down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
                             down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
                             block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
                                                    ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")),
                             clip_text_in_channels=None, clip_text_pooled_in_channels=16, clip_image_in_channels=None,
                             clip_seq=2, effnet_in_channels=None, pixel_mapper_in_channels=None, kernel_size=3,
                             dropout=(0.0, 0.0), self_attn=True, timestep_conditioning_type=("sca",),
                             switch_level=None)


def _cascade_inputs(batch, t, seed):
    g = _g(seed)
    return {"sample": _randn(g, batch, 4, 8, 8), "timestep_ratio": _t(batch, t / 1000.0),
            "clip_text_pooled": _randn(g, batch, 1, 16), "return_dict": False}


# -- transformers --------------------------------------------------------------------------------
def _auraflow():
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                      num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                      joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
                                      pos_embed_max_size=16)


def _text_inputs(sample_shape, text=(4, 16), t_dtype=torch.float32, **extra):
    def make(batch, t, seed):
        g = _g(seed)
        out = {"hidden_states": _randn(g, batch, *sample_shape), "encoder_hidden_states": _randn(g, batch, *text),
               "timestep": _t(batch, t, t_dtype)}
        for k, v in extra.items():
            out[k] = v(batch, g) if callable(v) else v
        return out
    return make


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=16, text_embed_dim=16, num_layers=1, sample_width=8,
                                       sample_height=8, sample_frames=1, patch_size=2, max_text_seq_length=4)


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                      cross_attention_dim=16, num_layers=1, caption_channels=16)


def _ltx_inputs(batch, t, seed):
    g = _g(seed)
    return {"hidden_states": _randn(g, batch, 2 * 4 * 4, 8), "encoder_hidden_states": _randn(g, batch, 4, 16),
            "timestep": _t(batch, t), "encoder_attention_mask": torch.ones(batch, 4), "num_frames": 2, "height": 4,
            "width": 4, "return_dict": False}


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                 rope_max_seq_len=32)


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                                     num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                     axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=16)


def _sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)


def _hunyuan_dit():
    from diffusers import HunyuanDiT2DModel

    return HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
                             hidden_size=16, num_layers=1, cross_attention_dim=16, cross_attention_dim_t5=16,
                             pooled_projection_dim=16, text_len=4, text_len_t5=4,
                             use_style_cond_and_image_meta_size=False)


def _hunyuan_inputs(batch, t, seed):
    g = _g(seed)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timestep": _t(batch, t),
            "encoder_hidden_states": _randn(g, batch, 4, 16), "text_embedding_mask": torch.ones(batch, 4),
            "encoder_hidden_states_t5": _randn(g, batch, 4, 16), "text_embedding_mask_t5": torch.ones(batch, 4),
            "return_dict": False}


def _mochi():
    from diffusers import MochiTransformer3DModel

    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                   pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16,
                                   max_sequence_length=4)


def _hidream():
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                          num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                          caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=4,
                                          num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(8, 8),
                                          llama_layers=[0, 1])


def _hidream_inputs(batch, t, seed):
    g = _g(seed)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "timesteps": _t(batch, t, torch.int64),
            "encoder_hidden_states_t5": _randn(g, batch, 4, 16),
            "encoder_hidden_states_llama3": _randn(g, 2, batch, 4, 16), "pooled_embeds": _randn(g, batch, 16),
            "return_dict": False}


def _cogview4():
    from diffusers import CogView4Transformer2DModel

    return CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                                      num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=4,
                                      pos_embed_max_size=16, sample_size=8, rope_axes_dim=(4, 4))


def _cogview_inputs(batch, t, seed):
    g = _g(seed)
    size = torch.tensor([[64.0, 64.0]]).expand(batch, 2)
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, 4, 16),
            "timestep": _t(batch, t, torch.int64), "original_size": size, "target_size": size,
            "crop_coords": torch.zeros(batch, 2), "return_dict": False}


def _stable_audio():
    from diffusers import StableAudioDiTModel

    return StableAudioDiTModel(sample_size=16, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                               num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16,
                               time_proj_dim=16, global_states_input_dim=16, cross_attention_input_dim=16)


def _stable_audio_inputs(batch, t, seed):
    g = _g(seed)
    return {"hidden_states": _randn(g, batch, 4, 16), "timestep": _t(batch, t),
            "encoder_hidden_states": _randn(g, batch, 4, 16), "global_hidden_states": _randn(g, batch, 1, 16),
            "return_dict": False}


def _allegro():
    from diffusers import AllegroTransformer3DModel

    return AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
                                     in_channels=4, out_channels=4, num_layers=1, cross_attention_dim=16,
                                     sample_height=8, sample_width=8, sample_frames=2, caption_channels=16)


def _hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                          patch_size_t=1, guidance_embeds=False, text_embed_dim=16,
                                          pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def _hunyuan_video_inputs(batch, t, seed):
    g = _g(seed)
    return {"hidden_states": _randn(g, batch, 4, 1, 8, 8), "timestep": _t(batch, t, torch.int64),
            "encoder_hidden_states": _randn(g, batch, 4, 16), "encoder_attention_mask": torch.ones(batch, 4),
            "pooled_projections": _randn(g, batch, 8), "return_dict": False}


CASES: dict[str, DenoiserCase] = {c.name: c for c in [
    DenoiserCase("UNet1DModel", _unet1d, _unet1d_inputs),
    DenoiserCase("UNet3DConditionModel", _unet3d, _unet3d_inputs),
    DenoiserCase("StableCascadeUNet", _cascade, _cascade_inputs, {"timestep_scale": 1000.0}),
    DenoiserCase("AuraFlowTransformer2DModel", _auraflow,
                 _text_inputs((4, 8, 8), return_dict=False)),
    DenoiserCase("CogVideoXTransformer3DModel", _cogvideox,
                 _text_inputs((1, 4, 8, 8), t_dtype=torch.int64, return_dict=False)),
    DenoiserCase("LTXVideoTransformer3DModel", _ltx, _ltx_inputs),
    DenoiserCase("WanTransformer3DModel", _wan, _text_inputs((4, 1, 8, 8), return_dict=False)),
    DenoiserCase("Lumina2Transformer2DModel", _lumina2,
                 _text_inputs((4, 8, 8), encoder_attention_mask=lambda b, g: torch.ones(b, 4, dtype=torch.bool),
                              return_dict=False), {"timestep_scale": 1000.0}),
    DenoiserCase("SanaTransformer2DModel", _sana, _text_inputs((4, 8, 8), return_dict=False)),
    DenoiserCase("HunyuanDiT2DModel", _hunyuan_dit, _hunyuan_inputs),
    DenoiserCase("MochiTransformer3DModel", _mochi,
                 _text_inputs((4, 2, 8, 8), encoder_attention_mask=lambda b, g: torch.ones(b, 4, dtype=torch.bool),
                              return_dict=False)),
    DenoiserCase("HiDreamImageTransformer2DModel", _hidream, _hidream_inputs),
    DenoiserCase("CogView4Transformer2DModel", _cogview4, _cogview_inputs),
    DenoiserCase("StableAudioDiTModel", _stable_audio, _stable_audio_inputs),
    DenoiserCase("HunyuanVideoTransformer3DModel", _hunyuan_video, _hunyuan_video_inputs),
    DenoiserCase("AllegroTransformer3DModel", _allegro, _text_inputs((4, 2, 8, 8), return_dict=False)),
]}
