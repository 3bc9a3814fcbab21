"""MSHNet weight files: ours (a best/, last/ or checkpoint-N/ folder, or a .safetensors file) and the reference
repository's releases (.pkl state dicts, .tar checkpoints), read without unpickling anything but tensors; and
which head a saved model was selected with."""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors.torch import load_file

from utils.checkpointing import STATE_FILE
from utils.errors import UserError, UserFileNotFoundError
from utils.segmentation.mshnet import HEADS

logger = logging.getLogger(__name__)


def read_weight_file(path: str) -> dict:
    """A state dict from a .safetensors file or a reference MSHNet file: a plain state dict (weight.pkl) or
    {"state_dict"/"net": ...} (its .tar releases), `module.` prefixes (DataParallel) removed. Torch files are
    read with weights_only=True: anything but tensors and plain containers is refused, never unpickled."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a weight file, or a pickle of arbitrary objects
        raise UserError(f"--weight_path {path}: cannot be read as weights ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}). Give a "
                        ".safetensors file, a folder of this script, or the MSHNet release's .pkl/.tar.") from error
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("net", state))
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"--weight_path {path}: holds a {type(state).__name__}, not a state dict of tensors "
                        "(expected a plain state dict or {'state_dict': ...}, as MSHNet's releases).")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load MSHNet weights from our folders/safetensors or from a reference checkpoint (`.pkl`/`.tar`)."""
    if os.path.isdir(path):
        for candidate in ("model.safetensors", os.path.join("mshnet", "model.safetensors")):
            if os.path.isfile(os.path.join(path, candidate)):
                path = os.path.join(path, candidate)
                break
        else:
            raise UserFileNotFoundError(
                f"--weight_path {path}: no model.safetensors or mshnet/model.safetensors inside")
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"--weight_path {path}: no such file or folder")
    state = read_weight_file(path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong:
        raise UserError(f"--weight_path {path}: not MSHNet weights ({len(missing)} of {len(expected)} MSHNet tensors "
                        f"missing, {len(unexpected)} unknown, e.g. '{(unexpected or missing or wrong)[0]}'; "
                        f"{len(wrong)} of another shape). Give a best/, last/ or checkpoint-N/ folder of "
                        "train_segmentation_tpu.py, or the original MSHNet release's weight file.")
    model.load_state_dict(state)
    logger.info(f"Loaded weights from {path}")


def recorded_head(weight_path: str) -> str | None:
    """The head the weights were evaluated/selected with, as this script records it next to them."""
    folder = weight_path if os.path.isdir(weight_path) else os.path.dirname(weight_path)
    for directory in (folder, os.path.dirname(os.path.normpath(folder))):
        for name in ("metrics.json", "model_info.json", STATE_FILE):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    head = json.load(handle).get("head")
                if head in HEADS.values():
                    return head
    return None

