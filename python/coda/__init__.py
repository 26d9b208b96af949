"""coda: CODA discrete image tokenizers (arXiv 2503.17760) with a Rust core.

Images in, token ids out, and back::

    import coda, numpy as np
    tok = coda.Tokenizer.from_pretrained("default")        # the embedded default tokenizer
    ids = tok.encode(["photo.jpg"])                        # uint16 [1, L]
    images = tok.decode(ids)                               # uint8 [1, H, W, 3]

Every model call runs in Rust with the GIL released, so several Python threads can encode at
once. A ``Tokenizer`` pickles (to DataLoader or Ray workers) and gives the same ids as the
``coda`` command-line tool on the same images and options.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _coda
from .store import TokenStore

__version__ = _coda.__version__
__all__ = ["Tokenizer", "TokenStore", "load_image", "prepare_image", "load_tokens", "save_tokens", "__version__"]

PathLike = Union[str, "os.PathLike[str]"]
Images = Union[np.ndarray, Sequence[PathLike], Sequence[np.ndarray]]

_PRECISIONS = ("f32", "bf16x3", "bf16")


def _check_precision(precision: Optional[str]) -> Optional[str]:
    if precision is not None and precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS} or None, got {precision!r}")
    return precision


def _as_pixels(array: Any, what: str) -> np.ndarray:
    """A uint8 RGB array [..., H, W, 3], C-contiguous, or a ValueError saying what is wrong."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 pixels (0-255), got dtype {a.dtype}; "
            "convert float images with (x * 255).round().astype(np.uint8)"
        )
    if a.ndim < 3 or a.shape[-1] != 3:
        raise ValueError(f"{what} must be [..., H, W, 3] RGB, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _as_ids(ids: Any) -> np.ndarray:
    """Integer ids [N, L] as C-contiguous uint32, refusing negative ids and non-integers."""
    a = np.asarray(ids)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"ids must be [N, L], got shape {a.shape}")
    if a.size == 0:
        raise ValueError("ids must hold at least one image's tokens (got an empty array)")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
        raise ValueError(f"ids must be non-negative, got {a.min()}")
    if a.max() > np.iinfo(np.uint32).max:
        raise ValueError(f"id {a.max()} is out of range")
    return np.ascontiguousarray(a, dtype=np.uint32)


class Tokenizer:
    """A CODA tokenizer: a continuous VAE with a multi-scale residual quantizer.

    Load one with :meth:`from_pretrained`. Instances are thread-safe, picklable, and hold their
    own precision and thread count (nothing is process-wide).
    """

    def __init__(self, inner: "_coda.Tokenizer", threads: Optional[int] = None):
        self._inner = inner
        self._threads = threads

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        *,
        precision: str = "f32",
        threads: Optional[int] = None,
    ) -> "Tokenizer":
        """Load a tokenizer folder (``config.json`` + ``model.safetensors``), or the embedded
        default tokenizer with ``"default"``.

        ``precision``: the arithmetic of the convolutions, ``"f32"`` (exact), ``"bf16x3"`` or
        ``"bf16"`` (bf16x3 needs an Intel CPU with AMX; bf16 AMX or AVX512_BF16, as on AMD
        Zen 4). ``threads``: run on a pool of
        this many threads of its own (default: the process-wide pool of all cores).
        """
        _check_precision(precision)
        if str(path) == "default":
            return cls(_coda.Tokenizer.default(precision, threads), threads)
        return cls(_coda.Tokenizer.from_dir(os.fspath(path), precision, threads), threads)

    # --- pickling: the weights travel with the object, so workers need no shared disk --------
    def __reduce__(self):
        folder = self._inner.dir
        if folder is None:
            state = ("default", None, None)
        else:
            folder = Path(folder)
            state = (
                str(folder),
                (folder / "config.json").read_text(),
                (folder / "model.safetensors").read_bytes(),
            )
        return (_restore, (state, self.precision, self._threads, self.hash))

    # --- properties ----------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """Number of codes V (ids are in 0..V-1)."""
        return self._inner.codebook_size

    @property
    def hash(self) -> str:
        """Content hash of the weights, recorded in token files."""
        return self._inner.hash

    @property
    def precision(self) -> str:
        """The tokenizer's convolution arithmetic (``"f32"`` unless chosen at load)."""
        return self._inner.precision

    @property
    def resolution(self) -> Optional[int]:
        """The image size that image files are prepared to by default (None: their own)."""
        return self._inner.resolution

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent position along each side (image sides must be multiples)."""
        return self._inner.downsample_factor

    @property
    def config(self) -> Dict[str, Any]:
        """The tokenizer's config.json as a dict."""
        return json.loads(self._inner.config_json())

    @property
    def id_dtype(self) -> np.dtype:
        """uint16 when the codebook has at most 65536 codes, else uint32."""
        return np.dtype(np.uint16 if self.codebook_size <= 65536 else np.uint32)

    def scales(self, height: int, width: int) -> List[Tuple[int, int]]:
        """The (h_k, w_k) token maps of an image of ``height`` x ``width`` pixels, coarse to
        fine."""
        return [tuple(s) for s in self._inner.scales(height, width)]

    def tokens_per_image(self, height: int, width: int) -> int:
        """L: the number of ids of one image of ``height`` x ``width`` pixels."""
        return sum(h * w for h, w in self.scales(height, width))

    # --- encoding ------------------------------------------------------------------------------
    def encode(
        self,
        images: Images,
        *,
        size: Optional[int] = None,
        precision: Optional[str] = None,
        sample: bool = False,
        seed: int = 0,
        batch: int = 8,
    ) -> np.ndarray:
        """Images to token ids ``[N, L]`` (``id_dtype``), scale-major (coarse to fine).

        ``images``: a uint8 array ``[N, H, W, 3]``, a list of such ``[H, W, 3]`` arrays of one
        size, or a list of image file paths. ``size``: resize the shorter side to ``size`` and
        centre-crop (as ``coda encode --size``). Arrays are used as they are without it; files
        default to the tokenizer's resolution, as on the command line. ``sample``: sample the
        posterior (image ``r`` of the call with ``seed + r``) instead of taking its mean.
        ``precision``: this call's arithmetic (default: the tokenizer's). ``batch``: images per
        model call (the ids do not depend on it).
        """
        _check_precision(precision)
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        seed_arg = int(seed) if sample else None
        if seed_arg is not None and not 0 <= seed_arg < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        if isinstance(images, np.ndarray):
            pixels = _as_pixels(images, "images")
            if pixels.ndim != 4:
                raise ValueError(
                    f"an image array must be [N, H, W, 3], got shape {pixels.shape}; "
                    "use images[None] for one image"
                )
            if pixels.shape[0] == 0:
                raise ValueError("no images to encode (an empty batch)")
            return self._inner.encode_array(pixels, size, precision, seed_arg, batch)
        if isinstance(images, (str, os.PathLike)):
            raise ValueError("images must be a list of paths, not one path: use [path]")
        items = list(images)
        if not items:
            raise ValueError("no images to encode (an empty batch)")
        if all(isinstance(p, (str, os.PathLike)) for p in items):
            paths = [os.fspath(p) for p in items]
            if size is None:
                size = self.resolution
            return self._inner.encode_paths(paths, size, precision, seed_arg, batch)
        arrays = [_as_pixels(a, f"images[{i}]") for i, a in enumerate(items)]
        for i, a in enumerate(arrays):
            if a.ndim != 3:
                raise ValueError(f"images[{i}] must be [H, W, 3], got shape {a.shape}")
            if size is None and a.shape != arrays[0].shape:
                raise ValueError(
                    f"images[{i}] is {a.shape}, images[0] is {arrays[0].shape}: "
                    "give size= to resize them to one size"
                )
        if size is not None and any(a.shape != arrays[0].shape for a in arrays):
            # Different sizes: each is prepared on its own (image r keeps seed + r).
            return np.concatenate(
                [
                    self._inner.encode_array(
                        a[None], size, precision, None if seed_arg is None else seed_arg + i, 1
                    )
                    for i, a in enumerate(arrays)
                ]
            )
        return self._inner.encode_array(np.stack(arrays), size, precision, seed_arg, batch)

    def encode_scales(self, images: Images, **kwargs: Any) -> List[np.ndarray]:
        """As :meth:`encode`, split into the per-scale id maps ``[N, h_k, w_k]``."""
        ids = self.encode(images, **kwargs)
        size = kwargs.get("size")
        if size is not None:
            shape = (size, size)
        elif isinstance(images, np.ndarray):
            shape = images.shape[1:3]
        elif len(images) and not isinstance(images[0], (str, os.PathLike)):
            shape = np.asarray(images[0]).shape[:2]
        else:
            shape = self._image_size_of(ids, None)
        return self.split_scales(ids, tuple(int(v) for v in shape))

    def split_scales(self, ids: np.ndarray, image_size: Tuple[int, int]) -> List[np.ndarray]:
        """Flat ids ``[N, L]`` of ``(height, width)`` images -> per-scale maps (views)."""
        out, start = [], 0
        for h, w in self.scales(*image_size):
            out.append(ids[:, start : start + h * w].reshape(ids.shape[0], h, w))
            start += h * w
        if start != ids.shape[1]:
            raise ValueError(f"{ids.shape[1]} ids per image, the scales of {image_size} need {start}")
        return out

    # --- decoding ------------------------------------------------------------------------------
    def _image_size_of(self, ids: np.ndarray, image_size: Optional[Tuple[int, int]]):
        if image_size is not None:
            return tuple(image_size)
        return tuple(self._inner.square_image_size_for(ids.shape[1]))

    def decode(
        self,
        ids: Union[np.ndarray, Sequence[np.ndarray]],
        *,
        image_size: Optional[Tuple[int, int]] = None,
        scales: Optional[int] = None,
        precision: Optional[str] = None,
        dtype: str = "uint8",
    ) -> np.ndarray:
        """Token ids to images ``[N, H, W, 3]``.

        ``ids``: flat ids ``[N, L]`` (as :meth:`encode` returns) or the per-scale maps. The
        image size is inferred for square images; give ``image_size=(height, width)`` for
        others. ``scales``: decode from the first K scales only (coarse to fine). ``dtype``:
        ``"uint8"``, or ``"float32"`` for values in [0, 1]. Ids out of range raise ValueError.
        """
        _check_precision(precision)
        if dtype not in ("uint8", "float32"):
            raise ValueError(f'dtype must be "uint8" or "float32", got {dtype!r}')
        if isinstance(ids, (list, tuple)):
            maps = [np.asarray(m) for m in ids]
            if not maps or any(m.ndim != 3 for m in maps):
                raise ValueError("per-scale ids must be a non-empty list of [N, h_k, w_k] maps")
            if image_size is None:
                f = self.downsample_factor
                image_size = (maps[-1].shape[1] * f, maps[-1].shape[2] * f)
            ids = np.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1)
        flat = _as_ids(ids)
        h, w = self._image_size_of(flat, image_size)
        return self._inner.decode(flat, h, w, scales, precision, dtype == "float32")

    def reconstruct(self, images: Images, **kwargs: Any) -> np.ndarray:
        """Encode then decode: the images as the tokenizer sees them (uint8 [N, H, W, 3])."""
        decode_kw = {k: kwargs[k] for k in ("precision",) if k in kwargs}
        ids = self.encode(images, **kwargs)
        return self.decode(ids, **decode_kw)

    def evaluate(
        self,
        paths: Sequence[PathLike],
        *,
        size: int = 256,
        resize: Optional[int] = None,
        batch: int = 8,
        colours: bool = False,
    ) -> Dict[str, Any]:
        """Reconstruction metrics over image files, as ``coda eval`` computes them: PSNR and
        SSIM (both protocols), codebook usage and perplexity, bits per image; with
        ``colours=True`` the solid-colour probe. Images are prepared by resizing the shorter side
        to ``resize`` (default ``size``) and centre-cropping ``size``. Returns the JSON record
        (metrics, protocol, data) as a dict."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        files = [os.fspath(p) for p in paths]
        if not files:
            raise ValueError("no images to evaluate")
        return json.loads(self._inner.evaluate(files, size, resize, batch, colours))

    def __repr__(self) -> str:
        where = self._inner.dir or "default"
        return (
            f"coda.Tokenizer({str(where)!r}, codebook_size={self.codebook_size}, "
            f"hash={self.hash!r}, precision={self.precision!r})"
        )


def _restore(state, precision, threads, expected_hash) -> Tokenizer:
    origin, config, weights = state
    if origin == "default":
        tok = Tokenizer(_coda.Tokenizer.default(precision, threads), threads)
    else:
        tok = Tokenizer(
            _coda.Tokenizer.from_bytes(config, weights, origin, precision, threads), threads
        )
    if tok.hash != expected_hash:
        raise ValueError(
            f"unpickled tokenizer {origin} has hash {tok.hash}, the pickled one had "
            f"{expected_hash} (its files changed on disk?)"
        )
    return tok


def load_image(path: PathLike, size: Optional[int] = None) -> np.ndarray:
    """Read an image file as uint8 ``[H, W, 3]``, prepared as the encoders prepare files:
    shorter side resized to ``size`` (Lanczos) and centre-cropped; ``None`` keeps its size."""
    return _coda.load_image(os.fspath(path), size)


def prepare_image(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` image prepared as the encoders prepare files: shorter side resized
    to ``size`` (Lanczos) and centre-cropped to ``size`` x ``size``."""
    return _coda.prepare_image(_as_pixels(image, "image"), int(size))


def load_tokens(path: PathLike) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Read a token file (``coda encode``'s output): ``(ids [N, L], meta)`` where meta has
    ``scales``, ``codebook_size``, ``tokenizer_hash`` and ``sources``."""
    ids, meta = _coda.load_tokens(os.fspath(path))
    meta = json.loads(meta)
    meta["scales"] = [tuple(s) for s in meta["scales"]]
    return ids, meta


def save_tokens(
    path: PathLike,
    ids: np.ndarray,
    *,
    scales: Sequence[Tuple[int, int]],
    codebook_size: int,
    tokenizer_hash: str,
    sources: Optional[Sequence[str]] = None,
) -> None:
    """Write flat ids ``[N, L]`` as a token file that ``coda decode`` reads (atomically).
    ``load_tokens``'s meta dict can be passed back as keyword arguments."""
    _coda.save_tokens(
        os.fspath(path),
        _as_ids(ids),
        [tuple(s) for s in scales],
        int(codebook_size),
        str(tokenizer_hash),
        [str(s) for s in (sources or [])],
    )
