"""Shared Triton plumbing: the lazy import, the interpreter switch, launch configs.

Triton's CPU interpreter (TRITON_INTERPRET=1, read when a kernel is decorated) runs the same kernels
on CPU tensors, which is how CI checks them without a GPU. Its bf16/fp8 tensor-core dot is wrong in
triton 3.9 (it treats the 16-bit payload as a number), so in that mode the kernels upcast both dot
operands to fp32 (`UPCAST`); on a GPU they multiply in bf16 with fp32 accumulation.

Programmatic dependent launch (PDL, Hopper and newer): a decode step is hundreds of kernels of 5-40 us
each, and every launch costs a few microseconds of ramp-up (scheduling the grid, the first loads'
latency) and tail (the last wave's idle SMs): the H100 kernel times in benchmarks/results/kernels_h100.md
fit a fixed cost of roughly 4 us per launch (an inference from them, not a measurement). With PDL the
next kernel's programs are scheduled while the current one drains (the GEMMs allow it after their main
loop), can prefetch the first tiles of their own weights into L2 (constants: safe to read early; off by
default, it did not pay on the H200), then wait (`griddepcontrol.wait`) for the previous kernel's results
before reading activations or writing anything.
`pdl_enabled(device)` decides; MINGRT_PDL=0 turns it off.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

try:  # grid-dependency control (PDL); older triton has none
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    _HAS_GDC = False
else:
    _HAS_GDC = True


# How FP8 (E4M3) weights widen to fp16 before the MMA (kernels/_triton.mma):
#   "cvt":   the hardware convert (cvt.rn.f16x2.e4m3x2, one per pair), exact;
#   "bits":  by moving bits with integer ops (prmt/shift/and/or), giving w * 2**-8 exactly: E4M3's sign,
#            exponent and mantissa land in fp16's fields with fp16's larger exponent bias unaccounted;
#            the kernel multiplies its fp32 accumulator by 2**8 before the per-channel scale;
#   "mixed": one pair of every four elements each way (the convert scaled by 2**-8 with an exact fp16
#            multiply), so the conversion pipe and the integer pipe share the work.
# Scaling every product by a power of two changes no bit of an fp32 sum (no operand is near fp32's
# underflow), so all three give the same results; only their speed differs.
FP8_WIDEN_MODES = {"cvt": 0, "bits": 1, "mixed": 2}
FP8_BITS_UNSCALE = 256.0  # 2**8: E4M3's exponent bias is 7, fp16's 15
_FP8_WIDEN = {"mode": "cvt"}


def set_fp8_widen(mode: str | None) -> None:
    """Choose how FP8 weights widen in the kernels launched from now on (None: the default, "cvt").
    Graphs already captured keep the kernels they were captured with."""
    mode = "cvt" if mode is None else mode
    if mode not in FP8_WIDEN_MODES:
        raise ValueError(f"FP8 widening must be one of {sorted(FP8_WIDEN_MODES)}, got {mode!r}")
    _FP8_WIDEN["mode"] = mode


def fp8_widen(w_dtype: torch.dtype) -> int:
    """The WIDEN constexpr for a kernel whose weights are `w_dtype` (0 unless FP8 on a GPU; the
    interpreter has no inline PTX and widens through fp32)."""
    if w_dtype != torch.float8_e4m3fn or interpreting():
        return 0
    return FP8_WIDEN_MODES[_FP8_WIDEN["mode"]]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when the kernels can run: triton imports and there is a GPU or the interpreter is on."""
    if triton is None:
        return False
    if interpreting():
        return True
    import torch

    return torch.cuda.is_available()


def require() -> None:
    if triton is None:
        raise ImportError("the custom kernels need triton: install the 'kernels' extra "
                          f"(pip install -e '.[kernels]'); import failed with: {IMPORT_ERROR}")


PDL_ENV = "MINGRT_PDL"  # "0": never launch with programmatic dependent launch
PDL_PREFETCH_TILES = 0  # default K tiles of its weights each program prefetches into L2 before waiting
# when a GEMM lets the next kernel launch: "late" (after its main loop: the next one's programs start
# during our epilogue and tail) or "early" (at its start: a whole chain of kernels can be resident and
# waiting at once; it made the FP8 token step 20% slower on the H200, benchmarks/results/pdl_h200.md);
# the tiny LayerNorm / guidance kernels always trigger at their start
PDL_TRIGGERS = {"early": 1, "late": 2}
PDL_TRIGGER = "late"
_PDL_STATE: dict = {"force": None, "checked": {}, "prefetch": PDL_PREFETCH_TILES, "trigger": PDL_TRIGGER}


def gdc_available() -> bool:
    """This triton has grid-dependency control (griddepcontrol.wait / launch_dependents)."""
    return triton is not None and _HAS_GDC


def set_pdl(enabled: bool | None, prefetch_tiles: int | None = None, trigger: str | None = None) -> None:
    """Force PDL on/off for the launches that follow (benchmarks' A/B; None: the default), the weight
    tiles prefetched before the wait (None: PDL_PREFETCH_TILES; 0, 1, 2, 4, 8) and when the GEMMs let
    the next kernel launch (None: PDL_TRIGGER; "early" or "late").
    Graphs already captured keep the launches they were captured with."""
    tiles = PDL_PREFETCH_TILES if prefetch_tiles is None else int(prefetch_tiles)
    if tiles not in (0, 1, 2, 4, 8):
        raise ValueError(f"prefetch_tiles must be 0, 1, 2, 4 or 8, got {prefetch_tiles}")
    trigger = PDL_TRIGGER if trigger is None else trigger
    if trigger not in PDL_TRIGGERS:
        raise ValueError(f"trigger must be one of {sorted(PDL_TRIGGERS)}, got {trigger!r}")
    _PDL_STATE.update(force=enabled, prefetch=tiles, trigger=trigger)


def pdl_prefetch_tiles() -> int:
    return _PDL_STATE["prefetch"]


def pdl_launch(device, *, trigger_at_start: bool = False) -> dict:
    """Launch arguments of a decode kernel on `device`: its PDL constexpr (0 none, 1 let the next kernel
    launch at our start, 2 after our main loop: kernels/_triton.pdl_enter / pdl_main_loop_done) and, with
    PDL, triton's launch attribute. trigger_at_start: kernels too small for a main loop (LayerNorm, guidance)."""
    if not pdl_enabled(device):
        return {"PDL": 0}
    return {"PDL": 1 if trigger_at_start else PDL_TRIGGERS[_PDL_STATE["trigger"]], "launch_pdl": True}


def pdl_enabled(device=None) -> bool:
    """Launch the decode kernels with PDL on `device`: SM 9.0+, a triton with grid-dependency control,
    not the interpreter, not MINGRT_PDL=0, and a self-check (a chain of dependent launches inside a
    CUDA graph must count correctly) passed once per device. Call it before capturing a graph."""
    if triton is None or interpreting() or not _HAS_GDC or _PDL_STATE["force"] is False:
        return False
    if os.environ.get(PDL_ENV, "1") == "0" and _PDL_STATE["force"] is None:
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        return False
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    checked = _PDL_STATE["checked"]
    if index not in checked:
        if torch.cuda.is_current_stream_capturing():  # cannot check inside a capture: no PDL, decide later
            return False
        checked[index] = _pdl_self_check(index)
    return checked[index]


def _pdl_self_check(index: int) -> bool:
    import logging

    import torch

    log = logging.getLogger(__name__)
    if torch.cuda.get_device_capability(index) < (9, 0):
        return False
    try:
        n, chain, replays = 4096, 32, 3  # chain even: the count ends in x
        dev = torch.device("cuda", index)
        x = torch.zeros(n, dtype=torch.int32, device=dev)
        y = torch.zeros(n, dtype=torch.int32, device=dev)
        grid = (triton.cdiv(n, 128),)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))  # the zero fills above
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            for src, dst in ((x, y), (y, x)):  # compiles outside the capture
                _pdl_probe_kernel[grid](src, dst, n, BLOCK=128, launch_pdl=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for j in range(chain):
                    src, dst = (x, y) if j % 2 == 0 else (y, x)
                    _pdl_probe_kernel[grid](src, dst, n, BLOCK=128, launch_pdl=True)
            for _ in range(replays):
                graph.replay()
        stream.synchronize()
        want = 2 + chain * replays
        ok = bool((x == want).all())
        if not ok:
            log.warning("PDL self-check failed on cuda:%d (counts %s, want %d): launching without PDL", index,
                        torch.unique(x).tolist()[:8], want)
        return ok
    except Exception as exc:  # an old driver or triton without the launch attribute: no PDL, not an error
        log.warning("PDL unavailable on cuda:%d (%s: %s): launching without PDL", index, type(exc).__name__, exc)
        return False


def device_key(device) -> str:
    """The registry key of a device: "cuda" and "cuda:0" (the current one) are the same buffer."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


_BUFFERS: dict[tuple, torch.Tensor] = {}  # tickets and scratch, by (kind, owner, device[, dtype])
_RETIRED: list[torch.Tensor] = []  # outgrown buffers, kept alive for the graphs that hold them


def _registered(key: tuple, n: int, make, capturing):
    """The registry's buffer for `key`, grown to n elements with make(n) outside a CUDA graph capture; during
    one, capturing(n) answers instead (a buffer of its own, or an error)."""
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return capturing(n)
        if buf is not None:  # graphs captured earlier still use the old buffer: it must stay allocated
            _RETIRED.append(buf)
        buf = _BUFFERS[key] = make(n)
    return buf


def tickets(owner: str, device, n: int) -> torch.Tensor:
    """At least n zeroed int32 arrival tickets for `owner`'s kernels (the last program to arrive merges the
    others' partials in a fixed order, then re-arms its ticket), one buffer per (owner, device). Made before
    any CUDA graph capture; launches on one stream are ordered, so every layer shares it, but two streams
    must not run `owner`'s kernels on one device at once."""
    def refuse(_):
        raise RuntimeError(f"{owner}'s tickets must be reserved before a CUDA graph capture "
                           "(runtime.fast.decode_weights.prepare_decode does it)")
    return _registered(("tickets", owner, device_key(device)), n,
                       lambda size: torch.zeros(size, dtype=torch.int32, device=device), refuse)


def scratch(owner: str, device, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n elements of uninitialised scratch for `owner`'s kernels (partials between two launches or between
    a kernel's programs), from one buffer per (owner, device, dtype) that grows as needed, so eager calls
    allocate nothing. Every call on one stream shares it (as tickets()). A CUDA graph capture that
    needs more than was reserved gets its own allocation from the graph's pool instead of growing it."""
    make = lambda size: torch.empty(size, dtype=dtype, device=device)  # noqa: E731
    return _registered(("scratch", owner, device_key(device), dtype), n, make, make)[:n]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:
    F16_MAX = tl.constexpr(torch.finfo(torch.float16).max)  # a jit function reads only constexpr globals
    E4M3_UNSCALE = tl.constexpr(FP8_BITS_UNSCALE)

    # E4M3 bytes b0..b3 of one 32-bit register -> fp16 pairs (b0, b1), (b2, b3) holding w * 2**-8, three
    # integer instructions a pair: prmt makes each 16-bit half [sign byte | byte] (selector nibbles 8-B
    # replicate a byte's sign); shifted left by 7, the sign byte's low bit lands on bit 15 and the byte's
    # exponent and mantissa in fp16's fields (denormals included); the mask clears the byte's own sign bit
    # (now bit 14) and, in the high half, the low half's sign bits shifted into bits 6..0
    # (benchmarks/fp8_widen.py checks the 254 non-NaN bytes against torch)
    _E4M3_PAIR_BITS = "prmt.b32 {a}, $2, 0, {sel}; shl.b32 {a}, {a}, 7; and.b32 {out}, {a}, 0xBF80BF80;"
    _E4M3_BITS_ASM = tl.constexpr("{ .reg .b32 a, b; " + _E4M3_PAIR_BITS.format(a="a", sel="0x9180", out="$0")
                                  + " " + _E4M3_PAIR_BITS.format(a="b", sel="0xB3A2", out="$1") + " }")
    # the low pair through the hardware convert, scaled by 2**-8 (0x1C00 in fp16: exact, no E4M3 value
    # lands below fp16's smallest denormal), the high pair by moving bits
    _E4M3_MIXED_ASM = tl.constexpr("{ .reg .b16 lo, hi; .reg .b32 h, c, b; mov.b32 {lo, hi}, $2; "
                                   "cvt.rn.f16x2.e4m3x2 h, lo; mov.b32 c, 0x1C001C00; mul.rn.f16x2 $0, h, c; "
                                   + _E4M3_PAIR_BITS.format(a="b", sel="0xB3A2", out="$1") + " }")

    @triton.jit
    def widen_e4m3(w, WIDEN: tl.constexpr):
        """E4M3 tile -> fp16 tile: w exactly (WIDEN 0) or w * 2**-8 exactly (1: bits, 2: mixed)."""
        if WIDEN == 0:
            out = w.to(tl.float16)
        elif WIDEN == 1:
            out = tl.inline_asm_elementwise(_E4M3_BITS_ASM, "=r,=r,r", [w.to(tl.int8, bitcast=True)],
                                            dtype=tl.float16, is_pure=True, pack=4)
        else:
            out = tl.inline_asm_elementwise(_E4M3_MIXED_ASM, "=r,=r,r", [w.to(tl.int8, bitcast=True)],
                                            dtype=tl.float16, is_pure=True, pack=4)
        return out

    @triton.jit
    def unwiden(acc, WIDEN: tl.constexpr):
        """A sum of products with weights from widen_e4m3: WIDEN > 0 widened them to w * 2**-8, exact to undo here
        (before the per-channel scale)."""
        if WIDEN > 0:
            acc = acc * E4M3_UNSCALE
        return acc

    @triton.jit
    def mma(w, x, UPCAST: tl.constexpr, WIDEN: tl.constexpr = 0):
        """w (BN, BK) @ x (BK, BM) with fp32 accumulation, operands chosen by the weight's dtype:
        FP8 (E4M3) weights widen to fp16 (one cvt per pair on SM 8.9+, exact: E4M3 fits in fp16),
        where widening to bf16 costs several instructions per element and made FP8 GEMMs no faster than
        bf16 ones; the rows are then rounded to fp16 too, clamped to its range. bf16/fp16 weights
        multiply bf16/fp16 rows. UPCAST (interpreter): fp32 IEEE products."""
        if UPCAST:
            out = tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        elif w.dtype == tl.float8e4nv:
            if x.dtype == tl.float16:
                xh = x
            else:
                xh = tl.minimum(tl.maximum(x.to(tl.float32), -F16_MAX), F16_MAX).to(tl.float16)
            out = tl.dot(widen_e4m3(w, WIDEN), xh)
        elif w.dtype == tl.float16:
            out = tl.dot(w, x.to(tl.float16))
        elif w.dtype == tl.float32:  # fp32 models (tests): exact products, slow and unused at speed
            out = tl.dot(w, x.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(w.to(tl.bfloat16), x.to(tl.bfloat16))
        return out

    @triton.jit
    def arrive(ticket_ptr, mask):
        """"The last to arrive merges", step 1, after this program stored its partials: take the ticket(s)
        at ticket_ptr (one pointer and mask None, or a vector and its mask) and return each count before us,
        so the last of N arrivals gets N - 1. The barrier puts every thread's stores before the ticket,
        which is taken acquire-release at GPU scope: the last arrival then sees every other program's
        partials (it reads them with .cg, past L1)."""
        tl.debug_barrier()
        return tl.atomic_add(ticket_ptr, 1, mask=mask, sem="acq_rel", scope="gpu")

    @triton.jit
    def rearm(ticket_ptr, last):
        """Step 2, after the merge: the last arrival zeroes its ticket(s) for the next launch."""
        tl.atomic_xchg(ticket_ptr, 0, mask=last, sem="relaxed", scope="gpu")

    @triton.jit
    def store_cast(ptr, value, mask):
        """Store fp32 `value`, clamped to fp16's range when the destination is fp16."""
        if ptr.dtype.element_ty == tl.float16:
            value = tl.minimum(tl.maximum(value, -F16_MAX), F16_MAX)
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)

    if _HAS_GDC:

        @triton.jit
        def pdl_launch_next():
            """Let the next kernel's programs be scheduled once all of ours have started."""
            gdc_launch_dependents()

        @triton.jit
        def pdl_wait():
            """Block until the previous kernel has finished and its writes are visible."""
            gdc_wait()
    else:

        @triton.jit
        def pdl_launch_next():
            pass

        @triton.jit
        def pdl_wait():
            pass

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """First thing in a decode kernel (after prefetching constants): PDL == 1 lets the next kernel
        launch now; any PDL waits for the previous kernel before we read an activation or write."""
        if PDL == 1:
            pdl_launch_next()
        if PDL > 0:
            pdl_wait()

    @triton.jit
    def pdl_main_loop_done(PDL: tl.constexpr):
        """After a GEMM's main loop (our weights are read): PDL == 2 lets the next kernel launch."""
        if PDL == 2:
            pdl_launch_next()

    @triton.jit
    def prefetch_l2(ptrs, mask):
        """Hint each address's 32-byte sector into L2 (nothing is loaded into registers, nothing waits)."""
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                                  "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _pdl_probe_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        """dst[i] = src[(i + BLOCK) % n] + 1: each program reads the block another program of the previous
        launch wrote, so the counts come out right only if every launch waited for the one before."""
        pdl_launch_next()
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = r < n
        prefetch_l2(src_ptr + r, ok)
        pdl_wait()
        tl.store(dst_ptr + r, tl.load(src_ptr + (r + BLOCK) % n, mask=ok, other=0) + 1, mask=ok)
