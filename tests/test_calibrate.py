"""Calibration on real gloo ranks: a fitted DeviceSpec that plans use."""
from __future__ import annotations

import torch

import autotp
from autotp.calibrate import calibrate
from autotp.cost import all_gather_time, all_reduce_time
from autotp.devices import DeviceSpec
from dist_utils import run_ranks
from models import MLP


def _cal(rank: int, world: int) -> str:
    spec, points = calibrate(sizes=(16 * 1024, 256 * 1024, 4 * 2 ** 20), repeats=3)
    assert len(points) == 9 and all(p.seconds > 0 for p in points)
    return spec.to_json()


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
