//! Micro-benchmark of single kernels (not a test): `cargo run --release --example kernel_bench`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use coda::kernels::{conv2d, group_norm, group_norm_composite, ConvGeometry};

fn time<F: FnMut()>(mut f: F, iters: usize) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(c, hw, k) in &[
        (128usize, 256usize, 3usize),
        (256, 128, 3),
        (512, 64, 3),
        (512, 32, 3),
        (128, 256, 1),
    ] {
        let x = Tensor::randn(0f32, 1.0, (1, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (c, c, k, k), &dev)?;
        let b = Tensor::zeros(c, candle_core::DType::F32, &dev)?;
        let g = ConvGeometry::same(1, k / 2);
        let flops = 2.0 * (c * c * k * k * hw * hw) as f64;
        let ours = time(
            || {
                conv2d(&x, &w, &b, g).unwrap();
            },
            3,
        );
        let candle = time(
            || {
                x.conv2d(&w, k / 2, 1, 1, 1).unwrap();
            },
            2,
        );
        let gw = Tensor::ones(c, candle_core::DType::F32, &dev)?;
        let gn = time(
            || {
                group_norm(&x, &gw, &b, 32, 1e-6, true).unwrap();
            },
            5,
        );
        println!(
            "conv {c}x{hw}x{hw} k{k}: ours {:.1} ms ({:.0} GFLOP/s), candle {:.1} ms ({:.0} GFLOP/s); groupnorm+silu {:.2} ms",
            ours * 1e3, flops / ours / 1e9, candle * 1e3, flops / candle / 1e9, gn * 1e3
        );
    }
    // GroupNorm+SiLU forward and backward, as training runs it.
    for &(n, c, hw) in &[(4usize, 128usize, 64usize), (4, 256, 32)] {
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?)?;
        let w = candle_core::Var::from_tensor(&Tensor::ones(c, candle_core::DType::F32, &dev)?)?;
        let b = candle_core::Var::from_tensor(&Tensor::zeros(c, candle_core::DType::F32, &dev)?)?;
        let ours = time(
            || {
                group_norm(&x, &w, &b, 32, 1e-6, true)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            },
            3,
        );
        let composite = time(
            || {
                group_norm_composite(&x, &w, &b, 32, 1e-6, true)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            },
            3,
        );
        println!("groupnorm+silu fwd+bwd {n}x{c}x{hw}x{hw}: ours {:.1} ms, candle composite {:.1} ms ({:.1}x)", ours * 1e3, composite * 1e3, composite / ours);
    }
    Ok(())
}
