//! Colour fidelity of the embedded default tokenizer (assets/tokenizer): solid patches of 30
//! colours spread over the RGB cube (its 27-point grid, corners and centre included, plus green,
//! purple and teal), at 64 and 128 px.
//!
//! The target (issue #12) is every colour within 8/255 mean absolute error per channel at 128 px,
//! the tokenizer's resolution. The default tokenizer meets it (measured: mean 1.75, worst 5.58 at
//! 128 px, blue (0,0,255) -> (5,8,252)), held here at its target with the mean at 2.5; at 64 px,
//! below its training size, it is held to the measured level as a floor against regressions
//! (mean 2.98, worst 10.64, blue): every colour within 12/255, the mean within 4/255. The first
//! default tokenizer failed even that by far (mean 51.9, worst 111.4: green (0,255,0) came back
//! as (71,74,82)).

use candle_core::Device;
use coda::evaluation::colour_probe;
use coda::tokenizer::Tokenizer;

#[test]
fn solid_colours_come_back_within_8_of_255() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tokenizer");
    let tok = Tokenizer::from_dir(&dir, &Device::Cpu).unwrap();
    for size in [64, 128] {
        let results = colour_probe(size, &Device::Cpu, |x| {
            let enc = tok.encode_with(x, coda::tokenizer::Posterior::Mean)?;
            tok.decode_latent(&enc.latent_hat)
        })
        .unwrap();
        let worst = results
            .iter()
            .max_by(|a, b| a.mae.total_cmp(&b.mae))
            .unwrap();
        let mean = results.iter().map(|r| r.mae).sum::<f64>() / results.len() as f64;
        println!(
            "{size} px: mean abs error {mean:.2}/255, worst {:.2} at {:?} -> {:?}",
            worst.mae, worst.rgb, worst.reconstructed
        );
        // (worst colour, mean) bounds: the target at 128 px, the measured floor at 64.
        let (worst_max, mean_max) = if size == 128 { (8.0, 2.5) } else { (12.0, 4.0) };
        let bad: Vec<String> = results
            .iter()
            .filter(|r| r.mae > worst_max)
            .map(|r| {
                format!(
                    "{:?} -> {:?} ({:.1})",
                    r.rgb,
                    r.reconstructed.map(|v| v.round()),
                    r.mae
                )
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{size} px: colours off by more than {worst_max}/255: {bad:?}"
        );
        assert!(
            mean <= mean_max,
            "{size} px: mean colour error {mean:.2}/255 above {mean_max}"
        );
    }
}
