"""OpenAI CLIP's BPE tokenizer files (vocab.json + merges.txt), built offline.

The merges ship inside the open-clip-torch wheel as `open_clip/bpe_simple_vocab_16e6.txt.gz`. We fetch
only that wheel with `pip download --no-deps` (never install it: it pulls torchvision, which breaks
diffusers) and rebuild the 49,408-entry HF vocabulary exactly as OpenAI's SimpleTokenizer lays it out,
so token ids match the real CLIP ids. Nothing from the wheel is committed to this repository.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import DiffusionSAEError

OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408


class ClipBpeUnavailable(DiffusionSAEError, RuntimeError):
    """The CLIP BPE file could not be fetched (no PyPI access and no cached copy): one line on the CLI, exit 2."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSION_SAE_CACHE", Path.home() / ".cache" / "diffusion-sae")) / "clip-bpe"


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _fetch_bpe_gz(cache_dir: Path) -> bytes:
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               OPEN_CLIP_WHEEL, "-d", tmp]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise ClipBpeUnavailable(f"could not download {OPEN_CLIP_WHEEL} for CLIP's BPE file: "
                                     f"{detail.strip().splitlines()[-1] if detail.strip() else e}; run once where "
                                     f"the package index is reachable, or put vocab.json and merges.txt from another "
                                     f"machine's cache in {cache_dir} (DIFFUSION_SAE_CACHE sets its parent)") from e
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ClipBpeUnavailable(f"pip download {OPEN_CLIP_WHEEL} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            return z.read(BPE_MEMBER)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def clip_tokenizer_files(cache_dir: str | Path | None = None) -> Path:
    """Return a folder holding CLIP's `vocab.json` and `merges.txt`, building it on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    vocab_path, merges_path = cache_dir / "vocab.json", cache_dir / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        return cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    raw = _fetch_bpe_gz(cache_dir)
    # Same slice as OpenAI's SimpleTokenizer: skip the version line, keep 49152 - 256 - 2 merges.
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    _write_atomic(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_atomic(vocab_path, json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    return cache_dir


def load_clip_tokenizer(cache_dir: str | Path | None = None, max_length: int = 77):
    """A `CLIPTokenizer` with the real CLIP vocabulary (ids match OpenAI CLIP)."""
    from transformers import CLIPTokenizer  # transformers 5: the fast (tokenizers-backed) class

    d = clip_tokenizer_files(cache_dir)
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    lines = (d / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(m.split(" ")) for m in lines if m]
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length  # built from files it defaults to 1e30
    return tok


if __name__ == "__main__":  # `python -m diffusion_sae.models.clip_bpe [DIR]`: used by the Makefile
    print(clip_tokenizer_files(sys.argv[1] if len(sys.argv) > 1 else None))
