"""Safetensors folders: header scanning with precise errors, tensor streaming, atomic sharded writing.

Headers are parsed here rather than by ``safe_open`` so that a corrupt or truncated shard is reported with its
file and the first key it breaks, before any tensor data is read.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flux_engine.checkpoint.errors import CheckpointError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what its header says."""

    file: str
    shape: Tuple[int, ...]
    dtype: str


def read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_header(path: str) -> Dict[str, TensorInfo]:
    """The tensors of one safetensors file, checked against the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: corrupt safetensors header (header length {length}, file of {size} bytes)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    tensors = {}
    for key, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for key {key!r}") from None
        if dtype not in _ITEM_SIZES:
            raise CheckpointError(f"{path}: key {key!r} has unsupported dtype {dtype}")
        if not 0 <= begin <= end or end - begin != math.prod(shape) * _ITEM_SIZES[dtype]:
            raise CheckpointError(
                f"{path}: key {key!r}: data offsets [{begin}, {end}) do not match shape {list(shape)} {dtype}"
            )
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated: key {key!r} needs bytes [{begin}, {end}) of the data section, "
                f"the file holds {data_bytes}"
            )
        tensors[key] = TensorInfo(path, shape, dtype)
    return tensors


def weights_file(folder: str) -> str:
    """The file that lists the checkpoint's tensors: the index when sharded, else the single shard."""
    index = os.path.join(folder, INDEX_FILE)
    return index if os.path.exists(index) else os.path.join(folder, SINGLE_FILE)


def scan(folder: str) -> Dict[str, TensorInfo]:
    """Every tensor key of a checkpoint folder -> its shard, shape and dtype (headers only; checks the index)."""
    index_path = os.path.join(folder, INDEX_FILE)
    weight_map: Optional[Dict[str, str]] = None
    if os.path.exists(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: missing 'weight_map'")
        files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
        files = [os.path.join(folder, SINGLE_FILE)]
    else:
        raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    found: Dict[str, TensorInfo] = {}
    for path in files:
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} does not exist")
        for key, info in read_header(path).items():
            if key in found:
                raise CheckpointError(f"{path}: key {key!r} is also in {found[key].file}")
            if weight_map is not None and weight_map.get(key) != os.path.basename(path):
                raise CheckpointError(f"{path}: key {key!r} is not assigned to this file by {INDEX_FILE}")
            found[key] = info
    for key, name in (weight_map or {}).items():
        if key not in found:
            raise CheckpointError(f"{os.path.join(folder, name)}: lacks key {key!r} listed in {INDEX_FILE}")
    return found


def stream(found: Dict[str, TensorInfo], wanted: Sequence[str]) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for the ``wanted`` keys, one shard open at a time, one tensor read at a time."""
    by_file: Dict[str, List[str]] = {}
    for key in wanted:
        by_file.setdefault(found[key].file, []).append(key)
    for path in sorted(by_file):
        with safe_open(path, framework="pt", device="cpu") as shard:
            for key in by_file[path]:
                yield key, shard.get_tensor(key)


# -- writing ---------------------------------------------------------------------------------------------------


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MiB"``."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
        if match is None or match[2].upper() not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size: cannot parse {size!r}")
        value = int(float(match[1]) * _SIZE_UNITS[match[2].upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _pack(tensors: Sequence[Tuple[str, torch.Tensor]], max_bytes: int) -> List[List[Tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: List[List[Tuple[str, torch.Tensor]]] = [[]]
    used = 0
    for key, tensor in tensors:
        nbytes = _nbytes(tensor)
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((key, tensor))
        used += nbytes
    return shards


def _write_shard(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    save_file(tensors, path, metadata={"format": "pt"})


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, data: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_shards(folder: str, tensors: Sequence[Tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Write ``tensors`` (any device; copied to CPU one shard at a time) as ``model.safetensors`` or as numbered
    shards plus ``model.safetensors.index.json``."""
    shards = _pack(tensors, max_shard_bytes)
    count = len(shards)
    names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map: Dict[str, str] = {}
    for name, shard in zip(names, shards):
        path = os.path.join(folder, name)
        _write_shard(path, {key: tensor.detach().to("cpu").contiguous() for key, tensor in shard})
        _fsync(path)
        weight_map.update((key, name) for key, _ in shard)
    if count > 1:
        total = sum(_nbytes(tensor) for _, tensor in tensors)
        write_json(os.path.join(folder, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})


@contextmanager
def atomic_directory(target: str, overwrite: bool) -> Iterator[str]:
    """Yield an empty folder next to ``target`` to write into; on success it takes ``target``'s place by rename,
    on any exception it is deleted and ``target`` is left untouched.

    Replacing an existing ``target`` takes two renames (old out of the way, new in); a crash between them leaves
    both complete folders as hidden siblings, never a partial checkpoint.
    """
    target = os.path.abspath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise CheckpointError(f"{target}: exists and is not a directory")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise CheckpointError(f"{target}: directory is not empty (pass overwrite=True to replace it)")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        _fsync(staging)
        if os.path.isdir(target):
            retired = staging + ".old"
            os.rename(target, retired)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(retired, target)
                raise
            shutil.rmtree(retired)
        else:
            os.rename(staging, target)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
