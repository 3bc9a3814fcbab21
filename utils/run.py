"""Run set-up every script shares: the run flags diffusers users know, the Accelerator with
trackers and seeding, the progress bar, steps-per-epoch arithmetic and the rank-checksum debug hook.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os

import torch

from utils.checkpointing import (check_output_dir, check_resume_matches, discard_old_checkpoints, lock_output_dir,
                                 release_output_dir, remove_if_unused)
from utils.cpu_threads import use_available_cpu_threads
from utils.errors import ON_REFUSAL, UserError
from utils.hub import redact_args


def add_run_args(parser, output_dir_default: str) -> None:
    """Flags about the run rather than the model; names and defaults follow diffusers' examples."""
    parser.add_argument("--output_dir", type=str, default=output_dir_default,
                        help="The output directory where the model predictions and checkpoints will be written.")
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="Number of updates steps to accumulate before performing a backward/update pass.")
    parser.add_argument("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    parser.add_argument("--allow_tf32", action="store_true",
                        help="Whether or not to allow TF32 on Ampere GPUs. Can be used to speed up training.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0,
                        help="Number of subprocesses to use for data loading. 0 means that the data will be loaded in the main process.")
    parser.add_argument("--logging_dir", type=str, default="logs",
                        help="TensorBoard log directory, relative to --output_dir (default: output_dir/logs).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Whether to use mixed precision. Default: the value of the accelerate config of the current system.")
    parser.add_argument("--report_to", type=str, default="tensorboard",
                        help='The integration to report the results and logs to: "tensorboard", "wandb", "comet_ml", "all" or "none".')
    parser.add_argument("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    parser.add_argument("--checkpointing_steps", type=int, default=500,
                        help="Save a checkpoint of the training state every X updates, resumable with --resume_from_checkpoint.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to store.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='Resume from a checkpoint folder, or "latest" for the newest complete one in --output_dir.')
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Start a new run in an --output_dir that holds another run's checkpoints, deleting them "
                             "(without it such a run is refused: two runs' checkpoints would mix).")
    parser.add_argument("--logging_steps", type=int, default=10,
                        help="Log training-health scalars (loss, lr, grad_norm, ...) every N optimizer steps.")
    parser.add_argument("--max_nonfinite_steps", type=int, default=20,
                        help="Abort after this many consecutive steps with a non-finite loss or gradient (each is skipped).")
    parser.add_argument("--tracker_project_name", type=str, default=None,
                        help="The `project_name` argument passed to Accelerator.init_trackers.")


def validate_run_args(args) -> None:
    """Checks of the run flags every script has, before anything is written."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} exists and is a file, not a directory")
    if args.gradient_accumulation_steps < 1:
        raise UserError("--gradient_accumulation_steps must be >= 1")
    if args.checkpointing_steps is not None and args.checkpointing_steps < 1:
        raise UserError("--checkpointing_steps must be >= 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UserError(f"--checkpoints_total_limit {args.checkpoints_total_limit}: keep at least 1 checkpoint "
                        "(leave the flag out to keep them all).")
    if getattr(args, "max_train_steps", None) is not None and args.max_train_steps < 1:
        raise UserError(f"--max_train_steps {args.max_train_steps}: train at least 1 step (a run of 0 steps would "
                        "write an untrained model as the final one).")
    if getattr(args, "max_train_steps", None) is None and getattr(args, "num_train_epochs", 1) < 1:
        raise UserError(f"--num_train_epochs {args.num_train_epochs}: train at least 1 epoch.")
    check_interval_args(args)
    if getattr(args, "mode", "train") == "train":
        check_output_dir(args)
        check_resume_matches(args)


def check_interval_args(args) -> None:
    """Intervals, sizes and schedules: the values that make no sense, refused before anything runs."""
    for flag in ("validation_epochs", "validation_steps", "eval_epochs", "logging_steps", "checkpointing_epochs"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise UserError(f"--{flag} {value}: must be >= 0 (0 turns it off).")
    if getattr(args, "resolution", None) is not None and args.resolution < 8:
        raise UserError(f"--resolution {args.resolution}: give the training size in pixels (e.g. 512), at least 8.")
    if getattr(args, "logging_steps", 1) == 0:
        raise UserError("--logging_steps 0: log at least every N >= 1 steps.")
    scheduler = getattr(args, "lr_scheduler", None)
    if scheduler is not None:
        from diffusers.optimization import SchedulerType

        names = [kind.value for kind in SchedulerType]
        if scheduler not in names:
            raise UserError(f"--lr_scheduler {scheduler}: not one of diffusers' schedules ({', '.join(names)}).")
    if getattr(args, "early_stopping_min_delta", 0.0) < 0:
        raise UserError(f"--early_stopping_min_delta {args.early_stopping_min_delta}: must be >= 0 (a negative delta "
                        "counts a rising val/loss as an improvement, so best/ and early stopping would be wrong).")


class _EmptyFloat32Notice(logging.Filter):
    """diffusers (0.37) warns "There are modules in X that should be kept in float32: []" on every `.to(dtype)`,
    also when the list is empty, i.e. when nothing is to be kept in float32: that record says nothing, so it is
    dropped; a non-empty list is still shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def quiet_empty_notices() -> None:
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFloat32Notice())


def _xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def _launched_multi_process_without_accelerator() -> bool:
    """Several processes were launched (torchrun's WORLD_SIZE) but there is no GPU/accelerator to give them."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available() or _xla_available():
        return False
    from accelerate.utils import is_hpu_available, is_mlu_available, is_npu_available, is_xpu_available

    return not (is_xpu_available() or is_npu_available() or is_mlu_available() or is_hpu_available())


def clip_inside_deepspeed(accelerator, args) -> None:
    """Under DeepSpeed, which clips inside backward by its config's `gradient_clipping`, --max_grad_norm sets that
    (read when accelerate.prepare builds the engine); utils/optim.apply_update then only reports the norm."""
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = max(args.max_grad_norm or 0.0, 0.0)


@functools.cache
def training_accelerator_class():
    """accelerate's Accelerator, remembering the DDP wrappers it makes (`ddp_wrappers`): accelerate keeps the
    unwrapped models in `_models`, and `end_training` must reach the wrappers to release their reducers.
    (A function, so that importing utils.run does not import accelerate.)"""
    from accelerate import Accelerator

    class TrainingAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ddp_wrappers = []

        def prepare_model(self, model, *args, **kwargs):
            prepared = super().prepare_model(model, *args, **kwargs)
            if isinstance(prepared, torch.nn.parallel.DistributedDataParallel):
                self.ddp_wrappers.append(prepared)
            return prepared

    return TrainingAccelerator


def create_accelerator(args, **accelerator_kwargs):
    """Accelerator with a project dir, trackers, logging and (optional) seeding configured."""
    from accelerate.logging import get_logger  # noqa: F401  (configures accelerate's logger)
    from accelerate.utils import ProjectConfiguration, set_seed

    validate_run_args(args)
    if args.local_rank != -1:  # `python -m torch.distributed.launch` (without --use_env) passes --local_rank only
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    if _launched_multi_process_without_accelerator():
        # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs: join the
        # processes over gloo. Otherwise accelerate runs N unconnected single-process copies
        # that train separately and overwrite each other's checkpoints.
        accelerator_kwargs.setdefault("cpu", True)
    accelerator = training_accelerator_class()(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project_config,
        **accelerator_kwargs,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Checked here, not on the flag alone: fp16 can also come from the accelerate config.
        raise UserError(
            "--mixed_precision fp16 needs a GPU, and this run is on the CPU (fp16 mixed precision can come from the "
            "flag or the accelerate config, e.g. accelerate_configs/fp16.yaml; a grad scaler does not run on CPU). "
            "Use bf16 (--mixed_precision bf16, accelerate_configs/bf16.yaml) or no mixed precision "
            "(accelerate_configs/cpu.yaml)."
        )
    clip_inside_deepspeed(accelerator, args)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR,
    )
    use_available_cpu_threads(accelerator)
    quiet_empty_notices()
    if not accelerator.is_local_main_process:
        import importlib

        for library in ("transformers", "diffusers", "datasets"):
            try:  # scripts that do not use a library need not have it (e.g. MSHNet on a TPU VM)
                importlib.import_module(library).utils.logging.set_verbosity_error()
            except ImportError:
                pass
    if args.seed is not None:
        set_seed(args.seed)
    elif accelerator.num_processes > 1 and getattr(accelerator.dataloader_config, "use_seedable_sampler", False) \
            and accelerator.dataloader_config.data_seed is None:
        # Without --seed each process would seed its sampler differently: the ranks would shuffle the
        # data differently and see overlapping samples. One random data seed, chosen by rank 0, for all.
        from accelerate.utils import broadcast_object_list

        data_seed = [int(torch.randint(0, 2**31 - 1, ()).item()) if accelerator.is_main_process else None]
        accelerator.dataloader_config.data_seed = broadcast_object_list(data_seed)[0]
    if getattr(args, "allow_tf32", False) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def claim_output_dir(args, accelerator) -> None:
    """The output-dir policy, called by each script right after `create_accelerator` (the folder was checked
    with the flags: another run's checkpoints or a finished model are refused unless resumed): create it, hold
    its lock for the run (one run per folder; the main process), and discard the checkpoints of a run that is
    being restarted from scratch."""
    if accelerator.is_main_process:
        if not os.path.isdir(args.output_dir):  # a run refused later leaves no empty folder behind
            ON_REFUSAL.append(lambda: remove_if_unused(args.output_dir))
        os.makedirs(args.output_dir, exist_ok=True)
        lock_output_dir(args.output_dir)
    discard_old_checkpoints(args, accelerator)


def end_training(accelerator) -> None:
    """`accelerator.end_training()` (trackers closed, process group destroyed), after the ranks meet at a barrier
    and DDP's reducers are released.

    A DDP Reducer holds a reference to the process group. Freed after `destroy_process_group` (when the trainer's
    main() returns), it holds the last one, and the group's destructor then joins gloo's worker threads from the
    Reducer's deallocation, which keeps the GIL, while a worker may still need the GIL to release the tensors of
    its last work (the final barrier): a deadlock at exit. py-spy on a hung 2-process CPU run (torch 2.13, gloo;
    about 1 run in 70 of tests/test_mask_dit_cache.py's two-process command, and once in CI): rank 0's main thread
    in ~ProcessGroupGloo -> std::thread::join under the Reducer's dealloc, the worker in ~AsyncBarrierWork
    waiting for the GIL. Released while the group is still registered, the Reducer drops a reference that is not
    the last, and destroy_process_group (which joins without the GIL) ends the group. The wrappers come from
    `ddp_wrappers` (training_accelerator_class): accelerate's `_models` holds the unwrapped modules, so the
    earlier look there released nothing. The wrapped model cannot run DDP afterwards; this is called when training
    is over.
    """
    # The ranks meet first: gloo torn down right after a rank's last DDP all-reduce aborted the process
    # ("terminate called without an active exception") in 4 of 16 runs of a 2-process script that ended so;
    # with this barrier, none of 16. (The trainers' final save already waits; a stop checkpoint too.)
    accelerator.wait_for_everyone()
    for wrapper in getattr(accelerator, "ddp_wrappers", ()):  # none on a plain Accelerator or a single process
        for name in ("logger", "reducer"):  # the Logger holds the Reducer too
            wrapper.__dict__.pop(name, None)
    accelerator.end_training()
    if accelerator.is_main_process:
        release_output_dir(accelerator.project_dir)


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of frozen weights under the run's mixed precision (fp16/bf16; float32 without)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def tracker_config(args, secret_keys=("hub_token",)) -> dict:
    """Args as tracker hyperparameters: scalars only (TensorBoard's hparams limit), never secrets."""
    config = {}
    for key, value in vars(args).items():
        if key in secret_keys:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        if value is None or isinstance(value, (int, float, str, bool)):
            config[key] = value if value is not None else "None"
    return config


def progress_bar(accelerator, total: int, initial: int = 0):
    """The "Steps" bar of diffusers' examples: one tick per optimizer step, on the local main process
    (benchmarks/step_timer.py times a run by it)."""
    from tqdm.auto import tqdm

    return tqdm(range(total), initial=initial, desc="Steps", disable=not accelerator.is_local_main_process)


def epoch_validation_due(epoch: int, every: int | None) -> bool:
    """--validation_epochs N, one meaning in every trainer (diffusers' `epoch % N == 0`): after the 0-based epoch
    `epoch` when it is a multiple of N, i.e. after the 1st, (N+1)-th, (2N+1)-th ... epoch; 0 or None: never."""
    return bool(every) and epoch % every == 0


def is_due(step: int, every: int | None) -> bool:
    """True when `step` is a multiple of the interval `every`; an interval of None or 0 is never due."""
    return bool(every) and step % every == 0


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    return max(1, math.ceil(num_batches / gradient_accumulation_steps))


RANK_CHECKSUM_ENV = "TRAIN_DEBUG_RANK_CHECKSUM_DIR"


def write_rank_checksums(accelerator, *models) -> None:
    """Debug hook: with $TRAIN_DEBUG_RANK_CHECKSUM_DIR set, each rank writes `rank<i>.json`.

    The file holds a SHA-256 of every parameter's bytes (and one over all of them), so a test
    can check that data-parallel training kept the ranks' weights identical. No-op otherwise.
    Call on every rank.
    """
    import hashlib
    import json

    directory = os.environ.get(RANK_CHECKSUM_ENV)
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    digests, total = {}, hashlib.sha256()
    for index, model in enumerate(models):
        for name, parameter in accelerator.unwrap_model(model).named_parameters():
            data = parameter.detach().float().cpu().contiguous().numpy().tobytes()
            digests[f"{index}.{name}"] = hashlib.sha256(data).hexdigest()
            total.update(data)
    with open(os.path.join(directory, f"rank{accelerator.process_index}.json"), "w", encoding="utf-8") as handle:
        json.dump({"process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
                   "all": total.hexdigest(), "parameters": digests}, handle, indent=1)


def save_run_args(args, plan=None) -> None:
    """The run's arguments (without secrets) next to its outputs, for reproducibility, with what the run derived
    from them (`plan`: a utils.plan.TrainingPlan) under "plan"."""
    os.makedirs(args.output_dir, exist_ok=True)
    record = {**redact_args(args), **({"plan": plan.as_dict()} if plan is not None else {})}
    with open(os.path.join(args.output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, default=str)
