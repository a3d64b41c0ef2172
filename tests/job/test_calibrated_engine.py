"""The calibrated method and the stopping rule on a tiny model (unlearn.engine): rows at their target are not
pushed, rows away from it move toward it, and the stopping rule keeps the best weights and stops."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from unlearn import calibrated, engine
from unlearn.engine import Context, Monitor, TensorSet
from unlearn.tuning import resolve
from unlearning_contracts.spec import MethodSpec

pytestmark = pytest.mark.unit


def world(seed: int = 0) -> tuple[nn.Module, TensorSet, TensorSet, Context]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(200, 8)
    y = torch.randint(0, 3, (200,))
    ctx = Context(device=torch.device("cpu"), num_classes=3, mixed_precision=False)
    return model, TensorSet(x[:20], y[:20]), TensorSet(x[20:], y[20:]), ctx


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_rows_at_their_target_are_not_pushed() -> None:
    model, forget, retain, ctx = world()
    with torch.no_grad():
        ctx.targets = F.softmax(model(forget.x), dim=1)  # already where they should be
    before = weights(model)
    engine.unlearn(model, forget, retain, replace(resolve(MethodSpec(name="calibrated")), forget_epochs=20), ctx)
    for a, b in zip(before, weights(model), strict=True):
        assert torch.equal(a, b)


def test_rows_move_to_their_target() -> None:
    model, forget, retain, ctx = world()
    target = torch.full((len(forget), 3), 0.05)
    target[torch.arange(len(forget)), (forget.y + 1) % 3] = 0.9  # another class for every forget row
    ctx.targets = target

    def kl() -> float:
        with torch.no_grad():
            logq = F.log_softmax(model(forget.x), dim=1)
        return float((target * (target.log() - logq)).sum(1).mean())

    start = kl()
    engine.unlearn(model, forget, retain, replace(resolve(MethodSpec(name="calibrated")), forget_epochs=100), ctx)
    assert kl() < 0.7 * start  # the retain term holds the rest: these targets are arbitrary


def test_the_stopping_rule_rewinds_to_the_best_check_and_stops_without_improvement() -> None:
    model, forget, retain, ctx = world()
    ctx.targets = torch.full((len(forget), 3), 1 / 3)
    estimates = iter([5.0, 3.0, 1.0, 2.0, 2.5, 3.0, 4.0, 9.0, 9.0, 9.0])
    seen: list[list[torch.Tensor]] = []

    def estimate(m: nn.Module) -> float:
        seen.append(weights(m))
        return next(estimates)

    monitor = Monitor(estimate, check_every=5, stop_at=0.5, patience=4)
    ctx.monitor = monitor
    engine.unlearn(model, forget, retain, replace(resolve(MethodSpec(name="calibrated")), forget_epochs=300), ctx)
    assert monitor.best is not None
    assert (monitor.best.step, monitor.best.estimate) == (10, 1.0)
    assert monitor.steps == 30  # four checks after the best, then stop
    assert monitor.stopped_by == "4 checks without improvement"
    for a, b in zip(seen[2], weights(model), strict=True):  # rewound to the weights of the best check
        assert torch.equal(a, b)


def test_the_stopping_rule_keeps_the_original_when_it_is_best() -> None:
    model, forget, retain, ctx = world()
    ctx.targets = torch.full((len(forget), 3), 1 / 3)
    before = weights(model)
    ctx.monitor = Monitor(lambda m: 0.1)  # already close enough: no step is taken
    engine.unlearn(model, forget, retain, resolve(MethodSpec(name="scrub")), ctx)
    assert ctx.monitor.summary()["chosenStep"] == 0
    assert ctx.monitor.steps == 0
    for a, b in zip(before, weights(model), strict=True):
        assert torch.equal(a, b)


def test_log_odds_are_the_evidence_phi() -> None:
    """The loss's own-label log-odds are the membership test's phi (unlearn.calibrated.phi), in torch."""
    z = torch.randn(64, 5, dtype=torch.float64) * 8
    y = torch.randint(0, 5, (64,))
    found = engine._log_odds(F.log_softmax(z, dim=1), y)
    torch.testing.assert_close(found, torch.from_numpy(calibrated.phi(z.numpy(), y.numpy())))


def test_rows_whose_target_names_another_class_lose_their_log_odds_beyond_the_kl() -> None:
    """A mislabelled-like row (its target names another class) whose own-label log-odds sit far above its
    target's, though its probabilities are within AT_TARGET_KL, is pushed down; a typical row, the same
    distance above a target that still names its own label, is left to the KL (and so is not moved)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(15.0)
    x = torch.randn(400, 8)
    with torch.no_grad():
        logits = model(x)
    ranked = logits.sort(dim=1, descending=True)
    # Rows the model is sure of (the top logit 16 above the next): their least likely class is improbable.
    sure = (ranked.values[:, 0] - ranked.values[:, 1]) > 16.0
    assert sure.sum() >= 4
    xs, z = x[sure], logits[sure]
    top, least = ranked.indices[sure, 0], ranked.indices[sure, 2]
    rows = torch.arange(len(xs))
    ctx = Context(device=torch.device("cpu"), num_classes=3, mixed_precision=False)
    retain = TensorSet(x[~sure], ranked.indices[~sure, 0])
    hyper = resolve(MethodSpec(name="calibrated"))

    def target_with(label: torch.Tensor) -> torch.Tensor:
        lowered = z.clone()
        lowered[rows, label] -= 8.0  # the target's log-odds for the label 8 below the model's
        target = F.softmax(lowered, dim=1)
        kl = (target * (F.log_softmax(lowered, dim=1) - F.log_softmax(z, dim=1))).sum(dim=1)
        assert float(kl.max()) < engine.AT_TARGET_KL  # no KL to speak of
        return target

    def log_odds(module: nn.Module, label: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return engine._log_odds(F.log_softmax(module(xs), dim=1), label)

    def after(label: torch.Tensor) -> torch.Tensor:
        moved = copy.deepcopy(model)
        ctx.targets = target_with(label)
        engine.unlearn(moved, TensorSet(xs, label), retain, hyper, ctx)
        return log_odds(moved, label)

    # Labelled with their least likely class, the target names another (the top): pushed down.
    fall = log_odds(model, least) - after(least)
    assert float(fall.mean()) > 1.0
    assert float((fall > 0).float().mean()) >= 0.9
    # Labelled with their top class, the target still names it: only the KL acts, within AT_TARGET_KL.
    torch.testing.assert_close(after(top), log_odds(model, top))


def test_the_originals_outputs_are_computed_once_per_pool_row() -> None:
    model, _, retain, ctx = world()
    pool = torch.arange(50, 100)  # retained rows 50..99 in slots 0..49
    cache = engine._TeacherCache(model, retain, pool, ctx)
    rows_forwarded: list[int] = []
    model.register_forward_hook(lambda _m, inputs, _o: rows_forwarded.append(len(inputs[0])))
    cache(torch.tensor([0, 3, 3, 7]))
    again = cache(torch.tensor([3, 7, 9, 9]))
    assert rows_forwarded == [3, 1]  # slots 0, 3 and 7 once, then only slot 9
    with torch.no_grad():
        expected = model(retain.x[pool[torch.tensor([3, 7, 9, 9])]])
    assert torch.allclose(again, expected)


@pytest.mark.parametrize("batch", [1024, 4])  # the whole set in one batch; several batches per pass
def test_only_rows_away_from_their_target_are_trained_on(batch: int) -> None:
    """Rows at their target take no compute in the training steps: the batches hold only the others."""
    model, forget, retain, ctx = world()
    target = torch.full((len(forget), 3), 0.05)
    target[torch.arange(len(forget)), (forget.y + 1) % 3] = 0.9
    with torch.no_grad():
        target[:10] = F.softmax(model(forget.x[:10]), dim=1)  # rows 0-9 already where they should be
    ctx.targets = target
    trained: list[torch.Tensor] = []

    def record(m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        if m.training and torch.is_grad_enabled():
            trained.append(inputs[0].detach().clone())

    model.register_forward_hook(record)
    spec = replace(resolve(MethodSpec(name="calibrated")), forget_epochs=5, forget_batch=batch)
    engine.unlearn(model, forget, retain, spec, ctx)
    seen = torch.cat(trained)

    def was_trained(row: torch.Tensor) -> bool:
        return bool((seen == row).all(dim=1).any())

    assert not any(was_trained(forget.x[i]) for i in range(10))
    assert all(was_trained(forget.x[i]) for i in range(10, 20))
