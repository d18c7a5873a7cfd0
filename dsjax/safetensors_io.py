"""Reading and writing safetensors files one tensor, or one window of a tensor, at a time.

Reading parses the headers once; `read(name, window)` then reads only the bytes of that
window of the tensor (a 671B checkpoint never needs twice its size in host memory, and a
device loading its shard reads only the shard). A safetensors tensor is stored row-major,
so a window is a set of contiguous byte runs: one run when it takes whole rows (a split of
the leading axis), one run per row otherwise (a split of the columns); runs that touch are
read as one. numpy has no float8 or bfloat16 dtypes of its own; ml_dtypes provides them.
Writing goes through the `safetensors` package.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_range(f, offset: int, length: int) -> bytes:
    """`length` bytes of the open file `f` from `offset`: every read of a tensor goes
    through here."""
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise OSError(f"{f.name}: {length} bytes at offset {offset} asked, {len(data)} read")
    return data


def _runs(shape: tuple[int, ...], window: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """(element offset, element count) of the contiguous runs of a row-major tensor that
    hold `window` ((start, stop) per axis), in order."""
    # Axes after the last one the window cuts are taken whole: each run spans them.
    cut = max((i for i, (a, b) in enumerate(window) if (a, b) != (0, shape[i])), default=0)
    run = (window[cut][1] - window[cut][0]) if shape else 1
    for d in shape[cut + 1:]:
        run *= d
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    starts = [0]
    for i in range(cut):
        starts = [s + j * strides[i] for s in starts for j in range(*window[i])]
    first = window[cut][0] * strides[cut] if shape else 0
    runs: list[tuple[int, int]] = []
    for s in starts:
        if runs and runs[-1][0] + runs[-1][1] == s + first:
            runs[-1] = (runs[-1][0], runs[-1][1] + run)
        else:
            runs.append((s + first, run))
    return runs


class SafetensorsReader:
    """All tensors of one or many .safetensors files in a directory, read on demand.

    `names()` lists them; `shape(name)`, `dtype(name)`; `read(name, window)` returns a
    numpy array of the window (all of the tensor by default) and reads nothing else.
    """

    def __init__(self, directory: str):
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {directory}")
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for fname in files:
            path = os.path.join(directory, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is named in model.safetensors.index.json but missing")
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            size = os.path.getsize(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"tensor {name} in {fname} has unsupported dtype {info['dtype']}")
                if 8 + n + info["data_offsets"][1] > size:
                    raise ValueError(f"tensor {name} ends past the end of {path} ({size} bytes): a truncated file?")
                self._entries[name] = (path, info, 8 + n)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._entries[name][1]["dtype"]])

    def read(self, name: str, window: tuple[slice, ...] = ()) -> np.ndarray:
        """tensor[window] (slices of step 1, one per leading axis; missing ones take the
        whole axis), reading only its bytes."""
        path, info, offset = self._entries[name]
        shape = tuple(info["shape"])
        window = tuple(window) + (slice(None),) * (len(shape) - len(window))
        bounds = []
        for s, d in zip(window, shape):
            start, stop, step = s.indices(d)
            if step != 1:
                raise ValueError(f"read({name!r}): window steps must be 1, got {s}")
            bounds.append((start, max(start, stop)))
        out_shape = tuple(b - a for a, b in bounds)
        dtype = self.dtype(name)
        if 0 in out_shape:
            return np.zeros(out_shape, dtype)
        start = offset + info["data_offsets"][0]
        with open(path, "rb") as f:
            data = b"".join(_read_range(f, start + first * dtype.itemsize, count * dtype.itemsize)
                            for first, count in _runs(shape, tuple(bounds)))
        return np.frombuffer(bytearray(data), dtype).reshape(out_shape)


def write_sharded(tensors, directory: str, max_shard_bytes: int = 5 * 2**30, metadata=None) -> list[str]:
    """Writes (name, numpy array) pairs from an iterator into shards of at most
    `max_shard_bytes`, plus `model.safetensors.index.json` when there is more than one.

    Only one shard is held in memory at a time. Returns the file names written.
    """
    os.makedirs(directory, exist_ok=True)
    current: dict[str, np.ndarray] = {}
    size = 0
    tmp_names: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush():
        nonlocal current, size
        if current:
            tmp = f"shard-{len(tmp_names):05d}.tmp"
            save_file(current, os.path.join(directory, tmp), metadata=metadata or {"format": "pt"})
            tmp_names.append(tmp)
            for k in current:
                weight_map[k] = tmp
            current, size = {}, 0

    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if size and size + arr.nbytes > max_shard_bytes:
            flush()
        current[name] = arr
        size += arr.nbytes
        total += arr.nbytes
    flush()
    n = len(tmp_names)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    rename = dict(zip(tmp_names, final))
    umask = os.umask(0)
    os.umask(umask)
    for tmp, fin in rename.items():
        os.replace(os.path.join(directory, tmp), os.path.join(directory, fin))
        # safetensors writes owner-only files; a checkpoint folder is meant to be shared.
        os.chmod(os.path.join(directory, fin), 0o666 & ~umask)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: rename[v] for k, v in weight_map.items()}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return final
