"""accelerate_configs/*.yaml: each loads with accelerate's own loader and launcher, says what the README
says it does, and each one this machine can run trains two steps.

Launch coverage (so no launch is paid twice): cpu.yaml, single_gpu.yaml and multi_gpu.yaml
(`--num_processes 2`, gloo) run the end-to-end tests in tests/test_reliability.py; bf16.yaml and
fp16.yaml are launched here; fsdp.yaml needs two GPUs (FSDP has no CPU backend in accelerate);
deepspeed_zero2.yaml trains and resumes on DeepSpeed's CPU accelerator in tests/test_deepspeed.py.
"""

import glob
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, launch_env, write_captioned_folder

CONFIG_DIR = os.path.join(REPO_ROOT, "accelerate_configs")
ALL_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))

# What each file is documented (README) to set.
EXPECTED = {
    "cpu.yaml": dict(distributed_type="NO", mixed_precision="no", num_processes=1, use_cpu=True),
    "single_gpu.yaml": dict(distributed_type="NO", mixed_precision="no", num_processes=1, use_cpu=False),
    "multi_gpu.yaml": dict(distributed_type="MULTI_GPU", mixed_precision="no", num_processes=8, use_cpu=False),
    "fp16.yaml": dict(distributed_type="NO", mixed_precision="fp16", num_processes=1, use_cpu=False),
    "bf16.yaml": dict(distributed_type="NO", mixed_precision="bf16", num_processes=1, use_cpu=False),
    "fsdp.yaml": dict(distributed_type="FSDP", mixed_precision="bf16", num_processes=8, use_cpu=False),
    "deepspeed_zero2.yaml": dict(distributed_type="DEEPSPEED", mixed_precision="bf16", num_processes=8, use_cpu=False),
    "tpu.yaml": dict(distributed_type="XLA"),
    "multi_node.yaml": dict(distributed_type="MULTI_GPU", mixed_precision="no", num_processes=16, use_cpu=False,
                            num_machines=2, machine_rank=0),
}


def test_the_documented_set_is_there():
    missing = sorted(set(EXPECTED) - set(ALL_CONFIGS))
    assert not missing, f"accelerate_configs/ lacks {missing}"


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_loads_with_accelerates_config_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(os.path.join(CONFIG_DIR, name))
    assert isinstance(config, ClusterConfig)
    for key, value in EXPECTED.get(name, {}).items():
        actual = getattr(config, key)
        actual = getattr(actual, "value", actual)  # enums
        assert actual == value, f"{name}: {key} is {actual!r}, documented as {value!r}"


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_is_documented_in_the_readme(name):
    readme = open(os.path.join(CONFIG_DIR, "README.md"), encoding="utf-8").read()
    assert f"`{name}`" in readme, f"accelerate_configs/README.md does not describe {name}"


@pytest.mark.parametrize("name", [n for n in ALL_CONFIGS if not n.startswith("tpu")])  # XLA launches need torch_xla
def test_the_launcher_accepts_it(name):
    """`accelerate launch --config_file <name>` turns the file into launch settings without complaint."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", os.path.join(CONFIG_DIR, name), "train_text_to_image.py"])
    args, _, _ = _validate_launch_command(args)
    expected = EXPECTED[name]
    assert args.num_processes == expected["num_processes"]
    assert args.mixed_precision == expected["mixed_precision"]
    assert bool(args.multi_gpu) == (expected["distributed_type"] == "MULTI_GPU")
    assert bool(args.use_fsdp) == (expected["distributed_type"] == "FSDP")
    assert bool(args.use_deepspeed) == (expected["distributed_type"] == "DEEPSPEED")


def test_fsdp_config_wraps_each_nextdit_block():
    """fsdp.yaml becomes an FSDP2 plugin whose transformer auto-wrap finds the DiT's block class."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from utils.mask_dit.nextdit import MaskNextDiT2DModel, TransformerBlock, build_mask_nextdit

    args = launch_command_parser().parse_args(["--config_file", os.path.join(CONFIG_DIR, "fsdp.yaml"), "train_mask_dit.py"])
    args, _, _ = _validate_launch_command(args)
    fsdp_env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}
    saved = {k: os.environ.get(k) for k in fsdp_env}
    os.environ.update(fsdp_env)
    try:
        plugin = FullyShardedDataParallelPlugin()
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == [TransformerBlock.__name__]
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    model = build_mask_nextdit("tiny")
    assert isinstance(model, MaskNextDiT2DModel)
    blocks = [m for m in model.modules() if type(m).__name__ == "TransformerBlock"]
    assert len(blocks) == model.config.num_layers
    plugin.set_auto_wrap_policy(model)
    wrapped = [m for m in model.modules() if plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert len(wrapped) == len(blocks) and all(isinstance(m, TransformerBlock) for m in wrapped)


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_captioned_folder(tmp_path_factory.mktemp("cfg_data"), count=4, size=(32, 32), caption="thing {i}", prefix="")


def launch_two_steps(config, pipeline, data, output_dir):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIG_DIR, config),
               os.path.join(REPO_ROOT, "train_text_to_image.py"), "--pretrained_model_name_or_path", pipeline,
               "--train_data_dir", data, "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2",
               "--output_dir", output_dir, "--seed", "0", "--report_to", "none", "--lr_warmup_steps", "0",
               "--checkpointing_steps", "2"]
    return subprocess.run(command, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bf16_yaml_trains_two_steps(tiny_pipeline_dir, tiny_folder, tmp_path):
    result = launch_two_steps("bf16.yaml", tiny_pipeline_dir, tiny_folder, str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2") and os.path.isfile(tmp_path / "out" / "model_index.json")
    args = __import__("json").load(open(tmp_path / "out" / "training_args.json"))
    assert args["mixed_precision"] is None  # bf16 came from the accelerate config, not the flag


@pytest.mark.slow
def test_fp16_yaml(tiny_pipeline_dir, tiny_folder, tmp_path):
    """On a GPU: two steps. On a CPU: a clear error saying what to use instead (not a dtype crash)."""
    result = launch_two_steps("fp16.yaml", tiny_pipeline_dir, tiny_folder, str(tmp_path / "out"))
    if torch.cuda.is_available():
        assert result.returncode == 0, result.stderr[-4000:]
        assert os.path.isdir(tmp_path / "out" / "checkpoint-2")
    else:
        assert result.returncode != 0
        assert "fp16 mixed precision" in result.stderr and "needs a GPU" in result.stderr and "bf16.yaml" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs at least 2 GPUs")
def test_fsdp_yaml_trains_two_steps(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIG_DIR, "fsdp.yaml"),
               "--num_processes", "2", os.path.join(REPO_ROOT, "train_mask_dit.py"), "--model_size", "tiny",
               "--train_data_dir", str(tmp_path / "data"), "--resolution", "32", "--train_batch_size", "2",
               "--max_train_steps", "2", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    subprocess.run([sys.executable, "-m", "utils.mask_dit.data", "--output_dir", str(tmp_path / "data"), "--num_images", "8",
                    "--size", "32"], cwd=REPO_ROOT, env=launch_env(), check=True)
    result = subprocess.run(command, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
