"""Build an `imagefolder` dataset of rendered kanji with English-meaning captions.

Source data: KANJIDIC2 (Debian package `kanjidic-xml`) for characters, meanings,
school grade, stroke count and newspaper frequency; IPA Gothic / IPA Mincho
(`fonts-ipafont-gothic`, `fonts-ipafont-mincho`) and optionally Seto
(`fonts-seto`) for glyphs.

Output layout (loads with `datasets.load_dataset("imagefolder", data_dir=out)`):

    <out>/train/<cp>_<font>.png + metadata.jsonl
    <out>/validation/<cp>_<font>.png + metadata.jsonl
    <out>/dataset_info.json          (arguments, counts, credits)

One image per (kanji, font): several fonts act as style augmentation of the same
caption. The train/validation split is made per *character*, so validation
kanji are never seen in training, in any font.

CLI:
    python -m utils.sd.kanji_dataset --output_dir data/kanji --subset joyo \
        --resolution 64 --fonts gothic mincho
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFont

from utils.errors import UserError, UserFileNotFoundError

CREDITS = (
    "Kanji data: KANJIDIC2, Copyright (C) the Electronic Dictionary Research and "
    "Development Group (EDRDG), used under the Creative Commons Attribution-ShareAlike "
    "4.0 International licence (CC BY-SA 4.0) in conformance with the EDRDG licence, "
    "https://www.edrdg.org/edrdg/licence.html. "
    "Fonts: IPA Gothic and IPA Mincho (IPAfont 00303), Copyright (C) Information-technology "
    "Promotion Agency, Japan (IPA), under the IPA Font License Agreement v1.0. "
    "Seto font (setofont), Copyright (C) 2003-2014 Nozomi Seto, under the SIL Open Font "
    "License, Version 1.1 (OFL-1.1). "
    "The rendered images and captions are derived from KANJIDIC2 and are distributed "
    "under CC BY-SA 4.0."
)

# Debian's kanjidic-xml installs /usr/share/edict/kanjidic2.xml.gz; the rest are
# the usual places for a manually downloaded copy.
KANJIDIC2_SEARCH_PATHS: tuple[Path, ...] = (
    Path("/usr/share/edict/kanjidic2.xml.gz"),
    Path("/usr/share/edict/kanjidic2.xml"),
    Path("/usr/share/xml/kanjidic2/kanjidic2.xml.gz"),
    Path("/usr/share/kanjidic2/kanjidic2.xml.gz"),
)

# Font name -> (Debian package, candidate files in preference order).
FONT_SEARCH_PATHS: dict[str, tuple[str, tuple[Path, ...]]] = {
    "gothic": (
        "fonts-ipafont-gothic",
        (
            Path("/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf"),
            Path("/usr/share/fonts/truetype/ipafont-gothic/ipag.ttf"),
            Path("/usr/share/fonts/truetype/fonts-japanese-gothic.ttf"),
        ),
    ),
    "mincho": (
        "fonts-ipafont-mincho",
        (
            Path("/usr/share/fonts/opentype/ipafont-mincho/ipam.ttf"),
            Path("/usr/share/fonts/truetype/ipafont-mincho/ipam.ttf"),
            Path("/usr/share/fonts/truetype/fonts-japanese-mincho.ttf"),
        ),
    ),
    "seto": (
        "fonts-seto",
        (
            Path("/usr/share/fonts/truetype/seto/setofont.ttf"),
            Path("/usr/share/fonts/opentype/seto/setofont.ttf"),
        ),
    ),
}

# Margin on each side of the glyph box, as a fraction of the image side (4 px at 64 px).
MARGIN_FRACTION = 0.0625
# A noncharacter no font maps: rendering it shows the font's .notdef ("tofu") glyph.
NOTDEF_PROBE = "\U0010ffff"
JOYO_GRADES = (1, 2, 3, 4, 5, 6, 8)  # KANJIDIC2: 1-6 kyoiku, 8 rest of joyo, 9/10 jinmeiyo
DARK_THRESHOLD = 128  # grayscale value below which a pixel counts as ink
METADATA_FILE = "metadata.jsonl"
INFO_FILE = "dataset_info.json"


@dataclass(frozen=True)
class KanjiRecord:
    """One KANJIDIC2 character.

    `grade` is None for ungraded kanji; `freq` is the newspaper frequency rank
    (1 = most frequent, only the top ~2500 have one), else None.
    """

    literal: str
    meanings: tuple[str, ...]
    grade: int | None
    stroke_count: int | None
    freq: int | None

    @property
    def codepoint(self) -> str:
        return f"U+{ord(self.literal):04X}"


# --------------------------------------------------------------------------- KANJIDIC2


def find_kanjidic2(path: str | Path | None = None) -> Path:
    """Return the KANJIDIC2 file: `path` if given, else the first existing search path."""
    candidates = (Path(path),) if path is not None else KANJIDIC2_SEARCH_PATHS
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise UserFileNotFoundError(
        f"KANJIDIC2 dictionary not found (searched: {searched}). "
        "Install it with `apt-get install kanjidic-xml`, or pass --kanjidic PATH to a "
        "kanjidic2.xml[.gz] downloaded from https://www.edrdg.org/wiki/index.php/KANJIDIC_Project."
    )


def _open_xml(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.strip() else None


def read_kanjidic2_header(path: str | Path | None = None) -> dict[str, str]:
    """Return the KANJIDIC2 header ({'file_version', 'database_version', 'date_of_creation'})."""
    header: dict[str, str] = {}
    with _open_xml(find_kanjidic2(path)) as stream:
        for _, element in ET.iterparse(stream, events=("end",)):
            if element.tag in ("file_version", "database_version", "date_of_creation"):
                header[element.tag] = (element.text or "").strip()
            elif element.tag in ("header", "character"):
                break
    return header


def parse_kanjidic2(path: str | Path | None = None) -> list[KanjiRecord]:
    """Parse every character of KANJIDIC2 in file order (streaming; ~0.5 s for 13k chars).

    Only English meanings (no `m_lang` attribute) are kept; the first
    `stroke_count` is the accepted one (later ones are common miscounts).
    Results are cached per (path, size, mtime) within the process.
    """
    resolved = find_kanjidic2(path).resolve()
    stat = resolved.stat()
    return list(_parse_kanjidic2_cached(str(resolved), stat.st_size, stat.st_mtime_ns))


@lru_cache(maxsize=4)
def _parse_kanjidic2_cached(path: str, size: int, mtime_ns: int) -> tuple[KanjiRecord, ...]:
    records = []
    with _open_xml(Path(path)) as stream:
        context = ET.iterparse(stream, events=("start", "end"))
        _, root = next(context)
        for event, element in context:
            if event != "end" or element.tag != "character":
                continue
            misc = element.find("misc")
            meanings = tuple(
                m.text.strip()
                for m in element.iterfind("reading_meaning/rmgroup/meaning")
                if "m_lang" not in m.attrib and m.text and m.text.strip()
            )
            records.append(
                KanjiRecord(
                    literal=element.findtext("literal"),
                    meanings=meanings,
                    grade=_int_or_none(misc.findtext("grade")) if misc is not None else None,
                    stroke_count=_int_or_none(misc.findtext("stroke_count")) if misc is not None else None,
                    freq=_int_or_none(misc.findtext("freq")) if misc is not None else None,
                )
            )
            root.clear()  # keep memory flat: drop finished <character> elements
    return tuple(records)


# --------------------------------------------------------------------------- selection


def frequency_order_key(record: KanjiRecord) -> tuple[int, int]:
    """Sort key: by frequency rank (unranked last), then by codepoint."""
    return (record.freq if record.freq is not None else sys.maxsize, ord(record.literal))


def select_subset(
    records: Iterable[KanjiRecord], subset: str = "joyo", max_chars: int | None = None
) -> list[KanjiRecord]:
    """Pick kanji with at least one English meaning, ordered by `frequency_order_key`.

    subset: "joyo" (grades 1-6 and 8, 2136 chars), "grade:N" (grade <= N; 9/10 add
    jinmeiyo), "frequent:N" (the N most frequent), "all" (every kanji with meanings).
    max_chars: keep only the first `max_chars` in that order.
    """
    candidates = sorted((r for r in records if r.meanings), key=frequency_order_key)
    name, _, value = subset.partition(":")
    if name == "joyo" and not value:
        selected = [r for r in candidates if r.grade in JOYO_GRADES]
    elif name == "all" and not value:
        selected = candidates
    elif name in ("grade", "frequent") and value.isdigit() and int(value) > 0:
        limit = int(value)
        if name == "grade":
            selected = [r for r in candidates if r.grade is not None and r.grade <= limit]
        else:
            selected = [r for r in candidates if r.freq is not None][:limit]
    else:
        raise UserError(
            f"Unknown subset {subset!r}: use 'joyo', 'all', 'grade:N' (e.g. 'grade:6') "
            "or 'frequent:N' (e.g. 'frequent:500') with N a positive integer."
        )
    if max_chars is not None:
        if max_chars <= 0:
            raise UserError(f"max_chars must be a positive integer, got {max_chars}.")
        selected = selected[:max_chars]
    return selected


def caption_for(record: KanjiRecord) -> str:
    """'kanji meaning water, river' from the first <= 3 English meanings.

    Pure annotations such as '(kokuji)' are skipped unless they are all there is.
    """
    meanings = [m for m in record.meanings if not (m.startswith("(") and m.endswith(")"))]
    return "kanji meaning " + ", ".join((meanings or list(record.meanings))[:3])


def is_validation_char(literal: str, seed: int, validation_fraction: float) -> bool:
    """Deterministic per-character split: sha256(seed, char) below the fraction.

    Depends only on (seed, char), so a character keeps its split across subsets and
    `max_chars` (validation kanji of `frequent:500` are never training kanji of `joyo`).
    """
    digest = hashlib.sha256(f"{seed}:{literal}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def split_by_character(
    records: Sequence[KanjiRecord], validation_fraction: float, seed: int
) -> tuple[list[KanjiRecord], list[KanjiRecord]]:
    """Split into (train, validation) by `is_validation_char`, keeping input order.

    With fraction > 0 the validation split gets at least one character (the one with
    the smallest hash) and train keeps at least one.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise UserError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    train = [r for r in records if not is_validation_char(r.literal, seed, validation_fraction)]
    validation = [r for r in records if is_validation_char(r.literal, seed, validation_fraction)]
    if validation_fraction > 0 and not validation and len(train) > 1:
        ranked = min(train, key=lambda r: hashlib.sha256(f"{seed}:{r.literal}".encode()).digest())
        train.remove(ranked)
        validation.append(ranked)
    if not train and validation:
        train.append(validation.pop())
    return train, validation


# --------------------------------------------------------------------------- fonts & rendering


def resolve_fonts(fonts: Sequence[str]) -> list[tuple[str, Path]]:
    """Map font names ('gothic', 'mincho', 'seto') or .ttf/.otf/.ttc paths to (name, file)."""
    resolved: list[tuple[str, Path]] = []
    for font in fonts:
        if font in FONT_SEARCH_PATHS:
            package, candidates = FONT_SEARCH_PATHS[font]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                searched = ", ".join(str(c) for c in candidates)
                raise UserFileNotFoundError(
                    f"Font {font!r} not found (searched: {searched}). "
                    f"Install it with `apt-get install {package}`, or pass a .ttf/.otf path."
                )
            resolved.append((font, path))
        elif Path(font).suffix.lower() in (".ttf", ".otf", ".ttc"):
            path = Path(font)
            if not path.is_file():
                raise UserFileNotFoundError(f"Font file {font!r} does not exist; check the path.")
            resolved.append((re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem), path))
        else:
            raise UserError(
                f"Unknown font {font!r}: use one of {sorted(FONT_SEARCH_PATHS)} "
                "or a path to a .ttf/.otf/.ttc file."
            )
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise UserError(f"Fonts must have distinct names, got {names}.")
    return resolved


class GlyphRenderer:
    """Render single characters of one font as black-on-white [res, res] RGB images.

    The glyph's ink bounding box is centered in the image; the font size is
    `resolution - 2 * margin`, shrunk for the rare glyph whose ink exceeds that box.
    Characters the font lacks (empty ink or the font's .notdef glyph) give None.
    """

    def __init__(self, font_path: str | Path, resolution: int = 64, margin_fraction: float = MARGIN_FRACTION):
        if resolution < 8:
            raise UserError(f"resolution must be >= 8 pixels, got {resolution}.")
        self.font_path = str(font_path)
        self.resolution = resolution
        self.box = resolution - 2 * round(resolution * margin_fraction)
        self._fonts: dict[int, ImageFont.FreeTypeFont] = {}
        self._notdef = self._ink_mask(NOTDEF_PROBE, self.box)

    def _font(self, size: int) -> ImageFont.FreeTypeFont:
        if size not in self._fonts:
            # BASIC layout: no raqm dependency, same pixels on every machine with this FreeType.
            self._fonts[size] = ImageFont.truetype(self.font_path, size, layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[size]

    def _ink_mask(self, char: str, size: int) -> Image.Image | None:
        """Antialiased coverage mask ('L', 255 = ink) cropped to its ink bbox, or None if blank."""
        mask = self._font(size).getmask(char)
        if mask.size[0] == 0 or mask.size[1] == 0:
            return None
        image = Image.frombytes("L", mask.size, bytes(mask))
        bbox = image.getbbox()
        return image.crop(bbox) if bbox else None

    def has_glyph(self, char: str) -> bool:
        return self.render(char) is not None

    def render(self, char: str) -> Image.Image | None:
        """Return an RGB [res, res] image of `char`, or None when the font has no glyph."""
        size = self.box
        mask = self._ink_mask(char, size)
        if mask is None or (
            self._notdef is not None and mask.size == self._notdef.size and mask.tobytes() == self._notdef.tobytes()
        ):
            return None
        if max(mask.size) > self.box:  # overhanging glyph: shrink once to fit
            size = max(1, self.box * self.box // max(mask.size))
            mask = self._ink_mask(char, size)
        canvas = Image.new("L", (self.resolution, self.resolution), 255)
        left = (self.resolution - mask.size[0]) // 2
        top = (self.resolution - mask.size[1]) // 2
        canvas.paste(0, (left, top, left + mask.size[0], top + mask.size[1]), mask)
        return canvas.convert("RGB")


# --------------------------------------------------------------------------- building


def _prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"Output path {output_dir} is an existing file; choose a directory path.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"Output directory {output_dir} is not empty; pass --overwrite (overwrite=True) "
                "to replace its train/, validation/ and dataset_info.json, or choose another directory."
            )
        # Only remove what this builder writes; anything else the user put there stays.
        for split in ("train", "validation"):
            shutil.rmtree(output_dir / split, ignore_errors=True)
        (output_dir / INFO_FILE).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def _write_split(
    split_dir: Path,
    records: Sequence[KanjiRecord],
    renderers: Sequence[tuple[str, GlyphRenderer]],
    missing: dict[str, list[str]],
) -> set[str]:
    """Render `records` x fonts into `split_dir`; return the characters that got an image."""
    split_dir.mkdir(parents=True, exist_ok=True)
    rendered_chars: set[str] = set()
    with open(split_dir / METADATA_FILE, "w", encoding="utf-8", newline="\n") as metadata:
        for record in records:
            for font_name, renderer in renderers:
                image = renderer.render(record.literal)
                if image is None:
                    missing[font_name].append(record.literal)
                    continue
                file_name = f"{ord(record.literal):05x}_{font_name}.png"
                # Fixed PNG parameters and no text chunks: identical bytes for identical inputs.
                image.save(split_dir / file_name, format="PNG", optimize=False, compress_level=6)
                row = {
                    "file_name": file_name,
                    "text": caption_for(record),
                    "literal": record.literal,
                    "codepoint": record.codepoint,
                    "meanings": list(record.meanings),
                    # 0 instead of null: a split whose column is all-null gets a 'null' type
                    # and datasets then refuses to load the splits together.
                    "grade": record.grade or 0,
                    "stroke_count": record.stroke_count or 0,
                    "freq": record.freq or 0,
                    "font": font_name,
                }
                metadata.write(json.dumps(row, ensure_ascii=False) + "\n")
                rendered_chars.add(record.literal)
    return rendered_chars


def build_kanji_dataset(
    output_dir: str | Path,
    resolution: int = 64,
    subset: str = "joyo",
    max_chars: int | None = None,
    fonts: Sequence[str] = ("gothic",),
    validation_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
    *,
    kanjidic_path: str | Path | None = None,
) -> dict:
    """Render a kanji `imagefolder` dataset into `output_dir` and return its summary.

    Images are [resolution, resolution] RGB PNGs, one per (kanji, font). The split is
    by character (see `is_validation_char`); with validation_fraction=0 no
    validation/ is written. Metadata rows: file_name, text, literal, codepoint,
    meanings, grade, stroke_count, freq (0 where KANJIDIC2 has none), font.
    Same arguments -> byte-identical files. The summary
    (also written to dataset_info.json) holds the arguments, counts, missing glyphs
    per font and `CREDITS`.
    """
    output_dir = Path(output_dir)
    font_files = resolve_fonts(fonts)  # fail on a missing font before touching the disk
    kanjidic = find_kanjidic2(kanjidic_path)
    records = select_subset(parse_kanjidic2(kanjidic), subset, max_chars)
    if not records:
        raise UserError(f"Subset {subset!r} (max_chars={max_chars}) selects no kanji.")
    train, validation = split_by_character(records, validation_fraction, seed)
    renderers = [(name, GlyphRenderer(path, resolution)) for name, path in font_files]
    _prepare_output_dir(output_dir, overwrite)

    missing: dict[str, list[str]] = {name: [] for name, _ in font_files}
    train_chars = _write_split(output_dir / "train", train, renderers, missing)
    validation_chars = _write_split(output_dir / "validation", validation, renderers, missing) if validation else set()
    if not train_chars:
        raise RuntimeError(f"No glyph of subset {subset!r} could be rendered with fonts {list(fonts)}.")

    num_images = {
        split: sum(1 for _ in open(output_dir / split / METADATA_FILE, encoding="utf-8"))
        for split in (("train", "validation") if validation else ("train",))
    }
    summary = {
        "args": {
            "resolution": resolution,
            "subset": subset,
            "max_chars": max_chars,
            "fonts": list(fonts),
            "validation_fraction": validation_fraction,
            "seed": seed,
        },
        "kanjidic2": {"file": str(kanjidic), **read_kanjidic2_header(kanjidic)},
        "font_files": {name: str(path) for name, path in font_files},
        "num_selected_chars": len(records),
        "num_train_chars": len(train_chars),
        "num_validation_chars": len(validation_chars),
        "num_train_images": num_images["train"],
        "num_validation_images": num_images.get("validation", 0),
        "num_missing_glyphs": sum(len(chars) for chars in missing.values()),
        "num_chars_without_any_glyph": len(records) - len(train_chars) - len(validation_chars),
        "missing_glyphs": {name: "".join(chars) for name, chars in missing.items()},
        "caption_format": "kanji meaning <first up to 3 English meanings, comma-separated>",
        "field_notes": "grade: KANJIDIC2 school grade (1-6 kyoiku, 8 other joyo, 9-10 jinmeiyo, 0 none); "
        "freq: newspaper frequency rank (1 = most frequent, 0 = unranked); stroke_count 0 = unknown.",
        "credits": CREDITS,
    }
    with open(output_dir / INFO_FILE, "w", encoding="utf-8", newline="\n") as info:
        json.dump(summary, info, ensure_ascii=False, indent=2)
        info.write("\n")
    return summary


# --------------------------------------------------------------------------- glyph statistics


def ink_coverage(image) -> float:
    """Fraction of dark pixels (grayscale < 128) in [0, 1].

    image: PIL image (any mode), or array [H, W] / [H, W, C] of uint8 in [0, 255]
    or float in [0, 1].
    """
    if isinstance(image, Image.Image):
        gray = np.asarray(image.convert("L"), dtype=np.float32)
    else:
        array = np.asarray(image)
        if array.ndim == 3:
            array = array[..., :3].mean(axis=-1) if array.shape[-1] >= 3 else array[..., 0]
        if array.ndim != 2:
            raise ValueError(f"ink_coverage expects [H, W] or [H, W, C], got shape {np.shape(image)}.")
        gray = array.astype(np.float32) * (255.0 if np.issubdtype(array.dtype, np.floating) else 1.0)
    if gray.size == 0:
        raise ValueError("ink_coverage got an empty image.")
    return float((gray < DARK_THRESHOLD).mean())


def glyph_stats(dataset_dir: str | Path, splits: Sequence[str] = ("train", "validation")) -> dict[str, float]:
    """Min / mean / max ink coverage over the real glyph images of a built dataset.

    Returns {'min', 'mean', 'max', 'count'}; reads every PNG listed in the splits'
    metadata.jsonl (splits that do not exist are skipped).
    """
    dataset_dir = Path(dataset_dir)
    coverages = []
    for split in splits:
        metadata_path = dataset_dir / split / METADATA_FILE
        if not metadata_path.is_file():
            continue
        with open(metadata_path, encoding="utf-8") as metadata:
            for line in metadata:
                with Image.open(dataset_dir / split / json.loads(line)["file_name"]) as image:
                    coverages.append(ink_coverage(image))
    if not coverages:
        raise UserFileNotFoundError(
            f"No glyph images found under {dataset_dir} (looked for {'/'.join(splits)}/{METADATA_FILE}); "
            "build one with `python -m utils.sd.kanji_dataset --output_dir DIR`."
        )
    values = np.asarray(coverages)
    return {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max()), "count": len(coverages)}


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Render KANJIDIC2 kanji into an imagefolder dataset.")
    parser.add_argument("--output_dir", required=True, help="Directory to write train/, validation/ into.")
    parser.add_argument("--resolution", type=int, default=64, help="Image side in pixels.")
    parser.add_argument("--subset", default="joyo", help="joyo | all | grade:N | frequent:N")
    parser.add_argument("--max_chars", type=int, default=None, help="Keep the N most frequent of the subset.")
    parser.add_argument(
        "--fonts", nargs="+", default=["gothic"], help="Font names (gothic, mincho, seto) or .ttf/.otf paths."
    )
    parser.add_argument("--validation_fraction", type=float, default=0.05, help="Fraction of characters held out.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the per-character split.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty output.")
    parser.add_argument("--kanjidic", default=None, help="Path to kanjidic2.xml[.gz] (default: Debian location).")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    summary = build_kanji_dataset(
        args.output_dir,
        resolution=args.resolution,
        subset=args.subset,
        max_chars=args.max_chars,
        fonts=tuple(args.fonts),
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        kanjidic_path=args.kanjidic,
    )
    counts = {k: v for k, v in summary.items() if k.startswith("num_")}
    print(f"Wrote {args.output_dir} in {time.perf_counter() - start:.1f} s: {json.dumps(counts)}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        sys.exit(f"error: {error}")
