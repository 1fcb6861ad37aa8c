"""Tests for the .cllm model file: round trip, zero-copy loading, atomic writes, refusals."""

import mmap
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest

from cllmd.modelfile import (
    ALIGNMENT,
    FORMAT_VERSION,
    MAGIC,
    PREAMBLE_SIZE,
    ModelFileError,
    read_model_file,
    write_model_file,
)


def _sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "wte": rng.standard_normal((7, 5)).astype(np.float32),
        "wpe": rng.standard_normal((3, 5)),  # float64
        "h.0.ln_1.weight": rng.standard_normal(5).astype(np.float16),
        "ids": rng.integers(-2**31, 2**31 - 1, size=(2, 3, 4), dtype=np.int32),
        "big": rng.integers(-2**62, 2**62, size=9, dtype=np.int64),
        "bytes": rng.integers(0, 256, size=13, dtype=np.uint8),
        "u16": rng.integers(0, 2**16, size=(4, 1), dtype=np.uint16),
        "u32": rng.integers(0, 2**32, size=6, dtype=np.uint32),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _data_start(path):
    with open(path, "rb") as f:
        _, _, header_len, _ = struct.unpack("<8sIQI", f.read(PREAMBLE_SIZE))
    return -(-(PREAMBLE_SIZE + header_len) // ALIGNMENT) * ALIGNMENT


def _raw_file(path, header_obj, data=b"", *, version=FORMAT_VERSION, header_crc=None):
    """Write a .cllm file by hand, to present the reader with exactly one defect."""
    header = msgpack.packb(header_obj, use_bin_type=True)
    crc = zlib.crc32(header) if header_crc is None else header_crc
    pre = MAGIC + struct.pack("<IQI", version, len(header), crc)
    pad = -(len(pre) + len(header)) % ALIGNMENT
    path.write_bytes(pre + header + b"\0" * pad + data)


def _header(**tensors):
    return {"config": {}, "tokenizer": None, "metadata": {}, "tensors": tensors}


def test_modelfile_round_trip_values_dtypes_shapes(tmp_path):
    path = tmp_path / "m.cllm"
    tensors = _sample_tensors()
    config = {"vocab_size": 7, "n_layer": 1, "dropout": 0.0, "init": None, "clock": True}
    metadata = {"steps": np.int64(12), "loss": np.float32(2.5), "history": [1.0, 2.0],
                "nested": {"a": "b"}}
    write_model_file(path, tensors, config=config, tokenizer='{"type": "bytes"}',
                     metadata=metadata)
    header, loaded = read_model_file(path)
    assert header["config"] == config
    assert header["tokenizer"] == '{"type": "bytes"}'
    assert header["metadata"] == {"steps": 12, "loss": 2.5, "history": [1.0, 2.0],
                                  "nested": {"a": "b"}}
    assert header["format_version"] == FORMAT_VERSION
    assert list(loaded) == list(tensors)  # file order is the mapping's order
    for name, a in tensors.items():
        b = loaded[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        np.testing.assert_array_equal(b, a)


def test_modelfile_offsets_are_64_byte_aligned(tmp_path):
    path = tmp_path / "m.cllm"
    write_model_file(path, _sample_tensors(), config={})
    header, loaded = read_model_file(path)
    start = _data_start(path)
    assert start % 64 == 0
    offsets = [e["offset"] for e in header["tensors"].values()]
    assert offsets == sorted(offsets)
    for name, entry in header["tensors"].items():
        assert entry["offset"] % 64 == 0, name
        if entry["nbytes"]:
            # Aligned in memory as well: the mapping is page-aligned.
            assert loaded[name].ctypes.data % 64 == 0, name


def test_modelfile_stores_little_endian(tmp_path):
    path = tmp_path / "m.cllm"
    big_endian = np.arange(4, dtype=">u4")
    write_model_file(path, {"x": big_endian}, config={})
    raw = path.read_bytes()
    start = _data_start(path)
    assert raw[start:start + 16] == np.arange(4, dtype="<u4").tobytes()
    _, loaded = read_model_file(path)
    assert loaded["x"].dtype == np.dtype("<u4")
    np.testing.assert_array_equal(loaded["x"], [0, 1, 2, 3])


def test_modelfile_load_is_zero_copy_and_read_only(tmp_path):
    path = tmp_path / "m.cllm"
    write_model_file(path, _sample_tensors(), config={})
    _, loaded = read_model_file(path)
    wte = loaded["wte"]
    assert isinstance(wte, np.memmap)
    assert isinstance(_root(wte), mmap.mmap)
    assert not wte.flags.writeable
    with pytest.raises(ValueError):
        wte[0, 0] = 1.0
    # All tensors are views of one mapping of the file.
    assert _root(loaded["wte"]) is _root(loaded["wpe"]) is _root(loaded["ids"])


def _root(array):
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def test_modelfile_refuses_unsupported_dtype_without_writing(tmp_path):
    path = tmp_path / "m.cllm"
    for bad in (np.zeros(3, np.complex64), np.zeros(3, bool), np.zeros(3, np.int8),
                np.array(["a"], dtype=object)):
        with pytest.raises(ModelFileError, match=r"tensor 'bad' has unsupported dtype") as ei:
            write_model_file(path, {"ok": np.zeros(2, np.float32), "bad": bad}, config={})
        assert str(path) in str(ei.value)
    assert os.listdir(tmp_path) == []


def test_modelfile_refuses_bad_arguments(tmp_path):
    path = tmp_path / "m.cllm"
    with pytest.raises(ModelFileError, match="is a list, expected a numpy array"):
        write_model_file(path, {"x": [1, 2]}, config={})
    with pytest.raises(ModelFileError, match="header is not serializable"):
        write_model_file(path, {}, config={"f": object()})
    with pytest.raises(ModelFileError, match="config must be a dict"):
        write_model_file(path, {}, config=[1])
    with pytest.raises(ModelFileError, match="tokenizer must be a JSON string"):
        write_model_file(path, {}, config={}, tokenizer=b"{}")
    assert os.listdir(tmp_path) == []


def test_modelfile_without_tensors_round_trips(tmp_path):
    path = tmp_path / "m.cllm"
    write_model_file(path, {}, config={"a": 1})
    header, loaded = read_model_file(path)
    assert loaded == {} and header["config"] == {"a": 1} and header["metadata"] == {}


def test_modelfile_refuses_wrong_magic(tmp_path):
    path = tmp_path / "notes.cllm"
    path.write_text("This is a text file that happens to be long enough to hold a preamble.\n")
    with pytest.raises(ModelFileError, match=r"notes\.cllm: not a \.cllm file"):
        read_model_file(path)
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"not a \.cllm file"):
        read_model_file(path)


def test_modelfile_refuses_newer_version(tmp_path):
    path = tmp_path / "future.cllm"
    write_model_file(path, {"x": np.ones(3, np.float32)}, config={})
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 7)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError) as ei:
        read_model_file(path)
    assert str(ei.value) == (f"{path}: format version 7 is newer than this cllmd supports "
                             f"({FORMAT_VERSION})")


def test_modelfile_refuses_version_zero(tmp_path):
    path = tmp_path / "zero.cllm"
    _raw_file(path, _header(), version=0)
    with pytest.raises(ModelFileError, match="invalid format version 0"):
        read_model_file(path)


def test_modelfile_refuses_truncation_everywhere(tmp_path):
    path = tmp_path / "m.cllm"
    write_model_file(path, {"a": np.ones(100, np.float32), "b": np.ones(50, np.float64)},
                     config={"x": "y" * 50})
    raw = path.read_bytes()
    start = _data_start(path)
    cuts = {
        "inside the preamble": 10,
        "inside the header": PREAMBLE_SIZE + 5,
        "inside tensor a": start + 17,
        "inside tensor b (the last)": len(raw) - 1,
    }
    for where, cut in cuts.items():
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelFileError, match="truncated") as ei:
            read_model_file(path)
        assert str(path) in str(ei.value), where
    path.write_bytes(raw[:len(raw) - 1])
    with pytest.raises(ModelFileError, match=r"truncated: tensor 'b' needs bytes"):
        read_model_file(path, verify=False)


def test_modelfile_crc_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "m.cllm"
    write_model_file(path, {"a": np.ones(16, np.float32), "b": np.ones(16, np.float32)},
                     config={})
    raw = bytearray(path.read_bytes())
    header, _ = read_model_file(path)
    raw[_data_start(path) + header["tensors"]["b"]["offset"] + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"m\.cllm: checksum mismatch in tensor 'b'"):
        read_model_file(path)
    # Without verification the damaged data is handed over as is.
    _, loaded = read_model_file(path, verify=False)
    assert not np.array_equal(loaded["b"], np.ones(16, np.float32))


def test_modelfile_corrupted_header_is_refused(tmp_path):
    path = tmp_path / "m.cllm"
    write_model_file(path, {"a": np.ones(4, np.float32)}, config={"name": "abcdef"})
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"abcdef")] = ord("x")
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="header checksum mismatch"):
        read_model_file(path)


@pytest.mark.parametrize("header_obj, problem", [
    ([1, 2, 3], "expected a map"),
    ({"config": {}, "tokenizer": None, "metadata": {}}, "missing key 'tensors'"),
    ({"config": [], "tokenizer": None, "metadata": {}, "tensors": {}}, "'config' must be a map"),
    (_header(x={"dtype": "bool", "shape": [1], "offset": 0, "nbytes": 1, "crc32": 0}),
     "unsupported dtype 'bool'"),
    (_header(x={"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 4, "crc32": 0}),
     "nbytes 4, but shape"),
    (_header(x={"dtype": "float32", "shape": [1], "offset": 4, "nbytes": 4, "crc32": 0}),
     "not 64-byte aligned"),
    (_header(x={"dtype": "float32", "shape": [-1], "offset": 0, "nbytes": 4, "crc32": 0}),
     "dimension of tensor 'x'"),
    (_header(x={"dtype": "float32", "shape": [1], "offset": 0, "nbytes": 4}), "lacks 'crc32'"),
])
def test_modelfile_malformed_header_is_refused(tmp_path, header_obj, problem):
    path = tmp_path / "bad.cllm"
    _raw_file(path, header_obj, data=b"\0" * 64)
    with pytest.raises(ModelFileError, match=r"bad\.cllm: malformed header") as ei:
        read_model_file(path)
    assert problem in str(ei.value)


def test_modelfile_header_not_msgpack_is_refused(tmp_path):
    path = tmp_path / "bad.cllm"
    junk = b"\xc1\xc1\xc1"  # 0xc1 is never used in msgpack
    path.write_bytes(MAGIC + struct.pack("<IQI", 1, len(junk), zlib.crc32(junk)) + junk)
    with pytest.raises(ModelFileError, match="malformed header: not valid msgpack"):
        read_model_file(path)


def test_modelfile_missing_file_names_it(tmp_path):
    path = tmp_path / "absent.cllm"
    with pytest.raises(ModelFileError, match=r"absent\.cllm: cannot read"):
        read_model_file(path)


def test_modelfile_write_failing_midway_keeps_old_file(tmp_path):
    # A real failure in the middle of write_model_file: a child process whose file-size limit
    # (RLIMIT_FSIZE) is far below the new model's size gets EFBIG from write(2).
    path = tmp_path / "model.cllm"
    write_model_file(path, {"w": np.full(10, 7, np.float32)}, config={"v": 1})
    old = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from cllmd.modelfile import write_model_file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            write_model_file({str(path)!r}, {{"w": np.zeros(1_000_000, np.float32)}},
                             config={{"v": 2}})
        except OSError as e:
            sys.exit(3)
        sys.exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.cllm"]
    header, loaded = read_model_file(path)
    assert header["config"] == {"v": 1}
    np.testing.assert_array_equal(loaded["w"], np.full(10, 7, np.float32))


def test_modelfile_overwrite_keeps_existing_mappings_valid(tmp_path):
    # Replacing a model by rename leaves readers of the old file with their old, intact data.
    path = tmp_path / "m.cllm"
    write_model_file(path, {"w": np.arange(8, dtype=np.float32)}, config={})
    _, old = read_model_file(path)
    write_model_file(path, {"w": np.zeros(8, dtype=np.float32)}, config={})
    _, new = read_model_file(path)
    np.testing.assert_array_equal(old["w"], np.arange(8, dtype=np.float32))
    np.testing.assert_array_equal(new["w"], np.zeros(8, dtype=np.float32))


def test_modelfile_matches_documented_worked_example(tmp_path):
    # docs/model-format.md carries a hex dump of this exact file; the two must agree byte for
    # byte, so the document stays a faithful description of the writer.
    doc = (Path(__file__).resolve().parents[1] / "docs" / "model-format.md").read_text()
    dump = re.findall(r"^[0-9a-f]{8}: ((?:[0-9a-f]{2,4} ?){1,8})", doc, flags=re.M)
    expected = bytes.fromhex("".join(line.replace(" ", "") for line in dump))
    assert len(expected) == 332
    path = tmp_path / "ex.cllm"
    write_model_file(path, {"w": np.array([[1, 2], [3, 4]], np.float32),
                            "b": np.array([7, 8, 9], np.int32)},
                     config={"n_layer": 1}, metadata={"steps": 0})
    assert path.read_bytes() == expected
