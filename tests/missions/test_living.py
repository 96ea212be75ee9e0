"""Mission B's building blocks (bem_tasks.missions.living) on tiny models with known answers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from pydantic import ValidationError
from scipy.stats import chisquare
from torch import nn

from bem_tasks.missions.living import (
    DriftReading,
    DriftThresholds,
    LastGood,
    PrioritizedReplay,
    ProbeEval,
    Trip,
    check_drift,
    controller_spectral_norm,
    diagonal_fisher,
    ewc_penalty,
    gradient_norm,
    parameter_distance,
    probe_kl,
    proximal_penalty,
    snapshot,
    time_to_fix,
)


class WithFrozen(nn.Module):
    """A linear head that trains next to a frozen parameter, as the controller trains next to
    the frozen base during Mission B."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.head = nn.Linear(n_in, n_out)
        self.frozen = nn.Parameter(torch.ones(n_out), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * self.frozen


def _set(model: WithFrozen, weight: list[list[float]], bias: list[float]) -> None:
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(weight))
        model.head.bias.copy_(torch.tensor(bias))


# ---------------------------------------------------------------------- EWC
def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic_away_from_it() -> None:
    model = WithFrozen(2, 1)
    _set(model, [[0.3, -0.2]], [0.1])
    anchor = snapshot(model)
    assert set(anchor) == {"head.weight", "head.bias"}  # the frozen parameter is not anchored
    fisher = {"head.weight": torch.tensor([[1.0, 4.0]]), "head.bias": torch.tensor([2.0])}
    assert float(ewc_penalty(model, anchor, fisher).detach()) == 0.0
    assert float(proximal_penalty(model, anchor).detach()) == 0.0

    _set(model, [[1.3, 0.3]], [-0.9])  # delta (1, 0.5 | -1)
    # (1*1 + 4*0.25 + 2*1) / 2 = 2 ; (1 + 0.25 + 1) / 2 = 1.125
    assert float(ewc_penalty(model, anchor, fisher).detach()) == pytest.approx(2.0)
    assert float(proximal_penalty(model, anchor).detach()) == pytest.approx(1.125)
    _set(model, [[2.3, 0.8]], [-1.9])  # twice the delta: four times the penalty
    assert float(ewc_penalty(model, anchor, fisher).detach()) == pytest.approx(8.0)
    assert float(proximal_penalty(model, anchor).detach()) == pytest.approx(4.5)

    penalty = ewc_penalty(model, anchor, fisher)
    penalty.backward()  # the penalty trains: d/dtheta = F * delta
    assert model.head.weight.grad is not None
    assert model.head.weight.grad.flatten().tolist() == pytest.approx([2.0, 4.0])


def test_fisher_of_a_linear_gaussian_model_is_its_analytic_value() -> None:
    # p(y | x) = N(w x + b, 1): d log p / dw = (y - w x - b) x, d log p / db = (y - w x - b)
    model = WithFrozen(1, 1)
    _set(model, [[2.0]], [0.0])
    xs, ys = [1.0, 2.0], [3.0, 3.0]  # residuals 1 and -1

    def log_likelihood(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return (-((y - m(x).squeeze(-1)) ** 2) / 2).mean()

    one_each = [(torch.tensor([[x]]), torch.tensor([y])) for x, y in zip(xs, ys, strict=True)]
    fisher = diagonal_fisher(model, one_each, log_likelihood)
    assert set(fisher) == {"head.weight", "head.bias"}
    # per-example gradients: w (1, -2), b (1, -1) -> mean squares 2.5 and 1.0
    assert fisher["head.weight"].flatten().tolist() == pytest.approx([2.5])
    assert fisher["head.bias"].tolist() == pytest.approx([1.0])
    assert model.head.weight.grad is None  # .grad untouched

    # one batch of both: the gradient of the mean is (1 - 2) / 2 for w and 0 for b
    both = [(torch.tensor([[1.0], [2.0]]), torch.tensor(ys))]
    batch_fisher = diagonal_fisher(model, both, log_likelihood)
    assert batch_fisher["head.weight"].flatten().tolist() == pytest.approx([0.25])
    assert batch_fisher["head.bias"].tolist() == pytest.approx([0.0])

    with pytest.raises(ValueError, match="empty"):
        diagonal_fisher(model, [], log_likelihood)


def test_an_anchor_of_another_model_is_refused_by_name() -> None:
    anchor = snapshot(WithFrozen(2, 1))
    with pytest.raises(ValueError, match=r"missing \['0.bias', '0.weight'\]"):
        proximal_penalty(nn.Sequential(nn.Linear(2, 1)), anchor)


# ---------------------------------------------------------------------- drift monitors
def test_identical_models_have_no_drift() -> None:
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    anchor_model = copy.deepcopy(lm)
    ids = torch.randint(0, 11, (2, 5))
    assert probe_kl(anchor_model(ids), lm(ids)) == 0.0
    assert parameter_distance(lm, snapshot(anchor_model)) == 0.0
    assert controller_spectral_norm(lm, snapshot(anchor_model)) == 0.0


def test_probe_kl_is_anchor_to_online_per_counted_token() -> None:
    anchor = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    online = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    second = 0.9 * math.log(0.9 / 0.1) + 0.1 * math.log(0.1 / 0.9)
    assert probe_kl(anchor, online, torch.tensor([[1, 0]])) == pytest.approx(first)
    assert probe_kl(anchor, online) == pytest.approx((first + second) / 2)
    # KL(anchor || online), not the reverse direction
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert probe_kl(online, anchor, torch.tensor([[1, 0]])) == pytest.approx(reverse)
    with pytest.raises(ValueError, match="shapes differ"):
        probe_kl(anchor, online[:, :1])


def test_known_perturbation_gives_known_distance_and_spectral_norm() -> None:
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    model = nn.Sequential(first, second)
    anchor = snapshot(model)
    with torch.no_grad():
        first.weight.add_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # singular values 4, 3
        second.weight.add_(torch.tensor([[0.0, 2.0], [0.0, 0.0]]))  # singular values 2, 0
        second.bias.add_(torch.tensor([0.0, 1.0]))
    assert parameter_distance(model, anchor) == pytest.approx(math.sqrt(9 + 16 + 4 + 1))
    assert controller_spectral_norm(model, anchor) == pytest.approx(4.0)


def test_gradient_norm_reads_the_trainable_gradients() -> None:
    model = nn.Linear(2, 1, bias=False)
    (model(torch.tensor([[3.0, 4.0]])).sum()).backward()  # gradient (3, 4)
    assert gradient_norm(model) == pytest.approx(5.0)
    assert gradient_norm(nn.Linear(2, 1)) == 0.0  # no backward yet


THRESHOLDS = DriftThresholds(
    kl_max=0.5, param_distance_max=2.0, grad_norm_max=10.0, spectral_norm_max=1.0
)


def test_check_drift_names_every_tripped_monitor() -> None:
    calm = check_drift(DriftReading(0.1, 1.0, 3.0, 0.5), THRESHOLDS)
    assert calm.ok and calm.tripped == []
    at_limit = check_drift(DriftReading(0.5, 2.0, 10.0, 1.0), THRESHOLDS)
    assert at_limit.ok  # a threshold is the largest value allowed
    report = check_drift(DriftReading(0.7, 1.0, 3.0, 1.5), THRESHOLDS)
    assert not report.ok
    assert report.tripped == [Trip("kl", 0.7, 0.5), Trip("spectral_norm", 1.5, 1.0)]
    blown = check_drift(DriftReading(0.1, 1.0, float("nan"), 0.5), THRESHOLDS)
    assert [t.monitor for t in blown.tripped] == ["grad_norm"]


def test_drift_thresholds_are_strict() -> None:
    with pytest.raises(ValidationError, match="kl_max"):
        DriftThresholds(kl_max=0.0, param_distance_max=1, grad_norm_max=1, spectral_norm_max=1)
    with pytest.raises(ValidationError, match="kl_limit"):
        DriftThresholds.model_validate(
            {"kl_limit": 1, "param_distance_max": 1, "grad_norm_max": 1, "spectral_norm_max": 1}
        )


# ---------------------------------------------------------------------- rollback
def test_a_trip_rolls_back_to_the_bit_identical_good_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = WithFrozen(4, 3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    anchor = snapshot(model)

    def train_step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    good = LastGood(tmp_path / "good", trainable_only=True)
    for _ in range(3):
        train_step()
    good.mark(3, model, opt)
    good_weights = {k: v.clone() for k, v in model.state_dict().items()}
    good_moments = {k: v.clone() for k, v in opt.state[model.head.weight].items()}
    for _ in range(20):
        train_step()
    assert not torch.equal(model.head.weight, good_weights["head.weight"])

    reading = DriftReading(
        kl=0.0,
        param_distance=parameter_distance(model, anchor),
        grad_norm=gradient_norm(model),
        spectral_norm=controller_spectral_norm(model, anchor),
    )
    tight = DriftThresholds(
        kl_max=1.0, param_distance_max=1e-3, grad_norm_max=1e3, spectral_norm_max=1e3
    )
    report = check_drift(reading, tight)
    assert [t.monitor for t in report.tripped] == ["param_distance"]
    record = good.rollback(23, report.tripped, model, opt)

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, good_weights[name]), name
    for key, value in opt.state[model.head.weight].items():
        assert torch.equal(value, good_moments[key]), key
    assert record.at_step == 23 and record.restored_step == 3
    assert record.tripped == [Trip("param_distance", reading.param_distance, 1e-3)]
    lines = (tmp_path / "good" / "rollbacks.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert logged[0]["at_step"] == 23 and logged[0]["tripped"][0]["monitor"] == "param_distance"
    retried = LastGood(tmp_path / "good", trainable_only=True)
    assert retried.rollbacks == [record]  # a retried task reads the log ...
    retried.rollback(23, report.tripped, model, opt)
    assert len(retried.rollbacks) == 1  # ... and its rollback at the same step is not a second one


def test_only_the_newest_good_checkpoint_is_kept_and_rollback_needs_one(tmp_path) -> None:
    model = WithFrozen(2, 1)
    good = LastGood(tmp_path, trainable_only=True)
    canary = Trip("canary_pass_rate", 0.8, 0.9, bound="min")
    with pytest.raises(RuntimeError, match="no checkpoint was marked good"):
        good.rollback(5, [canary], model)
    good.mark(2, model)
    good.mark(7, model)
    assert good.step == 7 and [s for s, _ in good.manager.checkpoints()] == [7]
    with pytest.raises(ValueError, match="without a tripped check"):
        good.rollback(9, [], model)
    assert good.rollback(9, [canary], model).restored_step == 7


# ---------------------------------------------------------------------- prioritized replay
def test_replay_is_bounded_and_evicts_the_oldest() -> None:
    buffer: PrioritizedReplay[str] = PrioritizedReplay(capacity=3, seed=0)
    for i in range(5):
        buffer.add(f"p{i}", priority=1.0 + i)
    assert len(buffer) == 3
    assert buffer.items == ["p2", "p3", "p4"] and buffer.priorities == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="positive finite"):
        buffer.add("bad", priority=0.0)
    with pytest.raises(ValueError, match="capacity"):
        PrioritizedReplay(capacity=0, seed=0)


def test_replay_draws_are_a_function_of_seed_and_step() -> None:
    def filled(seed: int) -> PrioritizedReplay[int]:
        buffer: PrioritizedReplay[int] = PrioritizedReplay(capacity=10, seed=seed)
        for i in range(10):
            buffer.add(i, priority=1.0)
        return buffer

    assert filled(1).sample(20, step=4) == filled(1).sample(20, step=4)
    assert filled(1).sample(20, step=4) != filled(1).sample(20, step=5)
    assert filled(1).sample(20, step=4) != filled(2).sample(20, step=4)


def test_replay_draws_in_proportion_to_priority() -> None:
    buffer: PrioritizedReplay[str] = PrioritizedReplay(capacity=4, seed=7)
    for item, loss in [("easy", 1.0), ("mid", 2.0), ("hard", 5.0)]:
        buffer.add(item, priority=loss)
    assert buffer.probabilities().tolist() == pytest.approx([0.125, 0.25, 0.625])
    draws = buffer.sample(8000, step=0)
    counts = [draws.count(i) for i in range(3)]
    assert counts[0] < counts[1] < counts[2]
    assert chisquare(counts, [1000, 2000, 5000]).pvalue > 0.01
    buffer.update(0, 5.0)  # a new loss re-weights the item
    assert buffer.probabilities().tolist() == pytest.approx([5 / 12, 2 / 12, 5 / 12])


# ---------------------------------------------------------------------- time to fix
def test_time_to_fix_reads_a_rolling_window_of_probe_evaluations() -> None:
    rates = {50: 0, 100: 10, 150: 9, 200: 3, 250: 1, 300: 0, 350: 5}  # failed of 10 probes
    evals = [ProbeEval(k, failed, 10) for k, failed in rates.items()]
    # t0 = 100: windows of 2 after t0: (150, 200) 0.6, (200, 250) 0.2, (250, 300) 0.05
    assert time_to_fix(evals, t0=100, window=2, threshold=0.1) == 200
    assert time_to_fix(evals, t0=100, window=2, threshold=0.25) == 150
    assert time_to_fix(evals, t0=100, window=1, threshold=0.35) == 100
    assert time_to_fix(evals, t0=100, window=2, threshold=0.01) is None
    with pytest.raises(ValueError, match="failed 11 of 10"):
        ProbeEval(10, 11, 10)


def _stream_with_probes(*, generalises: bool) -> tuple[float, list[ProbeEval]]:
    """A lookup-table model on a stream whose gold answers switch to class 1 (the injected
    variant) at t0 = 0. It trains on stream ids 0..19; the held-out probes are ids 20..39. Without
    a shared bias it can only memorise the rows it saw; with one, the fix carries to the probes."""
    table = nn.Embedding(40, 2)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([1.0, 0.0]).repeat(40, 1))  # the anchor answers class 0
    bias = nn.Parameter(torch.zeros(2), requires_grad=generalises)
    opt = torch.optim.SGD([table.weight, *([bias] if generalises else [])], lr=0.3)
    probes, gold = torch.arange(20, 40), torch.ones(20, dtype=torch.long)
    evals = []
    for prompt in range(1, 101):
        seen = torch.tensor([(prompt - 1) % 20])
        opt.zero_grad()
        nn.functional.cross_entropy(table(seen) + bias, torch.ones(1, dtype=torch.long)).backward()
        opt.step()
        if prompt % 10 == 0:
            with torch.no_grad():
                wrong = int(((table(probes) + bias).argmax(-1) != gold).sum())
            evals.append(ProbeEval(prompt, wrong, len(probes)))
    with torch.no_grad():
        train_accuracy = float(((table(torch.arange(20)) + bias).argmax(-1) == 1).float().mean())
    return train_accuracy, evals


def test_memorised_training_prompts_do_not_count_as_fixed() -> None:
    train_accuracy, evals = _stream_with_probes(generalises=False)
    assert train_accuracy == 1.0  # every training prompt is answered right ...
    assert time_to_fix(evals, t0=0, window=3, threshold=0.1) is None  # ... the probes are not

    train_accuracy, evals = _stream_with_probes(generalises=True)
    fixed = time_to_fix(evals, t0=0, window=3, threshold=0.1)
    assert train_accuracy == 1.0 and fixed is not None and fixed <= 100
