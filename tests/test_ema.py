"""utils/ema.py: the EMA swap for validation, placement and the offloaded step."""

import torch

from utils.ema import ema_step, ema_weights, place_ema


def make_ema(model):
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=0.5, use_ema_warmup=False, min_decay=0.0)


def test_ema_weights_swaps_in_and_restores_even_on_error():
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trained = [p.detach().clone() for p in model.parameters()]
    shadow = [s.detach().clone() for s in ema.shadow_params]
    with ema_weights(ema, model.parameters()):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), shadow))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    try:
        with ema_weights(ema, model.parameters()):
            raise ValueError("validation failed")
    except ValueError:
        pass
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    with ema_weights(None, model.parameters()):  # no EMA: the trained weights stay
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_offloaded_ema_step_equals_the_resident_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    resident, offloaded = make_ema(model), place_ema(make_ema(model), "cpu", offload=True)
    ema_step(resident, model.parameters(), "cpu")  # diffusers' EMA: decay 0 at its first step (a copy)
    ema_step(offloaded, model.parameters(), "cpu", offload=True)
    first = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema_step(resident, model.parameters(), "cpu")
    ema_step(offloaded, model.parameters(), "cpu", offload=True)
    decay = min(0.5, (1 + 1) / (10 + 1))  # its second step: min(decay, (1 + step) / (10 + step)), step 1
    expected = [decay * f + (1 - decay) * p for f, p in zip(first, model.parameters())]
    for a, b, e in zip(resident.shadow_params, offloaded.shadow_params, expected):
        assert torch.equal(a, b) and torch.allclose(a, e)
    assert place_ema(None, "cpu") is None and ema_step(None, model.parameters(), "cpu") is None
