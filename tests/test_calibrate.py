"""Calibration on real gloo ranks: a fitted DeviceSpec that plans use."""
from __future__ import annotations

import math

import pytest
import torch

import autotp
from autotp.runtime.calibrate import (_COEF, DEFAULT_SIZES, Measurement, calibrate, fit_link, fit_ring)
from autotp.cost.model import all_gather_time, all_reduce_time, reduce_scatter_time
from autotp.cost.devices import DeviceSpec
from dist_utils import run_ranks
from models import MLP


def _cal(rank: int, world: int) -> str:
    spec, points = calibrate(sizes=(16 * 1024, 256 * 1024, 4 * 2 ** 20), repeats=3)
    assert len(points) == 9 and all(p.seconds > 0 and len(p.samples) == 3 for p in points)
    # the point's time is a quantile of its rounds
    assert all(min(p.samples) <= p.seconds <= max(p.samples) for p in points)
    return spec.to_json()


def _synthetic(kind: str, n: int, alpha: float, beta: float, knee: float = math.inf,
               beta_above: float = 0.0, noise: float = 0.0) -> list[Measurement]:
    """Exact model times at the calibration sizes, with a deterministic +-noise wobble."""
    out = []
    for i, b in enumerate(DEFAULT_SIZES):
        t = alpha + _COEF[kind](n) * b / (beta if b < knee else beta_above)
        out.append(Measurement(kind, b, t * (1 + noise * (-1) ** i)))
    return out


@pytest.mark.parametrize("kind,n", [("all_reduce", 2), ("all_gather", 4), ("reduce_scatter", 8)])
def test_fit_recovers_the_ring_model(kind: str, n: int) -> None:
    pts = _synthetic(kind, n, 300e-6, 1.5e9)
    for alpha, beta in (fit_ring(pts, n), fit_link(pts, n)):  # one regime: no knee invented
        assert alpha == pytest.approx(300e-6, rel=1e-6) and beta == pytest.approx(1.5e9, rel=1e-6)
    assert len(fit_link(_synthetic(kind, n, 300e-6, 1.5e9, noise=0.03), n)) == 2  # noise is no knee


@pytest.mark.parametrize("knee", [32 * 2 ** 20, 64 * 2 ** 20, 1 * 2 ** 20])
def test_fit_recovers_two_regimes(knee: int) -> None:
    pts = _synthetic("all_gather", 2, 400e-6, 0.8e9, knee, 0.15e9)
    alpha, beta, k, beta_above = fit_link(pts, 2)
    assert k == knee
    assert alpha == pytest.approx(400e-6, rel=1e-6) and beta == pytest.approx(0.8e9, rel=1e-6)
    assert beta_above == pytest.approx(0.15e9, rel=1e-6)
    # a single line cannot follow it: that is what the knee is for
    a1, b1 = fit_ring(pts, 2)
    worst = max(abs(a1 + 0.5 * p.nbytes / b1 - p.seconds) / p.seconds for p in pts)
    assert worst > 0.3


def test_two_regime_link_in_the_cost_model() -> None:
    spec = DeviceSpec("x", {"float32": 1e9}, 1e9, 1e9, 1e9, 1e-3,
                      collectives={"all_gather": (1e-4, 2e9, 32 * 2 ** 20, 0.5e9),
                                   "all_reduce": (2e-4, 1e9)})
    spec = DeviceSpec.from_json(spec.to_json())  # the fields survive JSON (as lists)
    small, big = 16 * 2 ** 20, 32 * 2 ** 20
    assert all_gather_time(small, 2, spec) == pytest.approx(1e-4 + 0.5 * small / 2e9)
    assert all_gather_time(big, 2, spec) == pytest.approx(1e-4 + 0.5 * big / 0.5e9)
    assert spec.link("all_gather") == (1e-4, 2e9)
    assert all_reduce_time(big, 4, spec) == pytest.approx(2e-4 + 1.5 * big / 1e9)
    # a kind without a fit falls back to the spec's latency and link bandwidth
    assert reduce_scatter_time(big, 2, spec) == pytest.approx(1e-3 + 0.5 * big / 1e9)


def test_calibrate_fits_and_plans_with_the_result(tmp_path) -> None:
    spec = DeviceSpec.from_json(run_ranks(_cal, 2)[0])
    assert spec.latency > 0 and spec.link_bandwidth > 0
    assert set(spec.collectives) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert float(spec.extra["fit_error_median"]) >= 0 and spec.flops["float32"] > 0
    # the per-kind fit is what the cost model uses
    alpha, beta = spec.link("all_gather")
    assert all_gather_time(1e6, 2, spec) == alpha + 0.5 * 1e6 / beta
    assert all_reduce_time(1e6, 2, spec) == spec.link("all_reduce")[0] + 1e6 / spec.link("all_reduce")[1]
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    p = autotp.plan(MLP(), (torch.randn(2, 3, 16),), world_size=2, device=str(path))
    assert p.device == spec.name
