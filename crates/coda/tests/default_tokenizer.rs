//! The embedded default tokenizer (assets/tokenizer) gets colours right: solid patches of 30
//! colours spread over the RGB cube (its 27-point grid, corners and centre included, plus green,
//! purple and teal) come back within 8/255 mean absolute error per channel, at the sizes a user
//! meets first (64 px, the README's sample, and 128 px, the training size).
//! The first default tokenizer failed this by far (green (40,160,60) came back as (74,87,104)).

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
        let bad: Vec<String> = results
            .iter()
            .filter(|r| r.mae > 8.0)
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
            "{size} px: colours off by more than 8/255: {bad:?}"
        );
    }
}
