//! Finite-difference checks of every custom op's backward: the convolution (stride 1 and 2,
//! asymmetric padding, nearest-2x upsampling), fused GroupNorm+SiLU, and the quantizer's
//! recomputing soft-assignment and entropy ops. (Each is also compared with PyTorch autograd
//! elsewhere: vae_parity, quantizer_parity.)

use candle_core::{DType, Device, Tensor, Var};
use coda::kernels::{conv2d, group_norm, ConvGeometry};
use coda::quantizer::soft_assign::{entropy, soft_codes};

/// Central differences (in f64 around f32 values) at `n` coordinates of each input, against
/// the autograd gradient of `f`.
fn check(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, n: usize, tol: f64) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&ts).backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = inputs[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = g.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        let step = (base.len() / n).max(1);
        for j in (0..base.len()).step_by(step).take(n) {
            let eval = |delta: f32| -> f64 {
                let mut b = base.clone();
                b[j] += delta;
                let mut args: Vec<Tensor> = inputs.to_vec();
                args[i] = Tensor::from_vec(b, inputs[i].shape(), &Device::Cpu).unwrap();
                f(&args)
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let h = 1e-2f32;
            let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
            let err = (fd - g[j] as f64).abs() / scale.max(1e-3);
            assert!(err < tol, "{name}: input {i}, element {j}: autograd {} vs finite difference {fd} (rel {err:.2e})", g[j]);
        }
    }
}

fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let d = rand_distr::Normal::new(0.0, std).unwrap();
    let v: Vec<f32> = (0..n).map(|_| d.sample(&mut rng) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn conv2d_backward_matches_finite_differences() {
    let geometries = [
        ConvGeometry::same(1, 1),
        ConvGeometry {
            stride: 2,
            pad: (0, 1, 0, 1),
            upsample: 1,
        },
        ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        },
    ];
    for (gi, g) in geometries.into_iter().enumerate() {
        let x = randn(&[2, 3, 7, 6], 1.0, 1);
        let w = randn(&[4, 3, 3, 3], 0.3, 2);
        let b = randn(&[4], 0.3, 3);
        let probe = {
            let (oh, ow) = g.output_size(7, 6, 3, 3);
            randn(&[2, 4, oh, ow], 1.0, 4)
        };
        check(
            &format!("conv2d geometry {gi}"),
            &[x, w, b],
            &|t| {
                (conv2d(&t[0], &t[1], &t[2], g).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            },
            12,
            2e-2,
        );
    }
}

#[test]
fn group_norm_silu_backward_matches_finite_differences() {
    let x = randn(&[2, 6, 5, 4], 1.0, 5);
    let w = (randn(&[6], 0.2, 6) + 1.0).unwrap();
    let b = randn(&[6], 0.2, 7);
    let probe = randn(&[2, 6, 5, 4], 1.0, 8);
    for silu in [false, true] {
        check(
            &format!("group_norm silu={silu}"),
            &[x.clone(), w.clone(), b.clone()],
            &|t| {
                (group_norm(&t[0], &t[1], &t[2], 3, 1e-6, silu).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            },
            12,
            2e-2,
        );
    }
}

#[test]
fn soft_assignment_ops_match_finite_differences() {
    // Moderate logits so that the differences are well conditioned (τ = 0.5 for the entropy).
    let q = randn(&[9, 4], 0.5, 9);
    let k = randn(&[13, 4], 0.5, 10);
    let v = randn(&[13, 3], 1.0, 11);
    let probe = randn(&[9, 3], 1.0, 12);
    // soft_codes' value is 0: the checked function adds the (detached) value of softmax(q kᵀ) @ v,
    // so that its finite differences are those of softmax(q kᵀ) @ v while its gradient comes from
    // the op alone (queries and keys; v is held constant, as the op's contract says).
    check(
        "soft codes",
        &[q.clone(), k.clone()],
        &|t| {
            let soft = soft_codes(&t[0], &t[1], &v).unwrap();
            let value =
                coda::quantizer::attention::softmax(&t[0].matmul(&t[1].t().unwrap()).unwrap(), 1)
                    .unwrap()
                    .matmul(&v)
                    .unwrap()
                    .detach();
            ((soft + value).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
        },
        10,
        3e-2,
    );
    check(
        "entropy",
        &[q, k],
        &|t| entropy(&t[0], &t[1], 0.5).unwrap(),
        10,
        3e-2,
    );
}
