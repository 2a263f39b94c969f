"""Sparse compute kernels for TopK SAEs: an encoder with a sparse backward, and a sparse decoder.

Why a custom autograd function: autograd through `topk(relu(x @ W.T + b))` back-propagates a dense
[N, L] gradient (almost all zeros) through the encoder matmul, which costs as much as the forward
matmul again. Only N*k entries of that gradient are non-zero, so the weight gradient is a sparse x
dense product (N*k*d multiply-adds instead of N*L*d) and the input gradient is an `embedding_bag`
over the selected encoder rows. The decoder likewise never forms the dense [N, L] code matrix: the
reconstruction is an `embedding_bag` of the k selected decoder rows weighted by their activations.

Selections come in two layouts:
- per-token TopK: `vals`, `cols` are [N, k]; token i owns row i;
- BatchTopK (training): `vals`, `cols`, `rows` are flat [M] (M = k*N), sorted by token (`rows`),
  so that a token's entries are contiguous and `offsets` (start of each token's run) describe them.

The auxiliary (AuxK) selection over dead latents reuses the same pre-activations, so the whole
encoder costs one matmul per step.

This is the portable path (any device, any dtype, differentiable everywhere). While a trainer fits
on CPU, `native.py` replaces the selection, decoder, losses and gradients with compiled C kernels
that do the same maths in fewer passes (tests compare the two).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_offsets(rows: Tensor, num_tokens: int) -> Tensor:
    """Start index of every token's run in a flat selection sorted by token (empty runs allowed)."""
    counts = torch.bincount(rows, minlength=num_tokens)
    return torch.cumsum(counts, 0) - counts


def workspace_buffer(state: dict | None, key: str, shape, dtype=torch.float32, device="cpu") -> Tensor:
    """An uninitialised tensor, kept in `state` (a workspace dict) and reused while shape, dtype and device hold.

    Why: a freshly allocated buffer is page-faulted in on first write; above glibc's mmap threshold
    (32 MiB at most) that happens on every allocation: 30 of the 60 ms of the compiled
    weight-gradient pass at L = 12288 (measured), a tenth of the encoder product for its [N, L] output."""
    shape, device = tuple(shape), torch.device(device)
    if state is None:
        return torch.empty(shape, dtype=dtype, device=device)
    t = state.get(key)
    if t is None or tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        t = state[key] = torch.empty(shape, dtype=dtype, device=device)
    return t


def sparse_decode(vals: Tensor, cols: Tensor, weight: Tensor, offsets: Tensor | None = None) -> Tensor:
    """sum_j vals_j * weight[cols_j] per token, without a dense [N, L] matrix.

    vals/cols: [N, k] (per-token) or flat [M] with `offsets` [N] (runs sorted by token).
    Returns [N, d]. Differentiable in `vals` and `weight`.
    """
    vals = vals.to(weight.dtype)
    if offsets is None:
        return F.embedding_bag(cols, weight, per_sample_weights=vals, mode="sum")
    return F.embedding_bag(cols, weight, offsets, per_sample_weights=vals, mode="sum")


class TopKEncoder(torch.autograd.Function):
    """(x, shift, W_enc, b_enc) -> selected ReLU pre-activations of (x − shift) W_encᵀ + b_enc, sparse backward.

    forward(x [N,d], shift [d] (b_dec) or None, W_enc [L,d], b_enc [L], k, batch_topk, dead_mask [L]
    bool or None, k_aux, compute_dtype, workspace) returns (vals, cols, rows, aux_vals, aux_cols):
      vals/cols: [N, k] (per-token) or flat [k*N] (batch_topk, sorted by token, token id in `rows`);
      rows: empty for per-token selections;
      aux_vals/aux_cols: [N, k_aux] top-k_aux ReLU pre-activations among dead latents (k_aux = 0 when
      dead_mask is None).
    ReLU comes before the selection (EleutherAI order); for the selected values this equals
    TopK-then-ReLU (OpenAI order), only the indices of zero-valued slots may differ.

    `shift` is an input of the function (not subtracted by the caller) because its gradient is then
    −(∂L/∂b_enc) W_enc, an [L]·[L,d] product, instead of a sum over an [N,d] input gradient that
    would need an extra embedding_bag over the selected encoder rows.

    compute_dtype (e.g. bf16) runs only the dense [N,L] product in that dtype; weights, gradients,
    and everything after the selection stay in W_enc's dtype (mixed precision: the selected values
    carry the product's rounding, ~3 significant digits in bf16). CPUs with AVX512-BF16 or AMX run
    that product ~3x faster than fp32.
    `workspace` (a dict, or None) keeps the [N,L] pre-activation buffer between calls: allocating
    it anew every step costs page faults comparable to a tenth of the product itself.
    """

    @staticmethod
    def forward(ctx, x, shift, W_enc, b_enc, k: int, batch_topk: bool, dead_mask, k_aux: int,
                compute_dtype=None, workspace=None):
        num_tokens, num_latents = x.shape[0], W_enc.shape[0]
        wdt = W_enc.dtype
        xs = x - shift if shift is not None else x
        cdt = compute_dtype or wdt
        pre = workspace_buffer(workspace, "pre", (num_tokens, num_latents), cdt, x.device)
        pre = torch.addmm(b_enc.to(cdt), xs.to(cdt), W_enc.to(cdt).t(), out=pre)  # .to: no copy when equal
        pre = pre.relu_()
        if batch_topk:
            m = min(k * num_tokens, pre.numel())
            vals, flat = pre.view(-1).topk(m, sorted=False)
            flat, order = flat.sort()  # group by token so every token's entries are contiguous
            vals = vals[order]
            rows, cols = flat // num_latents, flat % num_latents
        else:
            vals, cols = pre.topk(k, dim=-1, sorted=False)
            rows = cols.new_empty(0)
        if dead_mask is not None and k_aux > 0:
            # Reuse the pre-activation buffer: live latents can never be picked by the aux selection.
            pre.masked_fill_(~dead_mask, float("-inf"))
            aux_vals, aux_cols = pre.topk(k_aux, dim=-1, sorted=False)
            aux_vals = aux_vals.to(wdt)
        else:
            aux_vals = torch.empty(num_tokens, 0, dtype=wdt, device=x.device)
            aux_cols = cols.new_empty(num_tokens, 0)
        del pre
        vals = vals.to(wdt)
        ctx.save_for_backward(xs, W_enc, vals, cols, rows, aux_vals, aux_cols)
        ctx.batch_topk = batch_topk
        ctx.mark_non_differentiable(cols, rows, aux_cols)
        return vals, cols, rows, aux_vals, aux_cols

    @staticmethod
    def backward(ctx, g_vals, _g_cols, _g_rows, g_aux, _g_aux_cols):
        xs, W_enc, vals, cols, rows, aux_vals, aux_cols = ctx.saved_tensors
        num_tokens, num_latents = xs.shape[0], W_enc.shape[0]
        wdt = W_enc.dtype
        # ReLU gradient: slots whose value was clamped to zero pass nothing back.
        g_main = (g_vals if g_vals is not None else torch.zeros_like(vals)).to(wdt) * (vals > 0)
        have_aux = g_aux is not None and aux_cols.numel() > 0
        g_a = g_aux.to(wdt) * (aux_vals > 0) if have_aux else None

        if ctx.batch_topk:
            main_rows = rows
            main_offsets = token_offsets(rows, num_tokens)
        else:
            k = cols.shape[1]
            main_rows = torch.arange(num_tokens, device=xs.device).repeat_interleave(k)
            main_offsets = None
        all_cols, all_rows, all_g = cols.reshape(-1), main_rows, g_main.reshape(-1)
        if have_aux:
            ka = aux_cols.shape[1]
            aux_rows = torch.arange(num_tokens, device=xs.device).repeat_interleave(ka)
            all_cols = torch.cat([all_cols, aux_cols.reshape(-1)])
            all_rows = torch.cat([all_rows, aux_rows])
            all_g = torch.cat([all_g, g_a.reshape(-1)])

        g_x = g_shift = g_W = g_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            g_bias = torch.zeros(num_latents, dtype=wdt, device=xs.device).index_add_(0, all_cols, all_g)
        if ctx.needs_input_grad[1]:
            g_shift = -(g_bias @ W_enc).to(xs.dtype)  # Σ_i g_i·(−W_enc): every token's pre-activation moves alike
        if ctx.needs_input_grad[2]:
            # dL/dW_enc[j] = sum_i g_ij x_i over the selected (i, j): a sparse [L, N] times dense [N, d].
            G = torch.sparse_coo_tensor(torch.stack([all_cols, all_rows]), all_g, (num_latents, num_tokens),
                                        check_invariants=False)
            g_W = torch.sparse.mm(G, xs.to(wdt))
        if ctx.needs_input_grad[0]:
            g_x = sparse_decode(g_main, cols, W_enc, main_offsets)
            if have_aux:
                g_x = g_x + sparse_decode(g_a, aux_cols, W_enc)
            g_x = g_x.to(xs.dtype)
        g_b = g_bias if ctx.needs_input_grad[3] else None
        return g_x, g_shift, g_W, g_b, None, None, None, None, None, None


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, batch_topk: bool = False,
                dead_mask: Tensor | None = None, k_aux: int = 0, shift: Tensor | None = None,
                compute_dtype: torch.dtype | None = None, workspace: dict | None = None):
    """Functional entry point of `TopKEncoder` (see its docstring); encodes x − shift."""
    return TopKEncoder.apply(x, shift, W_enc, b_enc, k, batch_topk, dead_mask, k_aux, compute_dtype, workspace)
