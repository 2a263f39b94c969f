"""diffusion-sae: sparse autoencoders for text-to-image diffusion pipelines.

    import diffusion_sae as ds

    sae = ds.load_sae("path/to/sae")                       # a folder (or hub id) holding one SAE
    with ds.intervene(pipe, ds.ConceptSteering(sae, concept="striped style", strength=-2.0)):
        images = pipe(prompt).images

Names are resolved on first use (PEP 562 module `__getattr__`), so `import diffusion_sae` loads
neither torch nor diffusers, and each name imports only the module it lives in.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> "module:attribute" (or "module" for a module)
_EXPORTS = {
    # SAEs, activations, training, concepts
    "load_sae": "diffusion_sae.sae.io:load_sae",
    "TopKSAE": "diffusion_sae.sae.model:TopKSAE",
    "collect": "diffusion_sae.activations.collect:collect",
    "CollectConfig": "diffusion_sae.activations.collect:CollectConfig",
    "Trainer": "diffusion_sae.sae.train:SAETrainer",
    "TrainConfig": "diffusion_sae.sae.train:TrainConfig",
    "build_concept_dictionary": "diffusion_sae.concepts.dictionary:build_concept_dictionary",
    "ConceptDictionary": "diffusion_sae.concepts.dictionary:ConceptDictionary",
    "ConceptProbe": "diffusion_sae.concepts.probe:ConceptProbe",
    "fit_concept_probe": "diffusion_sae.concepts.probe:fit_concept_probe",
    "fit_probe_on_activations": "diffusion_sae.concepts.probe:fit_probe_on_activations",
    # interventions
    "ConceptSteering": "diffusion_sae.interventions.api:ConceptSteering",
    "SAeUron": "diffusion_sae.interventions.api:SAeUron",
    "FeatureScaling": "diffusion_sae.interventions.scale:FeatureScaling",
    "FeatureScalingConfig": "diffusion_sae.interventions.scale:FeatureScalingConfig",
    "SteeringConfig": "diffusion_sae.configs:SteeringConfig",
    "SAeUronConfig": "diffusion_sae.configs:SAeUronConfig",
    "apply": "diffusion_sae.interventions.api:apply",
    "generate": "diffusion_sae.interventions.rewind:generate",
    "remove": "diffusion_sae.interventions.api:remove",
    "intervene": "diffusion_sae.interventions.api:intervene",
    "applied": "diffusion_sae.interventions.api:applied",
    "register_intervention": "diffusion_sae.interventions.registry:register_intervention",
    "build_intervention": "diffusion_sae.interventions.registry:build_intervention",
    "intervention_names": "diffusion_sae.interventions.registry:intervention_names",
    # evaluation: every concept, both methods, on the bundled ShapesCanvas benchmark
    "evaluate": "diffusion_sae.eval.shapes:run_shapes_benchmark",
    # the bundled ShapesCanvas model (a tiny StableDiffusionPipeline), its judge and its shipped SAEs
    "load_shapescanvas": "diffusion_sae.world.assets:load_pipeline",
    "load_shapescanvas_classifier": "diffusion_sae.world.assets:load_classifier",
    "shapescanvas_sae_dir": "diffusion_sae.world.assets:sae_dir",
    "SHAPESCANVAS_STYLES": "diffusion_sae.world.config:STYLES",       # the judge's style labels, by index
    "SHAPESCANVAS_OBJECTS": "diffusion_sae.world.config:OBJECTS",
    "SHAPESCANVAS_COLOURS": "diffusion_sae.world.config:COLOUR_NAMES",
    "DiffusionSAEError": "diffusion_sae.errors:DiffusionSAEError",
}

if TYPE_CHECKING:
    # The same names for static checkers and IDEs (mypy, pyright): at run time they resolve lazily through
    # `__getattr__` below. tests/test_typing.py checks that this block and _EXPORTS agree.
    from .sae.io import load_sae as load_sae
    from .sae.model import TopKSAE as TopKSAE
    from .activations.collect import collect as collect
    from .activations.collect import CollectConfig as CollectConfig
    from .sae.train import SAETrainer as Trainer  # noqa: F401 (re-exported: __all__ is built from _EXPORTS)
    from .sae.train import TrainConfig as TrainConfig
    from .concepts.dictionary import build_concept_dictionary as build_concept_dictionary
    from .concepts.dictionary import ConceptDictionary as ConceptDictionary
    from .concepts.probe import ConceptProbe as ConceptProbe
    from .concepts.probe import fit_concept_probe as fit_concept_probe
    from .concepts.probe import fit_probe_on_activations as fit_probe_on_activations
    from .interventions.api import ConceptSteering as ConceptSteering
    from .interventions.api import SAeUron as SAeUron
    from .interventions.scale import FeatureScaling as FeatureScaling
    from .interventions.scale import FeatureScalingConfig as FeatureScalingConfig
    from .configs import SteeringConfig as SteeringConfig
    from .configs import SAeUronConfig as SAeUronConfig
    from .interventions.api import apply as apply
    from .interventions.rewind import generate as generate
    from .interventions.api import remove as remove
    from .interventions.api import intervene as intervene
    from .interventions.api import applied as applied
    from .interventions.registry import register_intervention as register_intervention
    from .interventions.registry import build_intervention as build_intervention
    from .interventions.registry import intervention_names as intervention_names
    from .eval.shapes import run_shapes_benchmark as evaluate  # noqa: F401 (re-exported: __all__ is built from _EXPORTS)
    from .world.assets import load_pipeline as load_shapescanvas  # noqa: F401 (re-exported: __all__ is built from _EXPORTS)
    from .world.assets import load_classifier as load_shapescanvas_classifier  # noqa: F401 (re-exported: __all__ is built from _EXPORTS)
    from .world.assets import sae_dir as shapescanvas_sae_dir  # noqa: F401 (re-exported: __all__ is built from _EXPORTS)
    from .world.config import STYLES as SHAPESCANVAS_STYLES  # noqa: F401 (re-exported: __all__ is built from _EXPORTS)
    from .world.config import OBJECTS as SHAPESCANVAS_OBJECTS  # noqa: F401 (re-exported: __all__ is built from _EXPORTS)
    from .world.config import COLOUR_NAMES as SHAPESCANVAS_COLOURS  # noqa: F401 (re-exported: __all__ is built from _EXPORTS)
    from .errors import DiffusionSAEError as DiffusionSAEError

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'diffusion_sae' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    value = importlib.import_module(module_name)
    if attr:
        value = getattr(value, attr)
    globals()[name] = value      # cached: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
