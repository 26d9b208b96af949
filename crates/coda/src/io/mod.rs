//! File input and output: named tensors in checkpoint formats, and writes that never leave a
//! half-written file behind.

mod atomic;
mod check;
mod tensors;

pub use atomic::{write_atomic, write_atomic_with};
pub use check::check_tensor_shapes;
pub use tensors::{read_tensors, write_safetensors};
