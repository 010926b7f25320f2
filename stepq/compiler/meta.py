"""Namespaced ``node.meta`` keys and their typed accessors.

Every key stepq writes into ``node.meta`` is defined here; passes never use string literals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.fx

    from stepq.recipe.specs import LayerSpec

__all__ = [
    "ACT_QUANTIZER",
    "BACKEND_TAG",
    "LAYER",
    "LAYER_SPEC",
    "OP_KIND",
    "PTQD_NODE",
    "QSPEC",
    "QUANTIZER_ROLE",
    "ROLES",
    "RULE",
    "STEPQ_INSERTED",
    "WEIGHT_BITS",
    "get_layer_spec",
    "set_layer_spec",
]

#: the recipe's decision for a quantizable op: a ``LayerSpec`` (absent = not annotated).
LAYER_SPEC = "stepq.layer_spec"
#: the module path of the layer a quantizable op belongs to (from ``nn_module_stack``).
LAYER = "stepq.layer"
#: the name of the recipe rule that decided a quantizable op's spec.
RULE = "stepq.rule"
#: the op kind a recipe rule matches on: "linear", "conv2d" or "attention".
OP_KIND = "stepq.op_kind"
#: structural roles of a quantizable op: "input", "output", "timestep_embedding", "conditioning".
ROLES = "stepq.roles"
#: on a quantizer node: "weight" or "activation".
QUANTIZER_ROLE = "stepq.quantizer_role"
#: on a quantizer node: the quantizer's name (its state lives under this prefix).
ACT_QUANTIZER = "stepq.quantizer"
#: on an activation fake_quant: its QuantSpec.
QSPEC = "stepq.qspec"
#: on a weight dequantize: the weight's bit width.
WEIGHT_BITS = "stepq.weight_bits"
#: set on every node a stepq pass created.
STEPQ_INSERTED = "stepq.inserted"
#: on nodes the PTQD passes created: "correct_noise" (output correction) or "select_bits" (bit switch).
PTQD_NODE = "stepq.ptqd"
#: set by a backend's partitioner (on its own copy of the graph): "<backend>:<placement>".
BACKEND_TAG = "stepq.backend_tag"


def get_layer_spec(node: torch.fx.Node) -> LayerSpec | None:
    return node.meta.get(LAYER_SPEC)


def set_layer_spec(node: torch.fx.Node, spec: LayerSpec | None) -> None:
    node.meta[LAYER_SPEC] = spec


def mark_inserted(node: torch.fx.Node, **extra: Any) -> torch.fx.Node:
    node.meta[STEPQ_INSERTED] = True
    node.meta.update(extra)
    return node
