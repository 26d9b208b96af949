//! Every kernel path this CPU can run, in one process: the VAE against the PyTorch fixture
//! (convolutions, Winograd, GroupNorm+SiLU) and the code assignment against a brute-force
//! argmax in f64, with the kernels capped at each level in turn (`coda::kernels::simd::
//! set_isa_cap`, the same cap `CODA_CPU_ISA` sets). Paths the CPU lacks are printed as SKIP
//! with the reason; `CODA_REQUIRE_ISA=avx512` (say) makes a missing path a failure. AMX runs
//! only in the bf16 precisions and has its own tests.

mod common;

use candle_core::Device;
use coda::kernels::assign::argmax_dot;
use coda::kernels::simd::{detected, isa, set_isa_cap, Isa};
use coda::vae::{LoadOptions, VaeWeights};

/// The decoder output on this path, and its max abs error against PyTorch's.
fn vae_run() -> (candle_core::Tensor, f32) {
    let dir = common::fixtures("vae");
    let w = VaeWeights::load(
        &dir.join("diffusers"),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let vae = w.build().unwrap();
    let io = common::load(&dir.join("diffusers_io.safetensors"));
    let post = vae.encode(&io["x"]).unwrap();
    let dec = vae.decode(&io["mean"]).unwrap();
    let e = common::max_abs(&post.mean, &io["mean"]).max(common::max_abs(&dec, &io["decoded"]));
    (dec, e)
}

fn assignment_mismatches() -> usize {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (n, v, d) = (300, 1000, 16);
    let q: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let k: Vec<f32> = (0..v * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let got = argmax_dot(&q, n, &k, v, d, 256);
    (0..n)
        .filter(|&i| {
            let score = |j: usize| -> f64 {
                (0..d)
                    .map(|t| q[i * d + t] as f64 * k[j * d + t] as f64)
                    .sum()
            };
            let best = (0..v).max_by(|&a, &b| score(a).total_cmp(&score(b)).then(b.cmp(&a)));
            // A near-tie (within f32 rounding) may go either way.
            let g = got[i] as usize;
            Some(g) != best && (score(best.unwrap()) - score(g)).abs() > 1e-5
        })
        .count()
}

/// Winograd F(2x2, 3x3) against the direct convolution (the VAE fixture's channels are below
/// Winograd's threshold, so it is called directly): the max abs error over odd shapes, tile runs
/// longer than a vector with ragged tails, the upsampling conv and a residual.
fn winograd_error() -> f32 {
    use coda::kernels::conv2d::{conv2d_forward, ConvGeometry};
    use coda::kernels::winograd::{conv3x3_forward, transform_weights};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut worst = 0f32;
    for (n, cin, h, w, cout, up) in [
        (1, 3, 7, 5, 4, 1),
        (2, 9, 37, 45, 6, 1),
        (1, 5, 6, 7, 3, 2),
        (2, 4, 19, 33, 5, 2),
    ] {
        let x: Vec<f32> = (0..n * cin * h * w)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let wt: Vec<f32> = (0..cout * cin * 9)
            .map(|_| rng.gen_range(-0.3..0.3))
            .collect();
        let b: Vec<f32> = (0..cout).map(|_| rng.gen_range(-0.3..0.3)).collect();
        let res: Vec<f32> = (0..n * cout * h * up * w * up)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let g = ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: up,
        };
        let (want, _, _) = conv2d_forward(&x, (n, cin, h, w), &wt, (cout, 3, 3), &b, Some(&res), g);
        let u = transform_weights(&wt, cout, cin);
        let got = conv3x3_forward(&x, (n, cin, h, w), &u, cout, &b, Some(&res), up);
        for (a, b) in want.iter().zip(&got) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

/// The direct (implicit-GEMM) f32 conv against im2col on this path, relative to Σ|w||x| of each
/// output: every geometry the VAE uses (3x3 same, stride-2 downsampling with its asymmetric pad,
/// nearest-2x upsampling, 1x1), ragged rows, batch 2, a residual. None where the path has no
/// direct kernel (scalar).
fn direct_error() -> Option<f32> {
    use coda::kernels::conv2d::{conv2d_forward, ConvGeometry};
    use coda::kernels::direct;
    use rand::{Rng, SeedableRng};
    if !direct::available() {
        return None;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut worst = 0f32;
    let same = ConvGeometry::same(1, 1);
    let down = ConvGeometry {
        stride: 2,
        pad: (0, 1, 0, 1),
        upsample: 1,
    };
    let up = ConvGeometry {
        stride: 1,
        pad: (1, 1, 1, 1),
        upsample: 2,
    };
    for (n, cin, h, w, cout, k, g) in [
        (2, 9, 37, 45, 11, 3, same),
        (1, 12, 21, 34, 5, 3, down),
        (1, 7, 13, 9, 6, 3, up),
        (1, 10, 19, 23, 9, 1, ConvGeometry::same(1, 0)),
    ] {
        let x: Vec<f32> = (0..n * cin * h * w)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let wt: Vec<f32> = (0..cout * cin * k * k)
            .map(|_| rng.gen_range(-0.3..0.3))
            .collect();
        let b: Vec<f32> = (0..cout).map(|_| rng.gen_range(-0.3..0.3)).collect();
        let (oh, ow) = g.output_size(h, w, k, k);
        let res: Vec<f32> = (0..n * cout * oh * ow)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let dims = (n, cin, h, w);
        let (want, _, _) = conv2d_forward(&x, dims, &wt, (cout, k, k), &b, Some(&res), g);
        let (got, _, _) =
            direct::conv2d_forward(&x, dims, &wt, (cout, k, k), &b, Some(&res), g, None);
        let ax: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        let aw: Vec<f32> = wt.iter().map(|v| v.abs()).collect();
        let (mag, _, _) = conv2d_forward(&ax, dims, &aw, (cout, k, k), &vec![0.0; cout], None, g);
        for ((a, b), m) in want.iter().zip(&got).zip(&mag) {
            worst = worst.max((a - b).abs() / (m + 1.0));
        }
    }
    Some(worst)
}

#[test]
fn every_available_kernel_path_matches_the_references() {
    let best = detected();
    let required = std::env::var("CODA_REQUIRE_ISA").ok();
    let mut ran = Vec::new();
    let mut scalar_out = None;
    for path in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
        if path > best {
            let msg = format!(
                "SKIP kernel path {}: this CPU's best is {}",
                path.name(),
                best.name()
            );
            println!("{msg}");
            eprintln!("{msg}");
            assert!(
                required.as_deref() != Some(path.name()),
                "CODA_REQUIRE_ISA={} but the CPU lacks it",
                path.name()
            );
            continue;
        }
        set_isa_cap(Some(path));
        assert_eq!(isa(), path);
        let (out, e) = vae_run();
        let m = assignment_mismatches();
        let wino = winograd_error();
        let direct = direct_error();
        // How far this path's arithmetic is from the portable one (0 where the loops compute the
        // same operations in the same order).
        let vs_scalar = scalar_out.get_or_insert_with(|| out.clone());
        let diff = common::max_abs(&out, vs_scalar);
        println!(
            "kernel path {}: VAE max abs error {e:.2e} (vs the scalar path {diff:.2e}), Winograd vs direct {wino:.2e}, implicit-GEMM conv vs im2col {}, assignment mismatches {m}",
            path.name(),
            direct.map_or("(none on this path)".into(), |d| format!("{d:.2e}"))
        );
        if let Some(d) = direct {
            assert!(d <= 3e-6, "{}: implicit-GEMM conv error {d}", path.name());
        }
        assert!(e <= 1e-4, "{}: VAE max abs error {e}", path.name());
        // Measured 1.2e-6 (rounding of the transforms; f32 sums of ~80 products).
        assert!(
            wino <= 2e-5,
            "{}: Winograd max abs error {wino}",
            path.name()
        );
        assert_eq!(
            m,
            0,
            "{}: assignment differs from the brute force",
            path.name()
        );
        ran.push(path.name());
    }
    set_isa_cap(None);
    println!("kernel paths run: {ran:?}");
}
