"""SDXL through train_text_to_image.py on the tiny offline SDXL pipeline: diffusers' SDXL flags, full and LoRA
(both text encoders) training, EMA, exact resume with checkpoint rotation, the caches, the time ids each sample
really gets, generate.py, and a 2-process run."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_text_to_image
from tests.conftest import accelerate_launch, parse_and_list_flags, run_main_in_process, write_captioned_folder

# Every flag of diffusers' examples/text_to_image/train_text_to_image_sdxl.py and train_text_to_image_lora_sdxl.py
# (diffusers main, 2026-08-23), by name.
DIFFUSERS_SDXL_FLAGS = """
--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --allow_tf32 --cache_dir --caption_column --center_crop
--checkpointing_steps --checkpoints_total_limit --dataloader_num_workers --dataset_config_name --dataset_name
--debug_loss --enable_npu_flash_attention --enable_xformers_memory_efficient_attention --gradient_accumulation_steps
--gradient_checkpointing --hub_model_id --hub_token --image_column --image_interpolation_mode --learning_rate
--local_rank --logging_dir --lr_scheduler --lr_warmup_steps --max_grad_norm --max_train_samples --max_train_steps
--mixed_precision --noise_offset --num_train_epochs --num_validation_images --output_dir --prediction_type
--pretrained_model_name_or_path --pretrained_vae_model_name_or_path --proportion_empty_prompts --push_to_hub
--random_flip --rank --report_to --resolution --resume_from_checkpoint --revision --scale_lr --seed --snr_gamma
--timestep_bias_begin --timestep_bias_end --timestep_bias_multiplier --timestep_bias_portion --timestep_bias_strategy
--train_batch_size --train_data_dir --train_text_encoder --use_8bit_adam --use_ema --validation_epochs
--validation_prompt --variant
""".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 images of mixed sizes (not square: crops and original sizes matter for the time ids)."""
    root = tmp_path_factory.mktemp("sdxl-data")
    write_captioned_folder(root, count=3, size=(40, 48), seed=0)
    write_captioned_folder(root, count=3, size=(56, 36), seed=1, prefix="tall")
    return str(root)


def args_for(pipeline, data, out, steps=2, *extra):
    return ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3",
            "--lr_warmup_steps", "0", "--report_to", "none", "--seed", "0", "--output_dir", str(out), *extra]


def test_every_diffusers_sdxl_flag_and_default(tiny_sdxl_pipeline_dir):
    args, seen = parse_and_list_flags(train_text_to_image.parse_args, ["--pretrained_model_name_or_path",
                                                                      tiny_sdxl_pipeline_dir, "--dataset_name", "d"])
    assert not [flag for flag in DIFFUSERS_SDXL_FLAGS if flag not in seen]
    assert args.sdxl and (args.resolution, args.output_dir, args.validation_epochs, args.num_validation_images) == (
        1024, "sdxl-model-finetuned", 1, 4)
    assert (args.tracker_project_name, args.adam_weight_decay, args.lr_warmup_steps) == (
        "text2image-fine-tune-sdxl", 1e-2, 500)
    lora = train_text_to_image.parse_args(["--pretrained_model_name_or_path", tiny_sdxl_pipeline_dir,
                                           "--dataset_name", "d", "--use_lora", "--proportion_empty_prompts", "0.2"])
    assert (lora.output_dir, lora.caption_dropout_prob, lora.tracker_project_name) == (
        "sd-model-finetuned-lora", 0.2, "text2image-fine-tune")


def test_sdxl_refusals(tiny_sdxl_pipeline_dir, data):
    from utils.errors import UserError

    with pytest.raises(UserError, match="--train_text_encoder without --use_lora"):
        train_text_to_image.parse_args(args_for(tiny_sdxl_pipeline_dir, data, "o", 2, "--train_text_encoder"))
    with pytest.raises(UserError, match="--timestep_bias_multiplier"):
        train_text_to_image.parse_args(args_for(tiny_sdxl_pipeline_dir, data, "o", 2, "--timestep_bias_strategy",
                                                "later", "--timestep_bias_multiplier", "0"))


def test_timestep_bias_weights_match_diffusers_definition():
    import types

    from utils.sd.losses import sample_timesteps, timestep_weights

    args = types.SimpleNamespace(timestep_bias_strategy="later", timestep_bias_portion=0.25,
                                 timestep_bias_multiplier=3.0, timestep_bias_begin=0, timestep_bias_end=1000)
    weights = timestep_weights(args, 1000)
    expected = np.ones(1000)
    expected[750:] *= 3.0
    np.testing.assert_allclose(weights.numpy(), expected / expected.sum(), rtol=1e-6)
    args.timestep_bias_strategy, args.timestep_bias_begin, args.timestep_bias_end = "range", 200, 500
    expected = np.ones(1000)
    expected[200:500] *= 3.0
    np.testing.assert_allclose(timestep_weights(args, 1000).numpy(), expected / expected.sum(), rtol=1e-6)
    torch.manual_seed(0)
    drawn = sample_timesteps(args, 1000, 20000, "cpu")
    share = ((drawn >= 200) & (drawn < 500)).float().mean().item()
    assert share == pytest.approx(900 / 1600, abs=0.02)  # 300 x 3 of 700 + 300 x 3


@pytest.mark.slow
def test_time_ids_carry_each_samples_real_size_and_crop(tiny_sdxl_pipeline_dir, data, tmp_path, monkeypatch):
    """Every UNet call gets (original h, w, crop top, left, 32, 32) of the very sample, crop in the flipped image
    when it was flipped, as the pixels show."""
    from PIL import Image

    from utils.images import pil_to_tensor
    from utils.sd.data import TextImageDataset

    seen = []
    original_load = TextImageDataset.load

    def recording_load(self, index, epoch):
        item = original_load(self, index, epoch)
        name = item["name"]
        image = Image.open(os.path.join(data, name)).convert("RGB")
        assert item["original_size"].tolist() == [image.height, image.width]
        resized = self.transform.resize(image)
        if self.transform.random_flip:  # the crop is given in the image as the model sees it
            candidates = [resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT), resized]
        else:
            candidates = [resized]
        top, left = item["crop_top_left"].tolist()
        crops = [pil_to_tensor(c.crop((left, top, left + 32, top + 32))) for c in candidates]
        assert any(torch.equal(c, item["pixel_values"]) for c in crops)  # the reported crop is the one trained on
        seen.append((name, item["original_size"].tolist() + item["crop_top_left"].tolist()))
        return item

    monkeypatch.setattr(TextImageDataset, "load", recording_load)
    from diffusers import UNet2DConditionModel

    calls = []
    original_forward = UNet2DConditionModel.forward

    def recording_forward(self, *args, added_cond_kwargs=None, **kwargs):
        calls.append(added_cond_kwargs["time_ids"].detach().cpu().long().tolist())
        return original_forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    run_main_in_process(train_text_to_image, args_for(tiny_sdxl_pipeline_dir, data, tmp_path / "o", 3,
                                                      "--random_flip"))
    assert len(calls) == 3 and all(len(batch) == 2 for batch in calls)
    expected = [ids + [32, 32] for _, ids in seen]
    assert [ids for batch in calls for ids in batch] == expected
    assert {tuple(ids[:2]) for ids in expected} <= {(40, 48), (56, 36)}


@pytest.mark.slow
def test_full_ema_resume_rotation_and_generate(tiny_sdxl_pipeline_dir, data, tmp_path):
    import generate
    from diffusers import StableDiffusionXLPipeline

    flags = ("--use_ema", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--snr_gamma", "5",
             "--noise_offset", "0.05", "--validation_prompt", "a thing", "--num_validation_images", "1",
             "--validation_epochs", "100")
    straight = tmp_path / "straight"
    run_main_in_process(train_text_to_image, args_for(tiny_sdxl_pipeline_dir, data, straight, 4, *flags,
                                                      "--save_single_file", "--single_file_dtype", "fp32"))
    assert {"checkpoint-3", "checkpoint-4"} <= set(os.listdir(straight))
    assert not (straight / "checkpoint-2").exists()  # --checkpoints_total_limit 2
    pipe = StableDiffusionXLPipeline.from_pretrained(straight)
    assert pipe.text_encoder_2 is not None
    assert "stable-diffusion-xl" in (straight / "README.md").read_text()  # the model card's tags

    resumed = tmp_path / "resumed"
    run_main_in_process(train_text_to_image, args_for(tiny_sdxl_pipeline_dir, data, resumed, 2, *flags))
    run_main_in_process(train_text_to_image, args_for(tiny_sdxl_pipeline_dir, data, resumed, 4, *flags,
                                                      "--resume_from_checkpoint", "latest"))
    for relative in ("unet/diffusion_pytorch_model.safetensors", "checkpoint-4/unet_ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(straight / relative), load_file(resumed / relative)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), relative

    # The same weights as one SGM-layout file (--save_single_file): from_single_file gives them back exactly.
    from utils.sd.single_file import SINGLE_FILE_NAME, load_single_file_pipeline

    from_file = load_single_file_pipeline(str(straight / SINGLE_FILE_NAME), str(straight), None)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(from_file, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("position_ids")), name

    paths = generate.main(["--model", str(straight), "--prompt", "a thing", "--num_images", "1", "--steps", "2",
                           "--device", "cpu", "--output_dir", str(tmp_path / "g")])
    assert len(paths) == 2 and all(os.path.isfile(p) for p in paths)
    paths = generate.main(["--model", str(straight), "--checkpoint", str(straight / "checkpoint-4"), "--ema",
                           "--prompt", "a thing", "--num_images", "1", "--steps", "2", "--device", "cpu",
                           "--output_dir", str(tmp_path / "g2")])
    assert os.path.isfile(paths[0])


@pytest.mark.slow
def test_lora_with_both_text_encoders_loads_in_diffusers_and_as_kohya(tiny_sdxl_pipeline_dir, data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from utils.sd.lora import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    out = tmp_path / "lora"
    run_main_in_process(train_text_to_image, args_for(
        tiny_sdxl_pipeline_dir, data, out, 3, "--use_lora", "--rank", "4", "--lora_alpha", "8", "--train_text_encoder",
        "--learning_rate", "5e-2", "--lora_format", "both"))
    kohya = load_file(out / KOHYA_WEIGHT_NAME)
    assert any(k.startswith("lora_te1_text_model_") for k in kohya) and any(k.startswith("lora_te2_text_model_")
                                                                              for k in kohya)
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}

    def images(lora_file=None):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
        if lora_file is not None:
            pipe.load_lora_weights(str(out), weight_name=lora_file)
        pipe.set_progress_bar_config(disable=True)
        return pipe("a thing", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base, from_diffusers, from_kohya = images(), images(LORA_WEIGHT_NAME), images(KOHYA_WEIGHT_NAME)
    assert np.abs(from_diffusers - base).max() > 1e-4
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=1e-5)

    # Resuming a LoRA checkpoint of all three adapters continues it bit for bit.
    resumed = tmp_path / "resumed"
    flags = ("--use_lora", "--rank", "4", "--lora_alpha", "8", "--train_text_encoder", "--learning_rate", "5e-2",
             "--checkpointing_steps", "2")
    run_main_in_process(train_text_to_image, args_for(tiny_sdxl_pipeline_dir, data, resumed, 2, *flags))
    run_main_in_process(train_text_to_image, args_for(tiny_sdxl_pipeline_dir, data, resumed, 3, *flags,
                                                      "--resume_from_checkpoint", "latest"))
    a, b = load_file(out / LORA_WEIGHT_NAME), load_file(resumed / LORA_WEIGHT_NAME)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def metric(output_dir, key):
    from utils.report import read_metrics

    values = read_metrics(output_dir).get(key, {})
    return [values[step] for step in sorted(values)]


@pytest.mark.slow
def test_cached_losses_equal_uncached(tiny_sdxl_pipeline_dir, data, tmp_path):
    common = ("--center_crop", "--random_flip", "--logging_steps", "1", "--validation_split", "0.34",
              "--validation_steps", "1")
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run_main_in_process(train_text_to_image, args_for(tiny_sdxl_pipeline_dir, data, plain, 3, *common))
    run_main_in_process(train_text_to_image, args_for(tiny_sdxl_pipeline_dir, data, cached, 3, *common,
                                                      "--precompute"))
    assert len(metric(plain, "train/loss")) == 3
    np.testing.assert_allclose(metric(cached, "train/loss"), metric(plain, "train/loss"), rtol=1e-5)
    np.testing.assert_allclose(metric(cached, "val/loss"), metric(plain, "val/loss"), rtol=1e-5)


@pytest.mark.slow
def test_two_processes(tiny_sdxl_pipeline_dir, data, tmp_path):
    out = tmp_path / "two"
    accelerate_launch("train_text_to_image.py", args_for(tiny_sdxl_pipeline_dir, data, out, 2, "--use_ema",
                                                         "--checkpointing_steps", "2"), num_processes=2)
    assert (out / "checkpoint-2" / "unet_ema").is_dir() and (out / "unet").is_dir()
    shutil.rmtree(out)


# diffusers' examples/text_to_image/README_sdxl.md commands, verbatim (main, 2026-08-23).
README_FULL = """--pretrained_model_name_or_path=$MODEL_NAME --pretrained_vae_model_name_or_path=$VAE_NAME
  --dataset_name=$DATASET_NAME --enable_xformers_memory_efficient_attention --resolution=512 --center_crop
  --random_flip --proportion_empty_prompts=0.2 --train_batch_size=1 --gradient_accumulation_steps=4
  --gradient_checkpointing --max_train_steps=10000 --use_8bit_adam --learning_rate=1e-06 --lr_scheduler="constant"
  --lr_warmup_steps=0 --mixed_precision="fp16" --report_to="wandb"
  --validation_prompt="a cute Sundar Pichai creature" --validation_epochs 5 --checkpointing_steps=5000
  --output_dir="sdxl-naruto-model" --push_to_hub"""
README_LORA = """--pretrained_model_name_or_path=$MODEL_NAME --pretrained_vae_model_name_or_path=$VAE_NAME
  --dataset_name=$DATASET_NAME --caption_column="text" --resolution=1024 --random_flip --train_batch_size=1
  --num_train_epochs=2 --checkpointing_steps=500 --learning_rate=1e-04 --lr_scheduler="constant"
  --lr_warmup_steps=0 --mixed_precision="fp16" --seed=42 --output_dir="sd-naruto-model-lora-sdxl"
  --validation_prompt="cute dragon creature" --report_to="wandb" --push_to_hub"""
# What a 2-core CPU without network changes (flags as shlex splits them): no CUDA (xformers, fp16), no wandb or Hub, and test sizes.
CPU_OFFLINE = {"--enable_xformers_memory_efficient_attention": None, "--push_to_hub": None,
               "--mixed_precision=fp16": "--mixed_precision=no", "--report_to=wandb": "--report_to=none",
               "--resolution=512": "--resolution=32", "--resolution=1024": "--resolution=32",
               "--max_train_steps=10000": "--max_train_steps=2", "--num_train_epochs=2": "--max_train_steps=2"}


@pytest.mark.slow
@pytest.mark.parametrize("command", [README_FULL, README_LORA], ids=["full", "lora"])
def test_diffusers_readme_sdxl_command_runs(command, tiny_sdxl_pipeline_dir, tmp_path):
    import shlex

    from PIL import Image

    from utils.sd.data import write_metadata_jsonl

    lora = command is README_LORA  # (our script: the same flags plus --use_lora)
    dataset = tmp_path / "dataset"  # an imagefolder dataset, what --dataset_name loads from a folder
    dataset.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 40), (40 * i, 90, 160)).save(dataset / f"{i}.png")
    write_metadata_jsonl(str(dataset), [{"file_name": f"{i}.png", "text": f"a creature {i}"} for i in range(3)])
    command = (command.replace("$MODEL_NAME", tiny_sdxl_pipeline_dir)
               .replace("$VAE_NAME", os.path.join(tiny_sdxl_pipeline_dir, "vae")).replace("$DATASET_NAME", str(dataset)))
    argv = []
    for flag in shlex.split(command):
        argv += [] if CPU_OFFLINE.get(flag, flag) is None else [CPU_OFFLINE.get(flag, flag)]
    argv = [a.replace("--output_dir=", f"--output_dir={tmp_path}/") for a in argv]
    accelerate_launch("train_text_to_image.py", ["--use_lora"] * lora + argv)
    out = tmp_path / ("sd-naruto-model-lora-sdxl" if lora else "sdxl-naruto-model")
    assert (out / ("pytorch_lora_weights.safetensors" if lora else "model_index.json")).is_file()


@pytest.mark.slow
def test_auto_batch_size_probes_the_sdxl_step(tiny_sdxl_pipeline_dir, data, tmp_path):
    out = tmp_path / "auto"
    argv = args_for(tiny_sdxl_pipeline_dir, data, out, 1)
    argv[argv.index("--train_batch_size") + 1] = "auto"
    run_main_in_process(train_text_to_image, argv)
    chosen = json.load(open(out / "training_args.json"))["plan"]["batch_size"]  # the flag stays "auto"
    assert isinstance(chosen, int) and chosen >= 1 and (out / "unet").is_dir()
