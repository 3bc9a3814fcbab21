"""Model cards and pushing a training run's output folder to the Hugging Face Hub.

What goes up: the final model (pipeline folders or LoRA weights), README.md (the model card),
the validation grid it shows and training_args.json. What stays local: `checkpoint-*` folders
(optimizer state, several GB each), unfinished `.tmp-checkpoint-*` writes, accelerate's
automatic `step_*` / `epoch_*` states (diffusers ignores those too), TensorBoard logs under
`logs/` (event files can be large and may hold local paths; upload them yourself if you want
them on the Hub) and the per-step validation images in `samples/`.

The Hub token is never written anywhere: `redact_args` drops it from anything saved or logged,
and `check_hub_args` refuses `--hub_token` with `--report_to wandb` (W&B would record it).
Log in once with `hf auth login` instead of passing a token on the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil

from utils.errors import UserError
from utils.sd.lycoris import has_peft_adapters  # LoHa / LoKr adapter folders

logger = logging.getLogger(__name__)

IGNORE_PATTERNS = [
    "checkpoint-*",
    ".tmp-checkpoint-*",
    "step_*",
    "epoch_*",
    "logs/**",
    "samples/**",
    "*.tmp",
    ".lock",  # the output-dir lock of a running trainer (utils/checkpointing.lock_output_dir)
]
SECRET_KEYS = ("hub_token",)
_SECRET_SUFFIXES = ("_token", "api_key", "_secret", "password")
VALIDATION_GRID_NAME = "validation_grid.png"
SD_TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    """diffusers' Hub flags (same names and defaults)."""
    parser.add_argument("--push_to_hub", action="store_true", help="Whether or not to push the model to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None,
                        help="The token to use to push to the Model Hub. Prefer `hf auth login`; the token is never saved.")
    parser.add_argument("--hub_model_id", type=str, default=None,
                        help="The name of the repository to keep in sync with the local `output_dir` (default: its folder name).")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")


def check_hub_args(args) -> None:
    """Refuse combinations that would leak the token (diffusers' check, extended to --report_to all)."""
    report_to = getattr(args, "report_to", None) or ""
    if getattr(args, "hub_token", None) is not None and report_to in ("wandb", "all"):
        raise UserError(
            f"You cannot use both --report_to={report_to} and --hub_token due to a security risk of exposing your token "
            "(the tracker records every argument). Please use `hf auth login` to authenticate with the Hub."
        )


def is_secret_key(key: str) -> bool:
    return key in SECRET_KEYS or key.endswith(_SECRET_SUFFIXES)


def redact_args(args) -> dict:
    """The run's arguments as a dict without secrets (hub_token, *_token, *api_key, ...): safe to save or log."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {key: value for key, value in values.items() if not is_secret_key(key)}


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and not name.startswith((".", "/", "~")) and bool(_HUB_ID.match(name))


def _table_value(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_model_card(
    output_dir: str,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    pipeline_tag: str = "text-to-image",
    datasets: list[str] | None = None,
    hyperparameters: dict | None = None,
    validation_grid: str | None = None,
    lora: bool = False,
    repo_id: str | None = None,
    description: str | None = None,
    usage: str | None = None,
) -> str:
    """Write output_dir/README.md (YAML front matter + description, usage, hyperparameters). Returns its path.

    base_model: Hub id or local path the run started from (only a Hub id goes into the metadata,
    which the Hub validates); None or free text such as "from scratch (small preset)" = trained
    from scratch. license: default creativeml-openrail-m (Stable Diffusion's, as diffusers' cards
    say) for a fine-tune, none for a model trained from scratch. tags: default the Stable Diffusion ones. hyperparameters: pass `redact_args(args)`; secrets are dropped again here.
    validation_grid: an image to show; copied to output_dir/validation_grid.png so the card's
    relative link works on the Hub. repo_id: used in the usage snippet (default: the local folder;
    `push_output_dir` points it at the real repository). description / usage: the family's own text (usage: its
    "MODEL_REF" becomes the model's reference).
    """
    from huggingface_hub import ModelCard, ModelCardData

    os.makedirs(output_dir, exist_ok=True)
    fine_tuned = bool(base_model) and (_is_hub_id(base_model) or os.path.exists(base_model))
    if license is None and fine_tuned:
        license = "creativeml-openrail-m"
    all_tags = list(dict.fromkeys((tags if tags is not None else SD_TAGS) + ["diffusers", "diffusers-training"] + (["lora"] if lora else [])))
    card_data = ModelCardData(
        base_model=base_model if _is_hub_id(base_model) else None,
        license=license,
        tags=all_tags,
        pipeline_tag=pipeline_tag,
        datasets=[d for d in (datasets or []) if _is_hub_id(d)] or None,
        library_name="diffusers",
    )
    model_ref = repo_id or os.path.abspath(output_dir)
    name = os.path.basename(os.path.normpath(repo_id or output_dir))
    if description is None:
        kind = "LoRA adapter weights" if lora else "A text-to-image diffusion model"
        origin = f"fine-tuned from `{base_model}`" if fine_tuned else f"trained {base_model or 'from scratch'}".replace("trained trained", "trained")
        data = f" on {', '.join(f'`{d}`' for d in datasets)}" if datasets else ""
        description = f"{kind} {origin}{data} with this repository's `train_text_to_image.py` (Hugging Face Accelerate + diffusers)."

    sections = [f"# {name}", description]
    if validation_grid and os.path.isfile(validation_grid):
        target = os.path.join(output_dir, VALIDATION_GRID_NAME)
        if os.path.abspath(validation_grid) != os.path.abspath(target):
            shutil.copyfile(validation_grid, target)
        sections.append(f"## Validation images\n\n![validation images]({VALIDATION_GRID_NAME})")
    sections.append(usage.replace("MODEL_REF", model_ref) if usage else
                    _usage_section(model_ref, base_model, "peft" if lora and has_peft_adapters(output_dir) else lora))
    run_facts = _run_facts(output_dir)
    if run_facts:
        sections.append("## Run\n\n| fact | value |\n| --- | --- |\n" + "\n".join(run_facts))
    if hyperparameters:
        rows = [f"| {key} | {_table_value(value)} |" for key, value in hyperparameters.items()
                if not is_secret_key(key) and value is not None]
        sections.append("## Training hyperparameters\n\n| parameter | value |\n| --- | --- |\n" + "\n".join(rows))
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    path = os.path.join(output_dir, "README.md")
    ModelCard(content).save(path)
    return path


def _run_facts(output_dir: str) -> list[str]:
    """Table rows from output_dir/run_info.json (utils.run_record): what a reader needs to trace the model."""
    path = os.path.join(output_dir, "run_info.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        info = json.load(handle)
    versions = info.get("versions", {})
    git = info.get("git") or {}
    facts = {
        "code": f"{git.get('commit') or 'unknown'}" + (" (uncommitted changes)" if git.get("dirty") else ""),
        "devices": f"{info.get('world_size')} x {info.get('device')} {', '.join(info.get('cuda_devices') or [])}".strip(),
        "mixed precision": info.get("mixed_precision"),
        "seed": info.get("seed"),
        "training data fingerprint": info.get("data_fingerprint"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        "started": info.get("started"),
        "resumed": len(info.get("resumes") or []),
    }
    return [f"| {key} | {_table_value(value)} |" for key, value in facts.items() if value not in (None, "")]


def _usage_section(model_ref: str, base_model: str | None, lora) -> str:
    """`lora`: False, True (diffusers' LoRA file), or "peft" (LoHa/LoKr adapter folders, utils/sd/lycoris.py)."""
    if lora == "peft":
        load = (f'pipe = StableDiffusionPipeline.from_pretrained("{base_model or "BASE_MODEL"}", torch_dtype=torch.float16).to("cuda")\n'
                "# A LoHa/LoKr adapter: load_lora_weights cannot read it. Use generate.py (below), or\n"
                "# pytorch_lora_weights_kohya.safetensors (LyCORIS layout) in ComfyUI / AUTOMATIC1111.")
        cli = f'python generate.py --model {base_model or "BASE_MODEL"} --lora {model_ref} --prompt "..."'
    elif lora:
        load = (f'pipe = StableDiffusionPipeline.from_pretrained("{base_model or "BASE_MODEL"}", torch_dtype=torch.float16).to("cuda")\n'
                f'pipe.load_lora_weights("{model_ref}")')
        cli = f'python generate.py --model {base_model or "BASE_MODEL"} --lora {model_ref} --prompt "..."'
    else:
        load = f'pipe = StableDiffusionPipeline.from_pretrained("{model_ref}", torch_dtype=torch.float16).to("cuda")'
        cli = f'python generate.py --model {model_ref} --prompt "..."'
    return ("## Usage\n\n```python\nimport torch\nfrom diffusers import StableDiffusionPipeline\n\n"
            f'{load}\nimage = pipe("your prompt", num_inference_steps=25, guidance_scale=9.0).images[0]\nimage.save("image.png")\n```\n\n'
            f"or, from this repository:\n\n```bash\n{cli}\n```")


def files_to_upload(output_dir: str, ignore_patterns: list[str] | None = None) -> list[str]:
    """The paths (relative, posix) `push_output_dir` uploads: what `upload_folder` keeps after the patterns."""
    from huggingface_hub.utils import filter_repo_objects

    root = os.path.abspath(output_dir)
    files = sorted(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                   for folder, _, names in os.walk(root) for name in names)
    return list(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns))


def push_output_dir(
    output_dir: str,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "End of training",
    model_card: dict | None = None,
    ignore_patterns: list[str] | None = None,
):
    """Create (or reuse) the Hub model repo `repo_id` and upload `output_dir` minus IGNORE_PATTERNS.

    model_card: keyword arguments for `write_model_card`, to (re)write README.md first.
    Returns the `upload_folder` result (a CommitInfo). `token` is passed to the Hub API only.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    if model_card is not None:
        write_model_card(output_dir, **{**model_card, "repo_id": repo_id})
    else:
        _point_card_at(output_dir, repo_id)
    patterns = IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns
    logger.info(f"Uploading {len(files_to_upload(output_dir, patterns))} files from {output_dir} to {repo_id}")
    return api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message=commit_message,
                             ignore_patterns=patterns, token=token)


def _point_card_at(output_dir: str, repo_id: str) -> None:
    """Make a card's usage snippet (written with the local folder) load from the Hub repository instead."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    local = os.path.abspath(output_dir)
    updated = text.replace(f'"{local}"', f'"{repo_id}"').replace(f" {local} ", f" {repo_id} ")
    if updated != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(updated)


def main(argv=None) -> None:
    """`python -m utils.hub OUTPUT_DIR REPO_ID`: push a finished run (e.g. one trained offline)."""
    parser = argparse.ArgumentParser(description="Upload a training output folder to the Hugging Face Hub (log in with `hf auth login`).")
    parser.add_argument("output_dir")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry_run", action="store_true", help="Only list the files that would be uploaded.")
    args = parser.parse_args(argv)
    if args.dry_run:
        print("\n".join(files_to_upload(args.output_dir)))
        return
    print(push_output_dir(args.output_dir, args.repo_id, private=args.private))


if __name__ == "__main__":
    main()
