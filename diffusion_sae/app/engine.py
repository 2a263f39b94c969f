"""What the web UI does, without the UI: generate with edits, explore features, export.

An edit is (target, method, strength). Targets are concept names (any phrase for text steering) or
a block-SAE feature written `#12`. Strength λ: < 0 removes, > 0 adds, 0 leaves the image alone.

  text steering  + concept  Concept Steerers, S = λ · W_dec ReLU(W_enc(H_c − b_dec) + b_enc)
  block ablation + concept  SAeUron: λ < 0 ablates with γ = λ, λ > 0 adds with α = λ
  block ablation + #j       feature j rescaled where it fires: z_j ← (1 + λ) z_j (λ = −1 switches it off)

Every pipeline call holds one lock: hooks on a shared pipeline must not interleave.
"""
from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..concepts.features import ConceptIndex, FeatureError, collect_feature_stats
from ..models import register_edit, resolve_hookpoint
from .paths import PathError, resolve_inside
from ..errors import DiffusionSAEError

METHODS = ("text steering", "block ablation")
_FEATURE = re.compile(r"^(?:#|feature\s*#?)\s*(\d+)$", re.IGNORECASE)


class EditError(DiffusionSAEError, ValueError):
    """A bad edit row; one line."""


@dataclass
class Edit:
    target: str
    method: str
    strength: float

    @property
    def feature(self) -> int | None:
        m = _FEATURE.match(self.target.strip())
        return int(m.group(1)) if m else None


@contextlib.contextmanager
def scale_block_features(pipe, sae, hookpoint: str, factors: dict[int, float]):
    """Within the block, the block's output has feature j's activation multiplied by factors[j].

    Only the change is decoded and added (x + W_dec Δz), so the SAE's reconstruction error stays in
    (interventions/scale.py, the same edit as `ds.FeatureScaling`).
    """
    from ..interventions.scale import scale_features_edit

    hp = resolve_hookpoint(pipe, hookpoint)
    handle = register_edit(hp, scale_features_edit(sae, factors), "diffusion_sae.scale_features")
    try:
        yield
    finally:
        handle.remove()


def find_dictionaries(folder: Path) -> dict[str, object]:
    """Every concept dictionary stored next to a block SAE, keyed by kind (the stem after concept_dictionary_)."""
    from ..concepts.dictionary import ConceptDictionary

    out = {}
    for j in sorted(Path(folder).glob("concept_dictionary*.json")):
        if j.with_suffix(".safetensors").exists():
            kind = j.stem.removeprefix("concept_dictionary").lstrip("_") or "concepts"
            out[kind] = ConceptDictionary.load(folder, name=j.stem)
    return out


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] -> uint8 [B, H, W, 3]."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Engine:
    def __init__(self, pipe, block_sae, text_sae=None, dictionaries: dict | None = None,
                 roots: list[Path] | None = None, block_folder: Path | None = None,
                 stats_prompts: list[str] | None = None, stats_seeds: list[int] | None = None,
                 stats_steps: int = 25, guidance: float = 5.0, default_steps: int = 25):
        self.pipe, self.block_sae, self.text_sae = pipe, block_sae, text_sae
        self.block_hookpoint = block_sae.cfg.hookpoint
        self.text_hookpoint = text_sae.cfg.hookpoint if text_sae is not None else None
        self.block_folder = Path(block_folder) if block_folder else None
        self.dictionaries = dict(dictionaries or {})
        self.roots = [Path(r) for r in (roots or [])]
        self.guidance, self.default_steps = guidance, default_steps
        # The prompts whose generations give the feature statistics (None: feature cards are unavailable;
        # app/shapescanvas.py passes the bundled model's concept prompts).
        self.stats_prompts, self.stats_seeds, self.stats_steps = stats_prompts, stats_seeds, stats_steps
        self._lock = threading.RLock()
        self._stats = None
        self._index = None
        self._originals: dict = {}

    @classmethod
    def from_folders(cls, pipe, block_sae: Path, text_sae: Path | None = None,
                     model_dir: Path | None = None, **kw) -> "Engine":
        """The SAEs in these folders; dictionaries are read from the block SAE's folder (for the bundled
        model's folders see app/shapescanvas.py)."""
        from ..sae import load_sae

        bfolder = Path(block_sae)
        tfolder = Path(text_sae) if text_sae else None
        bsae = load_sae(bfolder)
        tsae = load_sae(tfolder) if tfolder else None
        roots = [f if f.is_dir() else f.parent for f in (bfolder, tfolder) if f is not None]
        roots += [Path(model_dir)] if model_dir and Path(model_dir).is_dir() else []
        return cls(pipe, bsae, tsae, find_dictionaries(roots[0]), roots=roots, block_folder=roots[0], **kw)

    # --- concept dictionaries (names typed in the UI resolve inside the SAE folders only) -----------
    def concept_names(self) -> list[str]:
        return [c for d in self.dictionaries.values() for c in d.concepts]

    def use_dictionaries(self, spec: str) -> list[str]:
        """'all' or comma-separated dictionary file stems inside the configured folders."""
        from ..concepts.dictionary import ConceptDictionary

        names = [s.strip() for s in (spec or "all").split(",") if s.strip()]
        if names in ([], ["all"]):
            chosen = find_dictionaries(self.block_folder) if self.block_folder else self.dictionaries
        else:
            chosen = {}
            for n in names:
                p = resolve_inside(self.roots, n, ".json")
                chosen[p.stem.removeprefix("concept_dictionary").lstrip("_") or p.stem] = \
                    ConceptDictionary.load(p.parent, name=p.stem)
        with self._lock:
            self.dictionaries = chosen
            self._index = None
        return list(chosen)

    def index(self) -> ConceptIndex:
        with self._lock:
            if self._index is None:
                self._index = ConceptIndex(self.dictionaries)
            return self._index

    def _dictionary_of(self, concept: str):
        hits = [d for d in self.dictionaries.values() if concept in d.concepts]
        if not hits:
            known = ", ".join(self.concept_names()[:12])
            raise EditError(f"block ablation needs a concept from the dictionaries ({known}) or a feature #N; "
                            f"{concept!r} is neither")
        return hits[0]

    # --- generation --------------------------------------------------------------------------------
    def _check(self, edits: list[Edit]) -> list[Edit]:
        live = []
        for e in edits:
            if not e.target.strip() or float(e.strength) == 0.0:
                continue
            if e.method not in METHODS:
                raise EditError(f"method must be one of {', '.join(METHODS)}, not {e.method!r}")
            if e.feature is not None and e.method != "block ablation":
                raise EditError(f"{e.target!r} is a block-SAE feature: choose the method 'block ablation'")
            if e.feature is not None and not 0 <= e.feature < self.block_sae.cfg.num_latents:
                raise EditError(f"feature {e.feature} is out of range: the block SAE has features "
                                f"0..{self.block_sae.cfg.num_latents - 1}")
            if e.method == "text steering" and self.text_sae is None:
                raise EditError("no text SAE configured: start the UI with --text-sae FOLDER for text steering")
            live.append(e)
        return live

    def _edit_context(self, stack: contextlib.ExitStack, edits: list[Edit]) -> None:
        from ..interventions.ablate import ConceptEdit, unlearn_concepts
        from ..interventions.steer import concept_steering, steer_text_encoder

        steer = [concept_steering(self.text_sae, self.pipe, self.text_hookpoint, e.target.strip(), e.strength)
                 for e in edits if e.method == "text steering"]
        if steer:
            stack.enter_context(steer_text_encoder(self.pipe, steer))
        factors = {e.feature: 1.0 + e.strength for e in edits if e.feature is not None}
        if factors:
            stack.enter_context(scale_block_features(self.pipe, self.block_sae, self.block_hookpoint, factors))
        # One SAeUron hook per (dictionary, direction): each concept keeps its own γ / α.
        groups: dict = {}
        for e in edits:
            if e.method == "block ablation" and e.feature is None:
                d = self._dictionary_of(e.target.strip())
                mode = "ablate" if e.strength < 0 else "add"
                groups.setdefault((id(d), mode), (d, mode, []))[2].append(
                    ConceptEdit(e.target.strip(), multiplier=float(e.strength), top_n=1))
        for d, mode, ces in groups.values():
            stack.enter_context(unlearn_concepts(self.pipe, self.block_sae, d, ces, mode=mode))

    def registered(self, name: str, settings: str = ""):
        """A registered intervention (interventions/registry.py) on this engine's SAEs — the text SAE for a
        method registered with sae="text", else the block SAE (whose folder holds the dictionaries) — with
        settings written `key=value`, separated by ';' or new lines."""
        from ..interventions.registry import BuildContext, get_intervention, make_config, split_settings

        spec = get_intervention(name.strip())
        if spec.sae == "text" and self.text_sae is None:
            raise EditError(f"{spec.name} needs a text SAE: start the UI with --text-sae FOLDER")
        sae = self.text_sae if spec.sae == "text" else self.block_sae
        return spec.factory(sae, make_config(spec, split_settings(settings)), BuildContext(sae_folder=self.block_folder))

    def _run(self, prompt: str, seed: int, steps: int) -> np.ndarray:
        out = self.pipe(prompt, num_inference_steps=steps, guidance_scale=self.guidance,
                        generator=torch.Generator().manual_seed(seed), output_type="pt")
        return to_pixels(out.images)[0]

    def generate(self, prompt: str, seed: int, steps: int, edits: list[Edit],
                 registered: list[tuple[str, str]] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(original, edited) uint8 images for one prompt and seed; `registered`: (name, settings) of
        registered interventions applied on top of the edits (see `registered`)."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise EditError("the prompt is empty")
        seed, steps = int(seed), int(steps)
        if not 1 <= steps <= 200:
            raise EditError(f"steps must be between 1 and 200, got {steps}")
        live = self._check(edits)
        extra = [self.registered(n, st) for n, st in registered if n and n.strip()]   # built before any image
        with self._lock:
            key = (prompt, seed, steps)
            if key not in self._originals:
                self._originals = {key: self._run(prompt, seed, steps)}   # keep one: the current prompt
            original = self._originals[key]
            if not live and not extra:
                return original, original
            with contextlib.ExitStack() as stack:
                self._edit_context(stack, live)
                if extra:
                    from ..interventions.api import intervene

                    stack.enter_context(intervene(self.pipe, *extra))
                edited = self._run(prompt, seed, steps)
        return original, edited

    # --- features ----------------------------------------------------------------------------------
    def stats(self, progress=None):
        """Feature statistics of the block SAE on the configured prompt set (computed once, on first use)."""
        with self._lock:
            if self._stats is None:
                self._stats = collect_feature_stats(self.pipe, self.block_sae, self.block_hookpoint,
                                                    self.stats_prompts, self.stats_seeds, steps=self.stats_steps,
                                                    guidance=self.guidance, progress=progress)
            return self._stats

    def check_feature(self, f) -> int:
        from ..concepts.features import _check_index

        return _check_index(f, self.block_sae.cfg.num_latents)

    def feature_card(self, f, progress=None) -> str:
        from .render import feature_card

        self.check_feature(f)
        stats = self.stats(progress)
        index = self.index() if self.dictionaries else None
        return feature_card(stats.check(f), stats, index)

    def search(self, query: str) -> str:
        from .render import search_results

        concept, hits = self.index().search(query)
        return search_results(concept, hits)


ERRORS = (EditError, FeatureError, PathError, ValueError, RuntimeError)
