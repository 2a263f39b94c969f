"""Intervention objects and the three verbs that put them on a pipeline: apply, remove, intervene.

An intervention holds its SAE(s) and a typed config (configs.py) and knows how to open its edit
on a pipeline as a context manager (the implementations in steer.py and ablate.py). `apply`
opens it and keeps it open under a name until `remove(pipe, name)`; `intervene` is the scoped
form and removes everything it applied on exit, also when the pipeline call raises.

    import diffusion_sae as ds
    with ds.intervene(pipe, ds.ConceptSteering(sae, concept="striped style", strength=-2.0)):
        images = pipe(prompt).images
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import ContextManager

from ..configs import SAeUronConfig, SteeringConfig
from ..errors import DiffusionSAEError


class InterventionError(DiffusionSAEError, ValueError):
    """An intervention name applied twice, or removed without being applied."""


class Intervention:
    """Base: a named edit of a pipeline. Subclasses implement `context(pipe)`."""

    name: str

    def context(self, pipe) -> ContextManager:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={getattr(self, 'config', None)!r})"


def _config(cls, config, fields: dict):
    if config is not None and fields:
        raise TypeError(f"give either a {cls.__name__} or its fields, not both")
    return config if config is not None else cls(**fields)


class ConceptSteering(Intervention):
    """Concept Steerers on a text-encoder layer (arXiv 2501.19066), see interventions/steer.py.

    `ConceptSteering(sae, concept="striped style", strength=-2.0)` or
    `ConceptSteering(sae, SteeringConfig(...))`. The steering matrix is built from the pipeline's own
    text encoder on first use and kept for that pipeline.
    """

    def __init__(self, sae, config: SteeringConfig | None = None, *, name: str | None = None, **fields):
        self.sae = sae
        self.config = _config(SteeringConfig, config, fields)
        self.name = name or f"steering:{self.config.concept[0]}"
        self._built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def hookpoint(self) -> str:
        hp = self.config.hookpoint or getattr(self.sae.cfg, "hookpoint", None)
        if not hp:
            raise InterventionError("the SAE has no hookpoint in its cfg.json: set SteeringConfig.hookpoint")
        return hp

    def detector(self):
        """The per-sample detector of SteeringConfig.detector (None without one): each saved ConceptProbe's verdict
        for the first of `concept_words` that is one of its concepts, at its threshold; several folders give a
        tuple (a sample any of them flags is flagged)."""
        from ..concepts.probe import ConceptProbe

        c = self.config
        dets = []
        for folder, threshold in c.detector_settings():
            probe = ConceptProbe.from_pretrained(folder)
            word = next((w for w in c.concept_words if w in probe.concepts), None)
            if word is None:
                raise InterventionError(f"the probe at {folder} was fitted on {', '.join(probe.concepts)}, none of "
                                        f"concept_words ({', '.join(c.concept_words)}); give a probe fitted on the "
                                        "concept, or name it as the probe does in concept_words")
            dets.append(probe.detector(word, threshold))
        return None if not dets else dets[0] if len(dets) == 1 else tuple(dets)

    def steering(self, pipe):
        """The Steering (matrix S) for this pipeline, built once per pipeline; with `rivals`, its FamilyGate
        (steer.family_gate) decides per prompt how much of S applies (and with `detector`, per sample; with
        `named_late`, how much on the flagged samples of prompts naming the concept from implicit_from_step on;
        with `rival_late`, how much on the flagged samples of prompts read as naming a rival; with `rewind`,
        ds.generate redoes the flagged samples)."""
        from .steer import concept_feature_ablation, concept_steering, family_gate

        if pipe not in self._built:
            c = self.config
            detector = self.detector()      # a bad probe folder fails before S is built
            concept = c.concept[0] if len(c.concept) == 1 else list(c.concept)
            baseline = None if c.baseline is None else c.baseline[0] if len(c.baseline) == 1 else list(c.baseline)
            st = concept_steering(self.sae, pipe, self.hookpoint, concept, c.strength,
                                  baseline=baseline, gate=c.gate, keep=list(c.keep) or None)
            if c.rivals:
                st.rows = family_gate(pipe, self.hookpoint, list(c.concept_words), list(c.rivals), c.implicit,
                                      c.implicit_negative, match=c.match,
                                      neutral_words=None if c.neutral is None else list(c.neutral),
                                      implicit_from_step=c.implicit_from_step, detector=detector,
                                      named_late=1.0 if c.named_late is None else c.named_late,
                                      rewind=c.rewind is not None, rewind_from_step=c.rewind or 0,
                                      rival_late=c.rival_late or 0.0)
            if c.ablate_features is not None:
                st.ablation = concept_feature_ablation(self.sae, pipe, self.hookpoint, list(c.concept),
                                                       list(c.baseline) if c.baseline else [""],
                                                       c.ablate_features, c.ablate_scale, c.ablate_ceiling)
            self._built[pipe] = st
        return self._built[pipe]

    def context(self, pipe) -> ContextManager:
        from .steer import steer_text_encoder

        return steer_text_encoder(pipe, self.steering(pipe), negative_steering=self.config.negative_steering,
                                  faithful=self.config.faithful)


class SAeUron(Intervention):
    """SAeUron unlearning on denoiser block(s) (arXiv 2501.18052), see interventions/ablate.py.

    `SAeUron(sae, dictionary, concepts=["star"], multiplier=-10, top_n=2)`; lists of SAEs and
    dictionaries (one per block) edit several blocks at once.
    """

    def __init__(self, sae, dictionary, config: SAeUronConfig | None = None, *, name: str | None = None, **fields):
        self.sae, self.dictionary = sae, dictionary
        self.config = _config(SAeUronConfig, config, fields)
        self.name = name or f"saeuron:{'+'.join(self.config.concepts)}"

    def context(self, pipe) -> ContextManager:
        from .ablate import unlearn_concepts

        c = dataclasses.asdict(self.config)
        concepts = list(c.pop("concepts"))
        return unlearn_concepts(pipe, self.sae, self.dictionary, concepts, **c)


# The interventions open on each pipeline, by name, in the order they were applied. Weak keys: a
# pipeline that is dropped takes its entries with it.
_OPEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def applied(pipe) -> list[str]:
    """Names of the interventions applied to `pipe`, oldest first."""
    return list(_OPEN.get(pipe, {}))


def apply(pipe, *interventions: Intervention) -> list[str]:
    """Open each intervention on `pipe` until `remove(pipe, name)`; returns their names.

    All or nothing: if one fails to apply, the ones applied by this call are removed again.
    """
    table = _OPEN.setdefault(pipe, {})
    names = [iv.name for iv in interventions]
    clash = [n for n in names if n in table] or [n for i, n in enumerate(names) if n in names[:i]]
    if clash:
        raise InterventionError(f"an intervention named {clash[0]!r} is already applied: remove it first "
                                "or give the new one another name=")
    done: list[str] = []
    try:
        for iv in interventions:
            stack = contextlib.ExitStack()
            with stack:                       # closed at once if entering raises; popped when it succeeds
                stack.enter_context(iv.context(pipe))
                table[iv.name] = stack.pop_all()
            done.append(iv.name)
    except BaseException:
        for n in reversed(done):
            remove(pipe, n)
        raise
    return names


def remove(pipe, name: str | None = None) -> list[str]:
    """Remove the intervention `name` from `pipe` (None: every one, newest first); returns the names removed."""
    table = _OPEN.get(pipe, {})
    if name is None:
        names = list(reversed(table))
    elif name in table:
        names = [name]
    else:
        known = ", ".join(table) or "none"
        raise InterventionError(f"no intervention named {name!r} is applied to this pipeline (applied: {known})")
    for n in names:
        table.pop(n).close()
    return names


@contextlib.contextmanager
def intervene(pipe, *interventions: Intervention):
    """Within the block, `pipe(...)` runs with the interventions; they are removed on exit, also on errors."""
    names = apply(pipe, *interventions)
    try:
        yield pipe
    finally:
        errors = []
        for n in reversed(names):
            try:
                remove(pipe, n)
            except Exception as e:  # keep removing the others; report the first failure afterwards
                errors.append(e)
        if errors:
            raise errors[0]
