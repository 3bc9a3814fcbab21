#!/usr/bin/env python
"""Run a training script and record when each of its optimizer steps ends, from the outside.

    python benchmarks/step_timer.py --out timing.json SCRIPT.py [script args...]

Both our scripts and diffusers' examples advance a tqdm bar named "Steps" once per optimizer
step. This wrapper times those updates (time.perf_counter) without touching the script's code,
so ours and a reference script are measured identically. At exit it writes JSON:
{"timestamps": [s, ...], "cpu_timestamps": [s, ...] (process CPU time, all threads),
 "peak_rss_bytes": int, "cuda_max_allocated_bytes": int|null, "start_time": s, "exit_time": s}.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import runpy
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Where to write the timing JSON.")
    parser.add_argument("--desc", default="Steps", help="The tqdm bar (desc) that counts optimizer steps.")
    parser.add_argument("--event", default="tqdm", choices=["tqdm", "optimizer"],
                        help="What marks a step: the tqdm bar's update, or any torch optimizer's step() "
                             "(for scripts without a progress bar, e.g. train_mask_dit.py).")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    import tqdm.std

    start = time.perf_counter()
    timestamps: list[float] = []
    cpu_timestamps: list[float] = []
    original_update = tqdm.std.tqdm.update

    def timed_update(bar, n=1):
        if getattr(bar, "desc", "").startswith(args.desc):
            timestamps.extend([time.perf_counter()] * int(n or 1))
            cpu_timestamps.extend([time.process_time()] * int(n or 1))
        return original_update(bar, n)

    if args.event == "tqdm":
        tqdm.std.tqdm.update = timed_update
    else:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def after_optimizer_step(optimizer, step_args, step_kwargs):
            timestamps.append(time.perf_counter())
            cpu_timestamps.append(time.process_time())
        register_optimizer_step_post_hook(after_optimizer_step)

    def write_report() -> None:
        cuda_peak = None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_peak = int(torch.cuda.max_memory_allocated())
        report = {"timestamps": timestamps, "cpu_timestamps": cpu_timestamps, "start_time": start, "exit_time": time.perf_counter(),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "cuda_max_allocated_bytes": cuda_peak}
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle)

    atexit.register(write_report)
    script = os.path.abspath(args.script)
    sys.argv = [script] + args.script_args
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
