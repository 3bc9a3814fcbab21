"""Shared test set-up: everything offline, small threads, and the tiny pipeline built once."""

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on 2 shared cores run many times faster on one thread (measured: 10-40x under load).
torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end run of a script (still part of `make test`)")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A randomly initialised 'tiny' StableDiffusionPipeline folder, built offline once per session."""
    from utils.sd.builder import build_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    return build_pipeline(str(path), preset="tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    """A randomly initialised 'tiny-sdxl' StableDiffusionXLPipeline folder (two text encoders), built offline."""
    from utils.sd.builder import build_pipeline

    path = tmp_path_factory.mktemp("tiny-sdxl")
    return build_pipeline(str(path), preset="tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_pipeline_dir(tmp_path_factory):
    """A randomly initialised tiny StableDiffusion3Pipeline folder (diffusers' test configs; CLIP x2 + T5), offline."""
    from utils.families.sd3 import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def tiny_flux_pipeline_dir(tmp_path_factory):
    """A randomly initialised tiny FluxPipeline folder (diffusers' test configs; CLIP + T5, guidance embedding)."""
    from utils.families.flux import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(str(tmp_path_factory.mktemp("tiny-flux")))


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """5 photos of 'the subject' (random images, no captions: a DreamBooth instance prompt is theirs)."""
    root = tmp_path_factory.mktemp("instance")
    write_captioned_folder(root, count=5, size=(40, 40), seed=3)
    for caption in root.glob("*.txt"):
        caption.unlink()
    return str(root)


def overfit_one_image_psnr(tmp_path, build_pipeline, pipeline_class, train_args=(), sample_args=None,
                           sample_size: int = 8) -> float:
    """A model trained by train_text_to_image.py on one 8x8 image (4 copies, one caption) denoises in the family's
    diffusers pipeline: PSNR (dB) of the pipeline's sample (28 steps, no guidance) against the VAE's reconstruction
    of the image (the best a frozen random VAE gives). `build_pipeline(path)` writes the family's tiny pipeline; its
    VAE posterior is made narrow here (log-variance -30), else the model would learn the random VAE's noise."""
    import numpy as np
    import torch
    from PIL import Image

    import train_text_to_image as script

    pipeline_dir = build_pipeline(str(tmp_path / "pipe"))
    pipe = pipeline_class.from_pretrained(pipeline_dir)
    conv_out = pipe.vae.encoder.conv_out
    with torch.no_grad():
        conv_out.weight[conv_out.out_channels // 2:] = 0
        conv_out.bias[conv_out.out_channels // 2:] = -30.0
    pipe.save_pretrained(pipeline_dir)
    y, x = np.mgrid[0:8, 0:8]
    pixels = np.stack([x * 32, y * 32, (x + y) * 16], -1).clip(0, 255).astype(np.uint8)
    pixels[2:6, 2:6] = [255, 40, 40]
    data = tmp_path / "data"
    data.mkdir()
    for index in range(4):
        Image.fromarray(pixels).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text("a red square")
    run_main_in_process(script, ["--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir", data,
                                 "--resolution", "8", "--train_batch_size", "4", "--learning_rate", "3e-3",
                                 "--lr_scheduler", "cosine", "--lr_warmup_steps", "0", "--output_dir",
                                 tmp_path / "out", "--report_to", "none", "--seed", "0", *map(str, train_args)])
    trained = pipeline_class.from_pretrained(tmp_path / "out")
    trained.set_progress_bar_config(disable=True)
    image = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        reference = (trained.vae.decode(trained.vae.encode(image).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2
        sample = trained("a red square", height=sample_size, width=sample_size, num_inference_steps=28,
                         guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt",
                         **(sample_args or {})).images
    return 10 * np.log10(1.0 / ((sample - reference) ** 2).mean().item())


def parse_and_list_flags(parse_args, argv):
    """(the parsed args, every option string the script's parser accepts)."""
    import argparse

    seen = set()
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.update(self._option_string_actions)
        return original(self, args, namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        return parse_args(argv), seen
    finally:
        argparse.ArgumentParser.parse_args = original


def launch_env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TRAIN_CPU_THREADS="1",
               PYTHONPATH=REPO_ROOT)
    return env


def accelerate_launch(script, args, num_processes=1, extra_launch_args=(), timeout=600, check=True, env=None):
    """Run `accelerate launch [...] script args` the way users do; return the CompletedProcess."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
              "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    if num_processes > 1:
        launch += ["--multi_gpu"]
    else:
        launch += ["--cpu"]
    launch += list(extra_launch_args)
    cmd = launch + [os.path.join(REPO_ROOT, script)] + [str(a) for a in args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env or launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-8000:]}")
    return result


def write_captioned_folder(root, count=8, size=(40, 48), seed=0, caption="a picture of thing {i}", prefix="img"):
    """`count` random RGB images of `size` (height, width) with same-named .txt captions. Returns `root` as str."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(os.path.join(root, f"{prefix}{i}.png"))
        with open(os.path.join(root, f"{prefix}{i}.txt"), "w", encoding="utf-8") as handle:
            handle.write(caption.format(i=i))
    return str(root)


def run_main_in_process(script, argv):
    """script.main(script.parse_args(argv)) here, with fresh accelerate state and signal handlers put back."""
    import signal

    from accelerate.state import AcceleratorState, GradientState

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return script.main(script.parse_args([str(a) for a in argv]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def count_builds(monkeypatch):
    """The cache folders utils.cache writes from now on (a list that fills as they are built)."""
    from utils import cache

    calls = []
    original = cache.write_cache

    def counting(directory, *args, **kwargs):
        calls.append(os.path.basename(directory))
        return original(directory, *args, **kwargs)
    monkeypatch.setattr(cache, "write_cache", counting)
    return calls
