"""Type stubs of the compiled extension (the Rust side of `coda`); use the `coda` module."""

from os import PathLike
from typing import List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike[str]]

__version__: str

class Tokenizer:
    @staticmethod
    def from_dir(path: _Path, precision: Optional[str] = None, threads: Optional[int] = None) -> "Tokenizer": ...
    @staticmethod
    def default(precision: Optional[str] = None, threads: Optional[int] = None) -> "Tokenizer": ...
    @staticmethod
    def from_bytes(
        config_json: str,
        weights: bytes,
        origin: _Path,
        precision: Optional[str] = None,
        threads: Optional[int] = None,
    ) -> "Tokenizer": ...
    @property
    def dir(self) -> Optional[_Path]: ...
    @property
    def precision(self) -> str: ...
    @property
    def codebook_size(self) -> int: ...
    @property
    def hash(self) -> str: ...
    @property
    def resolution(self) -> Optional[int]: ...
    @property
    def downsample_factor(self) -> int: ...
    def config_json(self) -> str: ...
    def scales(self, height: int, width: int) -> List[Tuple[int, int]]: ...
    def square_image_size_for(self, tokens_per_image: int) -> Tuple[int, int]: ...
    def encode_array(
        self,
        images: npt.NDArray[np.uint8],
        size: Optional[int],
        precision: Optional[str],
        sample_seed: Optional[int],
        batch: int,
    ) -> np.ndarray: ...
    def encode_paths(
        self,
        paths: List[_Path],
        size: Optional[int],
        precision: Optional[str],
        sample_seed: Optional[int],
        batch: int,
    ) -> np.ndarray: ...
    def decode(
        self,
        ids: npt.NDArray[np.uint32],
        height: int,
        width: int,
        scales: Optional[int],
        precision: Optional[str],
        as_float: bool,
    ) -> np.ndarray: ...

    def evaluate(
        self, paths: List[_Path], size: int, resize: Optional[int], batch: int, colours: bool
    ) -> str: ...

def load_image(path: _Path, size: Optional[int] = None) -> npt.NDArray[np.uint8]: ...
def prepare_image(image: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]: ...
def load_tokens(path: _Path) -> Tuple[np.ndarray, str]: ...
def save_tokens(
    path: _Path,
    ids: npt.NDArray[np.uint32],
    scales: List[Tuple[int, int]],
    codebook_size: int,
    tokenizer_hash: str,
    sources: List[str],
) -> None: ...
