"""The wall calibration in the daemon: learn wall power from the components while the meter reads, model it while
it does not.

Each tick whose node figure is a fresh platform reading adds one sample (the components' power, the machine's CPU
utilisation, the platform's power) to a :class:`~carbond.calibration.WallFit`. In a tick where the platform sensor
gives no fresh figure (stale, failed, re-baselining), accounting asks :meth:`WallCalibration.predict` for the wall
power that goes with the components' power, so the node stays at the wall and ``other`` keeps its share; the
modelled figure carries the fit's uncertainty. The fit is persisted beside the state file
(``wall-calibration.json``, written atomically at most once a minute) so a restart keeps what was learnt.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from carbond.accounting import Books, TickEnergy
from carbond.calibration import WallFit, WallPrediction
from carbond.logs import get_logger
from carbond.model import CalibrationState
from carbond.procfs import CpuTimes, HostSample

log = get_logger("carbond.wallfit")

FILE_NAME = "wall-calibration.json"
SAVE_EVERY_S = 60.0


class WallCalibration:
    def __init__(self, sensor: str, state_dir: Path | None = None) -> None:
        self.sensor = sensor  # the platform sensor whose readings are learnt and modelled
        self._path = state_dir / FILE_NAME if state_dir is not None else None
        self.fit = self._load()
        self._prev_cpu: CpuTimes | None = None
        self.utilisation = math.nan
        self.last: WallPrediction | None = None  # the prediction used this tick, if any
        self._saved_at = -math.inf
        self.save_errors = 0

    def _load(self) -> WallFit:
        if self._path is None:
            return WallFit()
        try:
            doc = json.loads(self._path.read_bytes())
        except FileNotFoundError:
            return WallFit()
        except (OSError, ValueError) as exc:
            log.warning("wall_calibration_unreadable", path=str(self._path), error=type(exc).__name__)
            return WallFit()
        if not isinstance(doc, dict) or doc.get("sensor") != self.sensor:
            return WallFit()  # learnt against another meter: start again
        fit = WallFit.from_state(doc.get("fit"))
        log.info("wall_calibration_loaded", sensor=self.sensor, samples=fit.n, model=fit.model, restored=fit.restored)
        return fit

    def begin_tick(self, host: HostSample) -> None:
        """The machine's CPU utilisation since the previous tick (NaN when /proc/stat cannot say)."""
        self.last = None
        try:
            cpu = host.cpu
        except ValueError:
            self.utilisation = math.nan
            return
        prev, self._prev_cpu = self._prev_cpu, cpu
        total = cpu.total - prev.total if prev is not None else 0
        self.utilisation = (
            min(max((cpu.busy - prev.busy) / total, 0.0), 1.0) if prev is not None and total > 0 else math.nan
        )

    def predict(self, components_w: float) -> tuple[str, float] | None:
        """For accounting: the modelled wall power that goes with ``components_w``, or None while the fit cannot."""
        util = self.utilisation if not math.isnan(self.utilisation) else 0.0
        p = self.fit.prediction(components_w, util)
        if p is None or not math.isfinite(p.watts) or p.watts <= 0:
            return None
        self.last = p
        return self.sensor, max(p.watts, components_w)

    def observe(self, energy: TickEnergy, books: Books) -> None:
        """Learn from a tick measured at the wall."""
        if energy.platform != self.sensor or energy.modelled or math.isnan(self.utilisation):
            return
        components = platform = 0.0
        for b in books.devices.values():
            if math.isnan(b.power_w):
                continue
            if b.kind == "platform" and b.sensor == self.sensor:
                platform += b.power_w
            elif b.in_node_total and b.kind != "other":
                components += b.power_w
        if components > 0 and platform > 0:
            self.fit.add(components, self.utilisation, platform)

    def uncertainty_j(self, energy: TickEnergy) -> float | None:
        """The standard uncertainty of this tick's modelled wall energy (relative, as the prediction's)."""
        p = self.last
        if not energy.modelled or p is None or p.watts <= 0:
            return None
        return energy.node_j * p.uncertainty_w / p.watts

    def state(self, in_use: bool) -> CalibrationState:
        q = self.fit.quality
        return CalibrationState(
            self.sensor,
            q.model,
            q.samples,
            q.r2,
            q.residual_sd_w,
            q.intercept_w,
            q.per_component,
            q.per_utilisation,
            in_use,
        )

    def save_due(self, now: float) -> bool:
        return self._path is not None and now - self._saved_at >= SAVE_EVERY_S

    def save(self, now: float) -> None:
        """Write the fit atomically (temp file, fsync, rename); a failure is counted and logged once per run."""
        if self._path is None:
            return
        self._saved_at = now
        tmp = self._path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        try:
            data = json.dumps({"sensor": self.sensor, "fit": self.fit.to_state()}, allow_nan=False).encode()
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path)
        except (OSError, ValueError) as exc:
            if not self.save_errors:
                log.warning("wall_calibration_save_failed", path=str(self._path), error=type(exc).__name__)
            self.save_errors += 1
            with contextlib.suppress(OSError):
                tmp.unlink()
