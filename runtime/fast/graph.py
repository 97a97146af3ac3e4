"""Text-to-image with ONE CUDA graph per image token.

The graph holds the whole token step: LLM step over the CFG rows (static KV caches written in place,
routed experts gathered on the device) -> vis_head -> the flow head's Euler loop with guidance ->
one semantic-decoder step (once per prompt, not per identical CFG row) -> connector -> next LLM
input. All its state lives in preallocated buffers, every index (cache slot, position, token number)
is a device tensor the graph advances itself, and the noise of every token is drawn up front: no
host sync and no allocation between replays. The prefill and the pixel decode run outside the graph.

On a CPU (or with use_graph=False) the same step function runs eagerly, which is how it is tested
against the reference pipeline without a GPU.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from models.pieces import LLMHiddenStatic, SemanticDecoderStatic
from models.prompting import generation_rows
from models.univision import MingUniVision

from ..loop import LLMCache, LoopImage, drive
from . import preparation
from .flow_head import FastFlowHead
from .graphed import GraphedCall, capture_graph

logger = logging.getLogger(__name__)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass
class _Bucket:
    """Static buffers (and the captured graph) for one (prompts, rows, cache length) shape."""

    b: int
    r: int
    s_max: int
    llm_caches: tuple
    sem_caches: tuple
    embeds: torch.Tensor  # (B*R, 1, H)
    mask: torch.Tensor  # (B*R, S_max) int64
    positions: torch.Tensor  # (B*R, 1)
    cache_pos: torch.Tensor  # (1,) slot of the current token
    sem_pos: torch.Tensor  # (1,)
    step: torch.Tensor  # (1,) image-token index
    noise: torch.Tensor  # (N+1, B, C)
    scalars: tuple  # text_cfg, image_cfg, temperature, each (1,)
    latents: torch.Tensor  # (N, B, C)
    feats: torch.Tensor  # (B, N, D)
    no_image: torch.Tensor  # (B*R, 1) bool
    graph: object = None
    capture_seconds: float = 0.0


INDUCTOR_PDL_ENV = "MINGRT_INDUCTOR_PDL"


def inductor_options(decode_pdl: bool) -> dict | None:
    """Inductor's options for the compiled steps: its own kernels around ours launch with PDL too (its
    triton.enable_pdl) where our decode kernels do (`decode_pdl`), this torch has the switch and INDUCTOR_PDL_ENV is
    not "0". On the H200 the FP8 token step took 9.07 against 9.41 ms and bf16 12.57 against 12.68 (one process
    each: benchmarks/results/pdl_check_h200_s12_inductor*.json), the gaps between the compiled steps' small kernels.
    The run-time compile and the AOTInductor packages (export.compiled_steps) take the same options."""
    if not decode_pdl or os.environ.get(INDUCTOR_PDL_ENV, "1") == "0":
        return None
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl"):
        logger.info("torch %s's Inductor has no PDL switch: its kernels launch without PDL", torch.__version__)
        return None
    return {"triton.enable_pdl": True}


class GraphImageGenerator:
    def __init__(self, model: MingUniVision, use_graph: bool | None = None, bucket: int = 64,
                 kernels: bool | None = None, weights: str = "bf16", compile: bool | None = None):
        """kernels: use the Triton decode kernels (default: when a GPU and triton are there);
        weights: "bf16" or "fp8" weight streaming for them (fp8 adds FP8 copies of the decode linears);
        compile: torch.compile the LLM step and the semantic-decoder step (default: with the kernels on
        a GPU), which fuses the ~60 small launches per layer around the kernels (custom ops to it).
        use_compiled_steps() swaps in AOTInductor packages of those two steps instead."""
        from kernels import available as kernels_available

        self.model, self.cfg = model.eval(), model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.bucket = bucket
        use_kernels = (self.device.type == "cuda" and kernels_available()) if kernels is None else kernels
        if weights != "bf16" and not use_kernels:
            raise ValueError(f"weights={weights!r} needs the decode kernels (a GPU with triton, or kernels=True)")
        self.kernels, self.weights = use_kernels, weights
        self.moe_mode = "fused" if use_kernels else "gather"
        self._check_pdl()  # its self-check must run before any capture
        logger.info("decode kernels launch %s programmatic dependent launch", "with" if self.pdl else "without")
        if use_kernels:
            from .decode_weights import prepare_decode
            from .kernel_flow_head import KernelFlowHead

            prepare_decode(model, weights)
            self.flow = KernelFlowHead(model, weights=weights)
        else:
            self.flow = FastFlowHead(model)
        self._preparation = preparation.current(model)  # what our graphs will read (steps() checks it)
        self.llm = LLMHiddenStatic(model, moe_mode=self.moe_mode)
        self.sem = SemanticDecoderStatic(model, fused=use_kernels)
        self.compiled = (use_kernels and self.device.type == "cuda") if compile is None else compile
        self._llm_step, self._sem_step = self.llm, self.sem
        if self.compiled:  # shapes are static per bucket: one compile per bucket, during the warm-up
            options = self._inductor_options()
            self._llm_step = torch.compile(self.llm, dynamic=False, options=options)
            self._sem_step = torch.compile(self.sem, dynamic=False, options=options)
        self._buckets: dict[tuple, _Bucket] = {}
        # the pixel decoder runs once per image, outside the token graph: its own graph per batch size
        self._pixels = GraphedCall(model.vision.decode_pixels, name="pixel_decoder") if self.use_graph else model.vision.decode_pixels

    def _inductor_options(self) -> dict | None:
        """inductor_options for this generator's decode kernels (PDL or not)."""
        return inductor_options(self.pdl)

    def use_compiled_steps(self, steps: dict) -> None:
        """Run `steps` ({"llm_step": f, "semantic_step": g}, same signatures as self.llm / self.sem:
        runtime/fast/compiled_steps.py) instead of compiling at run time. Before the first request."""
        if self._buckets:
            raise RuntimeError("use_compiled_steps() after a graph was captured would leave it on the old steps")
        self._llm_step, self._sem_step = steps["llm_step"], steps["semantic_step"]
        self.compiled = "aot"

    def reset_graphs(self) -> None:
        """Drop the captured graphs (and their buffers): the next request captures again, e.g. after
        kernels.set_pdl() changed how the kernels launch."""
        self._buckets.clear()
        self._check_pdl()

    def _check_pdl(self) -> None:
        """self.pdl: whether graphs captured from now on launch the kernels with PDL."""
        from kernels import pdl_enabled

        self.pdl = self.kernels and self.device.type == "cuda" and pdl_enabled(self.device)

    # -- buffers ---------------------------------------------------------------------------------
    def _new_bucket(self, b: int, r: int, s_max: int) -> _Bucket:
        cfg, dev, dt = self.cfg, self.device, self.dtype
        llm, mt = cfg.llm, cfg.mingtok
        n = cfg.num_image_tokens
        z = lambda *shape, dtype=dt: torch.zeros(shape, dtype=dtype, device=dev)
        llm_caches = tuple(z(b * r, llm.num_kv_heads, s_max, llm.head_dim) for _ in range(2 * llm.num_layers))
        sem_caches = tuple(z(b, mt.semantic_dim // mt.head_dim, n, mt.head_dim) for _ in range(2 * mt.semantic_depth))
        one = lambda: torch.zeros(1, dtype=torch.long, device=dev)
        return _Bucket(b, r, s_max, llm_caches, sem_caches, z(b * r, 1, llm.hidden_size),
                       z(b * r, s_max, dtype=torch.long), z(b * r, 1, dtype=torch.long), one(), one(), one(),
                       z(n + 1, b, mt.latent_dim, dtype=torch.float32),
                       tuple(torch.ones(1, dtype=torch.float32, device=dev) for _ in range(3)),
                       z(n, b, mt.latent_dim, dtype=torch.float32), z(b, n, mt.semantic_dim),
                       z(b * r, 1, dtype=torch.bool))

    @torch.no_grad()
    def _step(self, k: _Bucket) -> None:
        """One image token, entirely on the device, advancing its own indices."""
        hidden = self._llm_hidden(k)  # (B*R, 1, H)
        noise = k.noise.index_select(0, k.step)[0]  # (B, C)
        latent = self.flow(hidden.view(k.b, k.r, -1), noise, *k.scalars)  # (B, C) fp32
        feats, emb = self._sem_step(latent[:, None].to(self.dtype), k.sem_pos, *k.sem_caches)  # (B, 1, D), (B, 1, H)
        k.latents.index_copy_(0, k.step, latent[None])
        k.feats.index_copy_(1, k.step, feats)
        self._advance(k, emb)

    def _check_preparation(self) -> None:
        """Refuse to run after the model was prepared again for other decode weights (another generator, or
        prepare_decode after a weight load): the kernels and weight copies this generator's graphs and compiled
        steps read were replaced. Without the kernels only an FP8 preparation matters: it swaps the decode
        linears this generator's steps call."""
        now = preparation.current(self.model)
        was = self._preparation
        if self.kernels:
            stale = now is not was
        else:
            stale = (now is not None and now.weights == "fp8") != (was is not None and was.weights == "fp8")
        if stale:
            raise RuntimeError(
                f"this generator (kernels={self.kernels}, weights={self.weights!r}) was made before the model was "
                f"prepared again for decode weights={getattr(now, 'weights', None)!r} (another GraphImageGenerator, or "
                "prepare_decode after a weight load): its graphs would read replaced kernels and weight copies. "
                "Keep one weight format per model, and make the generator again after loading weights.")

    def _llm_hidden(self, k: _Bucket) -> torch.Tensor:
        """One LLM step of every CFG row on the bucket's static caches: last hidden (B*R, 1, H)."""
        return self._llm_step(k.embeds, k.mask, k.positions, k.no_image, k.cache_pos, *k.llm_caches)

    @staticmethod
    def _advance(k: _Bucket, emb: torch.Tensor) -> None:
        """Feed the next LLM input (B, 1, H) to every CFG row and move every index one token on."""
        k.embeds.copy_(emb.repeat_interleave(k.r, dim=0))
        k.mask.index_fill_(1, k.cache_pos + 1, 1)  # the next token's own slot becomes visible
        for t in (k.cache_pos, k.sem_pos, k.step, k.positions):
            t.add_(1)

    def _capture(self, k: _Bucket) -> None:
        t0 = time.perf_counter()
        # the warm-up runs advance the bucket's state: it is reloaded before each use
        graph, _ = capture_graph(lambda: self._step(k), self.device)
        torch.cuda.synchronize(self.device)
        k.graph, k.capture_seconds = graph, time.perf_counter() - t0
        logger.info("captured the image-token graph for %s in %.2fs", (k.b, k.r, k.s_max), k.capture_seconds)

    def bucket_for(self, b: int, r: int, prompt_len: int) -> _Bucket:
        s_max = _round_up(prompt_len + self.cfg.num_image_tokens + 2, self.bucket)
        key = (b, r, s_max)
        if key not in self._buckets:
            k = self._new_bucket(b, r, s_max)
            if self.use_graph:
                self._capture(k)
            self._buckets[key] = k
        return self._buckets[key]

    def _decode(self, k: _Bucket) -> torch.Tensor:
        return self._pixels(k.feats)  # (B, 3, S, S)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, cache: LLMCache, *, on_token=None, **kwargs) -> LoopImage:
        """Same contract as runtime.loop.generate_image (cache: the prompt's concat-form LLM cache)."""
        # on_token reports enqueued work: it needs no sync
        return drive(self.steps(cache, **kwargs), on_token, self.cfg.num_image_tokens)

    @torch.no_grad()
    def steps(self, cache: LLMCache, *, uncond_mask, text_uncond_mask, noise, text_cfg, image_cfg, temperature,
              should_stop=None):
        """Generator form (as runtime.loop.generate_image_steps): yields tokens done, returns a LoopImage."""
        from ..errors import Cancelled

        self._check_preparation()
        cfg, dev = self.cfg, self.device
        b, p = cache.kv[0].shape[0], cache.kv[0].shape[2]
        n = cfg.num_image_tokens
        ones = torch.ones(b, 1, dtype=torch.long, device=dev)
        rows = generation_rows(torch.cat([cache.attention_mask.long(), ones], 1), uncond_mask, text_uncond_mask)
        r = rows.shape[1]
        k = self.bucket_for(b, r, p)
        # load this request into the static buffers (stale values past the prompt are masked, but
        # must not be NaN: zero weights times NaN values would still poison the attention output)
        for dst, src in zip(k.llm_caches, cache.kv):
            dst.zero_()
            dst[:, :, :p].copy_(src.repeat_interleave(r, dim=0))
        for t in k.sem_caches:
            t.zero_()
        k.mask.zero_()
        k.mask[:, :p + 1].copy_(rows.reshape(b * r, p + 1))
        k.positions.copy_((rows.reshape(b * r, -1).cumsum(-1) - 1)[:, -1:])
        k.cache_pos.fill_(p)
        k.sem_pos.zero_()
        k.step.zero_()
        k.noise.copy_(noise)
        for dst, v in zip(k.scalars, (text_cfg, image_cfg, temperature)):
            dst.fill_(float(v))
        start = torch.full((b * r, 1), cfg.tokens.image_start, device=dev)
        k.embeds.copy_(self.model.embed_tokens(start).to(self.dtype))
        for i in range(n):
            if should_stop is not None and should_stop():
                raise Cancelled(f"generation cancelled after {i} of {n} image tokens")
            if k.graph is not None:
                k.graph.replay()
            else:
                self._step(k)
            yield i + 1
        # the (N+1)-th LLM step only extends the cache; its flow sample would be discarded
        hidden = self._llm_hidden(k)
        features = k.feats.clone()
        image = self._decode(k)
        total = p + 1 + n
        kv = tuple(t[::r, :, :total].clone() for t in k.llm_caches)
        last = hidden[::r]
        out = LLMCache(kv, k.mask[::r, :total].clone(), last, self.model.model.logits(last))
        return LoopImage(k.latents.transpose(0, 1).clone(), features, image, out, k.mask[:, :total].view(b, r, total).clone())
