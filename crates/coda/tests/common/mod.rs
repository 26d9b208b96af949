//! Helpers shared by the parity tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// `fixtures/<sub>` at the repository root (written by scripts/make_fixtures.py). `CODA_REPO`
/// names the root for test binaries run away from where they were built (scripts/gpu_check.sh).
pub fn fixtures(sub: &str) -> PathBuf {
    match std::env::var_os("CODA_REPO") {
        Some(root) => PathBuf::from(root).join("fixtures").join(sub),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(sub),
    }
}

/// The device the parity tests run on: `CODA_TEST_DEVICE=cuda[:N]` in a build with the `cuda`
/// feature (scripts/gpu_check.sh), else the CPU. With `CODA_GENERIC_OPS=1` the CPU runs the
/// candle ops CUDA runs instead of our kernels.
pub fn device() -> Device {
    match std::env::var("CODA_TEST_DEVICE") {
        Ok(spec) => {
            coda::device::parse(&spec).unwrap_or_else(|e| panic!("CODA_TEST_DEVICE={spec}: {e}"))
        }
        Err(_) => Device::Cpu,
    }
}

/// All tensors of a safetensors fixture, on the test device.
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &device())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Max abs difference of two same-shaped tensors.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute value of a tensor (the scale for relative tolerances).
pub fn abs_max(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
