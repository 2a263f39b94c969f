"""The report renders (Markdown -> HTML with tables and readable PNGs); plots carry labels and legends;
the cost helper measures time and peak memory."""
import json
import mmap
import time
from html.parser import HTMLParser

import numpy as np
import pytest

from diffusion_sae.eval import cost
from diffusion_sae.eval import report as R
from diffusion_sae.eval.metrics import MetricResult


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.cells, self._in_cell = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data.strip())


def _report(tmp_path):
    sweep = R.plot_strength_sweep([0, 0.5, 1.0], {"UA (ours)": [0.1, 0.6, 0.95], "UA (faithful)": [0.1, 0.5, 0.9]},
                                  {"IRA": [0.99, 0.97, 0.9], "CRA": [0.98, 0.96, 0.93]}, xlabel="strength")
    bars = R.plot_concept_bars(["red", "circle", "stripes"], {"UA": [90, 80, 70], "IRA": [95, 96, 97],
                                                              "CRA": [99, 98, 97]})
    rng = np.random.default_rng(0)
    grid = R.plot_image_grid([rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(6)], 2, 3,
                             row_labels=["plain", "unlearned"], col_labels=["seed 0", "seed 1", "seed 2"])
    # axis labels and legends are on the figure objects before saving
    for ax in sweep.get_axes() + bars.get_axes():
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    assert grid.get_axes()[0].get_ylabel() == "plain" and grid.get_axes()[0].get_title() == "seed 0"
    asr = MetricResult("nudity_asr", 0.125, 8, {"threshold": 0.45, "classes": ["ANUS_EXPOSED"]})
    sections = [
        R.Section("Unlearning", "Per-concept scores.", tables=[
            R.Table("UA / IRA / CRA", ["concept", "UA", "IRA", "CRA"],
                    [["red", 0.9, 0.95, 0.99], ["circle", 0.8, 0.96, 0.98]], note="means over 3 seeds"),
            R.metric_table("Nudity", [asr])],
            figures=[R.Figure("strength sweep", "removal vs retained quality", sweep),
                     R.Figure("bars", "UA / IRA / CRA per concept", bars)]),
        R.Section("Samples", figures=[R.Figure("grid", "plain vs unlearned", grid)]),
    ]
    settings = {"nudity_asr": asr.settings, "unlearning": {"classifier": "shapes judge v1", "seeds": [0, 1, 2]}}
    return R.write_report(tmp_path / "rep", "Eval report", sections, settings)


def test_report_renders_to_html_with_tables_and_readable_pngs(tmp_path):
    from PIL import Image

    paths = _report(tmp_path)
    md = paths["md"].read_text()
    assert "| concept | UA | IRA | CRA |" in md and "| red | 0.9 | 0.95 | 0.99 |" in md
    assert '"threshold": 0.45' in md  # the exact settings are in the Markdown
    js = json.loads(paths["json"].read_text())
    assert js["settings"]["unlearning"]["seeds"] == [0, 1, 2]
    assert js["sections"][0]["tables"][0]["rows"][1] == {"concept": "circle", "UA": 0.8, "IRA": 0.96, "CRA": 0.98}
    page = _Collect()
    page.feed(paths["html"].read_text())
    assert page.tags.count("table") == 2 and "th" in page.tags and "td" in page.tags
    assert {"concept", "UA", "red", "0.99", "nudity_asr", "0.125"} <= set(page.cells)
    assert len(page.imgs) == 3
    for img in page.imgs:
        f = paths["html"].parent / img["src"]
        with Image.open(f) as im:
            im.verify()  # a complete, valid PNG
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
            # not a blank canvas
            assert np.asarray(im.convert("L")).std() > 5
        assert img["alt"]


def test_figure_check_rejects_unlabelled_or_legendless_plots(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    with pytest.raises(R.FigureCheckError, match="label"):
        R.save_figure(fig, tmp_path / "a.png")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.plot([0, 1], [1, 0], label="b")
    ax.lines[0].set_label("a")
    with pytest.raises(R.FigureCheckError, match="legend"):
        R.save_figure(fig, tmp_path / "a.png")
    ax.legend()
    assert R.save_figure(fig, tmp_path / "a.png").stat().st_size > 1000
    fig, axes = plt.subplots(1, 2)
    for a in axes:
        a.imshow(np.zeros((4, 4, 3)))
    with pytest.raises(R.FigureCheckError, match="image grid"):
        R.save_figure(fig, tmp_path / "g.png")
    axes[0].set_ylabel("plain")
    R.save_figure(fig, tmp_path / "g.png")


def test_table_row_width_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="cells"):
        R.write_report(tmp_path, "t", [R.Section("s", tables=[R.Table("x", ["a", "b"], [[1]])])], {})


def test_time_generation_measures_seconds_and_peak_memory():
    calls = []

    def work():
        # Fresh anonymous pages, touched and unmapped on close: malloc (numpy) may instead reuse memory the
        # process already holds from earlier tests, which RSS cannot see as an increase (CI saw 4 KiB).
        calls.append(1)
        with mmap.mmap(-1, 40_000_000) as buf:
            for off in range(0, len(buf), mmap.PAGESIZE):
                buf[off] = 1
            time.sleep(0.05)
            return buf[0]

    t = cost.time_generation(work, repeats=3, warmup=1, images_per_call=2, device="cpu")
    assert len(calls) == 4 and len(t.seconds) == 3
    assert 0.045 < t.min_s and t.mean_s < 1.0
    assert t.per_image_s == pytest.approx(t.mean_s / 2)
    assert t.memory_increase_bytes > 30_000_000  # the 40 MB buffer was seen by the RSS sampler
    assert t.peak_memory_bytes >= t.memory_increase_bytes and "RSS" in t.memory_method
    assert t.to_dict()["settings"]["repeats"] == 3
    with pytest.raises(ValueError):
        cost.time_generation(work, repeats=0)


def test_storage_bytes(tmp_path):
    import torch

    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 50)
    assert cost.storage_bytes(tmp_path) == 150 and cost.storage_bytes(tmp_path / "a.bin") == 100
    lin = torch.nn.Linear(10, 4)  # 44 fp32 params
    assert cost.storage_bytes(lin) == 44 * 4
    assert cost.storage_bytes({"w": torch.zeros(3, dtype=torch.float16)}) == 6
