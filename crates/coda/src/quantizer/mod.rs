//! The CODA quantizer: multi-scale residual quantization with attention-based code assignment
//! (coda-method.md §4-6), the resampling it is built on, and its scale schedule.

pub mod attention;
pub mod resample;
pub mod scales;
pub mod soft_assign;

pub use attention::{
    AssignRule, CodaQuantizer, CodeTables, NormKind, QuantizerConfig, QuantizerKind, TrainOutput,
};
pub use scales::ScaleSpec;
