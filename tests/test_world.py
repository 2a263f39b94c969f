"""ShapesCanvas: procedural data, the shipped pipeline and classifier, and the training commands."""
import json

import torch

from diffusion_sae.world import assets
from diffusion_sae.world.classifier import ClassifierTrainConfig, accuracy, train_classifier
from diffusion_sae.world.config import COLOUR_NAMES, OBJECTS, STYLES, vocabulary_words
from diffusion_sae.world.data import object_masks, sample_batch
from diffusion_sae.world.evaluate import generate
from diffusion_sae.world.tokenizer import build_tokenizer
from diffusion_sae.world.train import UNetTrainConfig, UNetTrainer, export_pipeline
from diffusion_sae.world.model import ShapesCanvasModelConfig


def test_concepts_sizes_and_every_object_has_a_distinct_mask():
    assert len(OBJECTS) >= 10 and len(STYLES) >= 8 and len(COLOUR_NAMES) >= 6
    m = object_masks()
    assert m.shape[0] == len(OBJECTS)
    flat = m.flatten(1)
    # no two objects share a silhouette (IoU well below 1)
    inter = flat @ flat.T
    union = flat.sum(1)[:, None] + flat.sum(1)[None] - inter
    iou = inter / union
    assert float((iou - torch.eye(len(OBJECTS))).max()) < 0.9


def test_generator_is_deterministic_and_seed_dependent():
    a, b, c = sample_batch(16, seed=3, step=5), sample_batch(16, seed=3, step=5), sample_batch(16, seed=3, step=6)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (16, 3, 32, 32) and 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    # a caption names its object by the canonical name or an alias, or (world v2) leaves it out
    # (then it says "shape", "image" or "something", or is empty)
    import re

    from diffusion_sae.world.config import names_of
    for cap, o in zip(a.captions, a.objects.tolist()):
        words = set(re.findall(r"[a-z]+", cap))
        named = [ob for ob in OBJECTS if words & set(names_of(ob))]
        assert named == [OBJECTS[o]] or (not named and (words & {"shape", "image", "something"} or not words)), cap


def test_tokenizer_gives_one_token_per_caption_word():
    tok = build_tokenizer()
    assert len(tok) > 500
    for w in vocabulary_words():
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))


def test_shipped_pipeline_loads_offline_and_same_seed_gives_same_images():
    pipe = assets.load_pipeline()
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert hasattr(pipe.unet, "up_blocks") and len(pipe.unet.up_blocks[1].attentions) >= 2
    a = generate(pipe, ["a red star in striped style", "a blue ring in dotted style"], [0, 1], steps=5)
    b = generate(pipe, ["a red star in striped style", "a blue ring in dotted style"], [0, 1], steps=5)
    c = generate(pipe, ["a red star in striped style", "a blue ring in dotted style"], [2, 3], steps=5)
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_shipped_classifier_is_accurate_on_fresh_samples():
    clf = assets.load_classifier()
    acc = accuracy(clf, n=600, seed=424_242)
    assert min(acc.values()) >= 0.99, acc


def test_classifier_training_lowers_the_loss():
    _, losses = train_classifier(ClassifierTrainConfig(steps=30, batch_size=32))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_unet_training_lowers_the_loss_resumes_exactly_and_exports(tmp_path):
    small = ShapesCanvasModelConfig(block_out_channels=(16, 32, 32), heads=(1, 1, 1), text_width=32, text_layers=1,
                                    text_heads=2)
    cfg = UNetTrainConfig(steps=40, batch_size=8, lr=2e-3, warmup=2, ckpt_every=5, model=small)
    t = UNetTrainer(tmp_path / "run", cfg)
    first = [t.loss_on(s).item() for s in range(3)]
    t.run(until=30)
    last = [t.loss_on(s).item() for s in range(3)]
    assert sum(last) < sum(first)
    # resume: a run stopped at 10 and resumed to 12 equals an uninterrupted run to 12. One thread: multi-threaded
    # conv backward reduces in a varying order, and Adam turns those last-bit differences into visible ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = UNetTrainer(tmp_path / "a", cfg, tokenizer=t.tokenizer)
    a.run(until=10)
    a2 = UNetTrainer(tmp_path / "a")  # reloads the run's own tokenizer
    assert a2.step == 10 and a2.tokenizer.get_vocab() == t.tokenizer.get_vocab()
    a2.run(until=12)
    b = UNetTrainer(tmp_path / "b", cfg, tokenizer=t.tokenizer)
    b.run(until=12)
    for (n, p), (_, q) in zip(a2.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), n
    torch.set_num_threads(threads)
    out = export_pipeline(b, tmp_path / "pipe")
    assert json.loads((out / "training.json").read_text())["step"] == 12
    pipe = assets.load_pipeline(out)
    img = generate(pipe, ["a red star"], [0], steps=2)
    assert img.shape == (1, 3, 32, 32)


def test_contrastive_steering_removes_ring_where_the_word_alone_cannot():
    """Concept Steerers on the bundled model, judged by the bundled classifier: at λ = −2 the single word
    "ring" leaves rings and costs style; matched example prompts (ring against its rivals) remove it and
    keep the style."""
    from diffusion_sae.eval.shapes import ShapesBench, removal_row, steering_unit
    from diffusion_sae.interventions.steer import steer_text_encoder
    from diffusion_sae.world import bundle
    from diffusion_sae.world.config import eval_prompt
    from diffusion_sae.world.evaluate import PromptSet

    pipe, clf, sae = assets.load_pipeline(), assets.load_classifier(), bundle.load_text_sae()
    ri = OBJECTS.index("ring")
    ps = PromptSet([eval_prompt("ring", s, COLOUR_NAMES[i % len(COLOUR_NAMES)]) for i, s in enumerate(STYLES)] * 2,
                   [300] * len(STYLES) + [301] * len(STYLES), [ri] * 2 * len(STYLES), list(range(len(STYLES))) * 2,
                   [i % len(COLOUR_NAMES) for i in range(len(STYLES))] * 2)
    bench = ShapesBench(pipe, clf, steps=25)
    base = bench.run(ps)
    rows = {}
    for how in ("word", "contrast"):
        st = steering_unit(sae, pipe, "object", "ring", -2.0, baseline="", gate=True, contrast=how == "contrast")
        rows[how] = removal_row(bench.run(ps, lambda st=st: steer_text_encoder(pipe, st)), "object", "ring", base)
    assert rows["word"]["presence_before"] >= 0.9
    assert rows["contrast"]["presence_after"] <= 1 / 16 and rows["contrast"]["style_drop"] <= 1 / 16
    assert rows["word"]["presence_after"] + rows["word"]["style_drop"] >= 0.25
