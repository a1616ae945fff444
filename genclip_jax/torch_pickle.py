"""Reads `torch.save` files (`.pth`, `.pt`, `pytorch_model.bin`) without torch, as numpy.

A `torch.save` file is a zip holding `<prefix>/data.pkl` (a pickle) and one raw buffer per
storage, `<prefix>/data/<key>` (in the byte order of `<prefix>/byteorder`, little by default).
The pickle may name any Python callable, so it is read by an unpickler that resolves only the
few globals a file of tensors needs (the tensor and parameter rebuild functions, the storage
types, `collections.OrderedDict` and the dtypes of `_rebuild_tensor_v3`); anything else is
refused before it is called. Tensors come back as `np.ndarray` (bfloat16 / float8 as `ml_dtypes`
types); contiguous tensors of one storage share its memory, as in torch.
TorchScript archives (`code/`, `constants.pkl`) hold programs, not just tensors: they need torch.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# Legacy typed storages (`torch.FloatStorage`, ...): the dtype of `_rebuild_tensor_v2` tensors.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
# Dtypes without a legacy storage class: an `UntypedStorage` of bytes plus `torch.<dtype>`.
_V3_DTYPES = {
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}
_CONTENTS = "tensors, dicts, lists, tuples, strings and numbers"


def is_torchscript(path: str | os.PathLike) -> bool:
    """TorchScript archives are zips with `constants.pkl` or `code/` (torch.save ones have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


class _Kind:
    """What a storage type (`torch.FloatStorage`) or a v3 dtype (`torch.uint16`) resolves to."""

    def __init__(self, dtype: type):
        self.dtype = np.dtype(dtype)

    def __setstate__(self, state):  # BUILD on our objects: never from a genuine file
        raise pickle.UnpicklingError("a pickle that modifies a storage type")


class _Storage:
    """One `data/<key>` buffer, read on first use, as a flat array of its dtype."""

    def __init__(self, archive: zipfile.ZipFile, record: str, dtype: np.dtype, numel: int,
                 big_endian: bool):
        self.archive, self.record, self.dtype = archive, record, dtype
        self.numel, self.big_endian = numel, big_endian
        self._array: np.ndarray | None = None

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a pickle that modifies a storage")

    def array(self) -> np.ndarray:
        if self._array is None:
            info = self.archive.getinfo(self.record)
            expected = self.numel * self.dtype.itemsize
            if info.file_size != expected:
                raise ValueError(f"{self.record}: expected {expected} bytes "
                                 f"({self.numel} x {self.dtype}), the record holds "
                                 f"{info.file_size}")
            buffer = bytearray(expected)  # writable, unlike bytes
            with self.archive.open(info) as f:
                if f.readinto(buffer) != expected:
                    raise ValueError(f"{self.record}: shorter than its {expected} bytes")
            if self.big_endian:
                self._array = np.frombuffer(buffer, self.dtype.newbyteorder(">")).astype(
                    self.dtype)
            else:
                self._array = np.frombuffer(buffer, self.dtype)
        return self._array


def _tensor(storage: Any, offset: int, size: tuple, stride: tuple,
            dtype: np.dtype | None = None) -> np.ndarray:
    """`storage[offset:]` viewed with `size` and `stride` (in elements), bounds checked.

    Contiguous tensors are views of the storage (tensors sharing it share memory, as in torch);
    strided ones are copied. `dtype` reinterprets a byte storage (`_rebuild_tensor_v3`).
    """
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    flat = storage.array()
    if dtype is not None:
        if flat.size % dtype.itemsize:
            raise ValueError(f"{storage.record}: {flat.size} bytes are not a whole number of "
                             f"{dtype} elements")
        flat = flat.view(dtype)
    offset, size, stride = int(offset), tuple(map(int, size)), tuple(map(int, stride))
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise ValueError(f"{storage.record}: invalid tensor view (offset {offset}, size {size}, "
                         f"stride {stride})")
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise ValueError(f"{storage.record}: a tensor of size {size}, stride {stride} at offset "
                         f"{offset} reaches element {last}, past the storage's {flat.size}")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], size, tuple(s * flat.itemsize for s in stride), writeable=False)
    if view.flags.c_contiguous:
        return flat[offset:offset + view.size].reshape(size)
    return view.copy()


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of a tensor file; storages come from the zip."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.records = set(archive.namelist())
        byteorder = f"{prefix}/byteorder"  # absent in files of torch < 2.1: little-endian
        self.big_endian = (byteorder in self.records
                           and archive.read(byteorder).decode().strip() == "big")
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in _REBUILD:
            return _REBUILD[name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Kind(_STORAGE_DTYPES[name])
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _Kind(np.uint8)
        if module == "torch" and name in _V3_DTYPES:
            return _Kind(_V3_DTYPES[name])
        raise pickle.UnpicklingError(
            f"refused the global '{module}.{name}': a torch.save file read without torch may "
            f"hold only {_CONTENTS}; save the tensors alone (e.g. a state dict) with torch.save, "
            "or as safetensors"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _Kind)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid  # location ("cpu", "cuda:0"): read to host anyway
        key = str(key)
        if key not in self.storages:
            record = f"{self.prefix}/data/{key}"
            if record not in self.records:
                raise pickle.UnpicklingError(f"the storage record {record} is missing")
            self.storages[key] = _Storage(self.archive, record, kind.dtype, int(numel),
                                          self.big_endian)
        if self.storages[key].dtype != kind.dtype:
            raise pickle.UnpicklingError(f"storage {key} is read as two dtypes")
        return self.storages[key]


def _no_extras(extra: Any) -> None:
    if extra:
        raise pickle.UnpicklingError(f"a tensor with extra state {extra!r}; only plain tensors "
                                     "are read")


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    _no_extras(metadata)
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
    _no_extras(metadata)
    if not isinstance(dtype, _Kind):
        raise pickle.UnpicklingError(f"a tensor dtype {dtype!r}")
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter_with_state(data, requires_grad, hooks, state):
    _no_extras(state)
    return data


# torch._utils' rebuild functions, by name: same arguments, numpy arrays out.
_REBUILD = {
    "_rebuild_tensor": _tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": lambda data, requires_grad, hooks: data,
    "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
}


def load(path: str | os.PathLike) -> Any:
    """What `torch.load(path, weights_only=True)` returns, with numpy arrays for tensors.

    Raises:
      ValueError: not a torch.save zip (TorchScript, the pre-1.6 format, another file), or a
        pickle naming anything but tensors and plain containers (the refused global is named).
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a torch.save zip archive (the pre-1.6 format and other files are not "
            "read without torch; re-save it with a current torch.save, or as safetensors)"
        )
    if is_torchscript(path):
        raise ValueError(f"{path}: a TorchScript archive, not a torch.save file: it needs "
                         "torch.jit.load (pip install torch)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one '<name>/data.pkl' in the zip (a torch.save "
                             f"file), found {pickles or 'none'}")
        prefix = pickles[0].split("/")[0]
        with archive.open(pickles[0]) as file:
            try:
                return _Unpickler(file, archive, prefix).load()
            except (pickle.UnpicklingError, ValueError, EOFError) as err:
                raise ValueError(f"{path}: {err}") from None
