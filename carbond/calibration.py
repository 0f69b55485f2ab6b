"""Online calibration of component power against the wall: ``platform_w ~ a + b * components_w + c * utilisation``.

Pure code (no I/O, no clock): the monitor adds a sample in each tick whose platform reading is fresh (``add``), and asks
for the wall power where it is stale or failed (``prediction``).
Method: over the last ``window`` accepted samples, Tukey's bisquare M-estimator (c = 4.685, 95 % efficient under
Gaussian noise) by iteratively reweighted least squares, the scale re-estimated at each step as 1.4826 x the median
absolute residual. A cold fit starts from least squares and takes Huber steps (convex: they converge from any start)
before the bisquare ones, which give gross outliers weight 0 but need a start near the answer; a warm refit starts from
the last coefficients. The normal equations are solved in centred form (2x2 for the slopes, then the intercept). A full
refit runs when the count reaches ``min_samples``, cold each time it doubles while the window fills, then warm every
``refit_every`` samples. In between, each new sample enters running sums of 1, x, u, y and their products with its
bisquare weight under the last refit, and an evicted one leaves them, so the fit follows every sample at O(1) cost. The
weighted sums give the coefficients; a second set over the inliers (weight > 0) gives the residual sd (with the model's
degrees of freedom) and the parameter covariance (least squares', over the efficiency). A prediction is of one wall
reading: its standard uncertainty combines the residual sd with the fitted mean's standard error there
(``WallPrediction`` keeps both: the first is independent between ticks, the second is not).
Models: ``full``; ``linear`` (c = 0) when utilisation has no spread of its own; ``ratio`` (a = c = 0) when the
components' spread is under ``MIN_SPREAD_W`` or leaves the slope's standard error over ``MAX_SLOPE_SE``: it predicts
only near its operating point (3 sd + 10 %), adding half the gap between its slope and 1 (the rest of the machine
constant) times the distance from it; ``none`` (no prediction) before ``min_samples`` samples and the first refit, or
with more outliers than inliers.
Assumptions: the relation is linear and steady over the window (a changed machine takes up to a window to forget); noise
is independent between ticks with a constant spread; outliers are a minority (the median scale breaks down at 50 %);
components and platform average over comparable intervals.
Persistence: ``to_state`` keeps the sums and the last refit exactly (a restored fit predicts as the saved one did) and
the window decimated to at most ``state_samples`` samples, each standing for the run of consecutive samples it replaces
(its multiplicity), which later evictions and refits use.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from operator import add, mul
from typing import Any

TUKEY_C, HUBER_K, MAD_TO_SD = 4.685, 1.345, 1.4826  # bisquare and Huber tuning, median absolute deviation to sd
EFFICIENCY = 0.95  # bisquare at c = 4.685 relative to least squares under Gaussian noise
MIN_SPREAD_W = 1.0  # components' standard deviation below which the slope is not identified
MIN_SPREAD_U = 0.02  # utilisation's spread not explained by the components, below which c is dropped
MAX_SLOPE_SE = 0.05  # watts at the wall per component watt
MAX_W = 1e6  # above any one machine: a larger figure is a broken reading, and would overflow the sums
STATE_VERSION = 1
_N_MOM = 10  # sums of 1, x, u, y, xx, xu, uu, xy, uy, yy
_BOUNDS = (1.0, MAX_W, 1.0, MAX_W, MAX_W * MAX_W, MAX_W, 1.0, MAX_W * MAX_W, MAX_W, MAX_W * MAX_W)  # per sample


def _accumulate(m: list[float], x: float, u: float, y: float, w: float) -> None:
    """Add one sample of weight ``w`` to the sums ``m`` (a negative weight takes it out)."""
    wx, wu, wy = w * x, w * u, w * y
    m[:] = map(add, m, (w, wx, wu, wy, wx * x, wx * u, wu * u, wx * y, wu * y, wy * y))


@dataclass(frozen=True)
class _Centred:
    n: float
    mx: float
    mu: float
    my: float
    cxx: float
    cxu: float
    cuu: float
    cxy: float
    cuy: float
    cyy: float

    @staticmethod
    def of(m: list[float]) -> _Centred | None:
        n = m[0]
        if not n > 0.5:
            return None
        mx, mu, my = m[1] / n, m[2] / n, m[3] / n
        return _Centred(
            n, mx, mu, my, max(m[4] - m[1] * mx, 0.0), m[5] - m[1] * mu, max(m[6] - m[2] * mu, 0.0),
            m[7] - m[1] * my, m[8] - m[2] * my, max(m[9] - m[3] * my, 0.0),
        )  # fmt: skip

    def kind(self) -> str:
        """The richest model these sums identify numerically."""
        if self.cxx <= 0 or math.sqrt(self.cxx / self.n) < max(MIN_SPREAD_W, 1e-3 * self.mx):
            return "ratio"
        partial_uu = self.cuu - self.cxu * self.cxu / self.cxx
        return "full" if partial_uu > 0 and math.sqrt(partial_uu / self.n) >= MIN_SPREAD_U else "linear"

    def solve(self, kind: str, m: list[float]) -> tuple[float, float, float]:
        """The coefficients of ``kind`` from these sums (``m`` their raw form); a singular system drops a term."""
        det = self.cxx * self.cuu - self.cxu * self.cxu
        if kind == "full" and det > 0:
            b = (self.cxy * self.cuu - self.cuy * self.cxu) / det
            c = (self.cuy * self.cxx - self.cxy * self.cxu) / det
            return self.my - b * self.mx - c * self.mu, b, c
        if kind != "ratio" and self.cxx > 0:
            return self.my - self.cxy / self.cxx * self.mx, self.cxy / self.cxx, 0.0
        return 0.0, (m[7] / m[4] if m[4] > 0 else 0.0), 0.0

    @staticmethod
    def fit(m: list[float]) -> tuple[float, float, float] | None:
        """The richest model's coefficients from the raw sums ``m``."""
        cen = _Centred.of(m)
        return None if cen is None else cen.solve(cen.kind(), m)


def _bisquare(r: float, cut: float) -> float:
    return (1.0 - (r / cut) ** 2) ** 2 if -cut < r < cut else 0.0


def _sums(ws: list[float], xs: list[float], us: list[float], ys: list[float]) -> list[float]:
    """``_accumulate`` over whole columns, at C speed."""
    wx, wu, wy = list(map(mul, ws, xs)), list(map(mul, ws, us)), list(map(mul, ws, ys))
    return [sum(ws), sum(wx), sum(wu), sum(wy), sum(map(mul, wx, xs)), sum(map(mul, wx, us)), sum(map(mul, wu, us)),
            sum(map(mul, wx, ys)), sum(map(mul, wu, ys)), sum(map(mul, wy, ys))]  # fmt: skip


def _median(values: list[float], weights: list[float], total: float) -> float:
    """The median of ``values``, each counted ``weights`` times (they sum to ``total``)."""
    if len(values) == total:
        return statistics.median(values)
    acc = 0.0
    for value, weight in sorted(zip(values, weights, strict=True)):
        acc += weight
        if acc >= 0.5 * total:
            return value
    return math.nan


@dataclass(frozen=True)
class FitQuality:
    """For the exporter: figures NaN while the model is ``none``; a term left out has coefficient 0 and se 0."""

    model: str
    samples: int
    r2: float
    residual_sd_w: float
    outlier_fraction: float
    intercept_w: float
    per_component: float
    per_utilisation: float
    intercept_se_w: float
    per_component_se: float
    per_utilisation_se: float


@dataclass(frozen=True)
class WallPrediction:
    """A wall reading predicted. ``residual_w``: the scatter of readings about the fit, independent between ticks;
    ``fit_w``: the fit's own error here, shared by the ticks near this point (it does not average out)."""

    watts: float
    uncertainty_w: float  # standard uncertainty of one reading: residual_w and fit_w root-sum-square
    residual_w: float
    fit_w: float


@dataclass(frozen=True)
class _Fit:
    kind: str
    beta: tuple[float, float, float]
    sd: float
    cen: _Centred  # of the inliers
    inv: tuple[float, float, float]  # the inverse of the slopes' centred cross-product matrix (xx, xu, uu)
    sxx: float  # inliers' sum of x^2 (the ratio's variance)
    r2: float


class WallFit:
    """The windowed, robust fit of wall power on component power and utilisation (see the module docstring)."""

    def __init__(self, window: int = 1440, min_samples: int = 30, refit_every: int = 0, state_samples: int = 360):
        if min_samples < 10 or window < min_samples or refit_every < 0 or state_samples < 10:
            raise ValueError("need window >= min_samples >= 10, refit_every >= 0 and state_samples >= 10")
        self.window, self.min_samples, self.state_samples = window, min_samples, state_samples
        self.refit_every = refit_every or max(min_samples, window // 4)
        self._samples: deque[list[float]] = deque()  # [x, u, y, weight, multiplicity]
        self._n = 0  # sum of multiplicities in the window
        self._wm = [0.0] * _N_MOM  # bisquare-weighted sums
        self._im = [0.0] * _N_MOM  # inlier sums
        self._beta, self._scale = (0.0, 0.0, 0.0), 0.0  # the last refit's coefficients and scale weight new samples
        self._since_refit, self._fitted_n = 0, 0  # samples since the last refit, the window's count at it
        self._fit: _Fit | None = None
        self._dirty = True  # _fit is out of date
        self.restored = False  # True when from_state loaded a saved fit

    def add(self, components_w: float, utilisation: float, platform_w: float) -> bool:
        """One tick's sample; False (ignored) unless both powers are in (0, MAX_W] and 0 <= utilisation <= 1."""
        x, u, y = components_w, utilisation, platform_w
        if not (0 < x <= MAX_W and 0 < y <= MAX_W and 0 <= u <= 1):  # false for NaN too
            return False
        while self._samples and self._n + 1 > self.window:
            self._move(self._samples.popleft(), -1.0)
        w = self._weight(y - self._beta[0] - self._beta[1] * x - self._beta[2] * u)
        self._samples.append(sample := [x, u, y, w, 1.0])
        self._move(sample, 1.0)
        self._since_refit, self._dirty = self._since_refit + 1, True
        if self._n >= self.min_samples and (
            self._since_refit >= self.refit_every or (self._fitted_n < self.window and self._n >= 2 * self._fitted_n)
        ):
            self._refit(cold=self._fitted_n < self.window)
        return True

    def _weight(self, r: float) -> float:
        return _bisquare(r, TUKEY_C * self._scale) if self._scale > 0 else 1.0

    def _move(self, s: list[float], sign: float) -> None:
        x, u, y, w, mult = s
        self._n += int(sign * mult)
        _accumulate(self._wm, x, u, y, sign * w * mult)
        if w > 0:
            _accumulate(self._im, x, u, y, sign * mult)

    def _refit(self, cold: bool) -> None:
        """Re-weight the whole window: IRLS from the last coefficients (``cold``: from least squares, via Huber)."""
        self._since_refit, self._fitted_n, self._dirty = 0, self._n, True
        xs, us, ys, ms = ([s[i] for s in self._samples] for i in (0, 1, 2, 4))
        steps = ["huber"] * 6 if cold or self._scale <= 0 else []
        beta = _Centred.fit(_sums(ms, xs, us, ys)) if steps else self._beta
        kept: tuple[list[float], list[float], list[float], tuple[float, float, float], float] | None = None
        for how in [*steps, *["tukey"] * 8]:
            if beta is None:
                return
            a, b, c = beta
            res = [y - a - b * x - c * u for x, u, y in zip(xs, us, ys, strict=True)]
            scale = max(MAD_TO_SD * _median([abs(r) for r in res], ms, self._n), 1e-9 * (1.0 + abs(a)))
            cut = (TUKEY_C if how == "tukey" else HUBER_K) * scale
            ws = [_bisquare(r, cut) if how == "tukey" else min(1.0, cut / abs(r or cut)) for r in res]
            wm = _sums([w * m for w, m in zip(ws, ms, strict=True)], xs, us, ys)
            new = _Centred.fit(wm)
            if new is None:
                break
            step = abs(new[0] - a) + abs(new[1] - b) * wm[1] / wm[0] + abs(new[2] - c)
            beta = new
            if how == "tukey":
                inliers = [m if w > 0 else 0.0 for w, m in zip(ws, ms, strict=True)]
                kept = (ws, wm, _sums(inliers, xs, us, ys), new, scale)
                if step < 5e-3 * scale:  # the fitted values moved by less than 0.5 % of the noise
                    break
        if kept is not None:
            ws, self._wm, self._im, self._beta, self._scale = kept
            for sample, w in zip(self._samples, ws, strict=True):
                sample[3] = w

    def _current(self) -> _Fit | None:
        if not self._dirty:
            return self._fit
        self._dirty, self._fit = False, None
        cen, weighted = _Centred.of(self._im), _Centred.of(self._wm)
        if cen is None or weighted is None or self._n < self.min_samples or not self._fitted_n or cen.n < self._n / 2:
            return None
        kind = cen.kind()
        while True:
            a, b, c = beta = weighted.solve(kind, self._wm)
            if kind == "ratio":
                rss, inv = self._im[9] - 2 * b * self._im[7] + b * b * self._im[4], (0.0, 0.0, 0.0)
            else:
                dm = cen.my - a - b * cen.mx - c * cen.mu
                rss = cen.cyy - 2 * (b * cen.cxy + c * cen.cuy) + b * b * cen.cxx + 2 * b * c * cen.cxu
                rss += c * c * cen.cuu + cen.n * dm * dm
                det = cen.cxx * cen.cuu - cen.cxu * cen.cxu
                inv = (cen.cuu / det, -cen.cxu / det, cen.cxx / det) if kind == "full" else (1 / cen.cxx, 0.0, 0.0)
            p = {"full": 3, "linear": 2, "ratio": 1}[kind]
            sd = max(math.sqrt(max(rss, 0.0) / max(cen.n - p, 1.0)), 1e-9 * (1.0 + abs(cen.my)))
            if kind == "ratio" or sd * math.sqrt(inv[0] / EFFICIENCY) <= MAX_SLOPE_SE:
                break
            kind = "ratio"  # the components' spread does not pin the slope down
        if not (math.isfinite(a + b + c + sd) and self._im[4] > 0):  # only sums from a tampered state get here
            return None
        r2 = 1.0 - max(rss, 0.0) / cen.cyy if cen.cyy > 0 else math.nan
        self._fit = _Fit(kind, beta, sd, cen, inv, self._im[4], r2)
        return self._fit

    def prediction(self, components_w: float, utilisation: float) -> WallPrediction | None:
        """The wall power of one reading at this point and its uncertainty terms; None while the fit is not trusted,
        for inputs ``add`` would ignore, and for a ratio model away from its operating point."""
        x, u = components_w, utilisation
        fit = self._current()
        if fit is None or not (0 < x <= MAX_W and 0 <= u <= 1):
            return None
        (a, b, c), cen = fit.beta, fit.cen
        dx = x - cen.mx
        if fit.kind == "ratio":
            if abs(dx) > 3 * math.sqrt(cen.cxx / cen.n) + 0.1 * cen.mx:
                return None
            gap = dx * (b - 1.0) / 2
            var_fit = fit.sd * fit.sd * x * x / fit.sxx / EFFICIENCY + gap * gap
        else:
            du = u - cen.mu if fit.kind == "full" else 0.0
            quad = fit.inv[0] * dx * dx + 2 * fit.inv[1] * dx * du + fit.inv[2] * du * du
            var_fit = max(fit.sd * fit.sd * (1.0 / cen.n + quad) / EFFICIENCY, 0.0)
        p = WallPrediction(a + b * x + c * u, math.sqrt(fit.sd * fit.sd + var_fit), fit.sd, math.sqrt(var_fit))
        return p if math.isfinite(p.watts + p.uncertainty_w) else None

    def predict(self, components_w: float, utilisation: float) -> tuple[float, float] | None:
        """(wall watts, standard uncertainty in watts) of one reading at this point, or None (see ``prediction``)."""
        p = self.prediction(components_w, utilisation)
        return None if p is None else (p.watts, p.uncertainty_w)

    @property
    def n(self) -> int:
        """Samples in the window."""
        return self._n

    @property
    def model(self) -> str:
        """``full``, ``linear``, ``ratio`` or ``none`` (not trusted yet)."""
        return self.quality.model

    @property
    def r2(self) -> float:
        return self.quality.r2  # of the inliers

    @property
    def residual_sd_w(self) -> float:
        return self.quality.residual_sd_w

    @property
    def coefficients(self) -> dict[str, float]:
        """intercept_w, per_component (W/W), per_utilisation (W at 100 %); empty while the model is ``none``."""
        q = self.quality
        return (
            {} if q.model == "none" else {k: getattr(q, k) for k in ("intercept_w", "per_component", "per_utilisation")}
        )

    @property
    def quality(self) -> FitQuality:
        fit = self._current()
        out = 1.0 - self._im[0] / self._n if self._n else math.nan
        if fit is None:
            return FitQuality("none", self._n, *(math.nan,) * 2, out, *(math.nan,) * 6)
        s2, cen = fit.sd**2 / EFFICIENCY, fit.cen
        if fit.kind == "ratio":
            se = (0.0, math.sqrt(s2 / fit.sxx), 0.0)
        else:
            mx, mu = cen.mx, cen.mu
            var_a = s2 * (1.0 / cen.n + fit.inv[0] * mx * mx + 2 * fit.inv[1] * mx * mu + fit.inv[2] * mu * mu)
            se = (math.sqrt(var_a), math.sqrt(s2 * fit.inv[0]), math.sqrt(s2 * fit.inv[2]))
        return FitQuality(fit.kind, self._n, fit.r2, fit.sd, out, *fit.beta, *se)

    def to_state(self) -> dict[str, Any]:
        """JSON-safe, at most ``state_samples`` samples: the exact sums and the decimated window (see module doc)."""
        group = max(1, math.ceil(self._n / self.state_samples))
        kept: list[list[float]] = []
        for s in self._samples:
            if kept and kept[-1][3] < group:
                kept[-1][3] += s[4]
            else:
                kept.append([s[0], s[1], s[2], s[4]])
        counts = [self._n, self._since_refit, self._fitted_n]
        return {"v": STATE_VERSION, "wm": list(self._wm), "im": list(self._im), "beta": list(self._beta),
                "scale": self._scale, "counts": counts, "samples": kept}  # fmt: skip

    @classmethod
    def from_state(cls, state: object, **params: int) -> WallFit:
        """A fit restored from ``to_state``'s output, or a fresh one (``restored`` False) when ``state`` is not one."""
        fit = cls(**params)
        try:
            fit._restore(state)
        except Exception:  # noqa: BLE001 - the state file is untrusted input: whatever is wrong with it, start afresh
            fit = cls(**params)
        return fit

    def _restore(self, state: object) -> None:
        if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
            raise ValueError("not a calibration state")
        wm, im, beta = _numbers(state["wm"], _N_MOM), _numbers(state["im"], _N_MOM), _numbers(state["beta"], 3)
        (scale,), (n, since, fitted) = _numbers([state["scale"]], 1), _numbers(state["counts"], 3)
        raw = state["samples"]
        if not isinstance(raw, list) or len(raw) > max(self.state_samples, self.window):
            raise ValueError("samples")
        samples = [_numbers(s, 4) for s in raw]
        ok = all(0 < x <= MAX_W and 0 < y <= MAX_W and 0 <= u <= 1 and 1 <= m == int(m) for x, u, y, m in samples)
        if not ok or scale < 0 or sum(s[3] for s in samples) != n or min(since, fitted, im[0], wm[0]) < 0:
            raise ValueError("samples")
        if any(abs(v) > (n + 1e-6) * bound for sums in (wm, im) for v, bound in zip(sums, _BOUNDS, strict=True)):
            raise ValueError("sums beyond what samples in range can make")
        self._beta, self._scale = (beta[0], beta[1], beta[2]), scale
        for x, u, y, m in samples:
            self._samples.append([x, u, y, self._weight(y - beta[0] - beta[1] * x - beta[2] * u), m])
        if n <= self.window:
            self._n, self._wm, self._im, self._since_refit, self._fitted_n = int(n), wm, im, int(since), int(fitted)
        else:  # a smaller window now: keep the newest samples, rebuild the sums from them and refit
            while n > self.window:
                n -= self._samples.popleft()[4]
            for s in self._samples:
                self._move(s, 1.0)
            if self._n >= self.min_samples:
                self._refit(cold=True)
        self._dirty, self.restored = True, True


def _numbers(value: object, length: int) -> list[float]:
    """``value`` as ``length`` finite floats, or ValueError (a state file is untrusted input)."""
    if not isinstance(value, list) or len(value) != length:
        raise ValueError("not a list of the expected length")
    out = [float(e) for e in value if isinstance(e, int | float) and not isinstance(e, bool)]
    if len(out) != length or not all(math.isfinite(e) for e in out):
        raise ValueError("not finite numbers")
    return out
