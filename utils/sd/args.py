"""The command-line flags of train_text_to_image.py that are Stable Diffusion's own (model, training,
validation), with diffusers' `train_text_to_image*.py` names, defaults and help texts, and their checks (each a
one-block UserError before anything runs)."""

from __future__ import annotations

import importlib.util

from utils.errors import UserError
from utils.evaluation import add_evaluation_args
from utils.optim import add_adam_args, add_lr_schedule_args, add_optimizer_args, add_prodigy_args
from utils.plan import add_plan_args
from utils.quality import add_quality_args, check_quality_args
from utils.sd.model_kind import is_single_file


def add_model_args(parser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="Path to pretrained model or model identifier from huggingface.co/models (Stable "
                            "Diffusion 1.x/2.x or SDXL: told apart by model_index.json), or one model.safetensors. "
                            "Omit with --model_preset to train from scratch.")
    model.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="Path to pretrained VAE model with better numerical stability (e.g. "
                            "madebyollin/sdxl-vae-fp16-fix). More details: https://github.com/huggingface/diffusers/pull/4038.")
    model.add_argument("--revision", type=str, default=None,
                       help="Revision of pretrained model identifier from huggingface.co/models.")
    model.add_argument("--variant", type=str, default=None,
                       help="Variant of the model files of the pretrained model identifier, e.g. fp16")
    model.add_argument("--non_ema_revision", type=str, default=None,
                       help="Revision of pretrained non-ema model identifier. Must be a branch, tag or git identifier "
                            "of the local or remote repository specified with --pretrained_model_name_or_path.")
    model.add_argument("--model_preset", type=str, default=None, choices=["tiny", "tiny-sdxl", "small", "kanji", "base", "tiny-sd3",
                                                                    "tiny-flux", "tiny-lumina2"],
                       help="Build fresh (random) models of this size instead of loading a pretrained pipeline "
                            "(kanji: the small UNet/VAE with a short-caption text encoder, utils/sd/builder.py; "
                            "tiny-sd3 / tiny-flux / tiny-lumina2: diffusers' tiny test pipelines of those families, "
                            "utils/families/).")
    model.add_argument("--unet_config", type=str, default=None,
                       help="JSON file of UNet2DConditionModel config overrides (from scratch).")
    model.add_argument("--vae_config", type=str, default=None,
                       help="JSON file of AutoencoderKL config overrides (from scratch).")
    model.add_argument("--text_encoder_name_or_path", type=str, default=None,
                       help="Load the tokenizer and CLIP text encoder from this path/Hub id (subfolders tokenizer/ and "
                            "text_encoder/ if present).")
    model.add_argument("--prediction_type", type=str, default=None,
                       help="The prediction_type that shall be used for training. Choose between 'epsilon' or "
                            "'v_prediction' or leave `None`. If left to `None` the default prediction type of the "
                            "scheduler: `noise_scheduler.config.prediction_type` is chosen.")


def add_training_args(parser) -> None:
    add_plan_args(parser, batch_size=16, epochs=100, learning_rate=1e-4)
    train = parser.add_argument_group("training")
    train.add_argument("--scale_lr", action="store_true", default=False,
                       help="Scale the learning rate by the number of GPUs, gradient "
                            "accumulation steps, and batch size.")
    add_lr_schedule_args(train, scheduler="constant", warmup_steps=500, cycles_and_power=True)
    train.add_argument("--resume_override_lr", action="store_true",
                       help="After --resume_from_checkpoint, restart the LR schedule (warmup included) at "
                            "the current --learning_rate.")
    train.add_argument("--snr_gamma", type=float, default=None,
                       help="SNR weighting gamma to be used if rebalancing the loss. Recommended value is 5.0. More "
                            "details here: https://huggingface.co/papers/2303.09556.")
    train.add_argument("--dream_training", action="store_true",
                       help="Use the DREAM training method, which makes training more efficient and accurate at the "
                            "expense of doing an extra forward pass. See: https://huggingface.co/papers/2312.00210")
    train.add_argument("--dream_detail_preservation", type=float, default=1.0,
                       help="Dream detail preservation factor p (should be greater than 0; default=1.0, "
                            "as suggested in the paper)")
    train.add_argument("--use_8bit_adam", action="store_true",
                       help="Whether or not to use 8-bit Adam from bitsandbytes (= --optimizer adamw8bit).")
    add_optimizer_args(train, default="adamw")
    add_adam_args(train, weight_decay=1e-2)
    add_prodigy_args(train)
    train.add_argument("--noise_offset", type=float, default=0, help="The scale of noise offset.")
    train.add_argument("--input_perturbation", type=float, default=0,
                       help="The scale of input perturbation. Recommended 0.1.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Whether or not to use xformers.")
    train.add_argument("--train_text_encoder", action="store_true",
                       help="Train the text encoder too (fully when training from scratch or fine-tuning; "
                            "its LoRA with --use_lora).")
    train.add_argument("--text_encoder_learning_rate", type=float, default=None,
                       help="Text encoder LR (default: --learning_rate).")
    train.add_argument("--proportion_empty_prompts", type=float, default=None,
                       help="Proportion of image prompts to be replaced with empty strings (diffusers' SDXL scripts' "
                            "name for --caption_dropout_prob).")
    train.add_argument("--timestep_bias_strategy", type=str, default="none",
                       choices=["earlier", "later", "range", "none"],
                       help="Sample training timesteps with a bias: more of the earlier (low-noise, detail) or later "
                            "(high-noise, composition) ones, or of a range (diffusers' SDXL scripts).")
    train.add_argument("--timestep_bias_multiplier", type=float, default=1.0,
                       help="How much more often the biased timesteps are drawn (2.0: twice as often).")
    train.add_argument("--timestep_bias_begin", type=int, default=0,
                       help="--timestep_bias_strategy range: the first timestep (inclusive) to bias.")
    train.add_argument("--timestep_bias_end", type=int, default=1000,
                       help="--timestep_bias_strategy range: the last timestep to bias (exclusive, as diffusers' slice).")
    train.add_argument("--timestep_bias_portion", type=float, default=0.25,
                       help="earlier/later: the fraction of the timesteps that is biased.")
    train.add_argument("--debug_loss", action="store_true",
                       help="Also log each training image's loss under loss_for_<file name> (diffusers' SDXL LoRA script).")
    train.add_argument("--enable_npu_flash_attention", action="store_true",
                       help="Use NPU flash attention (Ascend NPUs with torch_npu only).")



def add_validation_args(parser) -> None:
    val = parser.add_argument_group("validation")
    val.add_argument("--validation_prompts", type=str, default=None, nargs="+",
                     help="A set of prompts evaluated every `--validation_epochs` and logged to `--report_to`.")
    val.add_argument("--validation_prompt", type=str, default=None,
                     help="A prompt that is sampled --num_validation_images times during "
                          "validation (LoRA script's flag).")
    add_evaluation_args(val, validation_epochs=None, num_validation_images=None,
                        epochs_help="Run validation every X epochs (default 5; 1 with --use_lora, as in diffusers; 0: "
                                    "never by epoch).",
                        images_help="Images per validation prompt (default: 1 per prompt for full training, 4 with "
                                    "--use_lora).")
    add_quality_args(val)  # --validation_metrics clip_score,fid,kid ... (utils/quality.py)
    val.add_argument("--validation_inference_steps", type=int, default=20,
                     help="DPM-Solver++ steps for validation images.")
    val.add_argument("--validation_guidance_scale", type=float, default=7.5,
                     help="Classifier-free guidance for validation images.")
    val.add_argument("--validation_split", type=fraction_or_path, default=None,
                     help="Held-out data for a validation loss (val/loss) at every validation: a fraction of the "
                          "training rows (seeded, e.g. 0.05; they leave the training set), or a folder / CSV / "
                          "JSONL file in the --train_data_dir / --train_data_file layouts. Each held-out sample is "
                          "scored at its own fixed timestep and noise, so successive values compare. The weights "
                          "with the lowest val/loss are kept in <output_dir>/best/.")


def fraction_or_path(value: str):
    """--validation_split: a float in (0, 1) or a path (checked when the data is loaded)."""
    try:
        fraction = float(value)
    except ValueError:
        return value
    if not 0.0 < fraction < 1.0:
        import argparse

        raise argparse.ArgumentTypeError(f"a fraction in (0, 1) or a folder/file of held-out data, got {value}")
    return fraction


def check_model_args(args) -> None:
    """The model to train: one source, a single file's own config flags, the prediction target."""
    if not args.pretrained_model_name_or_path and not args.model_preset:
        raise UserError(
            "Give --pretrained_model_name_or_path (fine-tune) or --model_preset tiny|small|base (train from scratch)."
        )
    if args.pretrained_model_name_or_path and args.model_preset:
        raise UserError(
            "--pretrained_model_name_or_path and --model_preset are exclusive: load a model or build a fresh one."
        )
    if (args.model_config or args.original_config) and not is_single_file(args.pretrained_model_name_or_path):
        raise UserError("--model_config / --original_config describe a single-file checkpoint: give "
                        "--pretrained_model_name_or_path model.safetensors (or .ckpt) with them.")
    if args.prediction_type not in (None, "epsilon", "v_prediction"):
        raise UserError(f"--prediction_type {args.prediction_type}: choose 'epsilon' or 'v_prediction'.")
    if args.dream_training and args.prediction_type == "v_prediction":
        raise UserError(
            "--dream_training is only implemented for epsilon prediction; drop --prediction_type v_prediction."
        )
    if args.sdxl:
        check_sdxl_args(args)


def check_sdxl_args(args) -> None:
    """What the SDXL path does not do (each refused with the reason)."""
    refused = {"--train_text_encoder without --use_lora": args.train_text_encoder and not args.use_lora,
               "--train_vae": args.train_vae, "--dream_training": args.dream_training,
               "--text_encoder_name_or_path": bool(args.text_encoder_name_or_path)}
    for flag, given in refused.items():
        if given:
            raise UserError(f"{flag} is not available for SDXL pipelines (diffusers' SDXL scripts train the UNet, "
                            "or LoRA on the UNet and optionally both text encoders).")


def check_training_args(args) -> None:
    """The timestep bias, caption dropout and the attention backends asked for."""
    if args.timestep_bias_strategy != "none" and args.timestep_bias_multiplier <= 0:
        raise UserError("--timestep_bias_multiplier must be > 0 (to turn the bias off use --timestep_bias_strategy "
                        "none).")
    if args.timestep_bias_strategy == "range" and not 0 <= args.timestep_bias_begin < args.timestep_bias_end:
        raise UserError("--timestep_bias_strategy range needs 0 <= --timestep_bias_begin < --timestep_bias_end.")
    if not 0.0 <= args.caption_dropout_prob < 1.0:
        raise UserError("--caption_dropout_prob must be in [0, 1).")
    if args.enable_npu_flash_attention and importlib.util.find_spec("torch_npu") is None:
        raise UserError("--enable_npu_flash_attention needs an Ascend NPU with torch_npu installed.")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise UserError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                            "(pip install xformers, CUDA only). PyTorch's SDPA attention is used by "
                            "default and needs nothing.")


def check_validation_args(args) -> None:
    """Validation images need at least one per prompt; early stopping needs held-out data."""
    if (args.validation_prompts or args.validation_prompt) and args.num_validation_images < 1:
        raise UserError(f"--num_validation_images {args.num_validation_images}: give at least 1 image per validation "
                        "prompt, or leave out --validation_prompt(s) to turn validation off.")
    if args.early_stopping_patience is not None and (args.validation_split is None or args.early_stopping_patience < 1):
        raise UserError("--early_stopping_patience needs --validation_split (held-out data for val/loss) and a "
                        "patience of at least 1 validation.")
    check_quality_args(args)
