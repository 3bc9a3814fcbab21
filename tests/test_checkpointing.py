"""utils/checkpointing.py: atomic save, rotation, `latest`, partial-write leftovers, safe loading."""

import json
import logging
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from utils.checkpointing import (STATE_FILE, TEMP_PREFIX, list_checkpoints, nonfinite_parameters, partial_checkpoints,
                                 read_training_state, register_checkpoint_hooks, resolve_resume_checkpoint,
                                 rotate_checkpoints, save_checkpoint)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def prepared_run(accelerator, extra=None):
    """A tiny model (+ a second, untracked one) with AdamW, prepared and stepped once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    register_checkpoint_hooks(accelerator, {"net": accelerator.unwrap_model(model)}, **(extra or {}))
    model(torch.randn(3, 4)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return model, optimizer, scheduler


def test_save_layout_is_atomic_and_safe(accelerator, tmp_path):
    model, optimizer, _ = prepared_run(accelerator)
    path = save_checkpoint(accelerator, str(tmp_path), 7, training_state={"epoch": 1})
    assert path == str(tmp_path / "checkpoint-7")
    assert not partial_checkpoints(str(tmp_path)), "the temporary directory must be renamed away"
    files = sorted(os.listdir(path))
    assert "net" in files and STATE_FILE in files and "optimizer.bin" in files
    # Weights are safetensors (named by our hook, not pickled by accelerate).
    saved = load_file(os.path.join(path, "net", "model.safetensors"))
    for name, value in accelerator.unwrap_model(model).state_dict().items():
        assert torch.equal(saved[name], value)
    assert not any(f.startswith("pytorch_model") or f.startswith("model") for f in files), files
    # Every torch file that remains loads without unpickling arbitrary objects: tensors only,
    # plus (RNG states) the fixed numpy allowlist accelerate's own loader uses.
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    for name in files:
        if name.endswith(".bin"):
            torch.load(os.path.join(path, name), weights_only=True)
        elif name.endswith(".pkl"):
            with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
                torch.load(os.path.join(path, name), weights_only=True)
    assert not any(name.startswith("custom_checkpoint") for name in files)
    optimizer_state = torch.load(os.path.join(path, "optimizer.bin"), weights_only=True)
    assert int(optimizer_state["state"][0]["step"]) == 1
    assert read_training_state(path) == {"global_step": 7, "epoch": 1}


def test_state_file_is_plain_json(accelerator, tmp_path):
    prepared_run(accelerator)
    path = save_checkpoint(accelerator, str(tmp_path), 3, training_state={"skipped_nonfinite_steps": 2})
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        assert json.load(handle) == {"global_step": 3, "skipped_nonfinite_steps": 2}


def test_load_state_restores_weights_optimizer_and_scheduler(accelerator, tmp_path):
    model, optimizer, scheduler = prepared_run(accelerator)
    path = save_checkpoint(accelerator, str(tmp_path), 1)
    expected_weights = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    expected_moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    expected_lr = scheduler.get_last_lr()
    for _ in range(3):  # move everything on
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    accelerator.load_state(path)
    for name, value in accelerator.unwrap_model(model).state_dict().items():
        assert torch.equal(value, expected_weights[name]), name
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], expected_moments)
    assert scheduler.get_last_lr() == expected_lr


def test_extra_savers_and_loaders_round_trip(accelerator, tmp_path):
    shadow = {"value": torch.arange(3.0)}

    def save_shadow(directory):
        os.makedirs(directory, exist_ok=True)
        torch.save(shadow["value"], os.path.join(directory, "shadow.pt"))

    def load_shadow(directory):
        shadow["value"] = torch.load(os.path.join(directory, "shadow.pt"), weights_only=True)

    prepared_run(accelerator, {"extra_savers": {"ema": save_shadow}, "extra_loaders": {"ema": load_shadow}})
    path = save_checkpoint(accelerator, str(tmp_path), 2)
    assert os.path.isfile(os.path.join(path, "ema", "shadow.pt"))
    shadow["value"] = torch.zeros(3)
    accelerator.load_state(path)
    assert torch.equal(shadow["value"], torch.arange(3.0))


def test_rotation_keeps_newest_and_only_after_the_new_one_is_complete(accelerator, tmp_path):
    prepared_run(accelerator)
    for step in (1, 2, 3, 4):
        save_checkpoint(accelerator, str(tmp_path), step, total_limit=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [3, 4]
    assert rotate_checkpoints(str(tmp_path), None) == []
    assert rotate_checkpoints(str(tmp_path), 0) == []


def test_saving_the_same_step_twice_replaces_it(accelerator, tmp_path):
    prepared_run(accelerator)
    save_checkpoint(accelerator, str(tmp_path), 5, training_state={"epoch": 0})
    save_checkpoint(accelerator, str(tmp_path), 5, training_state={"epoch": 1})
    assert read_training_state(str(tmp_path / "checkpoint-5"))["epoch"] == 1
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [5]


def test_latest_skips_partial_writes_and_warns(tmp_path, caplog):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / f"{TEMP_PREFIX}6").mkdir()  # a write the process never finished
    (tmp_path / "checkpoint-notanumber").mkdir()
    (tmp_path / "checkpoint-10").write_text("a file, not a checkpoint")
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert f"{TEMP_PREFIX}6" in caplog.text and "incomplete" in caplog.text


def test_partial_leftover_is_removed_by_the_next_save(accelerator, tmp_path):
    prepared_run(accelerator)
    (tmp_path / f"{TEMP_PREFIX}3").mkdir()
    (tmp_path / f"{TEMP_PREFIX}3" / "optimizer.bin").write_bytes(b"trunc")
    save_checkpoint(accelerator, str(tmp_path), 4)
    assert partial_checkpoints(str(tmp_path)) == []
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4]


def test_numeric_not_lexicographic_order(tmp_path):
    for step in (9, 10, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert resolve_resume_checkpoint("latest", str(tmp_path)).endswith("checkpoint-100")


def test_resume_argument_forms(tmp_path, caplog):
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    assert resolve_resume_checkpoint("", str(tmp_path)) is None
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_checkpoint("latest", str(tmp_path / "missing")) is None
    assert "no checkpoint" in caplog.text
    (tmp_path / "checkpoint-3").mkdir()
    by_name = resolve_resume_checkpoint("checkpoint-3", str(tmp_path))
    assert os.path.samefile(by_name, tmp_path / "checkpoint-3")
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-3"), "elsewhere") == str(tmp_path / "checkpoint-3")


def test_missing_resume_path_names_it_and_the_choices(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        resolve_resume_checkpoint(str(tmp_path / "nope" / "checkpoint-99"), str(tmp_path))
    message = str(error.value)
    assert "--resume_from_checkpoint" in message and "checkpoint-99" in message and "checkpoint-3" in message


def test_training_state_from_a_diffusers_checkpoint_name(tmp_path):
    (tmp_path / "checkpoint-250").mkdir()
    assert read_training_state(str(tmp_path / "checkpoint-250")) == {"global_step": 250}
    (tmp_path / "weird").mkdir()
    with pytest.raises(ValueError, match="weird"):
        read_training_state(str(tmp_path / "weird"))


def test_weights_only_refuses_a_malicious_pickle(tmp_path):
    """What `weights_only=True` buys: a checkpoint file that would run code is refused, not executed."""

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "optimizer.bin", "wb") as handle:
        pickle.dump(Exploit(), handle)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "optimizer.bin", weights_only=True)
    assert not (tmp_path / "pwned").exists()


def test_a_kill_during_rotation_never_leaves_a_half_deleted_checkpoint(accelerator, tmp_path, monkeypatch):
    import utils.checkpointing as checkpointing

    prepared_run(accelerator)
    for step in (1, 2):
        save_checkpoint(accelerator, str(tmp_path), step)
    real_rmtree = checkpointing.shutil.rmtree

    def die_while_deleting(path, *args, **kwargs):
        if os.path.exists(path) and "checkpoint-1" in os.path.basename(path):
            os.remove(os.path.join(path, "optimizer.bin"))  # half deleted...
            raise KeyboardInterrupt("killed")  # ...when the process dies
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", die_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, str(tmp_path), 3, total_limit=2)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    # Every visible checkpoint is complete; the half-deleted one hides under a temporary name.
    for _, path in list_checkpoints(str(tmp_path)):
        assert os.path.isfile(os.path.join(path, "optimizer.bin")), path
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]
    assert [os.path.basename(p) for p in partial_checkpoints(str(tmp_path))] == [f"{TEMP_PREFIX}checkpoint-1.deleting"]
    save_checkpoint(accelerator, str(tmp_path), 4, total_limit=2)
    assert partial_checkpoints(str(tmp_path)) == [] and [s for s, _ in list_checkpoints(str(tmp_path))] == [3, 4]


def test_saving_does_not_move_the_global_rng(accelerator, tmp_path):
    """A saver that draws random numbers (EMAModel.save_pretrained builds a randomly initialised
    model) must not change the run: how often it checkpoints would otherwise change its results."""

    def saver_that_draws(directory):
        os.makedirs(directory, exist_ok=True)
        torch.randn(1000)

    prepared_run(accelerator, {"extra_savers": {"ema": saver_that_draws}})
    before = torch.get_rng_state()
    path = save_checkpoint(accelerator, str(tmp_path), 1)
    assert torch.equal(torch.get_rng_state(), before)
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        saved = torch.load(os.path.join(path, "random_states_0.pkl"), weights_only=True)
    assert torch.equal(saved["torch_manual_seed"], before)


def test_atomic_directory_publishes_whole_or_leaves_the_old_one(tmp_path):
    from utils.atomic import atomic_directory

    target = tmp_path / "best"
    with atomic_directory(str(target)) as temp:
        (tmp_path / temp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target)) as temp:
            (tmp_path / temp / "a.txt").write_text("second, half written")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["best"]
    with atomic_directory(str(target)) as temp:
        (tmp_path / temp / "b.txt").write_text("second")
    assert sorted(os.listdir(target)) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["best"]


def test_resume_position_counts_steps_epochs_and_batches_to_skip(accelerator, tmp_path):
    """7 optimizer steps of 3 per epoch with accumulation 2: epoch 2, 1 step in, so 2 batches to skip."""
    from types import SimpleNamespace

    from utils.checkpointing import resume_position

    model, optimizer, scheduler = prepared_run(accelerator)
    save_checkpoint(accelerator, str(tmp_path), 7, training_state={"best_miou": 0.5})
    from utils.plan import plan_training

    # the plan's accumulation counts (e.g. --effective_batch_size's), not the flag's
    args = SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(tmp_path), gradient_accumulation_steps=1)
    plan = plan_training(4, 2, 1, 6, None, 3, 1e-4)  # 6 batches of 4, accumulation 2: 3 optimizer steps an epoch
    assert plan.updates_per_epoch == 3 and plan.max_train_steps == 9 and plan.num_epochs == 3
    position = resume_position(accelerator, args, plan)
    assert (position.global_step, position.first_epoch, position.batches_to_skip) == (7, 2, 2)
    assert position.state["best_miou"] == 0.5 and position.path.endswith("checkpoint-7")
    fresh = resume_position(accelerator, SimpleNamespace(resume_from_checkpoint=None, output_dir=str(tmp_path)), plan)
    assert (fresh.global_step, fresh.first_epoch, fresh.batches_to_skip, fresh.path) == (0, 0, 0, None)


def test_before_publish_writes_into_the_checkpoint_after_publish_runs_once_it_is_complete(accelerator, tmp_path):
    """The run record goes in before the rename (so it is part of the atomic checkpoint); the optional report
    comes after it (so it can never delay or endanger the checkpoint)."""
    prepared_run(accelerator)
    seen = {}

    def before(directory):
        seen["before"] = os.path.basename(directory)
        with open(os.path.join(directory, "extra.json"), "w") as handle:
            handle.write("{}")

    def after():
        seen["after_complete"] = [step for step, _ in list_checkpoints(str(tmp_path))]

    save_checkpoint(accelerator, str(tmp_path), 3, before_publish=before, after_publish=after)
    assert seen["before"] == f"{TEMP_PREFIX}3" and seen["after_complete"] == [3]
    assert os.path.isfile(tmp_path / "checkpoint-3" / "extra.json")


def test_nonfinite_parameters_names_bad_params_and_buffers_and_ignores_integer_ones():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(3, 3)
            self.norm = torch.nn.BatchNorm1d(3)  # float running stats + an integer num_batches_tracked buffer
            self.register_buffer("steps", torch.tensor([2**31 - 1], dtype=torch.int32))

    clean, other = Net(), Net()
    assert nonfinite_parameters([clean, other]) == []
    with torch.no_grad():
        clean.first.weight[1, 2] = float("nan")
        other.norm.running_var[0] = float("inf")
    assert nonfinite_parameters([clean, other]) == ["Net.first.weight", "1:norm.running_var"]
    assert nonfinite_parameters([other]) == ["Net.norm.running_var"]
