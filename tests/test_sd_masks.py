"""--masked_loss (utils/sd/masks.py): masks found beside the images or in their alpha channel, transformed exactly
as their images (crops, flips, buckets), applied on the latent grid, the same from the latent cache, and bad masks
refused in one block."""

import os

import numpy as np
import pytest
import torch
from conftest import run_main_in_process
from PIL import Image
from test_sd_cache import read_losses
from test_user_errors import expect_user_error


def write_masked_folder(root, sizes=((40, 32), (32, 48), (32, 36), (32, 40)), alpha_for=()):
    """Images whose grey value *is* their mask (so a test can compare the two after any transform), each with a
    `mask/<name>.png`, or (`alpha_for` indices) the mask in the image's alpha channel instead (then its colour is
    black where the mask is white: composited onto white, the image reads 1 - mask)."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "mask"), exist_ok=True)
    for i, (height, width) in enumerate(sizes):
        mask = (rng.random((height, width)) > 0.5).astype(np.uint8) * 255
        grey = np.repeat(mask[..., None], 3, axis=2)
        if i in alpha_for:
            Image.fromarray(np.concatenate([255 - grey, mask[..., None]], axis=2), "RGBA").save(
                os.path.join(root, f"img{i}.png"))
        else:
            Image.fromarray(grey).save(os.path.join(root, f"img{i}.png"))
            Image.fromarray(mask, "L").save(os.path.join(root, "mask", f"img{i}.png"))
        with open(os.path.join(root, f"img{i}.txt"), "w") as handle:
            handle.write(f"thing {i}")
    return str(root)


def test_masks_take_the_images_crops_flips_and_buckets(tmp_path):
    import datasets

    from utils.sd.data import ImageTransform, TextImageDataset

    folder = write_masked_folder(tmp_path / "data", alpha_for=(2,))
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    rows = datasets.Dataset.from_dict({"image": [os.path.join(folder, n) for n in names], "text": ["x"] * len(names)})
    dataset = TextImageDataset(rows, "image", "text", ImageTransform(32, "lanczos", False, True),
                               lambda caption: torch.zeros(1), seed=3, masked=True)
    for buckets in (None, [(32, 32), (48, 32), (32, 32), (40, 32)]):  # (width, height): no resize needed
        dataset.buckets = buckets
        for epoch in range(4):  # random crops and flips differ by epoch
            dataset.set_epoch(epoch)
            for index in range(len(dataset)):
                item = dataset[index]
                image_grey = (item["pixel_values"][0] + 1) / 2  # the image's own values are its mask
                if index == 2:  # the alpha-channel one
                    image_grey = 1 - image_grey
                assert item["mask"].shape == (1, *item["pixel_values"].shape[1:])
                assert torch.allclose(item["mask"][0], image_grey, atol=1 / 255)


def test_masked_loss_weights_each_latent_element_by_the_area_mean_of_its_pixels():
    from utils.sd.losses import per_sample_loss
    from utils.sd.masks import latent_mask

    generator = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(2, 4, 4, 4, generator=generator) for _ in range(2))
    pixels = torch.zeros(2, 1, 32, 32)
    pixels[0, :, :16, :] = 1.0  # top half of sample 0
    pixels[1, :, :, :8] = 0.5  # left quarter of sample 1, half weight
    mask = latent_mask(pixels, pred)
    expected_mask = torch.zeros(2, 1, 4, 4)
    expected_mask[0, :, :2, :] = 1.0
    expected_mask[1, :, :, :1] = 0.5
    assert torch.equal(mask, expected_mask)
    loss = per_sample_loss(pred, target, "l2", None, mask)
    squared = (pred - target) ** 2
    assert torch.allclose(loss[0], squared[0, :, :2, :].sum() / squared[0].numel())
    assert torch.allclose(loss[1], 0.5 * squared[1, :, :, :1].sum() / squared[1].numel())


@pytest.mark.slow
def test_masked_training_from_the_latent_cache_gives_the_same_losses(tmp_path, tiny_pipeline_dir):
    import train_text_to_image as script

    folder = write_masked_folder(tmp_path / "data", alpha_for=(1,))
    common = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", folder, "--resolution", "32",
              "--center_crop", "--random_flip", "--train_batch_size", "2", "--max_train_steps", "4", "--seed", "0",
              "--logging_steps", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--masked_loss"]
    run_main_in_process(script, common + ["--output_dir", tmp_path / "images"])
    run_main_in_process(script, common + ["--output_dir", tmp_path / "cached", "--cache_latents",
                                          "--latent_cache_dir", tmp_path / "cache"])
    run_main_in_process(script, common[:-1] + ["--output_dir", tmp_path / "unmasked"])
    from_images, from_cache = read_losses(str(tmp_path / "images")), read_losses(str(tmp_path / "cached"))
    assert len(from_images) == 4
    torch.testing.assert_close(torch.tensor(from_cache), torch.tensor(from_images), rtol=1e-4, atol=1e-6)
    # About half of every mask is black: the masked loss is well below the plain one.
    assert sum(from_images) < 0.8 * sum(read_losses(str(tmp_path / "unmasked")))


def test_missing_and_wrong_size_masks_are_one_block_errors(capsys, tmp_path, tiny_pipeline_dir):
    import train_text_to_image as script

    folder = write_masked_folder(tmp_path / "data")
    os.remove(os.path.join(folder, "mask", "img1.png"))
    Image.new("L", (10, 10)).save(os.path.join(folder, "mask", "img2.png"))
    argv = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", folder, "--resolution", "32",
            "--max_train_steps", "1", "--output_dir", tmp_path / "out", "--masked_loss"]
    message = expect_user_error(capsys, script, argv, "1 image(s) without a mask", "img1.png",
                                "1 mask(s) of the wrong size", "img2.png is 10x10, its image 36x32")
    assert "--masked_loss" in message


def test_kohya_folders_repeat_and_caption_and_reg_images_train_as_prior(tmp_path, tiny_pipeline_dir):
    import json

    import train_text_to_image as script
    from utils.sd.kohya_folders import repeat_folder_rows

    train, reg = tmp_path / "train", tmp_path / "reg"
    for folder, count in ((train / "3_sks thing", 2), (train / "other", 1), (reg / "1_thing", 3)):
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (train / "3_sks thing" / "1.caption").write_text("sks thing on a table")
    images, captions = repeat_folder_rows(str(train))
    assert [os.path.basename(p) for p in images] == ["0.png"] * 3 + ["1.png"] * 3
    assert captions == ["sks thing"] * 3 + ["sks thing on a table"] * 3
    out = tmp_path / "run"
    run_main_in_process(script, ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", train,
                                 "--reg_data_dir", reg, "--prior_loss_weight", "0.5", "--resolution", "32",
                                 "--train_batch_size", "2", "--max_train_steps", "2", "--output_dir", out,
                                 "--seed", "0", "--lr_warmup_steps", "0", "--report_to", "none"])
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["with_prior_preservation"] and saved["plan"]["updates_per_epoch"] == 3  # 6 instance rows / 2


def test_masked_dreambooth_with_generated_class_images_trains_them_whole(tmp_path, tiny_pipeline_dir):
    """Instance images with masks, class images generated without: the class half trains unmasked."""
    import torch.nn.functional as F

    import train_text_to_image as script
    from utils.sd.data import ImageTransform, TextImageDataset
    from utils.sd.dreambooth import dreambooth_rows
    from utils.sd.kohya_folders import image_files

    instance = write_masked_folder(tmp_path / "instance")
    class_dir = tmp_path / "class"
    run_main_in_process(script, ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--instance_data_dir", instance,
                                 "--instance_prompt", "sks thing", "--with_prior_preservation", "--class_data_dir",
                                 class_dir, "--class_prompt", "thing", "--num_class_images", "2", "--masked_loss",
                                 "--resolution", "32", "--center_crop", "--train_batch_size", "2", "--max_train_steps",
                                 "2", "--output_dir", tmp_path / "out", "--seed", "0", "--report_to", "none"])
    assert os.path.isfile(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    rows = dreambooth_rows(instance, "sks thing", 1, image_files(str(class_dir)), "thing", ("image", "text"))
    dataset = TextImageDataset(rows, "image", "text", ImageTransform(32, "lanczos", True, False),
                               lambda caption: torch.zeros(1), masked=True)
    assert torch.equal(dataset[len(rows) - 1]["mask"], torch.ones(1, 32, 32))  # a class image
    assert 0 < dataset[0]["mask"].mean() < 1  # an instance image: its own mask
    assert F.mse_loss(dataset[0]["mask"], dataset[1]["mask"]) > 0


def test_masked_loss_resumes_bitwise(tmp_path, tiny_pipeline_dir):
    import train_text_to_image as script
    from safetensors.torch import load_file

    folder = write_masked_folder(tmp_path / "data", alpha_for=(3,))
    common = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", folder, "--resolution", "32",
              "--random_flip", "--train_batch_size", "2", "--seed", "0", "--lr_warmup_steps", "0", "--masked_loss",
              "--checkpointing_steps", "1", "--learning_rate", "1e-3", "--report_to", "none"]
    run_main_in_process(script, common + ["--max_train_steps", "3", "--output_dir", tmp_path / "straight"])
    run_main_in_process(script, common + ["--max_train_steps", "1", "--output_dir", tmp_path / "stopped"])
    run_main_in_process(script, common + ["--max_train_steps", "3", "--output_dir", tmp_path / "stopped",
                                          "--resume_from_checkpoint", "latest"])
    weights = "unet/diffusion_pytorch_model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "stopped" / weights)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
