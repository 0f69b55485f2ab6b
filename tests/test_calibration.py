"""The wall calibration (carbond.calibration.WallFit) against synthetic machines whose truth is known.

The machine: wall = A + B * components + C * utilisation + Gaussian noise of sd 3 W. Components follow utilisation
(a CPU) plus a part of their own (a GPU), so both slopes are identifiable. A BMC glitch replaces 10 % of the readings
with the truth +500 W or a reading near zero. Every random draw comes from ``random.Random(seed)``.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import random
import tracemalloc
from typing import Any

import pytest

from carbond.calibration import MAX_W, WallFit

A, B, C = 90.0, 1.12, 60.0
NOISE_W = 3.0


def point(rng: random.Random) -> tuple[float, float]:
    u = rng.random()
    return 80.0 + 200.0 * u + rng.uniform(0.0, 250.0), u


def line(x: float, u: float, a: float = A) -> float:
    return a + B * x + C * u


def reading(rng: random.Random, x: float, u: float, glitches: float, a: float = A) -> float:
    y = line(x, u, a) + rng.gauss(0.0, NOISE_W)
    if rng.random() < glitches:
        return y + 500.0 if rng.random() < 0.5 else max(y - 500.0, 1.0)
    return y


def feed(fit: WallFit, rng: random.Random, n: int, glitches: float = 0.1, a: float = A) -> None:
    for _ in range(n):
        x, u = point(rng)
        assert fit.add(x, u, reading(rng, x, u, glitches, a))


def fitted(seed: int, n: int, glitches: float = 0.1, **params: int) -> WallFit:
    fit = WallFit(**params)
    feed(fit, random.Random(seed), n, glitches)
    return fit


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovers_known_coefficients_within_2_percent_despite_gross_outliers(seed: int) -> None:
    fit = fitted(seed, 2000)
    assert fit.model == "full"
    assert fit.n == 1440
    coefficients = fit.coefficients
    assert coefficients["intercept_w"] == pytest.approx(A, rel=0.02)
    assert coefficients["per_component"] == pytest.approx(B, rel=0.02)
    assert coefficients["per_utilisation"] == pytest.approx(C, rel=0.02)
    quality = fit.quality
    assert 0.07 < quality.outlier_fraction < 0.13  # the glitches, and only they, are rejected
    assert quality.residual_sd_w == pytest.approx(NOISE_W, rel=0.15)
    assert quality.r2 > 0.99
    # each coefficient is within a few of its stated standard errors of the truth
    assert abs(quality.intercept_w - A) < 4 * quality.intercept_se_w
    assert abs(quality.per_component - B) < 4 * quality.per_component_se
    assert abs(quality.per_utilisation - C) < 4 * quality.per_utilisation_se


def test_a_changed_machine_is_learnt_within_two_windows() -> None:
    rng = random.Random(4)
    fit = WallFit(window=500)
    feed(fit, rng, 1000)
    assert fit.coefficients["intercept_w"] == pytest.approx(A, rel=0.02)
    feed(fit, rng, 1000, a=A + 60.0)  # a new PSU or fans: 60 W more at every load
    assert fit.coefficients["intercept_w"] == pytest.approx(A + 60.0, rel=0.02)


def test_band_narrows_as_data_accumulates() -> None:
    rng = random.Random(5)
    fit = WallFit()
    feed(fit, rng, 50)
    grid = [(x, u) for x in (120.0, 300.0, 480.0) for u in (0.1, 0.5, 0.9)]
    early = [fit.prediction(x, u) for x, u in grid]
    feed(fit, rng, 950)
    late = [fit.prediction(x, u) for x, u in grid]
    for before, after in zip(early, late, strict=True):
        assert before is not None
        assert after is not None
        # the fit's own error shrinks like 1/sqrt(n): 50 -> 1000 samples is a factor of 4.5
        assert after.fit_w < before.fit_w / 3
        # one reading's band cannot shrink below the readings' scatter, which is what it then amounts to
        assert after.uncertainty_w == pytest.approx(math.hypot(after.residual_w, after.fit_w))
        assert after.residual_w == pytest.approx(NOISE_W, rel=0.15)
    assert sum(p.uncertainty_w for p in late if p) < sum(p.uncertainty_w for p in early if p)


def test_stated_band_covers_held_out_readings_as_a_standard_uncertainty_should() -> None:
    fit = fitted(6, 2000)
    rng = random.Random(7)
    within_1u = within_2u = 0
    trials = 5000
    for _ in range(trials):
        x, u = point(rng)
        truth = reading(rng, x, u, glitches=0.0)
        predicted = fit.predict(x, u)
        assert predicted is not None
        watts, uncertainty = predicted
        within_1u += abs(watts - truth) <= uncertainty
        within_2u += abs(watts - truth) <= 2 * uncertainty
    assert 0.90 <= within_2u / trials <= 0.999  # about 95 % for a standard uncertainty
    assert 0.60 <= within_1u / trials <= 0.76  # about 68 %: the band is not merely wide


def test_fit_band_covers_the_true_line_over_independent_fits() -> None:
    rng = random.Random(8)
    within_1 = within_2 = 0
    fits = 200
    for _ in range(fits):
        fit = WallFit()
        feed(fit, rng, 80)
        x, u = point(rng)
        predicted = fit.prediction(x, u)
        assert predicted is not None
        error = abs(predicted.watts - line(x, u))
        within_1 += error <= predicted.fit_w
        within_2 += error <= 2 * predicted.fit_w
    assert 0.88 <= within_2 / fits <= 1.0
    assert 0.55 <= within_1 / fits <= 0.82


def test_no_prediction_with_too_few_samples() -> None:
    rng = random.Random(9)
    fit = WallFit(min_samples=30)
    feed(fit, rng, 29, glitches=0.0)
    assert fit.predict(300.0, 0.5) is None
    assert fit.model == "none"
    assert fit.coefficients == {}
    assert math.isnan(fit.r2)
    assert math.isnan(fit.residual_sd_w)
    assert fit.quality.samples == 29
    feed(fit, rng, 1, glitches=0.0)
    predicted = fit.predict(300.0, 0.5)
    assert predicted is not None
    assert abs(predicted[0] - line(300.0, 0.5)) < 3 * predicted[1]


def test_no_spread_in_the_components_gives_a_ratio_only_near_the_operating_point() -> None:
    rng = random.Random(10)
    fit = WallFit()
    for _ in range(200):
        x, u = 250.0 + rng.uniform(-0.2, 0.2), 0.6
        fit.add(x, u, reading(rng, x, u, glitches=0.1))
    assert fit.model == "ratio"
    assert fit.coefficients["intercept_w"] == 0.0
    assert fit.coefficients["per_utilisation"] == 0.0
    assert fit.coefficients["per_component"] == pytest.approx(line(250.0, 0.6) / 250.0, rel=0.01)
    assert fit.predict(400.0, 0.6) is None  # far from anything seen: the slope is unknown
    assert fit.predict(120.0, 0.6) is None
    at = fit.predict(250.0, 0.6)
    assert at is not None
    assert abs(at[0] - line(250.0, 0.6)) < 2 * at[1]
    near, nearer = fit.prediction(270.0, 0.6), fit.prediction(255.0, 0.6)
    assert near is not None
    assert nearer is not None
    assert near.fit_w > nearer.fit_w  # the extrapolation term grows with the distance
    assert abs(near.watts - line(270.0, 0.6)) < 2 * near.uncertainty_w


def test_too_little_spread_to_pin_the_slope_falls_back_to_a_ratio() -> None:
    rng = random.Random(11)
    fit = WallFit()
    for _ in range(40):  # 1.5 W of spread under 3 W of noise: a slope standard error near 0.4
        x, u = 250.0 + rng.uniform(-2.6, 2.6), 0.6
        fit.add(x, u, reading(rng, x, u, glitches=0.0))
    assert fit.model == "ratio"


def test_utilisation_without_spread_of_its_own_gives_a_linear_model() -> None:
    rng = random.Random(12)
    fit = WallFit()
    for _ in range(300):
        x = rng.uniform(100.0, 500.0)
        fit.add(x, 0.5, reading(rng, x, 0.5, glitches=0.1))
    assert fit.model == "linear"
    assert fit.coefficients["per_utilisation"] == 0.0
    assert fit.coefficients["per_component"] == pytest.approx(B, rel=0.02)
    assert fit.coefficients["intercept_w"] == pytest.approx(A + C * 0.5, rel=0.02)
    assert fit.quality.per_utilisation_se == 0.0


def test_invalid_inputs_are_ignored() -> None:
    fit = fitted(13, 100, glitches=0.0)
    before = fit.predict(300.0, 0.5)
    nan, inf = math.nan, math.inf
    for x, u, y in [(nan, 0.5, 400.0), (300.0, nan, 400.0), (300.0, 0.5, nan), (inf, 0.5, 400.0), (300.0, 0.5, inf),
                    (300.0, 0.5, -inf), (0.0, 0.5, 400.0), (-5.0, 0.5, 400.0), (300.0, 0.5, 0.0), (300.0, 0.5, -1.0),
                    (300.0, -0.1, 400.0), (300.0, 1.5, 400.0)]:  # fmt: skip
        assert fit.add(x, u, y) is False
    assert fit.n == 100
    assert fit.predict(300.0, 0.5) == before
    assert fit.predict(nan, 0.5) is None
    assert fit.predict(300.0, inf) is None
    assert fit.predict(-1.0, 0.5) is None
    assert fit.add(300.0, 0.0, 420.0)
    assert fit.add(300.0, 1.0, 480.0)


def test_window_is_bounded() -> None:
    rng = random.Random(14)
    gc.collect()
    tracemalloc.start()
    try:
        fit = WallFit(window=150)
        feed(fit, rng, 150)
        gc.collect()
        one_window, _ = tracemalloc.get_traced_memory()
        feed(fit, rng, 1350)
        gc.collect()
        ten_windows, _ = tracemalloc.get_traced_memory()
        feed(fit, rng, 1500)
        gc.collect()
        twenty_windows, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fit.n == 150
    assert ten_windows < one_window * 1.25  # ~30 kB for a window of samples (weights then refitted), not ten times
    assert abs(twenty_windows - ten_windows) < one_window * 0.05
    assert sum(s[3] for s in fit.to_state()["samples"]) == 150


def round_trip(fit: WallFit, **params: int) -> WallFit:
    return WallFit.from_state(json.loads(json.dumps(fit.to_state(), allow_nan=False)), **params)


def test_round_trip_of_a_full_window_predicts_the_same() -> None:
    fit = fitted(15, 3000)
    state = fit.to_state()
    assert len(state["samples"]) <= fit.state_samples  # decimated: 1440 samples kept as 360
    assert len(json.dumps(state)) < 32_000
    restored = round_trip(fit)
    assert restored.restored
    assert restored.quality == fit.quality
    rng = random.Random(16)
    for _ in range(50):
        x, u = point(rng)
        assert restored.predict(x, u) == fit.predict(x, u)
    # later samples evict the decimated ones (each standing for 4) and refit from them: the two stay close
    later = [(x, u, reading(rng, x, u, glitches=0.1)) for x, u in (point(rng) for _ in range(1440))]
    for x, u, y in later[:800]:
        fit.add(x, u, y)
        restored.add(x, u, y)
    assert restored.n == fit.n == 1440
    for x, u in [(150.0, 0.2), (300.0, 0.5), (450.0, 0.9)]:
        ours, theirs = restored.prediction(x, u), fit.prediction(x, u)
        assert ours is not None
        assert theirs is not None
        assert abs(ours.watts - theirs.watts) < 3 * theirs.fit_w
        assert ours.uncertainty_w == pytest.approx(theirs.uncertainty_w, rel=0.1)
    # once a window of new samples has replaced the saved ones, the two fit the same data
    for x, u, y in later[800:]:
        fit.add(x, u, y)
        restored.add(x, u, y)
    assert restored.predict(300.0, 0.5) == pytest.approx(fit.predict(300.0, 0.5), rel=1e-4)


def test_round_trip_of_a_partial_window_continues_exactly() -> None:
    fit = fitted(17, 200)
    restored = round_trip(fit)
    rng = random.Random(18)
    for _ in range(400):  # past a refit and into eviction
        x, u = point(rng)
        y = reading(rng, x, u, glitches=0.1)
        assert fit.add(x, u, y) == restored.add(x, u, y)
    for x, u in [(150.0, 0.2), (300.0, 0.5), (450.0, 0.9)]:
        ours, theirs = restored.predict(x, u), fit.predict(x, u)
        assert ours is not None
        assert theirs is not None
        assert ours == pytest.approx(theirs, rel=1e-9)


def test_restore_into_a_smaller_window_keeps_the_newest_samples() -> None:
    restored = round_trip(fitted(19, 2000), window=200)
    assert restored.restored
    assert restored.n <= 200
    assert restored.coefficients["per_component"] == pytest.approx(B, rel=0.02)


def garbage(valid: dict[str, Any], rng: random.Random) -> Any:
    """A state broken in one place: a leaf or a list replaced, cut or removed."""
    state = copy.deepcopy(valid)
    key = rng.choice(sorted(state))
    target: Any = state
    path: list[Any] = [key]
    while isinstance(target[path[-1]], list) and target[path[-1]] and rng.random() < 0.7:
        target = target[path[-1]]
        path.append(rng.randrange(len(target)))
    spoil: Any = rng.choice([None, "7", True, math.nan, -math.inf, -1, 0, 1e308, [], {}, [1.0] * 5, "cut", "drop"])
    if spoil == "cut" and isinstance(target[path[-1]], list):
        target[path[-1]] = target[path[-1]][:-1]
    elif spoil == "drop" and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = spoil
    return state


def test_garbage_state_gives_a_fresh_fit_and_never_raises() -> None:
    valid = fitted(20, 60).to_state()
    others = {k: v for k, v in valid.items() if k != "v"}
    broken: list[Any] = [None, [], "state", 42, {}, {"v": 1}, {"v": 2, **others}, {**valid, "counts": [10**9, 0, 0]}]
    broken.append({**valid, "samples": [[300.0, 0.5, 400.0, 1]] * 5000})
    for state in broken:
        fit = WallFit.from_state(state)
        assert not fit.restored
        assert fit.n == 0
        assert fit.model == "none"
    rng = random.Random(21)
    rejected = 0
    for _ in range(500):
        fit = WallFit.from_state(garbage(valid, rng))
        rejected += not fit.restored
        # whatever was loaded, the fit answers sanely and keeps learning
        feed(fit, rng, 40)
        predicted = fit.predict(300.0, 0.5)
        assert predicted is None or (math.isfinite(predicted[0]) and predicted[1] >= 0)
    assert rejected > 400  # nearly every spoilt state is refused (a changed x or y is still a valid state)


def test_tampered_but_well_formed_sums_never_raise_nor_give_non_finite_figures() -> None:
    valid = fitted(22, 60).to_state()
    rng = random.Random(23)
    extremes = [0.0, 1e-300, -1e-300, 1e300, -1e300, 1e15, -1e15]
    for _ in range(1000):
        state = copy.deepcopy(valid)
        key = rng.choice(["wm", "im", "beta", "counts"])
        i = rng.randrange(len(state[key]))
        state[key][i] = rng.choice([*extremes, rng.uniform(-1e6, 1e6), state[key][i] * rng.uniform(0.5, 2.0)])
        fit = WallFit.from_state(state)
        for x, u in [(1e-300, 0.0), (MAX_W, 1.0), (rng.uniform(0.0, MAX_W), rng.random()), (300.0, 0.5)]:
            predicted = fit.prediction(x, u)
            assert predicted is None or (math.isfinite(predicted.watts) and 0 <= predicted.uncertainty_w < math.inf)
        assert fit.quality.samples == fit.n
        feed(fit, rng, 3)


def test_constructor_rejects_nonsense() -> None:
    for params in [{"window": 5}, {"min_samples": 3}, {"window": 20, "min_samples": 30}, {"refit_every": -1}]:
        with pytest.raises(ValueError, match="need window >= min_samples"):
            WallFit(**params)
