"""`torch.save` files read without torch: every dtype and view against what torch held
(tests/data/torch_goldens/cases.pth and reference.npz), and the refusals that keep the unpickler
from running code or reading outside a storage."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
from make_torch_goldens import OUT, reference

from genclip_jax import torch_pickle

# name in cases.pth -> (numpy dtype, shape) that torch_pickle must return.
CASES = {
    "float32": (np.float32, (2, 3)),
    "float64": (np.float64, (3,)),
    "float16": (np.float16, (2, 2)),
    "bfloat16": (ml_dtypes.bfloat16, (3, 2)),
    "int64": (np.int64, (3,)),
    "int32": (np.int32, (2, 2)),
    "int16": (np.int16, (2,)),
    "int8": (np.int8, (2,)),
    "uint8": (np.uint8, (3,)),
    "bool": (np.bool_, (3,)),
    "complex64": (np.complex64, (2,)),
    "uint16": (np.uint16, (2,)),
    "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, (3,)),
    "transposed": (np.float32, (6, 4)),
    "sliced": (np.float32, (2, 3)),
    "row": (np.float32, (6,)),
    "expanded": (np.float32, (3, 4)),
    "scalar": (np.float32, ()),
    "empty": (np.float32, (0, 3)),
    "parameter": (np.float32, (2,)),
}


@pytest.fixture(scope="module")
def cases():
    return torch_pickle.load(OUT / "cases.pth")


@pytest.mark.parametrize("name", list(CASES))
def test_dtypes_and_views_are_what_torch_held(cases, name):
    got = cases["tensors"][name]
    dtype, shape = CASES[name]
    assert isinstance(got, np.ndarray) and got.dtype == np.dtype(dtype) and got.shape == shape
    want = reference()[f"cases.{name}"]  # bfloat16 / float8 stored as their float32 values
    np.testing.assert_array_equal(got.astype(want.dtype), want)


def test_views_follow_strides_and_offsets(cases):
    base = reference()["cases.base"]  # (4, 6) = 0, 0.5, 1, ...
    tensors = cases["tensors"]
    np.testing.assert_array_equal(tensors["transposed"], base.T)
    np.testing.assert_array_equal(tensors["sliced"], base[1:3, 2:5])
    np.testing.assert_array_equal(tensors["row"], base[2])
    np.testing.assert_array_equal(tensors["expanded"], [[0.0] * 4, [1.0] * 4, [2.0] * 4])
    assert tensors["transposed"][1, 0] == 0.5 and tensors["sliced"][0, 0] == 4.0


def test_containers_numbers_and_shared_storage(cases):
    assert cases["meta"] == {"epoch": 3, "lr": 0.5, "name": "tiny", "flags": [True, None],
                             "pair": (1, 2)}
    tensors = cases["tensors"]
    assert type(tensors) is collections.OrderedDict and list(tensors) == list(CASES)
    assert tensors._metadata == {"": {"version": 1}}  # a state_dict()'s attribute survives
    base, row1 = cases["shared"]
    np.testing.assert_array_equal(base, reference()["cases.base"])
    np.testing.assert_array_equal(row1, base[1])
    # One storage in the file, one buffer here: contiguous views share it, as in torch.
    assert np.shares_memory(base, row1) and np.shares_memory(base, tensors["row"])
    assert not np.shares_memory(base, tensors["transposed"])  # strided views are copies


def test_big_endian_files():
    got = torch_pickle.load(OUT / "big_endian.pth")
    for name in ("float32", "int16"):
        want = reference()[f"big_endian.{name}"]
        assert got[name].dtype == want.dtype and got[name].dtype.isnative
        np.testing.assert_array_equal(got[name], want)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_torch_zip(path, data_pkl: bytes, storages: dict[str, bytes] | None = None):
    """The layout of a torch.save file: archive/data.pkl plus archive/data/<key>."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def test_refuses_a_pickle_that_runs_a_command(tmp_path):
    marker = tmp_path / "ran"
    path = _write_torch_zip(tmp_path / "evil.pth",
                            pickle.dumps({"weight": _RunsACommand(marker)}, protocol=2))
    with pytest.raises(ValueError) as info:
        torch_pickle.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused the global '{os.system.__module__}.system'")
    assert "tensors, dicts, lists, tuples, strings and numbers" in message
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    ("builtins", "eval"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch", "QInt8Storage"),
    ("torch", "Size"),
    ("numpy.core.multiarray", "scalar"),
])
def test_refuses_every_other_global(tmp_path, module, name):
    path = _write_torch_zip(tmp_path / "x.pth", f"c{module}\n{name}\n.".encode())
    with pytest.raises(ValueError, match=rf"x\.pth: refused the global '{module}\.{name}'"):
        torch_pickle.load(path)


def _tensor_pickle(size, stride, offset=0, numel=4) -> bytes:
    """One `_rebuild_tensor_v2` float32 tensor over storage "0", written as opcodes."""
    ints = lambda values: b"(" + b"".join(b"I%d\n" % v for v in values) + b"t"
    return (b"ctorch._utils\n_rebuild_tensor_v2\n("
            b"(Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI%d\ntQ" % numel
            + b"I%d\n" % offset + ints(size) + ints(stride)
            + b"I00\nccollections\nOrderedDict\n)RtR.")


def test_hand_written_view_reads(tmp_path):
    storage = np.arange(4, dtype="<f4").tobytes()
    path = _write_torch_zip(tmp_path / "ok.pth", _tensor_pickle((2,), (2,), offset=1),
                            {"0": storage})
    np.testing.assert_array_equal(torch_pickle.load(path), [1.0, 3.0])


@pytest.mark.parametrize("size, stride, offset, numel, match", [
    ((3,), (2,), 0, 4, r"reaches element 4, past the storage's 4"),
    ((2,), (1,), 3, 4, r"reaches element 4, past the storage's 4"),
    ((2,), (-1,), 1, 4, r"invalid tensor view"),
    ((2, 2), (1,), 0, 4, r"invalid tensor view"),
    ((2,), (1,), 0, 5, r"archive/data/0: expected 20 bytes \(5 x float32\), the record holds 16"),
])
def test_views_outside_their_storage_are_refused(tmp_path, size, stride, offset, numel, match):
    path = _write_torch_zip(tmp_path / "bad.pth", _tensor_pickle(size, stride, offset, numel),
                            {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(ValueError, match=rf"bad\.pth: .*{match}"):
        torch_pickle.load(path)


def test_missing_storage_record(tmp_path):
    path = _write_torch_zip(tmp_path / "bad.pth", _tensor_pickle((2,), (1,)))
    with pytest.raises(ValueError, match=r"bad\.pth: the storage record archive/data/0 is missing"):
        torch_pickle.load(path)


def test_not_a_torch_save_file(tmp_path):
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"legacy\.pt: not a torch\.save zip archive"):
        torch_pickle.load(tmp_path / "legacy.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match=r"other\.zip: expected one '<name>/data\.pkl'"):
        torch_pickle.load(tmp_path / "other.zip")
    jit = OUT / "openai_tiny_jit.pt"
    assert torch_pickle.is_torchscript(jit) and not torch_pickle.is_torchscript(OUT / "cases.pth")
    with pytest.raises(ValueError, match=r"openai_tiny_jit\.pt: a TorchScript archive.*torch\.jit"):
        torch_pickle.load(jit)
