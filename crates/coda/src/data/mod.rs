//! Images in and out: decoding, resizing and cropping, conversion to and from tensors.

pub mod image_io;

pub use image_io::{images_to_tensor, load_image, prepare, save_png, tensor_to_images};
