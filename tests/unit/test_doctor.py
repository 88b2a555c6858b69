"""tunelab doctor on synthetic loss curves (seeded noise): each rule fires on a clear case and
stays quiet on noisy-but-healthy and borderline curves."""

import math
import random

import pytest

from tunelab.train.doctor import KINDS, diagnose, ema

N = 200


def run(shape, *, noise=0.04, seed=0, evals=None, n=N, lr=1e-4, extra=None):
    """Training records with loss shape(step) * (1 + noise * gauss), grad norm ~1; evals:
    {step: eval_loss}; extra: {step: {field: value}} merged into that step's record."""
    rnd = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        record = {"step": step, "loss": shape(step) * (1 + noise * rnd.gauss(0, 1)), "lr": lr,
                  "grad_norm": 1 + 0.1 * rnd.random(), "tokens": 100, "epoch": step / 20}  # fmt: skip
        record.update((extra or {}).get(step, {}))
        out.append(record)
    for step, value in sorted((evals or {}).items()):
        out.append({"step": step, "eval_loss": value})
    return out


def converging(step):  # 3.0 -> 1.0, converged by the last third
    return 1 + 2 * math.exp(-step / 25)


def healthy_evals(seed=0):
    rnd = random.Random(seed + 100)
    return {s: converging(s) + 0.1 + 0.01 * rnd.gauss(0, 1) for s in range(0, N + 1, 20)}


def kinds(records, info=None):
    found = diagnose(records, info)
    assert all(f.kind in KINDS and f.evidence and f.advice for f in found)
    return [f.kind for f in found]


# ---- quiet on healthy and borderline curves -----------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_noisy_healthy_curve_is_healthy(seed):
    assert kinds(run(converging, noise=0.06, seed=seed, evals=healthy_evals(seed))) == ["healthy"]


def test_healthy_curve_with_one_small_bump_is_healthy():
    records = run(converging, evals=healthy_evals(), extra={120: {"loss": 1.6}})
    assert kinds(records) == ["healthy"]


def test_converged_curve_with_heavy_noise_is_healthy():
    assert kinds(run(converging, noise=0.12, seed=3)) == ["healthy"]


def test_one_noisy_eval_uptick_is_not_overfitting():
    evals = healthy_evals()
    evals[180] = evals[160] * 1.04  # up once, then back down
    evals[200] = evals[160] * 0.995
    assert kinds(run(converging, evals=evals)) == ["healthy"]


def test_one_spike_is_not_lr_too_high():
    assert kinds(run(converging, extra={150: {"loss": 4.0}})) == ["healthy"]


def test_too_few_steps_is_too_short_not_an_error():
    found = diagnose(run(converging, n=5))
    assert [f.kind for f in found] == ["too_short"]
    assert "5" in found[0].evidence


# ---- each rule fires on a clear case ------------------------------------------------------


def test_divergence_is_lr_too_high():
    def diverging(step):
        # up 60 % from the minimum by the end: well past the 25 % threshold, nowhere near 250 %
        return converging(step) if step < 120 else converging(120) * (1 + 0.6 * (step - 120) / 80)

    found = diagnose(run(diverging, lr=1e-2))
    assert [f.kind for f in found][:1] == ["lr_too_high"]
    assert "diverging" in found[0].evidence
    assert found[0].advice == "lower train.lr by 3-10x (now 0.01)"


def test_nan_skipped_steps_are_lr_too_high():
    records = run(converging, extra={90: {"loss": float("nan"), "nan_skipped": True}})
    found = diagnose(records)
    assert found[0].kind == "lr_too_high" and "step 90" in found[0].evidence


def test_spikes_are_lr_too_high():
    spikes = {s: {"loss": 3 * converging(s) + 1} for s in (80, 130, 170)}
    found = diagnose(run(converging, extra=spikes))
    assert found[0].kind == "lr_too_high" and "80, 130, 170" in found[0].evidence


def test_grad_norm_explosions_are_lr_too_high():
    bursts = {s: {"grad_norm": 50.0} for s in (100, 160)}
    found = diagnose(run(converging, extra=bursts))
    assert found[0].kind == "lr_too_high" and "gradient-norm" in found[0].evidence


def test_slow_linear_decline_is_lr_too_low():
    found = diagnose(run(lambda s: 3.0 - 0.3 * s / N, noise=0.01), {"train": {"lr": 1e-6}})
    assert [f.kind for f in found] == ["lr_too_low"]
    assert found[0].advice == "raise train.lr about 3x (now 1e-06)"


def test_flat_loss_is_lr_too_low():
    evals = {0: 6.22, 100: 6.22, 200: 6.22}
    assert kinds(run(lambda s: 6.26, noise=0.002, evals=evals)) == ["lr_too_low"]


def test_still_falling_is_not_converged():
    def slow(step):
        return 1 + 2 * math.exp(-step / 150)

    evals = {s: slow(s) + 0.1 for s in range(0, N + 1, 20)}
    found = diagnose(run(slow, noise=0.02, evals=evals))
    assert [f.kind for f in found] == ["not_converged"]
    assert found[0].advice == "train more epochs or add data"


def test_rising_validation_loss_is_overfitting():
    evals = {s: converging(s) + 0.1 for s in range(0, 81, 20)}
    evals.update({100: evals[80] * 1.05, 120: evals[80] * 1.10, 140: evals[80] * 1.15})
    found = diagnose(run(converging, evals=evals, n=140))
    assert [f.kind for f in found] == ["overfitting"]
    assert "best at step 80" in found[0].evidence
    assert found[0].advice.startswith("the best step is 80 (validation loss")
    assert "fewer epochs (about 4)" in found[0].advice


def test_overfitting_needs_training_loss_still_falling():
    evals = {0: 3.1, 20: 2.0, 40: 2.2, 60: 2.4}
    assert "overfitting" not in kinds(run(lambda s: 2.0, evals=evals, n=60))


def test_near_zero_loss_early_is_memorisation():
    found = diagnose(
        run(lambda s: 3 * math.exp(-s / 5) + 0.02, noise=0.05), {"train": {"epochs": 30}}
    )
    assert "memorisation" in [f.kind for f in found]
    memo = next(f for f in found if f.kind == "memorisation")
    assert memo.advice == "cut epochs to about a third (now 10), or add data"  # the records


def test_low_loss_late_is_not_memorisation():
    assert "memorisation" not in kinds(run(lambda s: 0.5 * math.exp(-s / 60) + 0.02))


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], 10) == pytest.approx([2.0, 2.0, 2.0])


def test_train_still_falling_but_validation_flat_is_healthy_not_empty():
    def slow(step):
        return 1 + 2 * math.exp(-step / 150)

    evals = {s: 1.5 + 0.003 * (s % 40 == 0) for s in range(0, N + 1, 20)}
    found = diagnose(run(slow, noise=0.02, evals=evals))
    assert [f.kind for f in found] == ["healthy"]
    assert "validation loss stopped improving" in found[0].evidence
