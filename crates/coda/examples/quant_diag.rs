//! Where a tokenizer loses quality (a diagnostic, not a test):
//! `cargo run --release --example quant_diag -- TOKENIZER_DIR IMAGE_DIR [SIZE]`.
//!
//! For every image (shorter side to 9/8 SIZE, centre crop SIZE) it reports the PSNR of
//! - the continuous path: the LoRA-adapted encoder's latent decoded directly (no quantizer);
//! - the tokenizer as it is (attention argmax at every scale);
//! - an oracle that picks, at every scale, the code whose value vector is nearest the residual
//!   (the same codes table, another assignment rule);
//!
//! and the residual energy left after each scale for both rules, relative to the latent's.

use std::path::Path;

use candle_core::{Device, Tensor};
use coda::data::{image_io, loader::resize_shorter};
use coda::quantizer::resample::{Mode, Resize2d};
use coda::tokenizer::Tokenizer;

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let ia = image_io::tensor_to_images(a).unwrap();
    let ib = image_io::tensor_to_images(b).unwrap();
    let mut s = 0.0;
    for (x, y) in ia.iter().zip(&ib) {
        s += coda::evaluation::psnr::psnr_u8(x, y);
    }
    s / ia.len() as f64
}

fn energy(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev = Device::Cpu;
    let tok = Tokenizer::from_dir(Path::new(&args[1]), &dev)?;
    let size: u32 = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(128);
    let mut paths: Vec<_> = std::fs::read_dir(&args[2])?
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let images: Vec<_> = paths
        .iter()
        .map(|p| {
            let img = image_io::load_image(p).unwrap();
            let side = (size as f64 * 1.125).round() as u32;
            image_io::center_crop(&resize_shorter(&img, side), size)
        })
        .collect();
    let x = image_io::images_to_tensor(&images, &dev)?;
    let enc = tok.encode_with(&x, coda::tokenizer::Posterior::Mean)?;
    let f = &enc.latent;
    let (_, _, hh, ww) = f.dims4()?;
    let e0 = energy(f);

    let cont = tok.decode_latent(f)?;
    let quant = tok.decode_latent(&enc.latent_hat)?;
    println!(
        "images {} at {size} px, latent {:?}",
        images.len(),
        f.dims()
    );
    println!("continuous (no quantizer) PSNR {:.2}", psnr(&x, &cont));
    println!(
        "tokenizer ({:?} rule)  PSNR {:.2}",
        tok.config().quantizer.assign,
        psnr(&x, &quant)
    );

    // The residual loop with each assignment rule.
    let q = tok.quantizer();
    let tables = q.tables()?;
    let values = &tables.values; // (V, C)
    let vnorm = values.sqr()?.sum_keepdim(1)?.t()?; // (1, V)
    for rule in ["attention", "nearest"] {
        if rule == "attention"
            && tok.config().quantizer.assign != coda::quantizer::AssignRule::Attention
        {
            continue;
        }
        let mut r = f.clone();
        let mut fh = f.zeros_like()?;
        let mut line = String::new();
        for &s in &enc.tokens.scales {
            let qs = Resize2d::new(Mode::Area, (hh, ww), s, &dev)?.apply(&r)?;
            // "attention": the tokenizer's own rule (the attention argmax unless its config
            // says nearest_value).
            let ids = if rule == "attention" {
                q.assign(&tables, &qs)?
            } else {
                let (b, c, h, w) = qs.dims4()?;
                let t = qs.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
                // |t - v|² = |t|² - 2 t·v + |v|²: argmin over codes.
                let d = (vnorm.broadcast_as((b * h * w, vnorm.dim(1)?))?
                    - (t.matmul(&values.t()?)? * 2.0)?)?;
                d.argmin(1)?.reshape((b, h, w))?
            };
            let z = q.lookup(&tables, &ids)?;
            let up = Resize2d::new(Mode::Bicubic, s, (hh, ww), &dev)?.apply(&z)?;
            fh = (fh + &up)?;
            r = (r - up)?;
            line += &format!(" {:.3}", energy(&r) / e0);
        }
        let img = tok.decode_latent(&fh)?;
        println!(
            "{rule:9} PSNR {:.2}  residual energy after each scale:{line}",
            psnr(&x, &img)
        );
    }
    Ok(())
}
