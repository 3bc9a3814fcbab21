"""Shared mechanisms for the training scripts at the repository root.

Each module holds one mechanism (config loading, data, checkpointing, EMA, ...);
the scripts read top to bottom and call into these.
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
