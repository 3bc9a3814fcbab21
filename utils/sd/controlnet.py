"""ControlNet on a frozen Stable Diffusion (XL) UNet, for train_controlnet.py: the flags of diffusers'
examples/controlnet/train_controlnet.py and train_controlnet_sdxl.py (same names, defaults and meaning), the
ControlNet's start (loaded, or diffusers' `ControlNetModel.from_unet`), the conditioning image as the model reads
it (through the training image's own resize, crop and flip), and the UNet's residual inputs.

The conditioning image is [C, H, W] in [0, 1] (diffusers' scripts: `ToTensor()`, no normalisation; the pipelines'
control image processor does the same). With --conditioning_num_classes K it is a class-index mask (0 =
background, k = class k, as train_mask_dit.py reads masks) one-hot encoded into K channels, and the ControlNet
takes K conditioning channels."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError
from utils.images import INTERPOLATION_MODES, cover_size, crop_and_flip, crop_origin, load_image

logger = logging.getLogger(__name__)

# diffusers' train_controlnet(_sdxl).py defaults where they differ from train_text_to_image.py's (diffusers
# resizes and centre-crops every image: no random crop).
CONTROLNET_DEFAULTS = {"train_batch_size": 4, "num_train_epochs": 1, "learning_rate": 5e-6, "validation_steps": 100,
                       "center_crop": True}


def add_controlnet_args(parser) -> None:
    group = parser.add_argument_group("ControlNet (diffusers' train_controlnet.py / train_controlnet_sdxl.py)")
    group.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                       help="A ControlNet (folder or Hub id) to go on training; default: initialised from the UNet "
                            "(diffusers' ControlNetModel.from_unet: the encoder copied, zero convolutions at 0).")
    group.add_argument("--conditioning_image_column", type=str, default="conditioning_image",
                       help="The column of the dataset containing the controlnet conditioning image (a path in a "
                            "CSV/JSONL/metadata.jsonl, relative to that file).")
    group.add_argument("--validation_image", type=str, default=None, nargs="+",
                       help="Conditioning images for the --validation_prompt(s): one per prompt, one for all prompts, "
                            "or one prompt for all images (diffusers' rule).")
    group.add_argument("--conditioning_num_classes", type=int, default=None,
                       help="The conditioning images are class-index masks (0 = background, k = class k <= K, e.g. "
                            "the synthetic fundus masks; K = 1: 0/255 masks, thresholded at 128, as train_mask_dit.py "
                            "reads them): one-hot into K channels, the ControlNet takes K. Default: RGB images, 3 "
                            "channels.")
    group.add_argument("--crops_coords_top_left_h", type=int, default=None,
                       help="SDXL: the crop top the time ids say for every sample (diffusers' SDXL ControlNet script "
                            "uses 0). Default: each sample's real crop, as train_text_to_image.py.")
    group.add_argument("--crops_coords_top_left_w", type=int, default=None,
                       help="SDXL: the crop left the time ids say for every sample (see --crops_coords_top_left_h).")


NOT_FOR_CONTROLNET = {"use_lora": "--use_lora", "train_text_encoder": "--train_text_encoder",
                      "model_preset": "--model_preset", "train_vae": "--train_vae",
                      "with_prior_preservation": "--with_prior_preservation",
                      "do_edm_style_training": "--do_edm_style_training", "dream_training": "--dream_training",
                      "save_single_file": "--save_single_file", "instance_data_dir": "--instance_data_dir",
                      "final_validation_prompt": "--final_validation_prompt"}


def check_controlnet_args(args) -> None:
    """One-block errors for what a ControlNet run cannot take (before anything runs)."""
    given = [flag for name, flag in NOT_FOR_CONTROLNET.items() if getattr(args, name)]
    if given:
        raise UserError(f"{given[0]} is not for ControlNet training: train_controlnet.py trains a full ControlNet on a "
                        "frozen pretrained pipeline (diffusers' train_controlnet.py). Drop it, or use "
                        "train_text_to_image.py for that.")
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a ControlNet steers a trained Stable Diffusion "
                        "(XL) pipeline (a folder or Hub id).")
    if args.conditioning_num_classes is not None and args.conditioning_num_classes < 1:
        raise UserError(f"--conditioning_num_classes {args.conditioning_num_classes}: give the number of mask classes "
                        "(>= 1), or leave it out for RGB conditioning images.")
    prompts, images = args.validation_prompts or [], args.validation_image or []
    if bool(prompts) != bool(images):
        raise UserError("--validation_prompt and --validation_image go together (a ControlNet samples a prompt under "
                        "a conditioning image): give both or neither.")
    if prompts and len(prompts) != len(images) and 1 not in (len(prompts), len(images)):
        raise UserError(f"{len(prompts)} --validation_prompt and {len(images)} --validation_image: give as many of "
                        "each, or one of either (used with every one of the other).")
    for path in images:
        if not os.path.isfile(path):
            raise UserError(f"--validation_image {path}: no such file")


def validation_pairs(prompts: list[str], images: list[str]) -> list[tuple[str, str]]:
    """(prompt, conditioning image path) pairs, diffusers' rule: zipped, or the single one of either repeated."""
    if len(images) == 1:
        images = images * len(prompts)
    elif len(prompts) == 1:
        prompts = prompts * len(images)
    return list(zip(prompts, images))


@dataclass(frozen=True)
class ControlNetSettings:
    """train_controlnet.py's ControlNet flags, typed (`from_args`: the flags of the same names)."""

    controlnet_model_name_or_path: str | None
    conditioning_image_column: str
    conditioning_num_classes: int | None
    image_interpolation_mode: str
    train_data_file: str | None  # (relative conditioning paths are relative to the data's table or folder)
    train_data_dir: str | None
    revision: str | None
    variant: str | None
    crops_coords_top_left_h: int | None
    crops_coords_top_left_w: int | None
    validation_image: list[str] | None

    @classmethod
    def from_args(cls, args) -> "ControlNetSettings":
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def conditioning(self) -> "ConditioningImages":
        root = os.path.dirname(os.path.abspath(self.train_data_file)) if self.train_data_file else self.train_data_dir
        return ConditioningImages(self.conditioning_image_column, self.conditioning_num_classes,
                                  self.image_interpolation_mode, root)

    def crops_coords(self) -> tuple[int, int] | None:
        """SDXL's fixed crop coordinates for the time ids (None: each sample's own crop)."""
        if self.crops_coords_top_left_h is None and self.crops_coords_top_left_w is None:
            return None
        return self.crops_coords_top_left_h or 0, self.crops_coords_top_left_w or 0


@dataclass(frozen=True)
class ConditioningImages:
    """How a row's conditioning image becomes the ControlNet's input (`__call__`)."""

    column: str
    num_classes: int | None = None  # class-index masks, one-hot; None: RGB
    interpolation: str = "bilinear"
    root: str | None = None  # a relative path in a CSV/JSONL/metadata.jsonl is relative to the table's folder

    @property
    def channels(self) -> int:
        return self.num_classes or 3

    def to_tensor(self, image: Image.Image, name: str) -> torch.Tensor:
        """A PIL image at its final size -> [C, H, W] in [0, 1] (one-hot {0, 1} for class masks)."""
        if self.num_classes is None:
            return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        from utils.mask_dit.data import mask_to_channels  # (the mask DiT's reading: one rule for masks)

        index = np.asarray(image.convert("L"), dtype=np.uint8)
        return torch.from_numpy(mask_to_channels(index, self.num_classes, name, "--conditioning_num_classes"))

    def __call__(self, value, name: str, resized_size: tuple[int, int], crop: tuple[int, int], flip: bool,
                 target: tuple[int, int]) -> torch.Tensor:
        """The conditioning image `value` (path, datasets Image dict, PIL) through the training image's resize (to
        `resized_size`, (width, height)), crop ((top, left), `target` = (width, height)) and flip."""
        if isinstance(value, str) and self.root and not os.path.isabs(value):
            value = os.path.join(self.root, value)
        image = load_image(value, name=name)
        if image.size != resized_size:  # masks: nearest, so a class index never blends into another
            mode = Image.Resampling.NEAREST if self.num_classes else INTERPOLATION_MODES[self.interpolation]
            image = image.resize(resized_size, mode)
        return self.to_tensor(crop_and_flip(image, crop, flip, target), name)

    def at_size(self, path: str, width: int, height: int) -> torch.Tensor:
        """A validation conditioning image resized and centre-cropped to (width, height): [C, H, W]."""
        image = load_image(path, name=path)
        resized = cover_size(image.size, (width, height))
        return self(image, path, resized, crop_origin(resized, (width, height), True, None), False, (width, height))


# diffusers' ControlNetModel default: 3 stride-2 convolutions, the conditioning image to the latents' size (VAE x8).
CONDITIONING_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def load_controlnet(path: str | None, unet, conditioning_channels: int, vae_factor: int, revision: str | None = None,
                    variant: str | None = None):
    """The ControlNet to train: `path`'s (its conditioning channels and downsampling checked), or initialised from the
    UNet (`ControlNetModel.from_unet`, with as many stride-2 steps in the conditioning embedding as the VAE has:
    diffusers' default for a x8 VAE; a tiny test VAE downsamples less)."""
    from diffusers import ControlNetModel

    if path is None:
        logger.info("Initializing controlnet weights from unet")
        steps = max(0, vae_factor.bit_length() - 1)
        return ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels,
                                         conditioning_embedding_out_channels=CONDITIONING_EMBEDDING_CHANNELS[:steps + 1])
    logger.info("Loading existing controlnet weights")
    kwargs = {} if os.path.isdir(path) else {"revision": revision, "variant": variant}
    controlnet = ControlNetModel.from_pretrained(path, **kwargs)
    downsampling = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    if downsampling != vae_factor:
        raise UserError(f"--controlnet_model_name_or_path {path} brings its conditioning image down {downsampling}x, "
                        f"the pipeline's VAE {vae_factor}x: this ControlNet is for another base model.")
    if controlnet.config.conditioning_channels != conditioning_channels:
        raise UserError(f"--controlnet_model_name_or_path {path} takes {controlnet.config.conditioning_channels} "
                        f"conditioning channels, this run's images have {conditioning_channels} (--conditioning_num_"
                        "classes): give the matching flag, or leave out the ControlNet to start one from the UNet.")
    return controlnet


def controlnet_residuals(models: dict, batch: dict, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                         encoder_hidden_states: torch.Tensor, added_conditions: dict | None) -> dict:
    """The UNet's extra keyword arguments: the ControlNet's down/mid residuals for the batch's conditioning images
    (models["controlnet"]); {} for a run without a ControlNet."""
    controlnet = models.get("controlnet")
    if controlnet is None:
        return {}
    conditioning = batch["conditioning_pixel_values"].to(noisy_latents.device, torch.float32)
    down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                           controlnet_cond=conditioning, added_cond_kwargs=added_conditions, return_dict=False)
    dtype = models["unet"].dtype  # (diffusers' scripts: the residuals in the frozen UNet's dtype)
    return {"down_block_additional_residuals": [residual.to(dtype) for residual in down],
            "mid_block_additional_residual": mid.to(dtype)}
