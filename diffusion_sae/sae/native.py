"""Optional compiled CPU kernels for SAE training (`csrc/*.c`), loaded through ctypes.

Why: on a CPU, torch's row-wise `topk`, `embedding_bag` and the sparse weight gradients run as
separate memory-bound passes, and together they cost more than the encoder's matrix product; at
L = 12288 the dense product itself is two thirds of a step even in bf16.
- `topk_sae_cpu.c`: the selection over a dense product (a bound from chunk maxima and a filtered
  quickselect), and the decoder, losses and every gradient in two passes (one per token, one per latent);
- `screen_int8_cpu.c` (CPUs with AVX512-VNNI): the int8-screened selection, `screened_topk`: an
  int8 product picks 2k candidates per token without writing the [N, L] product (VNNI does twice the
  multiply-adds per instruction of AVX512-BF16), the exact pre-activations of the candidates pick
  the top k.
They have no torch headers, so the system C compiler builds them in about a second on first use; the
library is cached under `$XDG_CACHE_HOME/diffusion_sae/` (keyed by the sources, the compiler and this
CPU's flags, since it is built with -march=native).

Nothing depends on it: without a C compiler, where the build fails, or with `DIFFUSION_SAE_NATIVE=0`,
`available()` is False (GPU tensors never use it) and callers use the pure-torch path (same maths;
tests compare the two). Without VNNI, `screen_supported()` is False and training uses the dense product.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .kernels import workspace_buffer

_CSRC = Path(__file__).with_name("csrc")
_SRCS = (_CSRC / "topk_sae_cpu.c", _CSRC / "screen_int8_cpu.c")
_lock = threading.Lock()
_lib = None
_tried = False
_error: str | None = None


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffusion_sae" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) on PATH")
    src = b"".join(p.read_bytes() for p in _SRCS)
    # DIFFUSION_SAE_NATIVE_MARCH (default native) builds for another target, e.g. x86-64-v3 (AVX2, no
    # AVX-512): the tests run the kernels' portable branches on a machine that has AVX-512
    march = os.environ.get("DIFFUSION_SAE_NATIVE_MARCH", "native")
    flags = ["-O3", f"-march={march}", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
    if platform.system() == "Darwin":  # Apple clang has no -fopenmp without libomp: build single-threaded
        flags.remove("-fopenmp")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(src + " ".join(flags).encode() + version.encode() + _cpu_key().encode()).hexdigest()[:16]
    out = _cache_dir() / f"topk_sae_cpu-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            proc = subprocess.run([cc, *flags, *map(str, _SRCS), "-o", str(tmp_out), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            os.replace(tmp_out, out)  # atomic: a concurrent process sees the old state or the whole file
    lib = ctypes.CDLL(str(out))
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    for name in ("topk_rows_f32", "topk_rows_bf16"):
        getattr(lib, name).argtypes = [p, i64, i64, i64, i64, p, p, p, p, i32]
        getattr(lib, name).restype = i64  # rows that held a NaN
    lib.sae_decode_fwd.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, i32]
    lib.sae_decode_fwd.restype = None
    lib.sae_sparse_bwd.argtypes = [p, p, p, i32, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, f32, f32, p, p, p, i32]
    lib.sae_sparse_bwd.restype = None
    lib.screen_int8_supported.argtypes = []
    lib.screen_int8_supported.restype = i32
    lib.screen_quantize_x.argtypes = [p, p, i64, i64, p, p, p, i32]
    lib.screen_pack_w.argtypes = [p, p, p, i64, i64, p, p, p, p, p, p, i32]
    lib.screen_candidates.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, p, p, i32]
    lib.screen_rescore.argtypes = [p, p, i32, p, p, i64, i64, i64, i64, p, p, p, f32, f32, f32, p, p, p, i32]
    for name in ("screen_quantize_x", "screen_pack_w", "screen_candidates"):
        getattr(lib, name).restype = None
    lib.screen_rescore.restype = i64
    return lib


def load():
    """The compiled library, building it on first use; None (with one warning) if that fails or is disabled."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("DIFFUSION_SAE_NATIVE", "1").lower() in ("0", "false", "no", "off"):
            _error = "disabled by DIFFUSION_SAE_NATIVE=0"
        else:
            try:
                _lib = _build()
            except Exception as e:  # no compiler, read-only cache, exotic platform: fall back to torch
                _error = f"{type(e).__name__}: {e}"
                warnings.warn(f"diffusion_sae: compiled SAE kernels unavailable ({_error}); using the torch "
                              "implementation (slower on CPU). Set DIFFUSION_SAE_NATIVE=0 to silence this.",
                              stacklevel=3)
        _tried = True
    return _lib


_enabled = True


def set_enabled(flag: bool) -> bool:
    """Switch the compiled path on or off at run time (benchmarks and tests compare both); returns the old setting."""
    global _enabled
    old, _enabled = _enabled, bool(flag)
    return old


@contextlib.contextmanager
def disabled():
    """`with native.disabled():` runs the block on the pure-torch path."""
    old = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(old)


def available() -> bool:
    return _enabled and load() is not None


def why_unavailable() -> str | None:
    load()
    return _error


def usable(*tensors: Tensor) -> bool:
    """True when the kernels are built and every tensor is a contiguous CPU tensor they accept."""
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    return available()


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def topk_rows(pre: Tensor, k: int, col_mask: Tensor | None = None, bias: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """Per-row top-k of ReLU(pre + bias) for an [N, L] fp32 or bf16 CPU tensor (rows contiguous).

    Returns (vals f32 [N,k], cols int64 [N,k]). bias [L] (optional) is added in fp32 as each value is
    read. col_mask [L] bool (optional): only these columns may be selected (AuxK's dead latents); it
    must admit at least k columns. Order within a row is unspecified; ties are broken arbitrarily.
    """
    lib = load()
    if pre.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"topk_rows takes fp32 or bf16, got {pre.dtype}")
    if pre.ndim != 2 or pre.stride(1) != 1:
        raise ValueError("topk_rows needs a 2-d tensor with contiguous rows")
    n, L = pre.shape
    if not 0 < k <= L:
        raise ValueError(f"k={k} must lie in [1, {L}]")
    mask = None
    if col_mask is not None:
        mask = col_mask.to(torch.uint8).contiguous()
        if int(mask.sum()) < k:
            raise ValueError(f"col_mask admits {int(mask.sum())} columns, fewer than k={k}")
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
    vals = torch.empty(n, k, dtype=torch.float32)
    cols = torch.empty(n, k, dtype=torch.int64)
    fn = lib.topk_rows_bf16 if pre.dtype == torch.bfloat16 else lib.topk_rows_f32
    bad = fn(_ptr(pre), n, L, pre.stride(0), k, _ptr(mask), _ptr(bias), _ptr(vals), _ptr(cols), torch.get_num_threads())
    if bad:
        # The kernel selected as if NaN were -inf (every index in range), but the result would be
        # meaningless: refuse it, as the torch path's NaN would poison the loss.
        from .model import SAEError  # (model imports this module)

        raise SAEError(f"{bad} of {n} rows of SAE pre-activations are NaN: the activations or the SAE "
                             "weights are not finite (or so large that float32 products overflow); check the "
                             "input data for NaN / inf / values beyond 1e18")
    return vals, cols


def screen_supported() -> bool:
    """True when the compiled kernels are available and were built with AVX512-VNNI (int8 screening)."""
    return available() and bool(load().screen_int8_supported())


SCREEN_Z = 8.0  # certificate margin, in standard deviations of the int8 rounding error
# d * L below which the screen's fixed costs outweigh its gain: at d = 64, L = 1024 the dense bf16
# path ran 677k tok/s against the screen's 533k; from d * L = 2^18 (d = 128, L = 2048; d = 256,
# L = 1024) on the screen was as fast or faster (batch 4096, this 2-core CPU).
SCREEN_MIN_SIZE = 1 << 18
OUTLIER_RATIO = 4.0  # a dimension whose max |x| is this many times the median dimension's is smoothed


def _smoothing(xs: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Per-dimension factors that move outlier dimensions' range from x into W before quantising.

    Why: one per-token scale serves all d dimensions, so a few dimensions much larger than the rest
    (text encoders have them) would leave the others a handful of int8 levels. x_d / s_d and
    w_d * s_d keep every product x_d w_d (SmoothQuant's migration) with s_d = sqrt(max|x_d| / median),
    applied to the dimensions beyond OUTLIER_RATIO times the median only. None, None when there are none."""
    amax = xs.abs().amax(0)
    med = amax.median().clamp_min(torch.finfo(torch.float32).tiny)
    ratio = amax / med
    if not bool((ratio > OUTLIER_RATIO).any()):
        return None, None
    s = torch.where(ratio > OUTLIER_RATIO, ratio.sqrt(), torch.ones_like(ratio)).contiguous()
    return (1.0 / s).contiguous(), s


def screened_topk(xs: Tensor, W: Tensor, bias: Tensor, k: int, m: int, exact_dtype: torch.dtype = torch.float32,
                  xs_exact: Tensor | None = None, workspace: dict | None = None, z: float = SCREEN_Z
                  ) -> tuple[Tensor, Tensor]:
    """Per-token top-k of ReLU(xs W^T + bias), screened by an int8 product (csrc/screen_int8_cpu.c).

    xs [N, d], W [L, d], bias [L]: fp32, contiguous. The int8 product (per-token and per-latent
    scales) picks every token's m candidates without writing the [N, L] product; the exact
    pre-activations of those candidates in `exact_dtype` (fp32, or bf16 operands with fp32 sums as
    under bf16 autocast; xs_exact is xs in that dtype if the caller has it) choose the top k and give
    the values.

    Every token's selection is then checked: a latent left out of the candidates scored at most the
    m-th candidate's int8 value, so it could only belong in the top k if its int8 rounding error
    exceeded the gap to the k-th exact value. Tokens where that gap is under z standard deviations
    of the rounding error (bounded per token from the scales and norms) are recomputed on the dense
    product, so the selection equals the exact one unless an error beyond z sigma occurred. How many
    were recomputed is added to workspace["screen_dense_tokens"] (and the total to
    workspace["screen_tokens"]). Returns (vals f32 [N, k], cols int64 [N, k]); needs k <= m <= L.
    """
    lib = load()
    n, d = xs.shape
    L = W.shape[0]
    if not 0 < k <= m <= L:
        raise ValueError(f"screened_topk needs 0 < k <= m <= L, got k={k}, m={m}, L={L}")
    if exact_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"exact_dtype must be fp32 or bf16, got {exact_dtype}")
    bf16 = exact_dtype == torch.bfloat16
    d4, Lp, nblk = (d + 3) // 4 * 4, (L + 31) // 32 * 32, (n + 11) // 12
    buf = lambda key, shape, dt: workspace_buffer(workspace, "screen_" + key, shape, dt)  # noqa: E731
    xq, sx, xn2 = buf("xq", (nblk * 12 * d4,), torch.uint8), buf("sx", (n,), torch.float32), buf("xn2", (n,), torch.float32)
    Wp, sw, wn2 = buf("Wp", (Lp * d4,), torch.int8), buf("sw", (Lp,), torch.float32), buf("wn2", (Lp,), torch.float32)
    wsum, bp = buf("wsum", (Lp,), torch.int32), buf("bias", (Lp,), torch.float32)
    cand, vm = buf("cand", (n, m), torch.int64), buf("vm", (n,), torch.float32)
    uncertain = buf("uncertain", (n,), torch.uint8)
    W_exact = buf("W_bf16", (L, d), torch.bfloat16) if bf16 else W  # filled by screen_pack_w
    if xs_exact is None:
        xs_exact = buf("xs_bf16", (n, d), torch.bfloat16).copy_(xs) if bf16 else xs
    if xs_exact.dtype != exact_dtype or xs_exact.shape != xs.shape or not xs_exact.is_contiguous():
        raise ValueError(f"xs_exact must be a contiguous {exact_dtype} tensor of shape {tuple(xs.shape)}")
    bias = bias.detach().to(torch.float32).contiguous()
    nt = torch.get_num_threads()
    x_mul, w_mul = _smoothing(xs)
    lib.screen_quantize_x(_ptr(xs), _ptr(x_mul), n, d, _ptr(xq), _ptr(sx), _ptr(xn2), nt)
    lib.screen_pack_w(_ptr(W), _ptr(w_mul), _ptr(bias), L, d, _ptr(Wp), _ptr(sw), _ptr(wsum), _ptr(bp), _ptr(wn2),
                      _ptr(W_exact) if bf16 else None, nt)
    lib.screen_candidates(_ptr(xq), _ptr(sx), _ptr(Wp), _ptr(sw), _ptr(wsum), _ptr(bp), n, L, d, m,
                          _ptr(cand), _ptr(vm), nt)
    vals = torch.empty(n, k, dtype=torch.float32)
    cols = torch.empty(n, k, dtype=torch.int64)
    n_unc = lib.screen_rescore(_ptr(xs_exact), _ptr(W_exact), int(bf16), _ptr(bias), _ptr(cand), n, d, m, k,
                               _ptr(vm), _ptr(sx), _ptr(xn2), float(sw.max()), float(wn2.max()), float(z),
                               _ptr(vals), _ptr(cols), _ptr(uncertain), nt)
    if n_unc:
        rows = uncertain.nonzero().squeeze(1)
        # fp32 sums of the exact operands (a bf16 mm would round its output to bf16)
        pre = torch.mm(xs_exact[rows].float(), W_exact.float().t()) if bf16 else torch.mm(xs_exact[rows], W.t())
        vals[rows], cols[rows] = topk_rows(pre, k, bias=bias)
    if workspace is not None:
        workspace["screen_last_dense_fraction"] = n_unc / n
        workspace["screen_dense_tokens"] = workspace.get("screen_dense_tokens", 0) + int(n_unc)
        workspace["screen_tokens"] = workspace.get("screen_tokens", 0) + n
    return vals, cols


def recycle_grads(state: dict | None, **params: Tensor) -> None:
    """Offer each parameter's current gradient tensor as the next backward's output buffer.

    Called by the model before a fused forward while a trainer fits: the trainer then sets the
    gradients to None, and the backward writes the new gradient into the old tensor and makes it
    the new `.grad` (no fresh [L, d] allocation, see `kernels.workspace_buffer`)."""
    if state is None:
        return
    for name, p in params.items():
        g = p.grad
        if g is not None and g.shape == p.shape and g.dtype == torch.float32 and g.is_contiguous() \
                and g.device.type == "cpu" and not g.is_sparse:
            state["grad_" + name] = g


def _grad_buffer(state: dict | None, key: str, param: Tensor) -> Tensor:
    g = state.pop(key, None) if state is not None else None
    # Only if the parameter no longer holds it: writing into a live .grad would double-count, since
    # autograd then adds the returned tensor to it.
    if g is None or param.grad is not None or g.shape != param.shape:
        return torch.empty(param.shape, dtype=torch.float32)
    return g


class FusedDecodeLoss(torch.autograd.Function):
    """Sparse decoder, FVU and AuxK losses and all their gradients in two compiled passes.

    forward(W_enc, b_enc, W_dec, b_dec, xn, xs, vals, cols, aux_vals, aux_cols, total_variance, aux_scale,
            state, xs_bf16) -> (recon [N,d] incl. b_dec, fvu, auxk)
    The selection (vals, cols, aux_*) comes from the encoder product outside; W_enc / b_enc get their
    gradients here through the selected values (the sparse encoder backward of kernels.TopKEncoder),
    b_dec through the decoder and through the encoder's input shift xs = xn − b_dec.

    recon is not differentiable (the trainer's loss is fvu + α·auxk; a loss on the reconstruction
    itself needs the torch path). `state` (a dict, or None): when given, the backward also removes
    the component of W_dec's gradient along each unit-norm decoder row (the decoder constraint, as
    `TopKSAE.remove_gradient_parallel_to_decoder_directions` would) and sets
    state["decoder_grad_projected"] so that the trainer's own call skips the repeat pass.
    `xs_bf16` (the bf16 copy of xs that a bf16 encoder product already made, or None): mixed precision,
    the weight-gradient pass then reads bf16 copies of xs and of the residuals (fp32 accumulation),
    which halves the bytes of its row gathers.
    """

    @staticmethod
    def forward(ctx, W_enc, b_enc, W_dec, b_dec, xn, xs, vals, cols, aux_vals, aux_cols, total_variance, aux_scale,
                state=None, xs_bf16=None):
        lib = load()
        n, d = xn.shape
        k, ka = vals.shape[1], aux_vals.shape[1]
        # With a workspace these buffers are reused between steps: recon (returned) and the saved r, e,
        # q, qa are overwritten by the next forward, which the trainer runs only after this backward.
        recon = workspace_buffer(state, "recon", (n, d))
        r = workspace_buffer(state, "r", (n, d))
        q = workspace_buffer(state, "q", (n, k))
        sse = workspace_buffer(state, "sse", (n,), torch.float64)
        e = workspace_buffer(state, "e", (n, d)) if ka else None
        qa = workspace_buffer(state, "qa", (n, ka)) if ka else None
        aux_sse = workspace_buffer(state, "aux_sse", (n,), torch.float64) if ka else None
        low = xs_bf16 is not None
        if low and (xs_bf16.dtype != torch.bfloat16 or xs_bf16.shape != xs.shape or not xs_bf16.is_contiguous()):
            raise ValueError("xs_bf16 must be a contiguous bf16 tensor shaped like xs")
        r_h = workspace_buffer(state, "r_h", (n, d), torch.bfloat16) if low else None
        e_h = workspace_buffer(state, "e_h", (n, d), torch.bfloat16) if low and ka else None
        lib.sae_decode_fwd(_ptr(xn), _ptr(vals), _ptr(cols), _ptr(aux_vals) if ka else None,
                           _ptr(aux_cols) if ka else None, _ptr(W_dec.detach()), _ptr(b_dec.detach()), n, d, k, ka,
                           W_dec.shape[0],
                           _ptr(recon), _ptr(r), _ptr(q), _ptr(sse), _ptr(e), _ptr(qa), _ptr(aux_sse),
                           _ptr(r_h), _ptr(e_h), torch.get_num_threads())
        tv = total_variance.detach().double()
        fvu = (sse.sum() / tv).float()
        auxk = (aux_scale * aux_sse.sum() / tv).float() if ka else fvu.new_zeros(())
        ctx.save_for_backward(W_enc, W_dec, xs, r, e if ka else r, vals, cols, q, aux_vals, aux_cols,
                              qa if ka else q, total_variance, *((xs_bf16, r_h, e_h if ka else r_h) if low else ()))
        ctx.low = low
        ctx.aux_scale, ctx.ka, ctx.state = aux_scale, ka, state
        ctx.mark_non_differentiable(recon)
        return recon, fvu, auxk

    @staticmethod
    def backward(ctx, _g_recon, g_fvu, g_auxk):
        lib = load()
        W_enc, W_dec, xs, r, e, vals, cols, q, aux_vals, aux_cols, qa, tv, *low = ctx.saved_tensors
        # the weight-gradient pass reads these (bf16 copies in mixed precision); r stays fp32 for db_dec
        src_x, src_r, src_e = low if ctx.low else (xs, r, e)
        ka = ctx.ka
        n, d = xs.shape
        L, k = W_dec.shape[0], vals.shape[1]
        tv = float(tv)
        s_main = -2.0 * float(g_fvu if g_fvu is not None else 0.0) / tv
        s_aux = 2.0 * ctx.aux_scale * float(g_auxk if g_auxk is not None else 0.0) / tv
        dW_dec = _grad_buffer(ctx.state, "grad_W_dec", W_dec)
        dW_enc = _grad_buffer(ctx.state, "grad_W_enc", W_enc)
        db_enc = torch.empty(L)
        project = ctx.state is not None
        lib.sae_sparse_bwd(_ptr(src_x), _ptr(src_r), _ptr(src_e) if ka else None, int(ctx.low), _ptr(vals),
                           _ptr(cols), _ptr(q),
                           _ptr(aux_vals) if ka else None, _ptr(aux_cols) if ka else None, _ptr(qa) if ka else None,
                           _ptr(W_dec.detach()) if project else None, n, L, d, k, ka, s_main, s_aux,
                           _ptr(dW_dec), _ptr(dW_enc), _ptr(db_enc), torch.get_num_threads())
        if project:
            ctx.state["decoder_grad_projected"] = True
        # b_dec: the decoder adds it to every token (Σ of ∂L/∂recon) and the encoder subtracts it from
        # every input (−∂L/∂b_enc · W_enc).
        db_dec = s_main * r.sum(0) - db_enc @ W_enc.detach()
        if ctx.state is not None and W_enc.is_leaf and W_dec.is_leaf:
            # Trainer mode: the [L, d] gradients go into .grad directly (autograd would copy a tensor
            # it does not own outright, undoing the buffer reuse of `recycle_grads`).
            for p, g in ((W_enc, dW_enc), (W_dec, dW_dec)):
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.add_(g)
            dW_enc = dW_dec = None
        return dW_enc, db_enc, dW_dec, db_dec, None, None, None, None, None, None, None, None, None, None
