"""Stable Diffusion 1.x/2.x and XL behind the family interface: UNet2DConditionModel, DDPM noise with an epsilon or
v target (utils/sd/losses.py), CLIP text encoders (SDXL: two, a pooled prompt and time ids). The mechanisms live in
utils/sd/ (they predate the interface); this module is the map from the interface to them."""

from __future__ import annotations

import torch

from utils.errors import UserError
from utils.families.base import Family
from utils.latents import vae_scale_factor

# diffusers' SDXL model cards
SDXL_TAGS = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image"]
FLOW_ONLY_FLAGS = ("weighting_scheme", "max_sequence_length", "lora_layers", "lora_blocks", "precondition_outputs",
                   "system_prompt")


class StableDiffusion(Family):
    name = "sd"
    denoiser = "unet"
    sdxl = False
    edm = False  # --do_edm_style_training (configure)

    def defaults(self, args) -> dict:
        """The four diffusers text-to-image scripts differ in these; we follow whichever one the run is."""
        lora, sdxl = args.use_lora, self.sdxl
        return {"resolution": 1024 if sdxl else 512,
                "output_dir": "sd-model-finetuned-lora" if lora else
                              ("sdxl-model-finetuned" if sdxl else "sd-model-finetuned"),
                "validation_epochs": 1 if lora or sdxl else 5, "num_validation_images": 4 if lora or sdxl else 1,
                "tracker_project_name": "text2image-fine-tune-sdxl" if sdxl and not lora else "text2image-fine-tune"}

    def check_args(self, args) -> None:
        from utils.sd.args import check_sdxl_args
        from utils.sd.edm import check_edm_args

        given = [f"--{name}" for name in FLOW_ONLY_FLAGS if getattr(args, name) is not None]
        if args.offload:
            given.append("--offload")
        if given:
            raise UserError(f"{given[0]} is a flag of the flow-matching families (SD3, FLUX, Lumina-2); this is a "
                            f"Stable Diffusion {'XL' if self.sdxl else '1.x/2.x'} run: drop it.")
        if self.sdxl:
            check_sdxl_args(args)
        check_edm_args(args)
        if args.do_edm_style_training and args.validation_split:
            raise UserError("--validation_split scores the DDPM objective; an EDM-style run (--do_edm_style_training) "
                            "has another: drop one of them.")

    def configure(self, args) -> None:
        self.edm = args.do_edm_style_training

    def load_models(self, source, captions_for_tokenizer) -> dict:
        from utils.sd.edm import edm_noise_scheduler
        from utils.sd.models import load_models

        models = load_models(source, captions_for_tokenizer)
        if self.edm:  # diffusers' SDXL DreamBooth LoRA script: Euler's sigmas (utils/sd/edm.py)
            models["noise_scheduler"] = edm_noise_scheduler(models["noise_scheduler"].config)
        return models

    def latent_multiple(self, models) -> int:
        return vae_scale_factor(models["vae"]) * 2 ** (len(models["unet"].config.block_out_channels) - 1)

    def encode_text(self, models, input_ids, attention_mask) -> dict:
        encoders = [models[name] for name in self.text_encoder_names(models)]
        if len(encoders) == 2:
            from utils.sd.sdxl import encode_prompt

            hidden, pooled = encode_prompt(encoders, input_ids, attention_mask)
            return {"encoder_hidden_states": hidden, "pooled_prompt_embeds": pooled}
        return {"encoder_hidden_states": encoders[0](input_ids, attention_mask=attention_mask, return_dict=False)[0]}

    def training_loss(self, args, models, batch, monitor) -> torch.Tensor:
        from utils.sd.losses import diffusion_loss

        return diffusion_loss(args, models, batch, monitor, self)

    def held_out_error(self, models, batch, latents, noise, indices, autocast) -> torch.Tensor:
        from utils.sd.controlnet import controlnet_residuals
        from utils.sd.sdxl import unet_conditioning
        from utils.sd.validation import held_out_timestep

        scheduler, device = models["noise_scheduler"], latents.device
        timesteps = torch.tensor([held_out_timestep(index, scheduler.config.num_train_timesteps) for index in indices],
                                 device=device, dtype=torch.long)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states, added = unet_conditioning(models, batch, latents, device)
        target = noise if scheduler.config.prediction_type == "epsilon" \
            else scheduler.get_velocity(latents, noise, timesteps)
        with autocast():
            residuals = controlnet_residuals(models, batch, noisy_latents, timesteps, encoder_hidden_states, added)
            unet_input, extra = self.unet_inputs(models, noisy_latents, latents, timesteps,
                                                 lambda: held_out_input_noise(indices, latents))
            prediction = self.unet_output(models["unet"](unet_input, timesteps, encoder_hidden_states,
                                                         added_cond_kwargs=added, **extra, **residuals,
                                                         return_dict=False)[0])
        return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

    def unet_inputs(self, models, sample, latents, timesteps, noise=None) -> tuple[torch.Tensor, dict]:
        """The UNet's sample and extra keyword arguments for the noisy `sample` of `latents` at `timesteps`
        (`noise()`: the fixed noise a family that draws more noise uses for held-out samples, None: draw from the
        global generator); SD: as they are."""
        return sample, {}

    def unet_output(self, prediction: torch.Tensor) -> torch.Tensor:
        """The part of the UNet's output the loss compares with the target; SD: all of it."""
        return prediction

    def vae_in_float32(self, args) -> bool:
        # SDXL's VAE overflows in fp16: fp32 unless a fixed VAE is given (diffusers' SDXL LoRA script's rule).
        return self.sdxl and args.pretrained_vae_model_name_or_path is None

    def lora_targets(self, args) -> list[str]:
        from utils.sd.lora import DEFAULT_UNET_TARGETS

        return args.lora_target_modules or DEFAULT_UNET_TARGETS

    def save_lora(self, directory, denoiser, encoders, lora_format="diffusers", metadata=None, dtype=None) -> str:
        from utils.sd.lora import save_lora

        return save_lora(directory, denoiser, **encoders, lora_format=lora_format, metadata=metadata)

    def load_lora_into(self, directory, denoiser, encoders) -> None:
        from utils.sd.lora import load_lora_into

        load_lora_into(directory, denoiser, **encoders)

    def pipeline(self, components, scheduler=None):
        from utils.sd.builder import assemble_pipeline
        from utils.sd.schedulers import make_scheduler

        names = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
        parts = {name: components[name] for name in names if components.get(name) is not None}
        if scheduler is not None:
            parts["scheduler"] = make_scheduler("ddpm" if scheduler == "DDPMScheduler" else "dpm++",
                                                parts["scheduler"].config)
        return assemble_pipeline(parts)

    def write_pipeline(self, output, models, unwrapped, directory) -> None:
        from utils.sd.saving import write_sd_pipeline

        write_sd_pipeline(output, models, unwrapped, directory)

    def lora_metadata(self, output, models) -> dict:
        from utils.sd.saving import lora_metadata

        return lora_metadata(output, models["unet"], models["noise_scheduler"])


def held_out_input_noise(indices: list[int], latents: torch.Tensor) -> torch.Tensor:
    """More fixed noise per held-out sample (a second stream of each index's own; never the global generator)."""
    from utils.sd.validation import held_out_noise

    return torch.stack([held_out_noise(index, 1, latents.shape[1:]) for index in indices]).to(latents.device)


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    sdxl = True
    model_card_tags = SDXL_TAGS
