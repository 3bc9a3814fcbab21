"""Shared mechanisms for the training scripts at the repository root.

Shared mechanics sit at the top level, one concern per module; domain code in `utils/sd/`,
`utils/mask_dit/` and `utils/segmentation/`. The scripts read top to bottom and call into these.

| folder / module | what it holds | used by |
| --- | --- | --- |
| `utils/run.py` | run flags (`--output_dir`, `--mixed_precision`, ...), the Accelerator with trackers and seeding, weight dtype, progress bar, steps per epoch, `training_args.json`, rank checksums | all three trainers |
| `utils/config.py` | `--config run.yaml` (YAML keys are flag names), hyphen aliases | all scripts |
| `utils/telemetry.py` | `global_norm`, `HealthMonitor` (health scalars kept on the device), `NonFiniteGuard` | all three trainers |
| `utils/stopping.py` | `StopSignal`: SIGTERM/SIGINT → save at the step boundary, the resume message | all three trainers |
| `utils/errors.py` | the out-of-memory hint | all three trainers |
| `utils/optim.py` | `create_optimizer` (fused AdamW / 8-bit AdamW / Adagrad), `warmup_cosine`, `restart_lr_schedule`, `apply_update` (clip, skip non-finite, step) | all three trainers |
| `utils/ema.py` | EMA flags, `create_ema`, `place_ema`, `ema_step`, `ema_weights()` (swap in for validation), save/load | all three trainers |
| `utils/checkpointing.py` | atomic `checkpoint-N` save, rotation, `resume_position()`, the one atomic directory writer (`atomic_directory`), module save/load, `own_memory` | all three trainers, generate.py |
| `utils/data.py` | per-sample randomness `sample_rng(seed, epoch, index)`, `EpochDataset`, the train dataloader, `epoch_batches()` (set epoch, skip resumed batches) | every script |
| `utils/images.py` | image decoding with clear errors, resize/crop, PIL ↔ tensor, grids, saving/logging sample images | t2i, mask DiT, generate.py, demo |
| `utils/latents.py` | VAE latents in model space: `encode_latents`, `scale_latents`, `decode_latents` (scale + shift, once) | t2i, mask DiT, generate.py, demo |
| `utils/text_encoders.py` | `load_text_encoder` (CLIP for SD; CLIP/T5/any AutoModel for the mask DiT) | t2i, mask DiT, generate.py |
| `utils/cache.py` | the generic on-disk cache: fingerprints, sharded safetensors + atomic manifest, cache flags, encoders on/off the device | t2i, mask DiT |
| `utils/metrics.py` | `psnr` (one implementation, any value range) | mask DiT, demo |
| `utils/auto_batch.py` | `--train_batch_size auto`: probe real steps for the largest batch that fits | all three trainers |
| `utils/hub.py` | model cards, `--push_to_hub`, secrets redaction | all three trainers |
| `utils/report.py`, `utils/run_record.py` | `report/metrics.jsonl` + `report/training_curves.png`; `run_info.json` | all three trainers |
| `utils/xla.py` | accelerate XLA loader fix, torch_xla compilation counters | segmentation |
| `utils/sd/` | Stable Diffusion: `models.py` (load or build the components), `builder.py` (tiny/small/base presets, BPE tokenizer), `data.py` (text-image sources, `ImageTransform`, `TextImageDataset`), `cache.py` (latent/text caches for SD), `lora.py`, `vae_training.py` (VAE stage), `validation.py` (validation images), `schedulers.py`, `kanji_dataset.py` | train_text_to_image.py, generate.py, kanji_demo.py |
| `utils/mask_dit/` | the mask DiT: `nextdit.py` (model, presets, Lumina-Next weights), `flow_matching.py`, `data.py` (image-mask pairs, synthetic fundus), `cache.py`, `pipeline.py` (pipeline folder, sampling, tiles), `metrics.py` (SSIM, mask IoU) | train_mask_dit.py, generate.py |
| `utils/segmentation/` | MSHNet: `mshnet.py` (model + SLS loss), `data.py` (IRSTD-1k layout, synthetic frames), `metrics.py` (mIoU, nIoU, Pd, Fa) | train_segmentation_tpu.py |
"""

import logging


class _DropBitsandbytesCpu4BitKernelWarning(logging.Filter):
    """bitsandbytes >= 0.50 logs, on import on any CPU with AVX512-BF16, that it could not fetch its CPU
    4-bit GEMM kernel from the Hub (`kernels` package). peft imports bitsandbytes whenever it is
    installed, so every launch printed it. We never run 4-bit layers (only `--use_8bit_adam`, whose
    8-bit optimizer does not use that kernel, tested), and offline runs could not fetch it anyway:
    drop exactly that record. Installed here because every script imports `utils` before peft."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesCpu4BitKernelWarning())


class _DropTorchvisionFallbackWarning(logging.Filter):
    """transformers >= 5 warns, when diffusers' pipelines import CLIPImageProcessor (the safety checker's
    feature extractor), that torchvision is missing and it uses the PIL image processor instead. This
    project installs no torchvision on purpose (requirements.txt: no CPU build matches our torch) and uses
    the PIL processor, which is what that fallback gives: drop exactly that record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in str(record.msg)


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackWarning())
