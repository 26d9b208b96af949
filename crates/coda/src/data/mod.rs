//! Images in and out: decoding, resizing and cropping, conversion to and from tensors, and
//! gathering image files from folders.

pub mod dataset;
pub mod folder;
pub mod image_io;
pub mod loader;

pub use folder::{collect_images, load_prepared};
pub use image_io::{
    center_crop, images_to_tensor, load_image, prepare, prepare_random_crop, save_png,
    tensor_to_images,
};
