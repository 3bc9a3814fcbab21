"""LoRA training through train_text_to_image.py (diffusers' train_text_to_image_lora.py flags), 8-bit Adam, Hub push."""

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import accelerate_launch, write_captioned_folder

SCRIPT = "train_text_to_image.py"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_captioned_folder(tmp_path_factory.mktemp("lora-data"), count=6, size=(36, 36), seed=1,
                                  caption="a photo of sks thing {i}")


def lora_args(pipeline, data, out, steps, extra=()):
    return ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--output_dir", str(out), "--seed", "0", "--report_to", "none", "--use_lora",
            "--rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--checkpointing_steps", "2",
            "--checkpoints_total_limit", "2", *extra]


@pytest.mark.slow
def test_lora_train_checkpoint_resume_and_load(tiny_pipeline_dir, image_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    accelerate_launch(SCRIPT, lora_args(tiny_pipeline_dir, image_folder, out, 4, [
        "--train_text_encoder", "--validation_prompt", "a photo of sks thing", "--num_validation_images", "2"]))
    weights = out / "pytorch_lora_weights.safetensors"
    state = load_file(weights)
    assert any(k.startswith("unet.") for k in state) and any(k.startswith("text_encoder.") for k in state)
    assert all("lora" in k for k in state), "only adapter weights belong in a LoRA file"
    # Checkpoints hold the adapter and the optimizer, never a full UNet copy.
    checkpoint = out / "checkpoint-4"
    assert (checkpoint / "pytorch_lora_weights.safetensors").exists() and (checkpoint / "optimizer.bin").exists()
    assert not (checkpoint / "unet").exists() and not list(checkpoint.glob("model*.safetensors"))
    assert os.listdir(out / "samples")

    # Resume to 6 steps from the newest checkpoint; the limit of 2 holds.
    result = accelerate_launch(SCRIPT, lora_args(tiny_pipeline_dir, image_folder, out, 6, [
        "--train_text_encoder", "--resume_from_checkpoint", "latest"]))
    assert "Resuming from checkpoint" in result.stdout + result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]

    # diffusers loads the result as any LoRA, and it changes the output; scale 0 is the base model.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)

    def sample(**kwargs):
        return pipe("a photo of sks thing", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kwargs).images[0]

    base = sample()
    pipe.load_lora_weights(str(out))
    assert np.abs(sample() - base).max() > 1e-4
    assert np.abs(sample(cross_attention_kwargs={"scale": 0.0}) - base).max() < 1e-5


@pytest.mark.slow
def test_8bit_adam_with_gradient_checkpointing_on_cpu(tiny_pipeline_dir, image_folder, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "adam8"
    result = accelerate_launch(SCRIPT, ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", image_folder,
                               "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--output_dir", out,
                               "--report_to", "none", "--use_8bit_adam", "--checkpointing_steps", "2",
                               "--gradient_checkpointing", "--allow_tf32"])
    optimizer_state = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)
    states = [state.get("__bnb_optimizer_quant_state__", state) for state in optimizer_state["state"].values()]
    # 8-bit moments (bitsandbytes keeps small tensors in 32 bit): bitsandbytes really ran.
    assert any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for state in states for v in state.values())
    # bitsandbytes >= 0.50's "Failed to load CPU gemm_4bit_forward" (a 4-bit kernel we never use) is filtered.
    assert "gemm_4bit_forward" not in result.stdout + result.stderr


def test_text_encoder_lora_with_a_too_old_peft_names_both_versions(monkeypatch):
    """transformers >= 5.24 wants peft >= 0.22 for add_adapter; the index serves 0.21.2. Refuse up front."""
    from importlib.metadata import version

    import transformers.integrations.peft as transformers_peft

    import train_text_to_image as script

    argv = ["--model_preset", "tiny", "--train_data_dir", "x", "--use_lora", "--train_text_encoder"]
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0.0")
    with pytest.raises(ImportError) as error:
        script.parse_args(argv)  # validates the arguments
    message = str(error.value)
    assert "peft >= 99.0.0" in message and f"peft {version('peft')}" in message
    assert f"transformers {version('transformers')}" in message
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "0.0.1")
    assert script.parse_args(argv).train_text_encoder  # a compatible pair passes


def test_8bit_adam_missing_is_a_clear_error(monkeypatch):
    import train_text_to_image as script

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    args = script.parse_args(["--model_preset", "tiny", "--train_data_dir", "x", "--use_8bit_adam"])
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        script.make_optimizer(args, [{"params": [torch.nn.Parameter(torch.zeros(2))]}], "cpu")


@pytest.mark.slow
def test_push_to_hub_uploads_final_output_without_checkpoints_or_token(tiny_pipeline_dir, image_folder, tmp_path, monkeypatch):
    """The real code path of --push_to_hub, run in-process with HfApi's network calls recorded instead of sent."""
    import huggingface_hub

    import train_text_to_image as script

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw.get("repo_id"), kw)))
    token = "hf_SECRETtoken1234567890"
    out = tmp_path / "push"
    args = script.parse_args(lora_args(tiny_pipeline_dir, image_folder, out, 2, [
        "--push_to_hub", "--hub_model_id", "me/kanji-lora", "--hub_token", token, "--hub_private_repo",
        "--validation_prompt", "a photo", "--num_validation_images", "1"]))
    script.main(args)
    create = [c for c in calls if c[0] == "create"]
    upload = [c for c in calls if c[0] == "upload"]
    assert create and create[0][1] == "me/kanji-lora" and create[0][2].get("private") is True
    assert upload and upload[0][1] == "me/kanji-lora"
    ignore = upload[0][2].get("ignore_patterns") or []
    assert any(p.startswith("checkpoint-") for p in ignore)
    card = (out / "README.md").read_text()
    assert "lora" in card and "text-to-image" in card
    for directory, _, files in os.walk(out):
        for name in files:
            assert token.encode() not in open(os.path.join(directory, name), "rb").read(), f"token leaked into {name}"
