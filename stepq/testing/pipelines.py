"""Real diffusers pipelines built from tiny components (offline), for the drop-in tests and the
pipeline benchmark: DDPM and DDIM on the digits UNet, DiT on the digits DiT, a StableDiffusion
pipeline (tiny UNet2DConditionModel, tiny CLIP text encoder and tokenizer, tiny VAE, random weights)
and a StableDiffusion3 pipeline (tiny SD3 transformer, flow matching, tiny VAE; its text embeddings
given directly, since the T5 / CLIP-G encoders SD3 expects have no offline tokenizer).

Each ``PipelineCase`` says how to call its pipeline for calibration (``calib``) and for the comparison
run (``run``); both with fixed seeds, so the FP and the quantized pipeline see the same noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CASES", "PipelineCase", "build", "tiny_clip_tokenizer", "tiny_vae"]


@dataclass(frozen=True)
class PipelineCase:
    name: str
    make: Callable[[], Any]
    #: quantize_pipeline's arguments for calibration
    calib: dict[str, Any] = field(default_factory=dict)
    #: the pipeline call of the comparison (a generator is added)
    run: dict[str, Any] = field(default_factory=dict)


def tiny_vae(channels: int, latent_channels: int) -> Any:
    """A one-level AutoencoderKL (scale factor 1), random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=latent_channels,
                         block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), layers_per_block=1, norm_num_groups=4,
                         sample_size=16, shift_factor=0.0)
    return vae.eval()  # type: ignore[attr-defined]


def tiny_clip_tokenizer() -> Any:
    """A CLIPTokenizer whose vocabulary is the letters and digits (each alone and word-final) and no
    merges, so every character is one token: CLIP's real vocabulary is not available offline."""
    import string

    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def _ddpm() -> Any:
    from diffusers import DDPMPipeline

    from stepq import zoo

    return DDPMPipeline(unet=zoo.load("digits-ddpm"), scheduler=zoo.entry("digits-ddpm").make_scheduler("ddpm"))


def _ddim() -> Any:
    from diffusers import DDIMPipeline

    from stepq import zoo

    return DDIMPipeline(unet=zoo.load("digits-ddpm"), scheduler=zoo.entry("digits-ddpm").make_scheduler("ddim"))


def _dit() -> Any:
    from diffusers import DiTPipeline

    from stepq import zoo

    return DiTPipeline(transformer=zoo.load("digits-dit"), vae=tiny_vae(1, 1),
                       scheduler=zoo.entry("digits-dit").make_scheduler("ddim"))


def _sd() -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from stepq.testing.families import FAMILIES

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)).eval()
    return StableDiffusionPipeline(vae=tiny_vae(3, 4), text_encoder=text, tokenizer=tok,
                                   unet=FAMILIES["unet_cond"].model(), scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sd3() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from stepq.testing.families import FAMILIES

    return StableDiffusion3Pipeline(transformer=FAMILIES["sd3"].model(),
                                    scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                                    vae=tiny_vae(3, 4), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def sd3_embeddings(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Text embeddings for the tiny SD3 pipeline (joint dim 32, pooled 16), and their negatives."""
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(n, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(n, 16, generator=g),
            "negative_prompt_embeds": torch.randn(n, 8, 32, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(n, 16, generator=g)}


_PROMPTS = ["a red digit", "two small cats", "blue sky", "a seven"]

CASES: dict[str, PipelineCase] = {
    c.name: c
    for c in (
        PipelineCase("ddpm", _ddpm, {"num_samples": 2, "num_inference_steps": 8},
                     {"batch_size": 4, "num_inference_steps": 10}),
        PipelineCase("ddim", _ddim, {"num_samples": 2, "num_inference_steps": 8},
                     {"batch_size": 4, "num_inference_steps": 10}),
        PipelineCase("dit", _dit, {"class_labels": [0, 3, 5, 7], "guidance_scale": 1.0, "num_inference_steps": 8},
                     {"class_labels": [1, 2, 8, 9], "guidance_scale": 1.0, "num_inference_steps": 10}),
        # CFG: calibrated on 2 prompts (calls of batch 4), run on 4 prompts (batch 8)
        PipelineCase("stable-diffusion", _sd, {"prompts": _PROMPTS[:2], "guidance_scale": 5.0, "num_inference_steps": 8,
                                               "pipeline_kwargs": {"height": 16, "width": 16}},
                     {"prompt": _PROMPTS, "guidance_scale": 5.0, "num_inference_steps": 10, "height": 16, "width": 16}),
        PipelineCase("sd3-flow", _sd3, {"guidance_scale": 4.0, "num_inference_steps": 8,
                                        "pipeline_kwargs": {"height": 16, "width": 16, **sd3_embeddings(2, 1)}},
                     {"guidance_scale": 4.0, "num_inference_steps": 10, "height": 16, "width": 16,
                      **sd3_embeddings(4, 2)}),
    )
}


def build(name: str) -> Any:
    """A fresh float32 pipeline of case ``name``."""
    return CASES[name].make()


def images(pipe: Any, case: PipelineCase, seed: int = 0) -> torch.Tensor:
    """The comparison run's images as a float tensor in [0, 1] (N, H, W, C)."""
    out = pipe(**case.run, generator=torch.Generator().manual_seed(seed), output_type="np")
    import numpy as np

    return torch.from_numpy(np.asarray(out.images, dtype=np.float32))
