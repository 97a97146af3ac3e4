"""The decode preparation a model carries (runtime.fast.decode_weights.prepare_decode), so that a generator can
tell when a later preparation replaced the kernels and weight copies its captured graphs read.

Light on purpose: generators without the kernels (no triton) check it too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

_ATTR = "_decode_preparation"


@dataclass(frozen=True, eq=False)  # compared by identity: each preparation is a new object
class Preparation:
    weights: str  # "bf16" | "fp8"
    settings: tuple  # everything else that changes the installed modules
    report: dict = field(default_factory=dict)


def weights_state(model: nn.Module) -> int | None:
    """A number that changes when the model's parameters are moved, cast or replaced (their storage) or written in
    place (load_state_dict, copy_: their version counters). None where a parameter has no version counter (made
    under torch.inference_mode): then every preparation counts as new."""
    try:
        return hash(tuple((p.data_ptr(), p._version) for p in model.parameters()))
    except RuntimeError:
        return None


def current(model: nn.Module) -> Preparation | None:
    return model.__dict__.get(_ATTR)


def record(model: nn.Module, prep: Preparation) -> None:
    model.__dict__[_ATTR] = prep  # a plain attribute: neither a buffer nor a submodule, invisible to state dicts


__all__ = ["Preparation", "current", "record", "weights_state"]
