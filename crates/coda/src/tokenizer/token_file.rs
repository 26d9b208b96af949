//! Token files: safetensors with `scale_{k}` [N, h_k, w_k] and `tokens` [N, L] (flat, scale-major),
//! u16 when the codebook has at most 65536 codes, else u32, plus metadata. numpy/safetensors in
//! Python read them as they are.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::tokens::Tokens;
use crate::error::{Error, Result};

/// What a token file says about where its tokens came from.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenFileMeta {
    pub codebook_size: usize,
    pub tokenizer_hash: String,
    /// The image file names, one per row.
    pub sources: Vec<String>,
}

pub fn write(path: &Path, tokens: &Tokens, meta: &TokenFileMeta) -> Result<()> {
    let wide = meta.codebook_size > 65536;
    let n = tokens.batch();
    let per_scale = tokens.to_vecs()?;
    // Every id fits the codebook (and so the u16 of a narrow file): never narrowed silently.
    for (k, ids) in per_scale.iter().enumerate() {
        if let Some(&bad) = ids.iter().find(|&&v| v as usize >= meta.codebook_size) {
            return Err(Error::Invalid(format!(
                "{}: scale_{k} holds id {bad}, out of range for a codebook of {} codes",
                path.display(),
                meta.codebook_size
            )));
        }
    }
    let encode = |v: &[u32]| -> Vec<u8> {
        if wide {
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        } else {
            v.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect()
        }
    };
    let dtype = if wide { Dtype::U32 } else { Dtype::U16 };
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, (ids, &(h, w))) in per_scale.iter().zip(&tokens.scales).enumerate() {
        buffers.push((format!("scale_{k}"), vec![n, h, w], encode(ids)));
    }
    // Flat rows: for each image, its ids of every scale in order.
    let l = tokens.len_per_image();
    let mut flat = Vec::with_capacity(n * l);
    for i in 0..n {
        for (ids, &(h, w)) in per_scale.iter().zip(&tokens.scales) {
            flat.extend_from_slice(&ids[i * h * w..(i + 1) * h * w]);
        }
    }
    buffers.push(("tokens".into(), vec![n, l], encode(&flat)));
    let views: Vec<(String, TensorView)> = buffers
        .iter()
        .map(|(k, shape, bytes)| {
            Ok((
                k.clone(),
                TensorView::new(dtype, shape.clone(), bytes)
                    .map_err(|e| Error::Invalid(e.to_string()))?,
            ))
        })
        .collect::<Result<_>>()?;
    let scales: Vec<[usize; 2]> = tokens.scales.iter().map(|&(h, w)| [h, w]).collect();
    let metadata = HashMap::from([
        ("format".to_string(), "coda-tokens".to_string()),
        ("version".to_string(), "1".to_string()),
        (
            "scales".to_string(),
            serde_json::to_string(&scales).unwrap(),
        ),
        ("codebook_size".to_string(), meta.codebook_size.to_string()),
        ("tokenizer_hash".to_string(), meta.tokenizer_hash.clone()),
        (
            "sources".to_string(),
            serde_json::to_string(&meta.sources).unwrap(),
        ),
    ]);
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::Invalid(format!("cannot serialise {}: {e}", path.display())))?;
    crate::io::write_atomic(path, &sorted_header(bytes))
}

/// `safetensors` writes the metadata in a `HashMap`'s order, which changes from one run to the
/// next: the header rewritten with its keys sorted (same length, padded with spaces as the format
/// allows; the tensors' offsets are relative to the header's end), so that the same tokens always
/// give the same bytes.
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8-byte length")) as usize;
    let Ok(header) = serde_json::from_slice::<serde_json::Value>(&bytes[8..8 + n]) else {
        return bytes;
    };
    // serde_json's maps are ordered by key (no `preserve_order`).
    let sorted = serde_json::to_vec(&header).expect("a parsed header serialises");
    if sorted.len() <= n {
        bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
        bytes[8 + sorted.len()..8 + n].fill(b' ');
    }
    bytes
}

/// Read a token file, checking that its tensors agree with each other and with its metadata.
pub fn read(path: &Path, device: &Device) -> Result<(Tokens, TokenFileMeta)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::Checkpoint {
        path: path.into(),
        reason,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a token file ({e})")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a token file ({e})")))?;
    let md = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        md.get(k)
            .cloned()
            .ok_or_else(|| bad(format!("metadata has no '{k}' (not a coda token file?)")))
    };
    if get("format")? != "coda-tokens" {
        return Err(bad(format!(
            "format {:?}, expected \"coda-tokens\"",
            get("format")?
        )));
    }
    if get("version")? != "1" {
        return Err(bad(format!(
            "token file version {} (this build reads version 1)",
            get("version")?
        )));
    }
    let scales: Vec<[usize; 2]> = serde_json::from_str(&get("scales")?)
        .map_err(|e| bad(format!("bad 'scales' metadata: {e}")))?;
    let scales: Vec<(usize, usize)> = scales.into_iter().map(|[h, w]| (h, w)).collect();
    if scales.is_empty() || scales.iter().any(|&(h, w)| h == 0 || w == 0) {
        return Err(bad(format!(
            "'scales' metadata {scales:?}: at least one scale, each at least 1x1"
        )));
    }
    let meta = TokenFileMeta {
        codebook_size: get("codebook_size")?
            .parse()
            .map_err(|e| bad(format!("bad 'codebook_size': {e}")))?,
        tokenizer_hash: get("tokenizer_hash")?,
        sources: md
            .get("sources")
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
    };
    let load = |name: &str| -> Result<(Vec<usize>, Vec<u32>)> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("missing tensor '{name}'")))?;
        let data: Vec<u32> = match t.dtype() {
            Dtype::U16 => t
                .data()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect(),
            Dtype::U32 => t
                .data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            d => {
                return Err(bad(format!(
                    "tensor '{name}' has dtype {d:?}, expected U16 or U32"
                )))
            }
        };
        Ok((t.shape().to_vec(), data))
    };
    let (flat_shape, flat) = load("tokens")?;
    let n = flat_shape.first().copied().unwrap_or(0);
    if n == 0 {
        return Err(bad("the file holds no images (zero rows)".into()));
    }
    let l: usize = scales.iter().map(|(h, w)| h * w).sum();
    if flat_shape != [n, l] {
        return Err(bad(format!(
            "tensor 'tokens' has shape {flat_shape:?}, the scales need [{n}, {l}]"
        )));
    }
    if let Some(pos) = flat.iter().position(|&v| v as usize >= meta.codebook_size) {
        return Err(bad(format!(
            "tensor 'tokens' holds id {} at {pos}, but the codebook has {} codes",
            flat[pos], meta.codebook_size
        )));
    }
    let flat_t = Tensor::from_vec(flat, (n, l), device)?;
    let tokens = Tokens::from_flat(&flat_t, &scales)?;
    // The per-scale tensors must say the same as the flat one.
    for (k, (&(h, w), ids)) in scales.iter().zip(tokens.to_vecs()?).enumerate() {
        let name = format!("scale_{k}");
        let (shape, data) = load(&name)?;
        if shape != [n, h, w] {
            return Err(bad(format!(
                "tensor '{name}' has shape {shape:?}, expected [{n}, {h}, {w}]"
            )));
        }
        if data != ids {
            return Err(bad(format!("tensor '{name}' disagrees with 'tokens'")));
        }
    }
    if st.names().len() != scales.len() + 1 {
        return Err(bad(format!(
            "{} tensors for {} scales",
            st.names().len(),
            scales.len()
        )));
    }
    Ok((tokens, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(v: u32) -> Tokens {
        let scales = vec![(1, 1), (2, 3)];
        let flat: Vec<u32> = (0..14).map(|i| (i * 7919) % v).collect();
        Tokens::from_flat(
            &Tensor::from_vec(flat, (2, 7), &Device::Cpu).unwrap(),
            &scales,
        )
        .unwrap()
    }

    fn meta(v: usize) -> TokenFileMeta {
        TokenFileMeta {
            codebook_size: v,
            tokenizer_hash: "abc".into(),
            sources: vec!["a.png".into(), "b.png".into()],
        }
    }

    #[test]
    fn round_trips_u16_and_u32() {
        let dir = tempfile::tempdir().unwrap();
        for v in [65536usize, 100_000] {
            let p = dir.path().join(format!("t{v}.safetensors"));
            let t = tokens(v as u32);
            write(&p, &t, &meta(v)).unwrap();
            let (back, m) = read(&p, &Device::Cpu).unwrap();
            assert_eq!(m, meta(v));
            assert_eq!(
                back.flat().unwrap().to_vec2::<u32>().unwrap(),
                t.flat().unwrap().to_vec2::<u32>().unwrap()
            );
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let want = if v <= 65536 { Dtype::U16 } else { Dtype::U32 };
            assert_eq!(st.tensor("tokens").unwrap().dtype(), want);
        }
    }

    /// The metadata's HashMap order differs between maps (and runs): the file must not.
    #[test]
    fn the_same_tokens_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let t = tokens(1000);
        write(&p, &t, &meta(1000)).unwrap();
        let first = std::fs::read(&p).unwrap();
        for _ in 0..8 {
            write(&p, &t, &meta(1000)).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), first);
        }
        let (back, m) = read(&p, &Device::Cpu).unwrap();
        assert_eq!(m, meta(1000));
        assert_eq!(
            back.flat().unwrap().to_vec2::<u32>().unwrap(),
            t.flat().unwrap().to_vec2::<u32>().unwrap()
        );
    }

    #[test]
    fn ids_out_of_range_and_inconsistent_tensors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        // Ids up to 99 are not written as tokens of a codebook of 10 (issue #15: no silent
        // narrowing), and a file that claims so is refused on reading.
        let err = write(&p, &tokens(100), &meta(10)).unwrap_err().to_string();
        assert!(err.contains("out of range for a codebook of 10"), "{err}");
        assert!(!p.exists());
        write(&p, &tokens(100), &meta(100)).unwrap();
        let good = std::fs::read(&p).unwrap();
        let claim = |md: &[(&str, &str)]| {
            let st = safetensors::SafeTensors::deserialize(&good).unwrap();
            let views: Vec<(String, TensorView)> = st
                .tensors()
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        TensorView::new(v.dtype(), v.shape().to_vec(), v.data()).unwrap(),
                    )
                })
                .collect();
            let md: HashMap<String, String> = md
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            std::fs::write(&p, safetensors::tensor::serialize(views, Some(md)).unwrap()).unwrap();
            read(&p, &Device::Cpu).unwrap_err().to_string()
        };
        let base = [
            ("format", "coda-tokens"),
            ("version", "1"),
            ("scales", "[[1,1],[2,3]]"),
            ("tokenizer_hash", "abc"),
        ];
        let err = claim(&[&base[..], &[("codebook_size", "10")]].concat());
        assert!(
            err.contains("'tokens' holds id") && err.contains("10 codes"),
            "{err}"
        );
        // Format and version are checked (version "999" was accepted).
        let mut v999 = base;
        v999[1] = ("version", "999");
        let err = claim(&[&v999[..], &[("codebook_size", "100")]].concat());
        assert!(err.contains("version 999"), "{err}");
        let mut other = base;
        other[0] = ("format", "npz");
        let err = claim(&[&other[..], &[("codebook_size", "100")]].concat());
        assert!(err.contains("format"), "{err}");
        // Scales metadata that contradicts the tensors: the error names the tensor.
        let mut swapped = base;
        swapped[2] = ("scales", "[[1,1],[3,2]]");
        let err = claim(&[&swapped[..], &[("codebook_size", "100")]].concat());
        assert!(
            err.contains("scale_1") && err.contains("[2, 3, 2]"),
            "{err}"
        );
    }

    /// Issue #15: empty scales metadata and a file with zero rows were panics in `coda decode`.
    #[test]
    fn empty_scales_and_zero_rows_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let with = |scales: &str, rows: usize| {
            let data = vec![0u8; rows * 2];
            let views = vec![(
                "tokens".to_string(),
                TensorView::new(Dtype::U16, vec![rows, 1], &data).unwrap(),
            )];
            let md = HashMap::from([
                ("format".to_string(), "coda-tokens".to_string()),
                ("version".to_string(), "1".to_string()),
                ("scales".to_string(), scales.to_string()),
                ("codebook_size".to_string(), "10".to_string()),
                ("tokenizer_hash".to_string(), "abc".to_string()),
            ]);
            std::fs::write(&p, safetensors::tensor::serialize(views, Some(md)).unwrap()).unwrap();
            read(&p, &Device::Cpu).unwrap_err().to_string()
        };
        let e = with("[]", 1);
        assert!(e.contains("at least one scale"), "{e}");
        let e = with("[[0,1]]", 1);
        assert!(e.contains("at least 1x1"), "{e}");
        let e = with("[[1,1]]", 0);
        assert!(e.contains("zero rows"), "{e}");
    }
}
