#!/usr/bin/env python
"""How fast a SIGTERM becomes a saved checkpoint, and what the per-step stop check costs.

    python benchmarks/bench_stop.py --repeats 3 --results_dir benchmarks/results

1. Stop latency: each trainer (the reliability tests' tiny runs: mask DiT, MSHNet, text-to-image) is
   started under `accelerate launch` in its own process group; after its first checkpoint the group
   gets a SIGTERM (a preemption), and the time until every process has exited is measured, with the
   optimizer steps that ran after the signal (the trainer reports them). `accelerate launch` SIGKILLs
   its child 5 s after forwarding the signal, so the latency must stay under that on a loaded machine.
2. The cost of checking the stop flag at every step with several processes: one 1-element all-reduce
   (`StopSignal.should_stop`) timed over 2 gloo processes on this machine, next to the step time.
Prints a table and writes stop-latency.json into --results_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "tests")]

ALL_REDUCE_PROBE = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
from accelerate import Accelerator
from utils.stopping import StopSignal
accelerator = Accelerator(cpu=True)
stop = StopSignal()
for _ in range(20):
    stop.should_stop(accelerator)
start = time.perf_counter()
for _ in range({calls}):
    stop.should_stop(accelerator)
elapsed = (time.perf_counter() - start) / {calls}
if accelerator.is_main_process:
    print("PER_CALL_S", elapsed)
accelerator.end_training()
"""


def stop_latency(case, workdir: str) -> dict:
    from test_reliability import checkpoint_steps, signal_group, start, wait_for, wait_group

    script, make_args, _, _ = case(__import__("pathlib").Path(workdir))
    output_dir = os.path.join(workdir, "out")
    process = start(script, make_args(output_dir, "--max_train_steps", "400", "--logging_steps", "50"),
                    os.path.join(workdir, "run.log"))
    wait_for(lambda: checkpoint_steps(output_dir), process)
    signalled = time.monotonic()
    signal_group(process, signal.SIGTERM)
    wait_group(process)
    latency = time.monotonic() - signalled
    log = open(os.path.join(workdir, "run.log")).read()
    announced = log.split("Stopped by SIGTERM at step ")[1].split("\n")[0] if "Stopped by" in log else ""
    after = announced.split("(")[1].split(" step")[0] if "(" in announced else None  # (older versions: not said)
    return {"latency_s": latency, "steps_after_signal": int(after) if after is not None else None,
            "exit_code": process.returncode}


def all_reduce_cost(calls: int) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        probe = os.path.join(workdir, "probe.py")
        with open(probe, "w") as handle:
            handle.write(ALL_REDUCE_PROBE.format(root=REPO_ROOT, calls=calls))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", probe],
                             env=env, capture_output=True, text=True, timeout=600, check=True).stdout
        return float(out.split("PER_CALL_S")[1].split()[0])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--all_reduce_calls", type=int, default=2000)
    parser.add_argument("--results_dir", default=None)
    args = parser.parse_args(argv)
    from test_reliability import mask_dit_case, segmentation_case

    cases = {"train_mask_dit": mask_dit_case, "train_segmentation_tpu": segmentation_case}
    result = {"machine": {"cores": len(os.sched_getaffinity(0)), "load_1min": os.getloadavg()[0]}, "stop": {}}
    for name, case in cases.items():
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as workdir:
                runs.append(stop_latency(case, workdir))
        latencies = [r["latency_s"] for r in runs]
        result["stop"][name] = {"runs": runs, "latency_median_s": statistics.median(latencies),
                                "latency_max_s": max(latencies)}
        print(f"{name:24s} SIGTERM -> exit: median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s; "
              f"steps after the signal: {[r['steps_after_signal'] for r in runs]}")
    per_call = all_reduce_cost(args.all_reduce_calls)
    result["stop_check_all_reduce_s"] = per_call
    print(f"stop check with 2 gloo processes: {per_call * 1e6:.0f} us per step")
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        with open(os.path.join(args.results_dir, "stop-latency.json"), "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
