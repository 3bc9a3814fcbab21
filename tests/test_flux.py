"""FLUX.1 in train_text_to_image.py (utils/families/flux.py on utils/families/flow_matching.py): diffusers' CLI and its
own example tests (examples/dreambooth/test_dreambooth_lora_flux.py, test_dreambooth_flux.py) with the tiny pipeline
built offline, the loss against diffusers' script lines, a model we train denoising in FluxPipeline, exact resume,
cached = uncached, generate.py, bad input. (The pieces FLUX shares with SD3 are checked in tests/test_sd3.py.)"""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import accelerate_launch, overfit_one_image_psnr, parse_and_list_flags, run_main_in_process
from PIL import Image
from test_sd3 import expect_generate_error, logged_losses, lora_state, sd3_args
from test_user_errors import expect_user_error

from utils.optim import OPTIMIZERS

SCRIPT = "train_text_to_image.py"

# Every flag of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py and train_dreambooth_flux.py
# (diffusers main, 2026-12, commit 58eb52c0), by name.
FLUX_FLAGS = """
--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --adam_weight_decay_text_encoder --allow_tf32
--cache_dir --cache_latents --caption_column --center_crop --checkpointing_steps --checkpoints_total_limit
--class_data_dir --class_prompt --dataloader_num_workers --dataset_config_name --dataset_name
--enable_npu_flash_attention --gradient_accumulation_steps --gradient_checkpointing --guidance_scale
--hub_model_id --hub_token --image_column --image_interpolation_mode --instance_data_dir --instance_prompt
--learning_rate --local_rank --logging_dir --logit_mean --logit_std --lora_alpha --lora_dropout --lora_layers
--lr_num_cycles --lr_power --lr_scheduler --lr_warmup_steps --max_grad_norm --max_sequence_length
--max_train_steps --mixed_precision --mode_scale --num_class_images --num_train_epochs
--num_validation_images --optimizer --output_dir --pretrained_model_name_or_path --prior_generation_precision
--prior_loss_weight --prodigy_beta3 --prodigy_decouple --prodigy_safeguard_warmup
--prodigy_use_bias_correction --push_to_hub --random_flip --rank --repeats --report_to --resolution
--resume_from_checkpoint --revision --sample_batch_size --scale_lr --seed --text_encoder_lr
--train_batch_size --train_text_encoder --upcast_before_saving --use_8bit_adam --validation_epochs
--validation_prompt --variant --weighting_scheme --with_prior_preservation
""".split()


def flux_args(pipeline, instance, out, steps=2, extra=()):
    return sd3_args(pipeline, instance, out, steps, ["--max_sequence_length", "16", *extra])


def test_every_diffusers_flux_flag_is_accepted_with_its_default(tiny_flux_pipeline_dir):
    import train_text_to_image as script

    base = ["--pretrained_model_name_or_path", tiny_flux_pipeline_dir, "--instance_data_dir", "x",
            "--instance_prompt", "p"]
    args, flags = parse_and_list_flags(script.parse_args, base + ["--use_lora"])
    missing = [flag for flag in FLUX_FLAGS if flag not in flags]
    assert not missing, f"flags of diffusers' FLUX DreamBooth scripts we do not accept: {missing}"
    assert args.family == "flux"
    assert (args.weighting_scheme, args.guidance_scale, args.max_sequence_length, args.precondition_outputs) == \
        ("none", 3.5, 512, 0)
    assert (args.output_dir, args.learning_rate, args.train_batch_size, args.rank, args.tracker_project_name) == \
        ("flux-dreambooth-lora", 1e-4, 4, 4, "dreambooth-flux-dev-lora")
    full = script.parse_args(base)  # train_dreambooth_flux.py: 77 T5 tokens
    assert (full.output_dir, full.max_sequence_length) == ("flux-dreambooth", 77)


# diffusers' examples/dreambooth/test_dreambooth_lora_flux.py, their Hub pipeline replaced by the tiny local one,
# docs/source/en/imgs by 5 images, --resolution 64 by 32.
@pytest.mark.parametrize("extra, prefixes", [
    ([], ("transformer",)),
    (["--train_text_encoder"], ("transformer", "text_encoder")),
    (["--cache_latents"], ("transformer",)),
    (["--cache_latents", "--lora_layers", "single_transformer_blocks.0.attn.to_k"],
     ("transformer.single_transformer_blocks.0.attn.to_k",)),
], ids=["lora", "text_encoder", "latent_caching", "layers"])
def test_diffusers_dreambooth_lora_flux(tiny_flux_pipeline_dir, instance_dir, tmp_path, extra, prefixes):
    accelerate_launch(SCRIPT, ["--pretrained_model_name_or_path", tiny_flux_pipeline_dir, "--instance_data_dir",
                               instance_dir, "--instance_prompt", "photo", "--resolution", "32", "--train_batch_size",
                               "1", "--gradient_accumulation_steps", "1", "--max_train_steps", "2", "--learning_rate",
                               "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                               "--output_dir", tmp_path, "--use_lora", *extra])
    state = lora_state(tmp_path)
    assert state and all("lora" in key for key in state) and all(key.startswith(prefixes) for key in state)
    if "--train_text_encoder" in extra:  # CLIP got adapters (T5 stays frozen, as diffusers')
        assert {key.split(".")[0] for key in state} == {"transformer", "text_encoder"}


def test_diffusers_dreambooth_lora_flux_metadata_and_total_limit(tiny_flux_pipeline_dir, instance_dir,
                                                                 tmp_path):
    """test_dreambooth_lora_with_metadata (lora_alpha 8, rank 4 in the file's adapter metadata) and
    test_dreambooth_lora_flux_checkpointing_checkpoints_total_limit(_removes_multiple_checkpoints)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    common = [f"--pretrained_model_name_or_path={tiny_flux_pipeline_dir}", f"--instance_data_dir={instance_dir}",
              f"--output_dir={tmp_path}", "--instance_prompt=photo", "--resolution=32", "--train_batch_size=1",
              "--gradient_accumulation_steps=1", "--checkpointing_steps=2", "--use_lora", "--lora_alpha=8", "--rank=4"]
    accelerate_launch(SCRIPT, common + ["--max_train_steps=4"])
    with safetensors.torch.safe_open(tmp_path / "pytorch_lora_weights.safetensors", framework="pt") as handle:
        raw = json.loads(handle.metadata()[LORA_ADAPTER_METADATA_KEY])
    assert (raw["transformer.lora_alpha"], raw["transformer.r"]) == (8, 4)
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-2", "checkpoint-4"}
    accelerate_launch(SCRIPT, common + ["--max_train_steps=8", "--resume_from_checkpoint=checkpoint-4",
                                        "--checkpoints_total_limit=2"])
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-6", "checkpoint-8"}


# diffusers' examples/dreambooth/test_dreambooth_flux.py (the full fine-tune), in process.
def test_diffusers_dreambooth_flux_and_checkpointing(tiny_flux_pipeline_dir, instance_dir, tmp_path):
    import train_text_to_image as script
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    common = ["--pretrained_model_name_or_path", tiny_flux_pipeline_dir, "--instance_data_dir", instance_dir,
              "--instance_prompt", "photo", "--resolution", "32", "--train_batch_size", "1", "--learning_rate",
              "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--output_dir",
              tmp_path, "--checkpointing_steps=2", "--seed=0", "--report_to", "none"]
    run_main_in_process(script, common + ["--max_train_steps", "4"])
    assert os.path.isfile(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(tmp_path / "scheduler" / "scheduler_config.json")
    call = dict(num_inference_steps=1, height=32, width=32, max_sequence_length=16)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe).__name__ == "FluxPipeline"
    pipe("photo", **call)
    transformer = FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="checkpoint-2/transformer")
    DiffusionPipeline.from_pretrained(tiny_flux_pipeline_dir, transformer=transformer)("photo", **call)
    shutil.rmtree(tmp_path / "checkpoint-2")
    run_main_in_process(script, common + ["--max_train_steps", "6", "--resume_from_checkpoint=checkpoint-4"])
    assert not os.path.isdir(tmp_path / "checkpoint-2")
    assert os.path.isdir(tmp_path / "checkpoint-4") and os.path.isdir(tmp_path / "checkpoint-6")


@pytest.mark.parametrize("scheme", ["none", "logit_normal"])
def test_training_loss_is_diffusers_flux_loss(tiny_flux_pipeline_dir, scheme):
    """The family's loss of a batch = the loss diffusers' train_dreambooth_lora_flux.py computes (packing, ids,
    timestep / 1000, guidance, unpacking, target noise - x), recomputed here from its lines with the same draws."""
    import types

    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from utils.families.flux import Flux
    from utils.telemetry import HealthMonitor

    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline_dir)
    models = dict(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                  text_encoder_2=pipe.text_encoder_2, noise_scheduler=pipe.scheduler)
    args = types.SimpleNamespace(weighting_scheme=scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                 precondition_outputs=0, max_sequence_length=12, guidance_scale=3.5,
                                 save_single_file=False, lora_format="diffusers", with_prior_preservation=False, offload=False,
                                 instance_data_dir=None, train_text_encoder=False)
    family = Flux()
    family.configure(args)
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 1, 16, 16, generator=generator)
    clip = pipe.tokenizer("a photo", padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids[0]
    t5 = pipe.tokenizer_2("a photo", padding="max_length", max_length=12, truncation=True,
                          return_tensors="pt").input_ids[0]
    ids = torch.stack([clip, torch.nn.functional.pad(t5, (0, 77 - 12))])[None].repeat(2, 1, 1)  # the dataset's
    torch.manual_seed(0)
    loss = family.training_loss(args, models, {"latent_mean": mean, "latent_std": torch.zeros_like(mean),
                                               "input_ids": ids}, HealthMonitor())

    torch.manual_seed(0)
    model_input = ((mean + 0 * torch.randn(mean.shape)) - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt("a photo", "a photo", max_sequence_length=12)
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
    noise = torch.randn_like(model_input)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=2, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29)
    timesteps = pipe.scheduler.timesteps[(u * 1000).long()]
    sigmas = pipe.scheduler.sigmas[[(pipe.scheduler.timesteps == t).nonzero().item() for t in timesteps]]
    sigmas = sigmas.view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy_model_input, 2, 1, 16, 16)
    model_pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.tensor([3.5]).expand(2),
                                  pooled_projections=pooled.repeat(2, 1), encoder_hidden_states=prompt_embeds.repeat(2, 1, 1),
                                  txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
    model_pred = FluxPipeline._unpack_latents(model_pred, height=16, width=16, vae_scale_factor=1)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = noise - model_input
    expected = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(2, -1), 1).mean()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss.item(), expected.item())


@pytest.mark.slow
def test_a_model_we_train_denoises_in_the_diffusers_pipeline(tmp_path):
    """1-image overfit with FLUX's own objective (velocity, uniform sigmas, guidance 1 as sampled): through
    FluxPipeline, PSNR >= 20 dB (conftest.overfit_one_image_psnr). The test pipeline has 16 latent channels (64
    per packed token) and an 8-head transformer (the tiny one's 32-wide stream cannot carry a 64-value token)."""
    from diffusers import FluxPipeline

    from utils.families.flux import build_tiny_flux_pipeline

    psnr = overfit_one_image_psnr(
        tmp_path, lambda path: build_tiny_flux_pipeline(path, ["a red square"],
                                                        transformer_config=dict(in_channels=64, num_attention_heads=8),
                                                        vae_config=dict(latent_channels=16, block_out_channels=(16,))),
        FluxPipeline, ["--max_train_steps", "300", "--guidance_scale", "1", "--max_sequence_length", "16"],
        dict(max_sequence_length=16))
    assert psnr >= 20.0, psnr


def test_resume_is_bitwise_and_cached_equals_uncached(tiny_flux_pipeline_dir, instance_dir, tmp_path):
    import train_text_to_image as script

    extra = ["--use_lora", "--train_text_encoder", "--checkpointing_steps", "2", "--logging_steps", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_main_in_process(script, flux_args(tiny_flux_pipeline_dir, instance_dir, straight, 4, extra))
    run_main_in_process(script, flux_args(tiny_flux_pipeline_dir, instance_dir, split, 2, extra))
    run_main_in_process(script, flux_args(tiny_flux_pipeline_dir, instance_dir, split, 4,
                                          extra + ["--resume_from_checkpoint", "latest"]))
    first, second = lora_state(straight), lora_state(split)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    common = ["--use_lora", "--logging_steps", "1", "--center_crop"]
    run_main_in_process(script, flux_args(tiny_flux_pipeline_dir, instance_dir, tmp_path / "plain", 3, common))
    run_main_in_process(script, flux_args(tiny_flux_pipeline_dir, instance_dir, tmp_path / "cached", 3,
                                          common + ["--cache_latents", "--cache_text_embeddings"]))
    losses = [logged_losses(tmp_path / run) for run in ("plain", "cached")]
    assert len(losses[0]) == 3 and np.allclose(losses[0], losses[1], rtol=1e-5, atol=0), losses


def test_generate_samples_a_flux_lora_as_diffusers_does(tiny_flux_pipeline_dir, instance_dir, tmp_path,
                                                        capsys, tiny_sd3_pipeline_dir):
    import generate
    import train_text_to_image as script
    from diffusers import FluxPipeline

    out = tmp_path / "lora"
    run_main_in_process(script, flux_args(tiny_flux_pipeline_dir, instance_dir, out, 2,
                                          ["--use_lora", "--learning_rate", "1e-2"]))
    common = ["--prompt", "photo", "--steps", "3", "--seed", "4", "--num_images", "1", "--height", "32", "--width",
              "32"]
    paths = generate.main(["--model", tiny_flux_pipeline_dir, "--lora", str(out), *common, "--output_dir",
                           str(tmp_path / "g")])
    ours = np.asarray(Image.open(paths[0]), dtype=np.int16)
    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline_dir)
    pipe.load_lora_weights(str(out))
    theirs = pipe("photo", num_inference_steps=3, height=32, width=32,
                  generator=[torch.Generator("cpu").manual_seed(4)]).images[0]  # (guidance: the pipeline's 3.5)
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    expect_generate_error(capsys, ["--model", tiny_sd3_pipeline_dir, "--lora", out, *common, "--output_dir",
                                   tmp_path / "x"], "flux-1/lora", "SD3")


@pytest.mark.parametrize("extra, fragments", [
    (["--prediction_type", "v_prediction"], ["--prediction_type v_prediction", "flow velocity"]),
    (["--lora_blocks", "0"], ["--lora_blocks", "--lora_layers"]),
    (["--max_sequence_length", "600"], ["--max_sequence_length 600", "512"]),
], ids=["v_prediction", "lora_blocks", "sequence_length"])
def test_bad_flux_flags_are_one_block_errors(capsys, tiny_flux_pipeline_dir, instance_dir, tmp_path,
                                             extra, fragments):
    import train_text_to_image as script

    expect_user_error(capsys, script, sd3_args(tiny_flux_pipeline_dir, instance_dir, tmp_path / "o", 1, extra),
                      *fragments)


def test_a_flux_pipeline_without_t5_is_refused(capsys, tiny_flux_pipeline_dir, instance_dir, tmp_path):
    import train_text_to_image as script

    broken = tmp_path / "no-t5"
    shutil.copytree(tiny_flux_pipeline_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(broken / "text_encoder_2")
    expect_user_error(capsys, script, sd3_args(str(broken), instance_dir, tmp_path / "o", 1), "without text_encoder_2",
                      "T5")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_a_transformer_family_and_resumes_bitwise(name, tiny_flux_pipeline_dir, instance_dir,
                                                                          tmp_path):
    """The families share the trainer's optimizers: on the tiny FLUX pipeline, full fine-tune with EMA, 3 steps ==
    2 steps + resume, bit for bit, for each --optimizer; the transformer changed."""
    import train_text_to_image as script
    from safetensors.torch import load_file
    from test_optimizers import LR, straight_and_resumed

    def args(out, steps):
        return flux_args(tiny_flux_pipeline_dir, instance_dir, out, steps,
                         ["--checkpointing_steps", "1", "--lr_scheduler", "constant", "--learning_rate",
                          LR.get(name, "1e-4"), "--optimizer", name, "--use_ema", "--skip_preflight"])

    straight, resumed = straight_and_resumed(script, args, tmp_path)
    final = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(straight / final), load_file(resumed / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(os.path.join(tiny_flux_pipeline_dir, final))
    assert any(not torch.equal(a[k], before[k]) for k in a), "the optimizer changed nothing"


# ---------------------------------------------------------------------------------------------- kohya's LoRA layout

def lora_delta(down, up, scale):
    return up.double() @ down.double() * scale


def test_kohya_layout_is_what_diffusers_kohya_converter_reads_at_flux1_shapes():
    """utils/families/flux_kohya.py against diffusers' own reader of sd-scripts' FLUX LoRAs
    (_convert_kohya_flux_lora_to_diffusers, which FluxPipeline.load_lora_weights calls and which fixes FLUX.1's widths:
    3072, MLP 12288): every module's LoRA delta (B @ A x alpha/r) comes back exactly, for fused groups with all
    members (single block linear1 = q, k, v + MLP), some members (txt qkv without k), one member, and the final
    layer (whose scale the converter does not apply: baked in); CLIP's adapters as lora_te1_."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from utils.families.flux_kohya import flux_kohya_state_dict

    generator = torch.Generator().manual_seed(0)
    width, rank, scale = 3072, 4, 8 / 4
    shapes = {"transformer_blocks.3.attn.to_q": (width, width), "transformer_blocks.3.attn.to_k": (width, width),
              "transformer_blocks.3.attn.to_v": (width, width), "transformer_blocks.3.attn.add_q_proj": (width, width),
              "transformer_blocks.3.attn.add_v_proj": (width, width), "transformer_blocks.3.attn.to_out.0": (width, width),
              "transformer_blocks.3.ff_context.net.2": (4 * width, width), "transformer_blocks.3.norm1.linear": (width, 6 * width),
              "single_transformer_blocks.7.attn.to_q": (width, width), "single_transformer_blocks.7.attn.to_k": (width, width),
              "single_transformer_blocks.7.attn.to_v": (width, width), "single_transformer_blocks.7.proj_mlp": (width, 4 * width),
              "single_transformer_blocks.8.attn.to_q": (width, width), "single_transformer_blocks.8.proj_out": (5 * width, width),
              "norm_out.linear": (width, 2 * width), "proj_out": (width, 64), "x_embedder": (64, width)}
    state = {}
    for module, (inputs, outputs) in shapes.items():
        state[f"{module}.lora_A.weight"] = torch.randn(rank, inputs, generator=generator) / 10
        state[f"{module}.lora_B.weight"] = torch.randn(outputs, rank, generator=generator) / 10
    clip = {"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(rank, 32, generator=generator),
            "text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, rank, generator=generator)}
    kohya = flux_kohya_state_dict(state, scale, clip, text_encoder_alpha=16.0)
    assert "lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight" in kohya and "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    assert kohya["lora_unet_single_blocks_7_linear1.lora_up.weight"].shape == (7 * width, 4 * rank)

    expected_clip = lora_delta(*clip.values(), 16.0 / rank)
    back = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in kohya.items()})  # (it scales in place)
    for module in shapes:
        key = f"transformer.{module}" if f"transformer.{module}.lora_A.weight" in back else module  # (final layer)
        expected = lora_delta(state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"], scale)
        got = lora_delta(back[f"{key}.lora_A.weight"], back[f"{key}.lora_B.weight"], 1.0)  # (kohya scale baked in)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9), module
    te = {k: v for k, v in back.items() if k.startswith("text_encoder.")}
    assert sorted(te) == ["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight",
                          "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight"]  # (its old names)
    down, up = te["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight"], \
        te["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight"]
    assert torch.allclose(lora_delta(down, up, 1.0), expected_clip, rtol=1e-6)


def test_a_trained_flux_lora_is_written_in_both_layouts(tiny_flux_pipeline_dir, instance_dir, tmp_path):
    """--lora_format both (the default): the kohya file holds the same adapters as diffusers' file, module by module
    (decoded here from its fused blocks), with sd-scripts' FLUX metadata; --lora_format kohya writes only it."""
    import train_text_to_image as script
    from diffusers import FluxPipeline

    from utils.families.flux_kohya import kohya_module

    out = tmp_path / "both"
    layers = "attn.to_q,attn.to_k,attn.to_v,proj_mlp,attn.add_q_proj,ff.net.0.proj,norm1.linear"
    run_main_in_process(script, flux_args(tiny_flux_pipeline_dir, instance_dir, out, 1, [
        "--use_lora", "--train_text_encoder", "--rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--lora_layers", layers]))
    diffusers_state = FluxPipeline.lora_state_dict(str(out))
    diffusers_state = diffusers_state[0] if isinstance(diffusers_state, tuple) else diffusers_state
    kohya = safetensors.torch.load_file(out / "pytorch_lora_weights_kohya.safetensors")
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in diffusers_state
                      if k.startswith("transformer.") and "lora_A" in k})
    assert any("single_transformer_blocks" in m and m.endswith("proj_mlp") for m in modules)
    for module in modules:
        down_a, up_b = (diffusers_state[f"transformer.{module}.lora_{x}.weight"] for x in "AB")
        name, position, size = kohya_module(module)
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        rows = {1: [up.shape[0]], 3: [up.shape[0] // 3] * 3, 4: [up.shape[0] // 7] * 3 + [4 * up.shape[0] // 7]}[size]
        start, rank = sum(rows[:position]), down.shape[0] // size
        block_up = up[start:start + rows[position], position * rank:(position + 1) * rank]
        block_down = down[position * rank:(position + 1) * rank]
        scale = kohya[f"{name}.alpha"].item() / down.shape[0]
        assert torch.allclose(lora_delta(block_down, block_up, scale), lora_delta(down_a, up_b, 8 / 4), atol=1e-7), module
        others = torch.cat([up[start:start + rows[position], :position * rank],
                            up[start:start + rows[position], (position + 1) * rank:]], dim=1)
        assert not others.any(), f"{module}: off-diagonal blocks must be zero"
    te_modules = {k.rsplit(".lora_", 1)[0] for k in diffusers_state if k.startswith("text_encoder.") and "lora_A" in k}
    assert te_modules and len(te_modules) == len({k.split(".")[0] for k in kohya if k.startswith("lora_te1_")})
    with safetensors.safe_open(out / "pytorch_lora_weights_kohya.safetensors", "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_network_dim"] == "4"
    assert metadata["modelspec.architecture"] == "flux-1/lora" and float(metadata["ss_network_alpha"]) == 8

    only = tmp_path / "kohya"
    run_main_in_process(script, flux_args(tiny_flux_pipeline_dir, instance_dir, only, 1,
                                          ["--use_lora", "--lora_format", "kohya"]))
    assert (only / "pytorch_lora_weights_kohya.safetensors").is_file()
    assert not (only / "pytorch_lora_weights.safetensors").exists()


FLUX_WIDTH_CONFIG = dict(attention_head_dim=128, num_attention_heads=24, axes_dims_rope=[16, 56, 56])


@pytest.fixture(scope="module")
def flux_3072_pipeline_dir(tmp_path_factory):
    """The tiny FLUX pipeline with FLUX.1's own transformer width (24 heads x 128 = 3072; one double and one single
    block, 530M parameters): the width BFL's single-file layout, diffusers' converter and ComfyUI assume."""
    from utils.families.flux import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(str(tmp_path_factory.mktemp("flux-3072")), transformer_config=FLUX_WIDTH_CONFIG)


@pytest.mark.slow
def test_single_file_flux_round_trips_through_diffusers_and_trains_like_its_folder(flux_3072_pipeline_dir,
                                                                                   instance_dir, tmp_path):
    """--save_single_file writes the transformer in Black Forest Labs' layout (double_blocks.*, single_blocks.*, no
    prefix: flux1-dev.safetensors'); diffusers' FluxTransformer2DModel.from_single_file reads back the very weights
    the run saved in its pipeline folder. A base model as that file (--model_config for the rest) trains exactly like
    its folder, and generate.py samples from a file."""
    from diffusers import FluxTransformer2DModel

    from utils.families.flux_single_file import save_flux_single_file

    base = tmp_path / "base.safetensors"
    save_flux_single_file(str(base), FluxTransformer2DModel.from_pretrained(flux_3072_pipeline_dir,
                                                                            subfolder="transformer"), "fp32")
    assert_single_file_trains_like_its_folder(flux_args, flux_3072_pipeline_dir, base, instance_dir, tmp_path,
                                              FluxTransformer2DModel, {"double_blocks.0.img_attn.qkv.weight",
                                                                       "single_blocks.0.linear1.weight", "img_in.weight"})


@pytest.mark.slow
def test_kohya_file_gives_the_diffusers_files_images_at_flux1_width(flux_3072_pipeline_dir, tmp_path):
    """A LoRA on FLUX.1's width (fused q/k/v and single-block linear1 members, single-block linear2, the
    modulations) written by the family in both layouts: FluxPipeline.load_lora_weights of the kohya file (diffusers'
    kohya converter) samples the same images as of diffusers' file, and both differ from the base model's. (Not the
    final layer: diffusers' converter names its keys without the transformer prefix and the pipeline drops them,
    found here; the file holds them as sd-scripts and ComfyUI read them, tested against the converter's own output
    above, and the run's log says so.)"""
    from diffusers import FluxPipeline

    from utils.families.flux import Flux

    assert_both_layouts_sample_alike(FluxPipeline, flux_3072_pipeline_dir, Flux(), [
        "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "attn.add_q_proj", "ff.net.0.proj", "norm1.linear",
        "norm.linear", "single_transformer_blocks.0.proj_out"], tmp_path, max_sequence_length=16)


def assert_both_layouts_sample_alike(pipeline_class, pipeline_dir, family, targets, tmp_path, **call) -> None:
    """A random LoRA (r 4, alpha 8, non-zero B) on `targets` of the pipeline's transformer, saved by `family` with
    --lora_format both: the pipeline's load_lora_weights of the other layout's file samples the same images as of
    diffusers' file (2 steps, 16 px, one seed), and those differ from the base model's."""
    from peft import LoraConfig

    pipe = pipeline_class.from_pretrained(pipeline_dir)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    out = tmp_path / "lora"
    family.save_lora(str(out), pipe.transformer, {}, lora_format="both")
    del pipe

    def images(weight_name):
        pipeline = pipeline_class.from_pretrained(pipeline_dir)
        if weight_name:
            pipeline.load_lora_weights(str(out), weight_name=weight_name)
        return pipeline("photo", height=16, width=16, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                        output_type="pt", **call).images

    diffusers_images, other_images = images("pytorch_lora_weights.safetensors"), \
        images("pytorch_lora_weights_kohya.safetensors")
    assert torch.allclose(diffusers_images, other_images, atol=1e-5)
    assert (diffusers_images - images(None)).abs().max() > 1e-3


def assert_single_file_trains_like_its_folder(args_of, pipeline, base, instance_dir, tmp_path, model_class,
                                              original_keys: set) -> None:
    """A 1-step full fine-tune from `pipeline` with --save_single_file and one from `base` (its transformer as a
    single file) with --model_config `pipeline` save the same transformer bit for bit (and it trained); the written
    file holds `original_keys` and reads back through diffusers' `model_class.from_single_file` to the saved
    weights; generate.py samples from it (with --model_config)."""
    import train_text_to_image as script

    import generate

    full = ["--optimizer", "adafactor", "--learning_rate", "1e-3", "--resolution", "16"]
    from_folder, from_file = tmp_path / "from_folder", tmp_path / "from_file"
    run_main_in_process(script, args_of(pipeline, instance_dir, from_folder, 1,
                                        [*full, "--save_single_file", "--single_file_dtype", "fp32"]))
    run_main_in_process(script, args_of(str(base), instance_dir, from_file, 1, [*full, "--model_config", pipeline]))
    name = "transformer/diffusion_pytorch_model.safetensors"
    first, second = (safetensors.torch.load_file(root / name) for root in (from_folder, from_file))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    before = safetensors.torch.load_file(os.path.join(pipeline, name))
    assert any(not torch.equal(before[k], first[k]) for k in first)  # (it trained)
    del second, before

    single = from_folder / "model.safetensors"
    assert original_keys <= set(safetensors.torch.load_file(single).keys())
    loaded = model_class.from_single_file(str(single), config=str(from_folder), subfolder="transformer").state_dict()
    assert first.keys() == loaded.keys() and all(torch.equal(first[k], loaded[k]) for k in first)
    del first, loaded
    paths = generate.main(["--model", str(single), "--model_config", str(from_folder), "--prompt", "photo",
                           "--steps", "1", "--height", "16", "--width", "16", "--num_images", "1",
                           "--output_dir", str(tmp_path / "images"), "--seed", "0"])
    assert len(paths) >= 1


def test_single_files_of_another_width_are_refused_in_one_block(capsys, tiny_flux_pipeline_dir, instance_dir,
                                                                tmp_path):
    """FLUX.1's single-file layout exists at its own width only (diffusers' converter and ComfyUI assume 3072):
    --save_single_file on the tiny model is refused before training, and a narrower file as a base model is named."""
    import train_text_to_image as script

    out = tmp_path / "o"
    expect_user_error(capsys, script, flux_args(tiny_flux_pipeline_dir, instance_dir, out, 1, ["--save_single_file"]),
                      "--save_single_file", "3072-wide transformer", "32 wide")
    assert not (out / "transformer").exists() and not list(out.glob("checkpoint-*"))
    narrow = tmp_path / "narrow.safetensors"
    safetensors.torch.save_file({"img_in.weight": torch.zeros(32, 4),
                                 "double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32)}, str(narrow))
    expect_user_error(capsys, script, flux_args(str(narrow), instance_dir, tmp_path / "n", 1,
                                                ["--model_config", tiny_flux_pipeline_dir]),
                      "a 32-wide FLUX transformer", "3072-wide ones only")


def test_bucket_tokens_are_the_packed_sequence_lengths(tiny_flux_pipeline_dir, tmp_path, monkeypatch):
    """FLUX packs 2x2 latent patches into one token: buckets.json's tokens per bucket (and the pixels per token,
    VAE x 2) are the sequence lengths of the packed latents the transformer was given (recorded by a wrapper around
    its forward), within the stated budget."""
    import train_text_to_image as script
    from diffusers import FluxTransformer2DModel

    seen, forward = [], FluxTransformer2DModel.forward

    def recording(self, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(kwargs["hidden_states"].shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", recording)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(32, 48), (48, 32), (32, 32), (32, 32)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(f"thing {index}")
    out = tmp_path / "o"
    run_main_in_process(script, ["--pretrained_model_name_or_path", tiny_flux_pipeline_dir, "--train_data_dir", data,
                                 "--resolution", "32", "--max_train_steps", "3", "--use_lora", "--report_to", "none",
                                 "--max_sequence_length", "16", "--train_batch_size", "2", "--enable_bucket",
                                 "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8",
                                 "--output_dir", out])
    buckets = json.load(open(out / "buckets.json"))
    tokens = buckets["tokens_per_bucket"]
    assert buckets["pixels_per_token"] == 2 and len(tokens) == 3  # (the tiny VAE does not downsample: 1 x 2)
    assert sorted(seen) == sorted(tokens[bucket] for bucket, count in buckets["buckets"].items()
                                  for _ in range(-(-count // 2)))  # (one epoch: a bucket's batches of 2)
    assert max(tokens.values()) <= buckets["token_budget"] == 32 * 32 // 4


def test_a_final_layer_lora_in_the_kohya_file_is_warned_about(tiny_flux_pipeline_dir, tmp_path, caplog):
    """diffusers' FluxPipeline.load_lora_weights drops a kohya file's final-layer LoRA (found in
    test_kohya_file_gives_the_diffusers_files_images_at_flux1_width): the writer says so when its file holds one, and
    only then."""
    import logging

    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from utils.families.flux import save_flux_kohya_lora

    for targets, warned in ((["norm_out.linear", "attn.to_q"], True), (["attn.to_q"], False)):
        transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_pipeline_dir, subfolder="transformer")
        transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
        directory = tmp_path / str(warned)
        directory.mkdir()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            path = save_flux_kohya_lora(str(directory), transformer, None, None, None)
        keys = safetensors.torch.load_file(path).keys()
        assert any(k.startswith("lora_unet_final_layer_adaLN_modulation_1") for k in keys) == warned
        assert ("drops it from kohya files" in caplog.text) == warned
