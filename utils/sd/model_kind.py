"""What kind of model a path holds, read without loading it: a single checkpoint file, an SDXL or SD pipeline
(folder, Hub id or file). A leaf module (it imports nothing of ours), so the loaders and the SDXL and
single-file code can all ask it without importing each other."""

from __future__ import annotations

import json
import os

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def is_single_file(path: str | None) -> bool:
    return bool(path) and path.lower().endswith(SINGLE_FILE_SUFFIXES)


SDXL_PIPELINE = "StableDiffusionXLPipeline"
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model.ln_final.weight"  # OpenCLIP bigG, SDXL's second encoder
# A part of a key only that family's single files hold (SD3's MMDiT joint blocks; FLUX's double-stream blocks in
# BFL's layout; Lumina-2's context refiner in Alpha-VLLM's; with or without ComfyUI's "model.diffusion_model."
# prefix), checked in this order.
SINGLE_FILE_MARKERS = ((SDXL_SINGLE_FILE_KEY, SDXL_PIPELINE),
                       ("joint_blocks.0.context_block.attn.qkv.weight", "StableDiffusion3Pipeline"),
                       ("double_blocks.0.img_attn.qkv.weight", "FluxPipeline"),
                       ("context_refiner.0.attention.qkv.weight", "Lumina2Pipeline"))


def pipeline_class_name(path: str, revision: str | None = None) -> str | None:
    """model_index.json's _class_name of a pipeline folder or Hub id (None when it cannot be read); a single file's
    family from its keys (SINGLE_FILE_MARKERS; SD 1.x/2.x otherwise)."""
    if is_single_file(path):
        if not os.path.isfile(path):
            return None
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as handle:
                keys = set(handle.keys())
        except Exception:  # a .ckpt (pickle) or a damaged file: the loader says what is wrong
            return None
        for key_part, pipeline in SINGLE_FILE_MARKERS:
            if any(key_part in key for key in keys):
                return pipeline
        return "StableDiffusionPipeline"
    index = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        try:
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(path, "model_index.json", revision=revision)
        except Exception:  # offline, private or not a pipeline: the model loader gives the real error
            return None
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as handle:
        return json.load(handle).get("_class_name")


# model_index.json's pipeline class -> the family module that trains it (utils/families/).
FAMILY_OF_PIPELINE = {SDXL_PIPELINE: "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
                      "Lumina2Pipeline": "lumina2", "Lumina2Text2ImgPipeline": "lumina2",
                      "IFPipeline": "if", "IFSuperResolutionPipeline": "if"}
PRESET_FAMILIES = {"tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux", "tiny-lumina2": "lumina2"}


def family_name(args) -> str:
    """The model family of a run: sd (SD 1.x/2.x, also what an unreadable or unknown pipeline is taken for: the
    loader then says what is wrong), sdxl, sd3, flux, lumina2 or if (DeepFloyd IF); from --model_preset or the pipeline's class."""
    if getattr(args, "model_preset", None):
        return PRESET_FAMILIES.get(args.model_preset, "sd")
    if not getattr(args, "pretrained_model_name_or_path", None):
        return "sd"
    name = pipeline_class_name(args.pretrained_model_name_or_path, getattr(args, "revision", None))
    return FAMILY_OF_PIPELINE.get(name, "sd")


def is_sdxl_run(args) -> bool:
    return family_name(args) == "sdxl"
