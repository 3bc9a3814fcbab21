"""Lumina-Image-2.0 in train_text_to_image.py (utils/families/lumina2.py on utils/families/flow_matching.py):
diffusers' CLI and its own example test (examples/dreambooth/test_dreambooth_lora_lumina2.py) with the tiny pipeline
built offline, the loss against diffusers' script lines, a model we train denoising in Lumina2Pipeline, exact
resume, cached = uncached (the prompt's mask cached too), generate.py, bad input."""

import os

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import accelerate_launch, overfit_one_image_psnr, parse_and_list_flags, run_main_in_process
from PIL import Image
from test_sd3 import expect_generate_error, logged_losses, lora_state, sd3_args
from test_user_errors import expect_user_error

SCRIPT = "train_text_to_image.py"

# Every flag of diffusers' examples/dreambooth/train_dreambooth_lora_lumina2.py (main, 2026-12, commit 58eb52c0).
LUMINA2_FLAGS = """
--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --allow_tf32 --cache_dir --cache_latents
--caption_column --center_crop --checkpointing_steps --checkpoints_total_limit --class_data_dir --class_prompt
--dataloader_num_workers --dataset_config_name --dataset_name --final_validation_prompt --gradient_accumulation_steps
--gradient_checkpointing --hub_model_id --hub_token --image_column --image_interpolation_mode --instance_data_dir
--instance_prompt --learning_rate --local_rank --logging_dir --logit_mean --logit_std --lora_dropout --lora_layers
--lr_num_cycles --lr_power --lr_scheduler --lr_warmup_steps --max_grad_norm --max_sequence_length --max_train_steps
--mixed_precision --mode_scale --num_class_images --num_train_epochs --num_validation_images --offload --optimizer
--output_dir --pretrained_model_name_or_path --prior_loss_weight --prodigy_beta3 --prodigy_decouple
--prodigy_safeguard_warmup --prodigy_use_bias_correction --push_to_hub --random_flip --rank --repeats --report_to
--resolution --resume_from_checkpoint --revision --sample_batch_size --scale_lr --seed --system_prompt
--train_batch_size --upcast_before_saving --use_8bit_adam --validation_epochs --validation_prompt --variant
--weighting_scheme --with_prior_preservation
""".split()


@pytest.fixture(scope="module")
def tiny_lumina2_pipeline_dir(tmp_path_factory):
    from utils.families.lumina2 import build_tiny_lumina2_pipeline

    return build_tiny_lumina2_pipeline(str(tmp_path_factory.mktemp("tiny-lumina2")), ["photo", "a picture"])


def lumina_args(pipeline, instance, out, steps=2, extra=()):
    return sd3_args(pipeline, instance, out, steps, ["--max_sequence_length", "64", *extra])


def test_every_diffusers_lumina2_flag_is_accepted_with_its_default(tiny_lumina2_pipeline_dir):
    import train_text_to_image as script

    from utils.families.lumina2 import DEFAULT_SYSTEM_PROMPT

    base = ["--pretrained_model_name_or_path", tiny_lumina2_pipeline_dir, "--instance_data_dir", "x",
            "--instance_prompt", "p", "--use_lora"]
    args, flags = parse_and_list_flags(script.parse_args, base)
    missing = [flag for flag in LUMINA2_FLAGS if flag not in flags]
    assert not missing, f"flags of diffusers' Lumina-2 DreamBooth script we do not accept: {missing}"
    assert args.family == "lumina2"
    assert (args.weighting_scheme, args.max_sequence_length, args.system_prompt, args.offload) == \
        ("none", 256, DEFAULT_SYSTEM_PROMPT, False)
    assert (args.output_dir, args.learning_rate, args.train_batch_size, args.tracker_project_name) == \
        ("lumina2-dreambooth-lora", 1e-4, 4, "dreambooth-lumina2-lora")
    assert args.text_encoder_use_attention_mask  # Gemma and the transformer read the prompt's padding mask


# diffusers' examples/dreambooth/test_dreambooth_lora_lumina2.py, their Hub pipeline replaced by the tiny local one
# and docs/source/en/imgs by 5 images (the same --resolution 32, --max_sequence_length 16, empty instance prompt).
@pytest.mark.parametrize("extra, contains", [([], "transformer"), (["--cache_latents"], "transformer"),
                                             (["--cache_latents", "--lora_layers", "layers.0.attn.to_k"],
                                              "layers.0.attn.to_k")], ids=["lora", "latent_caching", "layers"])
def test_diffusers_dreambooth_lora_lumina2(tiny_lumina2_pipeline_dir, instance_dir, tmp_path, extra,
                                           contains):
    accelerate_launch(SCRIPT, ["--pretrained_model_name_or_path", tiny_lumina2_pipeline_dir, "--instance_data_dir",
                               instance_dir, "--resolution", "32", "--train_batch_size", "1",
                               "--gradient_accumulation_steps", "1", "--max_train_steps", "2", "--learning_rate",
                               "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                               "--output_dir", tmp_path, "--max_sequence_length", "16", "--instance_prompt", "",
                               "--use_lora", *extra])
    state = lora_state(tmp_path)
    assert state and all("lora" in key for key in state)
    assert all(key.startswith("transformer") and contains in key for key in state)


def test_diffusers_dreambooth_lora_lumina2_checkpoints_total_limit(tiny_lumina2_pipeline_dir, instance_dir,
                                                                   tmp_path):
    import train_text_to_image as script

    common = lumina_args(tiny_lumina2_pipeline_dir, instance_dir, tmp_path, extra=["--use_lora",
                                                                                   "--checkpointing_steps", "2"])
    run_main_in_process(script, common + ["--max_train_steps", "6", "--checkpoints_total_limit", "2"])
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-4", "checkpoint-6"}


def test_training_loss_is_diffusers_lumina2_loss(tiny_lumina2_pipeline_dir):
    """The family's loss = diffusers' train_dreambooth_lora_lumina2.py lines (the pipeline's encode_prompt with the
    system prompt, the reversed interpolation, timestep = sigma, target x - noise), same random draws."""
    import types

    from diffusers import Lumina2Pipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from utils.families.lumina2 import DEFAULT_SYSTEM_PROMPT, Lumina2
    from utils.telemetry import HealthMonitor

    pipe = Lumina2Pipeline.from_pretrained(tiny_lumina2_pipeline_dir)
    models = dict(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                  noise_scheduler=pipe.scheduler)
    args = types.SimpleNamespace(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                 precondition_outputs=0, max_sequence_length=48, with_prior_preservation=False,
                                 offload=False, instance_data_dir=None, train_text_encoder=False, system_prompt=None,
                                 save_single_file=False, lora_format="diffusers")
    family = Lumina2()
    family.configure(args)
    mean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    tokens = pipe.tokenizer(f"{DEFAULT_SYSTEM_PROMPT} <Prompt Start> a photo", padding="max_length", max_length=48,
                            truncation=True, return_tensors="pt")  # (what the dataset tokenizes)
    batch = {"latent_mean": mean, "latent_std": torch.zeros_like(mean), "input_ids": tokens.input_ids.repeat(2, 1),
             "attention_mask": tokens.attention_mask.repeat(2, 1)}
    torch.manual_seed(0)
    loss = family.training_loss(args, models, batch, HealthMonitor())

    torch.manual_seed(0)
    model_input = ((mean + 0 * torch.randn(mean.shape)) - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    with torch.no_grad():
        prompt_embeds, prompt_attention_mask, _, _ = pipe.encode_prompt("a photo", max_sequence_length=48,
                                                                        system_prompt=DEFAULT_SYSTEM_PROMPT,
                                                                        do_classifier_free_guidance=False)
    noise = torch.randn_like(model_input)
    u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=2, logit_mean=0.0,
                                              logit_std=1.0, mode_scale=1.29)
    timesteps = pipe.scheduler.timesteps[(u * 1000).long()]
    sigmas = pipe.scheduler.sigmas[[(pipe.scheduler.timesteps == t).nonzero().item() for t in timesteps]]
    sigmas = sigmas.view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * noise + sigmas * model_input
    model_pred = pipe.transformer(hidden_states=noisy_model_input, encoder_hidden_states=prompt_embeds.repeat(2, 1, 1),
                                  encoder_attention_mask=prompt_attention_mask.repeat(2, 1), timestep=timesteps / 1000,
                                  return_dict=False)[0]
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
    target = model_input - noise
    expected = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(2, -1), 1).mean()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss.item(), expected.item())


@pytest.mark.slow
def test_a_model_we_train_denoises_in_the_diffusers_pipeline(tmp_path):
    """1-image overfit with Lumina's objective: through Lumina2Pipeline, PSNR >= 20 dB (conftest.
    overfit_one_image_psnr). The test pipeline has 16 latent channels and a 128-wide transformer; Lumina2Pipeline
    assumes an 8x VAE, so 64 px asked are the 8 px this 1x VAE gives. A short --system_prompt keeps the caption inside
    64 tokens of the tiny tokenizer."""
    from diffusers import Lumina2Pipeline

    from utils.families.lumina2 import build_tiny_lumina2_pipeline

    psnr = overfit_one_image_psnr(
        tmp_path, lambda path: build_tiny_lumina2_pipeline(
            path, ["a red square"], vae_config=dict(latent_channels=16, block_out_channels=(16,)),
            transformer_config=dict(in_channels=16, hidden_size=128, num_attention_heads=8, num_kv_heads=8,
                                    axes_dim_rope=[8, 4, 4])),
        Lumina2Pipeline, ["--max_train_steps", "400", "--max_sequence_length", "64", "--system_prompt", "paint"],
        dict(max_sequence_length=64, system_prompt="paint"), sample_size=64)
    assert psnr >= 20.0, psnr


def straight_and_resumed(pipeline, instance, tmp_path, steps, extra):
    """(the output folder of `steps` steps straight, that of 2 steps resumed to `steps`), both run with `extra`."""
    import train_text_to_image as script

    straight, split = tmp_path / "straight", tmp_path / "split"
    run_main_in_process(script, lumina_args(pipeline, instance, straight, steps, extra))
    run_main_in_process(script, lumina_args(pipeline, instance, split, 2, extra))
    run_main_in_process(script, lumina_args(pipeline, instance, split, steps, extra + ["--resume_from_checkpoint",
                                                                                      "latest"]))
    return straight, split


def test_resume_is_bitwise_and_cached_equals_uncached(tiny_lumina2_pipeline_dir, instance_dir, tmp_path):
    import train_text_to_image as script

    straight, split = straight_and_resumed(tiny_lumina2_pipeline_dir, instance_dir, tmp_path, 4,
                                           ["--use_lora", "--checkpointing_steps", "2", "--logging_steps", "1"])
    first, second = lora_state(straight), lora_state(split)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    common = ["--use_lora", "--logging_steps", "1", "--center_crop", "--offload"]
    run_main_in_process(script, lumina_args(tiny_lumina2_pipeline_dir, instance_dir, tmp_path / "plain", 3, common))
    run_main_in_process(script, lumina_args(tiny_lumina2_pipeline_dir, instance_dir, tmp_path / "cached", 3,
                                            common + ["--cache_latents", "--cache_text_embeddings"]))
    losses = [logged_losses(tmp_path / run) for run in ("plain", "cached")]
    assert len(losses[0]) == 3 and np.allclose(losses[0], losses[1], rtol=1e-5, atol=0), losses


def test_generate_samples_a_lumina2_lora_as_diffusers_does(tiny_lumina2_pipeline_dir, instance_dir,
                                                           tmp_path, capsys, tiny_sd3_pipeline_dir):
    import generate
    import train_text_to_image as script
    from diffusers import Lumina2Pipeline

    out = tmp_path / "lora"
    run_main_in_process(script, lumina_args(tiny_lumina2_pipeline_dir, instance_dir, out, 2,
                                            ["--use_lora", "--learning_rate", "1e-2", "--final_validation_prompt",
                                             "photo", "--num_validation_images", "1"]))
    assert os.path.isfile(out / "validation_grid.png")  # --final_validation_prompt: sampled once, at the end
    common = ["--prompt", "photo", "--steps", "3", "--seed", "4", "--num_images", "1", "--height", "32", "--width",
              "32"]
    paths = generate.main(["--model", tiny_lumina2_pipeline_dir, "--lora", str(out), *common, "--output_dir",
                           str(tmp_path / "g")])
    pipe = Lumina2Pipeline.from_pretrained(tiny_lumina2_pipeline_dir)
    pipe.load_lora_weights(str(out))
    theirs = pipe("photo", num_inference_steps=3, height=32, width=32,
                  generator=[torch.Generator("cpu").manual_seed(4)]).images[0]  # (guidance: the pipeline's 4.0)
    ours = np.asarray(Image.open(paths[0]), dtype=np.int16)
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    expect_generate_error(capsys, ["--model", tiny_sd3_pipeline_dir, "--lora", out, *common, "--output_dir",
                                   tmp_path / "x"], "lumina-2/lora", "SD3")


@pytest.mark.parametrize("extra, fragments", [
    (["--train_text_encoder"], ["--train_text_encoder", "Lumina-Image-2.0"]),
    (["--precondition_outputs", "1"], ["--precondition_outputs 1", "Lumina-Image-2.0"]),
    (["--use_lora", "--lora_layers", "attn.to_q,x_embedder"],
     ["--lora_format both", "no name for the LoRA on x_embedder", "--lora_format diffusers"]),
], ids=["text_encoder", "precondition", "unnameable_lora_module"])
def test_bad_lumina2_flags_are_one_block_errors(capsys, tiny_lumina2_pipeline_dir, instance_dir, tmp_path,
                                                extra, fragments):
    import train_text_to_image as script

    expect_user_error(capsys, script, lumina_args(tiny_lumina2_pipeline_dir, instance_dir, tmp_path / "o", 1, extra),
                      *fragments)


def test_system_prompt_is_lumina2s_own(capsys, tiny_sd3_pipeline_dir, tiny_pipeline_dir, instance_dir,
                                       tmp_path):
    import train_text_to_image as script

    expect_user_error(capsys, script, sd3_args(tiny_sd3_pipeline_dir, instance_dir, tmp_path / "o", 1,
                                               ["--system_prompt", "be nice"]), "--system_prompt", "Lumina-2")
    expect_user_error(capsys, script, sd3_args(tiny_pipeline_dir, instance_dir, tmp_path / "o", 1, ["--offload"]),
                      "--offload", "flow-matching")


def test_full_fine_tune_with_ema_resumes_bitwise(tiny_lumina2_pipeline_dir, instance_dir, tmp_path):
    """Lumina-2's full fine-tune with --use_ema: 3 steps straight = 2, saved, then resumed to 3; the EMA weights
    (what the final transformer holds) and the checkpoint's EMA state alike."""
    import safetensors.torch

    straight, split = straight_and_resumed(tiny_lumina2_pipeline_dir, instance_dir, tmp_path, 3,
                                           ["--use_ema", "--checkpointing_steps", "2", "--learning_rate", "1e-3"])
    name = "transformer/diffusion_pytorch_model.safetensors"
    first, second = (safetensors.torch.load_file(os.path.join(d, name)) for d in (straight, split))
    base = safetensors.torch.load_file(os.path.join(tiny_lumina2_pipeline_dir, name))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], base[k]) for k in first)  # it trained


# ---------------------------------------------------------------------------------------------- ComfyUI's layout

def lora_delta(down, up, scale=1.0):
    return up.double() @ down.double() * scale


def test_original_layout_is_what_diffusers_lumina2_converter_reads_at_lumina2_shapes():
    """utils/families/lumina2_comfy.py against diffusers' own reader of the original-layout Lumina-2 LoRAs
    (_convert_non_diffusers_lumina2_lora_to_diffusers, which Lumina2Pipeline.load_lora_weights calls and which fixes
    Lumina-Image-2.0's widths: q 2304, k and v 768): every module's delta (B @ A x alpha/r) comes back exactly,
    for q, k, v all present, one of them, none; the modules of a named block without an adapter come back zero."""
    import types

    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    from utils.families.lumina2_comfy import lumina2_original_state_dict

    width, kv, ffn, rank, scale = 2304, 768, 6144, 4, 8 / 4
    shapes = {"attn.to_q": (width, width), "attn.to_k": (width, kv), "attn.to_v": (width, kv),
              "attn.to_out.0": (width, width), "feed_forward.linear_1": (width, ffn),
              "feed_forward.linear_2": (ffn, width), "feed_forward.linear_3": (width, ffn),
              "norm1.linear": (1024, 4 * width)}

    class Shapes:  # (what the writer reads of the model: the shapes of modules without an adapter)
        def get_submodule(self, name):
            inputs, outputs = shapes[name.split(".", 2)[2]]
            return types.SimpleNamespace(in_features=inputs, out_features=outputs)

    generator = torch.Generator().manual_seed(0)
    trained = ["layers.0.attn.to_q", "layers.0.attn.to_k", "layers.0.attn.to_v", "layers.0.attn.to_out.0",
               "noise_refiner.1.attn.to_k", "noise_refiner.1.feed_forward.linear_2",
               "context_refiner.0.feed_forward.linear_1", "layers.2.norm1.linear"]
    state = {}
    for module in trained:
        inputs, outputs = shapes[module.split(".", 2)[2]]
        state[f"{module}.lora_A.weight"] = torch.randn(rank, inputs, generator=generator) / 10
        state[f"{module}.lora_B.weight"] = torch.randn(outputs, rank, generator=generator) / 10
    original = lumina2_original_state_dict(Shapes(), state, scale)
    assert original["diffusion_model.layers.0.attention.qkv.lora_B.weight"].shape == (width + 2 * kv, 3 * rank)
    assert not any("context_refiner.0.adaLN" in key for key in original)
    back = _convert_non_diffusers_lumina2_lora_to_diffusers(dict(original))
    blocks = ("layers.0", "layers.2", "noise_refiner.1", "context_refiner.0")
    for block in blocks:
        for inner in shapes:
            if inner == "norm1.linear" and block.startswith("context_refiner"):
                continue
            module = f"{block}.{inner}"
            got = lora_delta(back[f"transformer.{module}.lora_A.weight"], back[f"transformer.{module}.lora_B.weight"])
            if module in trained:
                expected = lora_delta(state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"], scale)
                assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9), module
            else:
                assert not got.any(), module


def test_a_trained_lumina2_lora_is_written_in_both_layouts(tiny_lumina2_pipeline_dir, instance_dir, tmp_path):
    """--lora_format both (the default): the original-layout file holds the same adapters as diffusers' file,
    module by module (decoded from the fused qkv's blocks), plus zero LoRAs for the block's other modules;
    --lora_format kohya writes only it."""
    import train_text_to_image as script
    from diffusers import Lumina2Pipeline

    from utils.families.lumina2_comfy import MODULES, QKV, block_of

    out = tmp_path / "both"
    run_main_in_process(script, lumina_args(tiny_lumina2_pipeline_dir, instance_dir, out, 1, [
        "--use_lora", "--rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--lora_layers", "attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,feed_forward.linear_1"]))
    state = Lumina2Pipeline.lora_state_dict(str(out))
    state = state[0] if isinstance(state, tuple) else state
    original = safetensors.torch.load_file(out / "pytorch_lora_weights_kohya.safetensors")
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in state if "lora_A" in k})
    assert any(m.startswith("context_refiner") for m in modules) and any(m.startswith("layers") for m in modules)
    for module in modules:
        down_a, up_b = (state[f"transformer.{module}.lora_{x}.weight"] for x in "AB")
        block, inner = block_of(module)
        if inner in QKV:
            down = original[f"diffusion_model.{block}.attention.qkv.lora_A.weight"]
            up = original[f"diffusion_model.{block}.attention.qkv.lora_B.weight"]
            position, rank = QKV.index(inner), down.shape[0] // 3
            widths = [up_b.shape[0] if p == position else None for p in range(3)]
            start = sum(state[f"transformer.{block}.{QKV[p]}.lora_B.weight"].shape[0] for p in range(position))
            block_up = up[start:start + widths[position], position * rank:(position + 1) * rank]
            block_down = down[position * rank:(position + 1) * rank]
            others = torch.cat([up[start:start + widths[position], :position * rank],
                                up[start:start + widths[position], (position + 1) * rank:]], dim=1)
            assert not others.any(), f"{module}: off-diagonal blocks must be zero"
        else:
            block_down = original[f"diffusion_model.{block}.{MODULES[inner]}.lora_A.weight"]
            block_up = original[f"diffusion_model.{block}.{MODULES[inner]}.lora_B.weight"]
        assert torch.allclose(lora_delta(block_down, block_up), lora_delta(down_a, up_b, 8 / 4), atol=1e-7), module
    assert not original["diffusion_model.layers.0.feed_forward.w2.lora_B.weight"].any()  # (no adapter: zero)

    only = tmp_path / "kohya"
    run_main_in_process(script, lumina_args(tiny_lumina2_pipeline_dir, instance_dir, only, 1,
                                            ["--use_lora", "--lora_format", "kohya"]))
    assert (only / "pytorch_lora_weights_kohya.safetensors").is_file()
    assert not (only / "pytorch_lora_weights.safetensors").exists()


@pytest.fixture(scope="module")
def lumina2_2304_pipeline_dir(tmp_path_factory):
    """The tiny Lumina-2 pipeline with Lumina-Image-2.0's attention widths (24 heads, 8 key/value heads of 96; one
    layer and two refiner blocks each: 421M parameters), which its single-file and LoRA converters assume."""
    from utils.families.lumina2 import build_tiny_lumina2_pipeline

    return build_tiny_lumina2_pipeline(str(tmp_path_factory.mktemp("lumina2-2304")), transformer_config=dict(
        hidden_size=2304, num_attention_heads=24, num_kv_heads=8, num_layers=1, num_refiner_layers=2,
        axes_dim_rope=[32, 32, 32]))


@pytest.mark.slow
def test_original_layout_file_gives_the_diffusers_files_images_at_lumina2_width(lumina2_2304_pipeline_dir,
                                                                                tmp_path):
    """A LoRA on q/k/v, the output and feed-forward projections and the modulations at Lumina-Image-2.0's widths,
    written by the family in both layouts: Lumina2Pipeline.load_lora_weights of the original-layout file (diffusers'
    converter) samples the same images as of diffusers' file, and both differ from the base model's."""
    from diffusers import Lumina2Pipeline
    from test_flux import assert_both_layouts_sample_alike

    from utils.families.lumina2 import Lumina2

    assert_both_layouts_sample_alike(Lumina2Pipeline, lumina2_2304_pipeline_dir, Lumina2(), [
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "feed_forward.linear_1", "norm1.linear"], tmp_path,
        max_sequence_length=64)


@pytest.mark.slow
def test_single_file_lumina2_round_trips_through_diffusers_and_trains_like_its_folder(lumina2_2304_pipeline_dir,
                                                                                     instance_dir, tmp_path):
    """--save_single_file writes the transformer in Alpha-VLLM's layout (layers.*, noise_refiner.*,
    context_refiner.*, cap_embedder.*, final_layer.*); diffusers' Lumina2Transformer2DModel.from_single_file reads
    back the very weights the run saved. A base model as that file (--model_config for the rest) trains exactly like
    its folder, and generate.py samples from a file. The transformer has Lumina-Image-2.0's attention widths (24
    heads, 8 key/value heads of 96; one layer, two refiner blocks each: 421M parameters), which the format and
    diffusers' converter assume."""
    from diffusers import Lumina2Transformer2DModel
    from test_flux import assert_single_file_trains_like_its_folder

    from utils.families.lumina2_single_file import save_lumina2_single_file

    pipeline = lumina2_2304_pipeline_dir
    base = tmp_path / "base.safetensors"
    save_lumina2_single_file(str(base), Lumina2Transformer2DModel.from_pretrained(pipeline, subfolder="transformer"),
                             "fp32")
    assert_single_file_trains_like_its_folder(
        lumina_args, pipeline, base, instance_dir, tmp_path, Lumina2Transformer2DModel,
        {"layers.0.attention.qkv.weight", "context_refiner.1.attention_norm1.weight", "cap_embedder.1.weight",
         "final_layer.adaLN_modulation.1.weight"})


def test_single_files_of_another_shape_are_refused_in_one_block(capsys, tiny_lumina2_pipeline_dir, instance_dir,
                                                                tmp_path):
    """Lumina-2's single-file layout exists at Lumina-Image-2.0's attention widths only (diffusers' converter splits
    q, k, v at 2304/768/768): --save_single_file on the tiny model is refused before training, a narrower file as a
    base model is named, and a file without --model_config is told what to add."""
    import train_text_to_image as script

    out = tmp_path / "o"
    expect_user_error(capsys, script, lumina_args(tiny_lumina2_pipeline_dir, instance_dir, out, 1,
                                                  ["--save_single_file"]),
                      "--save_single_file", "24 heads and 8 key/value heads of 96")
    assert not (out / "transformer").exists() and not list(out.glob("checkpoint-*"))
    narrow = tmp_path / "narrow.safetensors"
    safetensors.torch.save_file({"context_refiner.0.attention.qkv.weight": torch.zeros(24, 8),
                                 "layers.0.attention.qkv.weight": torch.zeros(24, 8)}, str(narrow))
    expect_user_error(capsys, script, lumina_args(str(narrow), instance_dir, tmp_path / "n", 1,
                                                  ["--model_config", tiny_lumina2_pipeline_dir]),
                      "q, k, v have 24 rows", "give its diffusers pipeline folder")
    safetensors.torch.save_file({"context_refiner.0.attention.qkv.weight": torch.zeros(3840, 8)}, str(narrow))
    expect_user_error(capsys, script, lumina_args(str(narrow), instance_dir, tmp_path / "n", 1),
                      "single-file Lumina-Image-2.0 transformer: give --model_config")
