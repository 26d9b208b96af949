//! Checking a set of named tensors against the parameters a model needs.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Compare tensors with the expected names and shapes: every missing, unexpected and mis-shaped
/// tensor is reported (the first 10 of each, and the counts), so that nothing loads silently wrong.
pub fn check_tensor_shapes(
    expected: &[(String, Vec<usize>)],
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let expected_names: BTreeSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (k, shape) in expected {
        match tensors.get(k) {
            None => missing.push(k.clone()),
            Some(t) if t.dims() != shape.as_slice() => mismatched.push(format!(
                "{k}: checkpoint has {:?}, architecture needs {:?}",
                t.dims(),
                shape
            )),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !expected_names.contains(k.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    if missing.is_empty() && unexpected.is_empty() && mismatched.is_empty() {
        return Ok(());
    }
    let mut report = String::new();
    for (what, list) in [
        ("shape mismatches", &mismatched),
        ("missing tensors", &missing),
        ("unexpected tensors", &unexpected),
    ] {
        if list.is_empty() {
            continue;
        }
        report.push_str(&format!("  {} {what}:\n", list.len()));
        for item in list.iter().take(10) {
            report.push_str(&format!("    {item}\n"));
        }
        if list.len() > 10 {
            report.push_str(&format!("    ... and {} more\n", list.len() - 10));
        }
    }
    Err(Error::CheckpointMismatch {
        path: path.into(),
        report: report.trim_end().to_string(),
    })
}
