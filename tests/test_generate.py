"""generate.py on the tiny random pipeline: every loading mode, every scheduler, seeds and metadata."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from tests.conftest import REPO_ROOT, launch_env
from utils.sd.schedulers import SCHEDULERS, make_scheduler

FAST = ["--steps", "2", "--num_images", "2", "--batch_size", "2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and far faster when other jobs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, name, *argv):
    """generate.main into tmp_path/name; returns (paths, per-image arrays without the grid)."""
    output_dir = str(tmp_path / name)
    paths = generate.main([*FAST, *map(str, argv), "--output_dir", output_dir])
    assert paths[-1] == os.path.join(output_dir, "grid.png")
    return paths, [np.asarray(Image.open(path)) for path in paths[:-1]]


def perturbed_unet(pipeline_dir, seed, scale=0.05):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return unet


@pytest.fixture(scope="module")
def run_dir(tiny_pipeline_dir, tmp_path_factory):
    """A finished training run: the full pipeline + checkpoint-2 with a different unet/ and unet_ema/."""
    root = tmp_path_factory.mktemp("run") / "sd-model"
    shutil.copytree(tiny_pipeline_dir, root)
    checkpoint = root / "checkpoint-2"
    perturbed_unet(tiny_pipeline_dir, seed=1).save_pretrained(checkpoint / "unet")
    perturbed_unet(tiny_pipeline_dir, seed=2).save_pretrained(checkpoint / "unet_ema")
    (checkpoint / "training_state.json").write_text('{"global_step": 2}')
    return root


@pytest.fixture(scope="module")
def lora_dir(tiny_pipeline_dir, tmp_path_factory):
    """pytorch_lora_weights.safetensors for the tiny UNet, with non-zero B matrices so it changes images."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"], init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # gaussian init leaves B = 0, i.e. a no-op adapter
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        str(path), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)), safe_serialization=True)
    assert (path / "pytorch_lora_weights.safetensors").is_file()
    return path


def test_full_pipeline_folder(tiny_pipeline_dir, tmp_path):
    paths, images = run(tmp_path, "out", "--model", tiny_pipeline_dir, "--prompt", "kanji for water", "--seed", "3")
    assert len(paths) == 3
    assert all(image.shape == (32, 32, 3) for image in images)  # default size = unet sample_size 16 x VAE factor 2
    assert all(image.std() > 0 for image in images)
    grid = Image.open(paths[-1])
    assert grid.size[0] > 32 and grid.size[1] >= 32


def test_same_seed_is_bitwise_identical_and_seeds_advance_per_image(tiny_pipeline_dir, tmp_path):
    common = ["--model", tiny_pipeline_dir, "--prompt", "fire", "--batch_size", "1"]
    _, first = run(tmp_path, "a", *common, "--seed", "7")
    _, again = run(tmp_path, "b", *common, "--seed", "7")
    _, other = run(tmp_path, "c", *common, "--seed", "8")
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], other[0])
    # image 1 of seed 7 is made from seed 8, so it equals image 0 of seed 8
    assert np.array_equal(first[1], other[0])


def test_png_metadata(tiny_pipeline_dir, tmp_path):
    paths, _ = run(tmp_path, "out", "--model", tiny_pipeline_dir, "--prompt", "漢字 mountain", "--negative_prompt", "blurry",
                   "--seed", "11", "--guidance_scale", "7.5", "--scheduler", "euler")
    text = Image.open(paths[1]).text
    assert text["prompt"] == "漢字 mountain"
    assert text["negative_prompt"] == "blurry"
    assert text["seed"] == "12"
    assert text["steps"] == "2"
    assert text["scheduler"] == "euler"
    assert text["guidance_scale"] == "7.5"
    assert text["model"] == tiny_pipeline_dir
    assert '"seed": 12' in text["parameters"]


def test_prompts_file(tiny_pipeline_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("water\n\n# a comment\nfire\n", encoding="utf-8")
    paths, images = run(tmp_path, "out", "--model", tiny_pipeline_dir, "--prompts_file", prompts_file, "--seed", "0", "--batch_size", "3")
    assert len(images) == 4
    assert [Image.open(p).text["prompt"] for p in paths[:-1]] == ["water", "water", "fire", "fire"]
    assert [Image.open(p).text["seed"] for p in paths[:-1]] == ["0", "1", "0", "1"]
    width, height = Image.open(paths[-1]).size
    assert width == height  # 2 prompts (rows) x 2 images (columns)


def test_lora_changes_images_and_scale_zero_is_the_base(tiny_pipeline_dir, lora_dir, tmp_path):
    common = ["--model", tiny_pipeline_dir, "--prompt", "water", "--seed", "1"]
    _, base = run(tmp_path, "base", *common)
    paths, with_lora = run(tmp_path, "lora", *common, "--lora", lora_dir)
    _, scale_zero = run(tmp_path, "zero", *common, "--lora", lora_dir / "pytorch_lora_weights.safetensors", "--lora_scale", "0")
    assert not np.array_equal(base[0], with_lora[0])
    assert all(np.array_equal(x, y) for x, y in zip(base, scale_zero))
    text = Image.open(paths[0]).text
    assert text["lora"] == str(lora_dir) and text["lora_scale"] == "1.0"


def test_checkpoint_unet_and_ema(tiny_pipeline_dir, run_dir, tmp_path):
    common = ["--prompt", "water", "--seed", "1"]
    _, base = run(tmp_path, "base", "--model", run_dir, *common)
    # --model omitted: the checkpoint's parent holds the final pipeline
    paths, unet = run(tmp_path, "unet", "--checkpoint", run_dir / "checkpoint-2", *common)
    _, ema = run(tmp_path, "ema", "--checkpoint", run_dir / "checkpoint-2", "--ema", *common)
    _, on_base = run(tmp_path, "on_base", "--model", tiny_pipeline_dir, "--checkpoint", run_dir / "checkpoint-2", *common)
    assert not np.array_equal(base[0], unet[0])
    assert not np.array_equal(unet[0], ema[0])
    assert all(np.array_equal(x, y) for x, y in zip(unet, on_base))
    assert "unet" in Image.open(paths[0]).text["model"]


def test_checkpoint_with_vae_and_text_encoder(tiny_pipeline_dir, tmp_path):
    from diffusers import AutoencoderKL

    checkpoint = tmp_path / "run" / "checkpoint-4"
    shutil.copytree(os.path.join(tiny_pipeline_dir, "unet"), checkpoint / "unet")  # unchanged UNet
    shutil.copytree(os.path.join(tiny_pipeline_dir, "text_encoder"), checkpoint / "text_encoder")
    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.3)
    vae.save_pretrained(checkpoint / "vae")
    common = ["--model", tiny_pipeline_dir, "--prompt", "water", "--seed", "1"]
    _, base = run(tmp_path, "base", *common)
    paths, trained = run(tmp_path, "ckpt", *common, "--checkpoint", checkpoint)
    assert not np.array_equal(base[0], trained[0])
    assert "vae" in Image.open(paths[0]).text["model"] and "text_encoder" in Image.open(paths[0]).text["model"]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs(tiny_pipeline_dir, tmp_path, name):
    _, images = run(tmp_path, name, "--model", tiny_pipeline_dir, "--prompt", "water", "--seed", "0", "--scheduler", name,
                    "--num_images", "1")
    assert images[0].shape == (32, 32, 3) and images[0].std() > 0


def test_make_scheduler_keeps_the_noise_schedule(tiny_pipeline_dir):
    from diffusers import DDPMScheduler

    base = DDPMScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler")
    karras = make_scheduler("dpm++_karras", base.config)
    assert karras.config.use_karras_sigmas and karras.config.algorithm_type == "dpmsolver++"
    assert karras.config.beta_schedule == base.config.beta_schedule == "scaled_linear"
    assert make_scheduler("dpm++", karras).config.use_karras_sigmas is False
    with pytest.raises(ValueError, match="choose one of dpm\\+\\+, dpm\\+\\+_karras, euler"):
        make_scheduler("heun", base.config)


def test_errors(tiny_pipeline_dir, run_dir, tmp_path):
    with pytest.raises(ValueError, match="--dtype bf16 or --dtype fp32"):
        generate.main(["--model", tiny_pipeline_dir, "--prompt", "x", "--dtype", "fp16", "--device", "cpu"])
    lone_checkpoint = tmp_path / "unfinished" / "checkpoint-2"
    shutil.copytree(run_dir / "checkpoint-2", lone_checkpoint)
    with pytest.raises(ValueError, match="pass the base model"):
        generate.main(["--checkpoint", str(lone_checkpoint), "--prompt", "x"])
    with pytest.raises(ValueError, match="--checkpoint .*checkpoint-2"):
        generate.main(["--model", str(tmp_path / "unfinished"), "--prompt", "x"])
    shutil.rmtree(lone_checkpoint / "unet_ema")
    with pytest.raises(FileNotFoundError, match="without --use_ema"):
        generate.main(["--model", tiny_pipeline_dir, "--checkpoint", str(lone_checkpoint), "--ema", "--prompt", "x"])
    with pytest.raises(ValueError, match="exactly one of --prompt or --prompts_file"):
        generate.main(["--model", tiny_pipeline_dir])


def test_help_documents_presets_and_guidance(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "fast = 25, quality = 75" in help_text and "7-12" in help_text


def test_command_line(tiny_pipeline_dir, tmp_path):
    result = subprocess.run([sys.executable, "generate.py", "--model", tiny_pipeline_dir, "--prompt", "water", "--steps", "2",
                             "--num_images", "1", "--preset", "quality", "--output_dir", str(tmp_path)],
                            cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path))[-1] == "grid.png" and len(os.listdir(tmp_path)) == 2
    assert "2 dpm++ steps" in result.stdout  # --steps wins over --preset


@pytest.fixture(scope="module")
def mask_dit_dir(tmp_path_factory):
    """A random pixel-space mask DiT (2 mask channels, 16 px) saved the way train_mask_dit.py saves it, and 2 masks."""
    from utils.mask_dit.nextdit import build_mask_nextdit
    from utils.mask_dit.pipeline import MaskDiTPipeline, save_mask_dit_pipeline

    root = tmp_path_factory.mktemp("mask-dit")
    torch.manual_seed(0)
    transformer = build_mask_nextdit("tiny", in_channels=3, mask_channels=2, sample_size=16)
    with torch.no_grad():  # the final layer starts at zero (velocity 0: the mask would not matter)
        for parameter in transformer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    save_mask_dit_pipeline(str(root / "model"), MaskDiTPipeline(transformer, settings={"resolution": 16}))
    (root / "masks").mkdir()
    mask = np.zeros((20, 20), np.uint8)
    mask[3:9, 3:15], mask[12:18, 5:10] = 1, 2
    Image.fromarray(mask).save(root / "masks" / "a.png")
    Image.fromarray(np.where(mask > 0, 2, 0).astype(np.uint8)).save(root / "masks" / "b.png")
    return root


def test_mask_dit_mode(mask_dit_dir, tmp_path):
    argv = ["--model", mask_dit_dir / "model", "--mask", mask_dit_dir / "masks", "--seed", "4"]
    paths, images = run(tmp_path, "a", *argv)
    _, again = run(tmp_path, "b", *argv)
    _, single = run(tmp_path, "c", "--model", mask_dit_dir / "model", "--mask", mask_dit_dir / "masks" / "b.png", "--seed", "5")
    assert len(images) == 4 and all(image.shape == (16, 16, 3) for image in images)
    assert all(np.array_equal(x, y) for x, y in zip(images, again))
    assert np.array_equal(images[3], single[0])  # mask b, image 1 = seed 5
    assert not np.array_equal(images[0], images[2])  # same seed, different mask
    text = Image.open(paths[1]).text
    assert text["mask"].endswith("a.png") and text["seed"] == "5" and text["scheduler"] == "euler" and text["guidance_scale"] == "4.0"
    assert Image.open(paths[-1]).size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # rows [mask, image, image]
    with pytest.raises(ValueError, match="pass --mask"):
        generate.main(["--model", str(mask_dit_dir / "model"), "--prompt", "x"])
    with pytest.raises(ValueError, match="mask DiT samples with euler or midpoint"):
        generate.main(["--model", str(mask_dit_dir / "model"), "--mask", str(mask_dit_dir / "masks"), "--scheduler", "ddim"])
