"""On-disk activation store: safetensors shards plus a JSON manifest, one store per hookpoint.

Layout of a store folder:
    manifest.json            header (model, hookpoint, width, dtype, prompts hash, steps, ...) + shards + counts
    parts/rank-NNN.json      shards committed by process NNN not yet merged into manifest.json
    shard-rNNN-SSSSSS.safetensors
        tokens   [n_tokens, d]        activations (float32 or float16)
        meta     [n_records, 6] int64 prompt_index, image_index, step_index, branch code, grid_h, grid_w
        timestep [n_records] float64
        offsets  [n_records + 1] int64 token range of each record
        positions [n_tokens] int32    (only with tokens_per_record) which token of the record each row is

A record is one image's (or prompt's) tokens at one hookpoint, step and branch. Every write goes to a
temporary file, is fsynced and renamed, and a shard counts only once a manifest names it; so a store
killed at any moment reads as the prompts committed so far, and `collect` redoes the rest. Prompts are
committed whole: all records of a prompt live in one shard.
"""
from __future__ import annotations

import errno
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from ..errors import DiffusionSAEError

FORMAT = "diffusion-sae-activations/1"
BRANCH_CODES = {"cond": 0, "uncond": 1, "cond_skip": 2, "unknown": 3}
BRANCH_NAMES = {v: k for k, v in BRANCH_CODES.items()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Header keys that must agree for a collection to resume into an existing store.
_RESUME_KEYS = ("model", "hookpoint", "dtype", "prompts_hash", "num_prompts", "steps", "guidance", "branches",
                "keep_steps", "tokens_per_record", "image_height", "image_width", "negative_prompt")


class StoreError(DiffusionSAEError, RuntimeError):
    """A store that cannot be created, resumed, read or written (one-line message)."""


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync; the only place store bytes hit the disk (tests simulate a full disk here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    # A per-process temporary name: several processes may write the same header at start-up.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        _write_bytes(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise StoreError(f"disk full while writing {path}; the store keeps every prompt committed before "
                             f"this one and resumes when rerun with free space") from None
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None


def _atomic_json(path: Path, obj) -> None:
    _atomic_write(path, json.dumps(obj, indent=1).encode("utf-8"))


@dataclass
class RecordTable:
    """Metadata of records (one row each), e.g. to average activations per prompt and step."""
    prompt_index: torch.Tensor
    image_index: torch.Tensor
    step_index: torch.Tensor
    branch: list[str]
    timestep: torch.Tensor
    grid: list[tuple[int, int] | None]
    shard: torch.Tensor        # index into store.shards
    token_start: torch.Tensor  # within the shard
    num_tokens: torch.Tensor

    def __len__(self) -> int:
        return len(self.branch)


@dataclass
class RecordMeta:
    prompt_index: int
    image_index: int
    step_index: int
    timestep: float
    branch: str
    grid: tuple[int, int] | None


def _entry_ok(e) -> bool:
    return (isinstance(e, dict) and (e.get("file") is None or isinstance(e.get("file"), str))
            and isinstance(e.get("prompts"), list) and isinstance(e.get("records"), int)
            and isinstance(e.get("tokens"), int))


class ActivationStore:
    """A store folder. `ActivationStore(dir)` opens an existing one; `ActivationStore.create` makes one."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / "manifest.json"
        if not path.exists():
            raise StoreError(f"no activation store at {self.dir} (manifest.json missing)")
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"unreadable manifest {path}: {e}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise StoreError(f"{path} is not a {FORMAT} manifest; use another --out for a new store")
        if not isinstance(self.manifest.get("shards"), list) or not all(_entry_ok(e) for e in self.manifest["shards"]):
            raise StoreError(f"{path}: damaged shard list; the store cannot be read, collect into another --out")

    # -- creation ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, header: dict) -> "ActivationStore":
        """Create a store with `header`, or reopen it if one with the same settings exists (resume)."""
        d = Path(directory)
        if (d / "manifest.json").exists():
            store = cls(d)
            for k in _RESUME_KEYS:
                if k in header and store.manifest.get(k) != header[k]:
                    if not store.shards and not any(d.glob("shard-*.safetensors")):
                        # nothing was collected under the old settings (an earlier run failed at once):
                        # the new settings replace them
                        manifest = {"format": FORMAT, **header, "shards": [],
                                    "counts": {"prompts": 0, "records": 0, "tokens": 0}}
                        _atomic_json(d / "manifest.json", manifest)
                        return cls(d)
                    raise StoreError(f"store {d} was collected with {k}={store.manifest.get(k)!r}, not "
                                     f"{header[k]!r}; use another output folder to start afresh")
            return store
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {d}: {e.strerror or e}") from None
        manifest = {"format": FORMAT, **header, "shards": [], "counts": {"prompts": 0, "records": 0, "tokens": 0}}
        _atomic_json(d / "manifest.json", manifest)
        return cls(d)

    # -- header and shards ------------------------------------------------------------------------
    def __getitem__(self, key):
        return self.manifest[key]

    @property
    def width(self) -> int | None:
        return self.manifest.get("width")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest.get("dtype", "float32")]

    def _parts(self) -> list[Path]:
        return sorted((self.dir / "parts").glob("rank-*.json")) if (self.dir / "parts").exists() else []

    @property
    def shards(self) -> list[dict]:
        """Committed shards: those in manifest.json plus those in unmerged per-process parts."""
        seen, out = set(), []
        lists = [self.manifest["shards"]] + [self._part_shards(p) for p in self._parts()]
        for entries in lists:
            for s in entries:
                key = s["file"] or f"empty:{s['prompts']}"
                if key not in seen:
                    seen.add(key)
                    out.append(s)
        return out

    @staticmethod
    def _part_shards(path: Path) -> list[dict]:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"unreadable part file {path} ({type(e).__name__}); delete it to re-collect the "
                             "prompts it lists") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("shards"), list) or not all(map(_entry_ok, doc["shards"])):
            raise StoreError(f"{path}: damaged part file; delete it to re-collect the prompts it lists")
        return doc["shards"]

    def _shard_readable(self, name: str) -> bool:
        from safetensors import safe_open

        try:
            with safe_open(str(self.dir / name), framework="pt") as f:
                return {"tokens", "meta", "timestep", "offsets"} <= set(f.keys())
        except Exception:
            return False

    def repair(self) -> list[str]:
        """Drop committed shards whose file is missing or unreadable (a damaged ones is renamed
        *.damaged) from the manifest and the part files, so that a resumed collect re-collects their
        prompts instead of reporting them done. Returns the dropped file names. Single process only."""
        bad = sorted({s["file"] for s in self.shards if s["file"] and not self._shard_readable(s["file"])})
        if not bad:
            return []
        for name in bad:
            if (self.dir / name).exists():
                os.replace(self.dir / name, self.dir / (name + ".damaged"))
        keep = lambda entries: [e for e in entries if e["file"] not in bad]  # noqa: E731
        for part in self._parts():
            _atomic_json(part, {"shards": keep(self._part_shards(part))})
        self.manifest["shards"] = keep(self.manifest["shards"])
        self.manifest["counts"] = {k: v for k, v in self.counts().items() if k != "shards"}
        _atomic_json(self.dir / "manifest.json", self.manifest)
        return bad

    def done_prompts(self) -> set[int]:
        return {p for s in self.shards for p in s["prompts"]}

    def counts(self) -> dict:
        sh = self.shards
        return {"prompts": len({p for s in sh for p in s["prompts"]}), "records": sum(s["records"] for s in sh),
                "tokens": sum(s["tokens"] for s in sh), "shards": sum(1 for s in sh if s["file"])}

    def merge_parts(self) -> None:
        """Fold per-process parts into manifest.json (run by one process once all have finished)."""
        self.manifest["shards"] = self.shards
        self.manifest["counts"] = {k: v for k, v in self.counts().items() if k != "shards"}
        self.manifest["width"] = self.manifest.get("width") or self._width_from_shards()
        _atomic_json(self.dir / "manifest.json", self.manifest)
        for p in self._parts():  # safe to drop: manifest.json now lists their shards
            p.unlink(missing_ok=True)

    def _width_from_shards(self) -> int | None:
        return next((s.get("width") for s in self.shards if s.get("width")), None)

    def writer(self, rank: int = 0, tokens_per_record: int | None = None, seed: int = 0) -> "StoreWriter":
        return StoreWriter(self, rank, tokens_per_record=tokens_per_record, seed=seed)

    # -- reading ----------------------------------------------------------------------------------
    def _open(self, i: int):
        from safetensors import safe_open

        path = self.dir / self.shards[i]["file"]
        if not path.is_file():
            raise StoreError(f"shard {path} is missing; rerun the same collect command to re-collect its prompts")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # truncated or not safetensors
            raise StoreError(f"shard {path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             "delete it and rerun the same collect command to re-collect its prompts") from None

    def records(self) -> RecordTable:
        """Metadata of every record, in shard order."""
        cols = {k: [] for k in ("meta", "timestep", "shard", "start", "n")}
        for i, s in enumerate(self.shards):
            if not s["file"]:
                continue
            with self._open(i) as f:
                try:
                    meta, ts, off = f.get_tensor("meta"), f.get_tensor("timestep"), f.get_tensor("offsets")
                except Exception as e:  # truncated, or a tensor missing
                    raise StoreError(f"shard {self.dir / s['file']} is damaged ({type(e).__name__}); delete it "
                                     "and rerun the same collect command to re-collect its prompts") from None
            cols["meta"].append(meta)
            cols["timestep"].append(ts)
            cols["shard"].append(torch.full((len(meta),), i, dtype=torch.int64))
            cols["start"].append(off[:-1])
            cols["n"].append(off[1:] - off[:-1])
        if not cols["meta"]:
            e = torch.zeros(0, dtype=torch.int64)
            return RecordTable(e, e, e, [], torch.zeros(0, dtype=torch.float64), [], e, e, e)
        meta = torch.cat(cols["meta"])
        return RecordTable(prompt_index=meta[:, 0], image_index=meta[:, 1], step_index=meta[:, 2],
                           branch=[BRANCH_NAMES[int(c)] for c in meta[:, 3]], timestep=torch.cat(cols["timestep"]),
                           grid=[None if h == 0 else (int(h), int(w)) for h, w in meta[:, 4:6].tolist()],
                           shard=torch.cat(cols["shard"]), token_start=torch.cat(cols["start"]),
                           num_tokens=torch.cat(cols["n"]))

    @staticmethod
    def _select(table: RecordTable, branch, steps, prompts) -> torch.Tensor:
        keep = torch.ones(len(table), dtype=torch.bool)
        if branch is not None:
            want = {branch} if isinstance(branch, str) else set(branch)
            keep &= torch.tensor([b in want for b in table.branch], dtype=torch.bool)
        if steps is not None:
            keep &= torch.isin(table.step_index, torch.as_tensor(list(steps), dtype=torch.int64))
        if prompts is not None:
            keep &= torch.isin(table.prompt_index, torch.as_tensor(list(prompts), dtype=torch.int64))
        return torch.nonzero(keep).flatten()

    def iter_records(self, branch: str | Iterable[str] | None = None, steps: Iterable[int] | None = None,
                     prompts: Iterable[int] | None = None, dtype: torch.dtype = torch.float32
                     ) -> Iterator[tuple[RecordMeta, torch.Tensor]]:
        """(metadata, tokens [T, d]) for each matching record, one shard open at a time."""
        table = self.records()
        sel = self._select(table, branch, steps, prompts)
        by_shard: dict[int, list[int]] = {}
        for r in sel.tolist():
            by_shard.setdefault(int(table.shard[r]), []).append(r)
        for i, rows in by_shard.items():
            with self._open(i) as f:
                tok = f.get_slice("tokens")
                for r in rows:
                    a = int(table.token_start[r])
                    x = tok[a:a + int(table.num_tokens[r])].to(dtype)
                    yield RecordMeta(int(table.prompt_index[r]), int(table.image_index[r]), int(table.step_index[r]),
                                     float(table.timestep[r]), table.branch[r], table.grid[r]), x

    def num_tokens(self, branch="cond", steps=None) -> int:
        table = self.records()
        return int(table.num_tokens[self._select(table, branch, steps, None)].sum())

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, buffer_tokens: int = 1 << 18,
                branch: str | Iterable[str] | None = "cond", steps: Iterable[int] | None = None,
                dtype: torch.dtype = torch.float32, drop_last: bool = False) -> Iterator[torch.Tensor]:
        """One pass over the matching tokens as [batch_size, d] batches.

        Shuffling is two-level: chunks (runs of consecutive matching tokens, at most buffer_tokens/8
        long, from all shards) are read in a random order into a buffer that is permuted whenever it
        holds `buffer_tokens`, and half of it is emitted. Memory stays below ~1.2 x buffer_tokens rows
        whatever the store's size (`self.last_peak_buffer` reports the largest buffer held).
        """
        table = self.records()
        sel = self._select(table, branch, steps, None)
        chunk = max(batch_size, buffer_tokens // 8)
        plan: list[tuple[int, int, int]] = []  # (shard, start, end)
        for r in sel.tolist():
            s, a, n = int(table.shard[r]), int(table.token_start[r]), int(table.num_tokens[r])
            if plan and plan[-1][0] == s and plan[-1][2] == a and plan[-1][2] - plan[-1][1] + n <= chunk:
                plan[-1] = (s, plan[-1][1], a + n)  # merge contiguous records of a shard into one read
            else:
                for lo in range(a, a + n, chunk):
                    plan.append((s, lo, min(a + n, lo + chunk)))
        gen = torch.Generator().manual_seed(seed)
        if shuffle:
            plan = [plan[i] for i in torch.randperm(len(plan), generator=gen).tolist()]
        self.last_peak_buffer = 0
        buf: list[torch.Tensor] = []
        held = 0
        handles: dict[int, object] = {}

        def emit(flush: bool):
            nonlocal buf, held
            x = torch.cat(buf) if len(buf) > 1 else buf[0]
            if shuffle:
                x = x[torch.randperm(len(x), generator=gen)]
            keep = 0 if (flush or not shuffle) else buffer_tokens // 2
            n_out = (len(x) - keep) // batch_size * batch_size
            if flush and not drop_last:
                n_out = len(x)
            for lo in range(0, n_out, batch_size):
                yield x[lo:lo + batch_size]
            rest = x[n_out:] if not flush else x[:0]
            buf, held = ([rest] if len(rest) else []), len(rest)

        try:
            for s, a, b in plan:
                if s not in handles:
                    if len(handles) >= 8:  # bound open files
                        handles.pop(next(iter(handles))).__exit__(None, None, None)
                    handles[s] = self._open(s).__enter__()
                buf.append(handles[s].get_slice("tokens")[a:b].to(dtype))
                held += b - a
                self.last_peak_buffer = max(self.last_peak_buffer, held)
                if held >= (buffer_tokens if shuffle else batch_size):
                    yield from emit(False)
            if held:
                yield from emit(True)
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)


_SHARD_RE = re.compile(r"^shard-r(\d{3})-(\d{6})\.safetensors(\.\d+\.tmp)?$")


class StoreWriter:
    """Buffers CaptureBatches of one process and commits them as whole-prompt shards."""

    def __init__(self, store: ActivationStore, rank: int = 0, tokens_per_record: int | None = None, seed: int = 0):
        self.store, self.rank = store, rank
        self.tokens_per_record, self.seed = tokens_per_record, seed
        self.part = store.dir / "parts" / f"rank-{rank:03d}.json"
        self.part.parent.mkdir(exist_ok=True)
        self._entries = store._part_shards(self.part) if self.part.exists() else []
        committed = {s["file"] for s in store.shards}
        seqs = [-1]
        for p in store.dir.iterdir():
            m = _SHARD_RE.match(p.name)
            if m and int(m.group(1)) == rank:
                if p.name not in committed:  # written but never committed before a kill: redo those prompts
                    p.unlink(missing_ok=True)
                else:
                    seqs.append(int(m.group(2)))
        self._seq = max(seqs) + 1
        self._reset()

    def _reset(self):
        self._tokens: list[torch.Tensor] = []
        self._positions: list[torch.Tensor] = []
        self._meta: list[list[int]] = []
        self._timestep: list[float] = []
        self._counts: list[int] = []
        self._prompts: list[int] = []
        self.buffered_bytes = 0

    def add(self, batch) -> None:
        """Buffer a CaptureBatch (one record per row)."""
        width = self.store.manifest.get("width")
        d = batch.activations.shape[-1]
        if width and d != width:
            raise StoreError(f"store {self.store.dir} holds width {width}, got activations of width {d}")
        dt = self.store.dtype
        gh, gw = batch.grid or (0, 0)
        for i in range(batch.activations.shape[0]):
            x = batch.activations[i]
            p, img = int(batch.prompt_index[i]), int(batch.image_index[i])
            if self.tokens_per_record and self.tokens_per_record < x.shape[0]:
                # A fixed random subset of patches per record, seeded by its identity (reproducible on resume).
                key = f"{self.seed}:{p}:{img}:{batch.step_index}:{batch.branch}".encode()
                g = torch.Generator().manual_seed(zlib.crc32(key))
                pos = torch.randperm(x.shape[0], generator=g)[:self.tokens_per_record].sort().values
                x = x[pos]
                self._positions.append(pos.to(torch.int32))
            elif self.tokens_per_record:
                self._positions.append(torch.arange(x.shape[0], dtype=torch.int32))
            x = x.to(dt).contiguous()
            self._tokens.append(x)
            self._meta.append([p, img, batch.step_index, BRANCH_CODES[batch.branch], gh, gw])
            self._timestep.append(batch.timestep)
            self._counts.append(x.shape[0])
            self.buffered_bytes += x.numel() * x.element_size()

    def mark_done(self, prompts: Iterable[int]) -> None:
        """Declare prompts whose records are all buffered; they are durable after the next commit()."""
        self._prompts.extend(int(p) for p in prompts)

    def commit(self) -> None:
        """Write buffered records as one shard (atomically), then list it in this process's part file."""
        if not self._prompts:
            if self._tokens:
                raise StoreError("records buffered without their prompts being marked done")
            return
        from safetensors.torch import save

        name = None
        n_tok = sum(self._counts)
        width = self._tokens[0].shape[-1] if self._tokens else None
        if self._tokens:
            offsets = torch.zeros(len(self._counts) + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(torch.tensor(self._counts, dtype=torch.int64), 0)
            tensors = {"tokens": torch.cat(self._tokens), "meta": torch.tensor(self._meta, dtype=torch.int64),
                       "timestep": torch.tensor(self._timestep, dtype=torch.float64), "offsets": offsets}
            if self._positions:
                tensors["positions"] = torch.cat(self._positions)
            name = f"shard-r{self.rank:03d}-{self._seq:06d}.safetensors"
            _atomic_write(self.store.dir / name, save(tensors, metadata={"hookpoint": str(self.store["hookpoint"])}))
            self._seq += 1
        entry = {"file": name, "records": len(self._counts), "tokens": n_tok, "width": width,
                 "prompts": sorted(set(self._prompts))}
        try:
            _atomic_json(self.part, {"shards": self._entries + [entry]})
        except StoreError:
            if name:  # not committed: remove the shard so that no stray file is left
                (self.store.dir / name).unlink(missing_ok=True)
            raise
        self._entries.append(entry)
        self._reset()

    def discard(self) -> None:
        self._reset()

