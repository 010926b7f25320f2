"""LSQ quantization-aware training on the denoising loss (``lsq``)."""

from stepq.methods.qat.lsq import denoising_batches, make_trainable, train_qat

__all__ = ["denoising_batches", "make_trainable", "train_qat"]
