"""utils/cpu_threads.py: a CPU trainer under `accelerate launch` without a config uses the cores it may use."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from utils.cpu_threads import PIN_VARIABLE, available_cores, choose_cpu_threads
from utils.errors import UserError

LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}


def test_the_launchers_one_thread_becomes_the_cores_per_local_process():
    cores = available_cores()
    threads, message = choose_cpu_threads("cpu", 1, LAUNCHED)
    if cores > 1:
        assert threads == cores and f"CPU threads: {cores}" in message and PIN_VARIABLE in message
    else:
        assert threads is None and message is None
    threads, _ = choose_cpu_threads("cpu", cores, LAUNCHED)  # one process per core: nothing to gain
    assert threads is None


def test_explicit_counts_gpus_and_plain_python_are_left_alone():
    assert choose_cpu_threads("cpu", 1, {**LAUNCHED, "OMP_NUM_THREADS": "3"}) == (None, None)  # the user's count
    assert choose_cpu_threads("cpu", 1, {"OMP_NUM_THREADS": "1"}) == (None, None)  # not launched by accelerate
    assert choose_cpu_threads("cuda", 1, LAUNCHED) == (None, None)
    assert choose_cpu_threads("cpu", 1, {**LAUNCHED, PIN_VARIABLE: "1"}) == (1, None)
    with pytest.raises(UserError, match=PIN_VARIABLE):
        choose_cpu_threads("cpu", 1, {**LAUNCHED, PIN_VARIABLE: "two"})


@pytest.mark.slow
def test_a_trainer_launched_as_users_do_ends_up_with_the_cores(tmp_path):
    """`accelerate launch train_segmentation_tpu.py ...` on a machine with no accelerate config: no --cpu, no
    --num_cpu_threads_per_process, no OMP_NUM_THREADS in the environment. run_info.json records the count."""
    from utils.segmentation.data import write_synthetic_irstd

    data = write_synthetic_irstd(str(tmp_path / "synth"), num_train=8, num_test=2, size=32, seed=0)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", PIN_VARIABLE, "ACCELERATE_CONFIG_FILE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=REPO_ROOT,
               HF_HOME=str(tmp_path / "hf_home"))  # no accelerate config file there
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", os.path.join(REPO_ROOT, "train_segmentation_tpu.py"),
         "--dataset-dir", data, "--batch-size", "4", "--max_train_steps", "1", "--warm_epoch", "0",
         "--crop-size", "32", "--base-size", "32", "--report_to", "none", "--output_dir", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    recorded = json.load(open(out / "run_info.json"))["cpu_threads"]
    assert recorded == max(1, available_cores())
    assert (f"CPU threads: {recorded}" in result.stderr) == (recorded > 1)
