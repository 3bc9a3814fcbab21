"""DreamBooth in train_text_to_image.py (utils/sd/dreambooth.py): diffusers' DreamBooth CLI and its own example
tests (examples/dreambooth/test_dreambooth.py, test_dreambooth_lora.py) with the tiny offline pipeline, prior
preservation (class images, paired batches, the two losses), exact resume, bad inputs."""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import accelerate_launch, parse_and_list_flags, run_main_in_process
from PIL import Image
from test_user_errors import expect_user_error

SCRIPT = "train_text_to_image.py"

# Every flag of diffusers' examples/dreambooth/train_dreambooth.py, train_dreambooth_lora.py and
# train_dreambooth_lora_sdxl.py (diffusers main, 2026-12, commit 58eb52c0), by name.
DREAMBOOTH_FLAGS = """
--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --adam_weight_decay_text_encoder --allow_tf32 --cache_dir
--caption_column --center_crop --checkpointing_steps --checkpoints_total_limit --class_data_dir
--class_labels_conditioning --class_prompt --dataloader_num_workers --dataset_config_name --dataset_name
--do_edm_style_training --enable_xformers_memory_efficient_attention --gradient_accumulation_steps
--gradient_checkpointing --hub_model_id --hub_token --image_column --image_interpolation_mode --instance_data_dir
--instance_prompt --learning_rate --local_rank --logging_dir --lora_dropout --lr_num_cycles --lr_power --lr_scheduler
--lr_warmup_steps --max_grad_norm --max_train_steps --mixed_precision --num_class_images --num_train_epochs
--num_validation_images --offset_noise --optimizer --output_dir --output_kohya_format --pre_compute_text_embeddings
--pretrained_model_name_or_path --pretrained_vae_model_name_or_path --prior_generation_precision --prior_loss_weight
--prodigy_beta3 --prodigy_decouple --prodigy_safeguard_warmup --prodigy_use_bias_correction --push_to_hub
--random_flip --rank --repeats --report_to --resolution --resume_from_checkpoint --revision --sample_batch_size
--scale_lr --seed --set_grads_to_none --skip_save_text_encoder --snr_gamma --text_encoder_lr
--text_encoder_use_attention_mask --tokenizer_max_length --tokenizer_name --train_batch_size --train_text_encoder
--use_8bit_adam --use_dora --validation_epochs --validation_images --validation_prompt --validation_scheduler
--validation_steps --variant --with_prior_preservation
""".split()


def dreambooth_args(pipeline, instance, out, steps=2, extra=()):
    return ["--pretrained_model_name_or_path", pipeline, "--instance_data_dir", instance, "--instance_prompt",
            "a photo of sks thing", "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--lr_warmup_steps", "0", "--output_dir", str(out), "--report_to", "none", *map(str, extra)]


def prior_args(class_dir, num=4, extra=()):
    return ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a photo of a thing",
            "--num_class_images", str(num), "--sample_batch_size", "3", *map(str, extra)]


def test_every_diffusers_dreambooth_flag_is_accepted():
    import train_text_to_image as script

    _, flags = parse_and_list_flags(script.parse_args, ["--instance_data_dir", "x", "--instance_prompt", "p",
                                                        "--model_preset", "tiny"])
    missing = [flag for flag in DREAMBOOTH_FLAGS if flag not in flags]
    assert not missing, f"flags of diffusers' DreamBooth scripts we do not accept: {missing}"


def test_dreambooth_runs_take_the_defaults_of_the_diffusers_script_they_correspond_to(tiny_sdxl_pipeline_dir):
    import train_text_to_image as script

    base = ["--pretrained_model_name_or_path", "p", "--instance_data_dir", "x", "--instance_prompt", "photo"]
    full = script.parse_args(base)  # train_dreambooth.py
    assert (full.output_dir, full.learning_rate, full.train_batch_size, full.num_train_epochs) == \
        ("dreambooth-model", 5e-6, 4, 1)
    assert (full.validation_steps, full.num_validation_images, full.tracker_project_name, full.resolution) == \
        (100, 4, "dreambooth", 512)
    assert (full.prior_loss_weight, full.num_class_images, full.sample_batch_size, full.repeats) == (1.0, 100, 4, 1)
    assert (full.optimizer, full.lr_scheduler, full.lr_warmup_steps, full.adam_weight_decay) == \
        ("adamw", "constant", 500, 1e-2)
    lora = script.parse_args(base + ["--use_lora"])  # train_dreambooth_lora.py
    assert (lora.output_dir, lora.learning_rate, lora.validation_epochs, lora.rank) == \
        ("lora-dreambooth-model", 5e-4, 50, 4)
    sdxl = script.parse_args(["--pretrained_model_name_or_path", tiny_sdxl_pipeline_dir] + base[2:] + ["--use_lora"])
    assert (sdxl.learning_rate, sdxl.resolution, sdxl.adam_weight_decay, sdxl.text_encoder_learning_rate) == \
        (1e-4, 1024, 1e-4, 5e-6)
    assert sdxl.adam_weight_decay_text_encoder == 1e-3
    # The command line and a --config file still win; a plain run keeps text-to-image's defaults.
    assert script.parse_args(base + ["--learning_rate", "2e-6"]).learning_rate == 2e-6
    plain = script.parse_args(["--pretrained_model_name_or_path", "p", "--dataset_name", "d"])
    assert (plain.output_dir, plain.learning_rate, plain.train_batch_size) == ("sd-model-finetuned", 1e-4, 16)
    # diffusers' spellings: AdamW, --offset_noise, --pre_compute_text_embeddings, --text_encoder_lr.
    spelled = script.parse_args(base + ["--optimizer", "AdamW", "--offset_noise", "--pre_compute_text_embeddings",
                                        "--text_encoder_lr", "1e-5"])
    assert (spelled.optimizer, spelled.noise_offset, spelled.cache_text_embeddings) == ("adamw", 0.1, True)
    assert spelled.text_encoder_learning_rate == 1e-5


def test_yaml_config_wins_over_dreambooth_defaults(tmp_path):
    import train_text_to_image as script

    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 3.0e-6\ntrain_batch_size: 2\n")
    args = script.parse_args(["--pretrained_model_name_or_path", "p", "--instance_data_dir", "x", "--instance_prompt",
                              "photo", "--config", str(config)])
    assert (args.learning_rate, args.train_batch_size, args.output_dir) == (3e-6, 2, "dreambooth-model")


# diffusers' examples/dreambooth/test_dreambooth.py, their Hub pipeline replaced by the tiny local one and
# docs/source/en/imgs by a folder of 5 images (test_dreambooth_if: DeepFloyd IF is not a model we train).
def test_diffusers_dreambooth(tiny_pipeline_dir, instance_dir, tmp_path):
    accelerate_launch(SCRIPT, ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--instance_data_dir",
                               instance_dir, "--instance_prompt", "photo", "--resolution", "64", "--train_batch_size",
                               "1", "--gradient_accumulation_steps", "1", "--max_train_steps", "2", "--learning_rate",
                               "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                               "--output_dir", tmp_path])
    assert os.path.isfile(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(tmp_path / "scheduler" / "scheduler_config.json")


def test_diffusers_dreambooth_checkpointing(tiny_pipeline_dir, instance_dir, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    common = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--instance_data_dir", instance_dir,
              "--instance_prompt", "photo", "--resolution", "64", "--train_batch_size", "1",
              "--gradient_accumulation_steps", "1", "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler",
              "constant", "--lr_warmup_steps", "0", "--output_dir", tmp_path, "--checkpointing_steps=2", "--seed=0"]
    accelerate_launch(SCRIPT, common + ["--max_train_steps", "4"])
    pipe = DiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    pipe("photo", num_inference_steps=1)
    assert os.path.isdir(tmp_path / "checkpoint-2") and os.path.isdir(tmp_path / "checkpoint-4")
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="checkpoint-2/unet")
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir, unet=unet, safety_checker=None)
    pipe("photo", num_inference_steps=1)
    shutil.rmtree(tmp_path / "checkpoint-2")
    accelerate_launch(SCRIPT, common + ["--max_train_steps", "6", "--resume_from_checkpoint=checkpoint-4"])
    DiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)("photo", num_inference_steps=1)
    assert not os.path.isdir(tmp_path / "checkpoint-2")
    assert os.path.isdir(tmp_path / "checkpoint-4") and os.path.isdir(tmp_path / "checkpoint-6")


@pytest.mark.parametrize("lora", [False, True])
def test_diffusers_dreambooth_checkpoints_total_limit_removes_multiple(tiny_pipeline_dir, instance_dir, tmp_path,
                                                                       lora):
    """test_dreambooth(_lora)_checkpointing_checkpoints_total_limit(_removes_multiple_checkpoints)."""
    common = [f"--pretrained_model_name_or_path={tiny_pipeline_dir}", f"--instance_data_dir={instance_dir}",
              f"--output_dir={tmp_path}", "--instance_prompt=prompt", "--resolution=64", "--train_batch_size=1",
              "--gradient_accumulation_steps=1", "--checkpointing_steps=2"] + (["--use_lora"] if lora else [])
    accelerate_launch(SCRIPT, common + ["--max_train_steps=4"])
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-2", "checkpoint-4"}
    accelerate_launch(SCRIPT, common + ["--max_train_steps=8", "--resume_from_checkpoint=checkpoint-4",
                                        "--checkpoints_total_limit=2"])
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-6", "checkpoint-8"}


# diffusers' examples/dreambooth/test_dreambooth_lora.py (train_dreambooth_lora.py is ours with --use_lora).
@pytest.mark.parametrize("text_encoder", [False, True])
def test_diffusers_dreambooth_lora(tiny_pipeline_dir, instance_dir, tmp_path, text_encoder):
    import safetensors.torch

    accelerate_launch(SCRIPT, ["--use_lora", "--pretrained_model_name_or_path", tiny_pipeline_dir,
                               "--instance_data_dir", instance_dir, "--instance_prompt", "photo", "--resolution", "64",
                               "--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_train_steps",
                               "2", "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler", "constant",
                               "--lr_warmup_steps", "0", "--output_dir", tmp_path]
                      + (["--train_text_encoder"] if text_encoder else []))
    state = safetensors.torch.load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert all("lora" in k for k in state)
    if text_encoder:
        assert any(k.startswith("text_encoder") for k in state)
        assert all(k.startswith("unet") or k.startswith("text_encoder") for k in state)
    else:
        assert all(k.startswith("unet") for k in state)


def test_paired_batches_put_instance_then_class_halves_and_cover_the_longer_side():
    from utils.data import PairedBatchSampler

    prior = [False] * 3 + [True] * 7
    sampler = PairedBatchSampler(prior, batch_size=2, seed=5)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == 4  # ceil(max(3, 7) / 2)
    for batch in batches:
        half = len(batch) // 2
        assert len(batch) % 2 == 0 and not any(prior[i] for i in batch[:half]) and all(prior[i] for i in batch[half:])
    classes = [i for batch in batches for i in batch[len(batch) // 2:]]
    assert sorted(classes) == list(range(3, 10))  # every class image once an epoch
    instances = [i for batch in batches for i in batch[:len(batch) // 2]]
    assert set(instances) == {0, 1, 2} and len(instances) == 7  # the instance images cycled
    assert sampler.batches(0) == batches and sampler.batches(1) != batches


def test_prior_preservation_loss_is_instance_loss_plus_weighted_class_loss():
    import torch.nn.functional as F

    from utils.sd.losses import prior_preservation_loss
    from utils.telemetry import HealthMonitor

    generator = torch.Generator().manual_seed(0)
    prediction, target = (torch.randn(4, 4, 8, 8, generator=generator) for _ in range(2))
    monitor = HealthMonitor()
    loss = prior_preservation_loss(lambda p, t, _, __: F.mse_loss(p, t), prediction, target, torch.arange(4), 0.5,
                                   monitor)
    instance = ((prediction[:2] - target[:2]) ** 2).mean()
    prior = ((prediction[2:] - target[2:]) ** 2).mean()
    assert torch.allclose(loss, instance + 0.5 * prior)
    logged = monitor.collect()
    assert logged["instance_loss"] == pytest.approx(instance.item()) and logged["prior_loss"] == pytest.approx(prior.item())


def test_class_images_are_generated_once_and_a_stopped_generation_continues_with_the_same_images(
        tiny_pipeline_dir, instance_dir, tmp_path, monkeypatch):
    import train_text_to_image as script
    from utils.sd import dreambooth

    class_dir = tmp_path / "class"

    def run(name):
        run_main_in_process(script, dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / name, steps=1,
                                                    extra=["--seed", "7"]) + prior_args(class_dir, num=5))
    run("a")
    names = sorted(os.listdir(class_dir))
    assert len(names) == 5 and names[0].startswith("00000-")
    pixels = {n: np.asarray(Image.open(class_dir / n)) for n in names}
    # A generation stopped after images 0, 2 and 4: the rerun draws exactly 1 and 3, the same as before.
    for name in (names[1], names[3]):
        os.remove(class_dir / name)
    drawn = []
    original = dreambooth.load_generation_pipeline
    monkeypatch.setattr(dreambooth, "load_generation_pipeline", lambda *a: drawn.append(1) or original(*a))
    run("b")
    assert sorted(os.listdir(class_dir)) == names and len(drawn) == 1
    for name in names:
        assert np.array_equal(np.asarray(Image.open(class_dir / name)), pixels[name])
    # Enough images: nothing is generated (the pipeline is not even loaded).
    run("c")
    assert len(drawn) == 1


def test_prior_preservation_logs_both_losses_and_they_add_up_to_the_loss(tiny_pipeline_dir, instance_dir, tmp_path):
    """Each step's logged train/loss is train/instance_loss + --prior_loss_weight x train/prior_loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train_text_to_image as script

    out = tmp_path / "run"
    run_main_in_process(script, dreambooth_args(tiny_pipeline_dir, instance_dir, out, steps=3, extra=[
        "--seed", "0", "--logging_steps", "1", "--report_to", "tensorboard", "--train_batch_size", "2"])
        + prior_args(tmp_path / "class", num=4, extra=["--prior_loss_weight", "0.25"]))
    scalars = {}
    for directory, _, files in os.walk(out / "logs"):
        if any(f.startswith("events.") for f in files):
            accumulator = EventAccumulator(directory)
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                scalars[tag] = {e.step: e.value for e in accumulator.Scalars(tag)}
    assert set(scalars["train/loss"]) == {1, 2, 3}
    for step, loss in scalars["train/loss"].items():
        expected = scalars["train/instance_loss"][step] + 0.25 * scalars["train/prior_loss"][step]
        assert loss == pytest.approx(expected, rel=1e-5)
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["with_prior_preservation"] and saved["prior_loss_weight"] == 0.25


def test_resume_with_prior_preservation_is_bitwise(tiny_pipeline_dir, instance_dir, tmp_path):
    import train_text_to_image as script
    from safetensors.torch import load_file

    class_dir = tmp_path / "class"
    common = prior_args(class_dir, num=3) + ["--seed", "0", "--train_batch_size", "2", "--checkpointing_steps", "2",
                                             "--learning_rate", "1e-3"]
    run_main_in_process(script, dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "straight", 5) + common)
    run_main_in_process(script, dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "stopped", 2) + common)
    run_main_in_process(script, dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "stopped", 5) + common
                        + ["--resume_from_checkpoint", "latest"])
    weights = "unet/diffusion_pytorch_model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "stopped" / weights)
    base = load_file(os.path.join(tiny_pipeline_dir, weights))
    assert any(not torch.equal(straight[k], base[k]) for k in base)  # it trained
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_repeats_multiply_the_instance_images_per_epoch(tiny_pipeline_dir, instance_dir, tmp_path):
    import train_text_to_image as script

    out = tmp_path / "run"
    run_main_in_process(script, dreambooth_args(tiny_pipeline_dir, instance_dir, out, steps=1,
                                                extra=["--repeats", "3", "--seed", "0"]))
    plan = json.loads((out / "training_args.json").read_text())["plan"]
    assert plan["updates_per_epoch"] == 15  # 5 images x 3 repeats, batch 1


def test_an_instance_folder_needs_an_instance_prompt(capsys, tiny_pipeline_dir, instance_dir, tmp_path):
    """(An empty prompt is one: diffusers' own Lumina-2 test trains with --instance_prompt "".)"""
    import train_text_to_image as script

    argv = dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "o")
    at = argv.index("--instance_prompt")
    expect_user_error(capsys, script, argv[:at] + argv[at + 2:], "--instance_data_dir needs --instance_prompt")


@pytest.mark.parametrize("extra, message", [
    (["--prior_loss_weight", "0.5"], "add --with_prior_preservation"),
    (["--with_prior_preservation"], "--with_prior_preservation needs --class_data_dir"),
    (["--class_labels_conditioning", "timesteps"], "not a DeepFloyd IF pipeline"),
    (["--tokenizer_max_length", "0"], "--tokenizer_max_length 0: give a positive length"),
])
def test_bad_dreambooth_flags_are_one_block_errors(capsys, tiny_pipeline_dir, instance_dir, tmp_path, extra, message):
    import train_text_to_image as script

    expect_user_error(capsys, script, dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "o") + extra, message)
    assert not os.path.exists(tmp_path / "o")


def test_no_instance_images_and_an_unwritable_class_dir_are_named(capsys, tiny_pipeline_dir, instance_dir, tmp_path):
    import train_text_to_image as script

    empty = tmp_path / "empty"
    empty.mkdir()
    expect_user_error(capsys, script, dreambooth_args(tiny_pipeline_dir, str(empty), tmp_path / "o"),
                      f"--instance_data_dir {empty}: no images")
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    expect_user_error(capsys, script, dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "o2")
                      + prior_args(blocked / "class"), f"--class_data_dir {blocked / 'class'}: not writable")


def test_sdxl_dreambooth_lora_with_text_encoders(tiny_sdxl_pipeline_dir, instance_dir, tmp_path):
    """train_dreambooth_lora_sdxl.py's run: the LoRA file carries unet, text_encoder and text_encoder_2 keys and
    loads into the SDXL pipeline; the text encoders get --text_encoder_lr."""
    import safetensors.torch
    from diffusers import StableDiffusionXLPipeline

    import train_text_to_image as script

    out = tmp_path / "run"
    run_main_in_process(script, ["--use_lora", "--pretrained_model_name_or_path", tiny_sdxl_pipeline_dir,
                                 "--instance_data_dir", instance_dir, "--instance_prompt", "a photo of sks thing",
                                 "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "2",
                                 "--train_text_encoder", "--output_dir", out, "--seed", "0", "--report_to", "none",
                                 "--lr_warmup_steps", "0"])
    state = safetensors.torch.load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    saved = json.loads((out / "training_args.json").read_text())
    assert (saved["learning_rate"], saved["text_encoder_learning_rate"], saved["output_dir"]) == (1e-4, 5e-6, str(out))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    pipe.load_lora_weights(out)
    image = pipe("a photo of sks thing", num_inference_steps=1, height=32, width=32, output_type="np").images[0]
    assert np.isfinite(image).all()


def test_tokenizer_name_and_max_length(tiny_pipeline_dir, instance_dir, tmp_path):
    """--tokenizer_name loads the tokenizer from there; --tokenizer_max_length pads/truncates every caption to it."""
    import train_text_to_image as script
    from utils.sd.data import TextImageSettings, build_text_image_dataset
    from utils.sd.dreambooth import dreambooth_rows
    from utils.sd.models import ModelSource, load_models

    argv = dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "out", steps=1, extra=[
        "--tokenizer_name", os.path.join(tiny_pipeline_dir, "tokenizer"), "--tokenizer_max_length", "16",
        "--seed", "0"])
    args = script.parse_args(argv)
    models = load_models(ModelSource.from_args(args), [])
    rows = dreambooth_rows(instance_dir, args.instance_prompt, 1, [], None, ("image", "text"))
    dataset = build_text_image_dataset(TextImageSettings.from_args(args), rows, models["tokenizer"])
    assert dataset[0]["input_ids"].shape == (16,)
    run_main_in_process(script, argv + ["--skip_save_text_encoder"])  # the UNet takes the 16-token context
    assert os.path.isfile(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not os.path.exists(tmp_path / "out" / "text_encoder")  # --skip_save_text_encoder, as diffusers'
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["text_encoder"] == [None, None]


def test_text_encoder_attention_mask_reaches_the_encoder_and_the_text_cache(tiny_pipeline_dir, instance_dir, tmp_path):
    """--text_encoder_use_attention_mask: the samples carry the tokenizer's mask, the conditioning is the encoder's
    output with it (not without), and training from the text cache gives the same losses."""
    from test_sd_cache import read_losses

    import train_text_to_image as script
    from utils.sd.data import TextImageSettings, build_text_image_dataset, collate_text_image
    from utils.sd.dreambooth import dreambooth_rows
    from utils.sd.models import ModelSource, load_models
    from utils.sd.sdxl import unet_conditioning

    argv = dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "images", steps=3, extra=[
        "--text_encoder_use_attention_mask", "--seed", "0", "--logging_steps", "1", "--report_to", "tensorboard",
        "--train_batch_size", "2", "--center_crop", "--learning_rate", "1e-3"])
    args = script.parse_args(argv)
    models = load_models(ModelSource.from_args(args), [])
    rows = dreambooth_rows(instance_dir, args.instance_prompt, 1, [], None, ("image", "text"))
    dataset = build_text_image_dataset(TextImageSettings.from_args(args), rows, models["tokenizer"])
    batch = collate_text_image([dataset[0], dataset[1]])
    expected = models["tokenizer"](args.instance_prompt, padding="max_length", max_length=77, return_tensors="pt")
    assert torch.equal(batch["attention_mask"][0], expected.attention_mask[0])
    with torch.no_grad():
        hidden, _ = unet_conditioning(models, batch, torch.zeros(2, 4, 4, 4), "cpu")
        masked = models["text_encoder"](batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        unmasked = models["text_encoder"](batch["input_ids"])[0]
    assert torch.equal(hidden, masked) and not torch.equal(hidden, unmasked)
    run_main_in_process(script, argv)
    run_main_in_process(script, argv[:argv.index("--output_dir")] + ["--output_dir", tmp_path / "cached"]
                        + argv[argv.index("--output_dir") + 2:] + ["--pre_compute_text_embeddings",
                                                                   "--latent_cache_dir", tmp_path / "cache"])
    from_images, from_cache = read_losses(str(tmp_path / "images")), read_losses(str(tmp_path / "cached"))
    assert len(from_images) == 3
    torch.testing.assert_close(torch.tensor(from_cache), torch.tensor(from_images), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_processes_share_the_class_images_and_train(tiny_pipeline_dir, instance_dir, tmp_path):
    """2 processes: each draws its share of the missing class images (the same images as one process draws), then
    both train on the paired batches."""
    class_dir = tmp_path / "class"
    accelerate_launch(SCRIPT, dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "out", steps=2,
                                              extra=["--seed", "7"]) + prior_args(class_dir, num=5), num_processes=2)
    names = sorted(os.listdir(class_dir))
    assert [n.split("-")[0] for n in names] == ["00000", "00001", "00002", "00003", "00004"]
    assert os.path.isfile(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    import train_text_to_image as script

    one = tmp_path / "one"
    run_main_in_process(script, dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "out1", steps=1,
                                                extra=["--seed", "7"]) + prior_args(one, num=5))
    for name in names:  # image k comes from seed (--seed, k), whichever process drew it
        assert np.array_equal(np.asarray(Image.open(class_dir / name)), np.asarray(Image.open(one / name)))


# ---------------------------------------------------------------------------------------------- --dataset_name

def instance_dataset(root, instance_dir, captions):
    """The instance images as a datasets imagefolder (metadata.jsonl in file-name order, a `text` column)."""
    root.mkdir()
    names = sorted(n for n in os.listdir(instance_dir) if n.endswith(".png"))
    for name in names:
        shutil.copy(os.path.join(instance_dir, name), root / name)
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as handle:
        for name, caption in zip(names, captions):
            handle.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return str(root)


def unet_weights(out):
    return safetensors.torch.load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def test_dreambooth_from_a_dataset_is_the_folder_run_unless_caption_column_is_given(tiny_pipeline_dir, instance_dir,
                                                                                     tmp_path):
    """diffusers' DreamBooth --dataset_name: without --caption_column every image gets --instance_prompt (the
    dataset's own `text` captions unused), so the run equals --instance_data_dir's bit for bit; with
    --caption_column text each image trains on its own caption (equal captions: equal run; others: another)."""
    import train_text_to_image as script

    prompt = "a photo of sks thing"
    steps = ["--train_batch_size", "5", "--seed", "0", "--repeats", "2", "--checkpointing_steps", "100"]
    folder_run = tmp_path / "folder"
    run_main_in_process(script, dreambooth_args(tiny_pipeline_dir, instance_dir, folder_run, 2, steps))

    def dataset_run(name, captions, extra=()):
        data = instance_dataset(tmp_path / f"data-{name}", instance_dir, captions)
        argv = dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / name, 2, [*steps, *extra])
        at = argv.index("--instance_data_dir")
        run_main_in_process(script, argv[:at] + ["--dataset_name", data] + argv[at + 2:])
        return unet_weights(tmp_path / name)

    reference = unet_weights(folder_run)
    same = lambda weights: all(torch.equal(weights[k], reference[k]) for k in reference)  # noqa: E731
    assert same(dataset_run("ignored", [f"caption {i}" for i in range(5)]))
    assert same(dataset_run("equal", [prompt] * 5, ["--caption_column", "text"]))
    assert not same(dataset_run("own", [f"a photo of thing number {i}" for i in range(5)], ["--caption_column", "text"]))


def test_dreambooth_from_a_dataset_bad_columns_are_one_block_errors(capsys, tiny_pipeline_dir, instance_dir, tmp_path):
    import train_text_to_image as script

    data = instance_dataset(tmp_path / "data", instance_dir, ["x"] * 5)
    argv = dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "o")
    at = argv.index("--instance_data_dir")
    from_dataset = argv[:at] + ["--dataset_name", data] + argv[at + 2:]
    expect_user_error(capsys, script, from_dataset + ["--caption_column", "prompt"], "--caption_column 'prompt'",
                      "--instance_prompt")
    expect_user_error(capsys, script, from_dataset + ["--image_column", "picture"], "--image_column 'picture'")
    expect_user_error(capsys, script, argv + ["--dataset_name", data], "--instance_data_dir replaces --dataset_name")


# ---------------------------------------------------------------------------------------------- EDM-style training

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_style_loss_is_diffusers_sdxl_dreambooth_loss(tiny_pipeline_dir, prediction_type):
    """--do_edm_style_training: the loss of a batch = the lines of diffusers' train_dreambooth_lora_sdxl.py
    (Euler's sigmas for drawn training timesteps, input / sqrt(sigma^2 + 1), the output turned into a denoised
    estimate, target the clean latents, weights sigma^-2), recomputed here with the same draws."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    import train_text_to_image as script
    from utils.families.sd import StableDiffusion
    from utils.telemetry import HealthMonitor

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    args = script.parse_args(["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", "unused",
                              "--do_edm_style_training"])
    family = StableDiffusion()
    family.configure(args)
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    models = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                  noise_scheduler=scheduler)
    mean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = pipe.tokenizer(["a photo", "a photo of sks"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    torch.manual_seed(0)
    loss = family.training_loss(args, models, {"latent_mean": mean, "latent_std": torch.zeros_like(mean),
                                               "input_ids": ids}, HealthMonitor())

    torch.manual_seed(0)
    model_input = (mean + 0 * torch.randn(mean.shape)) * pipe.vae.config.scaling_factor
    noise = torch.randn_like(model_input)
    indices = torch.randint(0, scheduler.config.num_train_timesteps, (2,))
    timesteps = scheduler.timesteps[indices]
    noisy_model_input = scheduler.add_noise(model_input, noise, timesteps)
    sigmas = scheduler.sigmas[[(scheduler.timesteps == t).nonzero().item() for t in timesteps]].view(-1, 1, 1, 1)
    inp_noisy_latents = noisy_model_input / ((sigmas ** 2 + 1) ** 0.5)
    with torch.no_grad():
        prompt_embeds = pipe.text_encoder(ids)[0]
    model_pred = pipe.unet(inp_noisy_latents, timesteps, prompt_embeds, return_dict=False)[0]
    if prediction_type == "epsilon":
        model_pred = model_pred * (-sigmas) + noisy_model_input
    else:
        model_pred = model_pred * (-sigmas / (sigmas ** 2 + 1) ** 0.5) + (noisy_model_input / (sigmas ** 2 + 1))
    weighting = (sigmas ** -2.0).float()
    expected = torch.mean((weighting * (model_pred.float() - model_input.float()) ** 2).reshape(2, -1), 1).mean()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)


def test_diffusers_dreambooth_lora_sdxl_with_edm(tiny_sdxl_pipeline_dir, instance_dir, tmp_path):
    """diffusers' examples/dreambooth/test_dreambooth_lora_edm.py (test_dreambooth_lora_sdxl_with_edm), our script."""
    import train_text_to_image as script

    run_main_in_process(script, [
        "--pretrained_model_name_or_path", tiny_sdxl_pipeline_dir, "--do_edm_style_training", "--instance_data_dir",
        instance_dir, "--instance_prompt", "photo", "--resolution", "64", "--train_batch_size", "1",
        "--gradient_accumulation_steps", "1", "--max_train_steps", "2", "--learning_rate", "5.0e-04", "--scale_lr",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--output_dir", str(tmp_path), "--use_lora"])
    lora_state_dict = safetensors.torch.load_file(os.path.join(tmp_path, "pytorch_lora_weights.safetensors"))
    assert all("lora" in k for k in lora_state_dict) and all(k.startswith("unet") for k in lora_state_dict)


def test_edm_style_training_refusals_are_one_block_errors(capsys, tiny_pipeline_dir, instance_dir, tmp_path):
    """With the DDPM objective's options; an EDM pipeline (Playground v2.5's scheduler) as the base."""
    import train_text_to_image as script
    from diffusers import EDMDPMSolverMultistepScheduler, StableDiffusionPipeline

    edm = ["--do_edm_style_training"]
    expect_user_error(capsys, script, dreambooth_args(tiny_pipeline_dir, instance_dir, tmp_path / "o", 1,
                                                      edm + ["--snr_gamma", "5"]), "--do_edm_style_training", "--snr_gamma")
    playground = tmp_path / "playground"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.scheduler = EDMDPMSolverMultistepScheduler()
    pipe.save_pretrained(playground)
    expect_user_error(capsys, script, dreambooth_args(str(playground), instance_dir, tmp_path / "p", 1),
                      "EDMDPMSolverMultistepScheduler", "not available yet")
