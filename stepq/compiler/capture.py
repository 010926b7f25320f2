"""Capture: ``torch.export.export(strict=False)`` → a Program.

``torch.fx.symbolic_trace`` fails on every diffusers denoiser (``len()`` of a proxy, iteration over
shapes, shape control flow); torch.export captures all of them bit-exactly (FACTS.md Q1), so it is
the only front end. The user's model is left as it was: the graph module reads its parameters and
buffers without copying them (``ep.module()`` shares their storage; capture keeps the sharing and
records every shared tensor as borrowed, read-only: ``stepq.compiler.borrow``), and its training
flags are restored.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import traceback
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from stepq.compiler.borrow import Borrowed
from stepq.compiler.errors import CaptureError
from stepq.compiler.noise import contained_noise
from stepq.compiler.program import InputSignature, Program

__all__ = ["TIMESTEP_NAMES", "capture", "find_timestep_by_dataflow", "widen_batch"]

log = logging.getLogger(__name__)

#: names tried, in order, when no timestep argument is given.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")
#: names tried, in order, for the noisy sample (used for structural roles and batch size).
SAMPLE_NAMES = ("sample", "hidden_states", "x", "latents", "latent_model_input", "x_t", "noisy_latents")

_TORCH_DIR = os.path.dirname(torch.__file__)
_STEPQ_DIR = os.path.dirname(os.path.dirname(__file__))


def _batch_dim(v: Any) -> Any:
    return {0: Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() >= 1 else None


def _output_class(model: torch.nn.Module) -> str | None:
    """``module:qualname`` of the dataclass ``model.forward`` returns with ``return_dict=True``
    (diffusers annotates it: ``UNet2DOutput | tuple``), read from the return annotation."""
    try:
        hint = typing.get_type_hints(model.forward).get("return")
    except Exception:  # unresolvable string annotations: no output class, the graph's output as it is
        hint = inspect.signature(model.forward).return_annotation
    for cls in typing.get_args(hint) or (hint,):
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__.startswith("diffusers."):
            return f"{cls.__module__}:{cls.__qualname__}"
    return None


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    json.dumps(v)  # raises TypeError for anything else
    return v


def _model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """The model's diffusers config (``ConfigMixin.config``) as plain JSON values, or None; entries
    that are not JSON (rare: a torch dtype) are dropped and logged."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, Mapping):
        return None
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        try:
            out[str(k)] = _jsonable(v)
        except (TypeError, ValueError):
            log.info("config entry %r of %s is not JSON (%s); not kept", k, type(model).__name__, type(v).__name__)
    return out


def widen_batch(inputs: dict[str, Any], sample: str | None) -> dict[str, Any]:
    """A batch-1 example, repeated to batch 2 for export: torch.export specialises a dimension of size
    1 (0/1 specialisation), so ``Dim.AUTO`` alone would lock the graph to batch 1. Every tensor whose
    dim 0 is the sample's batch (1) is repeated; the graph computes the same for each row."""
    if sample is None or not isinstance(inputs.get(sample), torch.Tensor) or inputs[sample].shape[0] != 1:
        return inputs

    def widen(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 1:
            return torch.cat([v, v])
        return v

    return {k: pytree.tree_map(widen, v) for k, v in inputs.items()}


def _normalize_inputs(model: torch.nn.Module, example_inputs: Any) -> dict[str, Any]:
    if isinstance(example_inputs, Mapping):
        inputs = dict(example_inputs)
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        try:
            bound = inspect.signature(model.forward).bind_partial(*example_inputs)
        except TypeError as e:
            raise CaptureError(f"example_inputs do not fit {type(model).__name__}.forward: {e}") from None
        inputs = dict(bound.arguments)
    else:
        raise CaptureError("example_inputs must be a dict of keyword arguments or a tuple of positional "
                           f"arguments, got {type(example_inputs).__name__}")
    params = inspect.signature(model.forward).parameters
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for name in inputs:
        if name not in params and not var_kw:
            raise CaptureError(f"example input {name!r} is not a parameter of {type(model).__name__}.forward; "
                               f"its parameters are {[n for n in params if n != 'self']}")
    return inputs


def _find_timestep(inputs: Mapping[str, Any], timestep_arg: str | None) -> str | None:
    """The timestep argument by explicit name or by one of ``TIMESTEP_NAMES``; None when neither
    (``find_timestep_by_dataflow`` then looks in the graph)."""
    if timestep_arg is not None:
        if timestep_arg not in inputs:
            raise CaptureError(f"timestep argument {timestep_arg!r} is not among the example inputs "
                               f"{sorted(inputs)}; pass the timestep in example_inputs under that name")
        return timestep_arg
    for name in TIMESTEP_NAMES:
        if name in inputs:
            return name
    return None


#: the ops of a sinusoidal / Fourier timestep projection (DDPM's get_timestep_embedding, DiT's
#: TimestepEmbedder, Gaussian Fourier features): the timestep is the input that reaches one of them.
_SINUSOID = {torch.ops.aten.sin.default, torch.ops.aten.cos.default}
#: ops the timestep passes through before its projection; a matmul or convolution on the way means
#: the sinusoid belongs to a learned feature (rotary embeddings of tokens), not to the timestep.
_BLOCKING = {torch.ops.aten.linear.default, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
             torch.ops.aten.conv3d.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default,
             torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
             torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten.embedding.default}


def find_timestep_by_dataflow(gm: torch.fx.GraphModule, inputs: Mapping[str, Any]) -> str:
    """The input that feeds the timestep embedding: a scalar or 1-D floating/integer tensor input
    from which a sin/cos is reached through no linear, convolution, matmul, attention or embedding
    (a rotary embedding of positions passes through none either, but positions are 2-D or longer
    ids; the candidates are the inputs of at most one dimension). Exactly one such input is the
    timestep; none or several raise a ``CaptureError`` listing them and asking for ``timestep_arg``."""
    candidates = []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.name not in inputs:
            continue
        v = inputs[node.name]
        if not isinstance(v, torch.Tensor) or v.dim() > 1:
            continue
        seen, stack = {node}, [node]
        while stack:
            n = stack.pop()
            if n.target in _SINUSOID:
                candidates.append(node.name)
                break
            for user in n.users:
                if user not in seen and user.target not in _BLOCKING:
                    seen.add(user)
                    stack.append(user)
    if len(candidates) == 1:
        log.info("timestep input found by dataflow: %r feeds the sinusoidal timestep projection", candidates[0])
        return candidates[0]
    what = (f"several inputs feed a sinusoidal projection ({candidates})" if candidates else
            "no input of at most one dimension feeds a sinusoidal (sin/cos) projection")
    raise CaptureError(f"no timestep input found: none of {list(TIMESTEP_NAMES)} is among the example inputs "
                       f"{sorted(inputs)}, and {what}; pass timestep_arg='<name>'")


def _find_sample(inputs: Mapping[str, Any], timestep: str, sample_arg: str | None) -> str | None:
    if sample_arg is not None:
        if sample_arg not in inputs:
            raise CaptureError(f"sample argument {sample_arg!r} is not among the example inputs {sorted(inputs)}")
        return sample_arg
    for name in SAMPLE_NAMES:
        if isinstance(inputs.get(name), torch.Tensor):
            return name
    for name, v in inputs.items():
        if name != timestep and isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.dim() >= 3:
            return name
    return None


def _user_frame(tb: traceback.StackSummary) -> traceback.FrameSummary | None:
    """The innermost frame of the model's own code (not torch's, not stepq's)."""
    for frame in reversed(tb):
        f = os.path.abspath(frame.filename)
        if f.startswith(_TORCH_DIR) or f.startswith(_STEPQ_DIR) or "/contextlib.py" in f or "<" in f:
            continue
        return frame
    return None


_ROUTING = ("bincount", "nonzero", "argsort", "topk", "expert")


def _advice(exc: BaseException, line: str = "") -> str:
    text = f"{type(exc).__name__}: {exc}"
    if (".numpy()" in text or "data-dependent" in text or "GuardOnDataDependent" in text) and any(
            w in line for w in _ROUTING):
        return ("the model routes tokens by their values (mixture-of-experts dispatch: the number of tokens per "
                "expert is data, not a shape), which torch.export cannot capture; export a dense dispatch instead "
                "(every expert on every token, weighted by the gate: the same output) or keep the experts out of "
                "the captured region")
    if ".numpy()" in text or "non-nested SymInt" in text:
        return ("the model turns tensor values into Python numbers (here on the line above: .numpy(), a set or a "
                "dict of sizes computed from a tensor, e.g. sequence lengths from an attention mask), so the graph "
                "would depend on data; make that code depend on shapes only, or call it with inputs that skip it")
    if "data-dependent" in text or "GuardOnDataDependent" in text or "item()" in text:
        return ("the model branches on, or converts to Python, the value of a tensor; move that logic out of "
                "forward, or make it depend on shapes only")
    if "not supported" in text or "Unsupported" in text:
        return "an operation torch.export does not support; wrap it in a torch.library custom op or rewrite it"
    if "Constraints violated" in text or "dynamic" in text.lower():
        return "a shape constraint failed; try capture(..., dynamic_batch=False)"
    return ("check that the example inputs run the model in eager mode, and that forward has no Python-side "
            "state that depends on tensor values; try capture(..., dynamic_batch=False)")


def _capture_error(model: torch.nn.Module, exc: BaseException) -> CaptureError:
    frame = _user_frame(traceback.extract_tb(exc.__traceback__))
    where = ""
    if frame is not None:
        where = f"\n  at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return CaptureError(f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
                        f"{first}{where}\n  what to try: {_advice(exc, (frame.line or '') if frame else '')}")


def _borrow_state(gm: torch.fx.GraphModule) -> Borrowed:
    """Give the graph module its own tensor objects that share the storage of the model's
    parameters, buffers and tensor constants (``detach()``: the same storage and version counter,
    ``requires_grad`` off, the model's own objects and flags untouched), and record them as
    borrowed: read-only to every stage (``stepq.compiler.borrow``), checked after every pass."""
    borrowed = Borrowed()
    for prefix, mod in gm.named_modules():
        where = f"{prefix}." if prefix else ""
        for name, p in list(mod._parameters.items()):
            if p is not None:
                param = torch.nn.Parameter(p.detach(), requires_grad=False)
                mod._parameters[name] = param
                borrowed.record(where + name, param)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                buf = b.detach()
                mod._buffers[name] = buf
                borrowed.record(where + name, buf)
        for name, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                view = v.detach()
                setattr(mod, name, view)
                borrowed.record(where + name, view)
    return borrowed


def capture(
    model: torch.nn.Module,
    example_inputs: Mapping[str, Any] | Sequence[Any],
    *,
    timestep_arg: str | None = None,
    sample_arg: str | None = None,
    dynamic_batch: bool = True,
    timestep_scale: float = 1.0,
) -> Program:
    """Capture ``model`` as an FX graph with torch.export.

    Args:
        model: any ``nn.Module`` denoiser (diffusers or hand-written). It is not modified.
        example_inputs: keyword arguments (diffusers style) or a tuple of positional arguments.
        timestep_arg: the name of the timestep input; when not given, found by name (timestep,
            timesteps, t, sigma, sigmas), else by dataflow: the one input that feeds the sinusoidal
            timestep projection (``find_timestep_by_dataflow``).
        sample_arg: the name of the noisy sample input; found by name or shape when not given.
        dynamic_batch: export with a symbolic batch dimension (``Dim.AUTO`` on dim 0 of every tensor). A
            batch-1 example is repeated to batch 2 for the export, so the batch stays symbolic.
        timestep_scale: multiply the timestep input by this to get the integer training timestep
            in [0, T) that timestep-indexed tables use (1000 for models that take t/1000, e.g. Flux).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _normalize_inputs(model, example_inputs)
    named = _find_timestep(inputs, timestep_arg)
    if named is not None:
        if not isinstance(inputs[named], torch.Tensor):
            inputs[named] = torch.as_tensor(inputs[named])
        if inputs[named].dim() > 1:
            raise CaptureError(f"timestep input {named!r} must be a scalar or a 1-D tensor, got shape "
                               f"{list(inputs[named].shape)}")

    dynamic_shapes = None
    export_inputs = inputs
    if dynamic_batch:
        # the sample by name or shape (a timestep is at most 1-D, so it is never taken for the sample)
        export_inputs = widen_batch(inputs, _find_sample(inputs, named or "", sample_arg))
        dynamic_shapes = {k: pytree.tree_map(_batch_dim, v) for k, v in export_inputs.items()}

    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), contained_noise():
            ep = torch.export.export(model, (), export_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except CaptureError:
        raise
    except Exception as e:
        raise _capture_error(model, e) from e
    finally:
        for m, training in flags.items():
            m.training = training

    gm = ep.module()
    del ep
    timestep = named if named is not None else find_timestep_by_dataflow(gm, inputs)
    sample = _find_sample(inputs, timestep, sample_arg)
    borrowed = _borrow_state(gm)
    # ep.module() forbids train()/eval(); the graph is specialised to eval mode already, and the
    # training loops of later stages need the plain nn.Module methods back.
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    # ... and it checks inputs against the placeholders' example shapes in a forward pre-hook: stepq
    # checks the call itself (InputSignature.bind), and passes may legitimately refine those shapes.
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
            gm._forward_pre_hooks_with_kwargs.pop(key, None)
    signature = InputSignature.from_call(model.forward, inputs, timestep)
    prog = Program(gm=gm, signature=signature, timestep_arg=timestep, sample_arg=sample,
                   model_name=type(model).__name__, timestep_scale=float(timestep_scale),
                   model_config=_model_config(model), output_class=_output_class(model), borrowed=borrowed)
    log.info("captured %s: %d nodes, timestep=%r, sample=%r", prog.model_name, len(gm.graph.nodes), timestep, sample)
    return prog
