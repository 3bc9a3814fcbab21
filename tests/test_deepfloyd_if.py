"""DeepFloyd IF in train_text_to_image.py (utils/families/deepfloyd_if.py): diffusers' own IF DreamBooth tests
(examples/dreambooth/test_dreambooth.py::test_dreambooth_if, test_dreambooth_lora.py::test_dreambooth_lora_if_model)
against a local stand-in of hf-internal-testing/tiny-if-pipe, the loss against diffusers' train_dreambooth.py lines,
stage II's low-resolution input against IFSuperResolutionPipeline's, generate.py, bad inputs."""

import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import accelerate_launch, run_main_in_process
from PIL import Image
from test_user_errors import expect_user_error

SCRIPT = "train_text_to_image.py"


@pytest.fixture(scope="module")
def tiny_if_dirs(tmp_path_factory):
    """(stage I, stage II) tiny IF pipeline folders: diffusers' IF test components, built offline."""
    from utils.families.deepfloyd_if import build_tiny_if_pipeline

    root = tmp_path_factory.mktemp("tiny-if")
    return (build_tiny_if_pipeline(str(root / "stage-1"), ["a photo of sks thing"]),
            build_tiny_if_pipeline(str(root / "stage-2"), ["a photo of sks thing"], stage_ii=True))


def diffusers_if_args(pipeline, instance, out):
    """diffusers' test_dreambooth_if / test_dreambooth_lora_if_model command (their Hub id and docs images
    replaced by the local ones)."""
    return f"""
        --pretrained_model_name_or_path {pipeline}
        --instance_data_dir {instance}
        --instance_prompt photo
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 2
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {out}
        --pre_compute_text_embeddings
        --tokenizer_max_length=77
        --text_encoder_use_attention_mask
        """.split()


@pytest.mark.slow
def test_diffusers_dreambooth_if(tiny_if_dirs, instance_dir, tmp_path):
    """examples/dreambooth/test_dreambooth.py::test_dreambooth_if, plus: the output is an IFPipeline whose scheduler
    ignores the learned variance (diffusers' script's fixed_small)."""
    from diffusers import DiffusionPipeline

    accelerate_launch(SCRIPT, diffusers_if_args(tiny_if_dirs[0], instance_dir, tmp_path))
    # save_pretrained smoke test
    assert os.path.isfile(os.path.join(tmp_path, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(tmp_path, "scheduler", "scheduler_config.json"))
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe).__name__ == "IFPipeline" and pipe.scheduler.config.variance_type == "fixed_small"
    base = DiffusionPipeline.from_pretrained(tiny_if_dirs[0])
    moved = [name for name, value in pipe.unet.state_dict().items()
             if not torch.equal(value, base.unet.state_dict()[name])]
    assert moved, "the UNet did not train"


@pytest.mark.slow
def test_diffusers_dreambooth_lora_if_model(tiny_if_dirs, instance_dir, tmp_path):
    """examples/dreambooth/test_dreambooth_lora.py::test_dreambooth_lora_if_model, plus: IFPipeline's
    load_lora_weights reads the file and it changes the UNet's output, on the added key/value projections too
    (diffusers' IF targets)."""
    from diffusers import IFPipeline

    accelerate_launch(SCRIPT, ["--use_lora", *diffusers_if_args(tiny_if_dirs[0], instance_dir, tmp_path)])
    # save_pretrained smoke test
    assert os.path.isfile(os.path.join(tmp_path, "pytorch_lora_weights.safetensors"))
    # make sure the state_dict has the correct naming in the parameters.
    lora_state_dict = safetensors.torch.load_file(os.path.join(tmp_path, "pytorch_lora_weights.safetensors"))
    is_lora = all("lora" in k for k in lora_state_dict.keys())
    assert is_lora
    assert any("add_k_proj" in key for key in lora_state_dict) and all(k.startswith("unet.") for k in lora_state_dict)
    assert not os.path.exists(os.path.join(tmp_path, "pytorch_lora_weights_kohya.safetensors"))  # (no IF layout)

    pipe = IFPipeline.from_pretrained(tiny_if_dirs[0])
    sample = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(sample, 10, hidden).sample
        pipe.load_lora_weights(str(tmp_path))
        after = pipe.unet(sample, 10, hidden).sample
    assert not torch.allclose(before, after)


def loss_args(pipeline, extra=()):
    import train_text_to_image as script

    return script.parse_args(["--pretrained_model_name_or_path", pipeline, "--instance_data_dir", "x",
                              "--instance_prompt", "photo", "--resolution", "16", *extra])


def loss_batch(tokenizer):
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    tokens = tokenizer(["photo", "a photo"], padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt")
    return pixels, {"pixel_values": pixels, "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


@pytest.mark.parametrize("stage", [1, 2])
def test_training_loss_is_diffusers_if_loss(tiny_if_dirs, stage):
    """The family's loss = diffusers' train_dreambooth.py lines for IF (pixels, T5 with its mask, class labels =
    timesteps, the epsilon half of the 6 output channels), same random draws. Stage II's second input is
    IFSuperResolutionPipeline's own: the image at 1/4 size upscaled with F.interpolate(bilinear, align_corners)
    and noised by its image_noising_scheduler at the class label, where diffusers' script feeds the noisy image
    twice (utils/families/deepfloyd_if.py says why)."""
    import torch.nn.functional as F
    from diffusers import DiffusionPipeline

    from utils.families import family_for
    from utils.telemetry import HealthMonitor

    path = tiny_if_dirs[stage - 1]
    args = loss_args(path, ["--class_labels_conditioning", "timesteps"])
    assert args.text_encoder_use_attention_mask  # (implied: IF's pipelines mask the prompt)
    family = family_for("if", args)
    pipe = DiffusionPipeline.from_pretrained(path)
    models = dict(unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                  noise_scheduler=pipe.scheduler,
                  vae=__import__("utils.families.deepfloyd_if", fromlist=["PixelSpace"]).PixelSpace())
    if stage == 2:
        models["image_noising_scheduler"] = pipe.image_noising_scheduler
    pixels, batch = loss_batch(pipe.tokenizer)
    torch.manual_seed(0)
    loss = family.training_loss(args, models, batch, HealthMonitor())

    torch.manual_seed(0)
    torch.randn(pixels.shape)  # (the pixel-space posterior's draw, times a zero spread)
    model_input = pixels
    noise = torch.randn_like(model_input)
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (2,)).long()
    noisy_model_input = pipe.scheduler.add_noise(model_input, noise, timesteps)
    with torch.no_grad():
        encoder_hidden_states = pipe.text_encoder(batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    if stage == 2:  # IFSuperResolutionPipeline: upscaled = interpolate(image), add_noise(upscaled, noise, level)
        image = F.interpolate(pixels, size=(4, 4), mode="area")
        upscaled = F.interpolate(image, (16, 16), mode="bilinear", align_corners=True)
        upscaled = pipe.image_noising_scheduler.add_noise(upscaled, torch.randn_like(pixels), timesteps)
        noisy_model_input = torch.cat([noisy_model_input, upscaled], dim=1)
    model_pred = pipe.unet(noisy_model_input, timesteps, encoder_hidden_states, class_labels=timesteps,
                           return_dict=False)[0]
    model_pred, _ = torch.chunk(model_pred, 2, dim=1)
    expected = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7), (loss.item(), expected.item())


@pytest.mark.slow
def test_a_stage_ii_model_we_train_upscales_in_the_diffusers_pipeline(tmp_path):
    """A stage II model trained by us on one 16 px image (4 copies, 150 steps) upscales that image's 4 px copy in
    IFSuperResolutionPipeline (noise_level 250, its default) better than bilinear upscaling (measured: 21.5 vs
    17.7 dB; the untrained model: 5.7 dB): the pipeline's low-resolution input is what it learned from."""
    from diffusers import IFSuperResolutionPipeline

    from utils.families.deepfloyd_if import build_tiny_if_pipeline

    import train_text_to_image as script

    pipeline_dir = build_tiny_if_pipeline(str(tmp_path / "pipe"), ["a red square"], stage_ii=True)
    y, x = np.mgrid[0:16, 0:16] / 2
    pixels = np.stack([x * 32, y * 32, (x + y) * 16], -1).clip(0, 255).astype(np.uint8)
    pixels[4:12, 4:12] = [255, 40, 40]
    (tmp_path / "data").mkdir()
    for index in range(4):
        Image.fromarray(pixels).save(tmp_path / "data" / f"{index}.png")
        (tmp_path / "data" / f"{index}.txt").write_text("a red square")
    run_main_in_process(script, ["--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir",
                                 tmp_path / "data", "--resolution", "16", "--train_batch_size", "4",
                                 "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                                 "--max_train_steps", "150", "--class_labels_conditioning", "timesteps",
                                 "--output_dir", tmp_path / "out", "--report_to", "none", "--seed", "0"])
    image = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    small = torch.nn.functional.interpolate(image, size=(4, 4), mode="area")
    bilinear = torch.nn.functional.interpolate(small, (16, 16), mode="bilinear", align_corners=True)

    def psnr(folder):
        pipe = IFSuperResolutionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            sample = pipe("a red square", image=small, height=16, width=16, num_inference_steps=28,
                          guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt",
                          clean_caption=False).images
        return 10 * np.log10(4.0 / ((sample.clamp(-1, 1) - image) ** 2).mean().item())

    baseline = 10 * np.log10(4.0 / ((bilinear - image) ** 2).mean().item())
    trained, untrained = psnr(tmp_path / "out"), psnr(pipeline_dir)
    assert trained > baseline + 2.0 and untrained < baseline, (trained, baseline, untrained)


@pytest.mark.slow
def test_generate_samples_both_stages_and_the_lora(tiny_if_dirs, instance_dir, tmp_path):
    """generate.py: a stage I DreamBooth pipeline, a stage II one with --image, an IF LoRA on its base; stage II
    without --image (and stage I with it) is a one-block error."""
    import generate

    stage_i, stage_ii = tiny_if_dirs
    run_main_in_process(__import__("train_text_to_image"), [
        "--use_lora", *diffusers_if_args(stage_i, instance_dir, tmp_path / "lora"), "--report_to", "none"])
    low = tmp_path / "low.png"
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(low)
    common = ["--prompt", "photo", "--steps", "2", "--num_images", "2", "--seed", "1"]
    assert len(generate.main(["--model", stage_i, *common, "--output_dir", str(tmp_path / "g1")])) == 3
    assert len(generate.main(["--model", stage_i, "--lora", str(tmp_path / "lora"), *common,
                              "--output_dir", str(tmp_path / "g2")])) == 3
    paths = generate.main(["--model", stage_ii, "--image", str(low), *common, "--output_dir", str(tmp_path / "g3")])
    assert Image.open(paths[0]).size == (32, 32)  # (the UNet's sample size: pixel space)
    from utils.errors import UserError

    with pytest.raises(UserError, match="give the low-resolution image"):
        generate.main(["--model", stage_ii, *common, "--output_dir", str(tmp_path / "g4")])
    with pytest.raises(UserError, match="drop --image"):
        generate.main(["--model", stage_i, "--image", str(low), *common, "--output_dir", str(tmp_path / "g5")])


@pytest.mark.parametrize("extra, message", [
    (["--class_labels_conditioning", "noise"], "only value is 'timesteps'"),
    (["--train_vae"], "no VAE"),
    (["--use_lora", "--lora_format", "kohya"], "--lora_format diffusers"),
    (["--validation_images", "missing.png"], "no such file"),
])
def test_bad_if_flags_are_one_block_errors(capsys, tiny_if_dirs, instance_dir, tmp_path, extra, message):
    import train_text_to_image as script

    expect_user_error(capsys, script, ["--pretrained_model_name_or_path", tiny_if_dirs[0], "--instance_data_dir",
                                       instance_dir, "--instance_prompt", "p", "--output_dir", tmp_path / "o", *extra],
                      message)
    assert not os.path.exists(tmp_path / "o")


def test_stage_ii_without_class_labels_and_if_flags_elsewhere_are_refused(capsys, tiny_if_dirs, tiny_pipeline_dir,
                                                                          instance_dir, tmp_path):
    import train_text_to_image as script

    common = ["--instance_data_dir", instance_dir, "--instance_prompt", "p", "--max_train_steps", "1"]
    expect_user_error(capsys, script, ["--pretrained_model_name_or_path", tiny_if_dirs[1], *common,
                                       "--output_dir", tmp_path / "a"], "--class_labels_conditioning timesteps")
    expect_user_error(capsys, script, ["--pretrained_model_name_or_path", tiny_if_dirs[1], *common,
                                       "--output_dir", tmp_path / "c", "--class_labels_conditioning", "timesteps",
                                       "--with_prior_preservation", "--class_data_dir", tmp_path / "class",
                                       "--class_prompt", "a thing", "--num_class_images", "2"],
                      "cannot draw more")
    expect_user_error(capsys, script, ["--pretrained_model_name_or_path", tiny_pipeline_dir, *common,
                                       "--output_dir", tmp_path / "b", "--class_labels_conditioning", "timesteps"],
                      "not a DeepFloyd IF pipeline")
    with open(os.path.join(tiny_if_dirs[1], "model_index.json"), encoding="utf-8") as handle:
        assert json.load(handle)["_class_name"] == "IFSuperResolutionPipeline"


def if_run(pipeline, instance, out, steps, extra=()):
    return ["--pretrained_model_name_or_path", pipeline, "--instance_data_dir", instance, "--instance_prompt",
            "a photo of sks thing", "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--output_dir", out, "--report_to", "none",
            "--seed", "0", "--class_labels_conditioning", "timesteps", "--logging_steps", "1", *extra]


@pytest.mark.slow
def test_stage_ii_resume_is_bitwise_and_cached_equals_uncached(tiny_if_dirs, instance_dir, tmp_path):
    """Stage II with prior preservation (its low-resolution input draws more noise): 4 steps straight = 2, then a
    resume to 4; the pixel "latent" cache and the T5 cache give the same losses as encoding every step."""
    from safetensors.torch import load_file

    import train_text_to_image as script
    from test_sd3 import logged_losses

    common = ["--with_prior_preservation", "--class_data_dir", instance_dir, "--class_prompt", "a photo",
              "--num_class_images", "2", "--checkpointing_steps", "2", "--random_flip"]
    stage_ii = tiny_if_dirs[1]
    run_main_in_process(script, if_run(stage_ii, instance_dir, tmp_path / "straight", 4, common))
    run_main_in_process(script, if_run(stage_ii, instance_dir, tmp_path / "stopped", 2, common))
    run_main_in_process(script, if_run(stage_ii, instance_dir, tmp_path / "stopped", 4,
                                       common + ["--resume_from_checkpoint", "latest"]))
    run_main_in_process(script, if_run(stage_ii, instance_dir, tmp_path / "cached", 4,
                                       common + ["--cache_latents", "--cache_text_embeddings"]))
    weights = "unet/diffusion_pytorch_model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "stopped" / weights)
    base = load_file(os.path.join(stage_ii, weights))
    assert any(not torch.equal(straight[k], base[k]) for k in base)  # it trained
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    plain, cached = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "cached")
    assert len(plain) == 4 and np.allclose(plain, cached, rtol=1e-5, atol=0), (plain, cached)


@pytest.mark.slow
def test_t5_lora_resumes_bitwise_and_loads_in_the_if_pipeline(tiny_if_dirs, instance_dir, tmp_path):
    """--use_lora --train_text_encoder on IF: the T5 LoRA (q, k, v, o) is stored under diffusers' lora_linear_layer
    names, which IFPipeline.load_lora_weights and our resume read (peft's names fail there for T5); 4 steps
    straight = 2 + a resume to 4, and the loaded T5 adapter holds the file's weights."""
    from diffusers import IFPipeline
    from safetensors.torch import load_file

    import train_text_to_image as script

    common = ["--use_lora", "--train_text_encoder", "--checkpointing_steps", "2"]
    stage_i = tiny_if_dirs[0]
    run_main_in_process(script, if_run(stage_i, instance_dir, tmp_path / "straight", 4, common))
    run_main_in_process(script, if_run(stage_i, instance_dir, tmp_path / "stopped", 2, common))
    run_main_in_process(script, if_run(stage_i, instance_dir, tmp_path / "stopped", 4,
                                       common + ["--resume_from_checkpoint", "latest"]))
    name = "pytorch_lora_weights.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / name), load_file(tmp_path / "stopped" / name)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    t5_keys = [k for k in straight if k.startswith("text_encoder.")]
    assert t5_keys and all("lora_linear_layer" in k for k in t5_keys)

    pipe = IFPipeline.from_pretrained(stage_i)
    pipe.load_lora_weights(str(tmp_path / "straight"))
    loaded = pipe.text_encoder.state_dict()
    key = next(k for k in t5_keys if k.endswith("SelfAttention.q.lora_linear_layer.up.weight"))
    peft_name = key[len("text_encoder."):].replace("lora_linear_layer.up.weight", "lora_B.default_0.weight")
    assert torch.equal(loaded[peft_name], straight[key])
