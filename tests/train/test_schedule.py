import math

import pytest
import torch

from avengers.train.schedule import build_scheduler, default_warmup, lr_multiplier


def test_warmup_cosine_values():
    n = 1000
    w = default_warmup(n)
    assert w == 50
    assert lr_multiplier(1, n) == pytest.approx(1 - (1 - 1 / 50) ** 2)  # > 0 on the first step
    assert lr_multiplier(25, n) == pytest.approx(0.75)
    cos = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / n))  # noqa: E731
    assert lr_multiplier(50, n) == pytest.approx(cos(50))
    assert lr_multiplier(500, n) == pytest.approx(0.55)
    assert lr_multiplier(n, n) == pytest.approx(0.1)
    assert default_warmup(10**6) == 2000


def test_other_stages_and_options():
    assert lr_multiplier(1, 100, "annealing") == 1.0
    assert lr_multiplier(100, 100, "annealing") == pytest.approx(0.01)
    assert lr_multiplier(5, 100, "constant", warmup_steps=10) == pytest.approx(0.75)
    assert lr_multiplier(90, 100, "constant", warmup_steps=10) == 1.0
    assert lr_multiplier(1, 100, warmup_steps=0) == pytest.approx(0.0 + 0.5 * (1 + math.cos(math.pi / 100)) * 0.9 + 0.1)
    assert lr_multiplier(100, 100, min_lr_ratio=0.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="training_stage"):
        lr_multiplier(1, 10, "warmup")


def test_scheduler_steps_once_per_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, 100, "initial", None, 0.1)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * lr_multiplier(s, 100) for s in (1, 2, 3)])
