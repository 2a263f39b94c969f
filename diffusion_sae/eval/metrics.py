"""Metric definitions shared by every benchmark: results with their settings, accuracies, Fréchet distances.

Every number this package reports is a `MetricResult`: the value, the sample count and the exact settings
(classes, threshold, subset, model files) that produced it, so a report can never show a number without
saying how it was computed (the papers' scripts disagree on all of these).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np


class AssetError(FileNotFoundError):
    """A model file, checkpoint or data file the user must provide is missing (message names it and the fix)."""


class MetricInputError(ValueError):
    """Inputs a metric cannot be computed from (empty sets, mismatched lengths, unknown labels)."""


@dataclass
class MetricResult:
    name: str
    value: float
    n: int
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # per-class / per-concept breakdowns

    def to_dict(self) -> dict:
        return asdict(self)


def file_sha256(path: str | Path, prefix: int = 16) -> str:
    """Hex sha256 of a file (first `prefix` characters; 0 = all), recorded so a report names exact asset versions."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:prefix] if prefix else h.hexdigest()


# ---------------------------------------------------------------------------------------------
# accuracies
# ---------------------------------------------------------------------------------------------
def accuracy_by_label(pred: Sequence[Hashable], true: Sequence[Hashable]) -> dict[Hashable, float]:
    """For each true label t: the fraction of items with true label t predicted as t."""
    if len(pred) != len(true):
        raise MetricInputError(f"{len(pred)} predictions for {len(true)} true labels")
    hits: dict[Hashable, int] = {}
    counts: dict[Hashable, int] = {}
    for p, t in zip(pred, true):
        counts[t] = counts.get(t, 0) + 1
        hits[t] = hits.get(t, 0) + int(p == t)
    return {t: hits[t] / counts[t] for t in counts}


def label_counts(true: Sequence[Hashable]) -> dict[Hashable, int]:
    out: dict[Hashable, int] = {}
    for t in true:
        out[t] = out.get(t, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------
def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (rows = samples), float64, as pytorch-fid / clean-fid compute them."""
    x = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise MetricInputError(f"need a (n >= 2, d) feature matrix, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ between two Gaussians.

    tr (Σ1Σ2)^½ is computed as Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (same eigenvalues as Σ1Σ2),
    which stays real and needs no scipy, unlike `sqrtm(Σ1 @ Σ2)` whose tiny imaginary parts other
    implementations discard; the two agree to float precision (tested against scipy.linalg.sqrtm).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise MetricInputError(f"mismatched Gaussian shapes: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_from_features(features_a, features_b) -> float:
    mu_a, s_a = feature_stats(features_a)
    mu_b, s_b = feature_stats(features_b)
    if mu_a.shape != mu_b.shape:
        raise MetricInputError(f"feature widths differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance(mu_a, s_a, mu_b, s_b)


def classifier_frechet_distance(features_a, features_b) -> MetricResult:
    """Fréchet distance in a *classifier's* feature space (e.g. the ShapesCanvas judge's 128-d features).

    Same formula as FID but NOT FID: the features come from our procedural classifier, not Inception,
    so the number is only comparable to other numbers computed with the same classifier weights.
    """
    n_a, n_b = len(features_a), len(features_b)
    value = frechet_distance_from_features(features_a, features_b)
    d = int(np.asarray(features_a.shape if hasattr(features_a, "shape") else np.shape(features_a))[-1])
    return MetricResult("classifier_frechet_distance", value, n=min(n_a, n_b),
                        settings={"features": "classifier penultimate features", "dim": d, "n_a": n_a, "n_b": n_b,
                                  "covariance": "unbiased (n-1)", "note": "not FID: not Inception features"})


# ---------------------------------------------------------------------------------------------
# collateral change of an erasure on prompts that never name the concept
# ---------------------------------------------------------------------------------------------
def histogram_tv_distance(labels_a: Sequence[int], labels_b: Sequence[int], n_classes: int) -> float:
    """Total-variation distance ½ Σ |p_a − p_b| between the label histograms of two image sets."""
    a = np.bincount(np.asarray(labels_a, dtype=np.int64), minlength=n_classes).astype(np.float64)
    b = np.bincount(np.asarray(labels_b, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if a.sum() == 0 or b.sum() == 0:
        raise MetricInputError("total-variation distance of an empty label set")
    if len(a) > n_classes or len(b) > n_classes:
        raise MetricInputError(f"labels outside 0..{n_classes - 1}")
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def paired_change_rate(before: dict[str, Sequence[int]], after: dict[str, Sequence[int]],
                       mask: Sequence[bool] | None = None) -> float:
    """Share of paired images (same prompt and seed, without / with an intervention) whose judged
    labels change on any head; `mask` restricts the pairs (e.g. to seeds whose plain image lacks the
    erased concept, where an ideal eraser changes nothing)."""
    heads = list(before)
    if set(heads) != set(after):
        raise MetricInputError(f"heads differ: {sorted(before)} vs {sorted(after)}")
    b = np.stack([np.asarray(before[h]) for h in heads])
    a = np.stack([np.asarray(after[h]) for h in heads])
    if a.shape != b.shape:
        raise MetricInputError(f"{b.shape[1]} images before, {a.shape[1]} after: not paired")
    changed = (a != b).any(axis=0)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != changed.shape:
            raise MetricInputError(f"mask of {m.size} for {changed.size} pairs")
        changed = changed[m]
    return float(changed.mean()) if changed.size else float("nan")


def artifact_rate(confidence: Sequence[float], threshold: float = 0.5) -> float:
    """Share of images the judge cannot place: its least confident head's top probability is below
    `threshold` (images off the world's manifold, as in PER's "look but don't touch" check)."""
    c = np.asarray(confidence, dtype=np.float64)
    if c.size == 0:
        raise MetricInputError("artifact rate of an empty image set")
    return float((c < threshold).mean())


# ---------------------------------------------------------------------------------------------
# sampling noise: 95 % intervals for the erasure axes
# ---------------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for a share of `successes` in `n` images. Unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or n, which is where erasure figures sit
    (0 of 20 named images is not "0 % for sure": its interval is [0, 16 %])."""
    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise MetricInputError(f"counts must be whole numbers, got {successes!r} of {n!r}")
    k, n = int(successes), int(n)
    if n < 1 or not 0 <= k <= n:
        raise MetricInputError(f"{k} successes of {n} images")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def paired_ratio_interval(edited: Sequence[bool], plain: Sequence[bool], n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of Σ edited / Σ plain (the implicit ratio: presence with the edit over the
    plain base rate) over paired samples (same prompt and seed), resampling the pairs. A resample whose plain
    count is 0 has no ratio and is dropped; (nan, nan) when the plain model never drew the concept."""
    e, b = np.asarray(edited, dtype=bool), np.asarray(plain, dtype=bool)
    if e.shape != b.shape or e.ndim != 1:
        raise MetricInputError(f"{e.shape} edited against {b.shape} plain samples: not paired")
    if not b.any():
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(b), size=(n_boot, len(b)))
    num, den = e[idx].sum(1), b[idx].sum(1)
    ratios = num[den > 0] / den[den > 0]
    tail = 100 * (1 - level) / 2
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))
