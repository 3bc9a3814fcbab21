"""Stable Diffusion 3 / 3.5 in train_text_to_image.py (utils/families/sd3.py, utils/families/flow_matching.py):
diffusers' CLI and its own example tests (examples/dreambooth/test_dreambooth_lora_sd3.py, test_dreambooth_sd3.py)
with the tiny pipeline built offline, the rectified flow checked against diffusers' functions and scheduler, a
model we train denoising in StableDiffusion3Pipeline, exact resume, cached = uncached, two processes, bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import (accelerate_launch, overfit_one_image_psnr, parse_and_list_flags, run_main_in_process,
                      write_captioned_folder)
from PIL import Image
from test_user_errors import expect_user_error

SCRIPT = "train_text_to_image.py"

# Every flag of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py and train_dreambooth_sd3.py
# (diffusers main, 2026-12, commit 58eb52c0), by name.
SD3_FLAGS = """
--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --adam_weight_decay_text_encoder --allow_tf32
--cache_dir --cache_latents --caption_column --center_crop --checkpointing_steps --checkpoints_total_limit
--class_data_dir --class_prompt --dataloader_num_workers --dataset_config_name --dataset_name
--gradient_accumulation_steps --gradient_checkpointing --hub_model_id --hub_token --image_column
--instance_data_dir --instance_prompt --learning_rate --local_rank --logging_dir --logit_mean --logit_std
--lora_blocks --lora_dropout --lora_layers --lr_num_cycles --lr_power --lr_scheduler --lr_warmup_steps
--max_grad_norm --max_sequence_length --max_train_steps --mixed_precision --mode_scale --num_class_images
--num_train_epochs --num_validation_images --optimizer --output_dir --precondition_outputs
--pretrained_model_name_or_path --prior_generation_precision --prior_loss_weight --prodigy_beta3
--prodigy_decouple --prodigy_safeguard_warmup --prodigy_use_bias_correction --push_to_hub --random_flip
--rank --repeats --report_to --resolution --resume_from_checkpoint --revision --sample_batch_size --scale_lr
--seed --text_encoder_lr --train_batch_size --train_text_encoder --upcast_before_saving --use_8bit_adam
--validation_epochs --validation_prompt --variant --weighting_scheme --with_prior_preservation
""".split()


def sd3_args(pipeline, instance, out, steps=2, extra=()):
    return ["--pretrained_model_name_or_path", pipeline, "--instance_data_dir", instance, "--instance_prompt", "photo",
            "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", str(steps), "--lr_warmup_steps",
            "0", "--output_dir", str(out), "--report_to", "none", "--seed", "0", *map(str, extra)]


def test_every_diffusers_sd3_flag_is_accepted_with_its_default(tiny_sd3_pipeline_dir):
    import train_text_to_image as script

    base = ["--pretrained_model_name_or_path", tiny_sd3_pipeline_dir, "--instance_data_dir", "x", "--instance_prompt",
            "p"]
    args, flags = parse_and_list_flags(script.parse_args, base + ["--use_lora"])
    missing = [flag for flag in SD3_FLAGS if flag not in flags]
    assert not missing, f"flags of diffusers' SD3 DreamBooth scripts we do not accept: {missing}"
    assert args.family == "sd3"
    assert (args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, args.precondition_outputs) == \
        ("logit_normal", 0.0, 1.0, 1.29, 1)
    assert (args.max_sequence_length, args.resolution, args.output_dir, args.learning_rate, args.train_batch_size) == \
        (77, 512, "sd3-dreambooth", 1e-4, 4)
    assert (args.adam_weight_decay, args.adam_weight_decay_text_encoder, args.text_encoder_learning_rate) == \
        (1e-4, 1e-3, 5e-6)
    assert (args.validation_epochs, args.tracker_project_name, args.lora_layers, args.upcast_before_saving) == \
        (50, "dreambooth-sd3-lora", None, False)
    assert script.parse_args(base).tracker_project_name == "dreambooth-sd3"
    assert script.parse_args(base + ["--weighting_scheme", "mode"]).weighting_scheme == "mode"


# diffusers' examples/dreambooth/test_dreambooth_lora_sd3.py, their Hub pipeline replaced by the tiny local one,
# docs/source/en/imgs by 5 images, --resolution 64 by 32 (the tiny VAE does not downsample: 4x fewer tokens).
@pytest.mark.parametrize("extra, prefixes, contains", [
    ([], ("transformer",), None),
    (["--train_text_encoder"], ("transformer", "text_encoder"), None),
    (["--cache_latents"], ("transformer",), None),
    (["--lora_blocks", "0"], ("transformer.transformer_blocks.0",), None),
    (["--lora_layers", "attn.to_k"], ("transformer",), "attn.to_k"),
], ids=["lora", "text_encoder", "latent_caching", "block", "layer"])
def test_diffusers_dreambooth_lora_sd3(tiny_sd3_pipeline_dir, instance_dir, tmp_path, extra, prefixes, contains):
    accelerate_launch(SCRIPT, ["--pretrained_model_name_or_path", tiny_sd3_pipeline_dir, "--instance_data_dir",
                               instance_dir, "--instance_prompt", "photo", "--resolution", "32", "--train_batch_size",
                               "1", "--gradient_accumulation_steps", "1", "--max_train_steps", "2", "--learning_rate",
                               "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                               "--output_dir", tmp_path, "--use_lora", *extra])
    state = safetensors.torch.load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert state and all("lora" in key for key in state)
    assert all(key.startswith(prefixes) for key in state)
    if "--train_text_encoder" in extra:  # both CLIPs got adapters (T5 stays frozen, as diffusers')
        assert {key.split(".")[0] for key in state} == {"transformer", "text_encoder", "text_encoder_2"}
    if contains:
        assert all(contains in key for key in state)


def test_diffusers_dreambooth_lora_sd3_checkpoints_total_limit(tiny_sd3_pipeline_dir, instance_dir, tmp_path):
    """test_dreambooth_lora_sd3_checkpointing_checkpoints_total_limit(_removes_multiple_checkpoints)."""
    common = [f"--pretrained_model_name_or_path={tiny_sd3_pipeline_dir}", f"--instance_data_dir={instance_dir}",
              f"--output_dir={tmp_path}", "--instance_prompt=photo", "--resolution=32", "--train_batch_size=1",
              "--gradient_accumulation_steps=1", "--checkpointing_steps=2", "--use_lora"]
    accelerate_launch(SCRIPT, common + ["--max_train_steps=6", "--checkpoints_total_limit=2"])
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-4", "checkpoint-6"}
    shutil.rmtree(tmp_path)
    accelerate_launch(SCRIPT, common + ["--max_train_steps=4"])
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-2", "checkpoint-4"}
    accelerate_launch(SCRIPT, common + ["--max_train_steps=8", "--resume_from_checkpoint=checkpoint-4",
                                        "--checkpoints_total_limit=2"])
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-6", "checkpoint-8"}


# diffusers' examples/dreambooth/test_dreambooth_sd3.py (the full fine-tune).
def test_diffusers_dreambooth_sd3_and_checkpointing(tiny_sd3_pipeline_dir, instance_dir, tmp_path):
    from diffusers import DiffusionPipeline, SD3Transformer2DModel

    common = ["--pretrained_model_name_or_path", tiny_sd3_pipeline_dir, "--instance_data_dir", instance_dir,
              "--instance_prompt", "photo", "--resolution", "32", "--train_batch_size", "1",
              "--gradient_accumulation_steps", "1", "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler",
              "constant", "--lr_warmup_steps", "0", "--output_dir", tmp_path, "--checkpointing_steps=2", "--seed=0"]
    accelerate_launch(SCRIPT, common + ["--max_train_steps", "4"])
    assert os.path.isfile(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(tmp_path / "scheduler" / "scheduler_config.json")
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    pipe("photo", num_inference_steps=1, height=32, width=32)
    assert os.path.isdir(tmp_path / "checkpoint-2") and os.path.isdir(tmp_path / "checkpoint-4")
    transformer = SD3Transformer2DModel.from_pretrained(tmp_path, subfolder="checkpoint-2/transformer")
    DiffusionPipeline.from_pretrained(tiny_sd3_pipeline_dir, transformer=transformer)("photo", num_inference_steps=1,
                                                                                      height=32, width=32)
    shutil.rmtree(tmp_path / "checkpoint-2")
    accelerate_launch(SCRIPT, common + ["--max_train_steps", "6", "--resume_from_checkpoint=checkpoint-4"])
    DiffusionPipeline.from_pretrained(tmp_path)("photo", num_inference_steps=1, height=32, width=32)
    assert not os.path.isdir(tmp_path / "checkpoint-2")
    assert os.path.isdir(tmp_path / "checkpoint-4") and os.path.isdir(tmp_path / "checkpoint-6")


# ---- the rectified flow against diffusers' own functions -----------------------------------------------------

def diffusers_get_sigmas(scheduler, timesteps):
    """The sigma lookup of diffusers' train_dreambooth_lora_sd3.py (get_sigmas): by timestep value."""
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    return scheduler.sigmas[step_indices].flatten()


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"])
@pytest.mark.parametrize("shift", [1.0, 3.0])  # 3.0: SD3.5's scheduler
def test_sigma_draw_and_weights_match_diffusers(scheme, shift):
    import types

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from utils.families.flow_matching import loss_weights, sample_sigmas

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    args = types.SimpleNamespace(weighting_scheme=scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    torch.manual_seed(5)
    sigmas, timesteps = sample_sigmas(args, scheduler, 64, "cpu")
    torch.manual_seed(5)  # diffusers' script, line by line
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=64, logit_mean=0.3, logit_std=1.2,
                                              mode_scale=1.29)
    expected_timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    assert torch.equal(timesteps, expected_timesteps)
    assert torch.equal(sigmas, diffusers_get_sigmas(scheduler, expected_timesteps))
    assert torch.equal(loss_weights(args, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas).float())
    if shift != 1.0:  # the shifted schedule is the one drawn from (SD3.5's sigmas are higher at the same index)
        unshifted = FlowMatchEulerDiscreteScheduler().sigmas[(u * scheduler.config.num_train_timesteps).long()]
        assert (sigmas >= unshifted).all() and not torch.allclose(sigmas, unshifted)


def test_noisy_input_is_the_pipelines_noising():
    """x_sigma = the scheduler's scale_noise (what img2img pipelines noise with) at every training timestep."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from utils.families.flow_matching import noisy_input

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    for index in (0, 10, 500, 999):
        timestep, sigma = scheduler.timesteps[index], scheduler.sigmas[index]
        ours = noisy_input(latents, noise, sigma.repeat(4))
        theirs = scheduler.scale_noise(latents, timestep.reshape(1), noise)
        assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("precondition", [1, 0])
@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt"])
def test_training_loss_is_diffusers_sd3_loss(tiny_sd3_pipeline_dir, precondition, scheme):
    """The family's loss of a batch = the loss diffusers' train_dreambooth_lora_sd3.py computes, recomputed here
    from its lines with the same random draws."""
    import types

    from diffusers import StableDiffusion3Pipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from utils.families.sd3 import StableDiffusion3, encode_prompt
    from utils.telemetry import HealthMonitor

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline_dir)
    models = dict(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                  text_encoder_2=pipe.text_encoder_2, text_encoder_3=pipe.text_encoder_3,
                  noise_scheduler=pipe.scheduler)
    args = types.SimpleNamespace(weighting_scheme=scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                 precondition_outputs=precondition, max_sequence_length=12,
                                 with_prior_preservation=False, offload=False, save_single_file=False, lora_format="diffusers",
                                 instance_data_dir=None, train_text_encoder=False)
    family = StableDiffusion3()
    family.configure(args)
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 4, 8, 8, generator=generator)
    clip = pipe.tokenizer("a photo", padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids[0]
    t5 = pipe.tokenizer_3("a photo", padding="max_length", max_length=12, truncation=True,
                          return_tensors="pt").input_ids[0]
    ids = torch.stack([clip, clip, torch.nn.functional.pad(t5, (0, 77 - 12))])[None].repeat(2, 1, 1)  # the dataset's
    batch = {"latent_mean": mean, "latent_std": torch.zeros_like(mean), "input_ids": ids}
    torch.manual_seed(0)
    loss = family.training_loss(args, models, batch, HealthMonitor())

    torch.manual_seed(0)
    model_input = ((mean + 0 * torch.randn(mean.shape)) - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    noise = torch.randn_like(model_input)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=2, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29)
    timesteps = pipe.scheduler.timesteps[(u * 1000).long()]
    sigmas = diffusers_get_sigmas(pipe.scheduler, timesteps).view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    with torch.no_grad():
        prompt_embeds, pooled = encode_prompt([pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], ids, 12,
                                              pipe.transformer.config.joint_attention_dim)
        reference_embeds = pipe.encode_prompt("a photo", "a photo", "a photo", do_classifier_free_guidance=False,
                                              max_sequence_length=12)
    assert torch.allclose(prompt_embeds[:1], reference_embeds[0], atol=1e-6)  # the pipeline's own encoding
    assert torch.allclose(pooled[:1], reference_embeds[2], atol=1e-6)
    model_pred = pipe.transformer(hidden_states=noisy_model_input, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                                  pooled_projections=pooled, return_dict=False)[0]
    if precondition:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = model_input if precondition else noise - model_input
    expected = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(2, -1), 1).mean()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss.item(), expected.item())


@pytest.mark.slow
def test_a_model_we_train_denoises_in_the_diffusers_pipeline(tmp_path):
    """1-image overfit (conftest.overfit_one_image_psnr): sampled with StableDiffusion3Pipeline, PSNR >= 20 dB. The
    test pipeline has SD3's 16 latent channels."""
    from diffusers import StableDiffusion3Pipeline

    from utils.families.sd3 import build_tiny_sd3_pipeline

    psnr = overfit_one_image_psnr(
        tmp_path, lambda path: build_tiny_sd3_pipeline(path, ["a red square"],
                                                       transformer_config=dict(in_channels=16, out_channels=16),
                                                       vae_config=dict(latent_channels=16, block_out_channels=(16,))),
        StableDiffusion3Pipeline, ["--max_train_steps", "400"], dict(max_sequence_length=77))
    assert psnr >= 20.0, psnr


# ---- what every family run guarantees ---------------------------------------------------------------------

def lora_state(path):
    return safetensors.torch.load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_is_bitwise(tiny_sd3_pipeline_dir, instance_dir, tmp_path, mode):
    """4 steps straight = 2 steps, then a resumed run to 4 (weights, optimizer and RNG restored)."""
    import train_text_to_image as script

    extra = ["--use_lora", "--train_text_encoder"] if mode == "lora" else ["--use_ema"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, straight, 4,
                                         extra + ["--checkpointing_steps", "2"]))
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, split, 2,
                                         extra + ["--checkpointing_steps", "2"]))
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, split, 4,
                                         extra + ["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"]))
    if mode == "lora":
        first, second = lora_state(straight), lora_state(split)
    else:
        name = "transformer/diffusion_pytorch_model.safetensors"
        first, second = (safetensors.torch.load_file(os.path.join(d, name)) for d in (straight, split))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def logged_losses(output_dir):
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "report", "metrics.jsonl"))]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def test_cached_training_equals_uncached(tiny_sd3_pipeline_dir, instance_dir, tmp_path):
    """--cache_latents --cache_text_embeddings (T5 and both CLIPs then leave the device) = encoding every step."""
    import train_text_to_image as script

    common = ["--use_lora", "--logging_steps", "1", "--center_crop", "--with_prior_preservation", "--class_data_dir",
              instance_dir, "--class_prompt", "a photo", "--num_class_images", "3"]
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, tmp_path / "plain", 3, common))
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, tmp_path / "cached", 3,
                                         common + ["--cache_latents", "--cache_text_embeddings"]))
    plain, cached = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "cached")
    assert len(plain) == 3 and np.allclose(plain, cached, rtol=1e-5, atol=0), (plain, cached)
    first, second = lora_state(tmp_path / "plain"), lora_state(tmp_path / "cached")
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


def test_val_loss_and_validation_images(tiny_sd3_pipeline_dir, tmp_path):
    """--validation_split scores val/loss (the family's error at fixed sigma and noise: the same number twice) and
    --validation_prompt draws images through StableDiffusion3Pipeline."""
    import train_text_to_image as script

    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data", count=6, size=(32, 32), seed=2)
    out = tmp_path / "out"
    run_main_in_process(script, ["--pretrained_model_name_or_path", tiny_sd3_pipeline_dir, "--train_data_dir", data,
                                 "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2",
                                 "--validation_split", "0.34", "--validation_steps", "1", "--validation_prompt",
                                 "a picture", "--num_validation_images", "1", "--output_dir", out, "--report_to",
                                 "none", "--use_lora"])
    rows = [json.loads(line) for line in open(out / "report" / "metrics.jsonl")]
    val = [row["val/loss"] for row in rows if "val/loss" in row]
    assert len(val) == 2 and all(np.isfinite(val)) and val[0] != val[1]
    assert os.path.isfile(out / "validation_grid.png")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux", "lumina2"])
def test_two_processes_train_identical_weights(family, request, instance_dir, tmp_path):
    """2 processes (DDP over gloo), as the SD test does: the ranks end with identical weights and one LoRA file."""
    from test_reliability import assert_ranks_identical, launch_env

    if family == "lumina2":
        from utils.families.lumina2 import build_tiny_lumina2_pipeline

        pipeline = build_tiny_lumina2_pipeline(str(tmp_path / "pipe"))
    else:
        pipeline = request.getfixturevalue(f"tiny_{family}_pipeline_dir")
    env = dict(launch_env(), TRAIN_DEBUG_RANK_CHECKSUM_DIR=str(tmp_path / "sums"))
    accelerate_launch(SCRIPT, sd3_args(pipeline, instance_dir, tmp_path / "out", 2,
                                       ["--use_lora", "--max_sequence_length", "16"]), num_processes=2, env=env)
    assert_ranks_identical(tmp_path / "sums")
    assert lora_state(tmp_path / "out")


# ---- bad input: one block, no traceback ---------------------------------------------------------------------

@pytest.mark.parametrize("extra, fragments", [
    (["--prediction_type", "epsilon"], ["--prediction_type epsilon", "flow velocity"]),
    (["--snr_gamma", "5"], ["--snr_gamma", "rectified flow"]),
    (["--max_sequence_length", "600"], ["--max_sequence_length 600", "512"]),
    (["--use_lora", "--lora_type", "lokr", "--lora_format", "kohya"], ["--lora_format kohya", "Stable Diffusion 3"]),
    (["--use_lora", "--save_single_file"], ["--save_single_file writes a whole model"]),
], ids=["epsilon", "snr_gamma", "sequence_length", "loha", "single_file_lora"])
def test_bad_sd3_flags_are_one_block_errors(capsys, tiny_sd3_pipeline_dir, instance_dir, tmp_path, extra, fragments):
    import train_text_to_image as script

    expect_user_error(capsys, script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, tmp_path / "o", 1, extra),
                      *fragments)


def test_an_incomplete_pipeline_folder_and_flow_flags_on_sd_are_refused(capsys, tiny_pipeline_dir, instance_dir,
                                                                        tmp_path):
    import train_text_to_image as script

    lumina = tmp_path / "lumina2"
    lumina.mkdir()
    (lumina / "model_index.json").write_text(json.dumps({"_class_name": "Lumina2Pipeline"}))
    expect_user_error(capsys, script, sd3_args(str(lumina), instance_dir, tmp_path / "o", 1),
                      "not a complete Lumina-Image-2.0 pipeline folder", "transformer")
    expect_user_error(capsys, script, sd3_args(tiny_pipeline_dir, instance_dir, tmp_path / "o", 1,
                                               ["--weighting_scheme", "mode"]), "--weighting_scheme", "SD3")


# ---- generate.py ----------------------------------------------------------------------------------------------

def expect_generate_error(capsys, argv, *fragments):
    """generate.py exits 2 with one `error:` block naming every fragment, no traceback."""
    import generate
    from utils.errors import EXIT_USER_ERROR, run_script

    with pytest.raises(SystemExit) as exit_info:
        run_script(generate.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    assert exit_info.value.code == EXIT_USER_ERROR and "Traceback" not in captured.err + captured.out
    assert captured.err.count("error: ") == 1 and all(str(f) in captured.err for f in fragments), captured.err


def test_generate_samples_what_an_sd3_run_wrote(tiny_sd3_pipeline_dir, instance_dir, tmp_path, capsys):
    """generate.py samples a trained SD3 LoRA (= diffusers' load_lora_weights on the same seed), a checkpoint's
    transformer, and refuses a LoRA of the other family by name."""
    import generate
    import train_text_to_image as script
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "lora"
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, out, 2,
                                         ["--use_lora", "--learning_rate", "1e-2", "--checkpointing_steps", "2"]))
    common = ["--prompt", "photo", "--steps", "3", "--seed", "4", "--num_images", "1", "--guidance_scale", "1"]
    paths = generate.main(["--model", tiny_sd3_pipeline_dir, "--lora", str(out), *common, "--output_dir",
                           str(tmp_path / "g")])
    plain = generate.main(["--model", tiny_sd3_pipeline_dir, *common, "--output_dir", str(tmp_path / "p")])
    ours, base = (np.asarray(Image.open(p[0]), dtype=np.int16) for p in (paths, plain))
    assert np.abs(ours - base).max() > 0  # the LoRA changes the image
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline_dir)
    pipe.load_lora_weights(str(out))
    theirs = pipe("photo", num_inference_steps=3, guidance_scale=1.0, height=32, width=32,
                  generator=[torch.Generator("cpu").manual_seed(4)]).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    checkpoint = generate.main(["--model", tiny_sd3_pipeline_dir, "--checkpoint", str(out / "checkpoint-2"),
                                *common, "--output_dir", str(tmp_path / "c")])
    assert np.array_equal(np.asarray(Image.open(checkpoint[0])), np.asarray(Image.open(paths[0])))

    sd_lora = tmp_path / "sd_lora.safetensors"  # an SD 1.x UNet LoRA's key layout
    safetensors.torch.save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight":
                                 torch.zeros(4, 32)}, str(sd_lora))
    expect_generate_error(capsys, ["--model", tiny_sd3_pipeline_dir, "--lora", sd_lora, *common, "--output_dir",
                                   tmp_path / "x"], "--lora", "UNet", "SD3")


def test_generate_refuses_an_sd3_lora_on_an_sd_model(tiny_pipeline_dir, tmp_path, capsys):
    sd3_lora = tmp_path / "sd3_lora.safetensors"
    safetensors.torch.save_file({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 32)},
                                str(sd3_lora), metadata={"modelspec.architecture": "stable-diffusion-3/lora"})
    expect_generate_error(capsys, ["--model", tiny_pipeline_dir, "--lora", sd3_lora, "--prompt", "x", "--output_dir",
                                   tmp_path / "x"], "stable-diffusion-3/lora", "Stable Diffusion 1.x/2.x/XL")


def test_buckets_cached_latents_and_auto_batch(tiny_sd3_pipeline_dir, tmp_path, monkeypatch):
    """Aspect-ratio buckets (with the latent cache per bucket) and --train_batch_size auto work for SD3 as for SD;
    the tokens buckets.json states per bucket are the sequence lengths the transformer was given (its input latents'
    (H / patch) x (W / patch), recorded by a wrapper around its forward), within the stated budget."""
    import train_text_to_image as script
    from diffusers import SD3Transformer2DModel

    seen, forward = [], SD3Transformer2DModel.forward

    def recording(self, *args, **kwargs):
        if torch.is_grad_enabled():
            height, width = kwargs["hidden_states"].shape[-2:]
            seen.append((height // self.config.patch_size) * (width // self.config.patch_size))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer2DModel, "forward", recording)

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(32, 48), (48, 32), (32, 32), (40, 56), (56, 40), (32, 32)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(f"thing {index}")
    common = ["--pretrained_model_name_or_path", tiny_sd3_pipeline_dir, "--train_data_dir", data, "--resolution", "32",
              "--max_train_steps", "3", "--use_lora", "--report_to", "none"]
    run_main_in_process(script, common + ["--train_batch_size", "2", "--enable_bucket", "--min_bucket_reso", "16",
                                          "--max_bucket_reso", "64", "--bucket_reso_steps", "8", "--cache_latents",
                                          "--output_dir", tmp_path / "buckets"])
    buckets = json.load(open(tmp_path / "buckets" / "buckets.json"))
    assert buckets["buckets"] == {"24x40": 2, "32x32": 2, "40x24": 2}
    tokens = buckets["tokens_per_bucket"]
    assert sorted(seen) == sorted(tokens.values())  # (3 steps of 2: one batch per bucket)
    assert max(tokens.values()) <= buckets["token_budget"] and len(set(tokens.values())) == 2
    seen.clear()
    assert lora_state(tmp_path / "buckets")
    run_main_in_process(script, common + ["--train_batch_size", "auto", "--center_crop", "--output_dir",
                                          tmp_path / "auto"])
    info = json.load(open(tmp_path / "auto" / "run_info.json"))
    assert info["plan"]["batch_size"] == 6 and lora_state(tmp_path / "auto")  # all 6 images fit in one batch


def test_lora_file_has_the_keys_comfyui_maps(tiny_sd3_pipeline_dir, instance_dir, tmp_path):
    """ComfyUI reads SD3 LoRA in diffusers' layout (comfy/lora.py: "transformer.<diffusers module>" with
    lora_A/lora_B): every key names a Linear of the SD3 transformer (or a CLIP's), and the metadata says SD3."""
    import train_text_to_image as script
    from diffusers import SD3Transformer2DModel
    from safetensors import safe_open

    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, tmp_path / "out", 1, ["--use_lora"]))
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_pipeline_dir, subfolder="transformer")
    linears = {name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    path = str(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    with safe_open(path, "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    for key in keys:
        prefix, rest = key.split(".", 1)
        module, tail = rest.rsplit(".lora_", 1)
        assert prefix == "transformer" and module in linears and tail in ("A.weight", "B.weight"), key
    assert metadata["modelspec.architecture"] == "stable-diffusion-3/lora"
    assert metadata["ss_base_model_version"] == "sd3"


def test_dreambooth_encodes_each_prompt_once(tiny_sd3_pipeline_dir, instance_dir, tmp_path, monkeypatch):
    """Frozen text encoders + one instance prompt: the three encoders run once for it (as diffusers' scripts
    precompute it), not every step; the embedding is the one encoding the batch would give."""
    import train_text_to_image as script

    from utils.families.sd3 import StableDiffusion3

    calls = []
    encode = StableDiffusion3.encode_text

    def counting(self, models, input_ids, attention_mask):
        calls.append(len(input_ids))
        return encode(self, models, input_ids, attention_mask)
    monkeypatch.setattr(StableDiffusion3, "encode_text", counting)
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, tmp_path / "o", 4,
                                         ["--use_lora", "--train_batch_size", "2"]))
    assert calls == [1]  # one prompt, encoded once, over 4 steps of 2 images
    calls.clear()
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, tmp_path / "t", 2,
                                         ["--use_lora", "--train_text_encoder"]))
    assert calls == [1, 1]  # trained encoders: every step


def test_single_file_checkpoints_without_model_config_are_named_and_refused(capsys, instance_dir, tmp_path):
    """A model-sharing site's one-file FLUX or SD3 checkpoint is recognised by its keys, not fed to the SD loader;
    without --model_config (the components the file lacks) it is named and the user told what to add."""
    import train_text_to_image as script

    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(path))
    expect_user_error(capsys, script, sd3_args(str(path), instance_dir, tmp_path / "o", 1),
                      "single-file FLUX.1 transformer: give --model_config")
    sd3 = tmp_path / "sd3.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight":
                                 torch.zeros(2, 2)}, str(sd3))
    expect_user_error(capsys, script, sd3_args(str(sd3), instance_dir, tmp_path / "o", 1),
                      "single-file SD3 checkpoint: give --model_config")


@pytest.mark.slow
def test_single_file_sd3_round_trips_and_trains_like_its_folder(tiny_sd3_pipeline_dir, instance_dir, tmp_path):
    """--save_single_file writes the transformer and VAE in Stability's layout (model.diffusion_model.joint_blocks.*,
    first_stage_model.*): diffusers' StableDiffusion3Pipeline.from_single_file reads back the very weights; that file
    as --pretrained_model_name_or_path (with --model_config) trains bit for bit like the pipeline folder; generate.py
    samples it."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    import generate
    import train_text_to_image as script

    out = tmp_path / "full"
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, out, 2,
                                         ["--save_single_file", "--single_file_dtype", "fp32"]))
    single = out / "model.safetensors"
    keys = load_file(single).keys()
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys
    assert any(k.startswith("first_stage_model.encoder.") for k in keys)
    saved = StableDiffusion3Pipeline.from_pretrained(out)
    loaded = StableDiffusion3Pipeline.from_single_file(
        str(single), config=str(out), text_encoder=saved.text_encoder, text_encoder_2=saved.text_encoder_2,
        text_encoder_3=saved.text_encoder_3)
    for name in ("transformer", "vae"):
        first, second = getattr(saved, name).state_dict(), getattr(loaded, name).state_dict()
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name

    base = tmp_path / "base.safetensors"
    from utils.families.sd3_single_file import save_sd3_single_file

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline_dir)
    save_sd3_single_file(str(base), pipe.transformer, pipe.vae, "fp32")
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, tmp_path / "from_folder", 2))
    run_main_in_process(script, sd3_args(str(base), instance_dir, tmp_path / "from_file", 2,
                                         ["--model_config", tiny_sd3_pipeline_dir]))
    name = "transformer/diffusion_pytorch_model.safetensors"
    first, second = load_file(tmp_path / "from_folder" / name), load_file(tmp_path / "from_file" / name)
    assert all(torch.equal(first[k], second[k]) for k in first)
    paths = generate.main(["--model", str(single), "--model_config", str(out), "--prompt", "photo", "--steps", "2",
                           "--num_images", "1", "--output_dir", str(tmp_path / "images"), "--seed", "0"])
    assert len(paths) == 2


def logged(output_dir, key):
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "report", "metrics.jsonl"))]
    return [row[key] for row in rows if key in row]


def test_logged_sigma_statistics_are_those_the_transformer_was_given(tiny_sd3_pipeline_dir, instance_dir, tmp_path,
                                                                     monkeypatch):
    """train/sigma_mean and train/sigma_std against the timesteps the transformer received in the training steps
    (SD3 is called with timestep = sigma x 1000), recorded by a wrapper around its forward."""
    import train_text_to_image as script
    from diffusers import SD3Transformer2DModel

    seen, forward = [], SD3Transformer2DModel.forward

    def recording(self, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(kwargs["timestep"].detach().double() / 1000)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer2DModel, "forward", recording)
    out = tmp_path / "o"
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, out, 3, [
        "--use_lora", "--train_batch_size", "2", "--logging_steps", "1", "--weighting_scheme", "logit_normal"]))
    means, stds = logged(out, "train/sigma_mean"), logged(out, "train/sigma_std")
    assert len(seen) == len(means) == len(stds) == 3
    assert any(sigmas.numel() == 2 and sigmas.std() > 0 for sigmas in seen)  # a step with two different draws
    for sigmas, mean, std in zip(seen, means, stds):
        assert mean == pytest.approx(sigmas.mean().item(), abs=1e-6)
        assert std == pytest.approx(sigmas.std(correction=0).item(), abs=1e-6)


def test_full_fine_tune_with_train_text_encoder_trains_both_clips_not_t5(tiny_sd3_pipeline_dir, instance_dir,
                                                                         tmp_path):
    """diffusers' train_dreambooth_sd3.py --train_text_encoder: CLIP-L and CLIP-G train, T5 stays as it was."""
    import train_text_to_image as script

    out = tmp_path / "o"
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, out, 2, [
        "--train_text_encoder", "--learning_rate", "1e-3", "--text_encoder_lr", "1e-3"]))
    for name, trained in (("text_encoder", True), ("text_encoder_2", True), ("text_encoder_3", False)):
        before, after = (safetensors.torch.load_file(os.path.join(root, name, "model.safetensors"))
                         for root in (tiny_sd3_pipeline_dir, out))
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert bool(changed) == trained, (name, changed[:3])


def test_upcast_before_saving_writes_the_lora_in_float32(tiny_sd3_pipeline_dir, instance_dir, tmp_path):
    """Trained in bf16, the LoRA is saved in bf16 (diffusers' scripts' default) or, with --upcast_before_saving, fp32."""
    import train_text_to_image as script

    for name, extra, dtype in (("bf16", [], torch.bfloat16), ("upcast", ["--upcast_before_saving"], torch.float32)):
        run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, tmp_path / name, 1, [
            "--use_lora", "--mixed_precision", "bf16", *extra]))
        assert {t.dtype for t in lora_state(tmp_path / name).values()} == {dtype}


def test_generate_refuses_a_scheduler_for_a_flow_model(capsys, tiny_sd3_pipeline_dir, tmp_path):
    expect_generate_error(capsys, ["--model", tiny_sd3_pipeline_dir, "--scheduler", "ddim", "--prompt", "x",
                                   "--steps", "2", "--output_dir", tmp_path / "g"],
                          "--scheduler ddim", "FlowMatchEulerDiscreteScheduler")


def merged_as_comfyui_does(weights: dict, kohya: dict, prefix: str) -> tuple[dict, set]:
    """`weights` with each `<prefix><name>` LoRA of a kohya file added (W += alpha / rank x up @ down), `name` being
    a weight's key without `.weight`, "." -> "_" (how ComfyUI maps kohya names onto a model); and the names used."""
    names = {key[:-len(".weight")].replace(".", "_"): key for key in weights if key.endswith(".weight")}
    merged, used = dict(weights), set()
    for key in kohya:
        if key.startswith(prefix) and key.endswith(".lora_down.weight"):
            name = key[len(prefix):-len(".lora_down.weight")]
            target, down = names[name], kohya[key].double()
            up, alpha = kohya[f"{prefix}{name}.lora_up.weight"].double(), kohya[f"{prefix}{name}.alpha"].item()
            merged[target] = (weights[target].double() + alpha / down.shape[0] * up @ down).to(weights[target].dtype)
            used.add(name)
    return merged, used


def test_kohya_sd3_lora_merged_as_comfyui_does_equals_the_diffusers_lora_fused(tiny_sd3_pipeline_dir, instance_dir,
                                                                              tmp_path):
    """--lora_format both (the default) writes pytorch_lora_weights_kohya.safetensors in sd-scripts' SD3 names
    (lora_unet_joint_blocks_0_x_block_attn_qkv, ...; CLIPs as lora_te1_/lora_te2_). diffusers has no reader for it,
    so each LoRA is merged into the base weights in Stability's original layout as ComfyUI maps the names, and
    diffusers' SD3 checkpoint converter must then give the transformer with diffusers' file fused by the pipeline
    (fused q/k/v, the last block's and the final layer's swapped modulation rows included); the CLIPs likewise."""
    import train_text_to_image as script
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from utils.families.sd3_single_file import transformer_to_original

    out = tmp_path / "o"
    layers = ("attn.to_q,attn.to_k,attn.to_v,attn.add_k_proj,attn.to_out.0,ff.net.0.proj,"
              "norm1_context.linear,norm_out.linear,proj_out")
    run_main_in_process(script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, out, 2, [
        "--use_lora", "--train_text_encoder", "--rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--lora_layers", layers]))
    kohya = safetensors.torch.load_file(out / "pytorch_lora_weights_kohya.safetensors")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline_dir)
    num_layers = pipe.transformer.config.num_layers
    base = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("transformer", "text_encoder", "text_encoder_2")}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"])
    pipe.unload_lora_weights()
    merged, used = merged_as_comfyui_does(transformer_to_original(base["transformer"], num_layers), kohya, "lora_unet_")
    assert f"joint_blocks_{num_layers - 1}_context_block_adaLN_modulation_1" in used
    assert {"joint_blocks_0_x_block_attn_qkv", "joint_blocks_0_context_block_attn_qkv",
            "final_layer_adaLN_modulation_1", "final_layer_linear"} <= used
    back = convert_sd3_transformer_checkpoint_to_diffusers(merged)
    expected = pipe.transformer.state_dict()
    assert back.keys() == expected.keys()
    changed = [k for k in expected if not torch.equal(expected[k], base["transformer"][k])]
    assert len(changed) == 9, changed  # (every module named; the one tiny block is the last: no ff_context)
    for key in expected:
        assert torch.allclose(back[key], expected[key], atol=1e-6), key
    for name, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        weights, used = merged_as_comfyui_does(base[name], kohya, prefix)
        assert used and len(used) == len({k for k in kohya if k.startswith(prefix) and k.endswith(".alpha")})
        fused = getattr(pipe, name).state_dict()
        for key in fused:
            assert torch.allclose(weights[key], fused[key], atol=1e-6), (name, key)
    assert set(kohya) == {k for k in kohya if k.startswith(("lora_unet_", "lora_te1_", "lora_te2_"))}
    metadata = safetensors.safe_open(str(out / "pytorch_lora_weights_kohya.safetensors"), "pt").metadata()
    assert metadata["ss_network_module"] == "networks.lora_sd3" and metadata["ss_network_dim"] == "4"
