"""The Program: a captured graph plus everything the passes and backends need to know about it.

``Program.gm`` is the ``torch.fx.GraphModule`` from ``torch.export`` (ATen IR, fake-tensor shapes
in ``node.meta['val']``). ``InputSignature`` remembers how the model was called, so the program
and the compiled model accept the same arguments, positionally or by name, as the user's model.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
from torch.fx.graph import _PyTreeCodeGen

from stepq.compiler.borrow import Borrowed
from stepq.compiler.errors import InputSignatureError
from stepq.compiler.input_checks import TimestepRange, batched_args, check_call
from stepq.compiler.state import ProgramState

__all__ = ["STAGES", "InputSignature", "Program", "TensorInfo"]

#: the stages a program moves through, in order.
STAGES = ("captured", "prepared", "calibrated", "converted")

_JSONABLE = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorInfo:
        return cls(tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class InputSignature:
    """How the captured model is called.

    ``params`` lists the forward's parameters in order (name, accepts-positional); ``captured``
    the arguments the graph takes, in the order the example inputs gave them; ``constants`` the
    non-tensor captured arguments (torch.export specialises on them, so a call must repeat them);
    ``tensors`` shape and dtype of every captured tensor at capture time.
    """

    params: tuple[tuple[str, bool], ...]
    captured: tuple[str, ...]
    constants: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    timestep: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_call(cls, forward: Any, inputs: Mapping[str, Any], timestep: str) -> InputSignature:
        sig = inspect.signature(forward)
        params, defaults = [], {}
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            params.append((p.name, p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)))
            if p.default is not p.empty and isinstance(p.default, _JSONABLE):
                defaults[p.name] = p.default
        constants = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
        tensors = {k: TensorInfo.of(v) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        return cls(tuple(params), tuple(inputs), constants, tensors, timestep, defaults)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any], *,
             timesteps: TimestepRange | None = None) -> dict[str, Any]:
        """Map a call's arguments onto the captured inputs, with clear errors for what cannot be;
        with ``timesteps``, the timestep's values are checked (raised or clamped) before its cast."""
        given: dict[str, Any] = {}
        positional = [n for n, pos in self.params if pos]
        if len(args) > len(positional):
            raise InputSignatureError(f"the model takes at most {len(positional)} positional arguments "
                                      f"({', '.join(positional)}), got {len(args)}")
        for name, value in zip(positional, args):
            given[name] = value
        known = {n for n, _ in self.params}
        for name, value in kwargs.items():
            if name in given:
                raise InputSignatureError(f"argument {name!r} given twice")
            if name not in known:
                raise InputSignatureError(f"unknown argument {name!r}; the model takes {sorted(known)}")
            given[name] = value
        out: dict[str, Any] = {}
        for name in self.captured:
            if name in given:
                value = given.pop(name)
            elif name in self.constants:
                value = self.constants[name]
            else:
                raise InputSignatureError(f"missing argument {name!r} (the model was captured with it)")
            out[name] = self._check(name, value, timesteps)
        for name, value in given.items():
            if value is None or (name in self.defaults and value == self.defaults[name]):
                continue
            raise InputSignatureError(
                f"argument {name!r} was not among the example inputs at capture time, so the compiled "
                f"graph cannot take it; capture again with {name!r} in example_inputs")
        return out

    def _check(self, name: str, value: Any, timesteps: TimestepRange | None = None) -> Any:
        if name in self.constants:
            if isinstance(value, torch.Tensor) or value != self.constants[name]:
                raise InputSignatureError(
                    f"argument {name!r} was captured as the constant {self.constants[name]!r} and the graph is "
                    f"specialised on it; got {value!r}")
            return value
        info = self.tensors[name]
        if value is None:
            raise InputSignatureError(f"argument {name!r} is None; the model was captured with a {info.dtype} tensor "
                                      f"of shape {list(info.shape)} there, and the graph needs one")
        if name == self.timestep:
            return self._timestep(value, info, timesteps)
        if not isinstance(value, torch.Tensor):
            raise InputSignatureError(f"argument {name!r} must be a tensor, got {type(value).__name__}")
        if value.dim() != len(info.shape):
            raise InputSignatureError(f"argument {name!r} must have {len(info.shape)} dimensions "
                                      f"(captured shape {list(info.shape)}), got shape {list(value.shape)}")
        return value

    def _timestep(self, value: Any, info: TensorInfo, timesteps: TimestepRange | None) -> torch.Tensor:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputSignatureError(f"argument {self.timestep!r} (the timestep) must be a number or a tensor, "
                                      f"got {type(value).__name__}: {e}") from None
        if timesteps is not None:  # on the value as given, before a cast to the captured dtype
            t = timesteps.check(t, name=self.timestep)
        dtype = info.torch_dtype
        if t.dtype != dtype:
            t = torch.round(t).to(dtype) if not dtype.is_floating_point and t.dtype.is_floating_point else t.to(dtype)
        if len(info.shape) == 0 and t.dim() == 1:
            if t.numel() and not bool((t == t[0]).all()):
                raise InputSignatureError(
                    f"the timestep was captured as a scalar, so one call takes one timestep; got {t.tolist()}")
            t = t[0] if t.numel() else t.reshape(())
        elif len(info.shape) == 1 and t.dim() == 0:
            t = t.reshape(1)
        return t

    def expand_timestep(self, bound: dict[str, Any], batch: int | None) -> dict[str, Any]:
        """Broadcast a one-element timestep to the batch (diffusers models expand it themselves, but
        graphs captured with a [B] timestep need it at the call's batch size)."""
        t = bound.get(self.timestep)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == 1 and batch and batch > 1:
            bound[self.timestep] = t.expand(batch).contiguous()
        return bound

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": [list(p) for p in self.params],
            "captured": list(self.captured),
            "constants": dict(self.constants),
            "tensors": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in self.tensors.items()},
            "timestep": self.timestep,
            "defaults": dict(self.defaults),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSignature:
        return cls(
            params=tuple((str(n), bool(p)) for n, p in d["params"]),
            captured=tuple(d["captured"]),
            constants=dict(d["constants"]),
            tensors={k: TensorInfo(tuple(v["shape"]), v["dtype"]) for k, v in d["tensors"].items()},
            timestep=d["timestep"],
            defaults=dict(d.get("defaults", {})),
        )


@dataclass
class Program:
    """A captured denoiser on its way through the pipeline (what ``stepq.capture`` returns).

    ``gm``: the ``torch.fx.GraphModule`` every pass rewrites; ``signature``: how the model is
    called (``InputSignature``); ``timestep_arg`` / ``sample_arg``: the names of the timestep and
    sample inputs; ``model_name``: the source model's class; ``timestep_scale``: the factor that
    maps a call's timestep to the integer training timestep (1000 for flow matching's t ∈ [0, 1]);
    ``model_config``: the source model's diffusers config as JSON values (None for other models);
    ``output_class``: ``module:qualname`` of the output dataclass it returns with ``return_dict=True``;
    ``recipe``: the ``Recipe`` once prepared; ``stage``: ``captured`` → ``prepared`` →
    ``calibrated`` → ``converted``; ``history``: the passes run so far; ``state``: method state
    that is not in the graph (observer statistics, timestep tables, PTQD statistics);
    ``borrowed``: the tensors shared read-only with the user's model (``stepq.compiler.borrow``).
    """

    gm: torch.fx.GraphModule
    signature: InputSignature
    timestep_arg: str
    sample_arg: str | None
    model_name: str
    timestep_scale: float = 1.0
    #: the source model's diffusers config (``model.config`` as JSON values), None for other models
    model_config: dict[str, Any] | None = None
    #: ``module:qualname`` of the output dataclass the model returns with ``return_dict=True``
    #: (``UNet2DOutput``, ``Transformer2DModelOutput``), None when it has none
    output_class: str | None = None
    recipe: Any = None  # stepq.Recipe once prepared
    stage: str = "captured"
    history: list[str] = field(default_factory=list)
    #: method state that is not part of the graph: observer statistics, timestep tables, PTQD stats.
    state: ProgramState = field(default_factory=ProgramState)
    #: the user's tensors the graph module reads without owning them (capture shares them read-only;
    #: stepq.compiler.borrow), shared with the program's copies
    borrowed: Borrowed = field(default_factory=Borrowed, repr=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.gm(**self.bind(args, kwargs))

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        bound = check_call(self.signature, self.signature.bind(args, kwargs, timesteps=self.timestep_range),
                           sample_arg=self.sample_arg, batched=batched_args(self.gm, self.sample_arg))
        batch = None
        if self.sample_arg is not None and isinstance(bound.get(self.sample_arg), torch.Tensor):
            batch = bound[self.sample_arg].shape[0]
        return self.signature.expand_timestep(bound, batch)

    def flat_inputs(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
        """The call's arguments flattened in placeholder order (what ``fx.Interpreter.run`` takes)."""
        bound = self.bind(args, kwargs)
        codegen = self.gm.graph._codegen
        if isinstance(codegen, _PyTreeCodeGen):
            return list(fx_pytree.tree_flatten_spec(((), bound), codegen.pytree_info.in_spec))
        return [bound[n.target] for n in self.gm.graph.nodes if n.op == "placeholder"]

    def placeholder(self, name: str) -> torch.fx.Node:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.name == name:
                return node
        raise KeyError(name)

    @property
    def timestep_range(self) -> TimestepRange | None:
        """The valid timesteps once a recipe fixes T and the policy (None while only captured)."""
        if self.recipe is None:
            return None
        return TimestepRange(self.recipe.num_train_timesteps, self.timestep_scale, self.recipe.timestep_policy)

    @property
    def timestep_node(self) -> torch.fx.Node:
        return self.placeholder(self.timestep_arg)

    def replace(self, **changes: Any) -> Program:
        return dataclasses.replace(self, **changes)

    def copy(self) -> Program:
        """An independent copy: its own graph module (parameters and buffers), history and state
        containers (the statistics objects inside the state are shared, read-only). The tensors
        borrowed from the user's model stay borrowed, by both: they are read-only to either
        (``stepq.compiler.borrow``), so one copy of them serves every program."""
        memo: dict[int, Any] = {}
        storages = self.borrowed.storages()
        for mod in self.gm.modules():
            for t in (*mod._parameters.values(), *mod._buffers.values(),
                      *(v for v in vars(mod).values() if isinstance(v, torch.Tensor))):
                if t is not None and self.borrowed.is_borrowed(t, storages):
                    memo[id(t)] = t
        return self.replace(gm=copy.deepcopy(self.gm, memo), history=list(self.history), state=self.state.copy())

    def advance(self, stage: str) -> None:
        if STAGES.index(stage) < STAGES.index(self.stage):
            raise ValueError(f"cannot move a program from stage {self.stage!r} back to {stage!r}")
        self.stage = stage

    def num_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.gm.parameters())

    def print_readable(self) -> str:
        return self.gm.print_readable(print_output=False)
