"""Graph passes, one per module. Each module's docstring states the rewrite and its math."""

from stepq.passes.annotate_layers import AnnotateLayers
from stepq.passes.attach_timestep_tables import AttachTimestepTables
from stepq.passes.canonicalize_export import CanonicalizeExport
from stepq.passes.correct_noise import CorrectNoise
from stepq.passes.fold_lora import FoldLoRA
from stepq.passes.fold_user_lora import FoldUserLoRA
from stepq.passes.freeze_scale_source import FreezeScaleSource
from stepq.passes.insert_lora import InsertLoRA
from stepq.passes.insert_quantizers import InsertQuantizers
from stepq.passes.insert_rmsnorm import InsertRMSNorm
from stepq.passes.insert_scale_source import InsertScaleSource
from stepq.passes.materialize_quantizers import MaterializeQuantizers
from stepq.passes.quantize_weights import QuantizeWeights
from stepq.passes.refresh_tables import RefreshTables
from stepq.passes.select_bits import SelectBits
from stepq.passes.specialize_bits import SpecializeBits

__all__ = ["AnnotateLayers", "AttachTimestepTables", "CanonicalizeExport", "CorrectNoise", "FoldLoRA", "FoldUserLoRA",
           "FreezeScaleSource", "InsertLoRA", "InsertQuantizers", "InsertRMSNorm", "InsertScaleSource",
           "MaterializeQuantizers", "QuantizeWeights", "RefreshTables",
           "SelectBits", "SpecializeBits"]
