"""The per-layer report, the pipeline listing, and the pass manager's errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import calib_set

import stepq
from stepq.calibration.probe import sqnr_db
from stepq.compiler.pass_manager import PassResult, Skip, run_passes
from stepq.compiler.pipeline import build_pipeline
from stepq.recipe.specs import Recipe
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


def test_report_rows_and_output_layer_sqnr(capsys):
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet"))
    data = calib_set(2)
    qm = stepq.quantize(m, data[0], "w4a8", calibration=data, progress=False)
    rows = qm.report()
    printed = capsys.readouterr().out
    assert "conv_out" in printed and "SQNR dB" in printed
    by_layer = {r.layer: r for r in rows}
    assert by_layer["conv_in"].weight_bits == 8 and by_layer["down.0.conv1"].weight_bits == 4
    assert by_layer["down.0.conv1"].act_bits == 8
    assert 0 < by_layer["down.0.conv1"].weight_scale_min <= by_layer["down.0.conv1"].weight_scale_max
    # the output layer's SQNR is the model output's SQNR on the report batch (the first calibration batch)
    expected = sqnr_db(m(**data[0]), qm(**data[0]))
    assert by_layer["conv_out"].sqnr_db == pytest.approx(expected, abs=1e-3)
    assert all(r.sqnr_db is None or not math.isnan(r.sqnr_db) for r in rows)


def test_pipeline_lists_every_stage_in_order_and_skips_with_a_reason(caplog):
    stages = build_pipeline(stepq.get_preset("w8a8"))
    ran = [(s.phase, s.name) for s in stages if not isinstance(s.item, Skip)]
    assert ran == [("prepare", "canonicalize_export"), ("prepare", "fold_user_lora"), ("prepare", "annotate_layers"),
                   ("prepare", "insert_quantizers"),
                   ("calibrate", "observe"), ("calibrate", "materialize_quantizers"), ("convert", "report"),
                   ("convert", "attach_timestep_tables"), ("convert", "quantize_weights")]
    skipped = {s.name: s.item.reason for s in stages if isinstance(s.item, Skip)}
    assert skipped == {"insert_scale_source": "the recipe has no TDQ section",
                       "fit_scale_source": "the recipe has no TDQ section",
                       "train_qat": "the recipe has no QAT section",
                       "freeze_scale_source": "the recipe has no TDQ section",
                       "calibrate_widths": "the recipe has no PTQD mixed precision",
                       "select_bits": "the recipe has no PTQD mixed precision",
                       "correct_noise": "the recipe has no PTQD section",
                       "refresh_tables": "the recipe has no PTQD section",
                       "choose_bits": "the recipe has no PTQD mixed precision",
                       "measure_noise": "the recipe has no PTQD section",
                       "insert_rmsnorm": "the recipe has no TerDiT section with rmsnorm",
                       "train_ternary": "the recipe has no TerDiT section with QAT",
                       "insert_lora": "the recipe has no QALoRA section",
                       "distill_qalora": "the recipe has no QALoRA section",
                       "fold_lora": "the recipe has no QALoRA section"}
    # EfficientDM's stages: TALSQ's source and the adapters in calibrate, the fold first in convert
    names = [s.name for s in build_pipeline(stepq.get_preset("w4a4-qalora")) if not isinstance(s.item, Skip)]
    assert names.index("insert_scale_source") < names.index("insert_lora") < names.index("distill_qalora") \
        < names.index("fold_lora") < names.index("freeze_scale_source") < names.index("quantize_weights")
    float_prepare = {s.name: s.item for s in build_pipeline(Recipe(name="float")) if s.phase == "prepare"}
    skip = float_prepare["insert_quantizers"]
    assert isinstance(skip, Skip) and "floating point" in skip.reason
    # every recipe section adds its stages, in the order the methods need them
    names = [s.name for s in build_pipeline(stepq.get_preset("mixed-tdq-ptqd")) if not isinstance(s.item, Skip)]
    assert names.index("insert_scale_source") < names.index("fit_scale_source") < names.index("freeze_scale_source")
    assert names.index("attach_timestep_tables") < names.index("select_bits") < names.index("quantize_weights")
    assert names[names.index("quantize_weights"):] == ["quantize_weights", "refresh_tables", "choose_bits",
                                                       "calibrate_widths", "refresh_tables", "measure_noise",
                                                       "refresh_tables"]


class _Boom:
    name = "boom"

    def __call__(self, prog):
        raise ValueError("bad node foo")


class _Breaks:
    name = "breaks_graph"

    def __call__(self, prog):
        graph = prog.gm.graph
        last = next(n for n in graph.nodes if n.op == "output").args[0]
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            graph.call_function(torch.ops.aten.relu.default, (last,))  # uses a node before it is defined
        return PassResult(1)


def test_failing_pass_is_named_with_the_passes_before_it():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit"))
    prog = stepq.capture(m, calib_set(1)[0])
    passes = [s.item for s in build_pipeline(stepq.get_preset("w8a8"))[:2]] + [_Boom()]
    prog.recipe = stepq.get_preset("w8a8")
    with pytest.raises(stepq.PassError, match=r"pass 'boom' failed: ValueError: bad node foo \(after the following "
                                              r"passes: canonicalize_export, fold_user_lora\)"):
        run_passes(prog, passes)


def test_lint_failure_after_a_pass_is_a_postcondition_error():
    m = build_random_denoiser(RandomDenoiserConfig(kind="dit"))
    prog = stepq.capture(m, calib_set(1)[0])
    with pytest.raises(stepq.compiler.errors.PostconditionError, match="graph lint failed after pass 'breaks_graph'"):
        run_passes(prog, [_Breaks()])
