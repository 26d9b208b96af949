"""Reading a token store written by ``coda tokenize`` (numpy only; no model is loaded).

The store is a folder of shards: ``shard-NNNNN.ids.npy`` (``[n, views, L]``, uint16 or
uint32), ``shard-NNNNN.labels.npy`` (int64 ``[n]``, -1 without classes), ``shard-NNNNN.keys.json``
and ``manifest.json``. The id arrays are memory-mapped, so a ``TokenStore`` can back a PyTorch
``Dataset`` of any size without reading it into memory.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np


class TokenStore:
    """A token store folder: ``len(store)``, ``store[i] -> (ids [views, L], label, key)``."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(
                f"{manifest}: no manifest (an unfinished store? run `coda tokenize` again, or "
                "`coda tokenize merge` for --shard parts)"
            )
        self.manifest: Dict[str, Any] = json.loads(manifest.read_text())
        self._shards = self.manifest["shards"]
        self._starts: List[int] = []
        total = 0
        for s in self._shards:
            self._starts.append(total)
            total += s["samples"]
        self._len = total
        self._ids: Dict[int, np.ndarray] = {}
        self._labels: Dict[int, np.ndarray] = {}
        self._keys: Dict[int, List[str]] = {}

    def __len__(self) -> int:
        return self._len

    @property
    def views(self) -> List[str]:
        """``["center"]``, or ``["center", "flip"]`` with flips."""
        return list(self.manifest["views"])

    @property
    def classes(self) -> List[str]:
        return list(self.manifest["classes"])

    def _shard(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if k not in self._ids:
            name = self._shards[k]["name"]
            self._ids[k] = np.load(self.path / f"{name}.ids.npy", mmap_mode="r")
            self._labels[k] = np.load(self.path / f"{name}.labels.npy", mmap_mode="r")
        return self._ids[k], self._labels[k]

    def _shard_keys(self, k: int) -> List[str]:
        if k not in self._keys:
            name = self._shards[k]["name"]
            self._keys[k] = json.loads((self.path / f"{name}.keys.json").read_text())
        return self._keys[k]

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int, str]:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(i).__name__}")
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for a store of {self._len} samples")
        k = bisect.bisect_right(self._starts, i) - 1
        r = i - self._starts[k]
        ids, labels = self._shard(k)
        return ids[r], int(labels[r]), self._shard_keys(k)[r]

    def __repr__(self) -> str:
        return (
            f"coda.TokenStore({str(self.path)!r}, samples={self._len}, views={self.views}, "
            f"tokens_per_view={self.manifest['tokens_per_view']})"
        )
