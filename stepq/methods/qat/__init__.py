"""LSQ quantization-aware training on the denoising loss (``lsq``)."""

from stepq.methods.qat.lsq import (
    Trainable,
    TrainQAT,
    denoising_batches,
    make_trainable,
    scale_step_gradients,
    train_qat,
)

__all__ = ["TrainQAT", "Trainable", "denoising_batches", "make_trainable", "scale_step_gradients", "train_qat"]
