"""LSQ quantization-aware training on the denoising loss (``lsq``)."""

from stepq.methods.qat.lsq import TrainQAT, denoising_batches, make_trainable, train_qat

__all__ = ["TrainQAT", "denoising_batches", "make_trainable", "train_qat"]
