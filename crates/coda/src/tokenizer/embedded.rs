//! The default tokenizer compiled into the library (assets/tokenizer/, trained on this
//! project's photos; see README), behind the `default-tokenizer` cargo feature (on by default).

use candle_core::Device;

use super::Tokenizer;
use crate::error::Result;

const CONFIG: &str = include_str!("../../../../assets/tokenizer/config.json");
const WEIGHTS: &[u8] = include_bytes!("../../../../assets/tokenizer/model.safetensors");

/// How errors and reports name the embedded tokenizer.
pub const DEFAULT_TOKENIZER_NAME: &str = "<embedded default tokenizer>";

impl Tokenizer {
    /// The embedded default tokenizer.
    pub fn default_tokenizer(device: &Device) -> Result<Self> {
        Self::from_bytes(
            CONFIG,
            WEIGHTS,
            std::path::Path::new(DEFAULT_TOKENIZER_NAME),
            device,
        )
    }

    /// The two files of the embedded default tokenizer (config.json text, model.safetensors
    /// bytes), e.g. to write it out as a folder.
    pub fn default_tokenizer_files() -> (&'static str, &'static [u8]) {
        (CONFIG, WEIGHTS)
    }
}
