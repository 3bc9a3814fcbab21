"""The training report anyone can open: every scalar a script logs is also appended to
`output_dir/report/metrics.jsonl`, and `output_dir/report/training_curves.png` is drawn from that file
at every checkpoint and at the end, with the latest validation grid beside it
(`report/latest_samples.png`). Needs no tracker: it works with `--report_to none` too.

The curves: the loss (raw and smoothed), the learning rate, the gradient norm, then one panel per
validation metric the script logs (`val/*` for the mask DiT, `eval/*` for segmentation, `vae/*` for a
VAE stage). A resumed run appends to the same file; for a step logged twice the last value counts.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil

from utils.atomic import atomic_file

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
SAMPLES_FILE = "latest_samples.png"
MAX_METRIC_PANELS = 6


def log_metrics(accelerator, values: dict, step: int) -> None:
    """`accelerator.log(values, step=step)`, and the same scalars as one line of report/metrics.jsonl."""
    accelerator.log(values, step=step)
    if not accelerator.is_main_process:
        return
    scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
    folder = os.path.join(accelerator.project_dir, REPORT_DIR)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, METRICS_FILE), "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": int(step), **scalars}) + "\n")


def read_metrics(output_dir: str) -> dict[str, dict[int, float]]:
    """{key: {step: value}} from report/metrics.jsonl (the last value of a step wins)."""
    series: dict[str, dict[int, float]] = {}
    path = os.path.join(output_dir, REPORT_DIR, METRICS_FILE)
    if not os.path.isfile(path):
        return series
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            step = record.pop("step", None)
            for key, value in record.items():
                series.setdefault(key, {})[step] = value
    return series


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased for the first points."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** index))
    return out


def _first_key(series: dict, *names: str) -> str | None:
    return next((name for name in names if name in series), None)


PANEL = (450, 320)  # pixels per panel (matplotlib's 4.5 x 3.2 in at 100 dpi, the size this report had)
MARGIN = dict(left=70, right=26, top=30, bottom=34)
RAW, SMOOTH, GRID, INK = (150, 190, 230), (31, 119, 180), (225, 225, 225), (40, 40, 40)


def _tick(value: float) -> str:
    return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def _draw_panel(draw, font, origin: tuple[int, int], name: str, steps: list, curves: list) -> None:
    """One panel: title, frame, grid, min/mid/max ticks on both axes, then each (values, colour, width) curve."""
    x0, y0 = origin[0] + MARGIN["left"], origin[1] + MARGIN["top"]
    x1, y1 = origin[0] + PANEL[0] - MARGIN["right"], origin[1] + PANEL[1] - MARGIN["bottom"]
    values = [v for curve, _, _ in curves for v in curve]
    low, high = min(values), max(values)
    if high == low:
        low, high = low - (abs(low) or 1.0) * 0.05, high + (abs(high) or 1.0) * 0.05
    first, last = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1
    to_x = lambda step: x0 + (x1 - x0) * (step - first) / (last - first)  # noqa: E731
    to_y = lambda value: y1 - (y1 - y0) * (value - low) / (high - low)  # noqa: E731
    draw.text((origin[0] + PANEL[0] // 2, origin[1] + 8), name, fill=INK, font=font, anchor="mt")
    for fraction in (0.0, 0.5, 1.0):
        y = y1 - (y1 - y0) * fraction
        x = x0 + (x1 - x0) * fraction
        draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.line([(x, y0), (x, y1)], fill=GRID)
        draw.text((x0 - 6, y), _tick(low + (high - low) * fraction), fill=INK, font=font, anchor="rm")
        draw.text((x, y1 + 6), str(round(first + (last - first) * fraction)), fill=INK, font=font, anchor="mt")
    draw.text(((x0 + x1) // 2, y1 + 20), "step", fill=INK, font=font, anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    for curve, colour, width in curves:
        points = [(to_x(step), to_y(value)) for step, value in zip(steps, curve)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=width)
        if len(points) <= 20:
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def write_report(output_dir: str, title: str) -> str | None:
    """Draw report/training_curves.png from report/metrics.jsonl and copy the newest sample grid next to it.
    Returns the PNG's path (None when nothing was logged yet).

    Drawn with PIL, not matplotlib: the report is redrawn after every checkpoint and at the end of every run, and
    matplotlib's import and layout cost 0.8 s each time on the 2-core CPU machine (measured with cProfile; it
    was the largest piece of the end-of-run time against diffusers' script, docs/PERFORMANCE.md); this takes
    about 20 ms."""
    from PIL import Image, ImageDraw, ImageFont

    series = read_metrics(output_dir)
    panels = []
    loss = _first_key(series, "train/loss", "train_loss")
    if loss:
        panels.append(("loss (raw, smoothed)", loss, True))
    for name, key in (("learning rate", "train/lr"), ("grad norm (pre-clip)", "train/grad_norm")):
        if key in series:
            panels.append((name, key, False))
    metric_keys = sorted((k for k in series if k.split("/")[0] in ("val", "eval", "vae")
                          and "/best_" not in k and not k.endswith("_std")),  # (running bests, spreads: no panel)
                         key=lambda k: (k != "val/loss", k))
    panels += [(key, key, False) for key in metric_keys[:MAX_METRIC_PANELS]]
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    header = 34
    image = Image.new("RGB", (PANEL[0] * columns, PANEL[1] * rows + header), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.text((image.width // 2, 10), title, fill=INK, font=ImageFont.load_default(size=15), anchor="mt")
    for index, (name, key, smooth) in enumerate(panels):
        steps = sorted(series[key])
        values = [series[key][step] for step in steps]
        curves = [(values, RAW if smooth else SMOOTH, 1 if smooth else 2)]
        if smooth and len(values) > 2:
            curves.append((smoothed(values), SMOOTH, 2))
        origin = (PANEL[0] * (index % columns), header + PANEL[1] * (index // columns))
        _draw_panel(draw, font, origin, name, steps, curves)
    folder = os.path.join(output_dir, REPORT_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CURVES_FILE)
    with atomic_file(path, suffix=".png") as temp:
        image.save(temp, format="PNG")
    grids = sorted(glob.glob(os.path.join(output_dir, "samples", "*.png")), key=os.path.getmtime)
    if grids:
        shutil.copyfile(grids[-1], os.path.join(folder, SAMPLES_FILE))
    return path


def try_write_report(accelerator, title: str) -> None:
    """`write_report` on the main process; a failure is a warning, never the end of a run."""
    if not accelerator.is_main_process:
        return
    try:
        write_report(accelerator.project_dir, title)
    except Exception as error:  # the report is optional: training and its checkpoints matter more
        logger.warning(f"Could not write the training report ({type(error).__name__}: {error}).")


def last_values(output_dir: str) -> dict[str, float]:
    """Each logged key's value at its last logged step (the run's final metrics)."""
    return {key: steps[max(steps)] for key, steps in read_metrics(output_dir).items() if steps}
