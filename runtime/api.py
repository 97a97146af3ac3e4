"""The runtime's public API: `load()`, `Runtime` (stateless calls) and `Session` (multi-round).

Thread safety: a Runtime may be shared by threads; every call builds its own state and the backends'
run() is safe to call concurrently (onnxruntime sessions are; TensorRT gets one context per thread).
A Session is one conversation: use it from one thread at a time.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from kernels import available as kernels_available
from kernels.fp8 import WEIGHT_FORMATS, gpu_supports_fp8
from models.flow_head import draw_noise
from models.image_io import ImageInputError, edit_tensor, to_pil, understanding_tensor
from models.prompting import cfg_masks

from . import loop
from .engines import check_device, choose_backend, fast_path_layout, open_backend, read_manifest
from .errors import EngineError, PrecisionUnsupportedError, PromptError, SessionFullError
from .tokenizer import TINY_ASSET, ChatTokenizer

logger = logging.getLogger(__name__)


class CancelToken:
    """Pass to a call, call cancel() from anywhere; the call raises Cancelled before its next step."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Progress:
    done: int
    total: int


@dataclass
class ImageOutput:
    images: list[Image.Image]
    latents: torch.Tensor | None = None  # (B, N, C) normalised
    features: torch.Tensor | None = None  # (B, N, D) semantic features
    pixels: torch.Tensor | None = None  # (B, 3, S, S) in [-1, 1]
    text: list[str] = field(default_factory=list)  # what the model said after the image (sessions only)

    @property
    def image(self) -> Image.Image:
        return self.images[0]


COMPILED_MODES = ("auto", "aot", "jit", "off")


def load(engine_dir: str | Path, backend: str = "auto", device: str | torch.device | None = None, *,
         tokenizer: str | Path | None = None, verify_hashes: bool = False, threads: int | None = None,
         decode_weights: str | None = None, compiled: str = "auto") -> Runtime:
    """Open an artifact folder made by `python -m export.build`.

    backend: "auto" (TensorRT on a GPU when its plans exist; else the torch fast path when the folder
    has compiled steps for this machine or onnxruntime has no CUDA provider on a GPU; else onnxruntime),
    "onnxruntime", "tensorrt" or "torch" (the reference pieces: on a GPU, the compiled path with one CUDA
    graph and the Triton kernels per image token). decode_weights: "bf16" or "fp8" (E4M3, per-channel
    scales) weight streaming in that path, SM 8.9+ only for fp8; default: as the folder's compiled steps,
    else fp8 for fp8 engines (when triton is there), else bf16. compiled: how the torch
    fast path gets its LLM and semantic-decoder steps: "auto" (the folder's AOTInductor packages when
    they match this machine, else torch.compile at the first request), "aot" (the packages or an
    EngineError), "jit" (torch.compile), "off" (eager, for debugging).
    The manifest is checked before any engine loads.
    """
    if decode_weights is not None and decode_weights not in WEIGHT_FORMATS:
        raise ValueError(f"decode_weights must be one of {WEIGHT_FORMATS}, got {decode_weights!r}")
    if compiled not in COMPILED_MODES:
        raise ValueError(f"compiled must be one of {COMPILED_MODES}, got {compiled!r}")
    folder = Path(engine_dir)
    man = read_manifest(folder)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but PyTorch sees no CUDA GPU")
    name = choose_backend(backend, dev, man)
    check_device(man, dev, name)
    cfg, be = open_backend(folder, man, name, dev, verify_hashes, threads)
    tok_path = Path(tokenizer) if tokenizer else folder / "tokenizer.json"
    if not tok_path.exists() and cfg.name == "tiny":
        tok_path = TINY_ASSET
    if not tok_path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}; pass tokenizer=<checkpoint>/tokenizer.json")
    return Runtime(be, cfg, ChatTokenizer.from_file(tok_path, cfg), man, decode_weights=decode_weights,
                   compiled=compiled, folder=folder, verify_hashes=verify_hashes)


class Runtime:
    def __init__(self, backend, cfg, tokenizer: ChatTokenizer, manifest: dict | None = None, *,
                 decode_weights: str | None = None, compiled: str = "auto", folder: Path | None = None,
                 verify_hashes: bool = False):
        self.backend, self.cfg, self.tokenizer, self.manifest = backend, cfg, tokenizer, manifest or {}
        self.max_sequence = self.manifest.get("limits", {}).get("max_sequence", 4096)
        self.max_prompts = self.manifest.get("limits", {}).get("max_prompts", 8)
        self._fast = None
        is_torch = getattr(backend, "name", "") == "torch"
        on_gpu = is_torch and backend.device.type == "cuda"
        packages = self.manifest.get("compiled") if is_torch and compiled in ("auto", "aot") else None
        if decode_weights is not None:
            weights = decode_weights
        elif packages is not None:
            weights = packages["weights"]
        elif on_gpu and kernels_available():  # as the engines' precision: fp8 engines stream FP8
            weights = fast_path_layout(self.manifest.get("precision", "fp32"), "cuda")[1]
        else:
            weights = "bf16"
        fast_path = on_gpu or (is_torch and packages is not None)
        if weights != "bf16":
            if not on_gpu:
                raise ValueError(f"decode_weights={weights!r} needs the torch backend on a CUDA GPU "
                                 f"(got backend {getattr(backend, 'name', '?')!r} on {backend.device})")
            ok, why = gpu_supports_fp8(backend.device)
            if not ok:
                raise PrecisionUnsupportedError(f"decode_weights='fp8': {why}")
            if not kernels_available():
                raise ImportError("decode_weights='fp8' needs triton: install the 'kernels' extra")
        if compiled == "aot" and not (packages and fast_path):
            raise EngineError(f"compiled='aot', but {folder} has no compiled steps for the torch fast path; "
                              "build them with python -m export.build --targets aoti")
        if fast_path:
            from .fast.graph import GraphImageGenerator  # the compiled path: one CUDA graph per image token

            self._fast = GraphImageGenerator(backend.model, weights=weights,
                                             compile=False if compiled == "off" else None)
            if packages is not None:
                self._attach_packages(packages, folder, compiled, verify_hashes)
            elif backend.device.type != "cuda":
                self._fast = None  # on a CPU without packages the plain loop is the same thing, simpler
        if on_gpu:  # the encoders and the pixel decoder replay from CUDA graphs too (as the token step does)
            from .fast.graphed import GraphedBackend

            self.backend = GraphedBackend(backend)
        self._fast_lock = threading.Lock()  # one generator's static buffers serve one request at a time

    def _attach_packages(self, packages: dict, folder: Path | None, compiled: str, verify_hashes: bool) -> None:
        from .fast.compiled_steps import check_package_files, load_compiled_steps, mismatch, probe_packages

        gen = self._fast
        why = mismatch(packages, gen.device, gen.dtype, gen.weights, gen.kernels)
        if why is None:  # packages meant for this run: a damaged file is an error, before a probe could excuse it
            check_package_files(folder, packages, verify_hashes=verify_hashes)
            why = probe_packages(folder, packages, gen.device)
        if why is None:
            gen.use_compiled_steps(load_compiled_steps(folder, packages, gen))  # (hashes checked just above)
        elif compiled == "aot":
            raise EngineError(f"{folder}: the compiled steps cannot run here: {why}; rebuild them on this machine "
                              "with python -m export.build --targets aoti")
        elif gen.device.type != "cuda":
            self._fast = None
            logger.warning("%s: compiled steps not used (%s); running the plain loop", folder, why)
        else:
            logger.warning("%s: compiled steps not used (%s); compiling at the first request instead", folder, why)

    def _image_steps(self, cache, **kwargs):
        if self._fast is None:
            return loop.generate_image_steps(self.backend, self.cfg, cache, **kwargs)
        return self._locked_fast_steps(cache, **kwargs)

    def _locked_fast_steps(self, cache, **kwargs):
        with self._fast_lock:
            return (yield from self._fast.steps(cache, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.backend.device

    # -- prompts -----------------------------------------------------------------------------------
    def _check_prompt(self, prompt: str, extra_tokens: int = 0) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty")
        ids = self.tokenizer.turn(prompt)
        budget = self.max_sequence - self.cfg.num_image_tokens - 2 - extra_tokens
        if len(ids) > budget:
            raise PromptError(f"the prompt is {len(ids)} tokens; at most {budget} fit in the engines' "
                              f"{self.max_sequence}-token context next to the image")
        return ids

    def _batch(self, prompts: list[str]):
        """Left-padded ids (B, P), key mask, uncond and text-uncond masks for a batch of prompts."""
        if not prompts:
            raise PromptError("no prompts given")
        if len(prompts) > self.max_prompts:
            raise PromptError(f"{len(prompts)} prompts in one call; the engines take at most {self.max_prompts} "
                              "(rebuild with --max-prompts)")
        seqs = [self._check_prompt(p) for p in prompts]
        width = max(map(len, seqs))
        ids, mask, unc, tunc = [], [], [], []
        for s in seqs:
            u, t = cfg_masks(s, self.tokenizer.user_prefix, self.tokenizer.assistant_prefix, self.tokenizer.image_ids())
            pad = width - len(s)
            ids.append([self.cfg.tokens.pad] * pad + s)
            mask.append([0] * pad + [1] * len(s))
            unc.append([0] * pad + u)
            tunc.append([0] * pad + t)
        dev = self.device
        return (torch.tensor(ids, device=dev), torch.tensor(mask, device=dev), torch.tensor(unc, device=dev),
                torch.tensor(tunc, device=dev))

    def _noise(self, batch: int, seed, noise):
        if noise is not None:
            want = (self.cfg.num_image_tokens + 1, batch, self.cfg.mingtok.latent_dim)
            if tuple(noise.shape) != want:
                raise ValueError(f"noise must have shape {want}, got {tuple(noise.shape)}")
            return noise.to(self.device, torch.float32)
        # One seed per prompt (an int seed s gives prompt i the seed s + i). Drawn on the CPU, so a seed
        # gives the same noise on every device and backend.
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(batch)]
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} prompts")
        parts = [draw_noise(torch.Generator().manual_seed(int(s)), 1, self.cfg.num_image_tokens,
                            self.cfg.mingtok.latent_dim) for s in seeds]
        return torch.cat(parts, dim=1).to(self.device)

    # -- text-to-image -----------------------------------------------------------------------------
    def iter_generate_image(self, prompt: str | list[str], *, seed: int | list[int] = 0, noise: torch.Tensor | None = None,
                            cfg_text: float | None = None, cfg_image: float | None = None, temperature: float = 1.0,
                            cancel: CancelToken | None = None) -> Iterator[Progress | ImageOutput]:
        """Yields Progress after every image token, then the ImageOutput."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids, mask, unc, tunc = self._batch(prompts)
        noise = self._noise(len(prompts), seed, noise)
        cache = loop.prefill(self.backend, self.cfg, self.backend.embed(ids), mask)
        steps = self._image_steps(
            cache, uncond_mask=unc, text_uncond_mask=tunc, noise=noise,
            text_cfg=self.cfg.text_cfg if cfg_text is None else cfg_text,
            image_cfg=self.cfg.image_cfg if cfg_image is None else cfg_image, temperature=temperature,
            should_stop=None if cancel is None else (lambda: cancel.cancelled))
        total = self.cfg.num_image_tokens
        while True:
            try:
                done = next(steps)
            except StopIteration as stop:
                result = stop.value
                break
            yield Progress(done, total)
        yield ImageOutput([to_pil(x) for x in result.image], result.latents, result.features, result.image)

    def generate_image(self, prompt: str | list[str], *, on_token: Callable[[int, int], None] | None = None,
                       **kwargs) -> ImageOutput:
        """Text-to-image with classifier-free guidance; one image per prompt (a list is one batch)."""
        out = None
        for item in self.iter_generate_image(prompt, **kwargs):
            if isinstance(item, Progress):
                if on_token is not None:
                    on_token(item.done, item.total)
            else:
                out = item
        return out

    # -- understanding -----------------------------------------------------------------------------
    def _image_embeds(self, image, understanding: bool) -> torch.Tensor:
        piece = "encoder_understanding" if understanding else "encoder"
        size = self.cfg.understanding_image_size if understanding else self.cfg.mingtok.image_size
        if isinstance(image, torch.Tensor):
            if image.dim() != 4 or image.shape[1] != 3 or image.shape[-1] != size or image.shape[-2] != size:
                raise ImageInputError(f"an image tensor must be (1, 3, {size}, {size}) in [-1, 1], got {tuple(image.shape)}")
            x = image
        else:
            x = understanding_tensor(image, size) if understanding else edit_tensor(image, size)
        out = self.backend.run(piece, x.to(self.device, self.backend.dtype))
        return out[2]  # (1, N, H) LLM embeddings of the patches

    def describe(self, image, question: str, *, max_new_tokens: int = 128, stop_ids=None,
                 cancel: CancelToken | None = None) -> str:
        """Image understanding: greedy answer to `question` about `image` (path, file, PIL image or tensor)."""
        if not isinstance(question, str) or not question.strip():
            raise PromptError("the question is empty")
        embeds = self._image_embeds(image, understanding=True)
        n = embeds.shape[1]
        ids = self.tokenizer.turn(question, image_tokens=n)
        if len(ids) + max_new_tokens > self.max_sequence:
            raise PromptError(f"image + question ({len(ids)} tokens) + {max_new_tokens} new tokens exceed the "
                              f"{self.max_sequence}-token context")
        ids_t = torch.tensor([ids], device=self.device)
        slots = ids_t == self.cfg.tokens.image_patch
        x = self.backend.embed(ids_t).masked_scatter(slots[..., None], embeds.to(self.backend.dtype))
        cache = loop.prefill(self.backend, self.cfg, x, image_mask=slots)
        stop = (self.cfg.tokens.eos,) if stop_ids is None else tuple(stop_ids)
        tokens, _ = loop.greedy_decode(self.backend, self.cfg, cache, max_new_tokens, stop,
                                       should_stop=None if cancel is None else (lambda: cancel.cancelled))
        return self.tokenizer.decode([t for t in tokens if t not in stop])

    def session(self, max_tokens: int | None = None) -> Session:
        return Session(self, max_tokens or self.max_sequence)


class Session:
    """A conversation whose LLM cache carries over: generate an image, then edit it by instruction.

    Earlier images stay in the cache as the semantic features they were generated from, so an edit
    reuses them directly: no pixel decode and re-encode between rounds. Later rounds see earlier
    prompts in every CFG row and earlier generated content in the cond and text-uncond rows only
    (upstream's default 'DROP' rule). Memory is bounded by `max_tokens` (the cache length).
    """

    def __init__(self, runtime: Runtime, max_tokens: int):
        if max_tokens > runtime.max_sequence:
            raise ValueError(f"max_tokens {max_tokens} exceeds the engines' {runtime.max_sequence}")
        self.rt, self.max_tokens = runtime, max_tokens
        self.cache: loop.LLMCache | None = None
        self.past_uncond: torch.Tensor | None = None
        self.past_text_uncond: torch.Tensor | None = None
        self.images: list[ImageOutput] = []

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def reset(self) -> None:
        self.cache, self.past_uncond, self.past_text_uncond, self.images = None, None, None, []

    def _turn(self, ids: list[int], embeds: torch.Tensor | None = None, image_mask=None):
        rt, dev = self.rt, self.rt.device
        need = len(ids) + rt.cfg.num_image_tokens + 1
        if self.length + need > self.max_tokens:
            raise SessionFullError(f"this turn needs {need} more tokens; the session holds {self.length} of "
                                   f"{self.max_tokens}. Start a new session (or reset()).")
        u, t = cfg_masks(ids, rt.tokenizer.user_prefix, rt.tokenizer.assistant_prefix, rt.tokenizer.image_ids())
        u, t = torch.tensor([u], device=dev), torch.tensor([t], device=dev)
        if self.cache is not None:
            u, t = torch.cat([self.past_uncond, u], 1), torch.cat([self.past_text_uncond, t], 1)
        ids_t = torch.tensor([ids], device=dev)
        x = rt.backend.embed(ids_t)
        if embeds is not None:
            x = x.masked_scatter(image_mask[..., None], embeds.to(x.dtype))
        cache = loop.prefill(rt.backend, rt.cfg, x, image_mask=image_mask, cache=self.cache)
        return cache, u, t

    def generate_image(self, prompt: str, *, image=None, seed: int = 0, cfg_text: float | None = None,
                       cfg_image: float | None = None, temperature: float = 1.0, on_token=None,
                       cancel: CancelToken | None = None, reply_tokens: int = 8) -> ImageOutput:
        """One round: the prompt (plus an optional input image to edit) -> a new image.

        After the image the model may say a few words (up to `reply_tokens`, greedy), as upstream lets it.
        A cancelled or failed round leaves the session as it was before the round.
        """
        rt = self.rt
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty")
        embeds = image_mask = None
        if image is not None:
            embeds = rt._image_embeds(image, understanding=False)
            ids = rt.tokenizer.turn(prompt, image_tokens=embeds.shape[1])
            image_mask = torch.tensor([ids], device=rt.device) == rt.cfg.tokens.image_patch
        else:
            ids = rt.tokenizer.turn(prompt)
        cache, u, t = self._turn(ids, embeds, image_mask)
        steps = rt._image_steps(
            cache, uncond_mask=u, text_uncond_mask=t, noise=rt._noise(1, seed, None),
            text_cfg=rt.cfg.text_cfg if cfg_text is None else cfg_text,
            image_cfg=rt.cfg.image_cfg if cfg_image is None else cfg_image, temperature=temperature,
            should_stop=None if cancel is None else (lambda: cancel.cancelled))
        res = loop.drive(steps, on_token, rt.cfg.num_image_tokens)
        after, reply = res.cache, []
        if reply_tokens:  # as with Hugging Face generate, the last token produced is not fed back
            budget = min(reply_tokens, self.max_tokens - after.length)
            reply, after = loop.greedy_decode(rt.backend, rt.cfg, after, budget, (rt.cfg.tokens.eos,))
        # DROP rule: everything generated this round is hidden from the uncond row only.
        gen = after.length - u.shape[1]
        ones = torch.ones(1, gen, dtype=u.dtype, device=u.device)
        self.past_uncond = torch.cat([torch.ones_like(u), torch.zeros_like(ones)], 1)
        self.past_text_uncond = torch.cat([torch.ones_like(t), ones], 1)
        self.cache = after
        out = ImageOutput([to_pil(res.image[0])], res.latents, res.features, res.image,
                          [rt.tokenizer.decode([x for x in reply if x != rt.cfg.tokens.eos])])
        self.images.append(out)
        return out

    def edit(self, instruction: str, **kwargs) -> ImageOutput:
        """Edit the last image: its tokens are already in the cache, so only the instruction is added."""
        if not self.images:
            raise PromptError("nothing to edit yet: generate_image() first, or pass image= to generate_image()")
        return self.generate_image(instruction, **kwargs)
