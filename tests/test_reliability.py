"""Issue #8 end to end: exact resume, SIGKILL/SIGTERM safety, non-finite steps, OOM hints and real
two-process (gloo) runs, on real training processes started the way users start them.

The end-to-end runs go through `accelerate launch --config_file accelerate_configs/<file>.yaml`,
so they are also the launch tests of `cpu.yaml`, `single_gpu.yaml` and `multi_gpu.yaml`; the
non-finite and out-of-memory checks run `main()` in-process (same loop, no launch cost).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, launch_env, run_main_in_process, write_captioned_folder
from safetensors.torch import load_file

CONFIGS = os.path.join(REPO_ROOT, "accelerate_configs")
TEXT_TO_IMAGE = os.path.join(REPO_ROOT, "train_text_to_image.py")


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------

def launch_command(script, args, config="cpu.yaml", num_processes=None):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config)]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    return command + [script] + [str(a) for a in args]


def run(script, args, config="cpu.yaml", num_processes=None, env=None, check=True, timeout=300):
    result = subprocess.run(launch_command(script, args, config, num_processes), cwd=REPO_ROOT, env=env or launch_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-6000:]}")
    return result


LAUNCHERS = {
    "python": lambda script, args: [sys.executable, script] + [str(a) for a in args],
    "torchrun": lambda script, args: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                                      script] + [str(a) for a in args],
}


def start(script, args, log_path, config="cpu.yaml", launcher="accelerate"):
    """Start a launch in its own process group (so signals reach the launcher and the trainer)."""
    log = open(log_path, "w")
    command = launch_command(script, args, config) if launcher == "accelerate" else LAUNCHERS[launcher](script, args)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=launch_env(), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log
    return process


def group_alive(process) -> bool:
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    process.poll()  # reap the launcher if it is done
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def signal_group(process, sig) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def wait_group(process, timeout=120) -> None:
    """Wait until the launcher and the trainer it started have both exited."""
    deadline = time.monotonic() + timeout
    while group_alive(process):
        if time.monotonic() > deadline:
            signal_group(process, signal.SIGKILL)
            raise AssertionError("training process did not exit in time")
        time.sleep(0.05)
    process.wait()
    process.log.close()


def wait_for(predicate, process, timeout=120, interval=0.001):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if process.poll() is not None and not group_alive(process):
            raise AssertionError(f"the run ended before the awaited point:\n{open(process.log.name).read()[-4000:]}")
        time.sleep(interval)
    raise AssertionError("timed out waiting for the training process")


def checkpoint_steps(output_dir):
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("checkpoint-") and n.split("-")[1].isdigit())


def partial_dirs(output_dir):
    return sorted(n for n in os.listdir(output_dir) if n.startswith(".tmp-checkpoint-")) if os.path.isdir(output_dir) else []


# ----------------------------------------------------------------------------------------------
# Comparing runs
# ----------------------------------------------------------------------------------------------

def load_torch_file(path):
    """Checkpoint torch files load with weights_only=True (accelerate's numpy allowlist for RNG states)."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        return torch.load(path, weights_only=True)


def assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_checkpoints_identical(first, second, weight_files):
    """Weights (safetensors), optimizer, LR scheduler, RNG states and training state, bit for bit."""
    for relative in weight_files:
        assert_same(load_file(os.path.join(first, relative)), load_file(os.path.join(second, relative)), relative)
    for name in sorted(os.listdir(first)):
        if name.endswith((".bin", ".pkl")):
            assert_same(load_torch_file(os.path.join(first, name)), load_torch_file(os.path.join(second, name)), name)
    state = [json.load(open(os.path.join(d, "training_state.json"))) for d in (first, second)]
    assert state[0] == state[1]


def assert_checkpoint_loads(path, weight_files):
    for relative in weight_files:
        assert load_file(os.path.join(path, relative)), relative
    for name in os.listdir(path):
        if name.endswith((".bin", ".pkl")):
            load_torch_file(os.path.join(path, name))
    assert json.load(open(os.path.join(path, "training_state.json")))["global_step"] == int(path.rsplit("-", 1)[1])


# ----------------------------------------------------------------------------------------------
# train_text_to_image.py
# ----------------------------------------------------------------------------------------------

T2I_WEIGHTS = ["unet/diffusion_pytorch_model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"]
T2I_STEPS = 10  # 8 images / batch 2 / accumulation 2 = 2 optimizer steps per epoch


@pytest.fixture(scope="module")
def t2i_data(tmp_path_factory):
    return write_captioned_folder(tmp_path_factory.mktemp("captioned"))


def t2i_args(pipeline, data, output_dir, steps=T2I_STEPS, extra=()):
    """Gradient accumulation, random flips, EMA, validation mid-run: everything that holds state or uses RNG."""
    return ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "32",
            "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--random_flip", "--use_ema",
            "--max_train_steps", steps, "--checkpointing_steps", "1", "--output_dir", output_dir, "--seed", "3",
            "--report_to", "none", "--lr_warmup_steps", "0", "--lr_scheduler", "cosine",
            "--validation_prompts", "a thing", "--validation_steps", "4", "--validation_inference_steps", "2",
            "--num_validation_images", "1", *extra]


@pytest.fixture(scope="module")
def t2i_straight(tiny_pipeline_dir, t2i_data, tmp_path_factory):
    """The reference: all steps in one process (cpu.yaml)."""
    output_dir = str(tmp_path_factory.mktemp("straight") / "out")
    run(TEXT_TO_IMAGE, t2i_args(tiny_pipeline_dir, t2i_data, output_dir), config="cpu.yaml")
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [3])  # epoch 1, after its first optimizer step: mid-epoch, mid-accumulation-cycle
def test_t2i_exact_resume_mid_epoch(tiny_pipeline_dir, t2i_data, t2i_straight, tmp_path, stop_at):
    """N steps in one go == stop at N' (mid-epoch) + `--resume_from_checkpoint latest`, bit for bit.

    The resumed run is a new process that only has the checkpoint (copied into a fresh output
    dir), so every piece of state the continuation needs must be in it. Launched with
    single_gpu.yaml, which runs fp32 on the CPU here, so the numerics match cpu.yaml's.
    """
    output_dir = str(tmp_path / "out")
    os.makedirs(output_dir)
    shutil.copytree(os.path.join(t2i_straight, f"checkpoint-{stop_at}"), os.path.join(output_dir, f"checkpoint-{stop_at}"))
    result = run(TEXT_TO_IMAGE, t2i_args(tiny_pipeline_dir, t2i_data, output_dir, extra=["--resume_from_checkpoint", "latest"]),
                 config="single_gpu.yaml")
    assert f"checkpoint-{stop_at}" in result.stdout + result.stderr
    for step in range(stop_at + 1, T2I_STEPS + 1, 5):
        assert_checkpoints_identical(os.path.join(t2i_straight, f"checkpoint-{step}"),
                                     os.path.join(output_dir, f"checkpoint-{step}"), T2I_WEIGHTS)
    assert_checkpoints_identical(os.path.join(t2i_straight, f"checkpoint-{T2I_STEPS}"),
                                 os.path.join(output_dir, f"checkpoint-{T2I_STEPS}"), T2I_WEIGHTS)
    final = "unet/diffusion_pytorch_model.safetensors"  # the final pipeline's UNet (EMA weights)
    assert_same(load_file(os.path.join(t2i_straight, final)), load_file(os.path.join(output_dir, final)), final)


@pytest.mark.slow
def test_t2i_sigkill_sigterm_and_resume(tiny_pipeline_dir, t2i_data, t2i_straight, tmp_path):
    """Kill a real run during a checkpoint write, stop one with SIGTERM, kill one mid-step; resume each time.

    Afterwards: every checkpoint-* loads, the leftover partial write was warned about and
    cleaned, the SIGTERM run saved and said how to resume, and the final weights equal those
    of the uninterrupted run bit for bit.
    """
    output_dir = str(tmp_path / "out")
    args = t2i_args(tiny_pipeline_dir, t2i_data, output_dir)
    resume = args + ["--resume_from_checkpoint", "latest"]

    # 1. SIGKILL while a checkpoint is being written (a .tmp-checkpoint-N exists), after one complete one.
    process = start(TEXT_TO_IMAGE, args, tmp_path / "1.log")
    partial = wait_for(lambda: [p for p in partial_dirs(output_dir) if not p.endswith("-1")], process)
    signal_group(process, signal.SIGKILL)
    wait_group(process)
    assert partial_dirs(output_dir), "the kill should have left the partial write behind"
    killed_during = partial_dirs(output_dir)[0]
    complete = checkpoint_steps(output_dir)
    assert complete and f".tmp-checkpoint-{complete[-1]}" != killed_during
    for step in complete:
        assert_checkpoint_loads(os.path.join(output_dir, f"checkpoint-{step}"), T2I_WEIGHTS)

    # 2. Resume, then SIGTERM (what Colab / a preemptible VM sends): save at the step boundary, exit cleanly.
    process = start(TEXT_TO_IMAGE, resume, tmp_path / "2.log")
    latest = complete[-1]
    wait_for(lambda: [s for s in checkpoint_steps(output_dir) if s > latest], process)
    signal_group(process, signal.SIGTERM)
    wait_group(process)
    log = open(tmp_path / "2.log").read()
    assert f"Resuming from checkpoint {os.path.join(output_dir, f'checkpoint-{latest}')}" in log
    assert "Ignoring incomplete checkpoint" in log and killed_during in log
    assert "SIGTERM received" in log and "Traceback" not in log.split("SIGTERM received")[1].split("Stopped by")[0]
    stopped_at = int(log.split("Stopped by SIGTERM at step ")[1].split(" ")[0])
    assert "--resume_from_checkpoint latest" in log.split("Stopped by SIGTERM")[1]
    assert stopped_at < T2I_STEPS and checkpoint_steps(output_dir)[-1] == stopped_at
    assert not partial_dirs(output_dir), "the next save cleans up the partial write"

    # 3. Resume, then SIGKILL in the middle of training steps.
    process = start(TEXT_TO_IMAGE, resume, tmp_path / "3.log")
    wait_for(lambda: [s for s in checkpoint_steps(output_dir) if s > stopped_at], process)
    time.sleep(0.1)
    signal_group(process, signal.SIGKILL)
    wait_group(process)
    for step in checkpoint_steps(output_dir):
        assert_checkpoint_loads(os.path.join(output_dir, f"checkpoint-{step}"), T2I_WEIGHTS)

    # 4. Resume to the end: identical to the run that was never interrupted.
    run(TEXT_TO_IMAGE, resume, config="cpu.yaml")
    assert checkpoint_steps(output_dir)[-1] == T2I_STEPS and not partial_dirs(output_dir)
    assert_checkpoints_identical(os.path.join(t2i_straight, f"checkpoint-{T2I_STEPS}"),
                                 os.path.join(output_dir, f"checkpoint-{T2I_STEPS}"), T2I_WEIGHTS)
    final = "unet/diffusion_pytorch_model.safetensors"
    assert_same(load_file(os.path.join(t2i_straight, final)), load_file(os.path.join(output_dir, final)), final)


run_in_process = run_main_in_process


def test_t2i_nonfinite_steps_are_skipped_then_abort(tiny_pipeline_dir, t2i_data, tmp_path, caplog):
    """In-process (the loop is the same as under `accelerate launch`, which the tests above cover)."""
    import train_text_to_image as script

    # A huge learning rate blows the weights up after the first step; every later loss is NaN.
    args = t2i_args(tiny_pipeline_dir, t2i_data, str(tmp_path / "out"), steps=10,
                    extra=["--learning_rate", "1e30", "--adam_weight_decay", "0", "--max_nonfinite_steps", "3",
                           "--lr_scheduler", "constant",
                           # the guard is read at every step boundary, not at logging steps or checkpoints (it was
                           # read every --logging_steps: "9 consecutive steps" here before)
                           "--logging_steps", "10", "--checkpointing_steps", "1000"])
    with caplog.at_level("WARNING"), pytest.raises(FloatingPointError) as error:
        run_in_process(script, args)
    assert "update(s) skipped since the last check" in caplog.text
    assert "3 consecutive steps had a non-finite loss or gradient (--max_nonfinite_steps 3)" in str(error.value)
    assert "--learning_rate" in str(error.value)


def test_t2i_out_of_memory_prints_what_to_try(tiny_pipeline_dir, t2i_data, tmp_path, monkeypatch):
    """An OOM inside the loop becomes the hint list (in-process: an OOM cannot be forced on a CPU)."""
    import train_text_to_image as script
    from utils.errors import OOM_HINT
    from utils.families.sd import StableDiffusion

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(StableDiffusion, "training_loss", out_of_memory)
    with pytest.raises(RuntimeError) as error:
        run_in_process(script, t2i_args(tiny_pipeline_dir, t2i_data, str(tmp_path / "out"), steps=2))
    assert str(error.value) == OOM_HINT.format(batch_flag="--train_batch_size")
    for advice in ("--train_batch_size", "--gradient_accumulation_steps", "--gradient_checkpointing", "--use_8bit_adam",
                   "--resolution"):
        assert advice in str(error.value)


# ----------------------------------------------------------------------------------------------
# Two processes (DDP over gloo on the CPU), launched with multi_gpu.yaml --num_processes 2
# ----------------------------------------------------------------------------------------------

WRITE_AUDIT = textwrap.dedent('''
    """Test-only: record, per rank, every file the process opens for writing / creates / renames under a prefix."""
    import os, sys, threading
    _prefix = os.environ.get("TEST_WRITE_AUDIT_PREFIX")
    _log = os.environ.get("TEST_WRITE_AUDIT_DIR")
    _guard = threading.local()

    def _hook(event, args):
        if getattr(_guard, "busy", False) or event not in ("open", "os.mkdir", "os.rename", "os.remove", "shutil.rmtree"):
            return
        path = args[0]
        if not isinstance(path, (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(path))
        if event == "open":
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if not writing:
                return
        if not path.startswith(_prefix):
            return
        _guard.busy = True
        try:
            with open(os.path.join(_log, "writes-" + os.environ.get("RANK", "launcher") + ".txt"), "a") as handle:
                handle.write(event + " " + os.path.relpath(path, _prefix) + "\\n")
        finally:
            _guard.busy = False

    if _prefix and _log:
        sys.addaudithook(_hook)
''')


def audited_env(tmp_path, output_dir, checksum_dir):
    hooks = tmp_path / "audit_hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(WRITE_AUDIT)
    env = launch_env()
    env.update(PYTHONPATH=f"{hooks}{os.pathsep}{REPO_ROOT}", TEST_WRITE_AUDIT_PREFIX=os.path.abspath(output_dir),
               TEST_WRITE_AUDIT_DIR=str(tmp_path), TRAIN_DEBUG_RANK_CHECKSUM_DIR=str(checksum_dir))
    return env


def rank_writes(tmp_path, rank):
    path = tmp_path / f"writes-{rank}.txt"
    return path.read_text().splitlines() if path.exists() else []


def assert_ranks_identical(checksum_dir, num_processes=2):
    sums = [json.load(open(os.path.join(checksum_dir, f"rank{r}.json"))) for r in range(num_processes)]
    assert all(s["num_processes"] == num_processes for s in sums), "the processes must form one process group"
    differing = [name for name in sums[0]["parameters"] if sums[0]["parameters"][name] != sums[1]["parameters"][name]]
    assert not differing and sums[0]["all"] == sums[1]["all"], f"weights differ across ranks: {differing[:5]}"
    return sums[0]["all"]


@pytest.mark.slow
def test_t2i_two_processes_sync_write_once_and_resume(tiny_pipeline_dir, t2i_data, tmp_path):
    """2 ranks: identical weights, rank 0 alone writes outputs, validation + checkpoints do not deadlock,
    and a 2-process resume from a mid-epoch checkpoint reproduces the uninterrupted 2-process run."""
    steps = 4  # 8 images / (2 ranks x batch 2) = 2 steps per epoch: checkpoint-3 is mid-epoch
    first = tmp_path / "first"
    first.mkdir()
    output_dir = str(first / "out")
    args = t2i_args(tiny_pipeline_dir, t2i_data, output_dir, steps=steps,
                    extra=["--gradient_accumulation_steps", "1", "--validation_steps", "2"])
    result = run(TEXT_TO_IMAGE, args, config="multi_gpu.yaml", num_processes=2,
                 env=audited_env(first, output_dir, first / "sums"), timeout=400)
    reference = assert_ranks_identical(first / "sums")
    assert checkpoint_steps(output_dir) == [1, 2, 3, 4]
    for step in (1, 4):
        names = os.listdir(os.path.join(output_dir, f"checkpoint-{step}"))
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(names), names  # each rank's RNG state
    assert os.path.isfile(os.path.join(output_dir, "README.md")) and os.path.isfile(os.path.join(output_dir, "model_index.json"))
    rank0, rank1 = rank_writes(first, "0"), rank_writes(first, "1")
    assert any("README.md" in line for line in rank0) and any("training_state.json" in line for line in rank0)
    assert any("validation" in line for line in rank0), rank0[:20]
    # Rank 1 creates nothing but (maybe) directories that exist anyway; every file is rank 0's.
    assert all(line.startswith("os.mkdir") for line in rank1), rank1
    assert "Traceback" not in result.stderr

    # Resume with 2 processes from the mid-epoch checkpoint, in a fresh output dir.
    second = tmp_path / "second"
    second.mkdir()
    resumed_dir = str(second / "out")
    os.makedirs(resumed_dir)
    shutil.copytree(os.path.join(output_dir, "checkpoint-3"), os.path.join(resumed_dir, "checkpoint-3"))
    args = t2i_args(tiny_pipeline_dir, t2i_data, resumed_dir, steps=steps,
                    extra=["--gradient_accumulation_steps", "1", "--validation_steps", "2", "--resume_from_checkpoint", "latest"])
    run(TEXT_TO_IMAGE, args, config="multi_gpu.yaml", num_processes=2,
        env=audited_env(second, resumed_dir, second / "sums"), timeout=400)
    assert assert_ranks_identical(second / "sums") == reference
    assert_checkpoints_identical(os.path.join(output_dir, "checkpoint-4"), os.path.join(resumed_dir, "checkpoint-4"), T2I_WEIGHTS)


# ----------------------------------------------------------------------------------------------
# train_mask_dit.py and train_segmentation_tpu.py: two processes, then a two-process mid-epoch resume.
# (Their single-process bitwise resume is tested in tests/test_train_mask_dit.py and
# tests/test_train_segmentation.py; the checkpoint/RNG machinery is the shared one tested above.)
# ----------------------------------------------------------------------------------------------

def mask_dit_case(tmp_path):
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "fundus"), 8, size=32, seed=0)

    def args(output_dir, *extra):
        return ["--train_data_dir", data, "--output_dir", output_dir, "--model_size", "tiny", "--resolution", "32",
                "--mask_channels", "2", "--train_batch_size", "2", "--seed", "0", "--report_to", "none",
                "--num_inference_steps", "1", "--num_validation_images", "1", "--max_train_steps", "4",
                "--checkpointing_steps", "1", "--use_ema", "--random_flip", "--validation_steps", "2", *extra]

    weights = ["transformer/diffusion_pytorch_model.safetensors", "transformer_ema/diffusion_pytorch_model.safetensors"]
    return os.path.join(REPO_ROOT, "train_mask_dit.py"), args, weights, "samples"


def segmentation_case(tmp_path):
    from utils.segmentation.data import write_synthetic_irstd

    data = write_synthetic_irstd(str(tmp_path / "irstd"), num_train=8, num_test=4, size=32, seed=0)

    def args(output_dir, *extra):
        return ["--dataset_dir", data, "--output_dir", output_dir, "--batch_size", "2", "--crop_size", "32",
                "--base_size", "32", "--warm_epoch", "0", "--seed", "0", "--report_to", "none", "--max_train_steps", "4",
                "--checkpointing_steps", "1", "--use_ema", *extra]

    return os.path.join(REPO_ROOT, "train_segmentation_tpu.py"), args, ["mshnet/model.safetensors"], "eval_metrics.jsonl"


@pytest.mark.parametrize("case, loss_name", [(mask_dit_case, "flow_step_loss"), (segmentation_case, "multiscale_sls_loss")],
                         ids=["train_mask_dit", "train_segmentation_tpu"])
def test_other_scripts_out_of_memory_prints_what_to_try(case, loss_name, tmp_path, monkeypatch):
    """The same OOM advice from the other two scripts' loops (in-process, OOM injected into their loss)."""
    import importlib

    from utils.errors import OOM_HINT

    script_path, args, _, _ = case(tmp_path)
    script = importlib.import_module(os.path.splitext(os.path.basename(script_path))[0])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(script, loss_name, out_of_memory)
    with pytest.raises(RuntimeError) as error:
        run_in_process(script, args(str(tmp_path / "out")))
    batch_flag = "--batch_size" if "segmentation" in script_path else "--train_batch_size"  # each script's own flag
    assert str(error.value) == OOM_HINT.format(batch_flag=batch_flag)


@pytest.mark.slow
@pytest.mark.parametrize("case", [mask_dit_case, segmentation_case], ids=["train_mask_dit", "train_segmentation_tpu"])
def test_two_processes_sync_write_once_and_resume(case, tmp_path):
    """8 samples / (2 ranks x batch 2) = 2 steps per epoch, so checkpoint-3 is mid-epoch."""
    script, make_args, weights, rank0_output = case(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    output_dir = str(first / "out")
    result = run(script, make_args(output_dir), config="multi_gpu.yaml", num_processes=2,
                 env=audited_env(first, output_dir, first / "sums"), timeout=400)
    reference = assert_ranks_identical(first / "sums")
    assert 4 in checkpoint_steps(output_dir) and 3 in checkpoint_steps(output_dir)
    names = os.listdir(os.path.join(output_dir, "checkpoint-4"))
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(names), names
    rank0, rank1 = rank_writes(first, "0"), rank_writes(first, "1")
    assert any("training_state.json" in line for line in rank0) and any(rank0_output in line for line in rank0), rank0[:20]
    assert all(line.startswith("os.mkdir") for line in rank1), rank1
    assert "Traceback" not in result.stderr

    resumed_dir = str(second / "out")
    os.makedirs(resumed_dir)
    shutil.copytree(os.path.join(output_dir, "checkpoint-3"), os.path.join(resumed_dir, "checkpoint-3"))
    run(script, make_args(resumed_dir, "--resume_from_checkpoint", "latest"), config="multi_gpu.yaml", num_processes=2,
        env=audited_env(second, resumed_dir, second / "sums"), timeout=400)
    assert assert_ranks_identical(second / "sums") == reference
    assert_checkpoints_identical(os.path.join(output_dir, "checkpoint-4"), os.path.join(resumed_dir, "checkpoint-4"), weights)


# ----------------------------------------------------------------------------------------------
# Security: the Hub token never lands in logs, tracker files, checkpoints, model cards or saved args.
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_t2i_hub_token_is_written_nowhere(tiny_pipeline_dir, t2i_data, tmp_path):
    flag_token, env_token = "hf_FlagSecret0123456789", "hf_EnvSecret9876543210"
    output_dir = str(tmp_path / "out")
    env = launch_env()
    env["HF_TOKEN"] = env_token
    args = t2i_args(tiny_pipeline_dir, t2i_data, output_dir, steps=2,
                    extra=["--hub_token", flag_token, "--report_to", "tensorboard", "--validation_steps", "1",
                           "--logging_steps", "1"])
    result = run(TEXT_TO_IMAGE, args, env=env)
    files = [os.path.join(d, f) for d, _, names in os.walk(output_dir) for f in names]
    assert any("tfevents" in f for f in files) and any(f.endswith("README.md") for f in files)
    assert any(f.endswith("training_args.json") for f in files) and any("checkpoint-2" in f for f in files)
    for token in (flag_token, env_token):
        assert token not in result.stdout + result.stderr
        for path in files:
            with open(path, "rb") as handle:
                assert token.encode() not in handle.read(), f"{token[:8]}... found in {path}"


def trainer_pid(process, timeout=60):
    """The training process under `accelerate launch` (the launcher's child running the script)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(process.pid).children(recursive=True)
        if children:
            return children[-1].pid
        time.sleep(0.05)
    raise AssertionError("no training process under the launcher")


@pytest.mark.slow
@pytest.mark.parametrize("case", [mask_dit_case, segmentation_case], ids=["train_mask_dit", "train_segmentation_tpu"])
def test_sigterm_saves_and_says_how_to_resume(case, tmp_path):
    """A process-group SIGTERM under `accelerate launch` (>= 1.16 forwards a second SIGTERM and SIGKILLs 5 s
    later): one stop request, reacted to at the next step boundary (at most the step in progress runs after
    the signal, counted by the trainer, whatever the machine's load) and saved as a complete checkpoint.
    The wall-clock latency is measured by benchmarks/bench_stop.py, not asserted here."""
    script, make_args, weights, _ = case(tmp_path)
    output_dir = str(tmp_path / "out")
    args = make_args(output_dir, "--max_train_steps", "400", "--logging_steps", "50")
    process = start(script, args, tmp_path / "run.log")
    wait_for(lambda: checkpoint_steps(output_dir), process)
    signal_group(process, signal.SIGTERM)
    wait_group(process)
    log = open(tmp_path / "run.log").read()
    assert "SIGTERM received" in log and "KeyboardInterrupt" not in log and "Traceback" not in log
    stopped_at = int(log.split("Stopped by SIGTERM at step ")[1].split(" ")[0].split(".")[0])
    steps_after_signal = int(log.split("Stopped by SIGTERM at step ")[1].split("(")[1].split(" step")[0])
    assert steps_after_signal <= 1, log[-2000:]
    assert "--resume_from_checkpoint latest" in log.split("Stopped by SIGTERM")[1]
    assert stopped_at < 400 and checkpoint_steps(output_dir)[-1] == stopped_at and not partial_dirs(output_dir)
    assert_checkpoint_loads(os.path.join(output_dir, f"checkpoint-{stopped_at}"), weights)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun", "accelerate-trainer-only"])
def test_sigterm_on_every_launch_path(launcher, tmp_path):
    """The launch paths without accelerate's 5 s limit (README: "Stopping a run"): `python script.py`,
    `torchrun` (its agent forwards SIGTERM to the worker) and a SIGTERM sent to the trainer itself
    under `accelerate launch`. Each saves at the step boundary and exits 0 with the resume command."""
    script, make_args, weights, _ = mask_dit_case(tmp_path)
    output_dir = str(tmp_path / "out")
    process = start(script, make_args(output_dir, "--max_train_steps", "400"), tmp_path / "run.log",
                    launcher="accelerate" if launcher.startswith("accelerate") else launcher)
    wait_for(lambda: checkpoint_steps(output_dir), process)
    if launcher == "accelerate-trainer-only":
        os.kill(trainer_pid(process), signal.SIGTERM)
    else:
        signal_group(process, signal.SIGTERM)
    wait_group(process)
    log = open(tmp_path / "run.log").read()
    assert "SIGTERM received" in log and "Traceback" not in log.split("Stopped by SIGTERM")[0], log[-3000:]
    stopped_at = int(log.split("Stopped by SIGTERM at step ")[1].split(" ")[0].split(".")[0])
    assert "--resume_from_checkpoint latest" in log.split("Stopped by SIGTERM")[1]
    assert stopped_at < 400 and checkpoint_steps(output_dir)[-1] == stopped_at and not partial_dirs(output_dir)
    if launcher != "torchrun":  # torchrun's agent re-raises the signal itself (SignalException, exit 1) afterwards
        assert process.returncode == 0 and "Traceback" not in log, log[-3000:]
    assert_checkpoint_loads(os.path.join(output_dir, f"checkpoint-{stopped_at}"), weights)


# ----------------------------------------------------------------------------------------------
# The shared mechanics (utils/run.py) on their own.
# ----------------------------------------------------------------------------------------------

def test_nonfinite_guard_host_check_skips_counts_resets_and_aborts():
    from utils.telemetry import NonFiniteGuard

    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.ones(2)
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(torch.tensor(float("inf")), [weight]) is False
    assert guard.check(torch.tensor(1.0), [weight]) is True and guard.consecutive == 0  # a good step resets the run
    weight.grad = torch.tensor([float("nan"), 1.0])
    assert guard.check(torch.tensor(1.0), [weight]) is False  # finite loss, NaN gradient
    assert guard.check(torch.tensor(1.0), [weight]) is False
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .*--max_nonfinite_steps 3"):
        guard.check(torch.tensor(1.0), [weight])
    assert guard.total_skipped == 4


class _Accelerator:
    """What apply_update reads of an Accelerator (single process, no GradScaler)."""
    sync_gradients, scaler, distributed_type = True, None, "NO"

    @staticmethod
    def clip_grad_norm_(parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.Adagrad])
def test_nonfinite_steps_skip_on_the_device_and_are_read_at_the_step_boundary(optimizer_class, monkeypatch):
    """Fused optimizers skip a bad step through `found_inf`; the update itself reads nothing on the host (the
    step boundary polls), and the poll after the 4th bad step in a row aborts (--max_nonfinite_steps 4)."""
    from utils.optim import apply_update
    from utils.telemetry import NonFiniteGuard

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = optimizer_class([weight], lr=0.1, fused=True)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    guard = NonFiniteGuard(max_consecutive=4)
    polls = []
    original_poll = NonFiniteGuard.poll
    monkeypatch.setattr(NonFiniteGuard, "poll", lambda self, **kw: (polls.append(len(polls)), original_poll(self, **kw)))

    def step(bad: bool):
        loss = (weight * torch.tensor([1.0, 2.0, float("nan") if bad else 3.0])).sum()
        loss.backward()
        return apply_update(_Accelerator(), optimizer, lr_scheduler, [weight], loss.detach(), 1.0, guard)

    step(False)
    before = weight.detach().clone()
    state_before = {k: v.clone() for k, v in optimizer.state[weight].items()}
    for _ in range(3):
        step(True)  # NaN gradients: skipped on the device
    assert torch.equal(weight.detach(), before)
    assert all(torch.equal(v, state_before[k]) for k, v in optimizer.state[weight].items())
    assert not hasattr(optimizer, "found_inf")
    assert polls == [] and guard.lagged is False  # the update read nothing; on the CPU the poll is not lagged
    guard.poll()
    assert guard.consecutive == 3 and guard.total_skipped == 3
    step(False)  # a good step applies and ends the run of 3 (< 4)
    guard.poll()
    assert not torch.equal(weight.detach(), before) and guard.consecutive == 0 and guard.total_skipped == 3
    for _ in range(3):
        step(True)
        guard.poll()
    step(True)
    with pytest.raises(FloatingPointError, match=r"4 consecutive steps .*--max_nonfinite_steps 4"):
        guard.poll()  # the boundary after the 4th bad step in a row


def test_lagged_guard_still_decides_host_checked_updates_by_their_own_step():
    """Optimizers without a device-side skip are checked on the host before their update: even where the polls are
    lagged (CUDA), that verdict is the current step's."""
    from utils.telemetry import NonFiniteGuard

    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.ones(2)
    guard = NonFiniteGuard(max_consecutive=5, lagged=True)
    assert guard.check(torch.tensor(1.0), [weight]) is True
    assert guard.check(torch.tensor(float("nan")), [weight]) is False  # this step is bad: skipped now
    assert guard.check(torch.tensor(1.0), [weight]) is True  # and the next good one applies


def test_lagged_guard_reads_the_step_before_and_aborts_one_step_late_at_most():
    """CUDA's scheme (a non-blocking copy read one boundary later, so the device queue never drains), run on
    the CPU: the boundary after step s reads the counters of step s - 1; `total_skipped` reads the current ones."""
    from utils.telemetry import NonFiniteGuard

    guard = NonFiniteGuard(max_consecutive=3, lagged=True)
    seen = []
    for bad in (True, False, True, True):
        guard.record(torch.tensor(1.0 if bad else 0.0))
        guard.poll()
        seen.append((guard.consecutive, guard._total))
    # after step 1: nothing before it; after 2: step 1 (1 bad); after 3: step 2 (run ended); after 4: step 3
    assert seen == [(0, 0), (1, 1), (0, 1), (1, 2)]
    assert guard.total_skipped == 3 and guard.consecutive == 2  # the current counters
    guard.record(torch.tensor(1.0))  # step 5: the 3rd bad step in a row
    guard.poll()  # reads step 4 (2 in a row)
    guard.record(torch.tensor(0.0))  # step 6: good, but the run of 3 happened
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps"):
        guard.poll()  # reads step 5: one step late


def test_gradscaler_steps_are_never_skipped_by_the_guard():
    """Under fp16's GradScaler the scaler skips overflowing steps and lowers its scale; the guard
    must still call optimizer.step() (else the scale would never come down) and only count."""
    from utils.optim import apply_update
    from utils.telemetry import NonFiniteGuard

    weight = torch.nn.Parameter(torch.ones(2))
    calls = []
    optimizer = type("Optimizer", (), {"step": lambda self: calls.append("step"), "zero_grad": lambda self, set_to_none: None})()
    scheduler = type("Scheduler", (), {"step": lambda self: calls.append("lr")})()
    accelerator = type("Accelerator", (_Accelerator,), {"scaler": object()})()
    guard = NonFiniteGuard(max_consecutive=10)
    weight.grad = torch.tensor([float("inf"), 1.0])
    apply_update(accelerator, optimizer, scheduler, [weight], torch.tensor(1.0), 1.0, guard)
    assert calls == ["step", "lr"] and guard.total_skipped == 1


def test_stop_signal_turns_sigterm_into_a_flag():
    from utils.stopping import StopSignal

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopSignal()
        single = type("SingleProcess", (), {"num_processes": 1})()
        assert not stop.should_stop(single)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM" and stop.should_stop(single)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_stop_signal_repeated_sigterm_is_one_request_sigint_twice_force_quits():
    """accelerate >= 1.16 forwards the group's SIGTERM a second time: that must not force-quit; Ctrl-C twice must."""
    from utils.stopping import StopSignal

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # raises KeyboardInterrupt here if treated as "force quit"
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM"

        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)

        stop = StopSignal(repeat_window_s=0.05)  # a SIGTERM long after the first one is a new, forceful request
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_oom_detection():
    from utils.errors import is_oom_error

    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom_error(RuntimeError("XLA: RESOURCE_EXHAUSTED: out of memory while allocating"))
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_multi_process_launch_without_gpu_is_detected(monkeypatch):
    from utils.run import _launched_multi_process_without_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _launched_multi_process_without_accelerator() is (not torch.cuda.is_available())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _launched_multi_process_without_accelerator() is False


def test_rank_checksums_only_when_asked(tmp_path, monkeypatch):
    from utils.run import RANK_CHECKSUM_ENV, write_rank_checksums

    fake = type("Accelerator", (), {"process_index": 0, "num_processes": 1, "unwrap_model": staticmethod(lambda m: m)})()
    model = torch.nn.Linear(2, 2)
    monkeypatch.delenv(RANK_CHECKSUM_ENV, raising=False)
    write_rank_checksums(fake, model)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(RANK_CHECKSUM_ENV, str(tmp_path))
    write_rank_checksums(fake, model)
    sums = json.load(open(tmp_path / "rank0.json"))
    assert set(sums["parameters"]) == {"0.weight", "0.bias"} and len(sums["all"]) == 64


SHARD_PROBE = textwrap.dedent('''
    import argparse, json, os, sys
    import torch
    from accelerate.utils import DataLoaderConfiguration
    from utils.run import add_run_args, create_accelerator

    parser = argparse.ArgumentParser()
    add_run_args(parser, sys.argv[1])
    args = parser.parse_args(["--report_to", "none"])  # no --seed: the default
    accelerator = create_accelerator(args, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(16)), batch_size=2, shuffle=True,
                                                             generator=torch.Generator()))
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen.append(sorted(i for batch in loader for i in batch.tolist()))
    with open(os.path.join(sys.argv[1], f"rank{accelerator.process_index}.json"), "w") as handle:
        json.dump({"num_processes": accelerator.num_processes, "seen": seen}, handle)
''')


@pytest.mark.slow
def test_unseeded_ranks_partition_the_data(tmp_path):
    """Without --seed, the two ranks' shuffles must still split each epoch's samples between them."""
    probe = tmp_path / "probe.py"
    probe.write_text(SHARD_PROBE)
    run(str(probe), [tmp_path], config="multi_gpu.yaml", num_processes=2)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert all(r["num_processes"] == 2 for r in ranks)
    for epoch in range(2):
        first, second = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert sorted(first + second) == list(range(16)), f"epoch {epoch}: ranks overlap ({first} / {second})"


RELEASE_PROBE = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    from utils.run import end_training, training_accelerator_class

    accelerator = training_accelerator_class()(cpu=True, project_dir=sys.argv[1])
    model = accelerator.prepare(torch.nn.Linear(4, 4))
    accelerator.backward(model(torch.ones(2, 4)).sum())
    destroy = dist.destroy_process_group

    def destroy_and_look(*args, **kwargs):
        print(f"rank {accelerator.process_index}: wrapper {type(model).__name__}, reducer held at destroy: "
              f"{'reducer' in model.__dict__}, logger held at destroy: {'logger' in model.__dict__}", flush=True)
        return destroy(*args, **kwargs)

    dist.destroy_process_group = destroy_and_look
    end_training(accelerator)
    print(f"rank {accelerator.process_index}: process group gone: {not dist.is_initialized()}", flush=True)
''')


@pytest.mark.slow
def test_end_training_releases_the_ddp_reducer_before_the_process_group(tmp_path):
    """A DDP Reducer freed after destroy_process_group holds the group's last reference, and its deallocation
    (GIL held) joins gloo's worker threads: the exit deadlock of utils.run.end_training's docstring. Each rank's
    DistributedDataParallel must have let go of its reducer and logger when the group is destroyed. (accelerate
    keeps the unwrapped module in `_models`: looking for the wrapper there found nothing, and this failed.)"""
    probe = tmp_path / "probe.py"
    probe.write_text(RELEASE_PROBE)
    result = run(str(probe), [tmp_path], config="multi_gpu.yaml", num_processes=2)
    for rank in range(2):
        assert (f"rank {rank}: wrapper DistributedDataParallel, reducer held at destroy: False, "
                f"logger held at destroy: False") in result.stdout, result.stdout + result.stderr[-3000:]
        assert f"rank {rank}: process group gone: True" in result.stdout
