"""Runs that cannot silently go wrong (issue 16): bad runs are refused before anything is written, good
checkpoints are protected, and a user error prints one `error:` block (exit 2) without a traceback.

Most cases run the scripts in-process through the same entry point `python script.py` uses
(`utils.errors.run_script`), so the printed output is exactly what a user sees; a few run as real
processes (`python`, `accelerate launch -q`) to check it end to end.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, launch_env, run_main_in_process
from PIL import Image
from safetensors.torch import load_file, save_file
from test_bad_inputs import mask_dit_argv, noise_image, t2i_argv

from utils.errors import EXIT_USER_ERROR, UserError, run_script


def tree_digest(root) -> dict:
    """SHA-256 of every file under `root`, the checkpoints, the final model, training_args.json and the run
    record included (what a refused run must leave as it was); tracker event files (logs/) aside."""
    digests = {}
    for directory, _, files in os.walk(root):
        if os.path.relpath(directory, root).split(os.sep)[0] == "logs":
            continue
        for name in files:
            path = os.path.join(directory, name)
            digests[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return digests


def run_cli(script, argv):
    """`python script.py argv` in this process: parse, check, run; user errors exit 2 with one block."""
    def entry():
        return run_main_in_process(script, argv)
    return run_script(entry)


def expect_user_error(capsys, script, argv, *fragments):
    """The run exits 2, prints `error:` naming every fragment, and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script, [str(a) for a in argv])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert exit_info.value.code == EXIT_USER_ERROR, output
    assert "Traceback" not in output, output
    assert captured.err.count("error: ") == 1, captured.err
    for fragment in fragments:
        assert str(fragment) in captured.err, (fragment, captured.err)
    return captured.err


@pytest.fixture(scope="module")
def t2i_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i") / "data"
    root.mkdir()
    for i in range(4):
        noise_image(seed=i).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture {i}", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory, tiny_pipeline_dir, t2i_data):
    """A finished 3-step run with checkpoint-2 and checkpoint-3 (limit 2): the checkpoints to protect."""
    import train_text_to_image as script

    out = tmp_path_factory.mktemp("t2i_run") / "out"
    run_main_in_process(script, t2i_argv(tiny_pipeline_dir, "--train_data_dir", t2i_data, out, "--max_train_steps",
                                         "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"))
    assert sorted(os.listdir(out)).count("checkpoint-3") == 1
    return out


def t2i_cmd(pipeline, data, out, *extra):
    return t2i_argv(pipeline, "--train_data_dir", data, out, *extra)


# ----------------------------------------------------------------------------------------------
# 1. a fresh run into another run's output_dir
# ----------------------------------------------------------------------------------------------

def test_fresh_run_into_another_runs_checkpoints_is_refused(capsys, tiny_pipeline_dir, t2i_data, t2i_run):
    import train_text_to_image as script

    before = tree_digest(t2i_run)
    args_before = open(t2i_run / "training_args.json", "rb").read()
    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, t2i_run, "--checkpointing_steps", "1",
                                              "--checkpoints_total_limit", "2"),
                      "already holds checkpoints of another run", "--resume_from_checkpoint latest",
                      "--overwrite_output_dir")
    assert tree_digest(t2i_run) == before
    assert open(t2i_run / "training_args.json", "rb").read() == args_before  # (8) nothing rewritten


def test_overwrite_output_dir_starts_over(tiny_pipeline_dir, t2i_data, t2i_run, tmp_path):
    import shutil

    import train_text_to_image as script

    out = tmp_path / "copy"
    shutil.copytree(t2i_run, out)
    run_main_in_process(script, t2i_cmd(tiny_pipeline_dir, t2i_data, out, "--max_train_steps", "2",
                                        "--checkpointing_steps", "1", "--overwrite_output_dir"))
    steps = sorted(name for name in os.listdir(out) if name.startswith("checkpoint-"))
    assert steps == ["checkpoint-1", "checkpoint-2"]  # the old checkpoint-3 is gone: no mixed runs
    state = json.load(open(out / "checkpoint-2" / "training_state.json"))
    assert state["global_step"] == 2


# ----------------------------------------------------------------------------------------------
# 2. non-finite weights
# ----------------------------------------------------------------------------------------------

def poison(checkpoint, subfolder="unet"):
    """Overwrite one tensor of the checkpoint's weights with NaN (as a bit flip or a bad run would)."""
    path = next(os.path.join(d, n) for d, _, files in os.walk(os.path.join(checkpoint, subfolder)) for n in files
                if n.endswith(".safetensors"))
    tensors = load_file(path)
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, path)
    return path


def test_resume_from_a_nan_checkpoint_is_refused_naming_the_good_one(capsys, tiny_pipeline_dir, t2i_data, t2i_run,
                                                                      tmp_path):
    import shutil

    import train_text_to_image as script

    out = tmp_path / "nan"
    shutil.copytree(t2i_run, out)
    poison(out / "checkpoint-3")
    before, final_before = tree_digest(out), open(out / "unet" / "diffusion_pytorch_model.safetensors", "rb").read()
    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, out, "--max_train_steps", "5",
                                              "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                                              "--resume_from_checkpoint", "latest"),
                      f"Cannot resume from {out / 'checkpoint-3'}", "holds NaN/Inf",
                      f"The newest good checkpoint is {out / 'checkpoint-2'}")
    assert tree_digest(out) == before  # checkpoint-2 (the good one) was not rotated away
    assert open(out / "unet" / "diffusion_pytorch_model.safetensors", "rb").read() == final_before


def test_non_finite_weights_are_never_saved(tmp_path):
    import torch
    from accelerate import Accelerator

    from utils.checkpointing import NonFiniteWeightsError, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, str(tmp_path), 1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"Not saving checkpoint-2: .*Linear\.weight.*checkpoint-1"):
        save_checkpoint(accelerator, str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]  # no checkpoint-2, no temp folder


def test_truncated_and_incomplete_checkpoints_are_named(capsys, tiny_pipeline_dir, t2i_data, t2i_run, tmp_path):
    import shutil

    import train_text_to_image as script

    out = tmp_path / "damaged"
    shutil.copytree(t2i_run, out)
    weights = out / "checkpoint-3" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    argv = t2i_cmd(tiny_pipeline_dir, t2i_data, out, "--max_train_steps", "5", "--resume_from_checkpoint", "latest")
    expect_user_error(capsys, script, argv, "unet/diffusion_pytorch_model.safetensors cannot be read",
                      "checkpoint-2")
    os.remove(out / "checkpoint-2" / "optimizer.bin")
    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, out, "--max_train_steps", "5",
                                              "--resume_from_checkpoint", str(out / "checkpoint-2")),
                      f"Cannot resume from {out / 'checkpoint-2'}", "optimizer.bin")


def test_full_checkpoint_resumed_with_use_lora_is_named(capsys, tiny_pipeline_dir, t2i_data, t2i_run):
    import train_text_to_image as script

    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, t2i_run, "--use_lora",
                                              "--resume_from_checkpoint", "latest", "--max_train_steps", "5"),
                      "is a full fine-tune checkpoint", "drop --use_lora")


# ----------------------------------------------------------------------------------------------
# 3. the final weights come before anything optional
# ----------------------------------------------------------------------------------------------

def test_a_failing_validation_after_training_keeps_the_final_weights(tiny_pipeline_dir, t2i_data, tmp_path,
                                                                     monkeypatch):
    import train_text_to_image as script

    def broken(settings, family, accelerator, models, ema, step, final=False):
        if final:
            raise RuntimeError("validation broke")
    monkeypatch.setattr(script, "log_validation", broken)
    with pytest.raises(RuntimeError, match="validation broke"):
        run_main_in_process(script, t2i_cmd(tiny_pipeline_dir, t2i_data, tmp_path / "out", "--validation_prompt", "x"))
    assert os.path.isfile(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(tmp_path / "out" / "model_index.json")


def test_zero_validation_epochs_means_never(tiny_pipeline_dir, t2i_data, tmp_path):
    """(7) one meaning in every script: 0 turns epoch validation off (it used to divide by zero after epoch 1)."""
    import train_text_to_image as script

    run_main_in_process(script, t2i_cmd(tiny_pipeline_dir, t2i_data, tmp_path / "out", "--max_train_steps", "4",
                                        "--validation_prompt", "x", "--validation_epochs", "0"))
    assert os.listdir(tmp_path / "out" / "samples") == ["validation_step_0000004.png"]  # 2 epochs: the final one only


# ----------------------------------------------------------------------------------------------
# 6. segmentation masks and split files
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def irstd(tmp_path):
    from utils.segmentation.data import write_synthetic_irstd

    return write_synthetic_irstd(str(tmp_path / "irstd"), num_train=4, num_test=2, size=32, seed=0)


def test_zero_one_masks_are_read_as_targets(irstd):
    from utils.segmentation.data import IRSTDDataset

    dataset = IRSTDDataset(irstd, "trainval", train=False, base_size=32, crop_size=32)
    expected = dataset[0]["mask"]
    assert expected.sum() > 0
    name = dataset.names[0]
    mask = np.asarray(Image.open(os.path.join(irstd, "masks", f"{name}.png")))
    Image.fromarray((mask > 127).astype(np.uint8)).save(os.path.join(irstd, "masks", f"{name}.png"))  # 0/1 values
    assert dataset[0]["mask"].equal(expected)


def test_split_names_cannot_leave_the_dataset_folder(irstd, tmp_path):
    from utils.segmentation.data import read_split

    outside = tmp_path / "secret"
    outside.mkdir()
    with open(os.path.join(irstd, "trainval.txt"), "a") as handle:
        handle.write("../../secret/x\n")
    with pytest.raises(UserError, match=r"trainval\.txt, name 5 '\.\./\.\./secret/x': points outside --dataset_dir"):
        read_split(irstd, "trainval")


# ----------------------------------------------------------------------------------------------
# The sweep: >= 30 bad inputs across the scripts, each one block, exit 2, checkpoints untouched.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mask_dit_run(tmp_path_factory):
    import train_mask_dit as script
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    base = tmp_path_factory.mktemp("mask_dit_run")
    data = write_synthetic_fundus_dataset(str(base / "data"), num_images=6, size=32, seed=0)
    out = base / "out"
    run_main_in_process(script, mask_dit_argv(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                              "--validation_epochs", "0"))
    return data, out


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    import train_segmentation_tpu as script
    from utils.segmentation.data import write_synthetic_irstd

    base = tmp_path_factory.mktemp("seg_run")
    data = write_synthetic_irstd(str(base / "irstd"), num_train=4, num_test=2, size=32, seed=0)
    out = base / "out"
    run_main_in_process(script, seg_argv(data, out, "--checkpointing_steps", "1"))
    return data, out


def seg_argv(data, out, *extra):
    return ["--dataset_dir", data, "--output_dir", out, "--report_to", "none", "--crop_size", "32", "--base_size",
            "32", "--max_train_steps", "2", "--batch_size", "2", "--seed", "0", *extra]


def write(path, content):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(content, bytes) else "w") as handle:
        handle.write(content)
    return path


def sweep_cases(tiny, t2i_data, t2i_run, mask_dit_run, seg_run, tmp):
    """(name, script module name, argv, fragments the message must name)."""
    resume = ["--resume_from_checkpoint", "latest"]
    t2i = lambda *extra, data=t2i_data, flag="--train_data_dir": t2i_argv(tiny, flag, data, t2i_run, *resume,  # noqa: E731
                                                                         "--max_train_steps", "9", *extra)
    md_data, md_out = mask_dit_run
    md = lambda *extra, data=md_data: mask_dit_argv(data, md_out, *resume, "--max_train_steps", "9", *extra)  # noqa: E731
    seg_data, seg_out = seg_run
    seg = lambda *extra, data=seg_data: seg_argv(data, seg_out, *resume, *extra)  # noqa: E731

    def folder(name, files):
        root = tmp / name
        for relative, content in files.items():
            write(root / relative, content)
        return root

    png = open(os.path.join(t2i_data, "img0.png"), "rb").read()
    broken_jsonl = folder("jsonl", {"a.png": png, "b.png": png, "metadata.jsonl":
                                    '{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "no quote}\n'})
    numeric = folder("numeric", {"a.png": png, "metadata.jsonl": '{"file_name": "a.png", "text": 42}\n'})
    empty_image = folder("empty", {"a.png": png, "a.txt": "x", "b.png": b"", "b.txt": "y"})
    text_image = folder("textimg", {"a.png": b"not an image", "a.txt": "x"})
    table = write(tmp / "table" / "rows.csv", "image,text\nmissing.png,hello\n")
    yaml_bool = write(tmp / "bool.yaml", 'use_lora: "false"\n')
    yaml_unknown = write(tmp / "unknown.yaml", "learning_rat: 1\n")
    not_pipeline = folder("notpipe", {"config.json": "{}"})
    import shutil

    seg_escape = str(tmp / "seg_escape")
    shutil.copytree(seg_data, seg_escape)
    with open(os.path.join(seg_escape, "trainval.txt"), "a") as handle:
        handle.write("../../etc/passwd\n")
    seg_truncated = str(tmp / "seg_truncated")
    shutil.copytree(seg_data, seg_truncated)
    name = open(os.path.join(seg_truncated, "trainval.txt")).read().split()[0]
    mask_file = os.path.join(seg_truncated, "masks", f"{name}.png")
    write(mask_file, open(mask_file, "rb").read()[:40])
    md_bad = str(tmp / "md_bad")
    shutil.copytree(md_data, md_bad)
    first_mask = sorted(os.listdir(os.path.join(md_bad, "masks")))[0]
    write(os.path.join(md_bad, "masks", first_mask), b"garbage")
    unet_weights = os.path.join(t2i_run, "unet", "diffusion_pytorch_model.safetensors")
    generated = write(tmp / "gen_out_file", "a file")

    return [
        ("t2i no data", "train_text_to_image", ["--pretrained_model_name_or_path", tiny], ["--dataset_name"]),
        ("t2i resolution 0", "train_text_to_image", t2i("--resolution", "0"), ["--resolution 0"]),
        ("t2i resolution -32", "train_text_to_image", t2i("--resolution", "-32"), ["--resolution -32"]),
        ("t2i resolution odd", "train_text_to_image", t2i("--resolution", "15"), ["--resolution 15", "multiple of"]),
        ("t2i max steps 0", "train_text_to_image", t2i("--max_train_steps", "0"), ["--max_train_steps 0"]),
        ("t2i total limit 0", "train_text_to_image", t2i("--checkpoints_total_limit", "0"),
         ["--checkpoints_total_limit 0"]),
        ("t2i validation images 0", "train_text_to_image", t2i("--validation_prompt", "x", "--num_validation_images",
                                                               "0"), ["--num_validation_images 0"]),
        ("t2i negative validation epochs", "train_text_to_image", t2i("--validation_epochs", "-1"),
         ["--validation_epochs -1"]),
        ("t2i accumulation 0", "train_text_to_image", t2i("--gradient_accumulation_steps", "0"),
         ["--gradient_accumulation_steps"]),
        ("t2i lora + ema", "train_text_to_image", t2i("--use_lora", "--use_ema"), ["--use_ema with --use_lora"]),
        ("t2i caption dropout 1", "train_text_to_image", t2i("--caption_dropout_prob", "1"), ["--caption_dropout_prob"]),
        ("t2i yaml quoted bool", "train_text_to_image", t2i("--config", yaml_bool), [yaml_bool, "use_lora"]),
        ("t2i yaml unknown key", "train_text_to_image", t2i("--config", yaml_unknown), ["learning_rat",
                                                                                      "--learning_rate"]),
        ("t2i missing data dir", "train_text_to_image", t2i(data=tmp / "nowhere"), ["--train_data_dir",
                                                                                  str(tmp / "nowhere")]),
        ("t2i broken metadata.jsonl", "train_text_to_image", t2i(data=broken_jsonl),
         [os.path.join(broken_jsonl, "metadata.jsonl") + ":2", "not valid JSON"]),
        ("t2i numeric caption", "train_text_to_image", t2i(data=numeric), ["a.png", "caption is a int (42)"]),
        ("t2i empty image file", "train_text_to_image", t2i(data=empty_image), [str(empty_image / "b.png"),
                                                                                "--skip_bad_samples"]),
        ("t2i text as image", "train_text_to_image", t2i(data=text_image), [str(text_image / "a.png")]),
        ("t2i table with a missing image", "train_text_to_image", t2i(data=table, flag="--train_data_file"),
         ["missing.png", "image file not found"]),
        ("t2i resume missing", "train_text_to_image", t2i_argv(tiny, "--train_data_dir", t2i_data, t2i_run,
                                                               "--resume_from_checkpoint", "checkpoint-77"),
         ["checkpoint-77", "latest"]),
        ("t2i not a pipeline", "train_text_to_image", t2i_argv(not_pipeline, "--train_data_dir", t2i_data, t2i_run,
                                                               *resume), [str(not_pipeline)]),
        ("t2i mask DiT as base model", "train_text_to_image",
         t2i_argv(str(md_out), "--train_data_dir", t2i_data, t2i_run, *resume), [str(md_out), "mask DiT"]),
        ("t2i fresh run over checkpoints", "train_text_to_image", t2i_argv(tiny, "--train_data_dir", t2i_data,
                                                                           t2i_run), ["--overwrite_output_dir"]),
        ("mask DiT max steps 0", "train_mask_dit", md("--max_train_steps", "0"), ["--max_train_steps 0"]),
        ("mask DiT bad resolution", "train_mask_dit", md("--resolution", "31"), ["--resolution 31"]),
        ("mask DiT garbage mask", "train_mask_dit", md(data=md_bad), [first_mask, "--skip_bad_samples"]),
        ("mask DiT missing data", "train_mask_dit", md(data=tmp / "nothing"), [str(tmp / "nothing")]),
        ("mask DiT fresh run over checkpoints", "train_mask_dit", mask_dit_argv(md_data, md_out),
         ["--overwrite_output_dir"]),
        ("seg crop 40", "train_segmentation_tpu", seg("--crop_size", "40"), ["--crop_size 40"]),
        ("seg crop 0", "train_segmentation_tpu", seg("--crop_size", "0"), ["--crop_size 0"]),
        ("seg max steps 0", "train_segmentation_tpu", seg("--max_train_steps", "0"), ["--max_train_steps 0"]),
        ("seg escaping split name", "train_segmentation_tpu", seg(data=seg_escape), ["../../etc/passwd",
                                                                                   "outside --dataset_dir"]),
        ("seg truncated mask", "train_segmentation_tpu", seg(data=seg_truncated), [mask_file]),
        ("seg UNet weights as MSHNet", "train_segmentation_tpu", seg("--weight_path", unet_weights),
         [unet_weights]),
        ("seg test without weights", "train_segmentation_tpu", seg("--mode", "test"), ["--weight_path"]),
        ("generate mask DiT without --mask", "generate", ["--model", md_out, "--prompt", "x"], ["--mask"]),
        ("generate output_dir is a file", "generate", ["--model", tiny, "--prompt", "x", "--output_dir", generated],
         ["--output_dir", generated]),
        ("generate no prompt", "generate", ["--model", tiny], ["--prompt"]),
    ]


def test_sweep_of_bad_inputs(capsys, tiny_pipeline_dir, t2i_data, t2i_run, mask_dit_run, seg_run, tmp_path):
    import importlib

    cases = sweep_cases(tiny_pipeline_dir, t2i_data, t2i_run, mask_dit_run, seg_run, tmp_path)
    assert len(cases) >= 30
    outputs = [t2i_run, mask_dit_run[1], seg_run[1]]
    before = [tree_digest(out) for out in outputs]
    failures = []
    for name, module, argv, fragments in cases:
        script = importlib.import_module(module)
        try:
            if module == "generate":
                with pytest.raises(SystemExit) as exit_info:
                    run_script(script.main, [str(a) for a in argv])
                captured = capsys.readouterr()
                assert exit_info.value.code == EXIT_USER_ERROR and "Traceback" not in captured.err + captured.out
                assert all(str(f) in captured.err for f in fragments), captured.err
            else:
                expect_user_error(capsys, script, argv, *fragments)
        except (AssertionError, BaseException) as error:  # collect them all, then report every failing case
            failures.append(f"{name}: {type(error).__name__}: {str(error)[:600]}")
    assert not failures, "\n".join(failures)
    assert [tree_digest(out) for out in outputs] == before, "a refused run changed a checkpoint"


@pytest.mark.slow
def test_user_error_as_a_real_process_prints_one_block(tiny_pipeline_dir, tmp_path):
    """`python train_text_to_image.py` and `accelerate launch -q`: one error block, exit 2, no traceback."""
    argv = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", str(tmp_path / "missing"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--resolution", "16"]
    direct = subprocess.run([sys.executable, "train_text_to_image.py", *argv], cwd=REPO_ROOT, env=launch_env(),
                            capture_output=True, text=True, timeout=300)
    assert direct.returncode == EXIT_USER_ERROR, direct.stderr[-3000:]
    assert "Traceback" not in direct.stderr + direct.stdout
    assert direct.stderr.count("error: --train_data_dir") == 1
    assert "requires torchvision" not in direct.stderr  # (transformers 5 noise on every run, filtered in utils)
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1",
                               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               "train_text_to_image.py", *argv], cwd=REPO_ROOT, env=launch_env(), capture_output=True,
                              text=True, timeout=300)
    assert launched.returncode != 0
    assert "Traceback" not in launched.stderr + launched.stdout, launched.stderr[-3000:]
    assert launched.stderr.count("error: --train_data_dir") == 1
    assert "`accelerate launch -q ...` shows this message alone" in launched.stderr  # the hint, under the launcher
    assert "accelerate launch -q" not in direct.stderr  # and only there
    debug = subprocess.run([sys.executable, "train_text_to_image.py", *argv], cwd=REPO_ROOT,
                           env={**launch_env(), "TRAIN_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert "Traceback" in debug.stderr and debug.returncode == EXIT_USER_ERROR  # TRAIN_DEBUG=1 shows where


def readme_commands(script_name):
    """Every `... <script_name> ...` command in the bash blocks of README.md and docs/*.md, continuation lines
    joined."""
    import glob
    import re
    import shlex

    pages = [os.path.join(REPO_ROOT, "README.md")] + sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
    text = "\n".join(open(page, encoding="utf-8").read() for page in pages)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            words = shlex.split(line) if script_name in line and not line.startswith("#") else []
            if script_name in words:  # (not a path that merely ends with it, e.g. diffusers' own script)
                commands.append(words[words.index(script_name) + 1:])
    return commands


def test_readme_text_to_image_recipes_pass_the_argument_checks():
    """The README's recipes are commands a user pastes: each must get past the argument checks
    (its LoRA recipe used to add --use_lora to a command with --use_ema, which is refused)."""
    import train_text_to_image as script

    commands = readme_commands("train_text_to_image.py")
    assert len(commands) >= 3 and any("--use_lora" in c for c in commands)
    for argv in commands:
        if any(arg.startswith(("$", "<")) or arg == "ARGS" for arg in argv):  # placeholders, not recipes
            continue
        script.parse_args(argv)  # raises UserError on a refused combination


# ----------------------------------------------------------------------------------------------
# The pre-flight scan with --skip_bad_samples, in the two scripts that gained the flag; 9. warnings
# ----------------------------------------------------------------------------------------------

def test_mask_dit_skip_bad_samples_leaves_the_bad_pair_out(tmp_path, caplog):
    import logging

    import train_mask_dit as script
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "data"), num_images=5, size=32, seed=0)
    names = sorted(os.listdir(os.path.join(data, "masks")))
    write(os.path.join(data, "masks", names[1]), b"not a png")  # the scan sees it
    image = os.path.join(data, "images", names[2])  # header intact, pixels cut: seen when decoded
    write(image, open(image, "rb").read()[:200])
    with caplog.at_level(logging.INFO):
        run_main_in_process(script, mask_dit_argv(data, tmp_path / "out", "--skip_bad_samples", "--validation_split",
                                                  "0", "--max_train_steps", "3", "--validation_epochs", "0"))
    assert "Pre-flight: leaving out 1 of 5 samples" in caplog.text and names[1] in caplog.text
    assert "4 training pairs" in caplog.text
    assert f"Skipping bad sample ({image}: cannot read image" in caplog.text


def test_segmentation_skip_bad_samples_leaves_the_bad_frame_out(irstd, tmp_path, caplog):
    import logging

    import train_segmentation_tpu as script

    names = open(os.path.join(irstd, "trainval.txt")).read().split()
    write(os.path.join(irstd, "images", f"{names[0]}.png"), b"")
    mask = os.path.join(irstd, "masks", f"{names[1]}.png")
    write(mask, open(mask, "rb").read()[:60])  # header intact: seen when decoded
    with caplog.at_level(logging.INFO):
        run_main_in_process(script, seg_argv(irstd, tmp_path / "out", "--skip_bad_samples", "--max_train_steps", "3"))
    assert "Pre-flight: leaving out 1 of 4 samples" in caplog.text
    assert f"{names[0]}.png: image file is empty" in caplog.text
    assert f"Skipping bad sample ({mask}: cannot read image" in caplog.text
    assert os.path.isfile(tmp_path / "out" / "last" / "model.safetensors")


def test_a_batch_larger_than_the_dataset_is_warned_about(tiny_pipeline_dir, t2i_data, tmp_path, caplog):
    import logging

    import train_text_to_image as script

    with caplog.at_level(logging.WARNING):
        run_main_in_process(script, t2i_cmd(tiny_pipeline_dir, t2i_data, tmp_path / "out", "--train_batch_size", "6"))
    assert caplog.text.count("The batch size 6 (per process) is larger than the dataset (4 samples)") == 1


def test_preflight_lists_the_first_20_problems_and_counts_all(tmp_path):
    from types import SimpleNamespace

    from utils.data import BadSampleError
    from utils.preflight import preflight

    def check(index):
        if index % 2:
            yield f"file{index}.png", "image file is empty (0 bytes)"

    args = SimpleNamespace(skip_preflight=False, skip_bad_samples=False)
    with pytest.raises(BadSampleError) as error:
        preflight(args, 60, check, "my folder")
    message = str(error.value)
    assert "my folder: 30 of 60 samples are unusable" in message and "... and 10 more" in message
    assert message.count("image file is empty") == 20 and "file39.png" in message and "file41.png" not in message
    assert "--skip_bad_samples" in message and "--skip_preflight" in message
    assert preflight(SimpleNamespace(skip_preflight=False, skip_bad_samples=True), 60, check, "f") == set(range(1, 60, 2))
    assert preflight(SimpleNamespace(skip_preflight=True, skip_bad_samples=False), 60, check, "f") == set()


@pytest.mark.slow
def test_user_error_in_a_two_process_run_prints_one_block(tiny_pipeline_dir, tmp_path):
    """2 gloo processes under `accelerate launch -q`: rank 0 prints the block, rank 1 one tagged line."""
    from conftest import accelerate_launch

    argv = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", str(tmp_path / "missing"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--resolution", "16"]
    result = accelerate_launch("train_text_to_image.py", argv, num_processes=2, extra_launch_args=["-q"], check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("error: --train_data_dir") == 1 and output.count("error (rank 1): --train_data_dir") == 1
    assert "Traceback" not in output, output[-4000:]


# ----------------------------------------------------------------------------------------------
# Issue 28: the second sweep's WRONG and UNCLEAR cases, each refused with one block or fixed.
# ----------------------------------------------------------------------------------------------

def copy_run(source, destination):
    import shutil

    shutil.copytree(source, destination)
    return destination


def test_negative_early_stopping_delta_is_refused(capsys, tiny_pipeline_dir, t2i_data, tmp_path):
    import train_text_to_image as script

    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, tmp_path / "out", "--validation_split", "0.25",
                                              "--early_stopping_patience", "2", "--early_stopping_min_delta", "-1"),
                      "--early_stopping_min_delta -1", "must be >= 0")
    assert not (tmp_path / "out").exists()


def test_a_replaced_random_state_file_is_refused_not_silently_resumed(capsys, tiny_pipeline_dir, t2i_data, t2i_run,
                                                                      tmp_path):
    import torch

    import train_text_to_image as script

    out = copy_run(t2i_run, tmp_path / "rng")
    torch.save({"something": torch.zeros(2)}, out / "checkpoint-3" / "random_states_0.pkl")  # another (harmless) pickle
    before = tree_digest(out)
    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, out, "--max_train_steps", "5",
                                              "--resume_from_checkpoint", "latest"),
                      "checkpoint-3", "random_states_0.pkl", "not accelerate's random-state file",
                      f"The newest good checkpoint is {out / 'checkpoint-2'}")
    assert tree_digest(out) == before


@pytest.mark.parametrize("optimizer", ["lion", "prodigy"])
def test_a_resume_with_another_optimizer_is_refused_before_writing(capsys, tiny_pipeline_dir, t2i_data, t2i_run,
                                                                   tmp_path, optimizer):
    import train_text_to_image as script

    out = copy_run(t2i_run, tmp_path / optimizer)
    before = tree_digest(out)
    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, out, "--max_train_steps", "5",
                                              "--resume_from_checkpoint", "latest", "--optimizer", optimizer),
                      f"--optimizer {optimizer}", "trained with --optimizer adamw", "Nothing was written")
    assert tree_digest(out) == before  # training_args.json and run_info.json included


def test_a_resume_with_another_lora_rank_names_both_ranks(tmp_path):
    from types import SimpleNamespace

    from utils.checkpointing import check_resume_matches

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "run_info.json").write_text(json.dumps({"args": {"use_lora": True, "rank": 4, "optimizer": "adamw"}}))
    args = SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(tmp_path), use_lora=True, rank=8,
                           optimizer="adamw")
    with pytest.raises(UserError, match="--rank 8: .*checkpoint-2 was trained with --rank 4"):
        check_resume_matches(args)
    check_resume_matches(SimpleNamespace(**{**vars(args), "rank": 4}))  # the same values resume


def test_a_finished_model_without_checkpoints_is_not_overwritten(capsys, tiny_pipeline_dir, t2i_data, t2i_run,
                                                                 tmp_path):
    import shutil

    import train_text_to_image as script

    out = copy_run(t2i_run, tmp_path / "finished")
    for name in os.listdir(out):
        if name.startswith("checkpoint-"):
            shutil.rmtree(out / name)  # a run shorter than --checkpointing_steps leaves none
    before = tree_digest(out)
    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, out),
                      "already holds another run's model", "model_index.json", "--overwrite_output_dir")
    assert tree_digest(out) == before


def test_overwrite_output_dir_reuses_nothing_of_the_old_run(tmp_path):
    from types import SimpleNamespace

    from accelerate import Accelerator

    from utils.checkpointing import discard_old_checkpoints

    for name in ("checkpoint-3", "vae_stage", "vae_stage_checkpoint"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    discard_old_checkpoints(SimpleNamespace(output_dir=str(tmp_path), overwrite_output_dir=True,
                                            resume_from_checkpoint=None), Accelerator(cpu=True))
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == []


def test_a_second_run_into_a_busy_output_dir_is_refused_and_a_crashed_ones_lock_is_stale(capsys, tiny_pipeline_dir,
                                                                                          t2i_data, tmp_path):
    """Two runs started at once both pass the used-output-dir check (no checkpoint yet): the lock refuses the
    second. The holder here is a process holding the lock as a running trainer does; when it dies (a crash), the
    OS drops the lock and the next run goes ahead."""
    import time

    import train_text_to_image as script
    from utils.checkpointing import LOCK_FILE

    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\nh = open(sys.argv[1], 'a')\n"
                               "fcntl.flock(h, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)",
                               str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, out), "is in use by another run",
                          "--output_dir")
        assert not any(name.startswith("checkpoint-") for name in os.listdir(out))
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    run_cli(script, [str(a) for a in t2i_cmd(tiny_pipeline_dir, t2i_data, out)])  # the crashed holder's lock is gone
    assert (out / "model_index.json").is_file()


def test_optimizer_args_are_checked_against_the_optimizer(capsys, tiny_pipeline_dir, t2i_data, tmp_path):
    import train_text_to_image as script

    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, tmp_path / "a", "--optimizer_args", "lr=abc"),
                      "--optimizer_args lr='abc'", "expects a number")
    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, tmp_path / "b", "--optimizer", "lion",
                                              "--optimizer_args", "betas=(1,2,3)"),
                      "--optimizer_args betas=(1, 2, 3)", "a tuple of 2 numbers")


def test_damaged_and_pickled_single_files_are_named(capsys, tiny_pipeline_dir, t2i_data, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    import train_text_to_image as script
    from utils.sd.single_file import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    whole = save_single_file(str(tmp_path / "model.safetensors"), pipe.unet, pipe.vae, pipe.text_encoder, "fp32")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(whole, "rb").read()[:5000])
    expect_user_error(capsys, script, ["--pretrained_model_name_or_path", truncated, "--model_config",
                                       tiny_pipeline_dir, "--train_data_dir", t2i_data, "--output_dir", tmp_path / "o1",
                                       "--resolution", "16", "--report_to", "none"],
                      str(truncated), "damaged or truncated")

    import argparse

    pickled = tmp_path / "model.ckpt"  # an object beside the tensors, as a malicious pickle carries (never run)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": argparse.Namespace(run="code")}, pickled)
    expect_user_error(capsys, script, ["--pretrained_model_name_or_path", pickled, "--model_config", tiny_pipeline_dir,
                                       "--train_data_dir", t2i_data, "--output_dir", tmp_path / "o2", "--resolution",
                                       "16", "--report_to", "none"],
                      str(pickled), "refused as unsafe", "safetensors")
    import generate

    with pytest.raises(SystemExit) as exit_info:
        run_script(generate.main, ["--model", str(pickled), "--model_config", tiny_pipeline_dir, "--prompt", "x",
                                   "--output_dir", str(tmp_path / "g"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and "refused as unsafe" in err and "Traceback" not in err


def test_flag_values_checked_at_parse_time(capsys, tiny_pipeline_dir, t2i_data, tmp_path):
    import train_text_to_image as script

    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, tmp_path / "a", "--lr_scheduler", "bogus"),
                      "--lr_scheduler bogus", "cosine")
    expect_user_error(capsys, script, t2i_cmd(tiny_pipeline_dir, t2i_data, tmp_path / "b",
                                              "--pretrained_vae_model_name_or_path", tiny_pipeline_dir),
                      "is a whole pipeline", os.path.join(tiny_pipeline_dir, "vae"))
    import generate

    with pytest.raises(SystemExit) as exit_info:
        run_script(generate.main, ["--model", tiny_pipeline_dir, "--prompt", "x", "--height", "33"])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and "--height 33" in err and "multiple of 8" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # a refused run leaves no empty folder


@pytest.mark.parametrize("code", ["EACCES", "ENOSPC"])
def test_a_refused_write_is_one_block_saying_what_to_do(capsys, code):
    import errno

    def main():
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/out/checkpoint-4/optimizer.bin")
    with pytest.raises(SystemExit) as exit_info:
        run_script(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and err.count("error: ") == 1 and "Traceback" not in err
    assert "/out/checkpoint-4/optimizer.bin" in err
    assert ("writable" if code == "EACCES" else "Existing checkpoints were not changed") in err


def test_non_utf8_table_file_names_file_and_line(capsys, tiny_pipeline_dir, t2i_data, tmp_path):
    import train_text_to_image as script

    table = tmp_path / "rows.jsonl"
    image = os.path.join(t2i_data, "img0.png")
    table.write_bytes(f'{{"image": "{image}", "text": "ok"}}\n'.encode() + b'{"image": "x.png", "text": "caf\xe9"}\n')
    expect_user_error(capsys, script, t2i_argv(tiny_pipeline_dir, "--train_data_file", table, tmp_path / "out"),
                      f"{table}:2", "not valid UTF-8")


def test_mask_dit_captions_and_metadata_name_file_and_line(tmp_path):
    import shutil

    from utils.mask_dit.data import _read_captions, write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "d"), num_images=2, size=32, seed=0)
    lines = open(os.path.join(data, "metadata.jsonl")).read().splitlines()
    with open(os.path.join(data, "metadata.jsonl"), "w") as handle:
        handle.write("\n".join([lines[0], "", '{"file_name": "x.png", "text": broken}']) + "\n")
    with pytest.raises(UserError, match=r"metadata\.jsonl:3: not valid JSON"):
        _read_captions(data, os.path.join(data, "images"), "text")
    os.remove(os.path.join(data, "metadata.jsonl"))
    shutil.copy(os.path.join(data, "images", sorted(os.listdir(os.path.join(data, "images")))[0]),
                os.path.join(data, "images", "extra.png"))
    with open(os.path.join(data, "images", "extra.txt"), "wb") as handle:
        handle.write("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"extra\.txt: caption file is not valid UTF-8"):
        _read_captions(data, os.path.join(data, "images"), "text")


def test_grey_masks_are_thresholded_with_one_warning(caplog):
    from utils.mask_dit import data

    data._WARNED_MASKS.clear()
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 16 x 16, values 0..240
    with caplog.at_level("WARNING", logger="utils.mask_dit.data"):
        first = data.mask_to_channels(ramp, 1, "ramp.png")
        data.mask_to_channels(ramp, 1, "ramp2.png")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "ramp.png: 240 of 256 pixels are grey" in warnings[0]
    assert first.sum() == 16 * 8  # >= 128: the upper half of the ramp


def test_the_empty_float32_notice_is_dropped_and_a_real_one_kept(caplog):
    import logging

    from utils.run import quiet_empty_notices

    quiet_empty_notices()
    log = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level("WARNING", logger="diffusers.models.modeling_utils"):
        log.warning("There are modules in AutoencoderKL that should be kept in float32: []. Casting ...")
        log.warning("There are modules in X that should be kept in float32: ['norm']. Casting ...")
    assert [r.getMessage()[-20:] for r in caplog.records] == ["float32: ['norm']. Casting ..."[-20:]]


def test_help_and_choices_a_newcomer_reads():
    import re

    generate_help = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "generate.py"), "--help"],
                                   capture_output=True, text=True, cwd=REPO_ROOT, timeout=120).stdout
    choices = re.search(r"--scheduler \{([^}]*)\}", generate_help).group(1).split(",")
    assert "euler" in choices and len(choices) == len(set(choices)), choices  # euler once
    help_text = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train_segmentation_tpu.py"), "--help"],
                               capture_output=True, text=True, cwd=REPO_ROOT, timeout=120).stdout
    assert help_text.count("(default:") >= 20  # every flag shows its default


@pytest.mark.slow
def test_an_sd_lora_on_an_sdxl_base_says_what_it_was_trained_for(capsys, tiny_pipeline_dir, tiny_sdxl_pipeline_dir,
                                                                  t2i_data, tmp_path):
    import generate
    import train_text_to_image as script

    lora = tmp_path / "lora"
    run_main_in_process(script, t2i_cmd(tiny_pipeline_dir, t2i_data, lora, "--use_lora"))
    with pytest.raises(SystemExit) as exit_info:
        run_script(generate.main, ["--model", tiny_sdxl_pipeline_dir, "--lora", str(lora), "--prompt", "x",
                                   "--output_dir", str(tmp_path / "g"), "--device", "cpu", "--steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and "Traceback" not in err and err.count("error: ") == 1, err
    assert "does not fit --model (SDXL" in err and "trained for stable-diffusion-v1/lora" in err


def launch_two_ranks_that_refuse(tmp_path, rank_0_work: str, setting: str = ""):
    """`accelerate launch` 2 gloo processes of a script that runs `rank_0_work` (lines of Python) on rank 0 and then
    refuses with a UserError on every rank that gets there, through utils.errors.run_script; after `setting` (a
    line run first). Returns (exit code, stdout + stderr)."""
    from conftest import accelerate_launch

    script = tmp_path / "refuse.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {REPO_ROOT!r})\n"
        "from accelerate import Accelerator\n"
        "import utils.errors\n"
        f"{setting}\n"
        "def main():\n"
        "    if Accelerator(cpu=True).process_index == 0:\n"
        + "".join(f"        {line}\n" for line in rank_0_work.splitlines()) +
        "    raise utils.errors.UserError('--train_data_dir /nowhere: no such directory')\n"
        "utils.errors.run_script(main)\n")
    result = accelerate_launch(str(script), [], num_processes=2, extra_launch_args=["-q"], check=False)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_a_refused_multi_process_run_waits_for_rank_0_to_print_its_block(tmp_path):
    """The launcher stops every process once one has exited: rank 1, refused first, waits for rank 0 (here 3 s
    slower, as a loaded CI machine once made it) so that rank 0's block is printed, not cut off."""
    returncode, output = launch_two_ranks_that_refuse(tmp_path, "time.sleep(3)")
    assert returncode != 0
    assert output.count("error: --train_data_dir /nowhere") == 1, output[-4000:]
    assert output.count("error (rank 1): --train_data_dir /nowhere") == 1


@pytest.mark.slow
def test_a_rank_refused_alone_stops_waiting_for_the_others(tmp_path):
    """Rank 1 refused, rank 0 never is (it works on for 60 s): rank 1 gives up waiting after RANK_REPORT_WAIT_S (2 s
    here), exits, and the launcher stops rank 0 long before its work is done."""
    returncode, output = launch_two_ranks_that_refuse(
        tmp_path, "time.sleep(60)\nprint('rank 0 finished its work', flush=True)\nreturn",
        setting="utils.errors.RANK_REPORT_WAIT_S = 2.0")
    assert returncode != 0
    assert output.count("error (rank 1): --train_data_dir /nowhere") == 1, output[-4000:]
    assert "rank 0 finished its work" not in output
