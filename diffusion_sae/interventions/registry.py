"""Interventions by name, so that a new one needs one file.

A module in this package (or in any package that declares a `diffusion_sae.interventions` entry point)
registers its intervention once:

    register_intervention("scale", FeatureScalingConfig, lambda sae, config, ctx: FeatureScaling(sae, config),
                          sae="block", summary="multiply chosen SAE features by a factor")

and every front end finds it here: `diffusion-sae intervene --method scale --set features=12:0`, the
web UI's "registered intervention" row, `eval shapes --method scale ...` and `eval attack --method ...`.
The settings are the fields of the config dataclass (configs.py); front ends pass them as text
(`key=value`) and `make_config` turns them into the typed config, so a new field needs no front-end edit.

Lookup imports every module of this package on first use (the registrations run at import), which
keeps `--help` and `import diffusion_sae` free of torch.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from ..errors import DiffusionSAEError


class RegistryError(DiffusionSAEError, ValueError):
    """An unknown intervention name or a setting it does not have (one line)."""


@dataclass(frozen=True)
class BuildContext:
    """What a factory may need beyond the SAE and its config: the SAE's folder (for files stored beside
    it, e.g. SAeUron's concept dictionaries)."""

    sae_folder: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InterventionSpec:
    name: str
    config: type                                    # a frozen Config dataclass: its fields are the settings
    factory: Callable[[Any, Any, BuildContext], Any]  # (sae, config, context) -> Intervention
    sae: Literal["text", "block"] = "block"         # which SAE a front end loads when the user names none
    summary: str = ""

    def settings_help(self) -> str:
        hints = typing.get_type_hints(self.config)
        parts = []
        for f in dataclasses.fields(self.config):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            parts.append(f"{f.name}: {_type_name(hints[f.name])}{' (required)' if required else ''}")
        return "; ".join(parts)


_REGISTRY: dict[str, InterventionSpec] = {}
_DISCOVERED = False
ENTRY_POINT_GROUP = "diffusion_sae.interventions"


def register_intervention(name: str, config: type, factory: Callable, *, sae: str = "block",
                          summary: str = "") -> InterventionSpec:
    """Make an intervention reachable by name from the CLI, the UI and the benchmarks."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register_intervention({name!r}): config must be a dataclass, not {config!r}")
    if sae not in ("text", "block"):
        raise ValueError(f"register_intervention({name!r}): sae must be 'text' or 'block', not {sae!r}")
    old = _REGISTRY.get(name)
    if old is not None and old.config.__module__ != config.__module__:
        # A second module claiming the name is a mistake; the same module imported again (a reload) is not.
        raise ValueError(f"an intervention named {name!r} is registered already (by {old.config.__module__})")
    spec = InterventionSpec(name, config, factory, sae, summary)
    _REGISTRY[name] = spec
    return spec


def _discover() -> None:
    """Import every module of this package and every entry point of the group once (their
    register_intervention calls run at import)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = __name__.rpartition(".")[0]
    for m in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{m.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def intervention_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_intervention(name: str) -> InterventionSpec:
    _discover()
    if name not in _REGISTRY:
        raise RegistryError(f"no intervention named {name!r}; registered: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------------
# settings as text -> typed config
# ---------------------------------------------------------------------------------------------
def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _strip_optional(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _parse_scalar(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_value(text: str, hint) -> Any:
    """One setting's text as the field's type: JSON when it parses (`3`, `[0, 10]`, `{"12": 0}`, `null`),
    else for tuples `a,b,c` and for dicts `key:value,key:value`, else the text itself."""
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    hint = _strip_optional(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):   # e.g. str | tuple[str, ...]: the richest member decides
        members = {typing.get_origin(a) for a in typing.get_args(hint)}
        origin = dict if dict in members else tuple if tuple in members else None
    try:
        value = json.loads(text)
        if not isinstance(value, str):
            return value
    except ValueError:
        pass
    if origin is dict:
        out = {}
        for part in (p for p in text.split(",") if p.strip()):
            k, sep, v = part.partition(":")
            if not sep:
                raise RegistryError(f"{text!r}: write key:value pairs separated by commas, e.g. 12:0,873:3")
            out[_parse_scalar(k.strip())] = _parse_scalar(v.strip())
        return out
    if origin is tuple:
        return tuple(_parse_scalar(p.strip()) for p in text.split(",") if p.strip())
    if hint is bool and text.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return text.lower() in ("true", "yes", "on", "1")
    return text


def parse_settings(spec: InterventionSpec, pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings (the CLI's repeated --set, the UI's settings box split at ';' or newlines)
    as a dict of typed values."""
    hints = typing.get_type_hints(spec.config)
    names = [f.name for f in dataclasses.fields(spec.config)]
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RegistryError(f"setting {pair!r}: write key=value ({spec.name} settings: {spec.settings_help()})")
        if key not in names:
            raise RegistryError(f"{spec.name} has no setting {key!r}; settings: {spec.settings_help()}")
        out[key] = parse_value(value, hints[key])
    return out


def split_settings(text: str) -> list[str]:
    """The UI's settings box: `key=value` pairs separated by ';' or new lines."""
    return [p.strip() for line in (text or "").splitlines() for p in line.split(";") if p.strip()]


def make_config(spec: InterventionSpec, settings: Mapping[str, Any] | Sequence[str]):
    """The typed config of `spec` from a dict of values or `key=value` strings."""
    values = parse_settings(spec, settings) if not isinstance(settings, Mapping) else dict(settings)
    names = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RegistryError(f"{spec.name} has no setting {unknown[0]!r}; settings: {spec.settings_help()}")
    missing = [f.name for f in dataclasses.fields(spec.config) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RegistryError(f"{spec.name} needs the setting {missing[0]!r}; settings: {spec.settings_help()}")
    return spec.config(**values)


def build_intervention(name: str, sae, settings: Mapping[str, Any] | Sequence[str] = (),
                       context: BuildContext | None = None):
    """The registered intervention `name` on `sae` with these settings, ready for `ds.apply` / `ds.intervene`."""
    spec = get_intervention(name)
    return spec.factory(sae, make_config(spec, settings), context or BuildContext())


# ---------------------------------------------------------------------------------------------
# the two papers' methods (their modules stay as they are: registered from here)
# ---------------------------------------------------------------------------------------------
def _steering(sae, config, context: BuildContext):
    from .api import ConceptSteering

    return ConceptSteering(sae, config)


def _saeuron(sae, config, context: BuildContext):
    """SAeUron with the concept dictionary stored beside the SAE that holds every concept asked for
    (`concept_dictionary*.json`, e.g. one file per concept kind)."""
    from ..concepts.dictionary import ConceptDictionary
    from .api import SAeUron

    folder = context.sae_folder
    if folder is None:
        raise RegistryError("saeuron needs the SAE's folder: its concept dictionaries are stored there")
    for j in sorted(Path(folder).glob("concept_dictionary*.json")):
        if not j.with_suffix(".safetensors").exists():
            continue
        d = ConceptDictionary.load(folder, name=j.stem)
        if all(c in d.concepts for c in config.concepts):
            return SAeUron(sae, d, config)
    raise RegistryError(f"no concept dictionary in {folder} holds {', '.join(config.concepts)}; "
                        "build one with `diffusion-sae concepts build`")


def _register_builtin() -> None:
    from ..configs import SAeUronConfig, SteeringConfig

    register_intervention("steer", SteeringConfig, _steering, sae="text",
                          summary="Concept Steerers: add (strength > 0) or remove (< 0) a concept at a text-encoder layer")
    register_intervention("saeuron", SAeUronConfig, _saeuron, sae="block",
                          summary="SAeUron: unlearn concepts of the dictionary beside the block SAE")


_register_builtin()
