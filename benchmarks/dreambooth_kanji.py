"""DreamBooth on the kanji demo's model: teach it one new "character" from 5 drawings, with and without prior
preservation, and measure what it learned and what it forgot.

    make demo                                    # demo_output/model and demo_output/data (~4 min)
    python benchmarks/dreambooth_kanji.py --demo_dir demo_output --output_dir dreambooth_kanji

1. draws the new glyph (not a kanji: a frame with a diagonal and a dot) 5 times with small shifts and stroke
   widths, captioned "kanji meaning sks";
2. samples the demo model once per training character from its own caption: the model's prior, used as
   regularisation images (--reg_data_dir, kohya's spelling of DreamBooth's prior preservation);
3. fine-tunes the demo model twice with the same command, steps and seed, with and without those images;
4. measures each model with the demo's own classifier (nearest training glyph by differing ink pixels, the new
   glyph added to the glyph set): how often "kanji meaning sks" gives the new glyph (learned), and the demo's
   seen-prompt top-1 over the training characters (kept), against the model before fine-tuning.
Writes results.json and results.md in --output_dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

INSTANCE_PROMPT = "kanji meaning sks"


def draw_new_glyph(resolution: int, shift: tuple[int, int] = (0, 0), width: int = 4) -> Image.Image:
    """The new "character": a frame, a diagonal and a dot, black ink on white like the demo's glyphs."""
    image = Image.new("RGB", (resolution, resolution), "white")
    draw = ImageDraw.Draw(image)
    m, dx, dy, r = resolution // 6, shift[0], shift[1], resolution
    draw.rectangle([m + dx, m + dy, r - m + dx, r - m + dy], outline="black", width=width)
    draw.line([m + dx, m + dy, r - m + dx, r - m + dy], fill="black", width=width)
    c = r * 2 // 3
    draw.ellipse([c - width * 2 + dx, r // 4 - width * 2 + dy, c + width * 2 + dx, r // 4 + width * 2 + dy], fill="black")
    return image


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_dir", default="demo_output", help="make demo's --output_dir (model/ and data/).")
    parser.add_argument("--output_dir", default="dreambooth_kanji")
    parser.add_argument("--max_train_steps", type=int, default=150)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    parser.add_argument("--num_samples", type=int, default=16, help="Samples of the instance prompt per model.")
    parser.add_argument("--num_inference_steps", type=int, default=25, help="The demo's sampler steps.")
    parser.add_argument("--characters", type=int, default=None, help="Score only the first N training characters.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def write_instance_images(folder: str, resolution: int) -> np.ndarray:
    os.makedirs(folder, exist_ok=True)
    variants = [((0, 0), 4), ((2, 0), 4), ((0, 2), 3), ((-2, 1), 4), ((1, -2), 5)]
    for i, (shift, width) in enumerate(variants):
        draw_new_glyph(resolution, shift, width).save(os.path.join(folder, f"sks{i}.png"))
        with open(os.path.join(folder, f"sks{i}.txt"), "w", encoding="utf-8") as handle:
            handle.write(INSTANCE_PROMPT)
    return np.asarray(draw_new_glyph(resolution).convert("L"), dtype=np.float32)


def load_pipeline(path: str):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def samples(pipe, prompts, resolution, first_seed, demo_args) -> np.ndarray:
    from kanji_demo import sample

    images = sample(pipe, prompts, demo_args, resolution, first_seed)
    return np.stack([np.asarray(im.convert("L")) for im in images]).astype(np.float32)


def measure(path: str, glyphs: np.ndarray, captions: list[str], new_glyph: np.ndarray, resolution: int,
            num_samples: int, demo_args) -> dict:
    """learned: fraction of instance-prompt samples nearest to the new glyph; kept: the demo's seen-prompt top-1."""
    from kanji_demo import classify_by_nearest_glyph, seen_prompt_accuracy

    pipe = load_pipeline(path)
    seen = samples(pipe, captions, resolution, 1000, demo_args)
    new = samples(pipe, [INSTANCE_PROMPT] * num_samples, resolution, 5000, demo_args)
    with_new = np.concatenate([glyphs, new_glyph[None]])
    nearest = classify_by_nearest_glyph(new, with_new)[:, 0]
    kept = seen_prompt_accuracy(seen, glyphs)
    return {"new_glyph_top1": float((nearest == len(glyphs)).mean()), "seen_prompt_top1": kept["seen_prompt_top1"],
            "seen_prompt_top5": kept["seen_prompt_top5"], "num_seen_prompts": kept["num_seen_prompts"]}


def fine_tune(model: str, instance: str, reg: str | None, out: str, args, resolution: int) -> float:
    from utils.cpu_threads import available_cores

    launch = [] if torch.cuda.is_available() else ["--num_cpu_threads_per_process", str(available_cores())]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch,
               os.path.join(REPO_ROOT, "train_text_to_image.py"), "--pretrained_model_name_or_path", model,
               "--train_data_dir", instance, "--resolution", str(resolution), "--center_crop", "--train_batch_size", "4",
               "--max_train_steps", str(args.max_train_steps), "--learning_rate", str(args.learning_rate),
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--adam_weight_decay", "0.0",
               "--checkpointing_steps", "100000", "--seed", str(args.seed), "--output_dir", out,
               "--report_to", "none", "--overwrite_output_dir"]
    if reg is not None:
        command += ["--reg_data_dir", reg, "--prior_loss_weight", str(args.prior_loss_weight)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1",
                                                                HF_DATASETS_OFFLINE="1"))
    return time.perf_counter() - start


def main(argv=None) -> dict:
    from kanji_demo import load_split, parse_args as demo_parse_args

    args = parse_args(argv)
    demo_args = demo_parse_args(["--num_inference_steps", str(args.num_inference_steps)])  # the demo's sampler
    model, data = os.path.join(args.demo_dir, "model"), os.path.join(args.demo_dir, "data")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        sys.exit(f"error: no demo model in {model}: run `make demo` (or kanji_demo.py --output_dir {args.demo_dir}).")
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(1)
    with open(os.path.join(model, "training_args.json"), encoding="utf-8") as handle:
        resolution = json.load(handle)["resolution"]
    glyph_images, captions = load_split(data, "train", resolution, limit=args.characters, one_per_character=True)
    glyphs = ((glyph_images.mean(1) + 1) * 127.5).numpy()
    new_glyph = write_instance_images(os.path.join(args.output_dir, "instance"), resolution)

    reg = os.path.join(args.output_dir, "reg")  # the model's prior: its own sample for each training caption
    if not os.path.isdir(reg):
        os.makedirs(reg + ".tmp", exist_ok=True)
        pipe = load_pipeline(model)
        from kanji_demo import sample

        for i, (image, caption) in enumerate(zip(sample(pipe, captions, demo_args, resolution, 2000), captions)):
            image.save(os.path.join(reg + ".tmp", f"prior{i:04d}.png"))
            with open(os.path.join(reg + ".tmp", f"prior{i:04d}.txt"), "w", encoding="utf-8") as handle:
                handle.write(caption)
        os.replace(reg + ".tmp", reg)

    results = {"command": " ".join(["python benchmarks/dreambooth_kanji.py", *(argv or sys.argv[1:])]),
               "settings": vars(args), "models": {}}
    results["models"]["before"] = measure(model, glyphs, captions, new_glyph, resolution, args.num_samples, demo_args)
    for name, reg_dir in (("without prior preservation", None), ("with prior preservation", reg)):
        out = os.path.join(args.output_dir, name.replace(" ", "_"))
        seconds = fine_tune(model, os.path.join(args.output_dir, "instance"), reg_dir, out, args, resolution)
        results["models"][name] = {**measure(out, glyphs, captions, new_glyph, resolution, args.num_samples,
                                             demo_args), "train_seconds": round(seconds, 1)}
    lines = ["| model | new glyph from its prompt (top-1) | training characters kept (seen-prompt top-1) | top-5 |",
             "| --- | --- | --- | --- |"]
    for name, m in results["models"].items():
        lines.append(f"| {name} | {100 * m['new_glyph_top1']:.0f}% of {args.num_samples} | "
                     f"{100 * m['seen_prompt_top1']:.1f}% of {m['num_seen_prompts']} | "
                     f"{100 * m['seen_prompt_top5']:.1f}% |")
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(f"`{results['command']}`\n\n{table}\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
