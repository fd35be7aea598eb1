"""Weights from outside the model: a full state dict, a ``.safetensors`` file, or a Hugging
Face-style folder (``model.safetensors`` or ``model.safetensors.index.json`` + shards).

``parallelize(model_on_meta, ..., weights=...)`` asks a ``WeightSource`` for *this rank's
slice* of each parameter. A safetensors source reads exactly those bytes with ``os.preadv``
into the destination tensor: a row slice is one read, a column slice one read per row. It
does not memory-map the file: mapped pages a read touches count in the process's resident
memory, and a column slice touches every page of the tensor, so a mapped reader would look
(and, under memory pressure, behave) like it had loaded the whole tensor.

The safetensors format (https://huggingface.co/docs/safetensors): 8 bytes little-endian
header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, ...}``
(offsets relative to the end of the header), then the raw little-endian tensor bytes.
``write_safetensors`` writes the same format tensor by tensor (see runtime/checkpoint.py).
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from autotp.errors import AutoTPError
from autotp.core.placements import Placement, Replicate, Shard, shard_ranges, shard_tensor

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}


@contextmanager
def empty_weights() -> Iterator[None]:
    """Build a model without allocating its parameters: inside this block every parameter a
    module registers is moved to the meta device, while buffers (rotary frequencies, masks)
    are built for real. Non-persistent buffers are not in checkpoints, so a model built
    wholly under ``torch.device("meta")`` cannot get them back; this keeps them.

        with autotp.empty_weights():
            model = LlamaForCausalLM(config)
        tp = autotp.parallelize(model, (ids,), weights="path/to/checkpoint")

    The parameter's CPU storage is allocated by its constructor (``torch.empty``, untouched
    pages cost no memory) and dropped at registration; initialization then runs on meta.
    """
    def to_meta(_module: nn.Module, _name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.device.type == "meta":
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


class WeightSource:
    """Named full tensors, read a slice at a time."""

    def keys(self) -> Sequence[str]:
        raise NotImplementedError

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        raise NotImplementedError

    def read(self, key: str, p: Placement, rank: int, world_size: int) -> torch.Tensor:
        """This rank's piece of tensor ``key`` under placement ``p``, in the stored dtype."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class StateDictSource(WeightSource):
    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def keys(self) -> Sequence[str]:
        return list(self.state)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.state[key]
        return tuple(t.shape), t.dtype

    def read(self, key: str, p: Placement, rank: int, world_size: int) -> torch.Tensor:
        return shard_tensor(self.state[key].detach(), p, rank, world_size).clone()

    def describe(self) -> str:
        return f"the state dict passed as weights ({len(self.state)} entries)"


class SafetensorsSource(WeightSource):
    def __init__(self, files: Sequence[Path], where: str):
        self.where = where
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for key, e in header.items():
                if key == "__metadata__":
                    continue
                if e["dtype"] not in DTYPES:
                    raise AutoTPError(f"{f}: tensor {key!r} has dtype {e['dtype']}, which autotp "
                                      f"cannot read (known: {', '.join(DTYPES)})")
                self.entries[key] = (Path(f), DTYPES[e["dtype"]], tuple(e["shape"]),
                                     8 + n + e["data_offsets"][0])

    def keys(self) -> Sequence[str]:
        return list(self.entries)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        _, dtype, shape, _ = self.entries[key]
        return shape, dtype

    def read(self, key: str, p: Placement, rank: int, world_size: int) -> torch.Tensor:
        path, dtype, shape, start = self.entries[key]
        if not shape:
            p = Replicate()
        dim = p.dim % len(shape) if isinstance(p, Shard) else 0
        ranges = shard_ranges(p, shape[dim] if shape else 1, rank, world_size)
        local_len = sum(b - a for a, b in ranges)
        local_shape = shape[:dim] + (local_len,) + shape[dim + 1:] if shape else ()
        out = torch.empty(local_shape, dtype=dtype)
        if out.numel() == 0:
            return out
        item = out.element_size()
        inner = item
        for s in shape[dim + 1:]:
            inner *= s
        outer = 1
        for s in shape[:dim]:
            outer *= s
        size = shape[dim] if shape else 1
        dest = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        fd = os.open(path, os.O_RDONLY)
        try:
            w = 0
            for o in range(outer):
                for a, b in ranges:
                    n = (b - a) * inner
                    _pread_exact(fd, dest[w:w + n], start + (o * size + a) * inner)
                    w += n
        finally:
            os.close(fd)
        return out

    def describe(self) -> str:
        return self.where


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        got = os.preadv(fd, [buf], offset)
        if got <= 0:
            raise AutoTPError(f"unexpected end of file reading {len(buf)} bytes at offset {offset}")
        buf, offset = buf[got:], offset + got


def open_weights(weights: Any) -> WeightSource:
    """A state dict, a ``.safetensors`` file, or a folder with ``model.safetensors`` or
    ``model.safetensors.index.json`` (Hugging Face's sharded layout)."""
    if isinstance(weights, WeightSource):
        return weights
    if isinstance(weights, Mapping):
        return StateDictSource(weights)
    if not isinstance(weights, (str, os.PathLike)):
        raise AutoTPError(f"weights must be a state dict or a path, got {type(weights).__name__}")
    path = Path(weights)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        return SafetensorsSource([path], str(path))
    if path.is_dir():
        for index in sorted(path.glob("*.safetensors.index.json")):
            return _from_index(index)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return SafetensorsSource(files, str(path))
        raise AutoTPError(f"{path} holds no .safetensors files (PyTorch .bin checkpoints: load "
                          f"them with torch.load and pass the state dict as weights)")
    raise AutoTPError(f"weights path {path} does not exist")


def _from_index(index: Path) -> SafetensorsSource:
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (KeyError, ValueError) as e:
        raise AutoTPError(f"{index} is not a safetensors index (no weight_map): {e}") from None
    return SafetensorsSource([index.parent / f for f in files], str(index.parent))


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def write_safetensors(path: str | os.PathLike, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                      tensors: Iterator[torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``entries`` (name, shape, dtype) to ``path``, taking the data tensor by tensor
    from ``tensors`` (in the same order), so only one tensor need exist at a time."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, shape, dtype in entries:
        n = nbytes(shape, dtype)
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape, dtype), t in zip(entries, tensors):
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AutoTPError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
