"""EfficientDM (He et al., ICLR 2024): QALoRA adapters trained by data-free distillation, TALSQ.

``lora``: the adapter module (B·A); ``talsq``: per-timestep activation steps and zero points (a
scale source); ``distill``: the distillation loop and its pipeline step. The graph side is the
``insert_lora`` / ``fold_lora`` passes (and ``fold_user_lora`` for a user's own LoRA); docs/EFFICIENTDM.md.
"""

from stepq.methods.efficientdm.distill import DistillQALoRA, distill_qalora, lora_learning_rates
from stepq.methods.efficientdm.lora import LoRADelta
from stepq.methods.efficientdm.talsq import TemporalSteps, make_temporal_steps

__all__ = ["DistillQALoRA", "LoRADelta", "TemporalSteps", "distill_qalora", "lora_learning_rates",
           "make_temporal_steps"]
