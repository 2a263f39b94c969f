"""The real pipelines' architectures (published configurations, written in code, random weights or meta).

The SD 1.5 dry run builds the full-size UNet (860 M parameters), CLIP ViT-L/14 text encoder and VAE
with random weights on the CPU and runs the whole method chain at 64x64 (the smallest size the UNet's
three downsamplings accept), 2 steps, one prompt.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_sae.models import resolve_hookpoint
from diffusion_sae.models.realscale import build_real_pipeline, hookpoints_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_real_widths_from_the_published_configs():
    """Meta-device builds (no memory): the published hookpoints have the widths the papers' SAEs use."""
    want = {"sd15": {"unet.up_blocks.1.attentions.1": 1280, "text_encoder.text_model.encoder.layers.9": 768},
            "sdxl": {"unet.up_blocks.0.attentions.1": 1280, "unet.down_blocks.2.attentions.1": 1280,
                     "unet.up_blocks.1.attentions.1": 640, "text_encoder_2.text_model.encoder.layers.28": 1280},
            "sd3": {"transformer.transformer_blocks.23": 1536, "text_encoder_3.encoder.block.22": 4096},
            "flux": {"transformer.single_transformer_blocks.37": 3072, "transformer.transformer_blocks.18": 3072,
                     "text_encoder_2.encoder.block.23": 4096}}
    for fam, hps in want.items():
        pipe = build_real_pipeline(fam, "meta")
        for name, width in hps.items():
            assert resolve_hookpoint(pipe, name).width == width, (fam, name)
    n = sum(p.numel() for p in build_real_pipeline("sd15", "meta").unet.parameters())
    assert abs(n - 859_520_964) < 1e6, n      # SD 1.5's UNet: 859.5 M parameters


def test_docs_hookpoint_table_is_up_to_date():
    doc = (ROOT / "docs" / "hookpoints.md").read_text()
    assert doc.strip() == hookpoints_markdown().strip(), \
        "docs/hookpoints.md is stale: python -m diffusion_sae.models.realscale hookpoints docs/hookpoints.md"


@pytest.mark.slow
def test_sd15_real_width_dry_run(tmp_path):
    """Collect → train block and text SAEs → concept dictionary → steer and unlearn, SD 1.5 at real
    widths, random weights, fp32, CPU. Measured on a shared 2-core CPU: 208 s wall (83 s CPU), peak
    resident memory 5.7 GB (build 30 s, block SAE 56 s, dictionary 33 s, three images 75 s)."""
    out = tmp_path / "dry.json"
    p = subprocess.run([sys.executable, "-m", "diffusion_sae.models.realscale", "dry-run", "--json", str(out)],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["parameters"]["unet"] == 859_520_964 and rep["parameters"]["text_encoder"] == 123_060_480
    assert rep["block_sae"]["W_dec"] == [16 * 1280, 1280] and rep["text_sae"]["W_dec"] == [4 * 768, 768]
    assert rep["block_sae"]["dtype"] == rep["text_sae"]["dtype"] == "torch.float32"
    assert rep["block_sae"]["tokens"] == 8            # 2 steps x 2x2 patches of up_blocks.1 at 64x64
    assert rep["dictionary"] == [2, 2, 16 * 1280]    # concepts x steps x latents
    img = rep["image"]
    assert img["shape"] == [1, 3, 64, 64] and img["finite"] and img["pipeline_dtype"] == "torch.float32"
    assert img["steer_max_change"] > 1e-3 and img["unlearn_max_change"] > 1e-3
    assert rep["peak_rss_mb"] < 12_000


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_benchmark_without_cuda_is_one_line():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in p.stderr and "no GPU figure" in p.stderr


@pytest.mark.slow
def test_gpu_benchmark_code_path_on_tiny_cpu_pipelines(tmp_path):
    """`benchmarks/gpu.py --smoke`: the benchmark's code on the tiny pipelines (44 s on a shared 2-core CPU)."""
    out = tmp_path / "g.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    for fam in ("sd15", "sdxl"):
        assert all(res[fam][m]["s_per_image"] > 0 for m in ("plain", "steered", "ablated", "ablated_subset"))
        assert res[fam]["ablated"]["median_ratio"] > 0


# Measured on a shared 2-core CPU (bf16, 2 steps, 64², build + collect/train + dictionary + 3 images),
# wall time and peak resident memory: sdxl 143 s, 4.6 GB; sd3 247 s, 5.5 GB; flux 142 s, 4.5 GB.


@pytest.mark.slow
@pytest.mark.parametrize("family,width,tokens", [("sdxl", 1280, 8), ("sd3", 1536, 32), ("flux", 3072, 32)])
def test_real_width_few_block_dry_runs_in_bf16(tmp_path, family, width, tokens):
    """SDXL (one transformer layer per block), SD3 (two joint blocks, two T5 blocks) and FLUX (one block of
    each kind, one T5 block) at real widths, random bf16 weights, CPU: the same chain as SD 1.5."""
    out = tmp_path / "dry.json"
    p = subprocess.run([sys.executable, "-m", "diffusion_sae.models.realscale", "dry-run", "--family", family,
                        "--dtype", "bfloat16", "--json", str(out)], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["block_sae"]["W_dec"][1] == width and rep["block_sae"]["dtype"] == "torch.float32"
    assert rep["block_sae"]["tokens"] == tokens
    img = rep["image"]
    assert img["shape"] == [1, 3, 64, 64] and img["finite"] and img["pipeline_dtype"] == "torch.bfloat16"
    assert img["steer_max_change"] > 1e-3 and img["unlearn_max_change"] > 1e-3
    assert rep["peak_rss_mb"] < 12_000
