"""Typed settings of the two interventions, with a JSON round-trip carrying a schema version.

Each config is a frozen dataclass: fields with a fixed set of values are `Literal` types and are
checked on construction, lists are stored as tuples (so a config is hashable and cannot change
under a hook that holds it), and `to_dict` / `from_dict` write and read plain JSON with
`schema_version` and `kind` keys, so a stored preset says what it is and which layout it uses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import DiffusionSAEError

SCHEMA_VERSION = 1


class ConfigError(DiffusionSAEError, ValueError):
    """A config field with a wrong value, an unknown field, or a preset of another kind or version."""


def _check_literals(cfg) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        hint = hints[f.name]
        if typing.get_origin(hint) is Literal and getattr(cfg, f.name) not in typing.get_args(hint):
            allowed = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ConfigError(f"{type(cfg).__name__}.{f.name} must be one of {allowed}, "
                              f"not {getattr(cfg, f.name)!r}")


def _as_tuple(value) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value)


def _words(cfg, name: str) -> tuple[str, ...]:
    """A word-list field as a tuple of non-empty strings (an empty word names nothing: refuse it)."""
    words = _as_tuple(getattr(cfg, name))
    bad = [w for w in words if not isinstance(w, str) or not w.strip()]
    if bad:
        raise ConfigError(f"{type(cfg).__name__}.{name} holds {bad[0]!r}: give non-empty words such as 'dog'")
    return words


def _finite(cfg, name: str, *value: Any) -> float:
    """The field `name` (or `value`, one item of it) as a finite float."""
    v = value[0] if value else getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be a finite number, not {v!r}")
    return float(v)


def _probability(cfg, name: str, *value: Any) -> float:
    p = _finite(cfg, name, *value)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{type(cfg).__name__}.{name} must be a probability in [0, 1], not {p!r}")
    return p


class Config:
    """Base of the typed configs: `kind` names the config in JSON; subclasses are frozen dataclasses."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        kind = data.pop("kind", cls.kind)
        if version != SCHEMA_VERSION:
            raise ConfigError(f"{cls.__name__}: schema_version {version!r} is not {SCHEMA_VERSION}, "
                              "the only version this release reads")
        if kind != cls.kind:
            raise ConfigError(f"a {kind!r} config cannot be read as {cls.__name__} ({cls.kind!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field {unknown[0]!r}; fields: {', '.join(sorted(names))}")
        return cls(**data)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path):
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


@dataclass(frozen=True)
class SteeringConfig(Config):
    """Concept Steerers (interventions/steer.py: concept_steering + steer_text_encoder)."""

    kind: ClassVar[str] = "steering"

    concept: str | tuple[str, ...]           # one prompt, or several whose matrices are averaged (kept as a tuple)
    strength: float = -1.0                   # λ: < 0 removes the concept, > 0 adds it
    hookpoint: str | None = None             # None: the SAE's own cfg.hookpoint
    baseline: str | tuple[str, ...] | None = None  # prompts whose matrix is subtracted ("" : the empty prompt)
    gate: str | None = None                  # steer only prompts containing these tokens (ours)
    keep: str | tuple[str, ...] = ()         # concepts projected out of S row by row (ours)
    negative_steering: bool = True           # subtract S from the negative prompt's encoding
    faithful: bool = False                   # the official call-counting hooks instead of two explicit calls
    # FamilyGate (ours, steer.family_gate): S scaled per prompt by which of the concept's family it names.
    rivals: str | tuple[str, ...] = ()       # words of the concept's rivals; non-empty turns the family gate on
    concept_words: str | tuple[str, ...] = ()  # the words that name the concept (required with rivals)
    implicit: float = 0.0                    # scale of S on prompts naming none of the family (0: leave them)
    implicit_negative: float | None = None   # the same on their negative branch (None: as implicit)
    implicit_from_step: int = 0              # the implicit fractions act from this denoising step on (0: every step)
    match: Literal["tokens", "embedding"] = "embedding"  # exact tokens, or nearest word in the token embeddings
    neutral: str | tuple[str, ...] | None = None  # match="embedding": words that name nothing (None: the defaults)
    # Per-sample detector (ours, concepts/probe.py): the folder of a saved ConceptProbe, or several (a sample any
    # of them flags is flagged, e.g. a prompt's-branch probe at step 0 and an image-side one later); from
    # implicit_from_step on, the implicit fractions act only on the samples whose probe probability for the
    # concept reaches the bar.
    detector: str | tuple[str, ...] | None = None
    # that bar: a probability in [0, 1], or one per detector folder (in their order)
    detector_threshold: float | tuple[float, ...] = 0.5
    # With detector: the factor on S, from implicit_from_step on, for prompts naming the concept, on the samples
    # the detector flags (FamilyGate.named_late; None: 1, no change). Above 1 it escalates the removal there.
    named_late: float | None = None
    # With detector: the factor on S, from implicit_from_step on, for prompts the gate reads as naming a rival, on the
    # samples the detector flags (FamilyGate.rival_late; None: 0, such prompts are never steered). For a name of the
    # concept the matcher misreads as a rival's word.
    rival_late: float | None = None
    # With detector: ds.generate denoises every flagged sample again from its first latent with the late encoding
    # (implicit fraction, named_late) from this step on (FamilyGate.rewind; None: no rewind; below implicit_from_step)
    rewind: int | None = None
    # Per-position feature ablation (ours, steer.FeatureAblation): the concept's N text-SAE features (highest mean
    # activation on the concept prompts above the baseline prompts, or the empty prompt without baseline) are
    # taken out at every position of every prompt, times ablate_scale (None: off); with ablate_ceiling q, only what
    # exceeds the baseline prompts' q-quantile of each feature (ranked by that excess)
    ablate_features: int | None = None
    ablate_scale: float = 1.0
    ablate_ceiling: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "concept", _as_tuple(self.concept))
        object.__setattr__(self, "keep", _as_tuple(self.keep))
        if self.baseline is not None:
            object.__setattr__(self, "baseline", _as_tuple(self.baseline))
        object.__setattr__(self, "strength", float(self.strength))
        if not self.concept:
            raise ConfigError("SteeringConfig.concept is empty: give a prompt such as 'striped style'")
        _check_literals(self)
        object.__setattr__(self, "rivals", _words(self, "rivals"))
        object.__setattr__(self, "concept_words", _words(self, "concept_words"))
        if self.neutral is not None:
            object.__setattr__(self, "neutral", _words(self, "neutral"))
        object.__setattr__(self, "implicit", _finite(self, "implicit"))
        if self.implicit_negative is not None:
            object.__setattr__(self, "implicit_negative", _finite(self, "implicit_negative"))
        k = self.implicit_from_step
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ConfigError(f"SteeringConfig.implicit_from_step must be a non-negative whole number of denoising "
                              f"steps (0: every step), not {k!r}")
        object.__setattr__(self, "implicit_from_step", int(k))
        self._check_detectors()
        if self.named_late is not None:
            x = _finite(self, "named_late")
            if not x > 0.0:
                raise ConfigError(f"SteeringConfig.named_late must be a factor > 0 on S (e.g. 4 escalates the "
                                  f"removal), not {x!r}")
            object.__setattr__(self, "named_late", x)
        if self.rival_late is not None:
            x = _finite(self, "rival_late")
            if not x >= 0.0:
                raise ConfigError(f"SteeringConfig.rival_late must be a factor >= 0 on S (e.g. 2), not {x!r}")
            object.__setattr__(self, "rival_late", x)
        r = self.rewind
        if r is not None:
            if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
                raise ConfigError(f"SteeringConfig.rewind must be the denoising step the redo starts from (a whole "
                                  f"number >= 0) or None, not {r!r}")
            object.__setattr__(self, "rewind", int(r))
        n = self.ablate_features
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise ConfigError(f"SteeringConfig.ablate_features must be a number of SAE features >= 1 (e.g. 16) or None, "
                              f"not {n!r}")
        object.__setattr__(self, "ablate_scale", _finite(self, "ablate_scale"))
        if not self.ablate_scale > 0.0:
            raise ConfigError(f"SteeringConfig.ablate_scale must be > 0 (1 takes the features' reading out), "
                              f"not {self.ablate_scale!r}")
        if self.ablate_ceiling is not None:
            q = _finite(self, "ablate_ceiling")
            if not 0.0 <= q <= 1.0:
                raise ConfigError(f"SteeringConfig.ablate_ceiling must be a quantile in [0, 1] (e.g. 0.99), not {q!r}")
            object.__setattr__(self, "ablate_ceiling", q)
        for name, on in (("ablate_scale", self.ablate_scale != 1.0), ("ablate_ceiling", self.ablate_ceiling is not None)):
            if n is None and on:
                raise ConfigError(f"SteeringConfig.{name} only acts with ablate_features: give both or leave it out")
        if self.rivals:
            if self.gate is not None:
                raise ConfigError("SteeringConfig: gate and rivals are exclusive: the family gate (rivals) already "
                                  "steers only the prompts that name the concept; drop gate")
            if not self.concept_words:
                raise ConfigError("SteeringConfig.rivals needs concept_words: the words that name the concept, "
                                  "e.g. concept_words=('cat',)")
            if self.neutral is not None and self.match != "embedding":
                raise ConfigError("SteeringConfig.neutral only acts with match='embedding'")
            if self.detector is not None and self.implicit_from_step < 1:
                raise ConfigError("SteeringConfig.detector needs implicit_from_step >= 1 (later than the step its "
                                  "probe reads): the implicit fractions wait for the detector's verdict")
            if self.detector is None and self.detector_threshold != 0.5:
                raise ConfigError("SteeringConfig.detector_threshold only acts with detector (a saved ConceptProbe "
                                  "folder): give detector or leave it out")
            if self.detector is None and self.named_late is not None:
                raise ConfigError("SteeringConfig.named_late only acts with detector (a saved ConceptProbe folder) "
                                  "and implicit_from_step >= 1: give both or leave named_late out")
            if self.detector is None and self.rival_late is not None:
                raise ConfigError("SteeringConfig.rival_late only acts with detector (a saved ConceptProbe folder) "
                                  "and implicit_from_step >= 1: give both or leave rival_late out")
            if self.detector is None and self.rewind is not None:
                raise ConfigError("SteeringConfig.rewind redoes the samples a detector flagged: give detector (a saved "
                                  "ConceptProbe folder) or leave rewind out")
            if self.rewind is not None and self.rewind >= self.implicit_from_step:
                raise ConfigError(f"SteeringConfig.rewind={self.rewind} must be below implicit_from_step="
                                  f"{self.implicit_from_step}: the redo starts the late encoding earlier")
        else:
            unused = [n for n, on in (("concept_words", bool(self.concept_words)), ("implicit", self.implicit != 0.0),
                                      ("implicit_negative", self.implicit_negative is not None),
                                      ("implicit_from_step", self.implicit_from_step != 0),
                                      ("neutral", self.neutral is not None),
                                      ("detector", self.detector is not None),
                                      ("detector_threshold", self.detector_threshold != 0.5),
                                      ("named_late", self.named_late is not None),
                                      ("rival_late", self.rival_late is not None),
                                      ("rewind", self.rewind is not None)) if on]
            if unused:
                raise ConfigError(f"SteeringConfig.{unused[0]} only acts with rivals (the family gate): "
                                  "give rivals=('dog', ...) or leave it out")

    def _check_detectors(self) -> None:
        """detector: one folder (kept as its text, also when given as a list of one) or several (a tuple);
        detector_threshold: one probability (for every folder), or a tuple of them with one per folder."""
        det = self.detector
        fspath = lambda f: os.fspath(f) if isinstance(f, os.PathLike) else f  # noqa: E731
        if isinstance(det, (list, tuple)):
            if not det:
                raise ConfigError("SteeringConfig.detector is an empty list: give a saved ConceptProbe folder, "
                                  "several, or None")
            det = tuple(fspath(f) for f in det) if len(det) > 1 else fspath(det[0])
        else:
            det = fspath(det)
        bad = [f for f in (det if isinstance(det, tuple) else () if det is None else (det,))
               if not isinstance(f, str) or not f.strip()]
        if bad:
            raise ConfigError(f"SteeringConfig.detector must be the folder of a saved ConceptProbe (a path) or a "
                              f"list of them, not {bad[0]!r}")
        object.__setattr__(self, "detector", det)
        thr = self.detector_threshold
        if not isinstance(thr, (list, tuple)):
            object.__setattr__(self, "detector_threshold", _probability(self, "detector_threshold"))
            return
        ps = tuple(_probability(self, "detector_threshold", v) for v in thr)
        n = len(self.detector_folders)
        if not ps or (n and len(ps) != n):
            raise ConfigError(f"SteeringConfig.detector_threshold lists {len(ps)} threshold{'s' * (len(ps) != 1)} "
                              f"for {n} detector folders: give one number (for every folder) or one per folder, in "
                              "their order")
        object.__setattr__(self, "detector_threshold", ps if len(ps) > 1 else ps[0])

    @property
    def detector_folders(self) -> tuple[str, ...]:
        """The detector's folders as a tuple (empty without a detector)."""
        d = self.detector
        return () if d is None else d if isinstance(d, tuple) else (d,)

    def detector_settings(self) -> list[tuple[str, float]]:
        """(folder, threshold) of each detector, in order (a single threshold applies to every folder)."""
        folders, thr = self.detector_folders, self.detector_threshold
        return list(zip(folders, thr if isinstance(thr, tuple) else (thr,) * len(folders)))


@dataclass(frozen=True)
class SAeUronConfig(Config):
    """SAeUron (interventions/ablate.py: unlearn_concepts); field meanings as in ConceptEdit."""

    kind: ClassVar[str] = "saeuron"

    concepts: str | tuple[str, ...]                       # one concept or several (kept as a tuple)
    multiplier: float = -1.0                              # γ (ablate) or α (add)
    percentile: float | None = None
    top_n: int | None = None                              # None with no percentile: 1 feature per step
    scaling: Literal["mean", "latent"] = "mean"
    selection: Literal["paper", "specific"] = "paper"
    min_fire: int = 1
    exclusive: bool = False
    mode: Literal["ablate", "add"] = "ablate"
    faithful: bool = False
    window: tuple[int, int] | None = None                 # edit only at step indices start <= t < stop (ours)
    # replace: firing features -> the others' mean; replace_patch: that code decoded without the SAE error;
    # mean_patch: the firing patch -> the others' mean patch (all ours)
    edit: Literal["scale", "replace", "replace_patch", "mean_patch"] = "scale"

    def __post_init__(self):
        object.__setattr__(self, "concepts", _as_tuple(self.concepts))
        object.__setattr__(self, "multiplier", float(self.multiplier))
        if not self.concepts:
            raise ConfigError("SAeUronConfig.concepts is empty: name at least one concept of the dictionary")
        if not isinstance(self.min_fire, int) or isinstance(self.min_fire, bool) or self.min_fire < 1:
            raise ConfigError(f"SAeUronConfig.min_fire must be a positive integer, not {self.min_fire!r}")
        if self.window is not None:
            w = tuple(self.window) if isinstance(self.window, (list, tuple)) else ()
            if len(w) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in w) or not 0 <= w[0] < w[1]:
                raise ConfigError(f"SAeUronConfig.window must be two step indices [start, stop] with "
                                  f"0 <= start < stop, not {self.window!r}")
            object.__setattr__(self, "window", w)
        _check_literals(self)
        if self.edit != "scale" and (self.faithful or self.mode != "ablate"):
            raise ConfigError(f"SAeUronConfig.edit={self.edit!r} needs mode='ablate' and faithful=False "
                              "(the official path and 'add' scale features)")
