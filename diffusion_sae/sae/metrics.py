"""Reconstruction and sparsity metrics for SAEs. All take plain tensors and return floats/tensors.

fvu                 Σ‖x − x̂‖² / Σ‖x − mean(x)‖²  (fraction of variance unexplained; the training loss)
explained_variance  1 − Σ_f Var(x_f − x̂_f) / Σ_f Var(x_f)  (residual mean removed, so a constant
                    offset in x̂ is not penalised; equals 1 − fvu when the residual has zero mean)
l0                  mean number of non-zero latents per token
firing_frequency    fraction of tokens on which each latent is non-zero
dead_fraction       fraction of latents that never fired (or, with a threshold, went longer than it)
"""
from __future__ import annotations

import torch
from torch import Tensor


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    x, x_hat = _flat(x), _flat(x_hat)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    x, x_hat = _flat(x), _flat(x_hat)
    resid = x - x_hat
    return float(1.0 - resid.var(0, unbiased=False).sum() / x.var(0, unbiased=False).sum().clamp_min(1e-30))


def l0(top_acts: Tensor, num_tokens: int | None = None) -> float:
    """Mean non-zeros per token. top_acts [..., w] per token, or flat with num_tokens given."""
    nz = (top_acts != 0).sum()
    n = num_tokens if num_tokens is not None else max(top_acts.reshape(-1, top_acts.shape[-1]).shape[0], 1)
    return float(nz) / n


def firing_counts(top_acts: Tensor, top_indices: Tensor, num_latents: int) -> Tensor:
    """How many tokens each latent fired on (value > 0)."""
    return torch.bincount(top_indices.reshape(-1)[top_acts.reshape(-1) > 0], minlength=num_latents)


def firing_frequency(top_acts: Tensor, top_indices: Tensor, num_latents: int, num_tokens: int | None = None) -> Tensor:
    n = num_tokens if num_tokens is not None else top_acts.reshape(-1, top_acts.shape[-1]).shape[0]
    return firing_counts(top_acts, top_indices, num_latents).float() / max(n, 1)


def dead_fraction(counts_or_tokens_since_fired: Tensor, threshold: int | None = None) -> float:
    """With threshold=None: fraction of latents whose firing count is 0. Otherwise the argument is
    tokens-since-last-fired and a latent is dead when that exceeds the threshold."""
    t = counts_or_tokens_since_fired
    dead = (t == 0) if threshold is None else (t > threshold)
    return float(dead.float().mean())
