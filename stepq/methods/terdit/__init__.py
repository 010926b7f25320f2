"""TerDiT (ternary DiT): the ternary QAT loop and its pipeline step (``train``). The quantizer and
the base-3 packing are ops (``stepq.compiler.ternary_ops``), the RMSNorm insertion a pass
(``stepq.passes.insert_rmsnorm``), the presets ``ternary-dit`` / ``ternary-dit-no-rmsnorm``."""

from stepq.methods.terdit.train import TrainTernary, ternary_scales, train_ternary

__all__ = ["TrainTernary", "ternary_scales", "train_ternary"]
