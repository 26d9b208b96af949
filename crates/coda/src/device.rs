//! Choosing the device a job runs on: `cpu`, `cuda` or `cuda:N`.
//!
//! A build with the `cuda` feature runs on the first GPU by default when the CUDA driver and a
//! GPU are present, and on the CPU otherwise; a build without it refuses `cuda` with the reason.
//! On a CUDA device every op is a composite of candle's ops (our kernels are CPU code), the
//! quantizer's training ops recompute their (N, V) terms chunk by chunk there too, and f32
//! matrix products keep full f32 precision (no TF32), so that ids are those of the CPU except at
//! near-ties.

use candle_core::Device;

use crate::{Error, Result};

/// The device named by `spec`: `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(n) => n
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| bad_spec(spec))?,
        None => return Err(bad_spec(spec)),
    };
    cuda(ordinal)
}

fn bad_spec(spec: &str) -> Error {
    Error::Invalid(format!(
        "unknown device {spec:?}: expected cpu, cuda or cuda:N"
    ))
}

/// The default device: the first GPU in a `cuda` build where one is usable, else the CPU.
pub fn default_device() -> Device {
    cuda(0).unwrap_or(Device::Cpu)
}

/// A short name of a device for logs and reports: `cpu` or `cuda:N`.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    // Full f32 products: TF32 would change ids far from ties.
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(false);
    std::panic::catch_unwind(|| Device::new_cuda(ordinal))
        .map_err(|_| Error::Invalid(format!("cuda:{ordinal}: the CUDA runtime failed to start")))?
        .map_err(|e| Error::Invalid(format!("cuda:{ordinal}: no usable GPU ({e})")))
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Invalid(format!(
        "cuda:{ordinal}: this build has no CUDA support (build with `--features cuda`, see README)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_are_refused_with_the_reason() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse(" CPU ").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0", "cuda:-1", ""] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        if !cfg!(feature = "cuda") {
            let e = parse("cuda:1").unwrap_err().to_string();
            assert!(e.contains("no CUDA support"), "{e}");
            assert!(default_device().is_cpu());
        }
        assert_eq!(name(&Device::Cpu), "cpu");
    }
}
