"""End-to-end runs of train_text_to_image.py on the tiny offline pipeline, launched with `accelerate launch`."""

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launch, parse_and_list_flags, write_captioned_folder

SCRIPT = "train_text_to_image.py"

# Every flag of diffusers' examples/text_to_image/train_text_to_image.py and
# train_text_to_image_lora.py (diffusers main, 2026-08), by name.
DIFFUSERS_FLAGS = """
--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --allow_tf32 --cache_dir --caption_column --center_crop
--checkpointing_steps --checkpoints_total_limit --dataloader_num_workers --dataset_config_name --dataset_name
--dream_detail_preservation --dream_training --enable_xformers_memory_efficient_attention --foreach_ema
--gradient_accumulation_steps --gradient_checkpointing --hub_model_id --hub_token --image_column
--image_interpolation_mode --input_perturbation --learning_rate --local_rank --logging_dir --lr_scheduler
--lr_warmup_steps --max_grad_norm --max_train_samples --max_train_steps --mixed_precision --noise_offset
--non_ema_revision --num_train_epochs --num_validation_images --offload_ema --output_dir --prediction_type
--pretrained_model_name_or_path --push_to_hub --random_flip --rank --report_to --resolution
--resume_from_checkpoint --revision --scale_lr --seed --snr_gamma --tracker_project_name --train_batch_size
--train_data_dir --use_8bit_adam --use_ema --validation_epochs --validation_prompt --validation_prompts --variant
""".split()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """8 random images with same-named .txt captions."""
    return write_captioned_folder(tmp_path_factory.mktemp("captioned"))


def base_args(pipeline, data, out, steps=2, extra=""):
    return ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--output_dir", str(out), "--seed", "0",
            "--report_to", "none", "--lr_warmup_steps", "0"] + shlex.split(extra)


def test_every_diffusers_flag_is_accepted():
    import train_text_to_image as script

    _, parser_flags = parse_and_list_flags(script.parse_args, ["--model_preset", "tiny", "--train_data_dir", "x"])
    missing = [flag for flag in DIFFUSERS_FLAGS if flag not in parser_flags]
    assert not missing, f"flags of diffusers' scripts we do not accept: {missing}"


def test_diffusers_defaults():
    import train_text_to_image as script

    args = script.parse_args(["--pretrained_model_name_or_path", "p", "--dataset_name", "d"])
    assert (args.output_dir, args.resolution, args.train_batch_size, args.num_train_epochs) == ("sd-model-finetuned", 512, 16, 100)
    assert (args.learning_rate, args.lr_scheduler, args.lr_warmup_steps, args.checkpointing_steps) == (1e-4, "constant", 500, 500)
    assert (args.validation_epochs, args.image_interpolation_mode, args.tracker_project_name) == (5, "lanczos", "text2image-fine-tune")
    assert args.mixed_precision is None and args.report_to == "tensorboard" and args.max_grad_norm == 1.0
    lora = script.parse_args(["--pretrained_model_name_or_path", "p", "--dataset_name", "d", "--use_lora"])
    assert (lora.output_dir, lora.validation_epochs, lora.num_validation_images, lora.rank) == ("sd-model-finetuned-lora", 1, 4, 4)


def test_yaml_config_with_cli_override(tmp_path):
    import train_text_to_image as script

    config = tmp_path / "run.yaml"
    config.write_text("pretrained_model_name_or_path: p\ndataset_name: d\nlearning_rate: 3.0e-5\nresolution: 256\nrandom_flip: true\n")
    args = script.parse_args(["--config", str(config), "--resolution", "128"])
    assert args.learning_rate == 3e-5 and args.random_flip is True
    assert args.resolution == 128  # the command line wins over the file
    config.write_text("learning_rat: 1e-4\n")
    with pytest.raises(ValueError, match="unknown key 'learning_rat'.*--learning_rate"):
        script.parse_args(["--config", str(config)])


@pytest.mark.parametrize("argv, message", [
    (["--dataset_name", "d"], "--pretrained_model_name_or_path.*--model_preset"),
    (["--model_preset", "tiny"], "--dataset_name, --train_data_dir"),
    (["--model_preset", "tiny", "--dataset_name", "d", "--dream_training", "--prediction_type", "v_prediction"], "--dream_training"),
    (["--model_preset", "tiny", "--dataset_name", "d", "--enable_xformers_memory_efficient_attention"], "xformers is not installed"),
    (["--model_preset", "tiny", "--pretrained_model_name_or_path", "p", "--dataset_name", "d"], "exclusive"),
])
def test_impossible_flag_combinations(argv, message):
    import train_text_to_image as script

    if "xformers" in message:
        pytest.importorskip("diffusers")
        from diffusers.utils.import_utils import is_xformers_available

        if is_xformers_available():
            pytest.skip("xformers is installed")
    with pytest.raises(ValueError, match=message):
        script.parse_args(argv)


def test_fp16_on_cpu_is_a_clear_error(tiny_pipeline_dir, image_folder, tmp_path):
    result = accelerate_launch(SCRIPT, base_args(tiny_pipeline_dir, image_folder, tmp_path / "o", extra="--mixed_precision fp16"),
                               check=False)
    assert result.returncode != 0
    assert "--mixed_precision fp16 needs a GPU" in result.stderr


@pytest.mark.slow
def test_train_checkpoint_resume_and_limit(tiny_pipeline_dir, image_folder, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "run"
    accelerate_launch(SCRIPT, base_args(tiny_pipeline_dir, image_folder, out, steps=4,
                                        extra="--checkpointing_steps 2 --checkpoints_total_limit 2 --use_ema --logging_steps 1 "
                                              "--report_to tensorboard --validation_prompts 'a cat' --validation_steps 4"))
    assert {"optimizer.bin", "training_state.json", "unet", "unet_ema"} <= set(os.listdir(out / "checkpoint-2"))
    for step in (2, 4):
        UNet2DConditionModel.from_pretrained(out / f"checkpoint-{step}" / "unet")
        UNet2DConditionModel.from_pretrained(out / f"checkpoint-{step}" / "unet_ema")
        assert json.loads((out / f"checkpoint-{step}" / "training_state.json").read_text())["global_step"] == step
    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    # The final UNet is the EMA one (diffusers' layout: EMA weights copied into output_dir/unet).
    ema = UNet2DConditionModel.from_pretrained(out / "checkpoint-4" / "unet_ema").state_dict()
    final = pipe.unet.state_dict()
    assert all(torch.equal(ema[k], final[k]) for k in final)
    assert os.listdir(out / "samples"), "validation grid PNG missing"
    # Health scalars reached TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = [d for d, _, files in os.walk(out / "logs") if any(f.startswith("events.") for f in files)]
    tags = set()
    for directory in event_dirs:
        accumulator = EventAccumulator(directory)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for tag in ("train_loss", "train/lr", "train/grad_norm", "train/param_norm", "train/step_time_ms", "train/samples_per_sec",
                "train/timestep_mean", "train/timestep_std", "train/latent_std", "train/noise_std"):
        assert tag in tags, f"{tag} not logged; got {sorted(tags)}"

    # Resume from latest continues to 6 steps; the limit of 2 holds across the resume.
    result = accelerate_launch(SCRIPT, base_args(tiny_pipeline_dir, image_folder, out, steps=6,
                                                 extra="--checkpointing_steps 2 --checkpoints_total_limit 2 --use_ema "
                                                       "--resume_from_checkpoint latest --resume_override_lr --learning_rate 5e-5"))
    assert "Resuming from checkpoint" in result.stdout + result.stderr
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6
    # --resume_override_lr restarted the schedule at the new learning rate.
    scheduler_state = torch.load(out / "checkpoint-6" / "scheduler.bin", weights_only=True)
    assert scheduler_state["base_lrs"] == [5e-5]
    saved_args = json.loads((out / "training_args.json").read_text())
    assert saved_args["max_train_steps"] == 6 and "hub_token" not in saved_args


@pytest.mark.slow
def test_loss_options_and_bf16_run(tiny_pipeline_dir, image_folder, tmp_path):
    """min-SNR + offset noise + input perturbation + v-prediction in one run; DREAM + bf16 in another."""
    from diffusers import DDPMScheduler

    out = tmp_path / "v"
    accelerate_launch(SCRIPT, base_args(tiny_pipeline_dir, image_folder, out, extra=(
        "--snr_gamma 5.0 --noise_offset 0.1 --input_perturbation 0.1 --prediction_type v_prediction --random_flip "
        "--center_crop --image_interpolation_mode bicubic --max_train_samples 6")))
    assert DDPMScheduler.from_pretrained(out / "scheduler").config.prediction_type == "v_prediction"
    out = tmp_path / "dream"
    result = accelerate_launch(SCRIPT, base_args(tiny_pipeline_dir, image_folder, out, extra=(
        "--dream_training --mixed_precision bf16 --logging_steps 1 --gradient_accumulation_steps 2")))
    assert (out / "model_index.json").exists()
    assert "train_loss" not in result.stderr or "nan" not in result.stderr.lower()


@pytest.mark.slow
def test_from_scratch_preset_with_vae_stage_and_text_encoder(image_folder, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    out = tmp_path / "scratch"
    accelerate_launch(SCRIPT, ["--model_preset", "tiny", "--train_data_dir", image_folder, "--resolution", "32",
                               "--train_batch_size", "4", "--max_train_steps", "3", "--output_dir", out, "--seed", "0",
                               "--report_to", "none", "--train_vae", "--vae_train_steps", "3", "--train_text_encoder",
                               "--caption_dropout_prob", "0.2", "--logging_steps", "1", "--checkpointing_steps", "3"])
    stage = json.loads((out / "vae_stage" / "stage.json").read_text())
    assert stage["steps"] == 3 and stage["scaling_factor"] > 0
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(stage["scaling_factor"])
    assert (out / "checkpoint-3" / "text_encoder").is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe("kanji", num_inference_steps=2, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_from_scratch_with_config_json_and_loaded_text_encoder(tiny_pipeline_dir, image_folder, tmp_path):
    """--unet_config / --vae_config JSON overrides, --text_encoder_name_or_path (a local folder), joint VAE training."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config, vae_config = tmp_path / "unet.json", tmp_path / "vae.json"
    unet_config.write_text(json.dumps({"block_out_channels": [16, 32], "norm_num_groups": 8, "attention_head_dim": 4}))
    vae_config.write_text(json.dumps({"block_out_channels": [8, 16], "norm_num_groups": 8, "latent_channels": 2}))
    out = tmp_path / "json"
    accelerate_launch(SCRIPT, ["--model_preset", "tiny", "--unet_config", unet_config, "--vae_config", vae_config,
                               "--text_encoder_name_or_path", tiny_pipeline_dir, "--train_data_dir", image_folder,
                               "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--output_dir", out,
                               "--report_to", "none", "--seed", "1", "--train_vae", "--vae_training_mode", "joint",
                               "--checkpointing_steps", "2"])
    assert (out / "checkpoint-2" / "vae").is_dir()  # joint mode: the VAE trains with the UNet and is checkpointed
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert list(unet.config.block_out_channels) == [16, 32] and unet.config.in_channels == 2
    assert AutoencoderKL.from_pretrained(out / "vae").config.latent_channels == 2
    from transformers import CLIPTokenizer

    loaded = CLIPTokenizer.from_pretrained(Path(tiny_pipeline_dir) / "tokenizer").get_vocab()
    assert CLIPTokenizer.from_pretrained(out / "tokenizer").get_vocab() == loaded


@pytest.mark.slow
def test_torch_compile_and_channels_last_train_and_save_plain_weights(tiny_pipeline_dir, image_folder, tmp_path):
    """--torch_compile compiles the UNet in place: the saved weights keep the plain diffusers keys
    (no `_orig_mod.`), load back, and differ from the starting weights (the compiled model trained)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    out = tmp_path / "out"
    accelerate_launch("train_text_to_image.py", base_args(tiny_pipeline_dir, image_folder, out, steps=3,
                                                          extra="--torch_compile --channels_last --learning_rate 1e-3"))
    trained = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    start = load_file(os.path.join(tiny_pipeline_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")


@pytest.mark.slow
def test_a_stop_during_the_vae_stage_saves_it_and_resumes_exactly(image_folder, tmp_path, monkeypatch):
    """A stop request in the VAE stage of a from-scratch run (issue 28: it used to die with no checkpoint and
    restart the stage from 0): the stage's state is saved, the run exits 0 with the resume command, and
    --resume_from_checkpoint continues the stage to the very weights of an uninterrupted stage."""
    import train_text_to_image
    from safetensors.torch import load_file

    from tests.conftest import run_main_in_process
    from utils.stopping import StopSignal

    def argv(out):  # 8 images in batches of 2: the stop at step 5 lands mid-epoch 1; the resume replays its order
        return ["--model_preset", "tiny", "--train_data_dir", image_folder, "--resolution", "32", "--train_batch_size",
                "2", "--max_train_steps", "1", "--output_dir", out, "--seed", "0", "--report_to", "none", "--train_vae",
                "--vae_train_steps", "6", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]

    run_main_in_process(train_text_to_image, argv(tmp_path / "once"))
    calls = []
    original = StopSignal.should_stop

    def stop_at_step_5(self, accelerator):
        calls.append(1)
        return original(self, accelerator) or len(calls) == 5
    monkeypatch.setattr(StopSignal, "should_stop", stop_at_step_5)
    with pytest.raises(SystemExit) as stopped:
        run_main_in_process(train_text_to_image, argv(tmp_path / "twice"))
    assert stopped.value.code == 0
    saved = torch.load(tmp_path / "twice" / "vae_stage_checkpoint" / "state_0.pt", weights_only=True)
    assert saved["step"] == 5 and (saved["epoch"], saved["batches_in_epoch"]) == (1, 1) and not (tmp_path / "twice" / "vae_stage").exists()
    monkeypatch.setattr(StopSignal, "should_stop", original)
    run_main_in_process(train_text_to_image, argv(tmp_path / "twice"))
    assert not (tmp_path / "twice" / "vae_stage_checkpoint").exists()  # the finished stage replaces it
    once = load_file(tmp_path / "once" / "vae_stage" / "diffusion_pytorch_model.safetensors")
    twice = load_file(tmp_path / "twice" / "vae_stage" / "diffusion_pytorch_model.safetensors")
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    first, resumed = (json.loads((tmp_path / d / "vae_stage" / "stage.json").read_text()) for d in ("once", "twice"))
    assert first == resumed  # the same losses and the same latent scale


@pytest.mark.slow
def test_the_vae_stage_checkpoints_on_the_step_boundary_and_a_crash_resumes_exactly(image_folder, tmp_path, monkeypatch):
    """The VAE stage runs on the trainers' step boundary (issue 29): a stage checkpoint every --checkpointing_steps,
    so a crash (not a stop) mid-stage resumes from the last one to the weights of an uninterrupted stage."""
    import train_text_to_image
    import utils.sd.vae_training as vae_training
    from safetensors.torch import load_file

    from tests.conftest import run_main_in_process

    def argv(out):
        return ["--model_preset", "tiny", "--train_data_dir", image_folder, "--resolution", "32", "--train_batch_size",
                "2", "--max_train_steps", "1", "--output_dir", out, "--seed", "0", "--report_to", "none", "--train_vae",
                "--vae_train_steps", "7", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest"]

    run_main_in_process(train_text_to_image, argv(tmp_path / "once"))
    original, calls = vae_training.vae_losses, []

    def crash_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)
    monkeypatch.setattr(vae_training, "vae_losses", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_main_in_process(train_text_to_image, argv(tmp_path / "twice"))
    saved = torch.load(tmp_path / "twice" / "vae_stage_checkpoint" / "state_0.pt", weights_only=True)
    assert saved["step"] == 3  # the interval's checkpoint (step 6 never came)
    monkeypatch.setattr(vae_training, "vae_losses", original)
    run_main_in_process(train_text_to_image, argv(tmp_path / "twice"))
    once = load_file(tmp_path / "once" / "vae_stage" / "diffusion_pytorch_model.safetensors")
    twice = load_file(tmp_path / "twice" / "vae_stage" / "diffusion_pytorch_model.safetensors")
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    assert not (tmp_path / "once" / "vae_stage_checkpoint").exists()  # a finished stage leaves no stage checkpoint


def test_the_vae_stage_has_the_non_finite_guard(image_folder, tmp_path):
    """--max_nonfinite_steps holds in the VAE stage too (it had no guard): a blown-up VAE aborts after 3."""
    import train_text_to_image

    from tests.conftest import run_main_in_process

    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .*--max_nonfinite_steps 3"):
        run_main_in_process(train_text_to_image, [
            "--model_preset", "tiny", "--train_data_dir", image_folder, "--resolution", "32", "--train_batch_size",
            "2", "--max_train_steps", "1", "--output_dir", tmp_path / "out", "--seed", "0", "--report_to", "none",
            "--train_vae", "--vae_train_steps", "20", "--vae_learning_rate", "1e30", "--max_nonfinite_steps", "3"])
    assert not (tmp_path / "out" / "vae_stage").exists()
