//! PSNR and SSIM against scikit-image (fixtures from scripts/make_fixtures.py), under the
//! reference's uint8-truncation protocol and the float protocol, on odd sizes.

mod common;

use std::collections::HashMap;

use coda::evaluation::{psnr_ssim, Protocol};

#[test]
fn psnr_and_ssim_match_scikit_image() {
    let pairs = common::load(&common::fixtures("evaluation").join("pairs.safetensors"));
    let expected: HashMap<String, f64> = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures("evaluation").join("expected.json")).unwrap(),
    )
    .unwrap();
    for i in 0..3 {
        let x = &pairs[&format!("x_{i}")];
        let y = &pairs[&format!("y_{i}")];
        let chw = x.dims3().unwrap();
        let (xv, yv) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (name, p) in [
            ("uint8", Protocol::Uint8Truncated),
            ("float", Protocol::Float),
        ] {
            let (psnr, ssim) = psnr_ssim(&xv, &yv, chw, p);
            let (ep, es) = (
                expected[&format!("psnr_{name}_{i}")],
                expected[&format!("ssim_{name}_{i}")],
            );
            println!("pair {i} {name}: psnr {psnr:.6} (skimage {ep:.6}), ssim {ssim:.8} (skimage {es:.8})");
            assert!(
                (psnr - ep).abs() < 1e-9,
                "pair {i} {name}: PSNR {psnr} vs {ep}"
            );
            assert!(
                (ssim - es).abs() < 1e-9,
                "pair {i} {name}: SSIM {ssim} vs {es}"
            );
        }
    }
}

#[test]
fn frechet_distance_matches_pytorch_fid_formula_in_scipy() {
    use coda::evaluation::{frechet_distance, GaussianStats};
    let pairs = common::load(&common::fixtures("evaluation").join("pairs.safetensors"));
    let expected: HashMap<String, f64> = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures("evaluation").join("expected.json")).unwrap(),
    )
    .unwrap();
    for i in 0..3 {
        let fit = |name: &str| {
            let t = &pairs[&format!("{name}_{i}")];
            let (_, d) = t.dims2().unwrap();
            GaussianStats::fit(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), d).unwrap()
        };
        let (a, b) = (fit("feat_a"), fit("feat_b"));
        let ours = frechet_distance(&a, &b);
        let want = expected[&format!("fid_{i}")];
        let rel = (ours - want).abs() / want;
        println!(
            "set {i} ({} samples, {} dims): {ours:.6} vs scipy {want:.6}, relative {rel:.2e}",
            a.count,
            a.mean.len()
        );
        assert!(rel < 1e-3, "set {i}: {ours} vs {want}");
    }
}

#[test]
fn fid_inception_pool3_features_match_pytorch_fid() {
    use coda::evaluation::inception::{deterministic_weights, FidInception};
    let io = common::load(&common::fixtures("evaluation").join("inception_io.safetensors"));
    let weights = deterministic_weights(&candle_core::Device::Cpu).unwrap();
    let mut net = FidInception::new(&weights, std::path::Path::new("deterministic")).unwrap();
    let feats = net.features(&io["x"]).unwrap();
    let err = common::max_abs(&feats, &io["pool3"]);
    println!("pool3 features: max abs error {err:.2e}");
    assert!(err <= 1e-4, "pool3 max abs error {err}");
}

#[test]
fn lpips_matches_the_lpips_package() {
    use coda::evaluation::inception::det_uniform;
    use coda::evaluation::lpips::{parameter_shapes, Lpips};
    let io = common::load(&common::fixtures("evaluation").join("lpips_io.safetensors"));
    // The fixture's deterministic weights: sorted names, splitmix64 stream per tensor.
    let mut shapes = parameter_shapes();
    shapes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut w = HashMap::new();
    for (idx, (name, shape)) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let u = det_uniform(n, 2_000_003 * (idx as u64 + 1));
        let v: Vec<f32> = if name.starts_with("lin") {
            u.iter().map(|x| 0.05 * (x + 1.0)).collect()
        } else if name.ends_with("weight") {
            let bound = (6.0 / shape[1..].iter().product::<usize>() as f64).sqrt() as f32;
            u.iter().map(|x| x * bound).collect()
        } else {
            u.iter().map(|x| 0.1 * x).collect()
        };
        w.insert(
            name,
            candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap(),
        );
    }
    let net = Lpips::new(&w, std::path::Path::new("deterministic")).unwrap();
    let d = net.distance(&io["x"], &io["y"]).unwrap();
    let want = &io["lpips"];
    let err = common::max_abs(&d, want);
    let scale = common::abs_max(want);
    println!(
        "LPIPS {:?} vs {:?}: max abs error {err:.2e}",
        d.to_vec1::<f32>().unwrap(),
        want.to_vec1::<f32>().unwrap()
    );
    assert!(err <= 1e-4 * scale, "LPIPS error {err} (values {scale})");
    // Training's LPIPS term: the gradient with respect to the reconstruction.
    let y = candle_core::Var::from_tensor(&io["y"]).unwrap();
    let grads = net
        .distance(&io["x"], y.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads.get(y.as_tensor()).unwrap();
    let rel = common::max_abs(g, &io["dy"]) / common::abs_max(&io["dy"]);
    println!("LPIPS gradient: {rel:.2e} relative");
    assert!(rel < 1e-4, "LPIPS gradient error {rel}");
}

#[test]
fn inception_weights_with_wrong_shapes_are_named() {
    use coda::evaluation::inception::{deterministic_weights, FidInception};
    let mut w = deterministic_weights(&candle_core::Device::Cpu).unwrap();
    w.insert(
        "Mixed_6b.branch7x7_2.conv.weight".into(),
        candle_core::Tensor::zeros(
            (128, 128, 7, 1),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    w.remove("Mixed_7c.branch_pool.bn.running_var");
    let err = FidInception::new(&w, std::path::Path::new("inception.safetensors"))
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("Mixed_6b.branch7x7_2.conv.weight: checkpoint has [128, 128, 7, 1], architecture needs [128, 128, 1, 7]"), "{err}");
    assert!(err.contains("Mixed_7c.branch_pool.bn.running_var"), "{err}");
}
