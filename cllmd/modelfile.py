"""The `.cllm` model file: magic, version, checksummed msgpack header, 64-byte aligned tensors.

Tensors load as read-only `np.memmap` views without copying; every write is atomic. The byte
layout is specified in docs/model-format.md; writes go through cllm.durable.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import msgpack
import numpy as np

from cllm.durable import atomic_file

log = logging.getLogger(__name__)

MAGIC = b"\x89CLLM\r\n\x1a"  # PNG-style: high bit, name, CRLF and ^Z catch text-mode mangling
FORMAT_VERSION = 1
ALIGNMENT = 64

# magic (8 bytes) | format version u32 LE | header length u64 LE | header CRC32 u32 LE
_PREAMBLE = struct.Struct("<8sIQI")
PREAMBLE_SIZE = _PREAMBLE.size  # 24

# Stored dtype names -> little-endian numpy dtypes. Anything else is refused.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float64", "float16", "int32", "int64", "uint8", "uint16", "uint32")
}

_HEADER_KEYS = ("config", "tokenizer", "metadata", "tensors")
_TENSOR_KEYS = ("dtype", "shape", "offset", "nbytes", "crc32")


class ModelFileError(ValueError):
    """A .cllm file that cannot be read or written; the message names the file and the problem."""

    def __init__(self, path: os.PathLike | str, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _msgpack_default(obj: Any) -> Any:
    # numpy scalars are common in configs and metrics; store them as plain values.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot store a value of type {type(obj).__name__} in the header")


def _prepare_tensor(path: Path, name: Any, array: Any) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise ModelFileError(path, f"tensor names must be non-empty strings, got {name!r}")
    if not isinstance(array, np.ndarray):
        raise ModelFileError(
            path, f"tensor {name!r} is a {type(array).__name__}, expected a numpy array")
    key = array.dtype.name
    if key not in DTYPES:
        raise ModelFileError(
            path, f"tensor {name!r} has unsupported dtype {array.dtype}; "
                  f"supported: {', '.join(DTYPES)}")
    # Little-endian and C-contiguous; no copy when it already is (the common case).
    return np.asarray(array, dtype=DTYPES[key], order="C")  # keeps 0-d arrays 0-d


def write_model_file(path: os.PathLike | str, tensors: Mapping[str, np.ndarray], *,
                     config: dict, tokenizer: str | None = None,
                     metadata: dict | None = None) -> None:
    """Atomically write a .cllm file holding `tensors` (in the mapping's order) and the header."""
    path = Path(path)
    if not isinstance(config, dict):
        raise ModelFileError(path, f"config must be a dict, got {type(config).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ModelFileError(
            path, f"tokenizer must be a JSON string or None, got {type(tokenizer).__name__}")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ModelFileError(path, f"metadata must be a dict, got {type(metadata).__name__}")

    arrays: list[tuple[str, np.ndarray]] = []
    index: dict[str, dict] = {}
    offset = 0  # relative to the start of the data section
    for name, array in tensors.items():
        a = _prepare_tensor(path, name, array)
        index[name] = {
            "dtype": a.dtype.name,
            "shape": list(a.shape),
            "offset": offset,
            "nbytes": a.nbytes,
            "crc32": zlib.crc32(_byte_view(a)),
        }
        arrays.append((name, a))
        offset = _align(offset + a.nbytes)

    header_obj = {
        "config": config,
        "tokenizer": tokenizer,
        "metadata": metadata,
        "tensors": index,
        "alignment": ALIGNMENT,
    }
    try:
        header = msgpack.packb(header_obj, use_bin_type=True, default=_msgpack_default)
    except (TypeError, ValueError, OverflowError) as e:
        raise ModelFileError(path, f"header is not serializable: {e}") from e

    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header))
    data_start = _align(PREAMBLE_SIZE + len(header))
    with atomic_file(path) as f:
        f.write(preamble)
        f.write(header)
        f.write(b"\0" * (data_start - PREAMBLE_SIZE - len(header)))
        pos = 0
        for name, a in arrays:
            start = index[name]["offset"]
            f.write(b"\0" * (start - pos))
            f.write(_byte_view(a))
            pos = start + a.nbytes
    log.debug("wrote %s: %d tensors, %d bytes of data", path, len(arrays), pos)


def _byte_view(a: np.ndarray) -> memoryview:
    # A flat byte view of a C-contiguous array, also valid for 0-d and empty arrays.
    return memoryview(a.reshape(-1).view(np.uint8))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read_preamble(path: Path, f: IO[bytes], size: int) -> tuple[int, int, int]:
    head = f.read(PREAMBLE_SIZE)
    n = min(len(head), len(MAGIC))
    if head[:n] != MAGIC[:n] or size == 0:
        raise ModelFileError(path, "not a .cllm file (wrong magic bytes)")
    if len(head) < PREAMBLE_SIZE:
        raise ModelFileError(
            path, f"truncated: file is {size} bytes, shorter than the {PREAMBLE_SIZE}-byte "
                  f"preamble")
    _, version, header_len, header_crc = _PREAMBLE.unpack(head)
    if version > FORMAT_VERSION:
        raise ModelFileError(
            path, f"format version {version} is newer than this cllmd supports "
                  f"({FORMAT_VERSION})")
    if version < 1:
        raise ModelFileError(path, f"invalid format version {version}")
    if PREAMBLE_SIZE + header_len > size:
        raise ModelFileError(
            path, f"truncated: the header needs bytes {PREAMBLE_SIZE}..{PREAMBLE_SIZE + header_len}"
                  f" but the file is {size} bytes")
    return version, header_len, header_crc


def _check_int(path: Path, where: str, value: Any, *, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise ModelFileError(path, f"malformed header: {where} must be an integer >= {minimum},"
                                   f" got {value!r}")
    return value


def _validate_header(path: Path, header: Any) -> dict:
    if not isinstance(header, dict):
        raise ModelFileError(path, f"malformed header: expected a map, got "
                                   f"{type(header).__name__}")
    for key in _HEADER_KEYS:
        if key not in header:
            raise ModelFileError(path, f"malformed header: missing key {key!r}")
    if not isinstance(header["config"], dict):
        raise ModelFileError(path, "malformed header: 'config' must be a map")
    if not isinstance(header["metadata"], dict):
        raise ModelFileError(path, "malformed header: 'metadata' must be a map")
    if header["tokenizer"] is not None and not isinstance(header["tokenizer"], str):
        raise ModelFileError(path, "malformed header: 'tokenizer' must be a string or nil")
    if header.get("alignment", ALIGNMENT) != ALIGNMENT:
        raise ModelFileError(path, f"malformed header: alignment {header['alignment']!r} is not"
                                   f" {ALIGNMENT}")
    index = header["tensors"]
    if not isinstance(index, dict):
        raise ModelFileError(path, "malformed header: 'tensors' must be a map")
    for name, entry in index.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise ModelFileError(path, f"malformed header: bad tensor entry {name!r}")
        for key in _TENSOR_KEYS:
            if key not in entry:
                raise ModelFileError(path, f"malformed header: tensor {name!r} lacks {key!r}")
        if entry["dtype"] not in DTYPES:
            raise ModelFileError(path, f"malformed header: tensor {name!r} has unsupported "
                                       f"dtype {entry['dtype']!r}")
        shape = entry["shape"]
        if not isinstance(shape, list):
            raise ModelFileError(path, f"malformed header: tensor {name!r} shape is not a list")
        for d in shape:
            _check_int(path, f"a dimension of tensor {name!r}", d)
        offset = _check_int(path, f"offset of tensor {name!r}", entry["offset"])
        if offset % ALIGNMENT:
            raise ModelFileError(path, f"malformed header: tensor {name!r} offset {offset} is not"
                                       f" {ALIGNMENT}-byte aligned")
        nbytes = _check_int(path, f"nbytes of tensor {name!r}", entry["nbytes"])
        expected = math.prod(shape) * DTYPES[entry["dtype"]].itemsize
        if nbytes != expected:
            raise ModelFileError(path, f"malformed header: tensor {name!r} has nbytes {nbytes},"
                                       f" but shape {shape} of {entry['dtype']} needs {expected}")
        _check_int(path, f"crc32 of tensor {name!r}", entry["crc32"])
    return header


def read_model_file(path: os.PathLike | str, *,
                    verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a .cllm file: (header, tensors).

    The header has the keys config, tokenizer, metadata, tensors (the index), alignment and
    format_version. Tensors are read-only `np.memmap` views into one mapping of the file, in
    file order. With `verify`, every tensor's CRC32 is checked (this reads all the data).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            version, header_len, header_crc = _read_preamble(path, f, size)
            raw = f.read(header_len)
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror or e}") from e
    if len(raw) != header_len:  # the file shrank while we read it
        raise ModelFileError(path, "truncated: the header ends past the end of the file")
    if zlib.crc32(raw) != header_crc:
        raise ModelFileError(path, "header checksum mismatch: the header is corrupted")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ModelFileError(path, f"malformed header: not valid msgpack ({e})") from e
    header = _validate_header(path, header)
    header["format_version"] = version

    data_start = _align(PREAMBLE_SIZE + header_len)
    index = header["tensors"]
    for name, entry in index.items():
        end = data_start + entry["offset"] + entry["nbytes"]
        if end > size:
            raise ModelFileError(
                path, f"truncated: tensor {name!r} needs bytes {data_start + entry['offset']}"
                      f"..{end} but the file is {size} bytes")

    tensors: dict[str, np.ndarray] = {}
    if not index:
        return header, tensors
    # One read-only mapping of the whole file; every tensor is a view into it (no copy).
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, entry in index.items():
        start = data_start + entry["offset"]
        flat = mm[start:start + entry["nbytes"]]
        if verify:
            crc = zlib.crc32(flat)
            if crc != entry["crc32"]:
                raise ModelFileError(
                    path, f"checksum mismatch in tensor {name!r} (stored {entry['crc32']:#010x},"
                          f" computed {crc:#010x}): the file is corrupted")
        tensors[name] = flat.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return header, tensors


__all__ = [
    "ALIGNMENT", "DTYPES", "FORMAT_VERSION", "MAGIC", "PREAMBLE_SIZE", "ModelFileError",
    "read_model_file", "write_model_file",
]
