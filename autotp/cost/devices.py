"""Device specifications: the numbers the cost model reads.

Units: FLOP/s, bytes, bytes/s, seconds. Link bandwidth is per direction, per device, as
nccl-tests' "bus bandwidth" (so the ring formulas in cost/model.py apply directly).

Sources for the presets (dense, no sparsity):
- H100 SXM: NVIDIA H100 datasheet: 989 TFLOP/s BF16/FP16, 67 TFLOP/s FP32 (non-tensor) and
  494 TFLOP/s TF32, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s total (450 GB/s per direction).
- H200 SXM: NVIDIA H200 datasheet: same compute as H100, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
- A100 SXM 80GB / 40GB: NVIDIA A100 datasheet: 312 TFLOP/s BF16, 19.5 FP32 (156 TF32),
  2.04 / 1.56 TB/s, NVLink 600 GB/s total (300 GB/s per direction).
- cpu-gloo: this project's CI machine (2 cores) measured with gloo at 2 ranks: ~0.25 ms
  latency and ~1 GB/s all-reduce bus bandwidth (see docs/cost_model.md).
Collective latency for NVLink presets: ~10 µs, the small-message floor nccl-tests reports.
Across nodes (data parallelism on a 2-D mesh): one InfiniBand NIC per GPU as in NVIDIA's DGX
reference designs: ConnectX-7 NDR 400 Gb/s = 50 GB/s per direction for H100/H200 nodes,
ConnectX-6 HDR 200 Gb/s = 25 GB/s for A100 nodes; ~20 µs latency.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from autotp.errors import AutoTPError


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    flops: dict[str, float]  # peak FLOP/s per dtype name ("float32", "bfloat16", "float16")
    memory_bytes: float  # capacity per device
    memory_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s per direction inside a node
    latency: float  # seconds per collective
    inter_link_bandwidth: float = 0.0  # across nodes (for 2-D meshes); 0 = unknown
    inter_latency: float = 0.0
    # measured per-collective link models overriding the two above; calibrate fills it,
    # because e.g. gloo's reduce_scatter is not a ring and runs slower. Each entry is
    # (latency s, bandwidth B/s) or (latency s, bandwidth B/s, knee bytes, bandwidth B/s from
    # the knee on): a tensor of at least ``knee`` bytes moves at the second bandwidth (see
    # ``link_model`` and docs/cost_model.md)
    collectives: dict[str, tuple[float, ...]] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    # elementwise and normalization ops fused into their producers (torch.compile, fused GPU
    # kernels): they cost nothing. False: each runs as its own pass over memory (eager CPU),
    # priced at memory_bandwidth (cost/model.py compute_time)
    fused_elementwise: bool = True

    def link(self, kind: str) -> tuple[float, float]:
        """(latency, bandwidth) of one collective kind (below its knee, if it has one)."""
        a, b, _, _ = self.link_model(kind)
        return a, b

    def link_model(self, kind: str) -> tuple[float, float, float, float]:
        """(latency, bandwidth, knee bytes, bandwidth from the knee on) of one collective kind;
        a single-regime link has an infinite knee."""
        v = tuple(self.collectives.get(kind, (self.latency, self.link_bandwidth)))
        if len(v) == 2:
            return float(v[0]), float(v[1]), float("inf"), float(v[1])
        a, b, knee, b2 = v
        return float(a), float(b), float(knee), float(b2)

    def peak_flops(self, dtype: torch.dtype) -> float:
        name = str(dtype).removeprefix("torch.")
        return self.flops.get(name, self.flops.get("float32", min(self.flops.values())))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "DeviceSpec":
        d = json.loads(text)
        return DeviceSpec(**d)


GB = 1e9
PRESETS: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
                       80 * GB, 3.35e12, 450 * GB, 10e-6, 50 * GB, 20e-6),
    "h200": DeviceSpec("h200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
                       141 * GB, 4.8e12, 450 * GB, 10e-6, 50 * GB, 20e-6),
    "a100-80gb": DeviceSpec("a100-80gb", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
                            80 * GB, 2.04e12, 300 * GB, 10e-6, 25 * GB, 20e-6),
    "a100-40gb": DeviceSpec("a100-40gb", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
                            40 * GB, 1.56e12, 300 * GB, 10e-6, 25 * GB, 20e-6),
    "cpu-gloo": DeviceSpec("cpu-gloo", {"float32": 30e9, "bfloat16": 10e9, "float16": 5e9},
                           16 * GB, 10 * GB, 1 * GB, 250e-6, fused_elementwise=False),
}


def get_device(device: "str | DeviceSpec | None", backend: str | None = None) -> DeviceSpec:
    """Resolve a preset name, a JSON spec file path or a DeviceSpec. ``None`` picks from the
    process group's backend: a CUDA device name matched to a preset, else ``cpu-gloo``."""
    if isinstance(device, DeviceSpec):
        return device
    if device is None:
        if backend == "nccl" and torch.cuda.is_available():
            gpu = torch.cuda.get_device_name().lower()
            for key in ("h200", "h100"):
                if key in gpu:
                    return PRESETS[key]
            if "a100" in gpu:
                return PRESETS["a100-80gb" if torch.cuda.get_device_properties(0).total_memory > 50e9
                               else "a100-40gb"]
            return PRESETS["h100"]
        return PRESETS["cpu-gloo"]
    key = device.lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(device)
    if path.suffix == ".json" and path.exists():
        return DeviceSpec.from_json(path.read_text())
    raise AutoTPError(f"unknown device {device!r}: use one of {sorted(PRESETS)}, a DeviceSpec, "
                      f"or a path to a JSON spec file")
