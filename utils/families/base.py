"""The interface a model family fills in for train_text_to_image.py (one module a family: sd.py, sd3.py, ...).

The trainer never asks which family it runs; it calls these methods. A new family is one module with a subclass
of `Family` that sets the class attributes and implements every method that raises NotImplementedError here,
then one line in `utils/families/__init__.py`'s FAMILIES and, for detection, one in
`utils/sd/model_kind.py`'s FAMILY_OF_PIPELINE (README: "Adding a model family").

`models`: the dict of the run's components by their pipeline names (vae, text_encoder, tokenizer, ..., the
denoiser under `Family.denoiser`, the training scheduler as noise_scheduler)."""

from __future__ import annotations

import torch


class Family:
    name = ""  # sd, sdxl, sd3, ...
    sdxl = False  # Stable Diffusion XL's conditioning (two CLIP encoders, pooled prompt, time ids)
    denoiser = "unet"  # the key of the trained network in `models` and its checkpoint subfolder (unet, transformer)
    model_card_tags: list[str] | None = None  # diffusers' model-card tags for the family (None: the card's default)
    conditioning_images = None  # ControlNet: how a row's conditioning image is read (utils.sd.controlnet.ConditioningImages)

    # --- parse time -------------------------------------------------------------------------------------------
    def defaults(self, args) -> dict:
        """Values for the flags whose default depends on the family (resolution, output_dir, ...); only flags the
        user left at None are filled."""
        return {}

    def implied(self, args) -> dict:
        """Flag values this family always runs with, whatever was given (e.g. Lumina-2's text attention mask)."""
        return {}

    def check_args(self, args) -> None:
        """One-block errors for flags this family cannot take."""

    def configure(self, args) -> None:
        """Take the run's family settings (e.g. the T5 prompt length) before anything is built."""

    # --- models and text --------------------------------------------------------------------------------------
    def load_models(self, source, captions_for_tokenizer) -> dict:
        """The components from a pipeline folder, Hub id or single file (`source`: utils.sd.models.ModelSource), or
        fresh from --model_preset."""
        raise NotImplementedError

    def latent_multiple(self, models) -> int:
        """Image sides must be multiples of this many pixels (VAE downsampling x the denoiser's own)."""
        raise NotImplementedError

    def token_pixels(self, models) -> int | None:
        """The image pixels one token of the denoiser covers along a side (transformers); None: not a token model."""
        return None

    def text_encoder_names(self, models) -> list[str]:
        """The pipeline's text encoders present in `models`, in the order `encode_text` takes their token rows."""
        return [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if models.get(name) is not None]

    def trainable_text_encoder_names(self, models) -> list[str]:
        """Those --train_text_encoder trains (all of them unless the family says otherwise)."""
        return self.text_encoder_names(models)

    def tokenizers(self, models) -> list:
        """The tokenizers in order (their token rows are stacked per sample: [n_tokenizers, L])."""
        return [models[name] for name in ("tokenizer", "tokenizer_2", "tokenizer_3") if models.get(name) is not None]

    def encode_text(self, models, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        """Token ids [B, n_tokenizers, L] (or [B, L]) -> the denoiser's text conditioning:
        {"encoder_hidden_states": [B, S, D]} and, where the family has one, {"pooled_prompt_embeds": [B, P]}
        (what the text cache stores)."""
        raise NotImplementedError

    # --- training ---------------------------------------------------------------------------------------------
    def training_loss(self, args, models, batch: dict, monitor) -> torch.Tensor:
        """The loss of one batch (what is backpropagated); statistics go to `monitor`."""
        raise NotImplementedError

    def held_out_error(self, models, batch: dict, latents: torch.Tensor, noise: torch.Tensor, indices: list[int],
                       autocast) -> torch.Tensor:
        """val/loss's per-sample squared error [B] (float32) of held-out samples `indices`, each at its fixed
        timestep (utils.data.held_out_position) with the fixed `noise`, on the VAE posterior mean `latents`."""
        raise NotImplementedError

    def frozen_networks(self, models) -> list[str]:
        """Networks the run uses but never trains, besides the VAE and text encoders (ControlNet: the UNet)."""
        return []

    def vae_in_float32(self, args) -> bool:
        """Keep the VAE in float32 whatever --mixed_precision (a VAE that overflows in fp16)."""
        return False

    def lora_targets(self, args) -> list[str]:
        """The denoiser's modules that get LoRA (--lora_target_modules / --lora_layers, else the family's)."""
        raise NotImplementedError

    text_encoder_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention (diffusers' scripts)

    def check_lora_layout(self, denoiser) -> None:
        """With the adapter on `denoiser`: a one-block error, before training, when a LoRA file the run will write
        cannot name one of its modules (none for SD: kohya's converter names every module)."""

    # --- saving and sampling ----------------------------------------------------------------------------------
    def save_lora(self, directory: str, denoiser, encoders: dict, lora_format: str = "diffusers",
                  metadata: dict | None = None, dtype: torch.dtype | None = None) -> str:
        """The adapters of `denoiser` and the trained text `encoders` ({name: module}) in `directory`, in the file
        the family's pipeline `load_lora_weights` reads (in `dtype`, None: as trained). Returns the file's path."""
        raise NotImplementedError

    def load_lora_into(self, directory: str, denoiser, encoders: dict) -> None:
        """Load what `save_lora` wrote into modules that already carry an adapter (resume)."""
        raise NotImplementedError

    def pipeline(self, components: dict, scheduler: str | None = None):
        """The family's diffusers pipeline of `components` (validation images, saving a from-scratch model);
        `scheduler`: the validation sampler asked for (None: the training scheduler's inference counterpart)."""
        raise NotImplementedError

    def validation_samples(self, prompts: list[str], resolution: int) -> tuple[list[str], list[dict] | None]:
        """The validation prompts to sample and, per prompt, extra pipeline arguments (ControlNet: its conditioning
        image); None: none."""
        return prompts, None

    def conditions_of(self, items: list[dict]) -> list[dict] | None:
        """Per held-out sample, the extra pipeline arguments that reproduce its conditions (None: none)."""
        return None

    def pipeline_call_kwargs(self) -> dict:
        """Extra keyword arguments of the pipeline's __call__ for this run (e.g. max_sequence_length, taken by
        `configure`)."""
        return {}

    def write_pipeline(self, output, models: dict, unwrapped: dict, directory: str) -> None:
        """The fine-tuned pipeline in `directory` (output: utils.sd.saving.WeightsOutput; `unwrapped`: the trained
        modules, unwrapped)."""
        raise NotImplementedError

    def model_card_text(self, base_model: str) -> dict:
        """write_model_card's description/usage for this family's output (empty: the text-to-image card's)."""
        return {}

    def lora_metadata(self, output, models: dict) -> dict:
        """ss_*/modelspec.* metadata of the LoRA file (empty: none)."""
        return {}
