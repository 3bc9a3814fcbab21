"""train_segmentation_tpu.py on a real XLA device: torch_xla's CPU PJRT backend, launched with the TPU config.

Needs torch_xla, which pins its own torch: `make test-xla` builds .venv-xla and runs this file there
(in the main .venv it is skipped). Asserts that accelerate ran the script as DistributedType.XLA and
that XLA stops compiling once every graph has been seen (fixed shapes, no per-step host reads).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch_xla")

from tests.conftest import REPO_ROOT, launch_env  # noqa: E402
from utils.segmentation.data import write_synthetic_irstd  # noqa: E402

CONFIG = os.path.join(REPO_ROOT, "accelerate_configs", "tpu_cpu_test.yaml")


def xla_env():
    env = launch_env()
    env.update(
        PJRT_DEVICE="CPU",
        CPU_NUM_DEVICES="1",
        # accelerate reads the local rank of a non-TPU XLA device from LOCAL_RANK (else -1: no process logs).
        LOCAL_RANK="0",
        # The CPU backend's LLVM optimisations make compiling MSHNet's step take minutes; the test checks
        # compile counts, not speed.
        XLA_FLAGS="--xla_backend_optimization_level=0",
    )
    return env


@pytest.mark.slow
def test_training_on_xla_compiles_once_then_reuses_graphs(tmp_path):
    data = write_synthetic_irstd(str(tmp_path / "synth"), num_train=16, num_test=4, size=32, seed=0)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG,
           os.path.join(REPO_ROOT, "train_segmentation_tpu.py"),
           "--dataset-dir", data, "--batch-size", "4", "--max_train_steps", "6", "--warm_epoch", "-1",
           "--crop-size", "32", "--base-size", "32", "--seed", "0", "--output_dir", str(out),
           "--logging_steps", "1", "--checkpointing_steps", "4", "--report_to", "none"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=xla_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-6000:]}"

    summary = json.load(open(out / "xla_metrics.json"))
    assert summary["distributed_type"] == "DistributedType.XLA" and summary["num_processes"] == 1
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]
    assert all(entry["warm"] == 0.0 for entry in log)  # --warm_epoch -1: the multi-scale SLS graph throughout
    compilations = [entry["xla_compilations"] for entry in log]
    # Steps 1-2 compile the training step (the second sees optimizer state); epoch 0 ends after step 4
    # with an evaluation and a checkpoint. Steps 3-4 and 5-6 must reuse what is compiled.
    assert compilations[2] == compilations[3], compilations
    assert compilations[4] == compilations[5], compilations

    evaluations = [json.loads(line) for line in open(out / "eval_metrics.jsonl")]
    assert len(evaluations) == 2 and all(e["num_images"] == 4 for e in evaluations)
    assert (out / "checkpoint-4" / "mshnet" / "model.safetensors").is_file()  # saving through accelerate on XLA
    assert (out / "checkpoint-6" / "optimizer.bin").is_file()
    assert (out / "last" / "model.safetensors").is_file()
