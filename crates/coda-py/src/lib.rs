//! `coda._coda`: the Rust side of the Python package. Thin by design: argument checks that need
//! numpy live in `python/coda/__init__.py`, every model call goes to the library with the GIL
//! released, and ids come back as numpy arrays that own the Rust buffers (no copy).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use coda::tokenizer::{token_file, Tokenizer, Tokens};
use coda::{EncodeOptions, Precision};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyReadonlyArray4, PyUntypedArrayMethods};
use pyo3::exceptions::{
    PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;

/// A library error as the Python exception a user expects: files that cannot be found or read
/// are `OSError` (`FileNotFoundError` when missing), bad arguments and ids are `ValueError`, a
/// job above the memory limit is `MemoryError`.
fn py_err(e: coda::Error) -> PyErr {
    let msg = e.to_string();
    match e {
        coda::Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
        coda::Error::Io { .. } | coda::Error::Image { .. } | coda::Error::Checkpoint { .. } => {
            PyOSError::new_err(msg)
        }
        coda::Error::CheckpointMismatch { .. }
        | coda::Error::Config { .. }
        | coda::Error::Invalid(_) => PyValueError::new_err(msg),
        // A job refused by its memory estimate (nothing was allocated).
        coda::Error::Memory { .. } => PyMemoryError::new_err(msg),
        coda::Error::Candle(_) => PyRuntimeError::new_err(msg),
    }
}

fn precision(name: Option<&str>) -> PyResult<Option<Precision>> {
    name.map(|n| {
        n.parse::<Precision>()
            .and_then(Precision::check_supported)
            .map_err(py_err)
    })
    .transpose()
}

fn encode_options(
    batch: usize,
    sample_seed: Option<u64>,
    prec: Option<&str>,
) -> PyResult<EncodeOptions> {
    Ok(EncodeOptions {
        batch,
        sample_seed,
        precision: precision(prec)?,
    })
}

/// Flat ids [N, L] as a numpy array of the narrowest id type: uint16 when the codebook has at
/// most 65536 codes, else uint32. The array takes over the vector's buffer.
fn ids_to_numpy(py: Python<'_>, flat: Vec<u32>, n: usize, wide: bool) -> PyResult<PyObject> {
    let l = flat.len().checked_div(n).unwrap_or(0);
    if wide {
        Ok(PyArray1::from_vec(py, flat)
            .reshape([n, l])?
            .into_any()
            .unbind())
    } else {
        let narrow: Vec<u16> = flat.into_iter().map(|v| v as u16).collect();
        Ok(PyArray1::from_vec(py, narrow)
            .reshape([n, l])?
            .into_any()
            .unbind())
    }
}

/// The flat ids of tokens, row-major [N, L].
fn flat_ids(tokens: &Tokens) -> coda::Result<Vec<u32>> {
    Ok(tokens.flat()?.flatten_all()?.to_vec1::<u32>()?)
}

/// The loaded tokenizer behind `coda.Tokenizer`.
#[pyclass(frozen, module = "coda._coda", name = "Tokenizer")]
struct PyTokenizer {
    inner: Arc<Tokenizer>,
    /// Where it came from, for pickling: None for the embedded default.
    dir: Option<PathBuf>,
}

impl PyTokenizer {
    fn new(
        tok: Tokenizer,
        dir: Option<PathBuf>,
        prec: Option<&str>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let mut tok = tok;
        if let Some(p) = precision(prec)? {
            tok = tok.with_precision(p).map_err(py_err)?;
        }
        if let Some(t) = threads {
            tok = tok.with_threads(t).map_err(py_err)?;
        }
        Ok(Self {
            inner: Arc::new(tok),
            dir,
        })
    }

    fn wide(&self) -> bool {
        self.inner.codebook_size() > 65536
    }
}

#[pymethods]
impl PyTokenizer {
    #[staticmethod]
    #[pyo3(signature = (path, precision=None, threads=None))]
    fn from_dir(
        py: Python<'_>,
        path: PathBuf,
        precision: Option<&str>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let tok = py
            .allow_threads(|| Tokenizer::from_dir(&path, &Device::Cpu))
            .map_err(py_err)?;
        Self::new(tok, Some(path), precision, threads)
    }

    #[staticmethod]
    #[pyo3(signature = (precision=None, threads=None))]
    fn default(py: Python<'_>, precision: Option<&str>, threads: Option<usize>) -> PyResult<Self> {
        let tok = py
            .allow_threads(|| Tokenizer::default_tokenizer(&Device::Cpu))
            .map_err(py_err)?;
        Self::new(tok, None, precision, threads)
    }

    #[staticmethod]
    #[pyo3(signature = (config_json, weights, origin, precision=None, threads=None))]
    fn from_bytes(
        py: Python<'_>,
        config_json: &str,
        weights: &[u8],
        origin: PathBuf,
        precision: Option<&str>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let tok = Tokenizer::from_bytes(config_json, weights, &origin, &Device::Cpu);
        let _ = py;
        Self::new(tok.map_err(py_err)?, Some(origin), precision, threads)
    }

    /// The folder it was loaded from (None: the embedded default).
    #[getter]
    fn dir(&self) -> Option<PathBuf> {
        self.dir.clone()
    }

    #[getter]
    fn precision(&self) -> &'static str {
        self.inner.precision().name()
    }

    #[getter]
    fn codebook_size(&self) -> usize {
        self.inner.codebook_size()
    }

    #[getter]
    fn hash(&self) -> String {
        self.inner.hash().to_string()
    }

    #[getter]
    fn resolution(&self) -> Option<u32> {
        self.inner.default_image_size()
    }

    #[getter]
    fn downsample_factor(&self) -> usize {
        self.inner.config().vae.downsample_factor()
    }

    fn config_json(&self) -> String {
        serde_json::to_string(self.inner.config()).expect("config serialises")
    }

    fn scales(&self, height: usize, width: usize) -> PyResult<Vec<(usize, usize)>> {
        self.inner.scales_for_image(height, width).map_err(py_err)
    }

    fn square_image_size_for(&self, tokens_per_image: usize) -> PyResult<(usize, usize)> {
        self.inner
            .square_image_size_for(tokens_per_image)
            .map_err(py_err)
    }

    /// uint8 [N, H, W, 3] (C-contiguous) -> flat ids [N, L].
    #[pyo3(signature = (images, size, precision, sample_seed, batch))]
    fn encode_array(
        &self,
        py: Python<'_>,
        images: PyReadonlyArray4<'_, u8>,
        size: Option<u32>,
        precision: Option<&str>,
        sample_seed: Option<u64>,
        batch: usize,
    ) -> PyResult<PyObject> {
        let shape = images.shape().to_vec();
        let (n, h, w) = (shape[0], shape[1], shape[2]);
        if shape[3] != 3 {
            return Err(PyValueError::new_err(format!(
                "images must be [N, H, W, 3] RGB, got {} channels",
                shape[3]
            )));
        }
        let data = images
            .as_slice()
            .map_err(|_| PyValueError::new_err("images must be a C-contiguous array"))?;
        // One copy into image buffers while the GIL is held; the model runs without it.
        let per = h * w * 3;
        let imgs: Vec<image::RgbImage> = (0..n)
            .map(|i| {
                image::RgbImage::from_raw(w as u32, h as u32, data[i * per..(i + 1) * per].to_vec())
                    .expect("buffer of the image's size")
            })
            .collect();
        let options = encode_options(batch, sample_seed, precision)?;
        let tok = self.inner.clone();
        let flat = py
            .allow_threads(move || {
                let imgs = imgs
                    .into_iter()
                    .map(|im| coda::data::prepare(im, size))
                    .collect::<coda::Result<Vec<_>>>()?;
                flat_ids(&tok.encode_images(&imgs, &options)?)
            })
            .map_err(py_err)?;
        ids_to_numpy(py, flat, n, self.wide())
    }

    /// Image files -> flat ids [N, L] (shorter side to `size`, centre crop, as `coda encode`).
    #[pyo3(signature = (paths, size, precision, sample_seed, batch))]
    fn encode_paths(
        &self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        size: Option<u32>,
        precision: Option<&str>,
        sample_seed: Option<u64>,
        batch: usize,
    ) -> PyResult<PyObject> {
        let n = paths.len();
        let options = encode_options(batch, sample_seed, precision)?;
        let tok = self.inner.clone();
        let flat = py
            .allow_threads(move || flat_ids(&tok.encode_paths(&paths, size, &options)?))
            .map_err(py_err)?;
        ids_to_numpy(py, flat, n, self.wide())
    }

    /// Flat ids [N, L] of H x W images -> uint8 [N, H, W, 3], or float32 in [0, 1].
    #[pyo3(signature = (ids, height, width, scales, precision, as_float))]
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        py: Python<'_>,
        ids: PyReadonlyArray2<'_, u32>,
        height: usize,
        width: usize,
        scales: Option<usize>,
        precision: Option<&str>,
        as_float: bool,
    ) -> PyResult<PyObject> {
        let n = ids.shape()[0];
        let flat = ids.as_array().iter().copied().collect::<Vec<u32>>();
        let prec = self::precision(precision)?;
        let tok = self.inner.clone();
        let images = py
            .allow_threads(move || {
                let tokens = tok.tokens_from_flat(flat, n, height, width)?;
                tok.decode_images(&tokens, scales, prec)
            })
            .map_err(py_err)?;
        let mut pixels: Vec<u8> = Vec::with_capacity(n * height * width * 3);
        for img in images {
            pixels.extend_from_slice(img.as_raw());
        }
        let shape = [n, height, width, 3];
        if as_float {
            let f: Vec<f32> = pixels.into_iter().map(|v| v as f32 / 255.0).collect();
            Ok(PyArray1::from_vec(py, f)
                .reshape(shape)?
                .into_any()
                .unbind())
        } else {
            Ok(PyArray1::from_vec(py, pixels)
                .reshape(shape)?
                .into_any()
                .unbind())
        }
    }

    /// Reconstruction metrics over image files (the `coda eval` harness): the results as JSON.
    #[pyo3(signature = (paths, size, resize, batch, colours))]
    fn evaluate(
        &self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        size: u32,
        resize: Option<u32>,
        batch: usize,
        colours: bool,
    ) -> PyResult<String> {
        use coda::evaluation::{EvalModel, EvalOptions};
        let tok = self.inner.clone();
        py.allow_threads(move || {
            let opts = EvalOptions {
                size,
                resize,
                batch,
                colours,
                data: paths.clone(),
                precision: tok.precision(),
                ..Default::default()
            };
            let r = EvalModel::Tokenizer(&tok).evaluate(&paths, &opts, &mut |_| {})?;
            Ok(r.json.to_string())
        })
        .map_err(py_err)
    }
}

/// An image file -> uint8 [H, W, 3], prepared as the encoders prepare it (shorter side to
/// `size`, centre crop; None keeps its size).
#[pyfunction]
#[pyo3(signature = (path, size=None))]
fn load_image(py: Python<'_>, path: PathBuf, size: Option<u32>) -> PyResult<PyObject> {
    let img = py
        .allow_threads(|| {
            coda::data::load_image(&path).and_then(|im| coda::data::prepare(im, size))
        })
        .map_err(py_err)?;
    image_to_numpy(py, img)
}

/// An RGB image as uint8 [H, W, 3], the array taking over the image's buffer.
fn image_to_numpy(py: Python<'_>, img: image::RgbImage) -> PyResult<PyObject> {
    let (w, h) = img.dimensions();
    Ok(PyArray1::from_vec(py, img.into_raw())
        .reshape([h as usize, w as usize, 3])?
        .into_any()
        .unbind())
}

/// uint8 [H, W, 3] (C-contiguous) -> the image prepared as the encoders prepare files (shorter
/// side to `size`, Lanczos; centre crop).
#[pyfunction]
fn prepare_image(
    py: Python<'_>,
    image: numpy::PyReadonlyArray3<'_, u8>,
    size: u32,
) -> PyResult<PyObject> {
    let shape = image.shape().to_vec();
    if shape[2] != 3 {
        return Err(PyValueError::new_err(format!(
            "image must be [H, W, 3], got {shape:?}"
        )));
    }
    let data = image
        .as_slice()
        .map_err(|_| PyValueError::new_err("image must be a C-contiguous array"))?
        .to_vec();
    let img = image::RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data)
        .expect("buffer of the image's size");
    let out = py
        .allow_threads(move || coda::data::prepare(img, Some(size)))
        .map_err(py_err)?;
    image_to_numpy(py, out)
}

/// A token file -> (flat ids [N, L], metadata as JSON text).
#[pyfunction]
fn load_tokens(py: Python<'_>, path: PathBuf) -> PyResult<(PyObject, String)> {
    let (tokens, meta) = py
        .allow_threads(|| token_file::read(&path, &Device::Cpu))
        .map_err(py_err)?;
    let n = tokens.batch();
    let flat = flat_ids(&tokens).map_err(py_err)?;
    let scales: Vec<[usize; 2]> = tokens.scales.iter().map(|&(h, w)| [h, w]).collect();
    let json = serde_json::json!({
        "scales": scales,
        "codebook_size": meta.codebook_size,
        "tokenizer_hash": meta.tokenizer_hash,
        "sources": meta.sources,
    });
    Ok((
        ids_to_numpy(py, flat, n, meta.codebook_size > 65536)?,
        json.to_string(),
    ))
}

/// Flat ids [N, L] and their scales -> a token file (written atomically).
#[pyfunction]
fn save_tokens(
    py: Python<'_>,
    path: PathBuf,
    ids: PyReadonlyArray2<'_, u32>,
    scales: Vec<(usize, usize)>,
    codebook_size: usize,
    tokenizer_hash: String,
    sources: Vec<String>,
) -> PyResult<()> {
    let n = ids.shape()[0];
    let flat = ids.as_array().iter().copied().collect::<Vec<u32>>();
    py.allow_threads(move || -> coda::Result<()> {
        if let Some(bad) = flat.iter().find(|&&v| v as usize >= codebook_size) {
            return Err(coda::Error::Invalid(format!(
                "id {bad} is out of range for a codebook of {codebook_size} codes"
            )));
        }
        if scales.is_empty() {
            return Err(coda::Error::Invalid("no scales".into()));
        }
        let l: usize = scales.iter().map(|(h, w)| h * w).sum();
        if flat.len() != n * l {
            return Err(coda::Error::Invalid(format!(
                "ids have {} per image, the scales {scales:?} need {l}",
                flat.len() / n.max(1)
            )));
        }
        if !sources.is_empty() && sources.len() != n {
            return Err(coda::Error::Invalid(format!(
                "{} sources for {n} images",
                sources.len()
            )));
        }
        let t = candle_core::Tensor::from_vec(flat, (n, l), &Device::Cpu)?;
        let tokens = Tokens::from_flat(&t, &scales)?;
        let meta = token_file::TokenFileMeta {
            codebook_size,
            tokenizer_hash,
            sources,
        };
        token_file::write(Path::new(&path), &tokens, &meta)
    })
    .map_err(py_err)
}

#[pymodule]
fn _coda(m: &Bound<'_, PyModule>) -> PyResult<()> {
    coda::quiet_candle_pool();
    coda::single_malloc_arena();
    m.add_class::<PyTokenizer>()?;
    m.add_function(wrap_pyfunction!(load_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(load_image, m)?)?;
    m.add_function(wrap_pyfunction!(prepare_image, m)?)?;
    m.add_function(wrap_pyfunction!(save_tokens, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
