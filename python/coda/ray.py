"""Tokenizing a dataset on a Ray cluster with Ray Data (``pip install "coda-tokenizer[ray]"``).

``TokenizeBatch`` is a callable class for ``ray.data.Dataset.map_batches``: Ray constructs it
once per worker (the tokenizer is loaded there, in ``__init__``), then calls it on batches::

    import ray
    from coda.ray import TokenizeBatch

    ds = ray.data.read_images("s3://bucket/imagenet/train", include_paths=True, mode="RGB")
    ds = ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"tokenizer": "default", "size": 128},
        batch_size=64,
        batch_format="numpy",
        concurrency=8,          # workers; each uses its own thread pool (threads=)
    )
    ds.write_parquet("s3://bucket/imagenet-tokens")   # columns: path, label?, ids

With a ``path`` column of local (or shared-filesystem) files, the images are read by coda itself,
so the ids are bit-identical to ``coda tokenize``'s; without one, the batch's ``image`` column
(decoded by Ray) is used.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from . import Tokenizer, load_image, prepare_image


class TokenizeBatch:
    """``map_batches`` callable: a batch (``path`` and/or ``image`` columns) -> the same batch
    without ``image``, plus ``ids``: ``[B, L]``, or ``[B, 2, L]`` (centre, flip) with ``flip``."""

    def __init__(
        self,
        tokenizer: str = "default",
        size: Optional[int] = None,
        flip: bool = False,
        precision: str = "f32",
        threads: Optional[int] = None,
        use_paths: bool = True,
    ):
        self.tok = Tokenizer.from_pretrained(tokenizer, precision=precision, threads=threads)
        self.size = size or self.tok.resolution
        if self.size is None:
            raise ValueError("the tokenizer has no resolution: give size=")
        self.flip = flip
        self.use_paths = use_paths

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        out = {k: v for k, v in batch.items() if k != "image"}
        if self.use_paths and "path" in batch:
            paths = [str(p) for p in batch["path"]]
            centre = self.tok.encode(paths, size=self.size)
            pixels = (
                np.stack([load_image(p, self.size) for p in paths]) if self.flip else None
            )
        elif "image" in batch:
            pixels_list = [np.asarray(im, dtype=np.uint8) for im in batch["image"]]
            centre = self.tok.encode(pixels_list, size=self.size)
            pixels = (
                np.stack([prepare_image(im, self.size) for im in pixels_list]) if self.flip else None
            )
        else:
            raise ValueError(f"a batch needs a 'path' or an 'image' column, got {list(batch)}")
        if self.flip:
            flipped = self.tok.encode(np.ascontiguousarray(pixels[:, :, ::-1]))
            out["ids"] = np.stack([centre, flipped], axis=1)
        else:
            out["ids"] = centre
        return out
