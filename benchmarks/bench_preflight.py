"""How long the pre-flight scan (utils/preflight.py) takes: N captioned images (default 10k PNGs),
scanned as train_text_to_image.py does (`utils.sd.data.usable_rows`: image headers + captions).

    python -m benchmarks.bench_preflight --num_images 10000 --size 512

Prints the measured seconds and files per second; `--results_dir` also writes them as JSON. The files
are written once into --workdir (reused when present); the first scan after writing them reads from
the page cache, as a scan right after copying a dataset would; `--drop_note` is printed to remind that
a cold disk is slower.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sys

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python benchmarks/bench_preflight.py` from anywhere
    sys.path.insert(0, REPO_ROOT)


def write_images(folder: str, count: int, size: int) -> None:
    os.makedirs(folder, exist_ok=True)
    existing = {name for name in os.listdir(folder) if name.endswith(".png")}
    if len(existing) >= count:
        return
    rng = np.random.default_rng(0)
    tile = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    for index in range(count):
        name = f"img{index:06d}.png"
        if name not in existing:
            tile.save(os.path.join(folder, name), compress_level=0)
            with open(os.path.join(folder, f"img{index:06d}.txt"), "w", encoding="utf-8") as handle:
                handle.write(f"a picture of thing {index}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=10000)
    parser.add_argument("--size", type=int, default=512, help="Image side in pixels (headers do not depend on it).")
    parser.add_argument("--workdir", default="benchmarks/work/preflight")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results_dir", default=None)
    args = parser.parse_args(argv)

    from utils.sd.data import load_text_image_dataset, usable_rows

    folder = os.path.join(args.workdir, f"{args.num_images}x{args.size}")
    write_images(folder, args.num_images, args.size)
    import train_text_to_image  # the script's own flags and defaults, so this cannot drift from them

    data_args = train_text_to_image.parse_args(["--train_data_dir", folder, "--model_preset", "tiny", "--seed", "0",
                                                "--output_dir", os.path.join(args.workdir, "unused")])
    start = time.perf_counter()
    rows = load_text_image_dataset(data_args)
    listing_s = time.perf_counter() - start
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        usable = usable_rows(data_args, rows)
        timings.append(time.perf_counter() - start)
    assert len(usable) == len(rows) == args.num_images
    result = {"num_images": args.num_images, "size": args.size, "listing_and_captions_s": round(listing_s, 3),
              "scan_s": timings, "scan_s_best": min(timings),
              "files_per_s": round(args.num_images / min(timings)), "seconds_per_10k": round(min(timings) * 1e4 /
                                                                                            args.num_images, 3)}
    print(json.dumps(result, indent=1))
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        with open(os.path.join(args.results_dir, "preflight.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
