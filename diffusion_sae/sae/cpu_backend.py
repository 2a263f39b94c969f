"""The SAE trainer's CPU backend: its workspace (buffers reused between steps), the compiled forward and
backward (native.py) and the policy of the int8-screened selection. `TopKSAE` holds none of this; the
trainer (train.py) makes a workspace for a fit and calls `training_forward` instead of `sae(...)`.

Why a workspace: at L = 12288 a fresh [N, L] product buffer per step costs page faults longer than the
arithmetic (kernels.workspace_buffer); keeping the per-step tensors in one dict that lives as long as the
fit makes every step after the first allocation-free.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import native
from .kernels import workspace_buffer
from .model import ForwardInputs, ForwardOutput, TopKSAE, _autocast_dtype


def new_workspace(screen: bool = True) -> dict:
    """A fit's workspace; `screen` asks for the int8-screened selection where it pays off."""
    return {"screen": bool(screen)}


def training_forward(sae: TopKSAE, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None,
                     total_variance: Tensor | None = None, workspace: dict | None = None) -> ForwardOutput:
    """`sae(x, dead_mask, k_aux, total_variance)` as the trainer runs it: the compiled CPU path where it
    applies (`use_native`), else the model's torch path with the workspace's buffers."""
    p = sae.prepare_forward(x, dead_mask, k_aux, total_variance)
    if use_native(sae, p.xn, p.batch_mode, workspace):
        return _forward_native(sae, x, p, workspace)
    return sae.forward_prepared(x, p, workspace)


def project_decoder_grad(sae: TopKSAE, workspace: dict | None) -> None:
    """`remove_gradient_parallel_to_decoder_directions`, unless the fused backward already did it row by
    row this step (native.FusedDecodeLoss marks the workspace)."""
    if workspace is not None and workspace.pop("decoder_grad_projected", False):
        return
    sae.remove_gradient_parallel_to_decoder_directions()


def pop_screen_stats(workspace: dict | None) -> float | None:
    """Share of tokens since the last call whose screening certificate sent them to the dense product."""
    ws = workspace or {}
    if not ws.get("screen_tokens"):
        return None
    frac = ws["screen_dense_tokens"] / ws["screen_tokens"]
    ws["screen_tokens"] = ws["screen_dense_tokens"] = 0
    return frac


def use_native(sae: TopKSAE, xn: Tensor, batch_mode: bool, workspace: dict | None) -> bool:
    """The compiled CPU path (native.py) is the trainer's: it runs while a trainer fits (a `workspace`
    given), for per-token TopK with fp32 weights and no input gradient. Other calls use the torch path,
    whose reconstruction is differentiable."""
    if workspace is None or batch_mode or (sae.cfg.batch_topk and sae.cfg.threshold > 0):
        return False
    if xn.requires_grad:
        return False
    if sae.dtype != torch.float32 or xn.dtype != torch.float32:
        return False
    return native.usable(xn, sae.W_enc, sae.W_dec)

def screen_candidates(sae: TopKSAE, k: int, dead_mask: Tensor | None, ws: dict) -> int:
    """Candidates per token for the int8-screened selection (native.screened_topk), or 0 for the
    dense product. The trainer asks for screening (`workspace["screen"]`); it pays off when the
    2k candidates are few against L and the product is large (native.SCREEN_MIN_SIZE), while few
    latents are dead (AuxK then needs the exact
    product of the dead ones), and while few tokens fail its certificate."""
    L = sae.cfg.num_latents
    m = 2 * k
    if not ws or not ws.get("screen") or 8 * m > L or sae.cfg.d_in * L < native.SCREEN_MIN_SIZE:
        return 0
    if not native.screen_supported():
        return 0
    if dead_mask is not None and int(dead_mask.sum()) * 4 > L:
        return 0
    # Data the int8 product ranks poorly (its certificate sent over a quarter of a batch to the
    # dense product) costs more screened than dense: pause screening, then try again.
    if ws.pop("screen_last_dense_fraction", 0.0) > 0.25:
        ws["screen_paused_steps"] = 64
    if ws.get("screen_paused_steps", 0) > 0:
        ws["screen_paused_steps"] -= 1
        return 0
    return m

def _forward_native(sae: TopKSAE, x: Tensor, p: ForwardInputs, ws: dict) -> ForwardOutput:
    # Every per-step tensor lives in the trainer's workspace (kernels.workspace_buffer explains why).
    xn, stats, k, dead_mask, ka, scale = p.xn, p.stats, p.k, p.dead_mask, p.k_aux, p.aux_scale
    n, L = xn.shape[0], sae.cfg.num_latents
    cdt = _autocast_dtype(xn) or sae.dtype
    if cdt not in (torch.float32, torch.bfloat16):
        cdt = torch.float32  # fp16 products on CPU are slow and not what the kernels read
    native.recycle_grads(ws, W_enc=sae.W_enc, W_dec=sae.W_dec)
    with torch.no_grad():
        xs = torch.sub(xn, sae.b_dec, out=workspace_buffer(ws, "xs", xn.shape))
        xs_c = workspace_buffer(ws, "xs_c", xn.shape, cdt).copy_(xs) if cdt != torch.float32 else xs
        b_enc, W_enc = sae.b_enc.detach(), sae.W_enc.detach()
        m = screen_candidates(sae, k, dead_mask, ws)
        if m:
            # the screen makes the bf16 copy of W_enc (when it needs one) in its own pass over W_enc
            vals, cols = native.screened_topk(xs, W_enc, b_enc, k, m, cdt, xs_c, ws)
            if ka:
                # AuxK needs the exact pre-activations of the dead latents only (few, by screen_candidates).
                dead = dead_mask.nonzero().squeeze(1)
                pre = torch.mm(xs_c, W_enc[dead].to(cdt).t(),
                               out=workspace_buffer(ws, "pre_dead", (n, dead.numel()), cdt))
                aux_vals, aux_c = native.topk_rows(pre, ka, bias=b_enc[dead])
                aux_cols = dead[aux_c]
        else:
            W_c = workspace_buffer(ws, "W_enc_c", W_enc.shape, cdt).copy_(W_enc) if cdt != torch.float32 else W_enc
            # The bias is added inside the selection (in fp32): addmm would first broadcast it into
            # the whole [N, L] buffer, a pass as long as the selection itself.
            pre = torch.mm(xs_c, W_c.t(), out=workspace_buffer(ws, "pre", (n, L), cdt))
            vals, cols = native.topk_rows(pre, k, bias=b_enc)
            if ka:
                aux_vals, aux_cols = native.topk_rows(pre, ka, dead_mask, bias=b_enc)
        if not ka:
            aux_vals, aux_cols = vals.new_empty(n, 0), cols.new_empty(n, 0)
    recon, fvu, auxk = native.FusedDecodeLoss.apply(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, xn, xs,
                                                    vals, cols, aux_vals, aux_cols,
                                                    p.total_variance.detach().float(), scale, ws,
                                                    xs_c if cdt == torch.bfloat16 else None)
    out = sae.denormalize(recon, stats).reshape(x.shape).to(x.dtype)
    lead = x.shape[:-1]
    return ForwardOutput(out, vals.reshape(*lead, -1), cols.reshape(*lead, -1), fvu, auxk, None)
