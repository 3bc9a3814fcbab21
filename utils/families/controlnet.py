"""ControlNet on Stable Diffusion 1.x/2.x and XL behind the family interface (train_controlnet.py): the SD family's
models, data and objective, with a ControlNet as the trained network ("controlnet" in `models`, checkpoint-N/
controlnet/) and the UNet frozen; the objective is the SD one with the ControlNet's residuals added to the UNet
(utils/sd/losses.py, utils/sd/controlnet.py); validation samples diffusers' ControlNet pipelines; the output is
the ControlNet alone (diffusers' `controlnet.save_pretrained(output_dir)`) plus conditioning.json."""

from __future__ import annotations

import json
import os

import torch

from utils.families.sd import StableDiffusion, StableDiffusionXL
from utils.latents import vae_scale_factor
from utils.sd.controlnet import (ConditioningImages, ControlNetSettings, check_controlnet_args, load_controlnet,
                                 validation_pairs)

CONDITIONING_FILE = "conditioning.json"  # how generate.py reads a control image for this ControlNet


class ControlNetMixin:
    denoiser = "controlnet"
    model_card_tags = ["controlnet", "diffusers-training"]
    conditioning_images: ConditioningImages | None = None
    settings: ControlNetSettings | None = None  # configure()
    crops_coords: tuple[int, int] | None = None  # SDXL: fixed crop coordinates for the time ids

    def defaults(self, args) -> dict:
        return {**super().defaults(args), "output_dir": "controlnet-model", "num_validation_images": 4,
                "validation_epochs": 1,
                "tracker_project_name": "sd_xl_train_controlnet" if self.sdxl else "train_controlnet"}

    def check_args(self, args) -> None:
        check_controlnet_args(args)
        super().check_args(args)

    def configure(self, args) -> None:
        super().configure(args)
        self.settings = ControlNetSettings.from_args(args)
        self.conditioning_images, self.crops_coords = self.settings.conditioning(), self.settings.crops_coords()

    def load_models(self, source, captions_for_tokenizer) -> dict:
        models = super().load_models(source, captions_for_tokenizer)
        settings = self.settings
        models["controlnet"] = load_controlnet(settings.controlnet_model_name_or_path, models["unet"],
                                               self.conditioning_images.channels, vae_scale_factor(models["vae"]),
                                               settings.revision, settings.variant)
        return models

    def frozen_networks(self, models) -> list[str]:
        return ["unet"]

    def training_loss(self, args, models, batch, monitor) -> torch.Tensor:
        if self.crops_coords is not None:  # diffusers' SDXL ControlNet script: the same crop for every sample
            batch = dict(batch, crop_top_left=torch.tensor([self.crops_coords] * len(batch["captions"])))
        return super().training_loss(args, models, batch, monitor)

    def pipeline(self, components, scheduler=None):
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

        plain = super().pipeline(components, scheduler)  # the SD (XL) pipeline's parts, its sampler
        parts = {name: part for name, part in plain.components.items() if part is not None}
        parts["controlnet"] = components["controlnet"]
        if self.sdxl:
            return StableDiffusionXLControlNetPipeline(**parts, add_watermarker=False)
        return StableDiffusionControlNetPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)

    def validation_samples(self, prompts: list[str], resolution: int) -> tuple[list[str], list[dict] | None]:
        """The --validation_prompt/--validation_image pairs: the prompts, each with its conditioning image."""
        pairs = validation_pairs(prompts, list(self.settings.validation_image or []))
        return [prompt for prompt, _ in pairs], [
            {"image": self.conditioning_images.at_size(path, resolution, resolution)[None]} for _, path in pairs]

    def conditions_of(self, items: list[dict]) -> list[dict] | None:
        return [{"image": item["conditioning_pixel_values"][None]} for item in items]

    def model_card_text(self, base_model: str) -> dict:
        pipeline = "StableDiffusionXLControlNetPipeline" if self.sdxl else "StableDiffusionControlNetPipeline"
        return {"description": f"A ControlNet for `{base_model}`, trained with this repository's "
                               "`train_controlnet.py` (Hugging Face Accelerate + diffusers).",
                "usage": ("## Usage\n\n```python\nimport torch\nfrom diffusers import ControlNetModel, "
                          f"{pipeline}\nfrom diffusers.utils import load_image\n\n"
                          'controlnet = ControlNetModel.from_pretrained("MODEL_REF", torch_dtype=torch.float16)\n'
                          f'pipe = {pipeline}.from_pretrained("{base_model}", controlnet=controlnet, '
                          'torch_dtype=torch.float16).to("cuda")\n'
                          'image = pipe("your prompt", image=load_image("control.png")).images[0]\n```\n\n'
                          "or, from this repository:\n\n```bash\npython generate.py --model "
                          f'{base_model} --controlnet MODEL_REF --control_image control.png --prompt "..."\n```')}

    def write_pipeline(self, output, models, unwrapped, directory) -> None:
        unwrapped["controlnet"].save_pretrained(directory)
        with open(os.path.join(directory, CONDITIONING_FILE), "w", encoding="utf-8") as handle:
            json.dump({"num_classes": self.conditioning_images.num_classes, "base_model": output.base}, handle, indent=1)


class ControlNetSD(ControlNetMixin, StableDiffusion):
    name = "sd-controlnet"


class ControlNetSDXL(ControlNetMixin, StableDiffusionXL):
    name = "sdxl-controlnet"
