//! File input and output: named tensors in checkpoint formats, and writes that never leave a
//! half-written file behind.

mod atomic;
mod check;
mod failpoint;
mod tensors;

pub use atomic::{remove_temp_siblings, write_atomic, write_atomic_with, write_dir_atomic};
pub use check::check_tensor_shapes;
pub use failpoint::failpoint;
pub use tensors::{check_finite, read_tensors, write_safetensors};
