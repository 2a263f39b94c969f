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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_offsets(rows: Tensor, num_tokens: int) -> Tensor:
    """Start index of every token's run in a flat selection sorted by token (empty runs allowed)."""
    counts = torch.bincount(rows, minlength=num_tokens)
    return torch.cumsum(counts, 0) - counts


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
    """(x, W_enc, b_enc) -> selected ReLU pre-activations, with a backward that stays sparse.

    forward(x [N,d], W_enc [L,d], b_enc [L], k, batch_topk, dead_mask [L] bool or None, k_aux)
    returns (vals, cols, rows, aux_vals, aux_cols):
      vals/cols: [N, k] (per-token) or flat [k*N] (batch_topk, sorted by token, token id in `rows`);
      rows: empty for per-token selections;
      aux_vals/aux_cols: [N, k_aux] top-k_aux ReLU pre-activations among dead latents (k_aux = 0 when
      dead_mask is None).
    ReLU comes before the selection (EleutherAI order); for the selected values this equals
    TopK-then-ReLU (OpenAI order), only the indices of zero-valued slots may differ.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k: int, batch_topk: bool, dead_mask, k_aux: int):
        num_tokens, num_latents = x.shape[0], W_enc.shape[0]
        pre = torch.addmm(b_enc, x, W_enc.t())  # under autocast this runs in the autocast dtype
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
        else:
            aux_vals = pre.new_empty(num_tokens, 0)
            aux_cols = cols.new_empty(num_tokens, 0)
        del pre
        ctx.save_for_backward(x, W_enc, vals, cols, rows, aux_vals, aux_cols)
        ctx.batch_topk = batch_topk
        ctx.mark_non_differentiable(cols, rows, aux_cols)
        return vals, cols, rows, aux_vals, aux_cols

    @staticmethod
    def backward(ctx, g_vals, _g_cols, _g_rows, g_aux, _g_aux_cols):
        x, W_enc, vals, cols, rows, aux_vals, aux_cols = ctx.saved_tensors
        num_tokens, num_latents = x.shape[0], W_enc.shape[0]
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
            main_rows = torch.arange(num_tokens, device=x.device).repeat_interleave(k)
            main_offsets = None
        all_cols, all_rows, all_g = cols.reshape(-1), main_rows, g_main.reshape(-1)
        if have_aux:
            ka = aux_cols.shape[1]
            aux_rows = torch.arange(num_tokens, device=x.device).repeat_interleave(ka)
            all_cols = torch.cat([all_cols, aux_cols.reshape(-1)])
            all_rows = torch.cat([all_rows, aux_rows])
            all_g = torch.cat([all_g, g_a.reshape(-1)])

        g_x = g_W = g_b = None
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(num_latents, dtype=wdt, device=x.device).index_add_(0, all_cols, all_g)
        if ctx.needs_input_grad[1]:
            # dL/dW_enc[j] = sum_i g_ij x_i over the selected (i, j): a sparse [L, N] times dense [N, d].
            G = torch.sparse_coo_tensor(torch.stack([all_cols, all_rows]), all_g, (num_latents, num_tokens),
                                        check_invariants=False)
            g_W = torch.sparse.mm(G, x.to(wdt))
        if ctx.needs_input_grad[0]:
            g_x = sparse_decode(g_main, cols, W_enc, main_offsets)
            if have_aux:
                g_x = g_x + sparse_decode(g_a, aux_cols, W_enc)
            g_x = g_x.to(x.dtype)
        return g_x, g_W, g_b, None, None, None, None


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, batch_topk: bool = False,
                dead_mask: Tensor | None = None, k_aux: int = 0):
    """Functional entry point of `TopKEncoder` (see its docstring)."""
    return TopKEncoder.apply(x, W_enc, b_enc, k, batch_topk, dead_mask, k_aux)
