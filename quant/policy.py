"""Which linear layers are quantized and which stay high precision, and why.

Only linear layers are candidates (weights with per-output-channel scales, activations with one static
per-tensor scale). Norms, softmax, embeddings, attention score/value products and the MoE routing math
are never quantized: they are not linears. Among the linears, the ones below stay in the base precision.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

KEEP_HIGH_PRECISION: dict[str, str] = {
    r"(^|\.)lm_head$": "the logits pick text tokens; an argmax flip changes the answer",
    r"\.(gate|image_gate|audio_gate)$": "the MoE routers: a small error flips which experts run",
    r"final_layer\.linear$": "the flow head's output layer writes the velocity itself",
    r"(^|\.)vis_head\.\d+$": "builds the flow head's condition from the LLM hidden state",
    r"time_embed\.mlp\.\d+$": "timestep embedding: tiny, and every step depends on it",
    r"(^|\.)input_proj$": "reads the 32-channel latent; 32 inputs leave no room to average quantization noise",
    r"low_level_encoder\.out_proj$": "writes the latent the whole generation is built on",
    r"semantic_decoder\.in_proj$": "reads the latent (32 inputs)",
}


@dataclass
class LayerPolicy:
    keep: dict[str, str] = field(default_factory=lambda: dict(KEEP_HIGH_PRECISION))

    def reason_to_keep(self, module_path: str) -> str | None:
        for pattern, reason in self.keep.items():
            if re.search(pattern, module_path):
                return reason
        return None

    def quantizable(self, module_path: str) -> bool:
        return self.reason_to_keep(module_path) is None

    def validate(self) -> "LayerPolicy":
        for pattern in self.keep:
            re.compile(pattern)
        return self
