"""train_controlnet.py: diffusers' own examples/controlnet/test_controlnet.py (SD and SDXL) against it with the Hub
ids replaced by local tiny models and data, then what our trainers guarantee: exact resume, cached = uncached, two
processes, the conditioning image cropped like its image, class-mask conditioning, generate.py's round trip."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import accelerate_launch, launch_env, parse_and_list_flags, run_main_in_process
from PIL import Image, ImageDraw

SCRIPT = "train_controlnet.py"

# Every flag of diffusers' examples/controlnet/train_controlnet.py and train_controlnet_sdxl.py (main, 2026-12).
DIFFUSERS_FLAGS = """
--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --allow_tf32 --cache_dir --caption_column
--checkpointing_steps --checkpoints_total_limit --conditioning_image_column --controlnet_model_name_or_path
--crops_coords_top_left_h --crops_coords_top_left_w --dataloader_num_workers --dataset_config_name --dataset_name
--enable_npu_flash_attention --enable_xformers_memory_efficient_attention --gradient_accumulation_steps
--gradient_checkpointing --hub_model_id --hub_token --image_column --image_interpolation_mode --learning_rate
--logging_dir --lr_num_cycles --lr_power --lr_scheduler --lr_warmup_steps --max_grad_norm --max_train_samples
--max_train_steps --mixed_precision --num_train_epochs --num_validation_images --output_dir
--pretrained_model_name_or_path --pretrained_vae_model_name_or_path --proportion_empty_prompts --push_to_hub
--report_to --resolution --resume_from_checkpoint --revision --scale_lr --seed --set_grads_to_none --tokenizer_name
--tracker_project_name --train_batch_size --train_data_dir --use_8bit_adam --validation_image --validation_prompt
--validation_steps --variant
""".split()


def circle_pair(rng, size):
    """(image, conditioning image): a red disc on a random colour, and its white outline on black (fill50k's kind)."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
    condition = Image.new("RGB", (size, size), "black")
    x, y, r = int(rng.integers(size // 4, 3 * size // 4)), int(rng.integers(size // 4, 3 * size // 4)), size // 6
    ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill="red")
    ImageDraw.Draw(condition).ellipse((x - r, y - r, x + r, y + r), outline="white", width=2)
    return image, condition


def write_fill_dataset(root, count=10, size=64, seed=0) -> str:
    """A local stand-in of hf-internal-testing/fill10: a parquet dataset folder with image, conditioning_image (both
    `datasets.Image`) and text columns, which `datasets.load_dataset(root)` reads as --dataset_name."""
    import datasets

    rng = np.random.default_rng(seed)
    pairs = [circle_pair(rng, size) for _ in range(count)]
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    rows = datasets.Dataset.from_dict({"image": [p[0] for p in pairs], "conditioning_image": [p[1] for p in pairs],
                                       "text": [f"red circle with background {i}" for i in range(count)]},
                                      features=features)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    rows.to_parquet(os.path.join(root, "data", "train-00000-of-00001.parquet"))
    return str(root)


def write_tiny_controlnet(pipeline_dir, output_dir) -> str:
    """The stand-in of hf-internal-testing/tiny-controlnet(-sdxl): a ControlNet of the tiny pipeline's UNet (random
    zero convolutions, so it is not a no-op), saved as a folder."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_" in name:
                parameter.normal_(0, 0.02)
    controlnet.save_pretrained(output_dir)
    return str(output_dir)


@pytest.fixture(scope="module")
def fill10(tmp_path_factory):
    return write_fill_dataset(tmp_path_factory.mktemp("fill10"))


@pytest.fixture(scope="module")
def tiny_controlnet(tiny_pipeline_dir, tmp_path_factory):
    return write_tiny_controlnet(tiny_pipeline_dir, tmp_path_factory.mktemp("tiny-controlnet"))


@pytest.fixture(scope="module")
def tiny_controlnet_sdxl(tiny_sdxl_pipeline_dir, tmp_path_factory):
    return write_tiny_controlnet(tiny_sdxl_pipeline_dir, tmp_path_factory.mktemp("tiny-controlnet-sdxl"))


def test_every_diffusers_flag_is_accepted_with_its_default():
    import train_controlnet as script

    args, parser_flags = parse_and_list_flags(script.parse_args, ["--pretrained_model_name_or_path", "p",
                                                                  "--dataset_name", "d"])
    missing = [flag for flag in DIFFUSERS_FLAGS if flag not in parser_flags]
    assert not missing, f"flags of diffusers' ControlNet scripts we do not accept: {missing}"
    assert (args.output_dir, args.resolution, args.train_batch_size, args.num_train_epochs) == ("controlnet-model", 512, 4, 1)
    assert (args.learning_rate, args.lr_scheduler, args.lr_warmup_steps, args.adam_weight_decay) == (5e-6, "constant", 500, 1e-2)
    assert (args.validation_steps, args.num_validation_images, args.tracker_project_name) == (100, 4, "train_controlnet")
    assert (args.conditioning_image_column, args.image_column, args.caption_column) == ("conditioning_image", "image", "text")
    assert args.center_crop and args.checkpointing_steps == 500 and args.max_grad_norm == 1.0


def test_several_validation_prompts_pair_with_images(tmp_path):
    import train_controlnet as script
    from utils.sd.controlnet import validation_pairs

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    args = script.parse_args(["--pretrained_model_name_or_path", "p", "--dataset_name", "d", "--validation_prompt",
                              "one", "two", "--validation_image", str(tmp_path / "a.png")])
    assert args.validation_prompts == ["one", "two"] and args.validation_prompt is None
    assert validation_pairs(args.validation_prompts, args.validation_image) == [
        ("one", str(tmp_path / "a.png")), ("two", str(tmp_path / "a.png"))]
    assert validation_pairs(["p"], ["x", "y"]) == [("p", "x"), ("p", "y")]


# ---- diffusers' examples/controlnet/test_controlnet.py, verbatim but for the local models and data ----------

def diffusers_args(pipeline, fill10, controlnet, out, steps, extra=()):
    return [f"--pretrained_model_name_or_path={pipeline}", f"--dataset_name={fill10}", f"--output_dir={out}",
            "--resolution=64", "--train_batch_size=1", "--gradient_accumulation_steps=1",
            f"--controlnet_model_name_or_path={controlnet}", f"--max_train_steps={steps}", *extra]


@pytest.mark.slow
def test_controlnet_checkpointing_checkpoints_total_limit(tiny_pipeline_dir, fill10, tiny_controlnet, tmp_path):
    accelerate_launch(SCRIPT, diffusers_args(tiny_pipeline_dir, fill10, tiny_controlnet, tmp_path, 6,
                                             ["--checkpoints_total_limit=2", "--checkpointing_steps=2"]))
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-4", "checkpoint-6"}


@pytest.mark.slow
def test_controlnet_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(tiny_pipeline_dir, fill10,
                                                                                        tiny_controlnet, tmp_path):
    accelerate_launch(SCRIPT, diffusers_args(tiny_pipeline_dir, fill10, tiny_controlnet, tmp_path, 6,
                                             ["--checkpointing_steps=2"]))
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    accelerate_launch(SCRIPT, diffusers_args(tiny_pipeline_dir, fill10, tiny_controlnet, tmp_path, 8,
                                             ["--checkpointing_steps=2", "--resume_from_checkpoint=checkpoint-6",
                                              "--checkpoints_total_limit=2"]))
    assert {x for x in os.listdir(tmp_path) if "checkpoint" in x} == {"checkpoint-6", "checkpoint-8"}


@pytest.mark.slow
def test_controlnet_sdxl(tiny_sdxl_pipeline_dir, fill10, tiny_controlnet_sdxl, tmp_path):
    accelerate_launch(SCRIPT, diffusers_args(tiny_sdxl_pipeline_dir, fill10, tiny_controlnet_sdxl, tmp_path, 4,
                                             ["--checkpointing_steps=2"]))
    assert os.path.isfile(os.path.join(tmp_path, "diffusion_pytorch_model.safetensors"))
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    controlnet = ControlNetModel.from_pretrained(tmp_path)  # the trained one, with the SDXL pipeline
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_pipeline_dir, controlnet=controlnet)
    image = pipe("red circle", image=Image.new("RGB", (64, 64)), num_inference_steps=2, height=64, width=64,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


# ---- what our trainers guarantee ---------------------------------------------------------------------------

def our_args(pipeline, data, out, steps, extra=()):
    return ["--pretrained_model_name_or_path", pipeline, "--dataset_name", data, "--output_dir", out,
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps), "--seed", "0",
            "--report_to", "none", "--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--logging_steps", "1",
            *extra]


def weights(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "diffusion_pytorch_model.safetensors"))


def logged(output_dir, key="train/loss"):
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "report", "metrics.jsonl"))]
    return [row[key] for row in rows if key in row]


@pytest.mark.slow
def test_resume_is_bitwise_and_cached_equals_uncached(tiny_pipeline_dir, fill10, tmp_path):
    """4 steps straight = 2 steps, then a resume to 4 (EMA, random flips, the ControlNet's weights bit for bit);
    --precompute (latents and text from the cache, conditioning images from the data) = encoding every step."""
    import train_controlnet as script

    common = ["--checkpointing_steps", "2", "--use_ema", "--random_flip"]
    run_main_in_process(script, our_args(tiny_pipeline_dir, fill10, tmp_path / "straight", 4, common))
    run_main_in_process(script, our_args(tiny_pipeline_dir, fill10, tmp_path / "split", 2, common))
    run_main_in_process(script, our_args(tiny_pipeline_dir, fill10, tmp_path / "split", 4,
                                         common + ["--resume_from_checkpoint", "latest"]))
    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert straight.keys() == split.keys() and all(torch.equal(straight[k], split[k]) for k in straight)
    assert logged(tmp_path / "straight")[2:] == logged(tmp_path / "split")[-2:]

    run_main_in_process(script, our_args(tiny_pipeline_dir, fill10, tmp_path / "cached", 4,
                                         common + ["--precompute"]))
    np.testing.assert_allclose(logged(tmp_path / "cached"), logged(tmp_path / "straight"), rtol=1e-5)
    # Adam moves a weight by up to lr per step whatever its gradient's size: the float rounding of the two encoders'
    # paths shows as up to ~2% of that on near-zero gradients; allow 5% of 4 steps x lr 1e-3.
    cached = weights(tmp_path / "cached")
    assert max((cached[k] - straight[k]).abs().max().item() for k in straight) < 0.05 * 4 * 1e-3


@pytest.mark.slow
def test_two_processes_train_one_controlnet_and_score_it_like_one_process(tiny_pipeline_dir, fill10, tmp_path):
    """2 processes (DDP over gloo): identical ControlNets on both ranks, written once; the val/loss the 2-process run
    logs at its end is the one a single process computes for the saved ControlNet (the held-out loss does not depend
    on the number of processes)."""
    from test_reliability import assert_ranks_identical

    import train_controlnet as script

    out = tmp_path / "two"
    held_out = ["--validation_split", "0.2"]
    env = dict(launch_env(), TRAIN_DEBUG_RANK_CHECKSUM_DIR=str(tmp_path / "sums"))
    accelerate_launch(SCRIPT, our_args(tiny_pipeline_dir, fill10, out, 3, ["--train_batch_size", "1"] + held_out),
                      num_processes=2, env=env)
    assert_ranks_identical(tmp_path / "sums")
    two_process_loss = logged(out, "val/loss")[-1]
    # One process, the saved ControlNet loaded and not trained (learning rate 0): its val/loss at step 1.
    run_main_in_process(script, our_args(tiny_pipeline_dir, fill10, tmp_path / "one", 1, held_out + [
        "--controlnet_model_name_or_path", str(out), "--learning_rate", "0", "--train_batch_size", "1"]))
    assert logged(tmp_path / "one", "val/loss")[-1] == pytest.approx(two_process_loss, rel=1e-6)


def test_the_conditioning_image_is_cropped_and_flipped_with_its_image(tmp_path):
    """Random crops, flips and aspect-ratio buckets: the conditioning image (here the image itself, bilinear both)
    comes out exactly where the training image does."""
    import datasets

    from utils.sd.controlnet import ConditioningImages
    from utils.sd.data import ImageTransform, TextImageDataset

    rng = np.random.default_rng(0)
    paths = []
    for index, size in enumerate([(48, 80), (64, 40), (50, 50)]):
        paths.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[-1])
    rows = datasets.Dataset.from_dict({"image": paths, "text": ["a", "b", "c"], "hint": paths})
    dataset = TextImageDataset(rows, "image", "text", ImageTransform(32, "bilinear", False, True),
                               lambda caption: torch.zeros(4, dtype=torch.long), seed=3,
                               conditioning=ConditioningImages("hint", None, "bilinear"))
    dataset.buckets = [(48, 32), (32, 48), (32, 32)]
    for epoch in range(4):
        for index in range(3):
            item = dataset.load(index, epoch)
            assert item["conditioning_pixel_values"].shape == item["pixel_values"].shape
            torch.testing.assert_close(item["conditioning_pixel_values"] * 2 - 1, item["pixel_values"],
                                       atol=1e-6, rtol=0)


def test_class_masks_become_one_hot_channels(tmp_path):
    from utils.errors import UserError
    from utils.sd.controlnet import ConditioningImages

    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4] = 1
    mask[6:, :2] = 3
    Image.fromarray(mask).save(tmp_path / "m.png")
    onehot = ConditioningImages("m", 3).at_size(str(tmp_path / "m.png"), 16, 16)
    assert onehot.shape == (3, 16, 16) and set(onehot.unique().tolist()) == {0.0, 1.0}
    assert onehot[0, :8].all() and not onehot[1].any() and onehot[2, 12:, :4].all() and onehot.sum() == 8 * 16 + 16
    with pytest.raises(UserError, match="--conditioning_num_classes is 2"):
        ConditioningImages("m", 2).at_size(str(tmp_path / "m.png"), 16, 16)
    # K = 1: a 0/255 mask, thresholded at 128 as train_mask_dit.py's reader (the same function) does
    from utils.mask_dit.data import mask_to_channels

    binary = np.where(np.arange(64).reshape(8, 8) % 3 == 0, 255, 0).astype(np.uint8)
    binary[0, :3] = [100, 128, 200]
    Image.fromarray(binary).save(tmp_path / "b.png")
    single = ConditioningImages("b", 1).at_size(str(tmp_path / "b.png"), 8, 8)
    assert torch.equal(single, torch.from_numpy(mask_to_channels(binary, 1, "b")))
    assert single[0, 0, :3].tolist() == [0.0, 1.0, 1.0]


@pytest.mark.slow
def test_class_mask_conditioning_trains_and_generate_round_trips(tiny_pipeline_dir, tmp_path):
    """K-class masks (a CSV of image / mask paths relative to it): the ControlNet takes K channels, its
    conditioning.json says so, and generate.py samples the trained ControlNet under a mask, as diffusers' pipeline
    does with the same one-hot input."""
    import generate
    import train_controlnet as script
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    rng = np.random.default_rng(1)
    lines = ["file_name,mask,text"]
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"i{index}.png")
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[index * 8:(index + 1) * 8] = 1 + index % 2
        Image.fromarray(mask).save(tmp_path / f"m{index}.png")
        lines.append(f"i{index}.png,m{index}.png,vessels {index}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run_main_in_process(script, ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_file",
                                 tmp_path / "data.csv", "--image_column", "file_name", "--conditioning_image_column",
                                 "mask", "--conditioning_num_classes", "2", "--output_dir", out, "--resolution", "32",
                                 "--train_batch_size", "2", "--max_train_steps", "2", "--report_to", "none",
                                 "--validation_prompt", "vessels", "--validation_image", tmp_path / "m1.png",
                                 "--validation_steps", "1", "--num_validation_images", "1",
                                 "--validation_inference_steps", "2"])
    assert ControlNetModel.from_pretrained(out).config.conditioning_channels == 2
    assert json.load(open(out / "conditioning.json"))["num_classes"] == 2
    files = generate.main(["--model", tiny_pipeline_dir, "--controlnet", str(out), "--control_image",
                           str(tmp_path / "m1.png"), "--prompt", "vessels", "--num_images", "1", "--steps", "2",
                           "--height", "32", "--width", "32", "--seed", "5", "--output_dir", str(tmp_path / "gen"),
                           "--dtype", "fp32", "--device", "cpu", "--scheduler", "ddim"])
    ours = np.asarray(Image.open(files[0]))
    from utils.sd.controlnet import ConditioningImages
    from utils.sd.schedulers import make_scheduler

    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_pipeline_dir,
                                                             controlnet=ControlNetModel.from_pretrained(out),
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    control = ConditioningImages("mask", 2).at_size(str(tmp_path / "m1.png"), 32, 32)[None]
    theirs = pipe("vessels", image=control, num_inference_steps=2, height=32, width=32,
                  generator=torch.Generator().manual_seed(5), guidance_scale=generate_guidance(files[0])).images[0]
    assert np.abs(ours.astype(int) - np.asarray(theirs).astype(int)).max() <= 1


def generate_guidance(png_path) -> float:
    """The guidance scale generate.py wrote into the PNG's settings."""
    return float(json.loads(Image.open(png_path).text["parameters"])["guidance_scale"])


@pytest.mark.parametrize("extra, fragment", [
    (["--use_lora"], "--use_lora is not for ControlNet"),
    (["--validation_prompt", "p"], "--validation_prompt and --validation_image go together"),
    (["--conditioning_num_classes", "0"], "--conditioning_num_classes 0"),
], ids=["lora", "prompt_without_image", "classes"])
def test_bad_flags_are_one_block_errors(tiny_pipeline_dir, extra, fragment):
    import train_controlnet as script
    from utils.errors import UserError

    with pytest.raises(UserError, match=fragment):
        script.parse_args(["--pretrained_model_name_or_path", tiny_pipeline_dir, "--dataset_name", "d", *extra])


def test_a_missing_conditioning_column_or_a_foreign_pipeline_is_refused(tiny_pipeline_dir, tiny_sd3_pipeline_dir,
                                                                        fill10, tmp_path):
    import train_controlnet as script
    from utils.errors import UserError

    with pytest.raises(UserError, match="stable_diffusion_3|sd3"):
        script.parse_args(["--pretrained_model_name_or_path", tiny_sd3_pipeline_dir, "--dataset_name", fill10])
    with pytest.raises(UserError, match="--conditioning_image_column 'hint' not in"):
        run_main_in_process(script, our_args(tiny_pipeline_dir, fill10, tmp_path, 1,
                                             ["--conditioning_image_column", "hint"]))
    assert not os.path.exists(tmp_path / "diffusion_pytorch_model.safetensors")


def test_held_out_metrics_sample_each_held_out_row_under_its_own_conditioning_image(tiny_pipeline_dir, fill10,
                                                                                    tmp_path, monkeypatch):
    """--validation_split with --validation_metrics kid: val/kid is logged, and the held-out samples were drawn
    under the held-out rows' own conditioning images (recorded at the pipeline call)."""
    import datasets
    from diffusers import StableDiffusionControlNetPipeline

    import train_controlnet as script
    from utils.sd.controlnet import ConditioningImages

    class Pooled(torch.nn.Module):
        def forward(self, images):
            return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)

    extractor = str(tmp_path / "features.pt")
    torch.jit.script(Pooled()).save(extractor)
    seen, original = [], StableDiffusionControlNetPipeline.__call__

    def recording(self, prompt=None, image=None, **kwargs):
        seen.append(image.clone())
        return original(self, prompt, image=image, **kwargs)
    monkeypatch.setattr(StableDiffusionControlNetPipeline, "__call__", recording)
    out = tmp_path / "out"
    run_main_in_process(script, our_args(tiny_pipeline_dir, fill10, out, 2, [
        "--validation_split", "0.3", "--validation_metrics", "kid", "--metrics_feature_extractor", extractor,
        "--validation_steps", "2", "--validation_inference_steps", "1", "--train_batch_size", "1"]))
    assert logged(out, "val/kid") and seen
    rows = datasets.load_dataset(fill10, split="train")
    references = [ConditioningImages("conditioning_image", None, "lanczos").at_size(row["conditioning_image"], 32, 32)
                  for row in rows]
    matched = [min(range(len(references)), key=lambda i: (references[i] - image[0]).abs().max().item())
               for image in seen]
    assert all((references[i] - image[0]).abs().max() < 1e-6 for i, image in zip(matched, seen))
    assert len(set(matched)) == len(seen) == 3  # the 3 held-out rows, each under its own image
