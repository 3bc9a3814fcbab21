"""Optimizers and LR schedules: the one optimizer builder, warmup-cosine with a floor, restarting a
schedule on resume, and the guarded update (clip, skip non-finite, step) every loop calls.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math

import torch

from utils.errors import MissingPackageError, UserError
from utils.telemetry import NonFiniteGuard, global_norm

logger = logging.getLogger(__name__)


def _skips_on_device(optimizer) -> bool:
    """Whether the torch optimizer skips its step when given a `found_inf` tensor (fused kernels)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and getattr(optimizer, "grad_scale", None) is None


def fused_kwargs(device) -> dict:
    """`fused=True` for torch optimizers where the fused kernels exist (CUDA, CPU), else nothing (XLA, MPS)."""
    return {"fused": True} if torch.device(device).type in ("cuda", "cpu") else {}


# name -> (what it is, the package it comes from, the learning rate its authors recommend as a start)
OPTIMIZERS = {
    "adamw": ("torch AdamW (fused where it exists)", "torch", "1e-4 (fine-tune), 1e-3 (from scratch)"),
    "adamw8bit": ("8-bit AdamW", "bitsandbytes", "as adamw"),
    "adagrad": ("torch Adagrad (fused where it exists)", "torch", "0.05 (MSHNet's recipe)"),
    "prodigy": ("Prodigy: Adam that estimates its own step size", "prodigyopt", "1.0 (it scales itself)"),
    "adafactor": ("Adafactor (transformers), factored second moments", "transformers", "1e-4 to 1e-3 with a fixed lr"),
    "lion": ("Lion: sign of an interpolated momentum", "lion-pytorch",
             "3-10x smaller than AdamW's, weight decay 3-10x larger"),
    "schedulefree_adamw": ("schedule-free AdamW (no LR decay needed)", "schedulefree",
                           "1e-3 to 2.5e-3, --lr_scheduler constant"),
    "came": ("CAME: confidence-guided Adafactor", "came-pytorch", "2e-4 (as Adafactor/AdamW)"),
}


def add_adam_args(parser, weight_decay: float) -> None:
    """Adam's hyperparameters (diffusers' names and defaults but the weight decay, which each trainer gives)."""
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="The beta1 parameter for the Adam optimizer.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="The beta2 parameter for the Adam optimizer.")
    parser.add_argument("--adam_weight_decay", type=float, default=weight_decay, help="Weight decay to use.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="Epsilon value for the Adam optimizer")


def add_lr_schedule_args(parser, *, scheduler: str, warmup_steps: int, choices: list[str] | None = None,
                         scheduler_help: str | None = None, cycles_and_power: bool = False) -> None:
    """--lr_scheduler and --lr_warmup_steps: diffusers' `get_scheduler` names unless a trainer restricts `choices`;
    `cycles_and_power`: also its --lr_num_cycles and --lr_power (diffusers' DreamBooth scripts)."""
    if cycles_and_power:
        parser.add_argument("--lr_num_cycles", type=int, default=1,
                            help="Number of hard resets of the lr in cosine_with_restarts scheduler.")
        parser.add_argument("--lr_power", type=float, default=1.0, help="Power factor of the polynomial scheduler.")
    parser.add_argument("--lr_scheduler", type=str, default=scheduler, choices=choices,
                        help=scheduler_help or 'The scheduler type to use. Choose between ["linear", "cosine", '
                                               '"cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]')
    parser.add_argument("--lr_warmup_steps", type=int, default=warmup_steps,
                        help="Number of steps for the warmup in the lr scheduler.")


def _bool(value: str) -> bool:
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true/false")


def add_prodigy_args(parser) -> None:
    """diffusers' DreamBooth scripts' Prodigy settings (their names and defaults; `false`/`true` mean what they say)."""
    parser.add_argument("--prodigy_beta3", type=float, default=None,
                        help="coefficients for computing the Prodigy stepsize using running averages. If set to None, "
                             "uses the value of square root of beta2. Ignored if optimizer is adamW")
    parser.add_argument("--prodigy_decouple", type=_bool, default=True, help="Use AdamW style decoupled weight decay")
    parser.add_argument("--prodigy_use_bias_correction", type=_bool, default=True,
                        help="Turn on Adam's bias correction. True by default. Ignored if optimizer is adamW")
    parser.add_argument("--prodigy_safeguard_warmup", type=_bool, default=True,
                        help="Remove lr from the denominator of D estimate to avoid issues during warm-up stage. True "
                             "by default. Ignored if optimizer is adamW")


def prodigy_kwargs(optimizer: str, beta3, decouple: bool, use_bias_correction: bool, safeguard_warmup: bool) -> dict:
    """Prodigy's keyword arguments from those flags (none for other optimizers)."""
    if optimizer != "prodigy":
        return {}
    return dict(beta3=beta3, decouple=decouple, use_bias_correction=use_bias_correction,
                safeguard_warmup=safeguard_warmup)


def add_optimizer_args(parser, default: str = "adamw") -> None:
    """--optimizer and --optimizer_args, the same in every script (one builder: create_optimizer)."""
    parser.add_argument("--optimizer", type=str.lower, default=default, choices=sorted(OPTIMIZERS),
                        help="; ".join(f"{name}: {what} [{package}; lr {lr}]"
                                       for name, (what, package, lr) in OPTIMIZERS.items()))
    parser.add_argument("--optimizer_args", type=str, nargs="*", default=[], metavar="KEY=VALUE",
                        help="Further keyword arguments of the optimizer, e.g. d_coef=2 use_bias_correction=True "
                             "(Prodigy) or decoupled_weight_decay=True (Lion); values are Python literals.")


def parse_optimizer_args(items) -> dict:
    """['d_coef=2', 'betas=(0.9,0.99)', 'safeguard_warmup=True'] -> {'d_coef': 2, ...}; a bad item is a UserError."""
    import ast

    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"--optimizer_args {item!r}: expected KEY=VALUE, e.g. d_coef=2")
        try:
            parsed[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed[key.strip()] = value.strip()  # a bare word: a string
    return parsed


def check_optimizer_args(name: str, make, extra: dict) -> None:
    """Each --optimizer_args value against the optimizer's signature: a number where its default is a number, a
    tuple of the default's length where it is a tuple, True/False where it is a bool (else a UserError naming the
    key, the value and the expected kind), before any optimizer is built."""
    import inspect

    try:
        parameters = inspect.signature(make).parameters
    except (TypeError, ValueError):
        return
    for key, value in extra.items():
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), "True or False"
        elif isinstance(default, (int, float)):
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, tuple):
            ok = isinstance(value, (tuple, list)) and len(value) == len(default) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            expected = f"a tuple of {len(default)} numbers like {default}"
        else:
            continue
        if not ok:
            raise UserError(f"--optimizer_args {key}={value!r}: --optimizer {name} expects {expected} for {key} "
                            f"(default {default!r}).")


def _package(module: str, name: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingPackageError(f"--optimizer {name} needs the {pip_name} package: pip install {pip_name}") from error


def create_optimizer(name: str, params, device, lr: float | None = None, weight_decay: float = 0.0,
                     betas=(0.9, 0.999), eps: float = 1e-8, extra: dict | None = None):
    """One of OPTIMIZERS, built from its own package; `extra` (--optimizer_args) overrides any keyword.

    `params`: parameters or param groups (groups may carry their own lr). Create it after the model
    is on its device: on TPU an optimizer built around CPU parameters would update tensors the
    prepared model no longer uses. The fused kernels are the fastest AdamW/Adagrad on CUDA and on CPU
    (measured on CPU for the 'small' UNet: 11 ms a step against 31 ms for the for-loop and 40 ms for
    foreach) and let non-finite steps skip on the device; the other optimizers skip on a host check.
    Schedule-free AdamW is returned in train mode (see `evaluation_weights`).
    """
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}: choose one of {', '.join(sorted(OPTIMIZERS))}")
    params = list(params)
    if lr is None and params and isinstance(params[0], dict):  # groups with their own lr: the first as default
        lr = params[0].get("lr")  # (CAME, for one, requires a default lr)
    lr_kwarg = {} if lr is None else {"lr": lr}
    adam = dict(lr_kwarg, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    if name == "adamw":
        kwargs, make = dict(adam, **fused_kwargs(device)), torch.optim.AdamW
    elif name == "adagrad":
        kwargs, make = dict(lr_kwarg, weight_decay=weight_decay, **fused_kwargs(device)), torch.optim.Adagrad
    elif name == "adamw8bit":
        kwargs, make = adam, _package("bitsandbytes", name, "bitsandbytes").optim.AdamW8bit
    elif name == "prodigy":
        kwargs, make = adam, _package("prodigyopt", name, "prodigyopt").Prodigy
    elif name == "adafactor":  # a fixed learning rate (ours), not Adafactor's relative step sizes
        kwargs = dict(lr_kwarg, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                      warmup_init=False)
        make = _package("transformers.optimization", name, "transformers").Adafactor
    elif name == "lion":
        kwargs = dict(lr_kwarg, betas=(0.9, 0.99), weight_decay=weight_decay)  # Lion's own betas
        make = _package("lion_pytorch", name, "lion-pytorch").Lion
    elif name == "schedulefree_adamw":
        kwargs, make = adam, _package("schedulefree", name, "schedulefree").AdamWScheduleFree
    else:  # came
        kwargs = dict(lr_kwarg, weight_decay=weight_decay)  # CAME's own betas (three) and eps pair
        make = _package("came_pytorch", name, "came-pytorch").CAME
    check_optimizer_args(name, make, extra or {})
    kwargs.update(extra or {})
    try:
        optimizer = make(params, **kwargs)
    except TypeError as error:  # an --optimizer_args key the optimizer does not take
        raise UserError(f"--optimizer {name} --optimizer_args: {error}") from error
    except (AssertionError, ValueError) as error:  # the optimizer's own checks of a value (e.g. lion's betas)
        given = " ".join(f"{k}={v!r}" for k, v in (extra or {}).items())
        raise UserError(f"--optimizer {name} refused its arguments ({given or 'the defaults'}): "
                        f"{type(error).__name__}: {error or 'a value out of range'}") from error
    if is_schedule_free(optimizer):
        optimizer.train()
    return optimizer


def is_schedule_free(optimizer) -> bool:
    """Schedule-free optimizers keep two weight sequences and must be told which one the model holds."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    return bool(optimizer.param_groups) and "train_mode" in optimizer.param_groups[0] and hasattr(optimizer, "eval")


@contextlib.contextmanager
def evaluation_weights(optimizer):
    """Within the block the model holds the weights to evaluate and save: for schedule-free optimizers, the
    averaged sequence (optimizer.eval()), back to the training sequence after; a no-op for the others.

    The training weights are restored from a copy, not recomputed by optimizer.train(): eval() then train()
    is the identity only up to rounding, and a run resumed from a checkpoint written before a validation
    would then differ from the run that validated. Checkpoints are written outside such a block."""
    if optimizer is None or not is_schedule_free(optimizer):
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    training = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, saved in zip(params, training):
                param.copy_(saved)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float, cosine: bool = True):
    """LambdaLR factor: linear warmup to 1, then cosine decay to `min_ratio` (= min_lr / lr)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def restart_lr_schedule(lr_scheduler, optimizer, learning_rates) -> None:
    """--resume_override_lr: base LRs from the current flags and the schedule back at step 0."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    for group, lr in zip(optimizer.param_groups, learning_rates):
        group["initial_lr"] = lr
    scheduler.base_lrs = list(learning_rates)
    scheduler.last_epoch = -1
    if hasattr(scheduler, "_initial_step"):
        scheduler._initial_step()
    else:
        scheduler.step()
    logger.info(f"--resume_override_lr: LR schedule restarted at {learning_rates}")


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
    if accelerator.sync_gradients and accelerator.distributed_type == "DEEPSPEED":
        # DeepSpeed clipped (its gradient_clipping), stepped and scheduled inside accelerator.backward; the
        # wrappers' step() are no-ops. Its engine's global norm is reported, a non-finite step only counted.
        grad_norm = torch.as_tensor(float(accelerator.clip_grad_norm_(parameters, max_grad_norm) or 0.0),
                                    device=loss.device)
        optimizer.step()
        lr_scheduler.step()
        if guard is not None:
            guard.record(guard.nonfinite(loss, grad_norm))
    elif accelerator.sync_gradients:
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
