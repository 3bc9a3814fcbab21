"""--save_single_file (one model.safetensors in the original LDM layout) and single-file checkpoints as
--pretrained_model_name_or_path: diffusers' own `from_single_file` must read our file back to the very weights
and images of the pipeline folder, for SD 1.x (CLIP) and SD 2.x (OpenCLIP) text encoders."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

import train_text_to_image
from tests.conftest import run_main_in_process, write_captioned_folder
from utils.errors import UserError
from utils.sd.single_file import SINGLE_FILE_NAME, load_single_file_pipeline, save_single_file


def images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a thing"], num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def assert_same_models(a, b):
    for name in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        left = {k: v for k, v in left.items() if not k.endswith("position_ids")}
        assert left.keys() <= right.keys(), (name, sorted(left.keys() - right.keys())[:3])
        for key, value in left.items():
            assert torch.equal(value, right[key]), (name, key)


def sd2_style_pipeline(tiny_pipeline_dir, path):
    """The tiny pipeline with SD 2.x's differences: an OpenCLIP-style (gelu) text encoder, linear projections."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    config = pipe.text_encoder.config
    config.hidden_act = "gelu"
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(config)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "use_linear_projection": True})
    pipe.save_pretrained(path)
    return pipe


def test_sd2_open_clip_layout_round_trips(tiny_pipeline_dir, tmp_path):
    pipe = sd2_style_pipeline(tiny_pipeline_dir, str(tmp_path / "sd2"))
    path = save_single_file(str(tmp_path / "sd2.safetensors"), pipe.unet, pipe.vae, pipe.text_encoder, "fp32")
    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # OpenCLIP, q/k/v stacked
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys and "model.diffusion_model.out.2.weight" in keys
    loaded = load_single_file_pipeline(path, str(tmp_path / "sd2"), None)
    assert_same_models(pipe, loaded)
    np.testing.assert_array_equal(images(loaded), images(pipe))


def test_a_mismatch_is_never_written(tiny_pipeline_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from utils.sd import single_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    original = single_file.vae_to_ldm
    monkeypatch.setattr(single_file, "vae_to_ldm", lambda state, config: {
        k.replace("mid.block_1", "mid.block_2") if "mid.block_1" in k else k: v
        for k, v in original(state, config).items()})
    with pytest.raises(RuntimeError, match="single-file VAE"):
        save_single_file(str(tmp_path / "bad.safetensors"), pipe.unet, pipe.vae, pipe.text_encoder)
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "bad.safetensors.tmp").exists()


def train(tiny_pipeline_dir, tmp_path, out_name, base, *extra):
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        write_captioned_folder(data, count=4, size=(32, 32))
    out = tmp_path / out_name
    run_main_in_process(train_text_to_image, [
        "--pretrained_model_name_or_path", base, "--train_data_dir", data, "--resolution", "32",
        "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
        "--report_to", "none", "--seed", "0", "--output_dir", out, *extra])
    return str(out)


@pytest.mark.slow
def test_trained_model_as_one_file_and_back_as_the_base(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = train(tiny_pipeline_dir, tmp_path, "full", tiny_pipeline_dir, "--use_ema", "--save_single_file",
                "--single_file_dtype", "fp32")
    folder = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)  # holds the EMA weights
    loaded = load_single_file_pipeline(f"{out}/{SINGLE_FILE_NAME}", out, None)
    assert_same_models(folder, loaded)
    np.testing.assert_array_equal(images(loaded), images(folder))

    # generate.py: the single file as --model, and --export single_file of the folder (the same file's tensors).
    import generate
    from safetensors.torch import load_file

    common = ["--prompt", "a thing", "--num_images", "1", "--steps", "3", "--seed", "0", "--device", "cpu"]
    from_file = generate.main(["--model", f"{out}/{SINGLE_FILE_NAME}", "--model_config", out,
                               "--output_dir", str(tmp_path / "g1"), *common])
    from_folder = generate.main(["--model", out, "--output_dir", str(tmp_path / "g2"), *common])
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(from_file[0])), np.asarray(Image.open(from_folder[0])))
    exported = generate.main(["--model", out, "--export", "single_file", "--single_file_dtype", "fp32",
                              "--output_dir", str(tmp_path / "export"), "--device", "cpu"])[0]
    written, again = load_file(f"{out}/{SINGLE_FILE_NAME}"), load_file(exported)
    assert written.keys() == again.keys() and all(torch.equal(written[k], again[k]) for k in written)

    # The file as the base of a new run trains exactly like its folder.
    from_folder = train(tiny_pipeline_dir, tmp_path, "from_folder", out)
    from_file = train(tiny_pipeline_dir, tmp_path, "from_file", f"{out}/{SINGLE_FILE_NAME}", "--model_config", out,
                      "--save_single_file")
    assert_same_models(StableDiffusionPipeline.from_pretrained(from_folder, safety_checker=None),
                       StableDiffusionPipeline.from_pretrained(from_file, safety_checker=None))
    with safe_open(f"{from_file}/{SINGLE_FILE_NAME}", "pt") as handle:  # default precision: fp16
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16


def test_single_file_flags_are_checked(tiny_pipeline_dir, tmp_path, monkeypatch):
    data = write_captioned_folder(tmp_path, count=2, size=(32, 32))
    base = ["--train_data_dir", data, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UserError, match="--lora_format kohya"):
        train_text_to_image.parse_args(base + ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--use_lora",
                                               "--save_single_file"])
    with pytest.raises(UserError, match="describe a single-file checkpoint"):
        train_text_to_image.parse_args(base + ["--pretrained_model_name_or_path", tiny_pipeline_dir,
                                               "--model_config", tiny_pipeline_dir])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="--model_config PIPELINE_FOLDER"):
        load_single_file_pipeline(str(tmp_path / "m.safetensors"), None, None)
    with pytest.raises(UserError, match="no such file"):
        load_single_file_pipeline(str(tmp_path / "missing.safetensors"), tiny_pipeline_dir, None)


def _parts(blocks, context, widths, vocab=49408, positions=77, latent_channels=4):
    from types import SimpleNamespace as NS

    unet = NS(config=NS(block_out_channels=blocks, cross_attention_dim=context))
    encoders = [NS(config=NS(hidden_size=w, vocab_size=vocab, max_position_embeddings=positions)) for w in widths]
    return unet, NS(config=NS(latent_channels=latent_channels)), *encoders


def test_ui_tools_warning_names_what_is_not_standard():
    from utils.sd.single_file import ui_compatibility_problem

    assert ui_compatibility_problem(*_parts([320, 640, 1280, 1280], 768, [768])) is None  # SD 1.x
    assert ui_compatibility_problem(*_parts([320, 640, 1280, 1280], 1024, [1024])) is None  # SD 2.x
    assert ui_compatibility_problem(*_parts([320, 640, 1280], 2048, [768, 1280])) is None  # SDXL
    # The `base` preset and the kanji model: SD-1.5-shaped but with their own learned vocabulary.
    assert "838 token embeddings" in ui_compatibility_problem(*_parts([320, 640, 1280, 1280], 768, [768], vocab=838))
    assert "not a standard" in ui_compatibility_problem(*_parts([32, 64], 32, [32]))  # the tiny preset
    assert "latent channels" in ui_compatibility_problem(*_parts([320, 640, 1280, 1280], 768, [768],
                                                                 latent_channels=16))


def test_a_non_standard_single_file_is_written_with_one_warning(tiny_pipeline_dir, tmp_path, caplog):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    with caplog.at_level("WARNING", logger="utils.sd.single_file"):
        path = save_single_file(str(tmp_path / SINGLE_FILE_NAME), pipe.unet, pipe.vae, pipe.text_encoder, "fp32")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "ComfyUI / AUTOMATIC1111 / Forge will not load" in warnings[0]
    with safe_open(path, "pt") as handle:
        assert len(list(handle.keys())) > 0
