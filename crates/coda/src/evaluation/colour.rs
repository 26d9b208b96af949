//! Colour fidelity on solid patches: every colour of the 3x3x3 grid {0, 128, 255}^3 of the RGB
//! cube (its corners, edge midpoints, face centres and centre) plus three mid-saturation colours
//! a photo holds (green, purple, teal), each as a flat square image, through a model. A flat
//! patch carries no texture to hide a colour shift: what comes back is the model's colour map.

use candle_core::{Device, Tensor};

use crate::data::{images_to_tensor, tensor_to_images};
use crate::error::Result;

/// The probe colours: the 27 grid points, then green (40, 160, 60), purple (150, 120, 200) and
/// teal (20, 120, 110).
pub fn probe_colours() -> Vec<[u8; 3]> {
    let levels = [0u8, 128, 255];
    let mut out = Vec::with_capacity(30);
    for r in levels {
        for g in levels {
            for b in levels {
                out.push([r, g, b]);
            }
        }
    }
    out.extend([[40, 160, 60], [150, 120, 200], [20, 120, 110]]);
    out
}

/// One patch: its colour, the mean colour that came back (0-255) and the mean absolute error per
/// channel over all pixels of the 8-bit reconstruction (0-255).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ColourResult {
    pub rgb: [u8; 3],
    pub reconstructed: [f64; 3],
    pub mae: f64,
}

/// Reconstructs a `size` x `size` patch of every probe colour with `reconstruct` (a batch of
/// images in [-1, 1] -> reconstructions in [-1, 1]) and measures each.
pub fn colour_probe(
    size: u32,
    device: &Device,
    reconstruct: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Vec<ColourResult>> {
    let colours = probe_colours();
    let patches: Vec<image::RgbImage> = colours
        .iter()
        .map(|&c| image::RgbImage::from_pixel(size, size, image::Rgb(c)))
        .collect();
    let recon = tensor_to_images(&reconstruct(&images_to_tensor(&patches, device)?)?)?;
    Ok(colours
        .iter()
        .zip(&recon)
        .map(|(&rgb, img)| {
            let n = img.pixels().len() as f64;
            let (mut sum, mut abs) = ([0f64; 3], 0f64);
            for p in img.pixels() {
                for c in 0..3 {
                    sum[c] += p[c] as f64;
                    abs += (p[c] as f64 - rgb[c] as f64).abs();
                }
            }
            ColourResult {
                rgb,
                reconstructed: sum.map(|s| s / n),
                mae: abs / (3.0 * n),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_exact_and_a_shift_is_measured() {
        let d = Device::Cpu;
        let colours = probe_colours();
        assert_eq!(colours.len(), 30);
        assert!(colours.contains(&[0, 0, 0]) && colours.contains(&[255, 255, 255]));
        assert!(colours.contains(&[128, 128, 128]));
        let same = colour_probe(8, &d, |x| Ok(x.clone())).unwrap();
        assert!(same.iter().all(|r| r.mae == 0.0));
        assert_eq!(same[13].reconstructed, [128.0; 3]);
        // A model that adds 10/127.5 to red only: red is off by 10 where it has room (a third of
        // the MAE), and clamped at 255.
        let shifted = colour_probe(8, &d, |x| {
            let bump = Tensor::new(&[10f32 / 127.5, 0.0, 0.0], &d)?.reshape((1, 3, 1, 1))?;
            Ok(x.broadcast_add(&bump)?)
        })
        .unwrap();
        let black = &shifted[0];
        assert_eq!(black.reconstructed, [10.0, 0.0, 0.0]);
        assert!((black.mae - 10.0 / 3.0).abs() < 1e-9);
        let red = shifted.iter().find(|r| r.rgb == [255, 0, 0]).unwrap();
        assert_eq!(red.mae, 0.0);
    }
}
