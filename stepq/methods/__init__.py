"""The diffusion quantization methods, one package each.

* ``tdq``: timestep-dependent activation step sizes (scale sources, the PTQ fit);
* ``qat``: LSQ quantization-aware training on the denoising loss (with or without TDQ);
* ``ptqd``: quantization-noise correction and step-aware mixed precision.

A method contributes stages to the one pipeline (``stepq.compiler.pipeline``): graph rewrites live
in ``stepq.passes``, the method's maths (fits, training loops, statistics) here. EfficientDM
(QALoRA) and TerDiT (ternary weights) take ``methods/efficientdm`` and ``methods/terdit``.
"""
