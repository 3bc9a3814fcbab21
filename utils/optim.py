"""Optimizer steps: fused kernels where torch has them, and the guarded update (clip, skip non-finite, step).
"""

from __future__ import annotations

import torch

from utils.telemetry import NonFiniteGuard, global_norm


def _skips_on_device(optimizer) -> bool:
    """Whether the torch optimizer skips its step when given a `found_inf` tensor (fused kernels)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and getattr(optimizer, "grad_scale", None) is None


def fused_kwargs(device) -> dict:
    """`fused=True` for torch optimizers where the fused kernels exist (CUDA, CPU), else nothing (XLA, MPS)."""
    return {"fused": True} if torch.device(device).type in ("cuda", "cpu") else {}


def apply_update(accelerator, optimizer, lr_scheduler, parameters, loss, max_grad_norm: float,
                 guard: NonFiniteGuard | None = None):
    """The optimizer update every script makes after `accelerator.backward(loss)`.

    On a gradient-sync step: clip to `max_grad_norm` (<= 0: no clipping), then step the optimizer
    and the LR schedule unless `guard` finds the loss or gradients non-finite. The skip happens on
    the device where the optimizer supports it (see NonFiniteGuard), so this costs no host sync;
    the LR schedule then still advances. With fp16's GradScaler, the scaler skips overflowing steps
    itself (and lowers the scale, which skipping its step() would prevent); the guard only counts.
    Gradients are zeroed on every call. Returns the pre-clip gradient norm (a device tensor) on
    sync steps, None on accumulation steps.
    """
    grad_norm = None
    if accelerator.sync_gradients:
        parameters = list(parameters)
        if max_grad_norm and max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
        else:
            grad_norm = global_norm(p.grad for p in parameters)
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
        scaler_skips = getattr(accelerator, "scaler", None) is not None
        if guard is None:
            optimizer.step()
            lr_scheduler.step()
        elif scaler_skips or _skips_on_device(torch_optimizer):
            flag = guard.nonfinite(loss, grad_norm)
            if not scaler_skips:
                torch_optimizer.found_inf = flag
            try:
                optimizer.step()
            finally:
                if not scaler_skips:
                    del torch_optimizer.found_inf
            lr_scheduler.step()
            guard.record(flag)
        elif guard.check(loss, parameters, grad_norm):
            optimizer.step()
            lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
