"""What the benchmark commands share: run a training script under step_timer, alternate variants
and repeats, reduce step timestamps to statistics, count FLOPs, describe the machine, write results.

A `bench_<script>.py` builds its inputs (synthetic data, a randomly initialised model), lists its
variants and the flags each one gets, and calls `run_benchmark`:

    variants = [variant("ours", OUR_SCRIPT), *reference_variants(args)]
    result = run_benchmark(args, argv, "bench_x.py", name, variants, flags_for, workdir, batch_size, flops)

Each variant is run `--repeats` times, alternating (ours, ours+cache, reference, ours, ...), as a
separate process with the flags `flags_for(variant, output_dir)` returns plus the variant's own.
`benchmarks/step_timer.py` records when each optimizer step ends (the "Steps" tqdm bar, or every
torch.optim step for scripts without one); the first `--warmup_steps` are dropped, the next
`--steps` measured.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_TIMER = os.path.join(REPO_ROOT, "benchmarks", "step_timer.py")
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for MFU; pass --peak_tflops for other devices/dtypes.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


# ----------------------------------------------------------------------------------------------
# Command line and variants
# ----------------------------------------------------------------------------------------------

def add_harness_args(parser, reference_help: str, reference_event: str = "tqdm",
                     ours_only_note: str = "") -> None:
    """The flags every benchmark command has (precision, workers, repeats, threads, reference, results).

    ours_only_note: appended to --mixed_precision/--dataloader_num_workers' help where the reference
    does not get them."""
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help=ours_only_note or None)
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help=ours_only_note or None)
    parser.add_argument("--warmup_steps", type=int, default=3, help="Steps run before measuring (at least 1).")
    parser.add_argument("--steps", type=int, default=20, help="Measured steps per run.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per variant, alternated.")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS/MKL_NUM_THREADS for every run (default: torch's choice). 1 makes CPU-time numbers exact.")
    parser.add_argument("--extra_args", default="", help="More flags for our script only, e.g. '--allow_tf32'.")
    parser.add_argument("--reference", default=None, help=reference_help)
    parser.add_argument("--reference_pythonpath", default=None,
                        help="Extra PYTHONPATH entries for the reference runs only (e.g. a torchvision stand-in).")
    parser.add_argument("--reference_event", default=reference_event, choices=["tqdm", "optimizer"],
                        help="What marks the reference's steps: its 'Steps' tqdm bar, or every torch optimizer step().")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Device peak for MFU (default: by GPU name).")
    parser.add_argument("--workdir", default=None, help="Where data, models and run outputs go (default: a temp dir).")
    parser.add_argument("--results_dir", default=None, help="Write <name>.json and <name>.md here.")
    parser.add_argument("--name", default=None, help="Result file name (default: from the settings).")
    parser.add_argument("--seed", type=int, default=0)


def check_harness_args(parser, args) -> None:
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup_steps and --steps must be >= 1")


def make_workdir(args, prefix: str) -> str:
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix=prefix))
    os.makedirs(workdir, exist_ok=True)
    return workdir


def variant(name: str, script: str, extra=(), pythonpath: str | None = None, event: str = "tqdm") -> dict:
    """One thing to time: `script` run with the shared flags plus `extra`; `event` marks its steps (step_timer)."""
    return {"name": name, "script": os.path.abspath(script), "extra": list(extra), "pythonpath": pythonpath, "event": event}


def reference_variants(args) -> list[dict]:
    if not args.reference:
        return []
    return [variant("reference", args.reference, pythonpath=args.reference_pythonpath, event=args.reference_event)]


@functools.lru_cache(maxsize=None)
def script_accepts(script: str, flag: str) -> bool:
    """Whether `python script --help` lists `flag` (for features that may not have landed in a script yet)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, script, "--help"], cwd=os.path.dirname(os.path.abspath(script)), env=env,
                            capture_output=True, text=True, timeout=300)
    return result.returncode == 0 and flag in result.stdout.split()


# ----------------------------------------------------------------------------------------------
# Runs and metrics
# ----------------------------------------------------------------------------------------------

def run_once(variant: dict, flags: list[str], workdir: str, run_id: str, threads: int | None = None) -> dict:
    """Run one variant under step_timer (cwd = workdir); returns step_timer's JSON plus the process's wall_s."""
    timing_path = os.path.join(workdir, f"timing-{run_id}.json")
    log_path = os.path.join(workdir, f"log-{run_id}.txt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (variant.get("pythonpath"), env.get("PYTHONPATH")) if p)
    cmd = ([sys.executable, STEP_TIMER, "--out", timing_path, "--event", variant.get("event", "tqdm"), variant["script"]]
           + flags + variant["extra"])
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = open(log_path, encoding="utf-8", errors="replace").read()[-4000:]
        raise RuntimeError(f"{variant['name']} run failed (exit {result.returncode}); log {log_path}:\n{tail}")
    timing = json.load(open(timing_path, encoding="utf-8"))
    timing["wall_s"] = time.perf_counter() - started
    return timing


def run_metrics(timing: dict, warmup: int, steps: int) -> dict:
    """Steady-state numbers of one run from its step-end timestamps."""
    stamps = timing["timestamps"]
    if len(stamps) < warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} step timestamps, got {len(stamps)} "
                           "(did the script use a 'Steps' tqdm bar? if not, time it with --event optimizer)")
    measured = stamps[warmup - 1:warmup + steps]
    intervals = [b - a for a, b in zip(measured, measured[1:])]
    cpu = timing["cpu_timestamps"][warmup - 1:warmup + steps]
    return {"steps_per_s": steps / (measured[-1] - measured[0]), "intervals": intervals,
            "steps_per_cpu_s": steps / max(cpu[-1] - cpu[0], 1e-9),
            "startup_s": stamps[0] - timing["start_time"], "wall_s": timing["wall_s"],
            "peak_rss_bytes": timing["peak_rss_bytes"], "cuda_max_allocated_bytes": timing["cuda_max_allocated_bytes"]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(runs: list[dict], batch_size: int, flops_per_step: float | None, peak_tflops: float | None) -> dict:
    """One variant over its runs: medians of steps/s (wall and CPU time), pooled step-time percentiles, peak memory."""
    intervals = [i for run in runs for i in run["intervals"]]
    steps_per_s = statistics.median(run["steps_per_s"] for run in runs)
    summary = {
        "runs": len(runs), "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * batch_size,
        "step_time_median_ms": 1000 * statistics.median(intervals), "step_time_p90_ms": 1000 * percentile(intervals, 0.9),
        "steps_per_s_each_run": [run["steps_per_s"] for run in runs],
        "steps_per_cpu_s": statistics.median(run["steps_per_cpu_s"] for run in runs),
        "startup_s_each_run": [run["startup_s"] for run in runs],
        "wall_s": statistics.median(run["wall_s"] for run in runs),  # the whole process: start-up to exit
        "wall_s_each_run": [run["wall_s"] for run in runs],
        "peak_rss_mib": max(run["peak_rss_bytes"] for run in runs) / 2**20,
        "gpu_max_allocated_mib": (max(run["cuda_max_allocated_bytes"] for run in runs) / 2**20
                                  if runs[0]["cuda_max_allocated_bytes"] is not None else None),
    }
    if flops_per_step:
        summary["achieved_tflops"] = flops_per_step * steps_per_s / 1e12
        summary["mfu"] = summary["achieved_tflops"] / peak_tflops if peak_tflops else None
    return summary


def whole_process_ratios(summaries: dict) -> dict:
    """{variant: reference's whole-process seconds / the variant's} (> 1: the variant's run ends sooner)."""
    reference = summaries.get("reference")
    if reference is None or "wall_s" not in reference:
        return {}
    return {name: reference["wall_s"] / s["wall_s"] for name, s in summaries.items() if name != "reference"}


def ratios_to_reference(summaries: dict) -> tuple[dict, dict]:
    """({variant: wall-clock steps/s ratio}, {variant: CPU-time ratio}) against "reference"; empty without one."""
    reference = summaries.get("reference")
    if reference is None:
        return {}, {}
    others = {name: s for name, s in summaries.items() if name != "reference"}
    return ({name: s["steps_per_s"] / reference["steps_per_s"] for name, s in others.items()},
            {name: s["steps_per_cpu_s"] / reference["steps_per_cpu_s"] for name, s in others.items()})


def flops_of(step) -> float | None:
    """FLOPs of `step()` (torch.utils.flop_counter: matmuls, convolutions, attention), or None if counting fails.

    Build the model and inputs inside `step` under `torch.device("meta")` and nothing is computed.
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            step()
        return float(counter.get_total_flops())
    except Exception as error:  # a FLOP count is a nicety: never fail the benchmark for it
        print(f"(FLOP count unavailable: {type(error).__name__}: {error})")
        return None


def machine_description() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def default_peak_tflops(machine: dict) -> float | None:
    gpu = machine.get("gpu", "")
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in gpu), None)


def markdown_table(result: dict, samples: str = "samples") -> str:
    rows = [f"| variant | steps/s | {samples}/s | step median (ms) | step p90 (ms) | peak RSS (MiB) | GPU max alloc (MiB) "
            "| TFLOP/s | MFU | vs reference | vs reference (CPU time) | whole process (s) | vs reference (whole process) |",
            "|" + "---|" * 13]
    for name, s in result["variants"].items():
        ratio, cpu_ratio = result["ratios"].get(name), result["cpu_time_ratios"].get(name)
        whole = result.get("whole_process_ratios", {}).get(name)
        gpu = f"{s['gpu_max_allocated_mib']:.0f}" if s.get("gpu_max_allocated_mib") is not None else "-"
        tflops = f"{s['achieved_tflops']:.4f}" if s.get("achieved_tflops") is not None else "-"
        mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "-"
        rows.append(f"| {name} | {s['steps_per_s']:.3f} | {s['samples_per_s']:.2f} | {s['step_time_median_ms']:.1f} "
                    f"| {s['step_time_p90_ms']:.1f} | {s['peak_rss_mib']:.0f} | {gpu} | {tflops} | {mfu} "
                    f"| {f'{ratio:.2f}x' if ratio else '-'} | {f'{cpu_ratio:.2f}x' if cpu_ratio else '-'} "
                    f"| {s['wall_s']:.1f} | {f'{whole:.2f}x' if whole else '-'} |")
    return "\n".join(rows)


def write_results(result: dict, table: str, results_dir: str) -> None:
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, result["name"] + ".json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(results_dir, result["name"] + ".md"), "w", encoding="utf-8") as handle:
        handle.write(f"# {result['name']}\n\n`{result['command']}`\n\n{result['machine']}\n\n{table}\n")


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------

def run_variants(args, variants: list[dict], flags_for, workdir: str) -> dict[str, list[dict]]:
    """{variant name: [run metrics]}: every variant `args.repeats` times, alternating."""
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for entry in variants:
            run_id = f"{entry['name'].replace('+', '_')}-{repeat}"
            output_dir = os.path.join(workdir, f"out-{run_id}")
            timing = run_once(entry, flags_for(entry, output_dir), workdir, run_id, args.threads)
            metrics = run_metrics(timing, args.warmup_steps, args.steps)
            runs.setdefault(entry["name"], []).append(metrics)
            print(f"[{entry['name']} run {repeat + 1}/{args.repeats}] {metrics['steps_per_s']:.3f} steps/s "
                  f"(start-up {metrics['startup_s']:.1f}s, whole process {metrics['wall_s']:.1f}s)", flush=True)
    return runs


def run_benchmark(args, argv, command: str, name: str, variants: list[dict], flags_for, workdir: str, batch_size: int,
                  flops_per_step: float | None, fields: dict | None = None, notes=(), samples: str = "samples") -> dict:
    """Run, summarise, print and (with --results_dir) save a benchmark; returns the result dict.

    command: the bench script's file name (recorded with its arguments); name: the result's default name;
    flags_for(variant, output_dir): that variant's flags before its `extra`; fields: more result keys;
    notes: lines printed above the table; samples: what a sample is, for the table's header ("images").
    """
    machine = machine_description()
    runs = run_variants(args, variants, flags_for, workdir)
    peak = args.peak_tflops or default_peak_tflops(machine)
    summaries = {variant_name: summarize(r, batch_size, flops_per_step, peak) for variant_name, r in runs.items()}
    ratios, cpu_ratios = ratios_to_reference(summaries)
    result = {"name": args.name or name, "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine,
              "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "results_dir")},
              **(fields or {}), "peak_tflops": peak, "variants": summaries, "ratios": ratios, "cpu_time_ratios": cpu_ratios,
              "whole_process_ratios": whole_process_ratios(summaries),
              "command": f"python benchmarks/{command} " + " ".join(argv if argv is not None else sys.argv[1:])}
    table = markdown_table(result, samples)
    print(f"\n{result['name']}: " + "\n".join(notes))
    print(table)
    if args.results_dir:
        write_results(result, table, args.results_dir)
    return result
