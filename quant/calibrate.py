"""Calibration: the max |input| of every linear layer, over inputs produced by running the model itself."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def linear_input_amax(module: nn.Module, batches: Iterable[tuple]) -> dict[str, float]:
    """Run `module(*args)` for each batch; return {linear module path: max |input|} ("max" calibration).

    Paths are relative to `module`, the names the ONNX exporter records in each node's name scopes.
    """
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            def hook(_, args, name=name):
                x = args[0].detach().abs().amax().float()
                amax[name] = torch.maximum(amax[name], x) if name in amax else x
            hooks.append(sub.register_forward_pre_hook(hook))
    try:
        for args in batches:
            module(*args)
    finally:
        for h in hooks:
            h.remove()
    return {k: float(v) for k, v in amax.items()}  # one host read at the end, not per call
