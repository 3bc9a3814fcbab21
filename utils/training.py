"""The run mechanics every script shares: run flags, the Accelerator, health metrics, stops.

Scripts call `add_run_args(parser)` for the flags diffusers users know (`--output_dir`,
`--mixed_precision`, `--checkpointing_steps`, ...), `create_accelerator(args)` to build the
Accelerator with trackers and seeding, and inside the loop `HealthMonitor`,
`NonFiniteGuard` and `StopSignal`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time

import torch

logger = logging.getLogger(__name__)


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
                        help="TensorBoard log directory. Will default to *output_dir/runs/**CURRENT_DATETIME_HOSTNAME***.")
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
    parser.add_argument("--logging_steps", type=int, default=10,
                        help="Log training-health scalars (loss, lr, grad_norm, ...) every N optimizer steps.")
    parser.add_argument("--max_nonfinite_steps", type=int, default=20,
                        help="Abort after this many consecutive steps with a non-finite loss or gradient (each is skipped).")
    parser.add_argument("--tracker_project_name", type=str, default=None,
                        help="The `project_name` argument passed to Accelerator.init_trackers.")


def validate_run_args(args) -> None:
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} exists and is a file, not a directory")
    if args.gradient_accumulation_steps < 1:
        raise ValueError("--gradient_accumulation_steps must be >= 1")
    if args.checkpointing_steps is not None and args.checkpointing_steps < 1:
        raise ValueError("--checkpointing_steps must be >= 1")


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


def create_accelerator(args, **accelerator_kwargs):
    """Accelerator with a project dir, trackers, logging and (optional) seeding configured."""
    from accelerate import Accelerator
    from accelerate.logging import get_logger  # noqa: F401  (configures accelerate's logger)
    from accelerate.utils import ProjectConfiguration, set_seed

    validate_run_args(args)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    if _launched_multi_process_without_accelerator():
        # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs: join the
        # processes over gloo. Otherwise accelerate runs N unconnected single-process copies
        # that train separately and overwrite each other's checkpoints.
        accelerator_kwargs.setdefault("cpu", True)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project_config,
        **accelerator_kwargs,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Checked here, not on the flag alone: fp16 can also come from the accelerate config.
        raise ValueError(
            "--mixed_precision fp16 needs a GPU, and this run is on the CPU (fp16 mixed precision can come from the "
            "flag or the accelerate config, e.g. accelerate_configs/fp16.yaml; a grad scaler does not run on CPU). "
            "Use bf16 (--mixed_precision bf16, accelerate_configs/bf16.yaml) or no mixed precision "
            "(accelerate_configs/cpu.yaml)."
        )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR,
    )
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
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


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


def global_norm(tensors) -> torch.Tensor:
    """L2 norm over an iterable of tensors, as a 0-d tensor on their device (no host sync)."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


class HealthMonitor:
    """Accumulates per-step health values on the device and turns them into logs every N steps.

    Values are kept as tensors between logging steps so the hot loop never waits on the host.
    """

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._last_time = time.perf_counter()
        self._steps_since = 0

    def add(self, **values) -> None:
        for key, value in values.items():
            if value is None:
                continue
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1

    def step_done(self) -> None:
        self._steps_since += 1

    def collect(self) -> dict[str, float]:
        """Means since the last call, plus step_time_ms and samples_per_sec. One host sync."""
        now = time.perf_counter()
        elapsed = now - self._last_time
        logs = {key: (value / max(self._count, 1)).item() for key, value in self._sums.items()}
        if self._steps_since:
            logs["step_time_ms"] = 1000.0 * elapsed / self._steps_since
            logs["samples_per_sec"] = self.samples_per_step * self._steps_since / max(elapsed, 1e-9)
        self._sums, self._count, self._steps_since, self._last_time = {}, 0, 0, now
        return logs


class NonFiniteGuard:
    """Skips updates whose loss or gradients are not finite; aborts after too many in a row.

    The verdict stays on the device: `apply_update` hands it to optimizers that can skip a step
    themselves (torch's fused Adam, AdamW, SGD and Adagrad read a `found_inf` tensor, the mechanism
    `torch.amp.GradScaler` uses), and the counters are read on the host only every `check_every`
    optimizer steps (the scripts pass --logging_steps) and when `total_skipped` is read (checkpoints).
    So a run with no bad steps never waits on the device for this. Optimizers without that hook
    (bitsandbytes' 8-bit AdamW, foreach/for-loop kernels) are checked on the host every step.
    """

    def __init__(self, max_consecutive: int, check_every: int = 1):
        self.max_consecutive = max_consecutive
        self.check_every = max(1, int(check_every))
        self.consecutive = 0
        self._total = 0
        self._counts = None  # on the device: [bad steps in a row now, bad steps in total, longest run since the last poll]
        self._recorded = 0
        self._polled_at = 0  # self._recorded when the counters were last read

    @staticmethod
    def nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """A 0-d float tensor on the loss's device: 1.0 when the loss or the gradient norm is inf/NaN."""
        finite = torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm.detach().to(loss.device)).all()
        return (~finite).float()

    def _count(self, flag: torch.Tensor) -> None:
        if self._counts is None:
            self._counts = torch.zeros(3, device=flag.device)
        run = (self._counts[0] + 1) * flag
        self._counts = torch.stack([run, self._counts[1] + flag, torch.maximum(self._counts[2], run)])
        self._recorded += 1

    def record(self, flag: torch.Tensor) -> None:
        """Count one optimizer step's verdict on the device; poll every `check_every` steps."""
        self._count(flag)
        if self._recorded % self.check_every == 0:
            self.poll()

    def poll(self) -> None:
        """Read the counters (one host sync; none when nothing was recorded since the last read):
        warn about new skips, raise after too many in a row."""
        if self._recorded == self._polled_at:
            return
        self._polled_at = self._recorded
        in_a_row, total, longest = (int(v) for v in self._counts.tolist())
        self._counts[2] = in_a_row  # the longest run since this poll starts from the current one
        new, self._total, self.consecutive = total - self._total, total, in_a_row
        if new:
            logger.warning(f"Non-finite loss or gradient: {new} update(s) skipped since the last check "
                           f"({in_a_row} in a row now, {total} total).")
        if new and longest >= self.max_consecutive:  # (new: a read after the abort does not raise again)
            raise FloatingPointError(
                f"{longest} consecutive steps had a non-finite loss or gradient (--max_nonfinite_steps "
                f"{self.max_consecutive}). Try a lower --learning_rate, --max_grad_norm 1.0, bf16 instead of fp16, "
                "or check the data for corrupt samples."
            )

    @property
    def total_skipped(self) -> int:
        self.poll()
        return self._total

    def check(self, loss: torch.Tensor, parameters, grad_norm: torch.Tensor | None = None) -> bool:
        """Host-side verdict for optimizers that cannot skip on the device: True when the step may be
        applied. One host sync. grad_norm: the norm clipping already computed (saves a pass)."""
        if grad_norm is None or not torch.is_tensor(grad_norm):
            grads = [p.grad for p in parameters if p.grad is not None]
            grad_norm = global_norm(grads) if grads else torch.zeros((), device=loss.device)
        self._count(self.nonfinite(loss, grad_norm))
        self.poll()
        return self.consecutive == 0


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks at step boundaries (save, then exit).

    One stop request may arrive as several SIGTERMs: a preemption that signals the whole
    process group (Colab, SLURM, spot VMs) reaches the trainer directly *and* through
    `accelerate launch`, which since accelerate 1.16 forwards SIGTERM to its child and SIGKILLs
    it `launcher_grace_s` (5 s) later. So a SIGTERM within `repeat_window_s` of the first one is
    the same request; a second SIGINT (Ctrl-C twice), or any signal after the window, restores
    the default handler and force-quits. With several processes the ranks agree through a
    collective (a host sync), made every `check_every` calls (the scripts pass --logging_steps)
    so the loop does not wait every step.
    """

    launcher_grace_s = 5.0  # accelerate>=1.16 `_terminate_process_tree`: SIGTERM, then SIGKILL after 5 s

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), check_every: int = 1,
                 repeat_window_s: float = 60.0):
        self.check_every = max(1, int(check_every))
        self.repeat_window_s = float(repeat_window_s)
        self._calls = 0
        self.requested = False
        self.signal_name = None
        self._requested_at = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. notebook_launcher workers)
                pass

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if signum == signal.SIGTERM and now - self._requested_at <= self.repeat_window_s:
                return  # the same stop request, delivered again (process group + launcher)
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = True
        self._requested_at = now
        self.signal_name = signal.Signals(signum).name
        logger.warning(f"{self.signal_name} received: saving a checkpoint at the next step boundary, then exiting.")

    def should_stop(self, accelerator) -> bool:
        """Agree across processes, so every rank stops (and saves) at the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        self._calls += 1  # every rank calls once per step, so all make the collective at the same calls
        if self._calls % self.check_every:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


OOM_HINT = (
    "Out of memory. Try, in this order: a smaller --train_batch_size with a larger "
    "--gradient_accumulation_steps (same effective batch), --gradient_checkpointing, --use_8bit_adam, "
    "--mixed_precision bf16 (or fp16 on older GPUs), or a lower --resolution."
)


def is_oom_error(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@contextlib.contextmanager
def oom_hint():
    """Re-raise an out-of-memory error inside the block as one that says what to try (OOM_HINT)."""
    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if is_oom_error(error):
            raise RuntimeError(OOM_HINT) from error
        raise


def progress_bar(accelerator, total: int, initial: int = 0):
    """The "Steps" bar of diffusers' examples: one tick per optimizer step, on the local main process
    (benchmarks/step_timer.py times a run by it)."""
    from tqdm.auto import tqdm

    return tqdm(range(total), initial=initial, desc="Steps", disable=not accelerator.is_local_main_process)


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


def add_speed_args(parser) -> None:
    """--torch_compile and --channels_last (see docs/PERFORMANCE.md)."""
    parser.add_argument("--torch_compile", action="store_true",
                        help="Compile the trained model with torch.compile (in place; the first steps are slow while it compiles).")
    parser.add_argument("--channels_last", action="store_true",
                        help="Keep the trained model in channels_last memory format: faster convolutions on GPUs with bf16/fp16.")


def apply_speedups(model: torch.nn.Module, args) -> torch.nn.Module:
    """channels_last and in-place torch.compile (the module object, its state_dict keys and hooks stay the same)."""
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    if getattr(args, "torch_compile", False):
        if any(p.device.type == "xla" for p in model.parameters()):
            raise ValueError("--torch_compile is for CUDA/CPU; on TPU (XLA) every step is already compiled as a graph: drop the flag.")
        model.compile()
    return model


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
