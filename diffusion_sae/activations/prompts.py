"""Prompt sources: a text file (one prompt per line) or a CSV with a prompt column (I2P style).

CSV columns `evaluation_seed` and `evaluation_guidance` give per-row seeds and guidance scales; rows
without them get `default_seed + row` and the run's guidance. A malformed file is one PromptFileError
naming the line.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from ..errors import DiffusionSAEError


class PromptFileError(DiffusionSAEError, ValueError):
    """A missing, unreadable or malformed prompt file (message names the line)."""


@dataclass
class PromptRow:
    prompt: str
    seed: int
    guidance: float | None = None  # None: use the run's guidance


@dataclass
class PromptSet:
    rows: list[PromptRow] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def hash(self) -> str:
        """Identifies the exact prompts, seeds and guidances (a store resumes only with the same set)."""
        payload = json.dumps([[r.prompt, r.seed, r.guidance] for r in self.rows], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_list(cls, prompts: list[str], seeds: list[int] | None = None, default_seed: int = 0) -> "PromptSet":
        seeds = seeds if seeds is not None else [default_seed + i for i in range(len(prompts))]
        return cls([PromptRow(p, int(s)) for p, s in zip(prompts, seeds)], source="<list>")


def _read_text(path: Path) -> str:
    if not path.exists():
        raise PromptFileError(f"prompt file {path} does not exist")
    if path.is_dir():
        raise PromptFileError(f"--prompts {path} is a folder; give a text file (one prompt a line) or a CSV file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PromptFileError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not valid UTF-8 text") from None


def load_prompts(path: str | Path, column: str = "prompt", default_seed: int = 0) -> PromptSet:
    """Read prompts from `path`: `.csv` (a `column` column, optional seeds/guidance) or plain text."""
    path = Path(path)
    text = _read_text(path)
    rows = _load_csv(path, text, column, default_seed) if path.suffix.lower() == ".csv" else _load_txt(path, text, default_seed)
    if not rows:
        raise PromptFileError(f"{path}: no prompts found")
    return PromptSet(rows, source=str(path))


def _load_txt(path: Path, text: str, default_seed: int) -> list[PromptRow]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if "\x00" in line:
            raise PromptFileError(f"{path}:{lineno}: contains a NUL byte (binary file?)")
        p = line.strip()
        if p:  # blank lines separate nothing and are skipped
            rows.append(PromptRow(p, default_seed + len(rows)))
    return rows


def _load_csv(path: Path, text: str, column: str, default_seed: int) -> list[PromptRow]:
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise PromptFileError(f"{path}:1: malformed CSV header ({e})") from None
    header = [h.strip() for h in header]
    if column not in header:
        raise PromptFileError(f"{path}:1: no column {column!r} (columns: {', '.join(header)})")
    ci, si = header.index(column), header.index("evaluation_seed") if "evaluation_seed" in header else None
    gi = header.index("evaluation_guidance") if "evaluation_guidance" in header else None
    rows: list[PromptRow] = []
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise PromptFileError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        line = reader.line_num
        if not rec or all(not c.strip() for c in rec):
            continue
        if len(rec) != len(header):
            raise PromptFileError(f"{path}:{line}: {len(rec)} fields, the header has {len(header)}")
        prompt = rec[ci].strip()
        if not prompt:
            raise PromptFileError(f"{path}:{line}: empty {column!r}")
        seed = default_seed + len(rows)
        if si is not None and rec[si].strip():
            try:
                seed = int(float(rec[si]))
            except ValueError:
                raise PromptFileError(f"{path}:{line}: evaluation_seed {rec[si]!r} is not an integer") from None
        guidance = None
        if gi is not None and rec[gi].strip():
            try:
                guidance = float(rec[gi])
            except ValueError:
                raise PromptFileError(f"{path}:{line}: evaluation_guidance {rec[gi]!r} is not a number") from None
        rows.append(PromptRow(prompt, seed, guidance))
    return rows
