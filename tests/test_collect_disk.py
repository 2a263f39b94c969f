"""collect measures the disk it needs (first prompt into a temporary folder) and refuses in one line."""
import shutil
from collections import namedtuple

from typer.testing import CliRunner

from diffusion_sae.activations.disk import DiskSpaceError
from diffusion_sae.cli import app

HP, TEXT = "unet.up_blocks.1.attentions.1", "text_encoder.text_model.encoder.layers.9"


def _args(tmp_path, *extra):
    p = tmp_path / "p.txt"
    p.write_text("a cat\na dog on a street\na red car\n")
    return ["collect", "--model", "tiny:sd", "--prompts", str(p), "--out", str(tmp_path / "out"), "--steps", "2",
            "--hookpoint", HP, "--hookpoint", TEXT, *extra]


def test_not_enough_disk_is_refused_in_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 20_000, 20_000))
    r = CliRunner().invoke(app, _args(tmp_path))
    assert isinstance(r.exception, DiskSpaceError), (r.output, r.exception)
    msg = str(r.exception)
    assert "\n" not in msg and "3 prompts" in msg and "20.0 kB is free" in msg
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "probe" in p.name]
    monkeypatch.setattr(shutil, "disk_usage", real)
    r = CliRunner().invoke(app, _args(tmp_path))
    assert r.exit_code == 0, (r.output, r.exception)
    # the per-prompt figure covers the stored tokens: 2 steps x 16 patches x 64 (UNet) + 77 x 32 (CLIP), fp16
    line = next(ln for ln in r.output.splitlines() if ln.startswith("disk: about"))
    per = float(line.split("(")[1].split(" kB")[0]) * 1000
    payload = (2 * 16 * 64 + 77 * 32) * 2
    assert payload <= per <= 2 * payload, (per, payload)
    written = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file())
    assert 0.5 * written <= 3 * per <= 1.5 * written, (3 * per, written)
