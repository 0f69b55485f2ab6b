"""Accounting is a pure function: the books and one tick's readings in, new books and the tick's energy out."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.accounting import Books, Restored, account, new_devices
from carbond.model import Reading
from carbond.units import emissions_g

steps = st.lists(
    st.tuples(st.floats(0, 500), st.floats(0.01, 30), st.booleans()),  # joules added, seconds, a step back
    min_size=1,
    max_size=30,
)


@given(steps, steps)
def test_node_energy_is_the_sum_of_node_counted_deltas_and_never_negative(
    pkg: list[tuple[float, float, bool]], core: list[tuple[float, float, bool]]
) -> None:
    books, t, jp, jc = Books(), 0.0, 0.0, 0.0
    total_pkg = 0.0
    for (dp, dt, back), (dc, _, _) in zip(pkg, core, strict=False):
        t += dt
        jp = jp * 0.5 if back else jp + dp  # a counter reset the sensor could not see through: no energy
        jc += dc
        readings = (Reading("package-0", "cpu", jp, t), Reading("core-0", "core", jc, t, in_node_total=False))
        before = books
        books, tick = account(books, [("rapl", readings)], 1.2, 56.0)
        assert before.devices is not books.devices  # the input books are left as they were
        assert tick.node_j >= 0
        assert tick.by_kind.get("core", 0.0) == 0.0
        assert tick.node_j == pytest.approx(tick.by_kind.get("cpu", 0.0))
        assert tick.node_g == pytest.approx(emissions_g(tick.node_j, 1.2, 56.0))
        total_pkg += tick.node_j
    assert books.node_energy_j_total == pytest.approx(total_pkg)
    assert books.devices[("rapl", "package-0")].energy_j_total == pytest.approx(total_pkg)


def test_first_sight_restores_totals_and_adds_the_downtime_gap_to_the_node() -> None:
    r = Reading("package-0", "cpu", 5.0, 10.0, raw_j=105.0, range_j=1000.0)
    assert new_devices(Books(), [("rapl", (r,))]) == [(("rapl", "package-0"), r)]
    books, tick = account(Books(), [("rapl", (r,))], 1.0, None, {("rapl", "package-0"): Restored(400.0, 2.0, 50.0)})
    book = books.devices[("rapl", "package-0")]
    assert (book.energy_j_total, book.emissions_g_total) == (450.0, 2.0)  # no intensity yet: no emissions
    assert tick.node_j == 50.0
    assert tick.node_g == 0.0
    assert math.isnan(book.power_w)
    books, tick = account(books, [("rapl", (Reading("package-0", "cpu", 45.0, 11.0),))], 1.0, 100.0)
    assert books.devices[("rapl", "package-0")].power_w == 40.0
    assert tick.by_kind == {"cpu": 40.0}
    assert books.node_energy_j_total == 90.0
    assert new_devices(books, [("rapl", (r,))]) == []


def test_a_gpu_is_split_by_device_and_a_baseline_adds_nothing() -> None:
    books, _ = account(Books(), [("nvml", (Reading("gpu-0", "gpu", 0.0, 0.0),))], 1.0, 10.0)
    books, tick = account(books, [("nvml", (Reading("gpu-0", "gpu", 300.0, 1.0),))], 1.0, 10.0)
    assert tick.by_gpu == {"gpu-0": 300.0}
    assert tick.by_kind == {}
    books, tick = account(books, [("nvml", (Reading("gpu-0", "gpu", 900.0, 2.0, baseline=True),))], 1.0, 10.0)
    assert tick.node_j == 0.0
    assert books.devices[("nvml", "gpu-0")].energy_j_total == 300.0
