"""BailingMoe, the LLM of Ming-UniVision: GQA attention with a fused qkv, 1-D RoPE, MoE with shared experts.

Numerics follow UPSTREAM.md 3.2: RMSNorm multiplies by its weight in fp32 before casting back; the
router softmax runs in fp32, top-k weights are renormalised, and the expert outputs are combined in
fp32. RoPE is computed in fp32 from explicit position ids; with (3, B, L) ids the M-RoPE sections are
stitched (identical rows reduce to plain RoPE, which is all upstream ever builds).

Parameter names are the released ones (`model.layers.{i}.attention.query_key_value`, `...mlp.gate`,
`...mlp.experts.{e}.gate_proj`, `lm_head`, `vis_head`, `diffloss.net`), so checkpoints load as they are.

KV caches come in two forms, one set of weights:
  * concat (ONNX convention): past (B, kv, P, d) in, present (B, kv, P+L, d) out;
  * static (CUDA graphs): preallocated (B, kv, S_max, d) buffers written in place at `cache_position`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import FlowHeadConfig, LLMConfig
from .flow_head import FlowHead, VisHead
from .sdpa import attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)  # weight applied in fp32, then cast (not Llama's order)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section=None):
    """cos, sin (B, L, d) in fp32 from position ids (B, L), or (3, B, L) for M-RoPE."""
    if position_ids.dim() == 2:
        freqs = position_ids.float()[..., None] * inv_freq  # (B, L, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()
    freqs = position_ids.float()[..., None] * inv_freq  # (3, B, L, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    sections = list(mrope_section) * 2
    if sum(sections) != emb.shape[-1]:
        raise ValueError(f"mrope_section {tuple(mrope_section)} does not cover head_dim {emb.shape[-1]}")
    cos = torch.cat([part[i % 3] for i, part in enumerate(emb.cos().split(sections, dim=-1))], dim=-1)
    sin = torch.cat([part[i % 3] for i, part in enumerate(emb.sin().split(sections, dim=-1))], dim=-1)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, d); cos/sin (B, L, d). Rotate-half layout, applied in fp32."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def attention_mask_4d(key_mask: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, L, S): causal by cache slot, and only keys whose key_mask is set.

    key_mask (B, S) marks the keys a row may see (CFG rows hide the user turn this way);
    query_slots (L,) is the cache slot of each new token.
    """
    keys = torch.arange(key_mask.shape[1], device=key_mask.device)
    causal = keys[None, :] <= query_slots[:, None]  # (L, S)
    # A token always sees itself: a padding query would otherwise have no visible key and turn NaN,
    # and NaN values poison later rows even at zero attention weight.
    own = keys[None, :] == query_slots[:, None]
    return (causal[None, None] & key_mask.bool()[:, None, None, :]) | own[None, None]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)
        self.dense = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def project(self, x, cos, sin):
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, d)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask, fused: bool = False, cache_position=None):
        b, h, n, d = q.shape
        out = attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=d ** -0.5,
                        enable_gqa=self.num_heads != self.num_kv_heads, cache_position=cache_position,
                        decode_kernel=getattr(self, "fused_decode_attention", None) if fused else None)
        return self.dense(out.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x, cos, sin, mask, past_k, past_v):
        q, k, v = self.project(x, cos, sin)
        k = torch.cat([past_k, k.to(past_k.dtype)], dim=2)
        v = torch.cat([past_v, v.to(past_v.dtype)], dim=2)
        return self.attend(q, k, v, mask), k, v

    def forward_static(self, x, cos, sin, mask, k_cache, v_cache, cache_position, fused: bool = False):
        """fused: a one-token step may use the decode-attention kernel prepare_decode installed, and its
        `fused_kv_write` (qkv, cos, sin, k_cache, v_cache, cache_position) -> q, RoPE and the cache write in one
        kernel."""
        kv_write = getattr(self, "fused_kv_write", None) if fused and x.shape[1] == 1 else None
        if kv_write is not None:
            q = kv_write(self.query_key_value(x), cos, sin, k_cache, v_cache, cache_position)
            return self.attend(q, k_cache, v_cache, mask, fused, cache_position)
        q, k, v = self.project(x, cos, sin)
        k_cache.index_copy_(2, cache_position, k.to(k_cache.dtype))
        v_cache.index_copy_(2, cache_position, v.to(v_cache.dtype))
        return self.attend(q, k_cache, v_cache, mask, fused, cache_position)


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob and cfg.num_experts_per_tok > 1

    def forward(self, x: torch.Tensor):
        """x (T, H) -> expert ids (T, k), fp32 weights (T, k), logits (T, E)."""
        logits = F.linear(x, self.weight)
        return (*self.select(logits), logits)

    def select(self, logits: torch.Tensor):
        """logits (..., E) -> expert ids (..., k), fp32 weights (..., k)."""
        # Ties are common (bf16 logits of 64 experts: ~15% of rows tie within their top 7 with random
        # weights, benchmarks/router_ties.py), and torch.topk leaves open which tied expert it returns and in what order (its docs: they
        # may vary between calls), which moves the expert sum's rounding. A stable sort takes the lower
        # expert id first, every time (export.onnx_export writes it as ONNX TopK, specified the same way).
        weights, idx = torch.sort(logits.softmax(dim=-1, dtype=torch.float32), dim=-1, descending=True, stable=True)
        weights, idx = weights[..., :self.top_k], idx[..., :self.top_k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return idx, weights


class MoE(nn.Module):
    """Routed experts plus always-on shared experts; image rows are routed by `image_gate`.

    The routed experts' weights are stored stacked, (E, I, H) / (E, H, I), so any subset can be read
    without a host sync; state dicts still use the released per-expert names
    (`experts.{e}.gate_proj.weight`, ...), converted by the two hooks below.

    Dispatch modes, all equal in exact arithmetic:
      * "loop": per-expert batches (eager reference; data-dependent shapes);
      * "gather": gathers the routed experts' weights per token (decode: reads only those weights);
      * "dense": runs every expert on every token and keeps the routed ones (static shapes, prefill export);
      * "fused": hands (x, ids, weights) to `self.fused_decode`, a kernel installed by the GPU fast path
        (runtime.fast.decode_weights) that returns the weighted sum (T, H) reading only routed experts
        (with FP8 weights the shared experts too, as extra slots: forward then skips its own call of them);
        rows are then routed with the stacked [gate; image_gate] weight `fused_router` when installed
        (one GEMM for both routers; the same choices up to the GEMM's rounding), the router GEMMs
        go through `router_linear` (x, weight) -> logits when installed (the skinny kernel), and the
        softmax and top-k through `fused_route` (logits (T, G, E), mask) -> (ids, weights) when installed
        (one kernel; its slots may end with the shared experts', which `fused_decode` then takes as they are)."""

    PARTS = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts = e
        self.w_gate = nn.Parameter(torch.empty(e, i, h))
        self.w_up = nn.Parameter(torch.empty(e, i, h))
        self.w_down = nn.Parameter(torch.empty(e, h, i))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.kaiming_uniform_(w.view(-1, w.shape[-1]), a=5 ** 0.5)
        self.gate = Router(cfg)
        if cfg.multi_gate:
            self.image_gate = Router(cfg)
            self.audio_gate = Router(cfg)  # present in checkpoints, never used by Ming-UniVision
        self.shared_experts = (ExpertMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        self._register_state_dict_hook(MoE._to_released_names)
        self.register_load_state_dict_pre_hook(MoE._from_released_names)

    @staticmethod
    def _to_released_names(module, state, prefix, local_metadata):
        for ours, theirs in MoE.PARTS:
            stacked = state.pop(prefix + ours)
            for e in range(stacked.shape[0]):
                state[f"{prefix}experts.{e}.{theirs}.weight"] = stacked[e]
        return state

    @staticmethod
    def _from_released_names(module, state, prefix, local_metadata, strict, missing, unexpected, errors):
        for ours, theirs in MoE.PARTS:
            keys = [f"{prefix}experts.{e}.{theirs}.weight" for e in range(module.num_experts)]
            if all(k in state for k in keys):
                state[prefix + ours] = torch.stack([state.pop(k) for k in keys])

    def route(self, x, image_mask, fused: bool = False, want_logits: bool = True):
        """x (T, H) -> expert ids (T, k), fp32 weights (T, k), each row's router logits (T, E); a fused route may
        append the shared experts' slots (`fused_route`) and, without want_logits, give None for the logits it
        need not select."""
        both = getattr(self, "fused_router", None) if fused else None  # (2E, H): [gate; image_gate], prepare_decode's
        linear = (getattr(self, "router_linear", None) if fused else None) or F.linear  # prepare_decode's kernel
        kernel = getattr(self, "fused_route", None) if fused else None  # (logits, mask) -> slots, prepare_decode's
        if both is not None and image_mask is not None:
            # one GEMM and one softmax-sort for both routers (the decode step is launch-bound)
            logits2 = linear(x, both).view(x.shape[0], 2, -1)  # (T, 2, E)
            m = image_mask.reshape(-1, 1).bool()
            logits = torch.where(m, logits2[:, 1], logits2[:, 0]) if want_logits or kernel is None else None
            if kernel is not None:  # choice, softmax, top-k (and the FP8 shared-expert slots) in one launch
                return (*kernel(logits2, m), logits)
            idx2, w2 = self.gate.select(logits2)
            return torch.where(m, idx2[:, 1], idx2[:, 0]), torch.where(m, w2[:, 1], w2[:, 0]), logits
        logits = linear(x, self.gate.weight)  # (T, E), as Router.forward
        if kernel is not None and (image_mask is None or not hasattr(self, "image_gate")):
            return (*kernel(logits, None), logits)
        idx, w = self.gate.select(logits)
        if image_mask is not None and hasattr(self, "image_gate"):
            i_idx, i_w, i_logits = self.image_gate(x)
            m = image_mask.reshape(-1, 1).bool()
            idx, w, logits = torch.where(m, i_idx, idx), torch.where(m, i_w, w), torch.where(m, i_logits, logits)
        return idx, w, logits

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w_gate[e])) * F.linear(x, self.w_up[e]), self.w_down[e])

    def routed_outputs(self, x, idx, mode: str) -> torch.Tensor:
        """Each token's k routed expert outputs (T, k, H)."""
        t, k = idx.shape
        if mode == "loop":
            out = x.new_zeros(t * k, x.shape[-1])
            flat = idx.reshape(-1)
            token = torch.arange(t, device=x.device).repeat_interleave(k)
            for e in torch.unique(flat).tolist():
                sel = (flat == e).nonzero(as_tuple=True)[0]
                out[sel] = self.expert(e, x[token[sel]])
            return out.view(t, k, -1)
        if mode == "gather":
            xk = x[:, None, :, None]  # (T, 1, H, 1)
            h = F.silu((self.w_gate[idx] @ xk).squeeze(-1)) * (self.w_up[idx] @ xk).squeeze(-1)  # (T, k, I)
            return (self.w_down[idx] @ h[..., None]).squeeze(-1)  # (T, k, H)
        if mode == "dense":
            g = torch.einsum("th,eih->tei", x, self.w_gate)
            u = torch.einsum("th,eih->tei", x, self.w_up)
            every = torch.einsum("tei,ehi->teh", F.silu(g) * u, self.w_down)  # (T, E, H)
            return torch.gather(every, 1, idx[..., None].expand(t, k, every.shape[-1]))
        raise ValueError(f"unknown MoE mode {mode!r}")

    def forward(self, x: torch.Tensor, image_mask=None, mode: str = "loop", record: dict | None = None):
        b, n, h = x.shape
        flat = x.reshape(-1, h)
        idx, w, logits = self.route(flat, image_mask, fused=mode == "fused", want_logits=record is not None)
        if record is not None:  # the routed slots (a fused route may append the shared experts as more)
            k = self.gate.top_k
            record.setdefault("router_logits", []).append(logits.view(b, n, -1))
            record.setdefault("topk_idx", []).append(idx[:, :k].reshape(b, n, -1))
            record.setdefault("topk_weight", []).append(w[:, :k].reshape(b, n, -1))
        shared_done = False
        if mode == "fused":
            fused = getattr(self, "fused_decode", None)
            if fused is None:
                raise RuntimeError("MoE mode 'fused' needs a kernel: runtime.fast.decode_weights.prepare_decode(model)")
            y = fused(flat, idx, w).to(x.dtype).view(b, n, h)
            shared_done = getattr(fused, "shared_slots", 0) > 0  # the kernel ran the shared experts as slots
        else:
            outs = self.routed_outputs(flat, idx, mode)
            y = (outs.float() * w[..., None]).sum(dim=1).to(x.dtype).view(b, n, h)
        if self.shared_experts is not None and not shared_done:
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg)
        self.is_moe = cfg.num_experts > 0 and index >= cfg.first_k_dense_replace
        self.mlp = MoE(cfg) if self.is_moe else ExpertMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def ffn(self, x, image_mask, moe_mode, record):
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, image_mask, moe_mode, record) if self.is_moe else self.mlp(h))


class BailingMoeModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    def _apply(self, fn, recurse=True):
        # inv_freq is fp32 and computed on the CPU, as upstream does: recompute it after any move or
        # cast (a .to(bfloat16) must not round it; to_empty() leaves it uninitialised).
        super()._apply(fn, recurse)
        self._buffers["inv_freq"] = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta).to(self.inv_freq.device)
        return self

    def forward(self, inputs_embeds, attention_mask, position_ids, past_keys, past_values,
                image_mask=None, moe_mode: str = "loop", record: dict | None = None):
        """Concat-cache form.

        inputs_embeds (B, L, H); attention_mask (B, P+L) 1 = visible; position_ids (B, L) or (3, B, L);
        past_keys/values: per layer (B, kv, P, d). Returns the final-normed hidden (B, L, H) and the
        present keys/values per layer (B, kv, P+L, d).
        """
        past = past_keys[0].shape[2]
        slots = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past
        mask = attention_mask_4d(attention_mask, slots)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, self.cfg.mrope_section)
        x = inputs_embeds
        keys, values = [], []
        for layer, pk, pv in zip(self.layers, past_keys, past_values):
            if record is not None:
                record.setdefault("layer_inputs", []).append(x)
            h, k, v = layer.attention(layer.input_layernorm(x), cos, sin, mask, pk, pv)
            x = layer.ffn(x + h, image_mask, moe_mode, record)
            keys.append(k)
            values.append(v)
        return self.norm(x), keys, values

    def forward_static(self, inputs_embeds, attention_mask, position_ids, k_caches, v_caches, cache_position,
                       image_mask=None, moe_mode: str = "gather"):
        """Static-cache form: attention_mask (B, S_max) covers every slot of the preallocated buffers.
        moe_mode "fused" (the GPU fast path) also runs one-token attention on the installed kernel and routes
        with both routers' stacked weight (`fused_router`), through `router_linear`, when prepare_decode
        installed them."""
        mask = attention_mask_4d(attention_mask, cache_position)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, self.cfg.mrope_section)
        x = inputs_embeds
        for layer, kc, vc in zip(self.layers, k_caches, v_caches):
            x = x + layer.attention.forward_static(layer.input_layernorm(x), cos, sin, mask, kc, vc, cache_position,
                                                   fused=moe_mode == "fused")
            x = layer.ffn(x, image_mask, moe_mode, None)
        return self.norm(x)

    def empty_cache(self, batch: int, length: int = 0, dtype=torch.float32, device=None):
        shape = (batch, self.cfg.num_kv_heads, length, self.cfg.head_dim)
        n = len(self.layers)
        return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)])


class LanguageModel(nn.Module):
    """The `model.` part of the composite checkpoint: LLM, lm_head, vis_head and the flow head."""

    def __init__(self, cfg: LLMConfig, flow_cfg: FlowHeadConfig):
        super().__init__()
        self.model = BailingMoeModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.vis_head = VisHead(flow_cfg)
        self.diffloss = FlowHead(flow_cfg)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
