"""The static dashboard: opens offline (no external URL) and shows the explorer's feature content."""
from __future__ import annotations

from _cli import run_main

import json
import re
from html.parser import HTMLParser

import pytest

from diffusion_sae.app.engine import Engine
from diffusion_sae.app.export import export_dashboard

PROMPTS = ["a red circle in solid style", "a blue star in striped style", "a green heart in dotted style",
           "a yellow ring in wavy style"]


@pytest.fixture(scope="module")
def engine():
    return Engine.bundled(stats_prompts=PROMPTS, stats_seeds=[0, 1, 2, 3], stats_steps=3)


class _Refs(HTMLParser):
    """Every URL-bearing attribute (src, href, ...) of a page."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href", "srcset", "action", "poster", "data", "xlink:href") and v is not None:
                self.refs.append((tag, k, v))


def test_export_is_offline_and_matches_explorer(engine, tmp_path):
    stats = engine.stats()
    feats = stats.top_features(3)
    index = export_dashboard(tmp_path / "dash", stats, engine.index(), features=feats)
    out = index.parent
    pages = sorted(out.rglob("*.html"))
    assert {p.name for p in pages} == {"index.html"} | {f"{f}.html" for f in feats}
    for p in pages + [out / "style.css"]:
        text = p.read_text()
        # No reference to any host at all: no http(s) URL, no protocol-relative //host, no @import.
        assert not re.search(r"https?://", text, re.I), p
        assert "@import" not in text and "<script" not in text.lower(), p
        if p.suffix == ".html":
            parser = _Refs()
            parser.feed(text)
            for tag, attr, ref in parser.refs:
                assert not ref.startswith("//"), (p, ref)
                if ref.startswith("data:"):
                    assert ref.startswith("data:image/png;base64,"), (p, tag)
                else:   # a relative link to a file that is in the folder
                    target = (p.parent / ref.split("#")[0]).resolve()
                    assert target.is_file() and target.is_relative_to(out.resolve()), (p, ref)
    # The same feature content as the explorer shows in the browser: the card is verbatim.
    for f in feats:
        assert engine.feature_card(f) in (out / "features" / f"{f}.html").read_text()
    summary = json.loads((out / "features.json").read_text())
    assert [s["feature"] for s in summary["features"]] == feats
    tops = stats.top_images(feats[0], 8)
    assert [t["index"] for t in summary["features"][0]["top_images"]] == [t.index for t in tops]
    assert summary["features"][0]["concepts"][0]["concept"] == engine.index().top_concepts(feats[0])[0].concept


def _cli(args, capsys):
    return run_main(args, capsys)


def test_export_cli(tmp_path, capsys):
    common = ["--per-concept", "1", "--stats-steps", "2"]
    code, out, err = _cli(["dashboard", "export", "--out", tmp_path / "d", "--features", "3,7", *common], capsys)
    assert code == 0, err
    assert (tmp_path / "d" / "features" / "3.html").is_file() and (tmp_path / "d" / "features" / "7.html").is_file()
    code, out, err = _cli(["dashboard", "export", "--out", tmp_path / "e", "--features", "99999", *common], capsys)
    assert code == 2 and not (tmp_path / "e").exists()
    assert err.splitlines()[-1].startswith("error: feature 99999 is out of range")
