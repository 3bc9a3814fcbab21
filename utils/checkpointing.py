"""Atomic checkpoints on top of `accelerator.save_state`, rotation and resume.

Layout (the same as diffusers' examples, so their users find what they expect)::

    output_dir/checkpoint-500/          # accelerator state + models in diffusers format
        unet/  unet_ema/  optimizer.bin  scheduler.bin  random_states_0.pkl  training_state.json

A checkpoint is written to `output_dir/.tmp-checkpoint-N` and renamed to `checkpoint-N` only
when every file is on disk, so a crash (even SIGKILL) never leaves a half-written
`checkpoint-N`, and `--resume_from_checkpoint latest` can never pick an incomplete one.
Loading goes through accelerate, which reads torch files with `weights_only=True`; model
weights are safetensors and our own state is JSON, so nothing untrusted is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from utils.atomic import replace_directory, write_json_atomic
from utils.errors import UserError, UserFileNotFoundError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "training_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def partial_checkpoints(output_dir: str) -> list[str]:
    """Leftovers of checkpoint writes that never finished (the process died mid-write)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.path.join(output_dir, n) for n in os.listdir(output_dir) if n.startswith(TEMP_PREFIX))


def warn_about_partial_checkpoints(output_dir: str) -> None:
    for path in partial_checkpoints(output_dir):
        logger.warning(
            f"Ignoring incomplete checkpoint {path} (a previous run stopped while writing or deleting it). "
            "It is never resumed from; it is deleted when the next checkpoint is saved."
        )


def _remove_atomically(path: str) -> None:
    """Delete a checkpoint so that no half-deleted `checkpoint-N` is ever visible.

    The directory is first renamed (atomic) to a temporary name that `partial_checkpoints`
    lists and the next save cleans up, then deleted: a kill during the deletion leaves only
    an ignored temporary directory.
    """
    trash = os.path.join(os.path.dirname(path), f"{TEMP_PREFIX}{os.path.basename(path)}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def rotate_checkpoints(output_dir: str, total_limit: int | None) -> list[str]:
    """Delete the oldest complete checkpoints so at most `total_limit` remain. Returns what was removed."""
    if total_limit is None or total_limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = []
    for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        _remove_atomically(path)
        removed.append(path)
    if removed:
        logger.info(f"checkpoints_total_limit={total_limit}: removed {', '.join(os.path.basename(p) for p in removed)}")
    return removed


def save_checkpoint(
    accelerator,
    output_dir: str,
    global_step: int,
    total_limit: int | None = None,
    training_state: dict | None = None,
    before_publish: Callable[[str], None] | None = None,
    after_publish: Callable[[], None] | None = None,
) -> str:
    """Save the full training state as `output_dir/checkpoint-{global_step}`, atomically.

    Every process must call this (accelerate saves one RNG file per process). Rotation runs
    only after the new checkpoint is complete, so a crash never leaves fewer good
    checkpoints than before.
    """
    final_path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    temp_path = os.path.join(output_dir, f"{TEMP_PREFIX}{global_step}")
    # Every rank holds the same weights, so every rank refuses together (no rank waits alone at a barrier).
    check_finite_before_saving(accelerator, output_dir, f"checkpoint-{global_step}")
    if accelerator.is_main_process:
        for leftover in partial_checkpoints(output_dir):
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temp_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": int(global_step), **(training_state or {})}
        write_json_atomic(os.path.join(temp_path, STATE_FILE), state)
        if before_publish is not None:  # more files for the checkpoint (e.g. the run record), still atomic
            before_publish(temp_path)
        # The same step twice (final save == last periodic one) is fine; the old one's trash is named so that
        # `partial_checkpoints` cleans it up after a kill.
        replace_directory(temp_path, final_path, f"{TEMP_PREFIX}{os.path.basename(final_path)}.deleting")
        rotate_checkpoints(output_dir, total_limit)
        logger.info(f"Saved state to {final_path}")
        if after_publish is not None:  # optional extras (e.g. the report): never delay or endanger the checkpoint
            after_publish()
    accelerator.wait_for_everyone()
    return final_path


def check_output_dir(args) -> None:
    """Refuse a fresh run into an --output_dir that holds another run's checkpoints (the HF Trainer rule).

    Its checkpoint-N would replace theirs step by step, rotation would delete by number across both runs,
    and `--resume_from_checkpoint latest` would later continue the wrong one. Resume, or pass
    --overwrite_output_dir to delete them and start over (done by `discard_old_checkpoints`)."""
    if getattr(args, "resume_from_checkpoint", None) or getattr(args, "overwrite_output_dir", False):
        return
    existing = list_checkpoints(args.output_dir)
    if existing:
        names = ", ".join(os.path.basename(path) for _, path in existing[-3:])
        raise UserError(
            f"--output_dir {args.output_dir} already holds checkpoints of another run ({len(existing)}: ... {names}). "
            "Continue that run with --resume_from_checkpoint latest, start over with --overwrite_output_dir "
            "(deletes them), or choose a new --output_dir."
        )
    finished = [name for name in FINISHED_RUN_MARKERS if os.path.exists(os.path.join(args.output_dir, name))]
    if finished:
        raise UserError(
            f"--output_dir {args.output_dir} already holds another run's model ({', '.join(finished[:3])}) and this "
            "new run would overwrite it. Choose a new --output_dir, or pass --overwrite_output_dir to replace it."
        )


# What a finished run leaves in its output_dir besides checkpoints: the final pipeline or LoRA weights of each
# script (a finished VAE stage alone is reused on purpose: README "Training from scratch").
FINISHED_RUN_MARKERS = ("model_index.json", "pytorch_lora_weights.safetensors",
                        "pytorch_lora_weights_kohya.safetensors", "last")
# Reused by a later run in the same output_dir unless --overwrite_output_dir removes them.
REUSABLE_RUN_PARTS = ("vae_stage", "vae_stage_checkpoint")


LOCK_FILE = ".lock"
_held_locks: dict[str, object] = {}


def lock_output_dir(output_dir: str) -> None:
    """Hold an exclusive lock on `output_dir` for this run's life (main process): a second run started into it
    at the same time, which would pass the used-output-dir check while neither has a checkpoint yet and then
    overwrite and rotate the first run's checkpoints, is refused. The OS drops the lock when the process ends,
    a crash included, so a stale lock never blocks a later run. Released by `release_output_dir`."""
    key = os.path.realpath(output_dir)
    if key in _held_locks:  # this process already holds it (an earlier run in the same process)
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the used-output-dir check alone
        return
    handle = open(os.path.join(output_dir, LOCK_FILE), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(
            f"--output_dir {output_dir} is in use by another run that is still going (it holds {LOCK_FILE} there). "
            "Two runs in one folder would overwrite and rotate each other's checkpoints: wait for it to end, stop it, "
            "or choose another --output_dir."
        ) from None
    _held_locks[key] = handle


def release_output_dir(output_dir: str) -> None:
    handle = _held_locks.pop(os.path.realpath(output_dir), None)
    if handle is not None:
        handle.close()


def remove_if_unused(output_dir: str) -> None:
    """Delete `output_dir` if it holds nothing but this run's lock and empty folders (a refused run's)."""
    release_output_dir(output_dir)
    files = [os.path.join(d, f) for d, _, names in os.walk(output_dir) for f in names]
    if all(os.path.basename(f) == LOCK_FILE for f in files):
        shutil.rmtree(output_dir, ignore_errors=True)


def check_resume_matches(args, flags=("optimizer", "rank")) -> None:
    """Refuse, before anything is written, a resume whose `flags` differ from the checkpoint's run (its
    run_info.json): the optimizer state or adapter shapes in it belong to the recorded values (an AdamW state
    under Lion runs a silent hybrid; Prodigy fails later on a missing key; another LoRA rank does not load)."""
    resume = getattr(args, "resume_from_checkpoint", None)
    path = find_resume_checkpoint(resume, args.output_dir) if resume else None
    record = os.path.join(path, "run_info.json") if path else None
    if not record or not os.path.isfile(record):
        return
    try:
        with open(record, encoding="utf-8") as handle:
            recorded = json.load(handle).get("args", {})
    except (OSError, ValueError):
        return  # the damaged-checkpoint checks name it
    if getattr(args, "use_lora", None) is False or not recorded.get("use_lora", True):
        flags = tuple(flag for flag in flags if flag != "rank")
    for flag in flags:
        if flag in recorded and hasattr(args, flag) and recorded[flag] != getattr(args, flag):
            raise UserError(
                f"--{flag} {getattr(args, flag)}: {path} was trained with --{flag} {recorded[flag]}, and its saved "
                f"state belongs to that value. Resume with --{flag} {recorded[flag]}, or start a new run (a new "
                "--output_dir, or --overwrite_output_dir) to change it. Nothing was written."
            )


def discard_old_checkpoints(args, accelerator) -> None:
    """--overwrite_output_dir on a fresh run: delete the old run's checkpoints (main process), before any new one."""
    if getattr(args, "overwrite_output_dir", False) and not getattr(args, "resume_from_checkpoint", None) \
            and accelerator.is_main_process:
        for _, path in list_checkpoints(args.output_dir):
            logger.warning(f"--overwrite_output_dir: deleting {path} of an earlier run")
            _remove_atomically(path)
        for name in REUSABLE_RUN_PARTS:  # nothing of the old run is reused (e.g. a VAE stage of another --vae_config)
            if os.path.isdir(os.path.join(args.output_dir, name)):
                logger.warning(f"--overwrite_output_dir: deleting {name}/ of an earlier run")
                _remove_atomically(os.path.join(args.output_dir, name))
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Finite weights: a checkpoint (or final model) holding NaN/Inf is never written, resumed or rotated to.
# ----------------------------------------------------------------------------------------------

class NonFiniteWeightsError(UserError):
    """Weights hold NaN/Inf: the checkpoint or final model is not written; the message names the newest good one."""


def nonfinite_parameters(modules) -> list[str]:
    """Names of the floating-point parameters/buffers of `modules` holding NaN or Inf (called only when saving).

    One fused reduction and one host read per device, not one per tensor: on XLA a per-tensor read compiles a
    graph per tensor (hundreds for MSHNet, until the CPU backend ran out of code memory in make test-xla); on
    CUDA it is hundreds of syncs."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for index, module in enumerate(modules):
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor is not None and tensor.is_floating_point():
                label = f"{type(module).__name__}.{name}" if index == 0 else f"{index}:{name}"
                by_device.setdefault(tensor.device, []).append((label, tensor.detach()))
    bad = []
    for named in by_device.values():
        finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named]).cpu()
        bad += [label for (label, _), ok in zip(named, finite.tolist()) if not ok]
    return bad


def checkpoint_problem(path: str) -> str | None:
    """Why the weights in checkpoint folder `path` cannot be resumed (damaged or non-finite safetensors), or None.

    Reads every tensor once (the load that follows reads them again from the page cache)."""
    from safetensors import safe_open

    for folder, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            if name.startswith("random_states_") and name.endswith(".pkl"):
                problem = random_states_problem(os.path.join(folder, name))
                if problem:
                    return f"{os.path.relpath(os.path.join(folder, name), path)} {problem}"
            if not name.endswith(".safetensors"):
                continue
            file = os.path.join(folder, name)
            try:
                with safe_open(file, framework="pt") as handle:
                    for key in handle.keys():
                        tensor = handle.get_tensor(key)
                        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                            return f"{os.path.relpath(file, path)}: tensor '{key}' holds NaN/Inf"
            except Exception as error:  # safetensors raises its own error types for truncated / garbled files
                return f"{os.path.relpath(file, path)} cannot be read ({type(error).__name__}: {error})"
    return None


_RANDOM_STATE_KEYS = {"random_state", "numpy_random_seed", "torch_manual_seed"}  # accelerate's save_state


def random_states_problem(file: str) -> str | None:
    """Why accelerate's RNG file cannot restore the run's random streams, or None. accelerate's `load_state`
    only logs "Could not load random states" and goes on, so a damaged file would silently end the bitwise
    resume. Read with weights_only (accelerate's allow-list): a pickle is never executed."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            states = torch.load(file, weights_only=True)
    except Exception as error:
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        return f"cannot be read safely ({type(error).__name__}: {first_line})"
    if not isinstance(states, dict) or not _RANDOM_STATE_KEYS <= set(states):
        found = sorted(map(str, states))[:5] if isinstance(states, dict) else type(states).__name__
        return (f"is not accelerate's random-state file (needs {sorted(_RANDOM_STATE_KEYS)}, has {found}): the "
                "resume would not continue the random streams exactly")
    return None


def newest_good_checkpoint(output_dir: str, exclude: str | None = None) -> str | None:
    """The newest complete checkpoint in `output_dir` whose weights are readable and finite."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if exclude is None or os.path.abspath(path) != os.path.abspath(exclude):
            if checkpoint_problem(path) is None:
                return path
    return None


def _good_alternative(output_dir: str, exclude: str | None) -> str:
    good = newest_good_checkpoint(output_dir, exclude)
    return (f"The newest good checkpoint is {good}: resume it with --resume_from_checkpoint {good}"
            if good else f"No other checkpoint in {output_dir} is usable: start over with --overwrite_output_dir")


def check_finite_before_saving(accelerator, output_dir: str, what: str, modules=None) -> None:
    """Refuse to write `what` (a checkpoint or the final model) from weights holding NaN/Inf."""
    modules = [accelerator.unwrap_model(m) for m in (modules if modules is not None else accelerator._models)]
    bad = nonfinite_parameters(modules)
    if bad:
        raise NonFiniteWeightsError(
            f"Not saving {what}: the weights hold NaN/Inf ({len(bad)} tensors, first: {', '.join(bad[:3])}); existing "
            f"checkpoints and models are left as they are. {_good_alternative(output_dir, None)}, with a lower "
            "--learning_rate or --max_grad_norm, or --mixed_precision bf16 instead of fp16."
        )


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """Turn `--resume_from_checkpoint` into a checkpoint directory, or None for a fresh run.

    `latest` picks the newest complete checkpoint in `output_dir` (None if there is none).
    Anything else is a path, or a checkpoint name inside `output_dir` as diffusers accepts.
    """
    if not resume_from_checkpoint:
        return None
    warn_about_partial_checkpoints(output_dir)
    path = find_resume_checkpoint(resume_from_checkpoint, output_dir)
    if path is None:
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run.")
    return path


def find_resume_checkpoint(resume_from_checkpoint: str, output_dir: str) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint` names (`latest`: the newest complete one in `output_dir`,
    None if there is none; else a path or a checkpoint name inside `output_dir`); a name that is no folder is a
    UserFileNotFoundError listing the checkpoints there. Says nothing else (`resolve_resume_checkpoint` warns)."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    for candidate in (resume_from_checkpoint, os.path.join(output_dir, os.path.basename(resume_from_checkpoint))):
        if os.path.isdir(candidate):
            return candidate
    available = [os.path.basename(p) for _, p in list_checkpoints(output_dir)]
    raise UserFileNotFoundError(
        f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint directory "
        f"(checkpoints in {output_dir}: {available or 'none'}). Use 'latest' to pick the newest one."
    )


@dataclass
class ResumePosition:
    """Where a run continues: `global_step` optimizer steps done, in epoch `first_epoch`, whose first
    `batches_to_skip` batches were already trained on; `state` is the checkpoint's training_state.json."""

    global_step: int = 0
    first_epoch: int = 0
    batches_to_skip: int = 0
    state: dict = field(default_factory=dict)
    path: str | None = None


def resume_position(accelerator, args, plan, check: Callable[[str], None] | None = None) -> ResumePosition:
    """Load `--resume_from_checkpoint` (a folder or "latest") into the prepared objects, if any, and say
    where in the data the run continues (`plan`: the run's utils.plan.TrainingPlan). A fresh run gets
    ResumePosition().

    A checkpoint whose weights are damaged or non-finite, or that does not load, stops the run with a
    UserError naming it and the newest good one; `check(path)` adds a script's own test (kind of run)."""
    path = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if not path:
        return ResumePosition()
    accelerator.print(f"Resuming from checkpoint {path}")
    if check is not None:
        check(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"Cannot resume from {path}: {problem}. {_good_alternative(args.output_dir, path)}.")
    try:
        accelerator.load_state(path)
    except Exception as error:  # a missing optimizer.bin, a checkpoint of another kind of run, ...
        raise UserError(
            f"Cannot resume from {path}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
            f"(it holds: {', '.join(sorted(os.listdir(path)))}). It is damaged or was written by a different kind of "
            f"run (model, LoRA or not, modules trained). {_good_alternative(args.output_dir, path)}."
        ) from error
    state = read_training_state(path)
    step = state["global_step"]
    position = ResumePosition(step, step // plan.updates_per_epoch,
                              (step % plan.updates_per_epoch) * plan.gradient_accumulation_steps, state, path)
    logger.info(f"Resumed from {path} at step {step} (epoch {position.first_epoch})")
    return position


def read_training_state(checkpoint_path: str) -> dict:
    """The JSON state saved with a checkpoint; for diffusers-made checkpoints, the step from the name."""
    state_file = os.path.join(checkpoint_path, STATE_FILE)
    if os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as handle:
            return json.load(handle)
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(checkpoint_path)))
    if not match:
        raise UserError(f"{checkpoint_path}: no {STATE_FILE} and the name is not checkpoint-<step>")
    return {"global_step": int(match.group(1))}


# ----------------------------------------------------------------------------------------------
# Model save/load hooks: store each trained module in its own subfolder of the checkpoint.
# ----------------------------------------------------------------------------------------------

SaveFn = Callable[[torch.nn.Module, str], None]
LoadFn = Callable[[torch.nn.Module, str], None]


def save_module(module: torch.nn.Module, directory: str) -> None:
    """diffusers/transformers models via `save_pretrained`, anything else as `model.safetensors`."""
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(directory, safe_serialization=True)
    else:
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"))


def own_memory(module):
    """Move every parameter and buffer of `module` into freshly allocated, contiguous memory; returns it.

    safetensors >= 0.8 `load_file` returns zero-copy views into the memory-mapped file, at the
    file's byte offsets (not 64-byte aligned). CPU GEMM kernels pick their SIMD path by
    alignment, so a model loaded that way computes last-bit-different outputs from the same
    weights in allocated memory (measured: 1.2e-6 max difference on the tiny NextDiT), and
    training writes copy-on-write pages of the mapping. One copy at load time fixes both.
    """
    with torch.no_grad():
        for tensor_owner in module.modules():
            for name, parameter in tensor_owner.named_parameters(recurse=False):
                parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)
            for name, buffer in tensor_owner.named_buffers(recurse=False):
                if buffer is not None:
                    tensor_owner._buffers[name] = buffer.clone(memory_format=torch.contiguous_format)
    return module


def load_module(module: torch.nn.Module, directory: str) -> None:
    """Load weights saved by `save_module` into `module` in place (config included for diffusers models)."""
    if hasattr(module, "from_pretrained") and hasattr(module, "register_to_config"):
        loaded = type(module).from_pretrained(directory)
        module.register_to_config(**loaded.config)
        module.load_state_dict(loaded.state_dict())
        del loaded
    elif hasattr(module, "from_pretrained"):  # transformers model
        loaded = type(module).from_pretrained(directory)
        module.load_state_dict(loaded.state_dict())
        del loaded
    else:
        module.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))


def register_checkpoint_hooks(
    accelerator,
    modules: dict[str, torch.nn.Module],
    extra_savers: dict[str, Callable[[str], None]] | None = None,
    extra_loaders: dict[str, Callable[[str], None]] | None = None,
    save_fns: dict[str, SaveFn] | None = None,
    load_fns: dict[str, LoadFn] | None = None,
) -> None:
    """Make `accelerator.save_state/load_state` store `modules` as `checkpoint-N/<name>/`.

    modules: subfolder name -> the (unwrapped) module passed to `accelerator.prepare`.
    extra_savers/extra_loaders: subfolder name -> fn(path), for state that is not a prepared
        model (EMA weights, for example), saved on the main process only.
    save_fns/load_fns: per-subfolder overrides (LoRA saves only its adapter, for example).
    """
    extra_savers = extra_savers or {}
    extra_loaders = extra_loaders or {}
    save_fns = save_fns or {}
    load_fns = load_fns or {}

    def name_of(model) -> str | None:
        unwrapped = accelerator.unwrap_model(model)
        for name, module in modules.items():
            if unwrapped is module or model is module:
                return name
        return None

    def save_hook(models, weights, output_dir):
        # Saving must not change the run: building a model to save it (diffusers'
        # EMAModel.save_pretrained does) draws random init weights from the global RNG, and
        # accelerate stores the RNG state after this hook. Without the fork, how often a run
        # checkpoints would change its results, and a resume would not be bitwise exact.
        with torch.random.fork_rng(devices=[]):
            _save(models, weights, output_dir)

    def _save(models, weights, output_dir):
        handled = []
        for index, model in enumerate(models):
            name = name_of(model)
            if name is None:
                continue  # not ours: accelerate saves it as model_<i>.safetensors
            handled.append(index)
            if accelerator.is_main_process:
                save_fns.get(name, save_module)(accelerator.unwrap_model(model), os.path.join(output_dir, name))
        if accelerator.is_main_process:
            for name, saver in extra_savers.items():
                saver(os.path.join(output_dir, name))
        # We saved these weights ourselves: stop accelerate from writing them a second time.
        for index in reversed(handled):
            if index < len(weights):
                weights.pop(index)

    def load_hook(models, input_dir):
        for name, loader in extra_loaders.items():
            loader(os.path.join(input_dir, name))
        for index in reversed(range(len(models))):
            name = name_of(models[index])
            if name is None:
                continue
            model = models.pop(index)
            load_fns.get(name, load_module)(accelerator.unwrap_model(model), os.path.join(input_dir, name))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
