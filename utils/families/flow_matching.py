"""Rectified-flow training for the transformer families (SD3/3.5, FLUX.1; Lumina-2 will take the same pieces):
the flags of diffusers' `train_dreambooth_lora_sd3.py` / `_flux.py` / `_lumina2.py`, the timestep draw, the noisy
input and target, the loss weighting and the held-out error, in diffusers' convention

    sigma in [0, 1], 1 = pure noise:   x_sigma = (1 - sigma) x + sigma noise,   velocity target noise - x

(the mask DiT's `utils/mask_dit/flow_matching.py` writes the same transport with t = 1 - sigma). The sigmas are the
training scheduler's own (`FlowMatchEulerDiscreteScheduler.sigmas`, so SD3.5's `shift` is honoured) at the index
diffusers' `compute_density_for_timestep_sampling` draws, and the loss weights are
`compute_loss_weighting_for_sd3`'s: the ecosystem's functions, called, not copied."""

from __future__ import annotations

import contextlib
import logging

import torch

from utils.errors import UserError
from utils.families.base import Family

logger = logging.getLogger(__name__)

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
PROMPT_MEMO_SIZE = 64  # prompts kept encoded in a DreamBooth run (oldest dropped first)


def add_flow_matching_args(parser) -> None:
    """diffusers' SD3/FLUX/Lumina-2 DreamBooth flags (a default of None: the family's, e.g. SD3 logit_normal)."""
    flow = parser.add_argument_group("flow matching (SD3, FLUX, Lumina-2)")
    flow.add_argument("--weighting_scheme", type=str, default=None, choices=WEIGHTING_SCHEMES,
                      help="Timestep density (logit_normal, mode: drawn non-uniformly) or loss weighting (sigma_sqrt, "
                           "cosmap: drawn uniformly, the loss weighted), as SD3's paper. Default: the family's "
                           "(SD3: logit_normal, as diffusers' SD3 scripts).")
    add_timestep_density_args(flow)
    flow.add_argument("--precondition_outputs", type=int, default=None,
                      help="1: the prediction is turned into a denoised sample, x_sigma - sigma * prediction, and "
                           "compared with the clean latents (EDM's preconditioning, diffusers' SD3 default); 0: the "
                           "prediction is compared with the velocity noise - x (FLUX's). Default: the family's.")
    flow.add_argument("--max_sequence_length", type=int, default=None,
                      help="Tokens of the T5 (or Gemma) prompt. Default: the family's (SD3: 77, FLUX: 512, as "
                           "diffusers' scripts).")
    flow.add_argument("--system_prompt", type=str, default=None,
                      help="Lumina-2: the instruction put before every caption (\"<system prompt> <Prompt Start> "
                           "<caption>\"), in training and sampling. Default: Lumina2Pipeline's own.")
    flow.add_argument("--final_validation_prompt", type=str, default=None,
                      help="A prompt sampled once, after training, when there is no --validation_prompt (diffusers' "
                           "Lumina-2 flag; every family takes it).")
    flow.add_argument("--offload", action="store_true",
                      help="Keep the VAE and the text encoders on the CPU between their uses (diffusers' Lumina-2 "
                           "flag): less device memory, a host-device copy each step. The caches "
                           "(--cache_latents, --cache_text_embeddings) free the memory for good instead.")
    flow.add_argument("--guidance_scale", type=float, default=3.5,
                      help="FLUX.1 dev's distilled guidance, fed to the transformer while training (diffusers' "
                           "FLUX scripts); models without a guidance embedding (schnell) ignore it.")
    flow.add_argument("--lora_layers", type=str, default=None,
                      help="Comma-separated transformer modules that get LoRA (default: the family's attention "
                           "projections), e.g. attn.to_k,attn.to_q,attn.to_v,attn.to_out.0.")
    flow.add_argument("--lora_blocks", type=str, default=None,
                      help="SD3: comma-separated transformer block numbers to put LoRA in (default: all), e.g. 12,30.")
    flow.add_argument("--upcast_before_saving", action="store_true",
                      help="Save the trained LoRA weights in float32; without it they are saved in the training "
                           "precision (--mixed_precision), as diffusers' flow-matching LoRA scripts do.")


def add_timestep_density_args(group) -> None:
    """SD3's timestep densities' parameters (Esser et al. 2024, eqs. 19-20), one definition for every flow trainer
    (text-to-image's transformer families, the mask DiT's --timestep_sampling)."""
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal timestep density.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit-normal timestep density.")
    group.add_argument("--mode_scale", type=float, default=1.29,
                       help="Scale of the `mode` timestep density (with weighting scheme / timestep sampling mode).")


# Flags of the UNet/DDPM objective that have no meaning for a rectified flow (refused, not ignored).
DDPM_ONLY_FLAGS = {"--snr_gamma": lambda a: a.snr_gamma is not None, "--noise_offset": lambda a: bool(a.noise_offset),
                   "--input_perturbation": lambda a: bool(a.input_perturbation),
                   "--dream_training": lambda a: a.dream_training,
                   "--timestep_bias_strategy": lambda a: a.timestep_bias_strategy != "none",
                   "--debiased_estimation_loss": lambda a: a.debiased_estimation_loss,
                   "--loss_type": lambda a: a.loss_type != "l2", "--train_vae": lambda a: a.train_vae,
                   "--do_edm_style_training": lambda a: a.do_edm_style_training}


def check_flow_matching_args(args, family: str) -> None:
    """One-block errors for what a flow-matching family cannot take."""
    if args.prediction_type is not None:
        raise UserError(f"--prediction_type {args.prediction_type}: a {family} model predicts the flow velocity "
                        "(rectified flow), not epsilon or v; drop --prediction_type.")
    for flag, given in DDPM_ONLY_FLAGS.items():
        if given(args):
            raise UserError(f"{flag} belongs to the UNet (DDPM) objective of SD 1.x/2.x/XL; a {family} model trains "
                            "a rectified flow: drop it (--weighting_scheme / --logit_mean / --mode_scale shape the "
                            "timesteps instead).")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        raise UserError(f"--max_sequence_length {args.max_sequence_length} must be at least 1.")


def check_transformer_family_args(args, family: str, preset: str, system_prompt: bool = False,
                                  kohya: bool = False, single_file: bool = False) -> None:
    """What a transformer family does not take yet, one-block errors (besides check_flow_matching_args');
    `system_prompt`: whether the family reads --system_prompt (Lumina-2); `kohya`: whether it writes a LoRA layout
    other than diffusers' (FLUX.1: kohya's, Lumina-2: the original model's); `single_file`: whether it reads and
    writes single-file checkpoints (SD3)."""
    check_flow_matching_args(args, family)
    if args.system_prompt is not None and not system_prompt:
        raise UserError(f"--system_prompt is Lumina-2's (its Gemma reads an instruction before the caption); a "
                        f"{family} run has none: drop it.")
    refuse_not_yet(family, {f"--model_preset other than {preset}": args.model_preset not in (None, preset),
                            "--unet_config / --vae_config": bool(args.unet_config or args.vae_config),
                            "--text_encoder_name_or_path": bool(args.text_encoder_name_or_path)})
    check_files_asked(args, family, kohya, single_file)


def check_files_asked(args, family: str, kohya: bool = False, single_file: bool = False) -> None:
    """The files a transformer family reads and writes so far: diffusers' pipeline folders and LoRA files (and
    where `single_file`, single-file checkpoints)."""
    from utils.sd.lora import lora_type_of
    from utils.sd.model_kind import is_single_file

    kind = lora_type_of(args)
    refuse_not_yet(family, {"--save_single_file": args.save_single_file and not single_file,
                            "--lora_format kohya": args.use_lora and args.lora_format == "kohya" and not kohya,
                            "--lora_format kohya with DoRA": kind == "dora" and args.lora_format == "kohya",
                            f"--lora_format kohya with --lora_type {kind}": kind in ("loha", "lokr")
                            and args.lora_format == "kohya"})
    if single_file:
        return
    if is_single_file(args.pretrained_model_name_or_path):
        raise UserError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is a single-file "
                        f"{family} checkpoint; training from one is not available yet: give the diffusers pipeline "
                        "folder or Hub id (e.g. stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev).")


def transformer_file_models(source, load_transformer, load_pipeline) -> dict:
    """A transformer-only single file as the base model (FLUX.1's, Lumina-2's): the transformer from the file
    (`load_transformer(path, model_config)`), the other components from --model_config's pipeline
    (`load_pipeline(source, transformer=...)`)."""
    import dataclasses

    from utils.checkpointing import own_memory

    transformer = load_transformer(source.pretrained_model_name_or_path, source.model_config)
    return load_pipeline(dataclasses.replace(source, pretrained_model_name_or_path=source.model_config),
                         transformer=own_memory(transformer))


def is_lycoris(model) -> bool:
    """The model's adapter is LoHa or LoKr (saved as peft folders, not diffusers' LoRA file)."""
    from utils.sd.lora import LYCORIS_TYPES, adapter_type

    return adapter_type(model) in LYCORIS_TYPES


def refuse_not_yet(family: str, refused: dict) -> None:
    """The first flag in `refused` ({what: given}) that was given, as a one-block error."""
    for what, given in refused.items():
        if given:
            raise UserError(f"{what} is not available for {family} yet (full and LoRA fine-tunes, LoRA files in "
                            "diffusers' format, which ComfyUI reads too); drop it.")


def check_pipeline_folder(path: str, family: str, required: tuple[str, ...]) -> None:
    """A local --pretrained_model_name_or_path must hold the family's pipeline parts (a Hub id is left to the Hub)."""
    import os

    if not os.path.isdir(path):
        return
    missing = [name for name in ("model_index.json", *required) if not os.path.exists(os.path.join(path, name))]
    if missing:
        raise UserError(f"--pretrained_model_name_or_path {path}: not a complete {family} pipeline folder (missing "
                        f"{', '.join(missing)}); give the folder a pipeline's save_pretrained wrote, or a Hub id.")


def check_sequence_length(max_sequence_length: int, tokenizer) -> None:
    """--max_sequence_length within the T5 tokenizer's limit (None: no T5)."""
    limit = tokenizer.model_max_length if tokenizer is not None else None
    if limit is not None and max_sequence_length > limit:
        raise UserError(f"--max_sequence_length {max_sequence_length} is over the T5 tokenizer's limit of {limit} "
                        f"tokens: give at most {limit}.")


def sample_sigmas(args, scheduler, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [B], timesteps [B]) of a training batch: u from --weighting_scheme's density, the scheduler's sigma
    and timestep at index int(u * num_train_timesteps), as diffusers' SD3/FLUX scripts (global RNG: a resume
    restores it)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=batch_size,
                                              logit_mean=args.logit_mean, logit_std=args.logit_std,
                                              mode_scale=args.mode_scale)
    indices = (u * scheduler.config.num_train_timesteps).long()
    return scheduler.sigmas[indices].to(device), scheduler.timesteps[indices].to(device)


def held_out_sigmas(scheduler, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (sigmas, timesteps) of held-out samples `indices`: at the schedule index the SD path's val/loss uses
    (utils.sd.validation.held_out_timestep, the golden-ratio spread)."""
    from utils.sd.validation import held_out_timestep

    steps = torch.tensor([held_out_timestep(i, scheduler.config.num_train_timesteps) for i in indices])
    return scheduler.sigmas[steps], scheduler.timesteps[steps]


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x + sigma noise, sigma [B] broadcast over [B, ...]."""
    sigma = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - sigma) * latents + sigma * noise


def prediction_and_target(prediction: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                          sigmas: torch.Tensor, precondition: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loss compares: with preconditioning the denoised estimate x_sigma - sigma * v against x, else the
    velocity v against noise - x (diffusers' SD3 scripts, --precondition_outputs)."""
    if precondition:
        sigma = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(prediction.dtype)
        return prediction * (-sigma) + noisy, latents
    return prediction, noise - latents


def loss_weights(args, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights [B] (float32) of --weighting_scheme (sigma_sqrt, cosmap; 1 for the others)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas.float()).float()


@contextlib.contextmanager
def offloaded(modules: list, device, enabled: bool):
    """--offload: `modules` on `device` inside the block, on the CPU after it (no-op when not `enabled`)."""
    if enabled:
        for module in modules:
            module.to(device)
    try:
        yield
    finally:
        if enabled:
            for module in modules:
                module.to("cpu")


class FlowMatchingFamily(Family):
    """What the rectified-flow transformer families share (SD3, FLUX): the loss of a batch (the family gives the
    transformer call, `predict`), val/loss, --lora_layers targets, the LoRA file and the pipeline, by its diffusers
    pipeline class (`pipeline_class`, whose save_lora_weights / lora_state_dict / __init__ do the work)."""

    denoiser = "transformer"
    pipeline_class = ""  # the diffusers pipeline's class name
    pipeline_components: tuple[str, ...] = ()  # its __init__'s model and tokenizer arguments (+ scheduler)
    default_lora_targets: tuple[str, ...] = ()  # diffusers' script's
    architecture = ""  # kohya's ss_base_model_version / the ModelSpec id's key in utils/sd/lora.py
    max_sequence_length, precondition_outputs, offload, save_single_file = 512, False, False, False  # configure()
    lora_format = "diffusers"  # configure() sets the run's

    def configure(self, args) -> None:
        self.max_sequence_length, self.precondition_outputs = args.max_sequence_length, bool(args.precondition_outputs)
        self.offload, self.save_single_file, self.lora_format = args.offload, args.save_single_file, args.lora_format
        # DreamBooth with frozen text encoders has a handful of prompts (instance, class, dropout's ""): each is
        # encoded once and kept, as diffusers' scripts precompute the instance prompt (T5-XXL / Gemma every step
        # would cost more than the transformer at small sizes). Keyed by token ids, encoded one prompt at a time so
        # a value never depends on which batch first met it (resume stays bitwise).
        self.prompt_memo = {} if args.instance_data_dir is not None and not args.train_text_encoder else None

    def load_base_models(self, source, captions, build_tiny, load_pipeline, load_single_file) -> dict:
        """The run's components: the tiny preset's (`build_tiny`), a single file's with --model_config's
        (`load_single_file`) or a pipeline's (`load_pipeline`); with --save_single_file, the family's single-file
        layout is asked now, not after training, whether it can hold this transformer."""
        import os

        from utils.sd.model_kind import is_single_file

        if source.model_preset:
            components = build_tiny(captions, source.seed or 0, os.path.join(source.output_dir, "tokenizers"))
            models = dict(noise_scheduler=components.pop("scheduler"), **components)
        elif is_single_file(source.pretrained_model_name_or_path):
            models = load_single_file(source)
        else:
            models = load_pipeline(source)
        if self.save_single_file:
            self.check_single_file(models["transformer"])
        return models

    def check_single_file(self, transformer) -> None:
        """--save_single_file: a one-block error when the family's single-file layout cannot hold `transformer`."""

    def token_pixels(self, models) -> int:
        return self.latent_multiple(models)  # (VAE x patch, x 2 for FLUX's packing: one token's side)

    def predict(self, models, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict) -> torch.Tensor:
        """The transformer's velocity [B, C, h, w] for noisy latents [B, C, h, w] at `timesteps` (the scheduler's,
        0..1000), conditioned on the batch's text."""
        raise NotImplementedError

    def conditioning(self, models, batch: dict, device) -> dict:
        """The batch's text conditioning: from the text cache, or encoded now (`encode_text`)."""
        if "encoder_hidden_states" in batch:
            return {key: batch[key].to(device) for key in ("encoder_hidden_states", "pooled_prompt_embeds",
                                                           "encoder_attention_mask") if key in batch}
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        encoders = [models[name] for name in self.text_encoder_names(models)]
        if self.prompt_memo is None:
            with offloaded(encoders, device, self.offload):
                return self.encode_text(models, ids.to(device), mask.to(device) if mask is not None else None)
        rows, ids_cpu, mask_cpu = [], ids.cpu(), mask.cpu() if mask is not None else None  # (one copy a batch)
        for index in range(len(ids)):
            key = (ids_cpu[index].numpy().tobytes(), b"" if mask is None else mask_cpu[index].numpy().tobytes())
            if key not in self.prompt_memo:
                if len(self.prompt_memo) >= PROMPT_MEMO_SIZE:
                    self.prompt_memo.pop(next(iter(self.prompt_memo)))
                with torch.no_grad(), offloaded(encoders, device, self.offload):
                    self.prompt_memo[key] = self.encode_text(
                        models, ids[index:index + 1].to(device),
                        mask[index:index + 1].to(device) if mask is not None else None)
            rows.append(self.prompt_memo[key])
        return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The transformer's input at `sigmas` (SD3/FLUX: (1 - sigma) x + sigma noise)."""
        return noisy_input(latents, noise, sigmas)

    def prediction_and_target(self, prediction, noisy, latents, noise, sigmas):
        """What the loss compares (SD3/FLUX: velocity vs noise - x, or preconditioned x-prediction vs x)."""
        return prediction_and_target(prediction, noisy, latents, noise, sigmas, self.precondition_outputs)

    def training_loss(self, args, models, batch, monitor) -> torch.Tensor:
        """diffusers' SD3/FLUX objective: latents from the VAE (or the latent cache), sigma from --weighting_scheme,
        x_sigma = (1 - sigma) x + sigma noise, the transformer's velocity (preconditioned or not), the weighted
        MSE; DreamBooth's prior half and --masked_loss as in the SD path."""
        from utils.cache import sample_cached_latents
        from utils.latents import encode_latents
        from utils.sd.losses import per_sample_loss, prior_preservation_loss
        from utils.sd.masks import latent_mask

        vae = models["vae"]
        if "latent_mean" in batch:
            latents = sample_cached_latents(batch, vae.config).float()
        else:
            with offloaded([vae], batch["pixel_values"].device, self.offload):
                latents = encode_latents(vae, batch["pixel_values"]).float()
        noise = torch.randn_like(latents)
        sigmas, timesteps = sample_sigmas(args, models["noise_scheduler"], latents.shape[0], latents.device)
        noisy = self.noisy(latents, noise, sigmas)
        prediction, target = self.prediction_and_target(self.predict(models, noisy, timesteps, batch), noisy, latents,
                                                        noise, sigmas)
        weights = loss_weights(args, sigmas)

        def loss_of(pred, wanted, sample_weights, mask):  # mean over samples of weight x mean squared error
            return (sample_weights * per_sample_loss(pred, wanted, "l2", None, mask)).mean()

        mask = latent_mask(batch["mask"], latents) if "mask" in batch else None
        if args.with_prior_preservation:
            loss = prior_preservation_loss(loss_of, prediction, target, weights, args.prior_loss_weight, monitor, mask)
        else:
            loss = loss_of(prediction, target, weights, mask)
        monitor.add(sigma_mean=sigmas.float().mean(), sigma_std=sigmas.float().std(correction=0),
                    latent_std=latents.std(), noise_std=noise.std())
        return loss

    def held_out_error(self, models, batch, latents, noise, indices, autocast) -> torch.Tensor:
        sigmas, timesteps = held_out_sigmas(models["noise_scheduler"], indices)
        sigmas, timesteps = sigmas.to(latents.device), timesteps.to(latents.device)
        noisy = self.noisy(latents, noise, sigmas)
        with autocast():
            prediction = self.predict(models, noisy, timesteps, batch)
        prediction, target = self.prediction_and_target(prediction.float(), noisy, latents, noise, sigmas)
        return (prediction - target.float()).pow(2).flatten(1).mean(1)

    def lora_targets(self, args) -> list[str]:
        """--lora_layers (or --lora_target_modules), else diffusers' script's targets."""
        if args.lora_layers:
            return [layer.strip() for layer in args.lora_layers.split(",")]
        return args.lora_target_modules or list(self.default_lora_targets)

    other_layout: str | None = None  # the LoRA layout --lora_format kohya|both writes besides diffusers' (None: none)

    def save_lora(self, directory, denoiser, encoders, lora_format="diffusers", metadata=None, dtype=None) -> str:
        """diffusers' file (--lora_format diffusers|both) and/or the family's `other_layout` (kohya|both; not with
        DoRA, whose magnitudes those layouts have no place for); LoHa/LoKr: peft's adapter folders
        (transformer_adapter/, ...), which peft (and generate.py) load: diffusers' LoRA loader reads no LyCORIS keys
        for these families. Returns the path of the first file written."""
        import os

        from utils.sd.lycoris import ADAPTER_FOLDER, save_peft_adapters

        if is_lycoris(denoiser):
            save_peft_adapters(directory, {"transformer": denoiser, **encoders})
            if lora_format == "both":
                logger.info(f"{self.name}: LoHa/LoKr are written as peft adapter folders only.")
            return os.path.join(directory, ADAPTER_FOLDER.format("transformer"))
        path = None
        if lora_format in ("diffusers", "both"):
            path = self.save_diffusers_lora(directory, denoiser, encoders, metadata, dtype)
        if lora_format == "both" and (self.other_layout is None or denoiser.peft_config["default"].use_dora):
            logger.info(f"{self.name}: the LoRA is written in diffusers' layout only (ComfyUI reads it); "
                        + (f"{self.other_layout} has no DoRA magnitudes." if self.other_layout else
                           "no other layout is written for this family."))
        elif lora_format in ("kohya", "both"):  # (kohya is refused where there is no other layout, or with DoRA)
            other = self.save_other_layout(directory, denoiser, encoders, metadata, dtype)
            path = path or other
        return path

    def save_other_layout(self, directory, denoiser, encoders, metadata, dtype) -> str:
        """Write `other_layout`'s file; returns its path."""
        raise NotImplementedError

    def other_layout_module(self, module: str, transformer) -> None:
        """Raise ValueError (saying why) when `other_layout` has no name for the transformer's `module`."""

    def check_lora_layout(self, denoiser) -> None:
        """--lora_format kohya|both: every module the adapter is on needs a name in `other_layout` (checked now, not
        when the file is written after training); DoRA and LoHa/LoKr write diffusers' / peft's files only."""
        if self.lora_format == "diffusers" or self.other_layout is None or is_lycoris(denoiser) \
                or denoiser.peft_config["default"].use_dora:
            return
        for module in sorted(name[:-len(".lora_A")] for name, _ in denoiser.named_modules() if name.endswith(".lora_A")):
            try:
                self.other_layout_module(module, denoiser)
            except ValueError as error:
                raise UserError(f"--lora_format {self.lora_format}: {self.other_layout} has no name for the LoRA on "
                                f"{module} ({error}). Leave that module out of --lora_layers, or write diffusers' "
                                "file only with --lora_format diffusers.") from None

    def save_diffusers_lora(self, directory, denoiser, encoders, metadata, dtype) -> str:
        """diffusers' file (transformer.* and text_encoder*.* keys, the adapter configs in its metadata), what the
        pipeline's load_lora_weights and ComfyUI read."""
        import os

        import diffusers
        from peft.utils import get_peft_model_state_dict

        from utils.sd.lora import LORA_WEIGHT_NAME, add_file_metadata

        def layers(model):
            state = get_peft_model_state_dict(model)
            return {key: value.to(dtype) if dtype is not None else value for key, value in state.items()}

        os.makedirs(directory, exist_ok=True)
        kwargs = {"transformer_lora_layers": layers(denoiser),
                  "transformer_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()}
        for name, model in encoders.items():
            kwargs.update({f"{name}_lora_layers": layers(model),
                           f"{name}_lora_adapter_metadata": model.peft_config["default"].to_dict()})
        getattr(diffusers, self.pipeline_class).save_lora_weights(directory, safe_serialization=True, **kwargs)
        path = os.path.join(directory, LORA_WEIGHT_NAME)
        if metadata:
            add_file_metadata(path, {key: str(value) for key, value in metadata.items()})
        return path

    def load_lora_into(self, directory, denoiser, encoders) -> None:
        import diffusers
        from diffusers.training_utils import _set_state_dict_into_text_encoder
        from peft.utils import set_peft_model_state_dict

        from utils.sd.lycoris import has_peft_adapters, load_peft_adapters

        if has_peft_adapters(directory):  # LoHa / LoKr
            return load_peft_adapters(directory, {"transformer": denoiser, **encoders})

        state = getattr(diffusers, self.pipeline_class).lora_state_dict(directory)
        state = state[0] if isinstance(state, tuple) else state
        transformer_state = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
        result = set_peft_model_state_dict(denoiser, transformer_state, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{directory}: LoRA weights do not match the transformer's adapter (unexpected keys: "
                            f"{result.unexpected_keys[:5]})")
        for name, model in encoders.items():
            _set_state_dict_into_text_encoder(state, prefix=f"{name}.", text_encoder=model)

    def pipeline(self, components, scheduler=None):
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        parts = {name: components.get(name) for name in self.pipeline_components}
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config)
        return getattr(diffusers, self.pipeline_class)(**parts)

    def pipeline_call_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def write_pipeline(self, output, models, unwrapped, directory) -> None:
        """The pipeline folder (diffusers' output) and, with --save_single_file, the family's one file beside it."""
        import os

        from utils.sd.saving import float32_components
        from utils.sd.single_file import SINGLE_FILE_NAME

        components = dict(models, **unwrapped, scheduler=models["noise_scheduler"])
        pipeline = self.pipeline(components)
        with float32_components(pipeline):
            pipeline.save_pretrained(directory)
        if output.single_file_dtype:
            self.write_single_file(os.path.join(directory, SINGLE_FILE_NAME), unwrapped["transformer"], models,
                                   output.single_file_dtype, {"modelspec.title": os.path.basename(output.output_dir),
                                                              "base_model": output.base_name, "steps": output.steps})

    def write_single_file(self, path, transformer, models, dtype, metadata) -> None:
        """--save_single_file's file in the family's original layout (a family without one refuses the flag)."""
        raise NotImplementedError

    def lora_metadata(self, output, models) -> dict:
        import os

        from utils.sd.lora import lora_file_metadata

        title = f"{os.path.basename(os.path.normpath(output.output_dir))} (LoRA)"
        return lora_file_metadata(self.architecture, output.resolution, title, None,
                                  extra={"ss_sd_model_name": output.base_name, "ss_max_train_steps": output.steps})
