"""The piece contract: names, shapes and dtypes of every exported piece's inputs and outputs.

This is the one place they are written down; `models.pieces` implements them, `export` names ONNX
I/O and dynamic axes from them, and `runtime` binds buffers by them.

Shapes mix integers (fixed by the model config) and strings (dynamic axes, ONNX-style names).
dtype "float" means the piece's compute precision (fp32/fp16/bf16); the others are exact.
KV caches follow the ecosystem's convention: `past_key_values.{i}.key|value` in, `present.{i}.key|value`
out, dims (batch_size, num_kv_heads, past_sequence_length | total_sequence_length, head_size).

Rows: text-to-image runs R CFG rows per prompt (R=2: cond, uncond; R=3 when editing: + text-uncond),
prompt-major (row = b * R + r). The LLM sees batch_size = prompts * R; the flow head takes the rows as a
(prompts, R, hidden) tensor and returns one latent per prompt; the semantic decoder and pixel decoder
run once per prompt (the rows share one latent).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

PIECE_NAMES = ("encoder", "encoder_understanding", "semantic_decoder", "pixel_decoder", "llm_prefill", "llm_step",
               "flow_head")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints and dynamic-axis names
    dtype: str  # "float" | "float32" | "int64" | "bool"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class PieceSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in self.inputs + self.outputs if t.dynamic_axes}

    def to_dict(self) -> dict:
        io = lambda ts: [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in ts]  # noqa: E731
        return {"name": self.name, "inputs": io(self.inputs), "outputs": io(self.outputs)}


def kv_specs(num_layers: int, heads: int, head_dim: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    past, present = [], []
    for i in range(num_layers):
        for kind in ("key", "value"):
            past.append(TensorSpec(f"past_key_values.{i}.{kind}", ("batch_size", heads, "past_sequence_length", head_dim), "float"))
            present.append(TensorSpec(f"present.{i}.{kind}", ("batch_size", heads, "total_sequence_length", head_dim), "float"))
    return tuple(past), tuple(present)


def piece_specs(cfg: ModelConfig) -> dict[str, PieceSpec]:
    mt, llm, fh = cfg.mingtok, cfg.llm, cfg.flow_head
    hidden, lat, sem = llm.hidden_size, mt.latent_dim, mt.semantic_dim
    sem_past, sem_present = kv_specs(mt.semantic_depth, mt.semantic_dim // mt.head_dim, mt.head_dim)
    llm_past, llm_present = kv_specs(llm.num_layers, llm.num_kv_heads, llm.head_dim)

    def llm_spec(name: str, what: str) -> PieceSpec:
        return PieceSpec(
            name,
            (TensorSpec("inputs_embeds", ("batch_size", "sequence_length", hidden), "float"),
             TensorSpec("attention_mask", ("batch_size", "total_sequence_length"), "int64"),
             TensorSpec("position_ids", ("batch_size", "sequence_length"), "int64"),
             TensorSpec("image_mask", ("batch_size", "sequence_length"), "bool"),
             *llm_past),
            (TensorSpec("last_hidden_state", ("batch_size", 1, hidden), "float"),
             TensorSpec("logits", ("batch_size", 1, llm.vocab_size), "float32"),
             *llm_present),
            what,
        )

    def encoder_spec(name: str, size: int, what: str) -> PieceSpec:
        n = (size // mt.patch_size) ** 2
        return PieceSpec(
            name,
            (TensorSpec("pixel_values", ("batch_size", 3, size, size), "float"),),
            (TensorSpec("latents", ("batch_size", n + 1, lat), "float"),
             TensorSpec("features", ("batch_size", n, sem), "float"),
             TensorSpec("inputs_embeds", ("batch_size", n, hidden), "float")),
            f"{what}: image in [-1, 1] ({size}x{size}) -> normalised latents (cls last), semantic features of "
            "the patches (parallel causal pass) and their LLM embeddings",
        )

    return {
        "encoder": encoder_spec("encoder", mt.image_size, "editing / reconstruction input"),
        "encoder_understanding": encoder_spec("encoder_understanding", cfg.understanding_image_size,
                                              "understanding input"),
        "semantic_decoder": PieceSpec(
            "semantic_decoder",
            (TensorSpec("latents", ("batch_size", "sequence_length", lat), "float"), *sem_past),
            (TensorSpec("features", ("batch_size", "sequence_length", sem), "float"),
             TensorSpec("inputs_embeds", ("batch_size", "sequence_length", hidden), "float"),
             *sem_present),
            "normalised latents after a cache -> semantic features, the next LLM inputs and the grown cache "
            "(sequence_length 1 per generated token; N for a prefill)",
        ),
        "pixel_decoder": PieceSpec(
            "pixel_decoder",
            (TensorSpec("features", ("batch_size", cfg.num_image_tokens, sem), "float"),),
            (TensorSpec("image", ("batch_size", 3, cfg.generated_image_size, cfg.generated_image_size), "float"),),
            "semantic features -> image in [-1, 1]",
        ),
        "llm_prefill": llm_spec("llm_prefill", "prompt prefill: every expert on every token (static shapes)"),
        "llm_step": llm_spec("llm_step", "decode step: gathers only the routed experts' weights"),
        "flow_head": PieceSpec(
            "flow_head",
            (TensorSpec("condition_hidden", ("batch_size", "cfg_rows", hidden), "float"),
             TensorSpec("noise", ("batch_size", lat), "float32"),
             TensorSpec("text_cfg", (1,), "float32"),
             TensorSpec("image_cfg", (1,), "float32"),
             TensorSpec("temperature", (1,), "float32")),
            (TensorSpec("latent", ("batch_size", lat), "float32"),),
            f"LLM hidden of the CFG rows -> vis_head -> {fh.num_steps} Euler steps with guidance -> latent",
        ),
    }
