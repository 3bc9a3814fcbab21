"""utils/plan.py: the numbers a run derives from its flags, computed once."""

import pytest

from utils.plan import plan_training


def test_steps_epochs_and_the_scaled_learning_rate():
    # 10 batches per process, accumulation 3: 4 optimizer steps an epoch (the last one short), 2 processes
    plan = plan_training(8, 3, 2, 10, None, 5, 1e-4, scale_lr=True)
    assert (plan.updates_per_epoch, plan.max_train_steps, plan.num_epochs) == (4, 20, 5)
    assert plan.total_batch_size == 8 * 3 * 2 and plan.learning_rate == pytest.approx(1e-4 * 48)
    assert plan.as_dict()["total_batch_size"] == 48
    assert "steps=20 (from 7)" in plan.describe(160, 7)


def test_max_train_steps_wins_over_epochs_and_the_flags_are_untouched():
    plan = plan_training(4, 1, 1, 5, 12, 100, 2e-3)
    assert (plan.max_train_steps, plan.num_epochs, plan.learning_rate) == (12, 3, 2e-3)  # 12 steps: 3 epochs of 5
    with pytest.raises(Exception):
        plan.batch_size = 8  # frozen: nothing changes the plan after it is made
