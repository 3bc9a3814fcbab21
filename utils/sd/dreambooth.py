"""DreamBooth in train_text_to_image.py: diffusers' `examples/dreambooth/train_dreambooth*.py` flags (same names,
defaults and meaning: a DreamBooth run is one with --instance_data_dir), the instance and class rows, the class
images generated once with the base model (seeded per image, so a stopped generation continues where it stopped
and never redraws what exists), and the batches that pair every instance sample with a class sample (prior
preservation: `utils.data.PairedBatchSampler`; the loss side is `utils.sd.losses.prior_preservation_loss`)."""

from __future__ import annotations

import hashlib
import logging
import os

import torch

from utils.atomic import atomic_file
from utils.errors import UserError, UserFileNotFoundError
from utils.images import IMAGE_EXTENSIONS
from utils.sd.data import PRIOR_COLUMN, load_text_image_dataset
from utils.sd.kohya_folders import caption_for, image_files, is_repeat_layout, repeat_folder_rows

logger = logging.getLogger(__name__)

# The three diffusers scripts' defaults where they differ from train_text_to_image.py's (diffusers 0.37,
# examples/dreambooth): full fine-tuning, LoRA on SD 1.x/2.x, LoRA on SDXL.
DREAMBOOTH_DEFAULTS = {
    "common": dict(train_batch_size=4, num_train_epochs=1, num_validation_images=4),
    "full": dict(output_dir="dreambooth-model", learning_rate=5e-6, validation_steps=100,
                 tracker_project_name="dreambooth"),
    "lora": dict(output_dir="lora-dreambooth-model", learning_rate=5e-4, validation_epochs=50,
                 tracker_project_name="dreambooth-lora"),
    "lora-sdxl": dict(output_dir="lora-dreambooth-model", learning_rate=1e-4, validation_epochs=50,
                      adam_weight_decay=1e-4, adam_weight_decay_text_encoder=1e-3, text_encoder_learning_rate=5e-6,
                      tracker_project_name="dreambooth-lora-sd-xl"),
    # train_dreambooth_sd3.py / train_dreambooth_lora_sd3.py (the same defaults but the tracker's name)
    "sd3": dict(output_dir="sd3-dreambooth", learning_rate=1e-4, validation_epochs=50, adam_weight_decay=1e-4,
                adam_weight_decay_text_encoder=1e-3, text_encoder_learning_rate=5e-6, checkpointing_steps=500,
                tracker_project_name="dreambooth-sd3"),
    "lora-sd3": dict(output_dir="sd3-dreambooth", learning_rate=1e-4, validation_epochs=50, adam_weight_decay=1e-4,
                     adam_weight_decay_text_encoder=1e-3, text_encoder_learning_rate=5e-6, checkpointing_steps=500,
                     tracker_project_name="dreambooth-sd3-lora"),
    # train_dreambooth_flux.py / train_dreambooth_lora_flux.py (T5 prompts: 77 tokens full, 512 LoRA; one tracker)
    "flux": dict(output_dir="flux-dreambooth", learning_rate=1e-4, validation_epochs=50, adam_weight_decay=1e-4,
                 adam_weight_decay_text_encoder=1e-3, text_encoder_learning_rate=5e-6, max_sequence_length=77,
                 tracker_project_name="dreambooth-flux-dev-lora"),
    "lora-flux": dict(output_dir="flux-dreambooth-lora", learning_rate=1e-4, validation_epochs=50,
                      adam_weight_decay=1e-4, adam_weight_decay_text_encoder=1e-3, text_encoder_learning_rate=5e-6,
                      max_sequence_length=512, tracker_project_name="dreambooth-flux-dev-lora"),
    # train_dreambooth_lora_lumina2.py (no full-fine-tune script: the full run takes the same)
    "lumina2": dict(output_dir="lumina2-dreambooth-lora", learning_rate=1e-4, validation_epochs=50,
                    adam_weight_decay=1e-4, tracker_project_name="dreambooth-lumina2-lora"),
    "lora-lumina2": dict(output_dir="lumina2-dreambooth-lora", learning_rate=1e-4, validation_epochs=50,
                         adam_weight_decay=1e-4, tracker_project_name="dreambooth-lumina2-lora"),
}
IF_ONLY = {  # diffusers' flags for DeepFloyd IF (utils/families/deepfloyd_if.py reads them)
    "class_labels_conditioning": "DeepFloyd IF's class-label conditioning",
    "validation_images": "DeepFloyd IF's stage II validation",
}


def add_dreambooth_args(parser) -> None:
    group = parser.add_argument_group("DreamBooth (diffusers' train_dreambooth*.py flags)")
    group.add_argument("--instance_data_dir", type=str, default=None,
                       help="A folder containing the training data of instance images (makes this a DreamBooth run).")
    group.add_argument("--instance_prompt", type=str, default=None,
                       help="The prompt with identifier specifying the instance, e.g. 'photo of a sks dog'.")
    group.add_argument("--class_data_dir", type=str, default=None,
                       help="A folder containing the training data of class images (generated there if too few).")
    group.add_argument("--class_prompt", type=str, default=None,
                       help="The prompt to specify images in the same class as provided instance images.")
    group.add_argument("--with_prior_preservation", default=False, action="store_true",
                       help="Flag to add prior preservation loss.")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="The weight of prior preservation loss.")
    group.add_argument("--num_class_images", type=int, default=100,
                       help="Minimal class images for prior preservation loss. If there are not enough images already "
                            "present in class_data_dir, additional images will be sampled with class_prompt.")
    group.add_argument("--sample_batch_size", type=int, default=4, help="Batch size (per device) for sampling images.")
    group.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                       help="Precision of the class-image generation (default: fp16 on a GPU, fp32 on a CPU).")
    group.add_argument("--repeats", type=int, default=1, help="How many times to repeat the training data.")
    group.add_argument("--reg_data_dir", type=str, default=None,
                       help="kohya's regularisation images for --train_data_dir: a folder of <repeats>_<class> "
                            "subfolders (or images with caption files); they are prior preservation's class "
                            "images, weighted by --prior_loss_weight.")
    group.add_argument("--offset_noise", action="store_true", default=False,
                       help="Fine-tuning against a modified noise (= --noise_offset 0.1). "
                            "See: https://www.crosslabs.org//blog/diffusion-with-offset-noise for more information.")
    group.add_argument("--pre_compute_text_embeddings", action="store_true",
                       help="Encode the prompts once and leave the text encoder off the device "
                            "(= --cache_text_embeddings).")
    group.add_argument("--text_encoder_lr", dest="text_encoder_learning_rate", type=float, default=None,
                       help="Text encoder learning rate (= --text_encoder_learning_rate).")
    group.add_argument("--adam_weight_decay_text_encoder", type=float, default=None,
                       help="Weight decay of the text encoders' parameters (default: --adam_weight_decay; diffusers' "
                            "SDXL DreamBooth LoRA: 1e-3).")
    group.add_argument("--set_grads_to_none", action="store_true",
                       help="Accepted for diffusers' command lines: gradients are always set to None here "
                            "(torch's default), which saves memory.")
    group.add_argument("--validation_scheduler", type=str, default="DPMSolverMultistepScheduler",
                       choices=["DPMSolverMultistepScheduler", "DDPMScheduler"],
                       help="The sampler of the validation images.")
    group.add_argument("--output_kohya_format", action="store_true",
                       help="Also write the LoRA in kohya's key layout (= --lora_format both, our default).")
    group.add_argument("--tokenizer_name", type=str, default=None,
                       help="Pretrained tokenizer name or path if not the same as model_name")
    group.add_argument("--tokenizer_max_length", type=int, default=None, required=False,
                       help="The maximum length of the tokenizer. If not set, will default to the tokenizer's "
                            "max length.")
    group.add_argument("--text_encoder_use_attention_mask", action="store_true", required=False,
                       help="Whether to use attention mask for the text encoder")
    group.add_argument("--skip_save_text_encoder", action="store_true", required=False,
                       help="Set to not save text encoder")
    group.add_argument("--do_edm_style_training", default=False, action="store_true",
                       help="Flag to conduct training using the EDM formulation as introduced in "
                            "https://huggingface.co/papers/2206.00364.")
    group.add_argument("--validation_images", required=False, default=None, nargs="+",
                       help="DeepFloyd IF stage II: images upscaled at validation (each with each validation prompt).")
    group.add_argument("--class_labels_conditioning", required=False, default=None,
                       help="DeepFloyd IF: the optional `class_label` conditioning to pass to the unet, available "
                            "values are `timesteps` (stage II's UNet needs it).")


# diffusers' DreamBooth scripts read --dataset_name's captions only where --caption_column is given (default None:
# every image gets --instance_prompt). Here the caption column is always a name: this one, unless given, which the
# rows get holding the instance prompt.
INSTANCE_PROMPT_COLUMN = "instance_prompt"


def is_dreambooth(args) -> bool:
    """A DreamBooth run: --instance_data_dir, or (diffusers' other spelling) --dataset_name with --instance_prompt."""
    return args.instance_data_dir is not None or (args.dataset_name is not None and args.instance_prompt is not None)


def dreambooth_defaults(first) -> dict:
    """For a DreamBooth run (`first`: a first parse; is_dreambooth), the defaults of the diffusers script it
    corresponds to (utils.config.parse_args_with_config's `mode_defaults`); none otherwise."""
    from utils.sd.model_kind import family_name

    if not is_dreambooth(first):
        return {}
    from_dataset = {"caption_column": INSTANCE_PROMPT_COLUMN} if first.instance_data_dir is None else {}
    family = family_name(first)
    if family in ("sd3", "flux", "lumina2"):
        mode = f"lora-{family}" if first.use_lora else family
    else:
        mode = "full" if not first.use_lora else ("lora-sdxl" if family == "sdxl" else "lora")
    return {**DREAMBOOTH_DEFAULTS["common"], **DREAMBOOTH_DEFAULTS[mode], **from_dataset}


def dreambooth_aliases(args) -> dict:
    """diffusers' DreamBooth spellings of settings this trainer has under other names, as values to apply."""
    aliases = {}
    if args.offset_noise:  # diffusers: noise + 0.1 * per-channel noise
        if args.noise_offset not in (0, 0.1):
            raise UserError("--offset_noise is --noise_offset 0.1; give one of them.")
        aliases["noise_offset"] = 0.1
    if args.reg_data_dir:  # kohya's spelling of prior preservation
        aliases["with_prior_preservation"] = True
    if args.pre_compute_text_embeddings:
        aliases["cache_text_embeddings"] = True
    if args.output_kohya_format and args.lora_format == "diffusers":
        aliases["lora_format"] = "both"
    if args.set_grads_to_none:
        logger.info("--set_grads_to_none: gradients are always set to None here.")
    return aliases


def check_dreambooth_args(args) -> None:
    """diffusers' DreamBooth flags: DeepFloyd IF's refused for other models, the run's combinations checked."""
    from utils.sd.model_kind import FAMILY_OF_PIPELINE, pipeline_class_name

    if_flags = [name for name in IF_ONLY if getattr(args, name) is not None]
    base = args.pretrained_model_name_or_path
    pipeline = None  # (read only when an IF flag is given; None: unreadable, the loader says)
    if if_flags:
        pipeline = pipeline_class_name(base, args.revision) if base else "a preset"
    if if_flags and pipeline is not None and FAMILY_OF_PIPELINE.get(pipeline) != "if":
        raise UserError(f"--{if_flags[0]}: {IF_ONLY[if_flags[0]]}; --pretrained_model_name_or_path is not a "
                        "DeepFloyd IF pipeline: drop the flag.")
    if args.skip_save_text_encoder and (args.use_lora or not args.pretrained_model_name_or_path):
        raise UserError("--skip_save_text_encoder leaves the text encoder out of a fine-tuned pipeline loaded with "
                        "--pretrained_model_name_or_path; drop it (a LoRA run or a model from scratch).")
    if args.tokenizer_max_length is not None and args.tokenizer_max_length < 1:
        raise UserError(f"--tokenizer_max_length {args.tokenizer_max_length}: give a positive length.")
    check_instance_args(args)
    check_prior_preservation_args(args)


def check_instance_args(args) -> None:
    if args.reg_data_dir and not args.train_data_dir:
        raise UserError("--reg_data_dir holds the regularisation images for kohya's --train_data_dir; with "
                        "--instance_data_dir, give the class images as --class_data_dir.")
    if not is_dreambooth(args):
        given = [flag for flag, value in (("--instance_prompt", args.instance_prompt is not None),
                                          ("--with_prior_preservation",
                                           args.with_prior_preservation and not args.reg_data_dir)) if value]
        if given:
            raise UserError(f"{', '.join(given)} belong to a DreamBooth run: give --instance_data_dir (the folder "
                            "of your subject's images) or --dataset_name (a dataset of them) too.")
        return
    if args.instance_data_dir is not None and (args.dataset_name or args.train_data_dir or args.train_data_file):
        raise UserError("--instance_data_dir replaces --dataset_name/--train_data_dir/--train_data_file: give one.")
    if args.train_data_dir or args.train_data_file:
        raise UserError("A DreamBooth run reads its images from --dataset_name or --instance_data_dir; drop "
                        "--train_data_dir/--train_data_file.")
    if args.instance_prompt is None:  # ("" is a prompt: diffusers' own Lumina-2 test trains with it)
        raise UserError("--instance_data_dir needs --instance_prompt, e.g. --instance_prompt 'a photo of sks dog'.")
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be at least 1.")


def check_prior_preservation_args(args) -> None:
    if not args.with_prior_preservation:
        if args.prior_loss_weight != 1.0 or args.class_data_dir or args.class_prompt:
            raise UserError("--prior_loss_weight, --class_data_dir and --class_prompt are for prior preservation: "
                            "add --with_prior_preservation, or drop them.")
        return
    if not args.reg_data_dir and (not args.class_data_dir or not args.class_prompt):
        raise UserError("--with_prior_preservation needs --class_data_dir (where the class images are, or are "
                        "generated) and --class_prompt (e.g. 'a photo of a dog').")
    if args.enable_bucket:
        raise UserError("--with_prior_preservation pairs every instance image with a class image of the same "
                        "size: drop --enable_bucket.")
    if args.train_batch_size == "auto":
        raise UserError("--with_prior_preservation doubles every batch (instance + class images): give "
                        "--train_batch_size as a number.")


def class_image_name(index: int, prompt: str) -> str:
    """Class image `index`'s file name: the index first (a stopped generation resumes after the last one written)."""
    return f"{index:05d}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:10]}.jpg"


def generation_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    if precision is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def load_generation_pipeline(args, dtype: torch.dtype):
    """The base model as a pipeline, for the class images."""
    from diffusers import DiffusionPipeline

    from utils.sd.model_kind import is_single_file
    from utils.sd.single_file import load_single_file_pipeline

    if not args.pretrained_model_name_or_path:
        raise UserError("--with_prior_preservation with too few images in --class_data_dir generates the rest with "
                        "the base model: give --pretrained_model_name_or_path, or fill --class_data_dir with "
                        f"{args.num_class_images} images.")
    if is_single_file(args.pretrained_model_name_or_path):
        return load_single_file_pipeline(args.pretrained_model_name_or_path, args.model_config,
                                         args.original_config, dtype=dtype)
    return DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=dtype,
                                             revision=args.revision, variant=args.variant, safety_checker=None)


def generate_class_images(args, accelerator) -> int:
    """Fill --class_data_dir up to --num_class_images with the base model's images of --class_prompt; returns
    how many were generated. Image k is drawn from seed (--seed, k) and written atomically, so a run stopped here
    continues where it stopped (same images as uninterrupted); processes share the missing indices."""
    directory = args.class_data_dir
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise UserError(f"--class_data_dir {directory}: not writable ({error.strerror}); class images are "
                        "generated there. Choose a folder you can write to.") from None
    accelerator.wait_for_everyone()  # every process lists the folder before any of them writes to it
    existing = image_files(directory)
    done = {int(os.path.basename(p).split("-")[0]) for p in existing if os.path.basename(p).split("-")[0].isdigit()}
    missing = [k for k in range(args.num_class_images) if k not in done][:max(0, args.num_class_images - len(existing))]
    if missing:
        generate_class_image_share(args, accelerator, missing, len(existing))
    accelerator.wait_for_everyone()
    return len(missing)


def generate_class_image_share(args, accelerator, missing: list[int], existing: int) -> None:
    """This process's share of the `missing` class images (every num_processes-th index)."""
    directory = args.class_data_dir
    dtype = generation_dtype(args.prior_generation_precision, accelerator.device)
    logger.info(f"Generating {len(missing)} class images of '{args.class_prompt}' in {directory} "
                f"({existing} there; --num_class_images {args.num_class_images}).")
    pipeline = load_generation_pipeline(args, dtype).to(accelerator.device)
    if type(pipeline).__name__ == "IFSuperResolutionPipeline":
        raise UserError(f"--class_data_dir {directory} holds {existing} of --num_class_images {args.num_class_images} "
                        "class images, and a DeepFloyd IF stage II model cannot draw more (it upscales images, it "
                        "needs one to start from): put class images there (e.g. stage I's), or lower "
                        "--num_class_images.")
    pipeline.set_progress_bar_config(disable=True)
    mine = missing[accelerator.process_index::accelerator.num_processes]
    for start in range(0, len(mine), args.sample_batch_size):
        indices = mine[start:start + args.sample_batch_size]
        generators = [torch.Generator(device="cpu").manual_seed((args.seed or 0) * 1_000_003 + k) for k in indices]
        images = pipeline([args.class_prompt] * len(indices), generator=generators, height=args.resolution,
                          width=args.resolution).images
        for k, image in zip(indices, images):
            with atomic_file(os.path.join(directory, class_image_name(k, args.class_prompt))) as temp:
                image.save(temp, format="JPEG")
    del pipeline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dreambooth_rows(instance_dir: str, instance_prompt: str, repeats: int, classes: list[str],
                    class_prompt: str | None, columns: tuple[str, str]):
    """The DreamBooth rows: every instance image (`repeats` times) with the instance prompt, then the class images
    with the class prompt; the PRIOR_COLUMN tells them apart. `columns`: the (image, caption) column names."""
    import datasets

    if not os.path.isdir(instance_dir):
        raise UserFileNotFoundError(f"--instance_data_dir {instance_dir}: no such directory")
    instances = image_files(instance_dir)
    if not instances:
        raise UserError(f"--instance_data_dir {instance_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it. Put "
                        "your subject's photos there.")
    instances = instances * repeats
    return datasets.Dataset.from_dict({
        columns[0]: instances + classes, columns[1]: [instance_prompt] * len(instances) + [class_prompt] * len(classes),
        PRIOR_COLUMN: [False] * len(instances) + [True] * len(classes)})


def class_images(args, accelerator) -> list[str]:
    """--num_class_images images of --class_data_dir, the missing ones generated first."""
    generate_class_images(args, accelerator)
    return image_files(args.class_data_dir)[:args.num_class_images]


def regularisation_rows(rows, reg_data_dir: str, extension: str | None, columns: tuple[str, str]):
    """`rows` (image and caption columns) followed by kohya's --reg_data_dir images as prior-preservation rows."""
    import datasets

    if not os.path.isdir(reg_data_dir):
        raise UserFileNotFoundError(f"--reg_data_dir {reg_data_dir}: no such directory")
    if is_repeat_layout(reg_data_dir):
        images, captions = repeat_folder_rows(reg_data_dir, extension)
    else:
        images = image_files(reg_data_dir)
        captions = [caption_for(path, extension, None) for path in images]
        missing = [os.path.basename(p) for p, c in zip(images, captions) if c is None]
        if missing:
            raise UserError(f"--reg_data_dir {reg_data_dir}: {len(missing)} image(s) without a caption file (first: "
                            f"{missing[0]}). Name the folder's subfolders <repeats>_<class tokens> (kohya's layout), "
                            "or add .txt captions.")
    if not images:
        raise UserError(f"--reg_data_dir {reg_data_dir}: no images in it.")
    rows = rows.select_columns(list(columns))
    regularisation = datasets.Dataset.from_dict({columns[0]: images, columns[1]: captions})
    regularisation = regularisation.cast(rows.features)  # (an imagefolder's image column: paths become images)
    return datasets.concatenate_datasets([rows.add_column(PRIOR_COLUMN, [False] * len(rows)),
                                          regularisation.add_column(PRIOR_COLUMN, [True] * len(regularisation))])


def load_training_rows(args, accelerator):
    """The training rows: DreamBooth's (missing class images generated first) or the text-image data's (with
    kohya's --reg_data_dir images after them)."""
    columns = table_columns(args)
    if not is_dreambooth(args):
        rows = load_text_image_dataset(args)
        return rows if args.reg_data_dir is None else regularisation_rows(
            rows, args.reg_data_dir, args.caption_extension, columns)
    classes = class_images(args, accelerator) if args.with_prior_preservation else []
    if args.instance_data_dir is None:
        return dataset_dreambooth_rows(args, classes, columns)
    return dreambooth_rows(args.instance_data_dir, args.instance_prompt, args.repeats, classes, args.class_prompt,
                           columns)


def dataset_dreambooth_rows(args, classes: list[str], columns: tuple[str, str]):
    """diffusers' DreamBooth from --dataset_name: its --image_column images (--repeats times), each with its own
    --caption_column prompt when that flag names a column (diffusers' custom instance prompts), else
    --instance_prompt; then the class images, as dreambooth_rows."""
    import datasets

    image_column, caption_column = columns
    rows = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
    if image_column not in rows.column_names:
        raise UserError(f"--image_column '{image_column}' not in dataset columns {rows.column_names} "
                        f"(--dataset_name {args.dataset_name})")
    if caption_column not in rows.column_names:
        if caption_column != INSTANCE_PROMPT_COLUMN:
            raise UserError(f"--caption_column '{caption_column}' not in dataset columns {rows.column_names} "
                            f"(--dataset_name {args.dataset_name}); leave it out to give every image --instance_prompt.")
        rows = rows.add_column(caption_column, [args.instance_prompt] * len(rows))
    rows = rows.select_columns([image_column, caption_column])
    if isinstance(rows.features[image_column], datasets.Image):
        rows = rows.cast_column(image_column, datasets.Image(decode=False))
    rows = datasets.concatenate_datasets([rows] * args.repeats)
    rows = rows.add_column(PRIOR_COLUMN, [False] * len(rows))
    if not classes:
        return rows
    class_rows = datasets.Dataset.from_dict({image_column: classes, caption_column: [args.class_prompt] * len(classes),
                                            PRIOR_COLUMN: [True] * len(classes)}).cast(rows.features)
    return datasets.concatenate_datasets([rows, class_rows])


def table_columns(args) -> tuple[str, str]:
    """(--image_column, --caption_column)."""
    return args.image_column, args.caption_column
