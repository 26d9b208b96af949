//! Reading and writing named tensors: safetensors, and PyTorch `.pth`/`.ckpt` pickles
//! (plain state dicts, or ones nested under `state_dict`, `model` or `ema`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The keys under which training scripts commonly nest the state dict in a pickle.
const NESTED_KEYS: [&str; 4] = ["state_dict", "model", "ema", "module"];

/// Read every tensor of a checkpoint file, converted to f32 on `device`.
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::Checkpoint {
            path: path.into(),
            reason: "is a folder, expected a .safetensors or .pth file".into(),
        });
    }
    let bad = |reason: String| Error::Checkpoint {
        path: path.into(),
        reason,
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let raw: Vec<(String, Tensor)> = match ext.as_str() {
        "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?
            .into_iter()
            .collect(),
        "pth" | "pt" | "ckpt" | "bin" => read_pickle(path).map_err(|e| bad(e.to_string()))?,
        _ => {
            return Err(bad(format!(
                "unknown extension '{ext}' (expected .safetensors, .pth, .pt, .ckpt or .bin)"
            )))
        }
    };
    if raw.is_empty() {
        return Err(bad("holds no tensors".into()));
    }
    raw.into_iter()
        .map(|(k, t)| {
            let t = t.to_dtype(DType::F32)?;
            check_finite(&k, &t, path)?;
            Ok((k, t.to_device(device)?))
        })
        .collect()
}

/// Refuse a tensor holding NaN or infinite values (issue #15: a damaged checkpoint would
/// otherwise load and produce black or NaN images with exit 0).
pub fn check_finite(key: &str, t: &Tensor, path: &Path) -> Result<()> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        return Err(Error::Checkpoint {
            path: path.into(),
            reason: format!(
                "{key} holds {bad} non-finite value(s) (NaN or infinite) of {}: the checkpoint is damaged",
                v.len()
            ),
        });
    }
    Ok(())
}

fn read_pickle(path: &Path) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let first = candle_core::pickle::read_all(path)
        .map_err(|e| format!("not a readable PyTorch zip checkpoint ({e})"))?;
    if !first.is_empty() {
        return Ok(first);
    }
    for key in NESTED_KEYS {
        if let Ok(ts) = candle_core::pickle::read_all_with_key(path, Some(key)) {
            if !ts.is_empty() {
                return Ok(ts);
            }
        }
    }
    Ok(Vec::new())
}

/// Write tensors as safetensors, atomically, with string metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::tensor::serialize(views.iter().map(|(k, t)| (k.as_str(), t)), metadata)
            .map_err(|e| {
                Error::Invalid(format!(
                    "cannot serialise tensors for {}: {e}",
                    path.display()
                ))
            })?;
    crate::io::write_atomic(path, &bytes)
}
