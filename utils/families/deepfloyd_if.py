"""DeepFloyd IF behind the family interface, through diffusers' own classes (diffusers' train_dreambooth.py and
train_dreambooth_lora.py train it; diffusers main, 2026-12, commit 58eb52c0): stage I (IFPipeline, text to 64 px)
and stage II (IFSuperResolutionPipeline, 64 px to 256 px). A pixel-space UNet2DConditionModel with a T5 text
encoder and DDPMScheduler; the UNet predicts epsilon and a learned variance (6 channels), and training uses the
epsilon half, as diffusers' scripts do. diffusers' IF flags: --class_labels_conditioning timesteps (the UNet's class
labels are the timesteps: stage II's UNet is class-conditioned) and --validation_images (stage II's validation
upscales them).

Stage II differs from diffusers' script on purpose: diffusers feeds the noisy image itself as the low-resolution
input (`torch.cat([noisy, noisy])`), which the pipeline never does. Here the second half is what
IFSuperResolutionPipeline gives the UNet: the image at 1/4 size, upscaled bilinearly (align_corners, as the
pipeline) and noised by the pipeline's image_noising_scheduler at the class label's level, so the class label means
at training what it means at sampling (the noise level of the low-resolution input)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.families.sd import StableDiffusion

STAGE_II_FACTOR = 4  # IF's cascade: stage I's 64 px upscaled to stage II's 256 px
# diffusers' train_dreambooth_lora.py's UNet LoRA targets (IF's attention has added key/value projections)
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
PIPELINES = ("IFPipeline", "IFSuperResolutionPipeline")
NOT_FOR_IF = (("train_vae", "a pixel-space model has no VAE"), ("vae_config", "a pixel-space model has no VAE"),
              ("pretrained_vae_model_name_or_path", "a pixel-space model has no VAE"),
              ("do_edm_style_training", "diffusers trains IF with DDPM"), ("dream_training", "IF's UNet is not SD's"),
              ("save_single_file", "IF has no single-file format"))


class PixelSpace(torch.nn.Module):
    """The VAE of a pixel-space model: encoding is the identity (a posterior with zero spread), so the trainer's
    latent path, its caches and val/loss run unchanged on pixels, and nothing is drawn that the SD path does not
    draw (the posterior's sample still takes its random numbers, times a zero std)."""

    def __init__(self):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.register_buffer("probe", torch.zeros(0), persistent=False)  # follows .to(device, dtype)
        self.config = FrozenDict(block_out_channels=(3,), latent_channels=3, scaling_factor=1.0, shift_factor=None,
                                 in_channels=3, out_channels=3, sample_size=64)

    @property
    def dtype(self) -> torch.dtype:
        return self.probe.dtype

    @property
    def device(self) -> torch.device:
        return self.probe.device

    def encode(self, pixels: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        parameters = torch.cat([pixels, torch.zeros_like(pixels)], dim=1)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(parameters, deterministic=True))

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=latents)


def low_resolution_input(images: torch.Tensor, noising_scheduler, levels: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
    """Stage II's second input for `images` [B, 3, H, W]: the image at 1/STAGE_II_FACTOR size (area average),
    upscaled back as IFSuperResolutionPipeline upscales its input, noised at `levels` [B] with `noise`."""
    height, width = images.shape[-2:]
    small = F.interpolate(images.float(), size=(height // STAGE_II_FACTOR, width // STAGE_II_FACTOR), mode="area")
    upscaled = F.interpolate(small, (height, width), mode="bilinear", align_corners=True)
    return noising_scheduler.add_noise(upscaled, noise.float(), levels).to(images.dtype)


class DeepFloydIF(StableDiffusion):
    name = "if"
    model_card_tags = ["if", "if-diffusers", "text-to-image"]
    text_encoder_lora_targets = ("q", "k", "v", "o")  # T5's attention
    class_labels = False  # --class_labels_conditioning timesteps (configure)
    validation_images: tuple[str, ...] = ()

    def implied(self, args) -> dict:
        """IF's pipelines always mask the T5 prompt (IFPipeline.encode_prompt), so training does too (diffusers'
        IF commands pass --text_encoder_use_attention_mask; without it the model would learn other embeddings)."""
        return {"text_encoder_use_attention_mask": True}

    def check_args(self, args) -> None:
        given = [(name, why) for name, why in NOT_FOR_IF if getattr(args, name)]
        if given:
            name, why = given[0]
            raise UserError(f"--{name}: {why}; this is a DeepFloyd IF run (--pretrained_model_name_or_path is an "
                            "IF pipeline): drop the flag.")
        if args.class_labels_conditioning not in (None, "timesteps"):
            raise UserError(f"--class_labels_conditioning {args.class_labels_conditioning}: diffusers' only value is "
                            "'timesteps' (the UNet's class labels are the training timesteps); give that or nothing.")
        if args.lora_format == "kohya" and args.use_lora:
            raise UserError("--lora_format kohya: kohya's layout has no DeepFloyd IF names; an IF LoRA is written in "
                            "diffusers' layout (IFPipeline.load_lora_weights): --lora_format diffusers.")
        super().check_args(args)

    def configure(self, args) -> None:
        super().configure(args)
        self.class_labels = args.class_labels_conditioning == "timesteps"
        self.validation_images = tuple(args.validation_images or ())
        for path in self.validation_images:
            if not os.path.isfile(path):
                raise UserError(f"--validation_images {path}: no such file; give images stage II upscales at "
                                "validation.")

    def load_models(self, source, captions_for_tokenizer) -> dict:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, T5EncoderModel

        from utils.checkpointing import own_memory

        path, revision, variant = source.pretrained_model_name_or_path, source.revision, source.variant
        tokenizer_path = source.tokenizer_name or path
        models = dict(
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
            tokenizer=AutoTokenizer.from_pretrained(tokenizer_path, subfolder=None if source.tokenizer_name
                                                    else "tokenizer", revision=revision),
            text_encoder=own_memory(T5EncoderModel.from_pretrained(path, subfolder="text_encoder", revision=revision,
                                                                   variant=variant)),
            unet=own_memory(UNet2DConditionModel.from_pretrained(path, subfolder="unet",
                                                                 revision=source.non_ema_revision)),
            vae=PixelSpace())
        if os.path.isdir(os.path.join(path, "image_noising_scheduler")) or self.stage_ii(models):
            models["image_noising_scheduler"] = DDPMScheduler.from_pretrained(
                path, subfolder="image_noising_scheduler", revision=revision)
        if source.prediction_type is not None:
            models["noise_scheduler"].register_to_config(prediction_type=source.prediction_type)
        self.check_unet(models["unet"], path)
        return models

    @staticmethod
    def stage_ii(models) -> bool:
        """Stage II's UNet takes the noisy image and the upscaled low-resolution one (6 input channels)."""
        return models["unet"].config.in_channels == 2 * 3

    def check_unet(self, unet, path: str) -> None:
        if unet.config.class_embed_type is not None and not self.class_labels:
            raise UserError(f"--pretrained_model_name_or_path {path}: this IF UNet is class-conditioned (stage II: "
                            "the noise level of its low-resolution input); pass --class_labels_conditioning "
                            "timesteps, as diffusers' stage II commands do.")
        if self.validation_images and unet.config.in_channels == 3:
            raise UserError("--validation_images are images for stage II to upscale; this is a stage I IF model "
                            "(text to image): drop the flag.")

    # --- the UNet's inputs and output (utils.sd.losses.diffusion_loss, held_out_error) --------------------------
    def unet_inputs(self, models, sample, latents, timesteps, noise=None) -> tuple[torch.Tensor, dict]:
        """Class labels (the timesteps) with --class_labels_conditioning; stage II: the low-resolution input beside
        the noisy image, noised at the class label's level (0 without class labels)."""
        extra = {"class_labels": timesteps} if self.class_labels else {}
        if not self.stage_ii(models):
            return sample, extra
        scheduler = models.get("image_noising_scheduler") or models["noise_scheduler"]
        levels = timesteps if self.class_labels else torch.zeros_like(timesteps)
        noise = torch.randn_like(latents) if noise is None else noise()
        return torch.cat([sample, low_resolution_input(latents, scheduler, levels, noise)], dim=1), extra

    def unet_output(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction[:, :3] if prediction.shape[1] == 6 else prediction  # epsilon, not the learned variance

    def lora_targets(self, args) -> list[str]:
        return args.lora_target_modules or list(LORA_TARGETS)

    def save_lora(self, directory, denoiser, encoders, lora_format="diffusers", metadata=None, dtype=None) -> str:
        """diffusers' file only (--lora_format both: kohya's layout has no IF names; kohya itself is refused), its
        T5 keys in diffusers' `lora_linear_layer` names: the loader (IFPipeline.load_lora_weights, and our resume
        through diffusers' `_set_state_dict_into_text_encoder`) maps peft's lora_A/lora_B names to those for CLIP's
        projections only, and fails on T5's q/k/v/o."""
        path = super().save_lora(directory, denoiser, encoders, "diffusers", metadata, dtype)
        if encoders and os.path.isfile(path):  # (LoHa/LoKr: peft folders, read by peft)
            from safetensors import safe_open
            from safetensors.torch import load_file, save_file

            from utils.atomic import atomic_file

            with safe_open(path, "pt") as handle:
                file_metadata = handle.metadata()
            renamed = {(key.replace(".lora_A.weight", ".lora_linear_layer.down.weight")
                        .replace(".lora_B.weight", ".lora_linear_layer.up.weight")
                        if key.startswith("text_encoder.") else key): value for key, value in load_file(path).items()}
            with atomic_file(path) as temp:
                save_file(renamed, temp, metadata=file_metadata)
        return path

    def latent_multiple(self, models) -> int:
        return 2 ** (len(models["unet"].config.block_out_channels) - 1)

    # --- sampling and saving ------------------------------------------------------------------------------------
    def pipeline(self, components, scheduler=None):
        import diffusers

        stage_ii = self.stage_ii(components)
        parts = dict(tokenizer=components.get("tokenizer"), text_encoder=components.get("text_encoder"),
                     unet=components["unet"], scheduler=inference_scheduler(components["scheduler"], scheduler),
                     safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
        if stage_ii:
            parts["image_noising_scheduler"] = components.get("image_noising_scheduler") or \
                diffusers.DDPMScheduler.from_config(components["scheduler"].config)
        return getattr(diffusers, PIPELINES[stage_ii])(**parts)

    def validation_samples(self, prompts, resolution):
        """Stage II: each prompt with each --validation_images image to upscale (diffusers' loop)."""
        if not self.validation_images:
            return prompts, None
        from PIL import Image

        pairs = [(prompt, path) for prompt in prompts for path in self.validation_images]
        return [prompt for prompt, _ in pairs], [{"image": Image.open(path).convert("RGB")} for _, path in pairs]

    def conditions_of(self, items):
        """Stage II's held-out samples upscale their own image's low-resolution copy."""
        if not self.validation_images:
            return None
        from utils.images import tensor_to_pil

        small = [F.interpolate(item["pixel_values"][None].float(), scale_factor=1 / STAGE_II_FACTOR, mode="area")
                 for item in items]
        return [{"image": image} for image in tensor_to_pil(torch.cat(small))]

    def pipeline_call_kwargs(self) -> dict:
        return {"clean_caption": False}  # the captions as trained (the cleaner needs bs4 and ftfy)

    def write_pipeline(self, output, models, unwrapped, directory) -> None:
        """diffusers' train_dreambooth.py's output: the base pipeline with the trained UNet (and text encoder, unless
        --skip_save_text_encoder) and the scheduler set to ignore the learned variance (fixed_small)."""
        import diffusers

        from utils.sd.saving import float32_components

        components = {"unet": unwrapped["unet"], "text_encoder": None if output.skip_text_encoder
                      else unwrapped["text_encoder"]}
        pipeline = diffusers.DiffusionPipeline.from_pretrained(output.base, revision=output.revision,
                                                               variant=output.variant, **components)
        pipeline.scheduler = inference_scheduler(pipeline.scheduler, None)
        with float32_components(pipeline):
            pipeline.save_pretrained(directory)

    def lora_metadata(self, output, models) -> dict:
        return {}


def inference_scheduler(scheduler, name: str | None):
    """The sampler of an IF model trained on the simple objective (the epsilon half): its learned variance ignored
    (variance_type fixed_small, diffusers' rule), as --validation_scheduler (None: DDPM, the training one's kind)."""
    import diffusers

    variance = scheduler.config.get("variance_type")
    overrides = {"variance_type": "fixed_small"} if variance in ("learned", "learned_range") else {}
    scheduler_class = getattr(diffusers, name or "DDPMScheduler")
    return scheduler_class.from_config(scheduler.config, **overrides)


def build_tiny_if_pipeline(output_dir: str, texts=None, seed: int = 0, stage_ii: bool = False) -> str:
    """A loadable tiny IFPipeline (stage II: IFSuperResolutionPipeline) folder: the components of diffusers' own IF
    tests (tests/pipelines/deepfloyd_if/__init__.py, _get_dummy_components / _get_superresolution_dummy_components),
    the offline stand-in of hf-internal-testing/tiny-if-pipe; the T5 sized as tiny-random-t5, its tokenizer
    generated offline (utils/sd/builder.py)."""
    import diffusers
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from utils.sd.builder import build_t5_tokenizer, tiny_t5_encoder

    tokenizer = build_t5_tokenizer(os.path.join(output_dir, "tokenizer"), texts, model_max_length=77)
    text_encoder = tiny_t5_encoder(tokenizer, seed)
    stage = dict(in_channels=6, layers_per_block=[1, 2], class_embed_type="timestep", mid_block_scale_factor=1.414,
                 time_embedding_act_fn="gelu", time_embedding_dim=32) if stage_ii else \
        dict(in_channels=3, layers_per_block=1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=[32, 64], down_block_types=["ResnetDownsampleBlock2D",
                                                                       "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["SimpleCrossAttnUpBlock2D",
                                                                        "ResnetUpsampleBlock2D"],
        out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", **stage)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                              beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                              prediction_type="epsilon", variance_type="learned_range")
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
                 feature_extractor=None, watermarker=None, requires_safety_checker=False)
    if stage_ii:
        parts["image_noising_scheduler"] = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                                         beta_start=0.0001, beta_end=0.02)
    getattr(diffusers, PIPELINES[stage_ii])(**parts).save_pretrained(output_dir)
    return output_dir
