"""Several machines (issue 16): 2 "nodes" x 1 process on this CPU, joined over gloo on 127.0.0.1 by two
`accelerate launch --num_machines 2 --machine_rank 0|1` commands, as a user starts them on two machines.

Checked: the runs end without hanging; only the global main process writes checkpoints, samples, the
final model and the model card; a node-local cache (--latent_cache_dir) is built once per node by that
node's first process, a shared one once in all; a checkpoint holds both ranks' RNG state; resume works.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, launch_env, write_captioned_folder

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_nodes(script, node_args, timeout=600):
    """Start machine_rank 0 and 1 of a 2-node run at once; node_args[r] are rank r's script arguments."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--num_processes", "2", "--dynamo_backend", "no", "--mixed_precision", "no",
               os.path.join(REPO_ROOT, script), *[str(a) for a in node_args[rank]]]
        processes.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=launch_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"machine_rank {rank} exit {process.returncode}:\n{output[-6000:]}"
    return outputs


def test_text_to_image_on_two_nodes_with_node_local_caches_and_resume(tiny_pipeline_dir, tmp_path):
    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data", count=8, size=(24, 24))
    out = tmp_path / "out"
    caches = [tmp_path / "node0_cache", tmp_path / "node1_cache"]  # each "machine" its own local disk

    def args(rank, steps, *extra):
        return ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution", "16",
                "--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", "2",
                "--output_dir", out, "--report_to", "none", "--seed", "0", "--lr_warmup_steps", "0",
                "--cache_latents", "--center_crop", "--latent_cache_dir", caches[rank], "--validation_prompt", "x",
                "--validation_inference_steps", "1", *extra]

    outputs = launch_two_nodes("train_text_to_image.py", [args(0, 2), args(1, 2)])
    for rank, cache in enumerate(caches):  # built on both nodes, once each
        built = [name for name in os.listdir(cache) if name.startswith("latents-")]
        assert len(built) == 1 and os.path.isfile(cache / built[0] / "manifest.json"), (rank, os.listdir(cache))
    assert sum(output.count("Building the latents cache") for output in outputs) == 2
    checkpoint = out / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(checkpoint))  # both ranks' RNG
    assert os.path.isfile(out / "model_index.json") and os.path.isfile(out / "README.md")
    assert sorted(os.listdir(out / "samples")) == ["validation_step_0000002.png"]  # written once, by rank 0
    assert json.load(open(out / "run_info.json"))["world_size"] == 2

    outputs = launch_two_nodes("train_text_to_image.py", [args(0, 4, "--resume_from_checkpoint", "latest"),
                                                          args(1, 4, "--resume_from_checkpoint", "latest")])
    assert all("Resumed from" in output or "Resuming from checkpoint" in output for output in outputs[:1])
    assert json.load(open(out / "checkpoint-4" / "training_state.json"))["global_step"] == 4
    assert sum(output.count("Reusing cached latents") for output in outputs) == 2  # each node its own copy


def test_mask_dit_on_two_nodes_and_resume(tmp_path):
    from utils.mask_dit.data import write_synthetic_fundus_dataset
    from utils.mask_dit.nextdit import is_mask_dit_dir

    data = write_synthetic_fundus_dataset(str(tmp_path / "data"), num_images=8, size=32, seed=0)
    out = tmp_path / "out"

    def args(steps, *extra):
        return ["--train_data_dir", data, "--output_dir", out, "--model_size", "tiny", "--resolution", "32",
                "--mask_channels", "1", "--train_batch_size", "2", "--max_train_steps", str(steps), "--seed", "0",
                "--report_to", "none", "--num_inference_steps", "1", "--num_validation_images", "1",
                "--checkpointing_steps", "2", "--validation_epochs", "0", *extra]

    launch_two_nodes("train_mask_dit.py", [args(2), args(2)])
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(out / "checkpoint-2"))
    assert is_mask_dit_dir(str(out))
    launch_two_nodes("train_mask_dit.py", [args(4, "--resume_from_checkpoint", "latest")] * 2)
    assert json.load(open(out / "checkpoint-4" / "training_state.json"))["global_step"] == 4
