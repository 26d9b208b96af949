//! `coda eval --report`: one self-contained HTML page (images inlined as base64 PNG) with the
//! metrics table, originals / reconstructions / error maps, coarse-to-fine strips, and a plot of
//! codebook usage per scale (drawn with plotters).

use std::path::Path;

use base64::Engine;
use image::RgbImage;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// One evaluated image, for the picture grid.
pub struct Sample {
    pub name: String,
    pub original: RgbImage,
    pub reconstruction: RgbImage,
    /// Decoded from 1, 2, ..., K scales, side by side (tokenizers only).
    pub progressive: Option<RgbImage>,
}

/// The rows of the metrics table: (label, value as printed). The same strings are what a reader
/// compares with the JSON.
pub type Rows = Vec<(String, String)>;

fn png_data_uri(img: &RgbImage) -> Result<String> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Invalid(format!("cannot encode PNG: {e}")))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// |original − reconstruction| averaged over channels, amplified 4x, as a gray image.
pub fn error_map(a: &RgbImage, b: &RgbImage) -> RgbImage {
    RgbImage::from_fn(a.width(), a.height(), |x, y| {
        let (p, q) = (a.get_pixel(x, y).0, b.get_pixel(x, y).0);
        let d: u32 = (0..3)
            .map(|c| (p[c] as i32 - q[c] as i32).unsigned_abs())
            .sum::<u32>()
            / 3;
        let v = (d * 4).min(255) as u8;
        image::Rgb([v, v, v])
    })
}

/// Codebook usage (%) per scale as a bar chart.
pub fn usage_plot(usage_per_scale: &[f64]) -> Result<RgbImage> {
    static FONT: &[u8] = include_bytes!("../../../../assets/fonts/DejaVuSans.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let (w, h) = (640u32, 320u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let plot_err = |e: String| Error::Invalid(format!("plot: {e}"));
        root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
        let k = usage_per_scale.len();
        let mut chart = ChartBuilder::on(&root)
            .caption("codebook usage per scale", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(0.5f64..k as f64 + 0.5, 0f64..100f64)
            .map_err(|e| plot_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("scale")
            .y_desc("% of codes used")
            .x_labels(k.min(20))
            .x_label_formatter(&|v| format!("{}", v.round() as usize))
            .draw()
            .map_err(|e| plot_err(e.to_string()))?;
        chart
            .draw_series(usage_per_scale.iter().enumerate().map(|(i, &u)| {
                let x = i as f64 + 1.0;
                Rectangle::new(
                    [(x - 0.4, 0.0), (x + 0.4, u)],
                    RGBColor(66, 110, 180).filled(),
                )
            }))
            .map_err(|e| plot_err(e.to_string()))?;
        root.present().map_err(|e| plot_err(e.to_string()))?;
    }
    RgbImage::from_raw(w, h, buf).ok_or_else(|| Error::Invalid("plot buffer".into()))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Write `dir/index.html`.
pub fn write(
    dir: &Path,
    title: &str,
    rows: &Rows,
    samples: &[Sample],
    usage_per_scale: Option<&[f64]>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut html = String::new();
    html.push_str(&format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}} td.v{{text-align:right;font-family:monospace}}\
         .grid{{display:grid;grid-template-columns:repeat(3,auto);gap:6px;justify-content:start}}\
         figure{{margin:0}} figcaption{{font-size:12px;color:#555}} img{{image-rendering:pixelated}}</style></head><body>\
         <h1>{t}</h1><h2>Metrics</h2><table id=\"metrics\"><tr><th>metric</th><th>value</th></tr>",
        t = escape(title)
    ));
    for (k, v) in rows {
        html.push_str(&format!(
            "<tr><td>{}</td><td class=\"v\">{}</td></tr>",
            escape(k),
            escape(v)
        ));
    }
    html.push_str("</table>");
    if let Some(u) = usage_per_scale {
        html.push_str(&format!(
            "<h2>Codebook</h2><img id=\"usage\" alt=\"codebook usage per scale\" src=\"{}\">",
            png_data_uri(&usage_plot(u)?)?
        ));
    }
    html.push_str(
        "<h2>Reconstructions</h2><p>original / reconstruction / |error| x4</p><div class=\"grid\">",
    );
    for s in samples {
        for (label, img) in [
            ("original", &s.original),
            ("reconstruction", &s.reconstruction),
            ("error x4", &error_map(&s.original, &s.reconstruction)),
        ] {
            html.push_str(&format!(
                "<figure><img src=\"{}\" width=\"{}\"><figcaption>{} — {}</figcaption></figure>",
                png_data_uri(img)?,
                img.width().clamp(128, 256),
                escape(&s.name),
                label
            ));
        }
    }
    html.push_str("</div>");
    if samples.iter().any(|s| s.progressive.is_some()) {
        html.push_str("<h2>Coarse to fine</h2><p>decoded from the first 1, 2, ..., K scales</p>");
        for s in samples {
            if let Some(p) = &s.progressive {
                let h = p.height().clamp(96, 192);
                html.push_str(&format!(
                    "<figure><img src=\"{}\" height=\"{h}\"><figcaption>{}</figcaption></figure>",
                    png_data_uri(p)?,
                    escape(&s.name)
                ));
            }
        }
    }
    // Lets a headless browser report whether every image decoded.
    html.push_str(
        "<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded=\
         String([...document.images].every(i=>i.complete&&i.naturalWidth>0));});</script></body></html>",
    );
    crate::io::write_atomic(&dir.join("index.html"), html.as_bytes())
}
