"""Feature scaling: multiply chosen SAE features by a factor, optionally inside a denoising-step window.

At the hookpoint the tensor x (every token or patch, both guidance branches) is encoded densely, and
only the change of the chosen latents is decoded and added:

    z'_j = f_j · z_j  for the chosen j            x_out = x + W_dec (z' − z)

so the SAE's reconstruction error stays in and a factor of 1 leaves x exactly as it was; f_j = 0 switches
feature j off, f_j > 1 amplifies it. `steps=(a, b)` edits only denoising steps a ≤ t < b (the step read
from the timestep the denoiser receives, models/step_tracker.py); None edits every call.

This file is the whole intervention: config, edit and the object that `ds.apply` / `ds.intervene` take.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..configs import Config, ConfigError
from ..models import StepTracker, as_tokens, from_tokens, register_edit, resolve_hookpoint
from .api import Intervention, InterventionError
from .registry import register_intervention


@dataclass(frozen=True)
class FeatureScalingConfig(Config):
    kind = "feature_scaling"

    features: dict[int, float]                 # latent index -> factor
    steps: tuple[int, int] | None = None       # [first, last) denoising step indices; None: every call
    hookpoint: str | None = None               # None: the SAE's own cfg.hookpoint

    def __post_init__(self):
        try:
            feats = {int(j): float(f) for j, f in dict(self.features).items()}   # JSON keys are strings
        except (TypeError, ValueError):
            raise ConfigError(f"FeatureScalingConfig.features must map latent indices to factors, "
                              f"not {self.features!r}") from None
        if not feats:
            raise ConfigError("FeatureScalingConfig.features is empty: give {latent index: factor}")
        object.__setattr__(self, "features", feats)
        if self.steps is not None:
            steps = tuple(int(s) for s in self.steps)
            if len(steps) != 2 or not 0 <= steps[0] < steps[1]:
                raise ConfigError(f"FeatureScalingConfig.steps must be (first, last) with 0 <= first < last, "
                                  f"not {self.steps!r}")
            object.__setattr__(self, "steps", steps)


def scale_features_edit(sae, factors: dict[int, float], tracker: StepTracker | None = None,
                        steps: tuple[int, int] | None = None):
    """The edit x -> x + W_dec (z' − z) with z'_j = factors[j] · z_j (see the module docstring).

    With `steps`, the tracker's step index must lie in [steps[0], steps[1]) or x is returned unchanged.
    """
    L = sae.cfg.num_latents
    bad = [j for j in factors if not 0 <= int(j) < L]
    if bad:
        raise InterventionError(f"feature {bad[0]} is out of range: the SAE has features 0..{L - 1}")
    # A factor of 1 changes nothing: leave it out, and with nothing left return x itself (not a copy
    # rebuilt from tokens, whose memory layout alone can shift the following layers' rounding).
    cols = torch.tensor(sorted(j for j, f in factors.items() if f != 1.0), dtype=torch.long)
    mult = torch.tensor([factors[int(j)] - 1.0 for j in cols], dtype=sae.dtype, device=sae.device)

    def edit(h: torch.Tensor) -> torch.Tensor:
        if len(cols) == 0:
            return h
        if steps is not None:
            t = tracker.step_index
            if t is None or not steps[0] <= t < steps[1]:
                return h
        tok, grid = as_tokens(h)
        b, n, d = tok.shape
        xs = tok.reshape(b * n, d).to(sae.device, sae.dtype)
        z = sae.dense_latents(xs)
        delta = torch.zeros(b * n, L, dtype=sae.dtype, device=sae.device)
        delta[:, cols] = z[:, cols] * mult
        new = xs + sae.decode_dense(delta, add_bias=False, x=xs)
        return from_tokens(new.to(h.dtype).reshape(b, n, d), grid)
    return edit


class FeatureScaling(Intervention):
    """`FeatureScaling(sae, features={12: 0.0, 873: 3.0}, steps=(0, 10))`: see the module docstring."""

    def __init__(self, sae, config: FeatureScalingConfig | None = None, *, name: str | None = None, **fields):
        if config is not None and fields:
            raise TypeError("give either a FeatureScalingConfig or its fields, not both")
        self.sae = sae
        self.config = config if config is not None else FeatureScalingConfig(**fields)
        self.name = name or f"scale:{','.join(str(j) for j in sorted(self.config.features))}"

    @contextlib.contextmanager
    def context(self, pipe):
        c = self.config
        hp = resolve_hookpoint(pipe, c.hookpoint or self.sae.cfg.hookpoint)
        if hp.width is not None and hp.width != self.sae.cfg.d_in:
            raise InterventionError(f"SAE width {self.sae.cfg.d_in} != width {hp.width} of {hp.name!r}")
        if c.steps is not None and hp.kind != "denoiser":
            raise InterventionError(f"a step window needs a denoiser hookpoint; {hp.name!r} is in {hp.component}")
        with contextlib.ExitStack() as stack:
            tracker = stack.enter_context(StepTracker.shared(pipe)) if c.steps is not None else None
            handle = register_edit(hp, scale_features_edit(self.sae, c.features, tracker, c.steps),
                                   "diffusion_sae.feature_scaling")
            stack.callback(handle.remove)
            yield self


# Reachable by name from the CLI (`intervene --method scale --set features=12:0`), the web UI, `eval shapes`
# and `eval attack` (interventions/registry.py).
register_intervention("scale", FeatureScalingConfig, lambda sae, config, context: FeatureScaling(sae, config),
                      sae="block", summary="multiply chosen SAE features by a factor, optionally inside a "
                                           "denoising-step window (features=12:0,873:3 steps=0,10)")
