"""Tests for utils/sd/kanji_dataset.py: KANJIDIC2 parsing, subsets, rendering, building, errors.

Needs the Debian packages kanjidic-xml and fonts-ipafont-gothic/-mincho; the tests
that read them are skipped (with the install command) where they are missing.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.sd import kanji_dataset as kd


def _have_data():
    try:
        kd.find_kanjidic2()
        kd.resolve_fonts(["gothic", "mincho"])
    except FileNotFoundError:
        return False
    return True


requires_data = pytest.mark.skipif(
    not _have_data(),
    reason="needs `apt-get install kanjidic-xml fonts-ipafont-gothic fonts-ipafont-mincho`",
)


def _read_rows(split_dir):
    with open(split_dir / "metadata.jsonl", encoding="utf-8") as metadata:
        return [json.loads(line) for line in metadata]


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def records():
    return kd.parse_kanjidic2()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """frequent:40 in two fonts at 32 px; returns (dir, summary)."""
    out = tmp_path_factory.mktemp("kanji") / "ds"
    summary = kd.build_kanji_dataset(
        out, resolution=32, subset="frequent:40", fonts=("gothic", "mincho"), validation_fraction=0.1, seed=0
    )
    return out, summary


# --------------------------------------------------------------------------- parsing & subsets


@requires_data
def test_parse_gives_sane_records(records):
    assert len(records) > 10000
    by_literal = {r.literal: r for r in records}
    water = by_literal["水"]
    assert water.meanings[0] == "water"
    assert "eau" not in water.meanings  # French meanings (m_lang="fr") are dropped
    assert (water.grade, water.stroke_count) == (1, 4)
    assert water.freq is not None and water.freq < 500
    assert water.codepoint == "U+6C34"
    assert kd.caption_for(water).startswith("kanji meaning water")


@requires_data
def test_subset_sizes_and_order(records):
    joyo = kd.select_subset(records, "joyo")
    assert len(joyo) == 2136
    assert len(kd.select_subset(records, "grade:6")) == 1026  # kyoiku kanji
    assert len(kd.select_subset(records, "grade:8")) == 2136
    frequent = kd.select_subset(records, "frequent:40")
    assert [r.freq for r in frequent] == list(range(1, 41))
    everything = kd.select_subset(records, "all")
    assert len(everything) > 10000 and all(r.meanings for r in everything)
    assert kd.select_subset(records, "joyo", max_chars=10) == joyo[:10]
    with pytest.raises(ValueError, match="grade:N"):
        kd.select_subset(records, "kyoiku")


def test_caption_skips_annotations():
    record = kd.KanjiRecord("働", ("(kokuji)", "work", "(machine) works", "labor", "more"), 4, 13, 417)
    assert kd.caption_for(record) == "kanji meaning work, (machine) works, labor"
    only_note = kd.KanjiRecord("x", ("(kokuji)",), None, None, None)
    assert kd.caption_for(only_note) == "kanji meaning (kokuji)"


def test_split_is_per_character_and_stable():
    chars = [kd.KanjiRecord(chr(0x4E00 + i), ("m",), None, None, None) for i in range(400)]
    train, validation = kd.split_by_character(chars, 0.1, seed=0)
    assert {r.literal for r in train}.isdisjoint(r.literal for r in validation)
    assert len(train) + len(validation) == 400 and 20 <= len(validation) <= 60
    # A character's split does not depend on which other characters are selected.
    _, validation_half = kd.split_by_character(chars[:200], 0.1, seed=0)
    assert {r.literal for r in validation_half} == {r.literal for r in validation if r in chars[:200]}
    _, tiny_validation = kd.split_by_character(chars[:3], 0.01, seed=0)
    assert len(tiny_validation) == 1  # never an empty validation split when a fraction is asked


# --------------------------------------------------------------------------- rendering


@requires_data
def test_renderer_detects_missing_glyph_and_centers():
    renderer = kd.GlyphRenderer(kd.resolve_fonts(["gothic"])[0][1], resolution=64)
    assert renderer.render("\U0010ffff") is None  # .notdef
    assert renderer.render(" ") is None  # no ink
    image = renderer.render("口")
    assert image.size == (64, 64) and image.mode == "RGB"
    ink = np.asarray(image.convert("L")) < 128
    rows, cols = np.nonzero(ink)
    assert rows.min() >= 3 and cols.min() >= 3 and rows.max() <= 60 and cols.max() <= 60  # margin
    assert abs((rows.min() + rows.max()) / 2 - 31.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 31.5) <= 1


def test_ink_coverage():
    assert kd.ink_coverage(Image.new("RGB", (16, 16), "white")) == 0.0
    assert kd.ink_coverage(Image.new("L", (16, 16), 0)) == 1.0
    half = np.full((4, 4, 3), 255, dtype=np.uint8)
    half[:2] = 0
    assert kd.ink_coverage(half) == 0.5
    assert kd.ink_coverage(half.astype(np.float32) / 255.0) == 0.5


@requires_data
def test_ink_coverage_of_rendered_glyph_is_plausible():
    renderer = kd.GlyphRenderer(kd.resolve_fonts(["gothic"])[0][1], resolution=64)
    assert 0.05 < kd.ink_coverage(renderer.render("水")) < 0.5
    assert 0.01 < kd.ink_coverage(renderer.render("一")) < kd.ink_coverage(renderer.render("鬱"))


# --------------------------------------------------------------------------- building


@requires_data
def test_build_writes_consistent_imagefolder(small_dataset):
    out, summary = small_dataset
    train_rows = _read_rows(out / "train")
    validation_rows = _read_rows(out / "validation")
    assert validation_rows and train_rows
    assert len(train_rows) == summary["num_train_images"] == 2 * summary["num_train_chars"]
    assert len(validation_rows) == summary["num_validation_images"]
    assert summary["num_train_chars"] + summary["num_validation_chars"] == 40
    assert summary["num_missing_glyphs"] == 0
    for split, rows in (("train", train_rows), ("validation", validation_rows)):
        assert sorted(p.name for p in (out / split).glob("*.png")) == sorted(r["file_name"] for r in rows)
        for row in rows:
            assert row["text"] == "kanji meaning " + ", ".join(row["meanings"][:3])
            assert row["font"] in ("gothic", "mincho") and row["file_name"].endswith(f"_{row['font']}.png")
    train_chars = {r["literal"] for r in train_rows}
    assert train_chars.isdisjoint(r["literal"] for r in validation_rows)
    with Image.open(out / "train" / train_rows[0]["file_name"]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["credits"] == kd.CREDITS and info["args"]["subset"] == "frequent:40"


@requires_data
def test_build_loads_with_datasets_imagefolder(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    out, summary = small_dataset
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "validation"}
    assert {"image", "text"} <= set(loaded["train"].column_names)
    assert loaded["train"].num_rows == summary["num_train_images"]
    assert loaded["validation"][0]["text"].startswith("kanji meaning ")


@requires_data
def test_build_is_deterministic(tmp_path):
    kwargs = dict(resolution=24, subset="frequent:30", fonts=("gothic", "mincho"), validation_fraction=0.2, seed=3)
    kd.build_kanji_dataset(tmp_path / "a", **kwargs)
    kd.build_kanji_dataset(tmp_path / "b", **kwargs)
    first, second = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert len(first) > 30 and first == second


@requires_data
def test_glyph_stats(small_dataset):
    out, summary = small_dataset
    stats = kd.glyph_stats(out)
    assert stats["count"] == summary["num_train_images"] + summary["num_validation_images"]
    assert 0.0 < stats["min"] <= stats["mean"] <= stats["max"] < 0.7


@requires_data
def test_output_dir_checks(tmp_path):
    as_file = tmp_path / "file"
    as_file.write_text("x")
    with pytest.raises(FileExistsError, match="existing file"):
        kd.build_kanji_dataset(as_file, subset="frequent:5")
    non_empty = tmp_path / "full"
    non_empty.mkdir()
    (non_empty / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        kd.build_kanji_dataset(non_empty, subset="frequent:5")
    (non_empty / "train").mkdir()
    (non_empty / "train" / "stale.png").write_bytes(b"old")
    kd.build_kanji_dataset(non_empty, resolution=16, subset="frequent:5", overwrite=True)
    assert not (non_empty / "train" / "stale.png").exists()
    assert (non_empty / "notes.txt").read_text() == "keep me"


@requires_data
def test_cli_main(tmp_path, capsys):
    out = tmp_path / "cli"
    summary = kd.main(["--output_dir", str(out), "--resolution", "16", "--subset", "grade:1", "--max_chars", "12"])
    assert summary["num_selected_chars"] == 12
    assert "Wrote" in capsys.readouterr().out
    assert (out / "train" / "metadata.jsonl").is_file()


# --------------------------------------------------------------------------- errors


def test_missing_dictionary_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "kanjidic2.xml.gz"
    monkeypatch.setattr(kd, "KANJIDIC2_SEARCH_PATHS", (missing,))
    with pytest.raises(FileNotFoundError) as error:
        kd.find_kanjidic2()
    assert str(missing) in str(error.value) and "apt-get install kanjidic-xml" in str(error.value)


def test_missing_font_error(tmp_path, monkeypatch):
    missing = tmp_path / "ipag.ttf"
    monkeypatch.setitem(kd.FONT_SEARCH_PATHS, "gothic", ("fonts-ipafont-gothic", (missing,)))
    with pytest.raises(FileNotFoundError) as error:
        kd.build_kanji_dataset(tmp_path / "out", subset="frequent:5")
    message = str(error.value)
    assert "'gothic'" in message and str(missing) in message and "apt-get install fonts-ipafont-gothic" in message
    assert not (tmp_path / "out").exists()  # nothing written before the font check
    with pytest.raises(ValueError, match="gothic"):
        kd.resolve_fonts(["comic-sans"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kd.resolve_fonts([str(tmp_path / "nope.otf")])


@pytest.mark.skipif(
    not Path("/usr/share/fonts/truetype/seto/setofont.ttf").is_file(), reason="needs `apt-get install fonts-seto`"
)
def test_seto_lacks_a_joyo_glyph_that_is_skipped():
    renderer = kd.GlyphRenderer(kd.resolve_fonts(["seto"])[0][1], resolution=32)
    assert renderer.render("水") is not None
    assert renderer.render("\U00020b9f") is None  # 𠮟 (joyo since 2010) is not in Seto
