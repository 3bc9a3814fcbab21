"""Sampling schedulers by short name, for generate.py and the training scripts' validation.

`make_scheduler("dpm++", pipe.scheduler.config)` builds a diffusers scheduler from the
pipeline's own noise-schedule config (betas, prediction_type, timestep spacing, ...) so
a sampler never disagrees with how the model was trained; only the sampling algorithm changes.
"""

from __future__ import annotations

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

from utils.errors import UserError

# name -> (scheduler class, config overrides). Overrides are explicit both ways (e.g.
# use_karras_sigmas=False for plain "dpm++") so a pipeline saved with a Karras scheduler
# still gives the plain schedule when asked for it.
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "dpm++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)),
    "dpm++_karras": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "euler": (EulerDiscreteScheduler, dict(use_karras_sigmas=False)),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    # Stable Diffusion always ran PNDM without the Runge-Kutta warm-up steps.
    "pndm": (PNDMScheduler, dict(skip_prk_steps=True)),
    "unipc": (UniPCMultistepScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}


def make_scheduler(name: str, base_config, **overrides):
    """A new scheduler of kind `name` (a key of SCHEDULERS) sharing `base_config`'s noise schedule.

    base_config: a scheduler's `.config`, a scheduler object, or a plain dict (e.g. a
    `scheduler_config.json`). Keys a class does not know are ignored by diffusers' `from_config`.
    overrides: extra config values, applied last.
    """
    if name not in SCHEDULERS:
        raise UserError(f"--scheduler {name!r}: unknown scheduler; choose one of {', '.join(SCHEDULERS)}")
    scheduler_class, defaults = SCHEDULERS[name]
    config = getattr(base_config, "config", base_config)
    return scheduler_class.from_config(dict(config), **{**defaults, **overrides})
