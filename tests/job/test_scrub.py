"""SCRUB's schedule as the spec states it, counted on the optimiser steps that really run.

Before: ``max(forget.epochs, retain.epochs)`` epochs of min steps (forget 3 /
retain 0 ran 3 retain passes), one max step an epoch for a 20-row forget set,
and the KL without the T^2 factor of the paper's code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook

from unlearn import engine
from unlearn.engine import Context, TensorSet
from unlearn.tuning import Hyper, resolve
from unlearning_contracts.spec import MethodSpec

pytestmark = pytest.mark.job

FORGET_LR, RETAIN_LR = 1e-3, 1e-4


def hyper(**changes: float) -> Hyper:
    base = resolve(MethodSpec(name="scrub"))
    return replace(base, forget_lr=FORGET_LR, retain_lr=RETAIN_LR, forget_batch=64, retain_batch=64, **changes)


@pytest.fixture
def steps() -> Iterator[Counter[str]]:
    """Optimiser steps taken, by stage (the max steps' Adam has the forget lr, the min steps' the retain lr)."""
    counted: Counter[str] = Counter()

    def count(optimizer: Optimizer, _args: object, _kwargs: object) -> None:
        lr = optimizer.param_groups[0]["lr"]
        counted["max" if lr == FORGET_LR else "min" if lr == RETAIN_LR else "other"] += 1

    handle = register_optimizer_step_post_hook(count)
    yield counted
    handle.remove()


def run_scrub(h: Hyper, forget_rows: int = 20, retain_rows: int = 200) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(forget_rows + retain_rows, 8)
    y = torch.randint(0, 4, (forget_rows + retain_rows,))
    forget = TensorSet(x[:forget_rows], y[:forget_rows])
    retain = TensorSet(x[forget_rows:], y[forget_rows:])
    engine.unlearn(module, forget, retain, h, Context(device=torch.device("cpu"), num_classes=4))


@pytest.mark.parametrize(
    ("epochs", "floor", "expected"),
    [
        # forget 3 / retain 0: three max phases and no min step at all (it used to run 3 retain passes).
        ((3, 0), 1, {"max": 3, "min": 0}),
        # A 20-row forget set is one batch: the floor, not the row count, sets the max steps per phase.
        ((3, 0), 4, {"max": 12, "min": 0}),
        # Exactly retain.epochs passes of min steps (200 rows at batch 64: 4 steps a pass).
        ((4, 5), 4, {"max": 16, "min": 20}),
        ((2, 2), 1, {"max": 2, "min": 8}),
        # More max phases than min passes: still exactly retain.epochs passes of min steps.
        ((6, 5), 2, {"max": 12, "min": 20}),
    ],
)
def test_scrub_step_counts_match_the_spec(
    steps: Counter[str], epochs: tuple[int, int], floor: int, expected: dict[str, int]
) -> None:
    h = hyper(forget_epochs=epochs[0], retain_epochs=epochs[1], forget_steps_floor=floor)
    plan = engine.scrub_plan(20, 200, h)
    assert sum(m for m, _ in plan) == expected["max"]
    assert sum(n for _, n in plan) == expected["min"]
    run_scrub(h)
    assert dict(steps) == {k: v for k, v in expected.items() if v}


def test_scrub_ends_on_min_steps_and_keeps_a_min_only_tail() -> None:
    plan = engine.scrub_plan(20, 200, hyper(forget_epochs=4, retain_epochs=5, forget_steps_floor=4))
    assert plan == [(4, 4), (4, 4), (4, 4), (4, 4), (0, 4)]
    front_loaded = engine.scrub_plan(20, 200, hyper(forget_epochs=6, retain_epochs=5, forget_steps_floor=2))
    assert front_loaded[0] == (2, 0)
    assert front_loaded[-1] == (2, 4)  # the last epoch still ends with its min pass
    big = engine.scrub_plan(400, 200, hyper(forget_epochs=2, retain_epochs=2, forget_steps_floor=4))
    assert big == [(7, 4), (7, 4)]  # a forget set larger than the floor: one pass (400 rows at batch 64)


def test_the_distillation_term_carries_the_t_squared_factor() -> None:
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    t = engine.SCRUB_TEMPERATURE
    plain = F.kl_div(
        F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True
    )
    assert engine._kl(student, teacher) == pytest.approx(float(plain) * t * t)
