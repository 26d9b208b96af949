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
    check_pth_bounds(path)?;
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

/// Bound what a `.pth` may make the parser allocate, before candle parses it (found by fuzzing,
/// fuzz/regressions/vae_checkpoint): a string in the pickle longer than the pickle itself, or a
/// tensor whose declared shape needs more bytes than the whole file holds.
fn check_pth_bounds(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let file_len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let Ok(mut zip) = zip::ZipArchive::new(std::io::BufReader::new(f)) else {
        return Ok(()); // not a zip: candle reports it
    };
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|c| c.into_owned()))
        .collect();
    for name in names.iter().filter(|n| n.ends_with("data.pkl")) {
        let mut bytes = Vec::new();
        let entry = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
        entry
            .take(file_len.saturating_mul(16))
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{name}: {e}"))?;
        check_pickle_lengths(&bytes).map_err(|e| format!("{name}: {e}"))?;
    }
    for key in std::iter::once(None).chain(NESTED_KEYS.iter().map(|k| Some(*k))) {
        let Ok(infos) = candle_core::pickle::read_pth_tensor_info(path, false, key) else {
            continue;
        };
        for i in infos {
            let need = (i.layout.shape().dims().iter())
                .fold(i.dtype.size_in_bytes() as u64, |a, &d| {
                    a.saturating_mul(d as u64)
                });
            if need > file_len {
                return Err(format!(
                    "tensor {} declares shape {:?} ({need} bytes), more than the whole file ({file_len} bytes)",
                    i.name,
                    i.layout.dims()
                ));
            }
        }
    }
    Ok(())
}

/// Walk a pickle's opcodes (the subset candle's parser knows, with their argument sizes) and
/// refuse a length-prefixed string longer than what follows it. Stops at the first opcode
/// candle does not know (it refuses those itself).
fn check_pickle_lengths(p: &[u8]) -> std::result::Result<(), String> {
    let mut i = 0usize;
    let skip = |i: &mut usize, n: usize| -> std::result::Result<(), String> {
        *i = i
            .checked_add(n)
            .filter(|&e| e <= p.len())
            .ok_or("truncated pickle")?;
        Ok(())
    };
    while i < p.len() {
        let op = p[i];
        i += 1;
        match op {
            b'.' => return Ok(()),
            0x80 | b'q' | b'K' | b'h' => skip(&mut i, 1)?,
            b'M' => skip(&mut i, 2)?,
            b'r' | b'J' | b'j' => skip(&mut i, 4)?,
            b'G' => skip(&mut i, 8)?,
            0x8a => {
                let n = *p.get(i).ok_or("truncated pickle")? as usize;
                skip(&mut i, 1 + n)?;
            }
            b'X' => {
                let b = p.get(i..i + 4).ok_or("truncated pickle")?;
                let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                i += 4;
                if len > p.len() - i {
                    return Err(format!(
                        "a string of {len} bytes at offset {i} of a {}-byte pickle",
                        p.len()
                    ));
                }
                i += len;
            }
            b'c' => {
                for _ in 0..2 {
                    let nl = p[i..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .ok_or("truncated pickle")?;
                    i += nl + 1;
                }
            }
            b')' | b'R' | b'(' | b't' | b'Q' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | b'N' | b's'
            | b'u' | b'}' | b'd' | b'b' | 0x81 | b']' | b'a' | b'e' => {}
            _ => return Ok(()),
        }
    }
    Ok(())
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
