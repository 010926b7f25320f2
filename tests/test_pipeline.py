"""The one pipeline: user passes at named points, the dump folder, contract checks by the manager."""

from __future__ import annotations

import pytest
import torch
from helpers import calib_set

import stepq
from stepq.compiler import meta
from stepq.compiler.errors import PostconditionError, PreconditionError
from stepq.compiler.pass_manager import DUMP_ENV, Contract, OpPresent, Pass, PassResult, StateHas, run_passes
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser


class KeepFirstLinearFloat(Pass):
    """A user pass: the first annotated linear stays in floating point (its spec becomes None)."""

    name = "keep_first_linear_float"
    contract = Contract(requires=(OpPresent(lambda n: meta.LAYER_SPEC in n.meta, "annotated op"),))

    def __call__(self, prog):
        for n in prog.gm.graph.nodes:
            if n.meta.get(meta.OP_KIND) == "linear" and meta.get_layer_spec(n) is not None:
                meta.set_layer_spec(n, None)
                return PassResult(1, (n.meta[meta.LAYER],))
        return PassResult(0)


def _model():
    return build_random_denoiser(RandomDenoiserConfig(kind="dit", depth=1))


def test_a_user_pass_runs_at_its_point_and_changes_the_result():
    m, data = _model(), calib_set(2)
    plain = stepq.quantize(m, data[0], "w8a8", calibration=data, progress=False)
    qm = stepq.quantize(m, data[0], "w8a8", calibration=data, progress=False,
                        passes=[stepq.At(KeepFirstLinearFloat(), after="annotate_layers")])
    h = qm.program.history
    assert h.index("annotate_layers") + 1 == h.index("keep_first_linear_float") < h.index("insert_quantizers")
    assert len(qm.quantized_layers()) == len(plain.quantized_layers()) - 1
    # before= puts it in front of its anchor, in the anchor's phase
    stages = stepq.build_pipeline(stepq.get_preset("w8a8"), [stepq.At(KeepFirstLinearFloat(), before="report")])
    i = [s.name for s in stages].index("keep_first_linear_float")
    assert stages[i + 1].name == "report" and stages[i].phase == "convert"


def test_at_errors_name_the_stages():
    with pytest.raises(stepq.RecipeError, match="exactly one of after= or before="):
        stepq.At(KeepFirstLinearFloat(), after="observe", before="report")
    with pytest.raises(stepq.RecipeError, match=r"no stage 'pack_ternary' in the pipeline; the stages are "
                                                r"canonicalize_export, fold_user_lora, annotate_layers, insert_quantizers"):
        stepq.build_pipeline(stepq.get_preset("w8a8"), [stepq.At(KeepFirstLinearFloat(), after="pack_ternary")])
    with pytest.raises(stepq.RecipeError, match="not a pass"):
        stepq.At(object(), after="observe")


def test_the_dump_folder_tells_the_story_of_one_compile(tmp_path, monkeypatch):
    m, data = _model(), calib_set(2)
    stepq.quantize(m, data[0], "w4a8", calibration=data, progress=False, dump=tmp_path / "d")
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files == ["000-canonicalize_export.txt", "001-fold_user_lora.txt", "002-annotate_layers.txt",
                     "003-insert_quantizers.txt", "004-observe.txt", "005-materialize_quantizers.txt", "006-report.txt",
                     "007-attach_timestep_tables.txt", "008-quantize_weights.txt", "index.txt"]
    text = (tmp_path / "d" / "003-insert_quantizers.txt").read_text()
    n_fq = text.count("torch.ops.stepq.fake_quant")
    assert text.startswith("# pass: insert_quantizers\n# program stage: captured (running the 'prepare' phase)\n")
    assert n_fq > 0
    rewrites = int(next(ln for ln in text.splitlines() if ln.startswith("# rewrites:")).split(":")[1])
    assert rewrites > 0
    index = (tmp_path / "d" / "index.txt").read_text()
    assert "fit_scale_source         skipped: the recipe has no TDQ section" in index
    # the environment variable names the folder when no dump= is given
    monkeypatch.setenv(DUMP_ENV, str(tmp_path / "env"))
    stepq.prepare(stepq.capture(m, data[0]), "w8a8")
    assert sorted(p.name for p in (tmp_path / "env").iterdir())[:4] == [
        "000-canonicalize_export.txt", "001-fold_user_lora.txt", "002-annotate_layers.txt", "003-insert_quantizers.txt"]


def test_the_manager_checks_requires_and_produces_naming_the_pass():
    m, data = _model(), calib_set(1)
    prog = stepq.prepare(stepq.capture(m, data[0]), "w8a8")

    class NeedsPTQD(Pass):
        name = "needs_ptqd"
        contract = Contract(requires=(StateHas("ptqd"),))

        def __call__(self, prog):
            return PassResult(0)

    class ClaimsAnIndex(Pass):
        name = "claims_an_index"
        contract = Contract(produces=(OpPresent(lambda n: n.target is torch.ops.stepq.timestep_index.default,
                                                "timestep_index node"),))

        def __call__(self, prog):
            return PassResult(0)

    with pytest.raises(PreconditionError, match="pass 'needs_ptqd' requires program state 'ptqd': program state "
                                                "'ptqd' is empty"):
        run_passes(prog, [NeedsPTQD()])
    with pytest.raises(PostconditionError, match="pass 'claims_an_index' must leave a timestep_index node: "
                                                 "the graph has no timestep_index node"):
        run_passes(prog, [ClaimsAnIndex()])


def test_train_refuses_a_recipe_without_qat():
    m, data = _model(), calib_set(1)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), "w8a8"), data, progress=False)
    with pytest.raises(stepq.RecipeError, match="has no QAT or QALoRA section"):
        stepq.train(prog, iter([]))


def test_an_unwritable_dump_folder_is_a_typed_error_naming_it(tmp_path):
    m, data = _model(), calib_set(1)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the dump folder should go")
    with pytest.raises(stepq.compiler.errors.DumpError, match="cannot write the graph dump to .*not_a_folder"):
        stepq.prepare(stepq.capture(m, data[0]), "w8a8", dump=blocker)
    assert blocker.read_text().startswith("a file")  # nothing of the user's overwritten
