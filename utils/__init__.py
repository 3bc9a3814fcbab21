"""Shared mechanisms for the training scripts at the repository root.

Shared mechanics sit at the top level, one concern per module; domain code in `utils/sd/`,
`utils/mask_dit/` and `utils/segmentation/`. The map of every module (what it holds, who uses it) is
docs/LAYOUT.md, the one copy (tests/test_layout.py keeps it complete).
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
