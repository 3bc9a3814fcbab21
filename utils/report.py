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


def write_report(output_dir: str, title: str) -> str | None:
    """Draw report/training_curves.png from report/metrics.jsonl and copy the newest sample grid next to it.
    Returns the PNG's path (None when nothing was logged yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(output_dir)
    panels = []
    loss = _first_key(series, "train/loss", "train_loss")
    if loss:
        panels.append(("loss", loss, True))
    for name, key in (("learning rate", "train/lr"), ("grad norm (pre-clip)", "train/grad_norm")):
        if key in series:
            panels.append((name, key, False))
    metric_keys = sorted(k for k in series if k.split("/")[0] in ("val", "eval", "vae"))
    panels += [(key, key, False) for key in metric_keys[:MAX_METRIC_PANELS]]
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axis, (name, key, smooth) in zip(axes.flat, panels):
        steps = sorted(series[key])
        values = [series[key][s] for s in steps]
        axis.plot(steps, values, alpha=0.35 if smooth else 1.0, marker="" if len(steps) > 20 else "o",
                  label="logged" if smooth else None)
        if smooth and len(values) > 2:
            axis.plot(steps, smoothed(values), label="smoothed")
            axis.legend(fontsize=8)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    folder = os.path.join(output_dir, REPORT_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CURVES_FILE)
    with atomic_file(path, suffix=".png") as temp:  # (matplotlib picks the format from the extension)
        figure.savefig(temp, dpi=100)
    plt.close(figure)
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
