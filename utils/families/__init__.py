"""The model families train_text_to_image.py trains, one module each behind one interface (base.py):
sd.py (SD 1.x/2.x, SDXL), controlnet.py (a ControlNet on either: train_controlnet.py), sd3.py (SD3/3.5), flux.py (FLUX.1 dev/schnell), lumina2.py (Lumina-Image-2.0), deepfloyd_if.py (DeepFloyd IF, stages I and II); flow_matching.py holds the rectified flow the transformer families
share. `family_for(name)` gives the family object a run uses (its name from utils/sd/model_kind.family_name)."""

from __future__ import annotations

from utils.errors import UserError
from utils.families.base import Family

NOT_YET: dict[str, str] = {}  # family name -> what it is, for families detected but not trained yet


def family_for(name: str, args=None) -> Family:
    """A fresh family object for `name` (sd, sdxl, sd3, flux, lumina2, if), configured with the run's flags when `args` is given."""
    family = _family(name)
    if args is not None:
        family.configure(args)
    return family


def _family(name: str) -> Family:
    if name in NOT_YET:
        raise UserError(f"--pretrained_model_name_or_path is a {NOT_YET[name]} pipeline; train_text_to_image.py trains "
                        "Stable Diffusion 1.x/2.x, XL, 3/3.5, FLUX.1 and Lumina-Image-2.0 so far (this family is planned, issue 31). Use "
                        "diffusers' examples/dreambooth script for it meanwhile.")
    if name == "sd3":
        from utils.families.sd3 import StableDiffusion3

        return StableDiffusion3()
    if name == "flux":
        from utils.families.flux import Flux

        return Flux()
    if name == "lumina2":
        from utils.families.lumina2 import Lumina2

        return Lumina2()
    if name == "if":
        from utils.families.deepfloyd_if import DeepFloydIF

        return DeepFloydIF()
    if name in ("sd-controlnet", "sdxl-controlnet"):
        from utils.families.controlnet import ControlNetSD, ControlNetSDXL

        return ControlNetSDXL() if name == "sdxl-controlnet" else ControlNetSD()
    from utils.families.sd import StableDiffusion, StableDiffusionXL

    return StableDiffusionXL() if name == "sdxl" else StableDiffusion()
