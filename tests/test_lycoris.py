"""--lora_type loha|lokr|dora (utils/sd/lycoris.py, utils/sd/lora.py): the LyCORIS file's tensors give, by the
LyCORIS formulas as ComfyUI applies them, exactly the update peft applies; the runs save, resume bitwise and load in
generate.py."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_main_in_process, write_captioned_folder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lycoris_delta(tensors: dict, shape) -> torch.Tensor:
    """dW of one module from its LyCORIS tensors (ComfyUI's weight_adapter/loha.py and lokr.py arithmetic)."""
    alpha = float(tensors["alpha"])
    if "hada_w1_a" in tensors:
        w1 = tensors["hada_w1_a"] @ tensors["hada_w1_b"]
        w2 = tensors["hada_w2_a"] @ tensors["hada_w2_b"]
        return (w1 * w2 * alpha / tensors["hada_w1_b"].shape[0]).reshape(shape)
    dim = None
    if "lokr_w1" in tensors:
        w1 = tensors["lokr_w1"]
    else:
        w1, dim = tensors["lokr_w1_a"] @ tensors["lokr_w1_b"], tensors["lokr_w1_b"].shape[0]
    if "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"]
    else:
        w2, dim = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"], tensors["lokr_w2_b"].shape[0]
    scale = alpha / dim if dim is not None else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)


@pytest.mark.parametrize("lora_type, rank, alpha", [("loha", 4, 8.0), ("lokr", 4, 8.0), ("lokr", 2, 3.0)])
def test_the_lycoris_file_gives_the_update_peft_applies(tmp_path, tiny_pipeline_dir, lora_type, rank, alpha):
    from diffusers import UNet2DConditionModel

    from utils.sd.lora import save_lora
    from utils.sd.lycoris import lycoris_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    unet.add_adapter(lycoris_config(lora_type, rank, alpha, 0.0, TARGETS))
    for name, parameter in unet.named_parameters():
        if "hada_" in name or "lokr_" in name:  # peft starts at a zero update: make it a real one
            parameter.data.normal_(std=0.3)
    path = save_lora(str(tmp_path), unet, lora_format="kohya")
    saved = load_file(path)
    with safe_open(path, "pt") as handle:
        assert json.loads(handle.metadata()["ss_network_args"]) == {"algo": lora_type}
    if lora_type == "lokr" and rank == 2:  # the case where a factor is low-rank (alpha / rank applies)
        assert any(k.endswith(".lokr_w2_a") for k in saved)
    checked = 0
    for module_name, module in unet.named_modules():
        if not hasattr(module, "base_layer"):
            continue
        prefix = "lora_unet_" + module_name.replace(".", "_")
        tensors = {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + ".")}
        x = torch.randn(5, module.base_layer.in_features)
        with torch.no_grad():
            applied = module(x) - module.base_layer(x)  # what peft adds to the layer's output
        delta = lycoris_delta(tensors, module.base_layer.weight.shape)
        torch.testing.assert_close(applied, x @ delta.T, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == len([k for k in saved if k.endswith(".alpha")]) > 0


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_captioned_folder(tmp_path_factory.mktemp("photos"), count=4, size=(32, 32))


@pytest.mark.parametrize("lora_type", ["loha", "lokr", "dora"])
def test_each_adapter_type_resumes_bitwise_and_generate_loads_it(tmp_path, tiny_pipeline_dir, photos, lora_type):
    import generate
    import train_text_to_image as script

    common = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", photos, "--resolution", "32",
              "--train_batch_size", "2", "--seed", "0", "--lr_warmup_steps", "0", "--report_to", "none",
              "--use_lora", "--lora_type", lora_type, "--train_text_encoder", "--checkpointing_steps", "1",
              "--learning_rate", "1e-2"]
    run_main_in_process(script, common + ["--max_train_steps", "3", "--output_dir", tmp_path / "straight"])
    run_main_in_process(script, common + ["--max_train_steps", "1", "--output_dir", tmp_path / "stopped"])
    run_main_in_process(script, common + ["--max_train_steps", "3", "--output_dir", tmp_path / "stopped",
                                          "--resume_from_checkpoint", "latest"])
    if lora_type == "dora":  # diffusers' own LoRA file (DoRA magnitudes included)
        files = ["pytorch_lora_weights.safetensors"]
    else:
        files = ["unet_adapter/adapter_model.safetensors", "text_encoder_adapter/adapter_model.safetensors"]
    for file in files + ["pytorch_lora_weights_kohya.safetensors"]:
        straight, resumed = load_file(tmp_path / "straight" / file), load_file(tmp_path / "stopped" / file)
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    if lora_type == "dora":
        assert any("magnitude" in k for k in load_file(tmp_path / "straight" / files[0]))
    # generate.py: the base model + this LoRA differs from the base model alone.
    images = {}
    runs = [("base", []), ("lora", ["--lora", tmp_path / "straight"])]
    if lora_type != "dora":  # the LyCORIS file alone (what another tool's LoHa/LoKr file looks like) gives the same
        runs.append(("file", ["--lora", tmp_path / "straight" / "pytorch_lora_weights_kohya.safetensors"]))
    for name, extra in runs:
        generate.main([str(a) for a in ["--model", tiny_pipeline_dir, "--prompt", "a picture of thing 1", "--steps",
                                        "2", "--seed", "1", "--num_images", "1", "--output_dir", tmp_path / name,
                                        "--device", "cpu", *extra]])
        png = next(f for f in os.listdir(tmp_path / name) if f.startswith("000_"))
        images[name] = np.asarray(Image.open(tmp_path / name / png), dtype=np.int16)
    assert np.abs(images["base"] - images["lora"]).max() > 0
    if "file" in images:
        assert np.abs(images["file"] - images["lora"]).max() <= 1  # (float rounding of the folded LoKr scale)
        assert np.abs(images["file"] - images["base"]).max() > 1


def test_lora_type_needs_use_lora_and_use_dora_is_dora(capsys, tiny_pipeline_dir, photos, tmp_path):
    import train_text_to_image as script
    from test_user_errors import expect_user_error

    base = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", photos, "--output_dir",
            tmp_path / "o"]
    expect_user_error(capsys, script, base + ["--lora_type", "loha"], "--lora_type loha is an adapter type")
    expect_user_error(capsys, script, base + ["--use_lora", "--use_dora", "--lora_type", "lokr"],
                      "--use_dora means --lora_type dora")
