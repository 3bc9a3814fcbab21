"""--lora_format kohya|both: the kohya/A1111 file loads in diffusers' load_lora_weights (which reads kohya files)
and gives the same images as our diffusers-format file, with lora_alpha != rank so a lost alpha would show."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import train_text_to_image
from tests.conftest import run_main_in_process, write_captioned_folder
from utils.sd.lora import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME


def images(pipeline_dir, lora_file=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a thing"], num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
def test_kohya_file_loads_and_matches_the_diffusers_file(tiny_pipeline_dir, tmp_path):
    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data", count=4, size=(32, 32))
    out = tmp_path / "lora"
    run_main_in_process(train_text_to_image, [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution", "32",
        "--train_batch_size", "2", "--max_train_steps", "3", "--learning_rate", "5e-2", "--lr_warmup_steps", "0",
        "--use_lora", "--rank", "4", "--lora_alpha", "8", "--train_text_encoder",  # default --lora_format: both
        "--report_to", "none", "--seed", "0", "--output_dir", str(out)])

    with safe_open(str(out / KOHYA_WEIGHT_NAME), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        alphas = {k: handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys), keys[:5]
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)  # A1111/ComfyUI's SD 1.x name
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    assert len(alphas) == len(downs) and set(alphas.values()) == {8.0}  # the real alpha, not the rank
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_resolution"] == "(32, 32)" and metadata["ss_max_train_steps"] == "3"

    # What A1111/Forge/ComfyUI read to file the LoRA under its base model (kohya's and Stability's ModelSpec keys).
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.implementation"] == "diffusers" and metadata["modelspec.resolution"] == "32x32"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0" and metadata["modelspec.title"] == "lora (LoRA)"
    assert metadata["modelspec.prediction_type"] == "epsilon" and len(metadata["modelspec.date"]) == 10

    with safe_open(str(out / LORA_WEIGHT_NAME), "pt") as handle:  # the diffusers file keeps the alpha too
        diffusers_metadata = handle.metadata()
        adapter = json.loads(diffusers_metadata["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == 8 and adapter["text_encoder.lora_alpha"] == 8
    model_keys = [k for k in metadata if k.startswith(("modelspec.", "ss_base", "ss_v2", "ss_resolution"))]
    assert {k: diffusers_metadata[k] for k in model_keys} == {k: metadata[k] for k in model_keys}

    base = images(tiny_pipeline_dir)
    from_diffusers = images(tiny_pipeline_dir, out / LORA_WEIGHT_NAME)
    from_kohya = images(tiny_pipeline_dir, out / KOHYA_WEIGHT_NAME)
    assert np.abs(from_diffusers - base).max() > 1e-3  # the LoRA does something
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=1e-5)

    # generate.py --export kohya converts the diffusers file (no base model) into the same kohya file.
    import generate
    from safetensors.torch import load_file

    exported = generate.main(["--lora", str(out), "--export", "kohya", "--export_path", str(tmp_path / "x.safetensors"),
                              "--device", "cpu"])[0]
    written, converted = load_file(str(out / KOHYA_WEIGHT_NAME)), load_file(exported)
    assert written.keys() == converted.keys()
    assert all(torch.equal(written[k], converted[k]) for k in written)
    with safe_open(exported, "pt") as handle:  # the export keeps the model-version metadata training wrote
        exported_metadata = handle.metadata()
    assert {k: exported_metadata[k] for k in model_keys} == {k: metadata[k] for k in model_keys}


def test_lora_metadata_names_each_base_model_family():
    from utils.sd.lora import base_model_version, guess_base_model_version, lora_file_metadata

    assert base_model_version(False, 768, "epsilon") == "sd_v1"
    assert base_model_version(False, 1024, "v_prediction") == "sd_v2_v"
    assert base_model_version(False, [1024], "epsilon") == "sd_v2"
    assert base_model_version(True, 2048, "epsilon") == "sdxl_base_v1-0"
    sdxl = lora_file_metadata("sdxl_base_v1-0", 1024, "x", "epsilon")
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sdxl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert sdxl["modelspec.resolution"] == "1024x1024" and sdxl["ss_v2"] == "False"
    assert lora_file_metadata("sd_v2_v", 768, "x", "v_prediction")["modelspec.architecture"] == \
        "stable-diffusion-v2-768-v/lora"
    assert all(isinstance(v, str) for v in sdxl.values())
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    assert guess_base_model_version({key: torch.zeros(4, 1024)}) == "sd_v2"
    assert guess_base_model_version({key: torch.zeros(4, 2048)}) == "sdxl_base_v1-0"
    assert guess_base_model_version({key: torch.zeros(4, 32)}) is None


@pytest.mark.slow
def test_kohya_only_folder_generates_like_its_file(tiny_pipeline_dir, tmp_path):
    import generate

    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data", count=4, size=(32, 32))
    out = tmp_path / "lora"
    run_main_in_process(train_text_to_image, [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution", "32",
        "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "5e-2", "--lr_warmup_steps", "0",
        "--use_lora", "--rank", "4", "--lora_alpha", "2", "--lora_format", "kohya", "--report_to", "none",
        "--seed", "0", "--output_dir", str(out)])
    assert (out / KOHYA_WEIGHT_NAME).is_file() and not (out / LORA_WEIGHT_NAME).exists()
    common = ["--prompt", "a thing", "--num_images", "1", "--steps", "3", "--seed", "0", "--device", "cpu",
              "--height", "32", "--width", "32"]
    from_folder = generate.main(["--model", tiny_pipeline_dir, "--lora", str(out), "--output_dir",
                                 str(tmp_path / "g1"), *common])
    from_file = generate.main(["--model", tiny_pipeline_dir, "--lora", str(out / KOHYA_WEIGHT_NAME), "--output_dir",
                               str(tmp_path / "g2"), *common])
    base = generate.main(["--model", tiny_pipeline_dir, "--output_dir", str(tmp_path / "g3"), *common])
    from PIL import Image

    pixels = [np.asarray(Image.open(paths[0]), dtype=np.int16) for paths in (from_folder, from_file, base)]
    np.testing.assert_array_equal(pixels[0], pixels[1])
    assert np.abs(pixels[0] - pixels[2]).max() > 0  # the LoRA was applied
