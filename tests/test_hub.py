"""utils/hub.py offline: what a push would upload, the model card, and that the token is never written."""

import argparse
import json
import os

import pytest
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from utils.hub import (IGNORE_PATTERNS, add_hub_args, check_hub_args, files_to_upload, push_output_dir, redact_args,
                       write_model_card)

FAKE_TOKEN = "hf_FAKEtokenFAKEtokenFAKEtoken0123"


def touch(path, content="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(content)


@pytest.fixture
def output_dir(tmp_path):
    """An output folder after a full training run: final pipeline, checkpoints, logs, samples."""
    root = tmp_path / "sd-model"
    for name in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
                 "checkpoint-2/unet/diffusion_pytorch_model.safetensors", "checkpoint-2/optimizer.bin",
                 "checkpoint-2/training_state.json", ".tmp-checkpoint-4/optimizer.bin", "step_3/model.bin",
                 "epoch_1/model.bin", "logs/text2image-fine-tune/events.out.tfevents.1", "samples/validation_step_0000002.png",
                 "training_args.json.tmp"]:
        touch(str(root / name))
    os.makedirs(root / "samples", exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(root / "samples" / "validation_step_0000004.png")
    return root


@pytest.fixture
def hub_calls(monkeypatch):
    """Record HfApi.create_repo / upload_folder calls instead of talking to the Hub."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

        class RepoUrl(str):
            pass

        url = RepoUrl(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id if "/" in repo_id else f"someone/{repo_id}"
        return url

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def training_args(**overrides):
    parser = argparse.ArgumentParser()
    add_hub_args(parser)
    parser.add_argument("--report_to", default="tensorboard")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--validation_prompts", nargs="+", default=["water", "fire"])
    argv = ["--push_to_hub", "--hub_token", FAKE_TOKEN, "--hub_model_id", "kanji-sd"]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return parser.parse_args(argv)


def read_front_matter(readme):
    text = open(readme, encoding="utf-8").read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_hub_args_follow_diffusers():
    parser = argparse.ArgumentParser()
    add_hub_args(parser)
    defaults = parser.parse_args([])
    assert (defaults.push_to_hub, defaults.hub_token, defaults.hub_model_id, defaults.hub_private_repo) == (False, None, None, False)


def test_token_with_wandb_is_refused():
    check_hub_args(training_args())
    with pytest.raises(ValueError, match="security risk.*hf auth login"):
        check_hub_args(training_args(report_to="wandb"))
    check_hub_args(argparse.Namespace(hub_token=None, report_to="wandb"))


def test_redact_args():
    redacted = redact_args(argparse.Namespace(hub_token=FAKE_TOKEN, wandb_api_key="k", learning_rate=1e-4, max_token_length=77))
    assert redacted == {"learning_rate": 1e-4, "max_token_length": 77}


def test_push_uploads_only_the_model_and_never_writes_the_token(output_dir, hub_calls):
    args = training_args()
    with open(output_dir / "training_args.json", "w", encoding="utf-8") as handle:
        json.dump(redact_args(args), handle)
    write_model_card(str(output_dir), base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", datasets=["lambdalabs/naruto-blip-captions"],
                     hyperparameters=redact_args(args), validation_grid=str(output_dir / "samples" / "validation_step_0000004.png"))
    (output_dir / ".lock").write_text("")  # a running trainer's output-dir lock: never uploaded
    push_output_dir(str(output_dir), args.hub_model_id, token=args.hub_token, private=True)

    (_, repo_id, create_kwargs), (_, upload_repo, upload_kwargs) = hub_calls
    assert repo_id == "kanji-sd" and create_kwargs["exist_ok"] and create_kwargs["private"]
    assert upload_repo == "someone/kanji-sd" and upload_kwargs["folder_path"] == str(output_dir)
    assert upload_kwargs["token"] == FAKE_TOKEN  # the token goes to the API, nowhere else
    expected = sorted(["README.md", "model_index.json", "scheduler/scheduler_config.json", "text_encoder/model.safetensors",
                "tokenizer/vocab.json", "training_args.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "validation_grid.png", "vae/config.json"])
    assert files_to_upload(str(output_dir)) == expected
    # ... which is what upload_folder itself keeps with the patterns we pass it
    all_files = sorted(str(p.relative_to(output_dir).as_posix()) for p in output_dir.rglob("*") if p.is_file())
    assert sorted(filter_repo_objects(all_files, ignore_patterns=upload_kwargs["ignore_patterns"])) == expected
    assert upload_kwargs["ignore_patterns"] == IGNORE_PATTERNS

    for path in output_dir.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    front_matter, text = read_front_matter(output_dir / "README.md")
    assert "hub_token" not in text and 'from_pretrained("someone/kanji-sd"' in text  # the snippet now points at the repo


def test_model_card_front_matter_and_content(output_dir):
    grid = output_dir / "samples" / "validation_step_0000004.png"
    readme = write_model_card(str(output_dir), base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                              datasets=["lambdalabs/naruto-blip-captions"], validation_grid=str(grid),
                              hyperparameters={"learning_rate": 1e-5, "validation_prompts": ["water", "fire"], "hub_token": FAKE_TOKEN},
                              lora=True, repo_id="someone/kanji-lora")
    front_matter, text = read_front_matter(readme)
    assert front_matter["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert front_matter["license"] == "creativeml-openrail-m"
    assert front_matter["pipeline_tag"] == "text-to-image"
    assert front_matter["library_name"] == "diffusers"
    assert front_matter["datasets"] == ["lambdalabs/naruto-blip-captions"]
    assert {"diffusers", "stable-diffusion", "text-to-image", "diffusers-training", "lora"} <= set(front_matter["tags"])
    assert "![validation images](validation_grid.png)" in text
    assert (output_dir / "validation_grid.png").read_bytes() == grid.read_bytes()
    assert 'pipe.load_lora_weights("someone/kanji-lora")' in text
    assert "| learning_rate | 1e-05 |" in text and "| validation_prompts | water, fire |" in text
    assert FAKE_TOKEN not in text


def test_model_card_from_scratch_has_no_base_model(tmp_path):
    readme = write_model_card(str(tmp_path), base_model="from scratch (small preset)", datasets=[str(tmp_path)])
    front_matter, text = read_front_matter(readme)
    assert "base_model" not in front_matter and "license" not in front_matter and "datasets" not in front_matter
    assert "lora" not in front_matter["tags"]
    assert "trained from scratch (small preset)" in text and "Validation images" not in text
    assert f'from_pretrained("{tmp_path}"' in text
