"""Load released checkpoints by their upstream key names.

Accepted layouts of a directory (the Hugging Face ones): `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model.bin` (and its sharded index). `.bin` files are read
with `torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects.

Key mapping (UPSTREAM.md 1.2, 3.4): MingTok blocks live under `blocks.<chunk>.<i>` upstream and under
`blocks.<i>` here; keys we know to carry nothing (`rotary_emb.inv_freq`, a training teacher under
`target_backbone.`) are dropped. Everything else must match exactly, or one `CheckpointError` lists
every missing, unexpected and mis-shaped key.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

_CHUNKED_BLOCK = re.compile(r"(^|\.)blocks\.\d+\.(\d+)\.")
_IGNORED = (re.compile(r"\.rotary_emb\.inv_freq$"), re.compile(r"(^|\.)target_backbone\."))


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists every offending key."""


def upstream_to_ours(key: str) -> str:
    """`...blocks.0.7.attn...` -> `...blocks.7.attn...` (the last integer is the global block index)."""
    return _CHUNKED_BLOCK.sub(lambda m: f"{m.group(1)}blocks.{m.group(2)}.", key)


def is_ignored(key: str) -> bool:
    return any(p.search(key) for p in _IGNORED)


def remap(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {upstream_to_ours(k): v for k, v in state.items() if not is_ignored(k)}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"{path}: not a plain tensor checkpoint ({exc}); refusing to unpickle it") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # the training-checkpoint layout MingTok's own loader reads
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors")
    return obj


def read_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _read_bin(path)
    raise CheckpointError(f"{path}: unknown weight file type (want .safetensors or .bin)")


def read_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by its stored key."""
    d = Path(directory)
    if d.is_file():
        return read_file(d)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (d / shard).exists():
                    raise CheckpointError(f"{index}: shard {shard} is missing")
                state.update(read_file(d / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).exists():
            return read_file(d / name)
    files = sorted(d.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(read_file(f))
        return state
    raise CheckpointError(f"{d}: no model.safetensors, sharded index or pytorch_model.bin found")


def check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                       for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        lines = [f"{what} does not fit {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title} key(s):")
                lines.extend(f"    {item}" for item in items)
        raise CheckpointError("\n".join(lines))


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> nn.Module:
    """Strictly load upstream-named tensors into `model` (dtype converted to the model's)."""
    state = remap(state)
    check_keys(model, state, what)
    model.load_state_dict(state, strict=True)
    return model


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
