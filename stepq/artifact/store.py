"""Save and load a converted program: a directory with ``model.safetensors`` and ``manifest.json``.

Nothing is pickled: the graph is JSON (``stepq.artifact.serialize``), tensors are safetensors, the
recipe and signature are JSON. Saving writes into a temporary sibling directory and renames it into
place, so a failed save leaves the previous artefact (or nothing) behind, never half a file. Loading
checks the format version and two SHA-256 digests, and names the file at fault: ``tensors_sha256``
of ``model.safetensors`` (every tensor), and ``manifest_sha256`` of the manifest itself (its
canonical JSON, sorted keys, without that one field; it covers ``tensors_sha256``), so an edited
graph, recipe, signature or report is refused like a corrupt tensor file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stepq.artifact.fake_meta import placeholder_shapes, restore_fake_meta, shapes_from_signature
from stepq.artifact.report import LayerReport
from stepq.artifact.serialize import graph_from_json, graph_to_json
from stepq.compiler.errors import ArtifactError
from stepq.compiler.program import InputSignature, Program
from stepq.compiler.state import STATE_VERSION, ProgramState
from stepq.recipe.specs import Recipe

__all__ = ["FORMAT", "STATE_CODECS", "load_program", "save_program"]

FORMAT = "stepq.quantized_model"
#: 2: the manifest carries its own digest (``manifest_sha256``); version 1 artefacts had the tensors' only.
VERSION = 2
MANIFEST = "manifest.json"
TENSORS = "model.safetensors"

#: ``ProgramState`` fields saved with the model besides the report: field -> (encode, decode), where
#: encode(value) -> (json, {name: tensor}) and decode(json, tensors) -> value; the tensors go to
#: ``model.safetensors`` as ``__state__.<field>.<name>``. A method registers the codecs of its own
#: fields (``stepq.methods.ptqd.state``); fields without one (calibration statistics, training
#: curves) are not part of the deployed artefact.
STATE_CODECS: dict[str, tuple[Any, Any]] = {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_sha256(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_dir(target: Path, write) -> None:
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if target.exists():
            if not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).exists()):
                raise ArtifactError(f"{target} exists and is not a stepq artefact; refusing to overwrite it")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_program(prog: Program, path: str | os.PathLike[str]) -> None:
    """Write a converted program (graph, tensors, recipe, signature, report, saved state fields)."""
    graph, tensors = graph_to_json(prog.gm)
    extra_json: dict[str, Any] = {}
    for key, (encode, _) in STATE_CODECS.items():
        value = getattr(prog.state, key)
        if value is not None:
            j, ts = encode(value)
            extra_json[key] = j
            for name, t in ts.items():
                tensors[f"__state__.{key}.{name}"] = t.detach().contiguous().clone()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model_name": prog.model_name,
        "timestep_arg": prog.timestep_arg,
        "sample_arg": prog.sample_arg,
        "timestep_scale": prog.timestep_scale,
        "model_config": prog.model_config,
        "output_class": prog.output_class,
        "placeholders": placeholder_shapes(prog.gm),
        "signature": prog.signature.to_dict(),
        "recipe": prog.recipe.to_dict(),
        "history": list(prog.history),
        "report": [r.to_dict() for r in prog.state.report],
        "state_version": STATE_VERSION,
        "state": extra_json,
        "graph": graph,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        manifest["tensors_sha256"] = _sha256(tmp / TENSORS)
        manifest["manifest_sha256"] = _manifest_sha256(manifest)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, allow_nan=True)

    _atomic_dir(Path(path), write)


def load_program(path: str | os.PathLike[str], *, device: str | torch.device | None = None) -> Program:
    """Read a converted program written by ``save_program`` (checked: format, versions, checksum).

    ``device``: where the tensors go (safetensors loads them there directly; default CPU). The
    graph's nodes get their FakeTensor metadata back (``fake_meta.restore_fake_meta``), so the
    backends see the same graph as after convert."""
    root = Path(path)
    mpath, tpath = root / MANIFEST, root / TENSORS
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: no manifest; is {root} a stepq artefact?")
    if not tpath.is_file():
        raise ArtifactError(f"{tpath}: the tensor file is missing")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mpath}: unreadable manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a stepq quantized model (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{mpath}: artefact version {manifest.get('version')!r} is not supported (expected {VERSION}; "
                            f"version 1 manifests carry no digest of their own: load and save them with the stepq "
                            f"that wrote them, then quantize again)")
    if manifest.get("manifest_sha256") != _manifest_sha256(manifest):
        raise ArtifactError(f"{mpath}: checksum mismatch; the manifest was edited or corrupted after it was saved "
                            f"(its SHA-256 differs from the manifest_sha256 it records)")
    if manifest.get("state_version", 1) not in (1, STATE_VERSION):
        raise ArtifactError(f"{mpath}: program state version {manifest.get('state_version')!r} is not supported "
                            f"(expected {STATE_VERSION})")
    if _sha256(tpath) != manifest.get("tensors_sha256"):
        raise ArtifactError(f"{tpath}: checksum mismatch; the file is corrupt or does not belong to this manifest")
    try:
        tensors = load_file(str(tpath), device=str(torch.device(device)) if device is not None else "cpu")
    except Exception as e:
        raise ArtifactError(f"{tpath}: unreadable safetensors file: {e}") from None
    state_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in [k for k in tensors if k.startswith("__state__.")]:
        _, key, sub = name.split(".", 2)
        state_tensors.setdefault(key, {})[sub] = tensors.pop(name)
    try:
        gm = graph_from_json(manifest["graph"], tensors)
        recipe = Recipe.from_dict(manifest["recipe"])
        signature = InputSignature.from_dict(manifest["signature"])
        shapes = manifest.get("placeholders") or shapes_from_signature(gm, signature)
        restore_fake_meta(gm, shapes, where=str(mpath))
    except ArtifactError as e:
        raise ArtifactError(f"{mpath}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{mpath}: malformed manifest: {type(e).__name__}: {e}") from None
    prog = Program(gm=gm, signature=signature, timestep_arg=manifest["timestep_arg"],
                   sample_arg=manifest.get("sample_arg"), model_name=manifest.get("model_name", "?"),
                   timestep_scale=float(manifest.get("timestep_scale", 1.0)), recipe=recipe, stage="converted",
                   model_config=manifest.get("model_config"), output_class=manifest.get("output_class"),
                   history=list(manifest.get("history", [])))
    state = ProgramState(report=[LayerReport(**r) for r in manifest.get("report", [])])
    for key, j in manifest.get("state", {}).items():
        if key not in STATE_CODECS:
            raise ArtifactError(f"{mpath}: unknown program state {key!r} (saved by a newer stepq?)")
        setattr(state, key, STATE_CODECS[key][1](j, state_tensors.get(key, {})))
    prog.state = state
    return prog
