//! Micro-benchmark of single kernels (not a test): `cargo run --release --example kernel_bench`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use coda::kernels::{conv2d, group_norm, group_norm_composite, ConvGeometry};

/// Seconds per call: wall time, or with CPU_TIME=1 the process's CPU time (with
/// RAYON_NUM_THREADS=1, a measure that another job on the machine disturbs much less).
fn time<F: FnMut()>(mut f: F, iters: usize) -> f64 {
    f();
    let cpu = std::env::var("CPU_TIME").is_ok();
    // MIN=N: the fastest of at least max(N, 5) calls instead of their mean (a noisy shared
    // machine).
    if let Ok(min) = std::env::var("MIN") {
        let calls = iters.max(min.parse().unwrap_or(5)).max(5);
        return (0..calls)
            .map(|_| {
                let (t, c) = (Instant::now(), process_cpu_seconds());
                f();
                if cpu {
                    process_cpu_seconds() - c
                } else {
                    t.elapsed().as_secs_f64()
                }
            })
            .fold(f64::INFINITY, f64::min);
    }
    let t = Instant::now();
    let c = process_cpu_seconds();
    for _ in 0..iters {
        f();
    }
    if cpu {
        (process_cpu_seconds() - c) / iters as f64
    } else {
        t.elapsed().as_secs_f64() / iters as f64
    }
}

fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() -> candle_core::Result<()> {
    // As the `coda` CLI: keep freed memory, so that page faults of fresh buffers do not dominate.
    // SAFETY: mallopt only changes allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    if std::env::var("FID_BENCH").is_ok() {
        // rFID's Fréchet distance at Inception's 2048 dimensions, 3000 samples per set.
        let (n, d) = (3000usize, 2048usize);
        let f: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919) % 1009) as f32 / 1009.0)
            .collect();
        let g: Vec<f32> = f
            .iter()
            .enumerate()
            .map(|(i, v)| v + ((i % 13) as f32) * 0.01)
            .collect();
        let t = Instant::now();
        let a = coda::evaluation::GaussianStats::fit(&f, d).unwrap();
        let b = coda::evaluation::GaussianStats::fit(&g, d).unwrap();
        let t_fit = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let fid = coda::evaluation::frechet_distance(&a, &b);
        println!(
            "fit 2 x {n}x{d}: {t_fit:.1} s; Fréchet distance {fid:.4}: {:.1} s",
            t.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    if std::env::var("WINOGRAD").is_ok() {
        // im2col + GEMM against Winograd F(2x2, 3x3) on the FLUX decoder's 3x3 convs.
        use coda::kernels::conv2d::conv2d_forward;
        use coda::kernels::winograd::{conv3x3_forward, transform_weights};
        let small: &[(usize, usize, usize)] = &[
            (32, 64, 1),
            (64, 32, 1),
            (128, 16, 1),
            (128, 8, 1),
            (16, 64, 1),
            (512, 16, 1),
            (256, 32, 1),
            (512, 32, 1),
            (128, 32, 1),
            (256, 16, 1),
        ];
        let large: &[(usize, usize, usize)] = &[
            (64usize, 256usize, 1usize),
            (128, 256, 1),
            (128, 64, 1),
            (256, 128, 1),
            (512, 64, 1),
            (512, 32, 1),
            (256, 64, 2),
        ];
        let cases = if std::env::var("SMALL").is_ok() {
            small
        } else {
            large
        };
        for &(c, hw, up) in cases {
            let x: Vec<f32> = (0..c * hw * hw)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let w: Vec<f32> = (0..c * c * 9)
                .map(|i| ((i * 104729) % 1013) as f32 / 10130.0 - 0.05)
                .collect();
            let b = vec![0f32; c];
            let g = ConvGeometry {
                stride: 1,
                pad: (1, 1, 1, 1),
                upsample: up,
            };
            let flops = 2.0 * (c * c * 9 * hw * hw * up * up) as f64;
            let t_direct = time(
                || {
                    conv2d_forward(&x, (1, c, hw, hw), &w, (c, 3, 3), &b, None, g);
                },
                3,
            );
            let t_wino = time(
                || {
                    let u = transform_weights(&w, c, c);
                    conv3x3_forward(&x, (1, c, hw, hw), &u, c, &b, None, up);
                },
                3,
            );
            let u = transform_weights(&w, c, c);
            let t_wino_pre = time(
                || {
                    conv3x3_forward(&x, (1, c, hw, hw), &u, c, &b, None, up);
                },
                3,
            );
            let (t_w4, t_implicit) = if up == 1 {
                let u4 = coda::kernels::winograd4::transform_weights(&w, c, c);
                let t4 = time(
                    || {
                        coda::kernels::winograd4::conv3x3_forward(
                            &x,
                            (1, c, hw, hw),
                            coda::kernels::winograd4::Weights::Transformed(&u4),
                            c,
                            &b,
                            None,
                            1,
                        );
                    },
                    3,
                );
                let ti = if coda::kernels::direct::available()
                    || coda::kernels::direct::available_avx2()
                {
                    time(
                        || {
                            coda::kernels::direct::conv2d_forward(
                                &x,
                                (1, c, hw, hw),
                                &w,
                                (c, 3, 3),
                                &b,
                                None,
                                g,
                                None,
                            );
                        },
                        3,
                    )
                } else {
                    f64::NAN
                };
                (t4, ti)
            } else {
                (f64::NAN, f64::NAN)
            };
            println!(
                "c {c} {hw}x{hw} up {up}: im2col {:.1} ms ({:.0} GFLOP/s), winograd {:.1} ms (weights cached {:.1} ms, {:.0} effective GFLOP/s), F(4x4) {:.1} ms ({:.0} effective), implicit GEMM {:.1} ms",
                t_direct * 1e3, flops / t_direct / 1e9, t_wino * 1e3, t_wino_pre * 1e3, flops / t_wino_pre / 1e9,
                t_w4 * 1e3, flops / t_w4 / 1e9, t_implicit * 1e3
            );
        }
        return Ok(());
    }
    if std::env::var("GN").is_ok() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 128, 256, 256), &dev)?;
        let gw = Tensor::ones(128, candle_core::DType::F32, &dev)?;
        let gb = Tensor::zeros(128, candle_core::DType::F32, &dev)?;
        let t = time(
            || drop(group_norm(&x, &gw, &gb, 32, 1e-6, true).unwrap()),
            20,
        );
        println!("groupnorm+silu 128x256x256: {:.2} ms", t * 1e3);
        return Ok(());
    }
    if std::env::var("ASSIGN").is_ok() {
        // Code assignment at V = 65536, d = 32 (FLUX-size), against the machine's f32 GEMM peak
        // (a 2048^3 GEMM on all threads, same crate and microkernels as our convolution).
        use coda::kernels::assign::{argmax_dot_gemm, Codebook};
        let threads = rayon::current_num_threads();
        let m = 2048;
        let a: Vec<f32> = (0..m * m)
            .map(|i| ((i * 7919) % 1009) as f32 / 1009.0)
            .collect();
        let mut c = vec![0f32; m * m];
        let t_gemm = time(
            || unsafe {
                gemm::gemm(
                    m,
                    m,
                    m,
                    c.as_mut_ptr(),
                    1,
                    m as isize,
                    false,
                    a.as_ptr(),
                    1,
                    m as isize,
                    a.as_ptr(),
                    1,
                    m as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            },
            3,
        );
        let peak = 2.0 * (m * m * m) as f64 / t_gemm / 1e9;
        println!("f32 GEMM {m}^3 on {threads} threads: {peak:.0} GFLOP/s");
        let (v, d) = (65536usize, 32usize); // the FLUX-size tokenizer: V = 65536, attention dim 32
        let keys: Vec<f32> = (0..v * d)
            .map(|i| ((i * 104729) % 1013) as f32 / 1013.0 - 0.5)
            .collect();
        // Prepared once per tokenizer, as the quantizer does.
        let codebook = Codebook::new(keys.clone(), v, d);
        for n in [1024usize, 2240, 8 * 2240] {
            let q: Vec<f32> = (0..n * d)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let flops = 2.0 * (n * v * d) as f64;
            let tf = time(|| drop(codebook.argmax(&q, n, 4096)), 3);
            let tg = time(|| drop(argmax_dot_gemm(&q, n, &keys, v, d, 4096)), 3);
            println!(
                "assign n {n} V {v} d {d}: fused {:.1} ms ({:.0} GFLOP/s, {:.0}% of GEMM peak), gemm+scan {:.1} ms ({:.0}%)",
                tf * 1e3, flops / tf / 1e9, 100.0 * flops / tf / 1e9 / peak, tg * 1e3, 100.0 * flops / tg / 1e9 / peak
            );
        }
        return Ok(());
    }
    if std::env::var("DIRECT").is_ok() {
        // im2col + GEMM against the implicit GEMM (AVX-512 or, under CODA_CPU_ISA=avx2, AVX2) on
        // the training (batch 8, tiny-cpu) and inference (batch 1, MAR/FLUX) shapes.
        use coda::kernels::{conv2d::conv2d_forward, direct};
        if !direct::available() && !direct::available_avx2() {
            println!("no implicit GEMM on this kernel path");
            return Ok(());
        }
        for &(n, cin, cout, hw, k, up) in &[
            (8usize, 32usize, 32usize, 64usize, 3usize, 1usize),
            (8, 64, 64, 32, 3, 1),
            (8, 128, 128, 16, 3, 1),
            (8, 32, 8, 64, 3, 1),
            (8, 64, 32, 64, 3, 1),
            (8, 64, 64, 32, 2, 1),
            (8, 128, 128, 16, 2, 1),
            (1, 128, 128, 256, 3, 1),
            (1, 128, 128, 128, 3, 1),
            (1, 256, 256, 64, 3, 1),
            (1, 256, 256, 32, 3, 1),
            (1, 512, 512, 32, 3, 1),
            (1, 3, 128, 256, 3, 1),
            (1, 128, 3, 256, 3, 1),
            (8, 8, 32, 64, 1, 1),
            (8, 8, 64, 32, 1, 1),
            (8, 32, 64, 64, 1, 1),
            (1, 128, 128, 256, 1, 1),
            (1, 256, 512, 64, 1, 1),
            (8, 128, 128, 8, 3, 1),
            (8, 128, 128, 8, 2, 1),
            (1, 128, 128, 8, 3, 1),
            (8, 128, 128, 4, 3, 1),
            (8, 64, 64, 12, 3, 1),
            (1, 128, 128, 16, 3, 1),
            (1, 256, 256, 16, 3, 1),
            (1, 512, 512, 16, 3, 1),
            (1, 64, 64, 16, 3, 1),
            (1, 256, 16, 16, 3, 1),
            (1, 16, 256, 16, 1, 1),
        ] {
            let x: Vec<f32> = (0..n * cin * hw * hw)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let w: Vec<f32> = (0..cout * cin * k * k)
                .map(|i| ((i * 104729) % 1013) as f32 / 10130.0 - 0.05)
                .collect();
            let b = vec![0f32; cout];
            let g = ConvGeometry {
                stride: 1,
                pad: (k / 2, (k - 1) / 2, k / 2, (k - 1) / 2),
                upsample: up,
            };
            let (oh, ow) = g.output_size(hw, hw, k, k);
            let flops = 2.0 * (n * cout * cin * k * k * oh * ow) as f64;
            let dims = (n, cin, hw, hw);
            let packed = direct::pack_weights(&w, (cout, cin, k, k));
            let t_col = time(
                || drop(conv2d_forward(&x, dims, &w, (cout, k, k), &b, None, g)),
                3,
            );
            let t_dir = time(
                || {
                    drop(direct::conv2d_forward(
                        &x,
                        dims,
                        &w,
                        (cout, k, k),
                        &b,
                        None,
                        g,
                        Some(&packed),
                    ))
                },
                3,
            );
            let t_f2 = if k == 3 && cin == cout && up == 1 {
                use coda::kernels::winograd;
                time(
                    || {
                        let u = winograd::transform_weights(&w, cout, cin);
                        drop(winograd::conv3x3_forward(&x, dims, &u, cout, &b, None, 1))
                    },
                    3,
                )
            } else {
                f64::NAN
            };
            println!(
                "n{n} {cin}->{cout} {hw}x{hw} k{k}: im2col {:.2} ms ({:.0} GFLOP/s), implicit GEMM {:.2} ms ({:.0} GFLOP/s), {:.2}x; F(2x2) {:.2} ms",
                t_col * 1e3, flops / t_col / 1e9, t_dir * 1e3, flops / t_dir / 1e9, t_col / t_dir, t_f2 * 1e3
            );
        }
        return Ok(());
    }
    if std::env::var("DPBF16").is_ok() {
        // f32 (im2col) against the AVX512_BF16 bf16 kernel, weights packed once.
        use coda::kernels::{conv2d::conv2d_forward, direct, dpbf16};
        // Under a CODA_CPU_ISA cap below a kernel's level, that kernel is reported as 0 GFLOP/s.
        for &(c, hw, up, k) in &[
            (128usize, 256usize, 1usize, 3usize),
            (256, 128, 1, 3),
            (512, 64, 1, 3),
            (512, 32, 1, 3),
            (512, 16, 1, 3),
            (256, 128, 2, 3),
            (128, 256, 1, 1),
        ] {
            let x: Vec<f32> = (0..c * hw * hw)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let w: Vec<f32> = (0..c * c * k * k)
                .map(|i| ((i * 104729) % 1013) as f32 / 10130.0 - 0.05)
                .collect();
            let b = vec![0f32; c];
            let g = ConvGeometry {
                stride: 1,
                pad: (k / 2, k / 2, k / 2, k / 2),
                upsample: up,
            };
            let flops = 2.0 * (c * c * k * k * hw * hw * up * up) as f64;
            let dims = (1, c, hw, hw);
            let packed = dpbf16::pack_weights(&w, (c, c, k, k));
            let packed32 = direct::pack_weights(&w, (c, c, k, k));
            let t32 = time(
                || drop(conv2d_forward(&x, dims, &w, (c, k, k), &b, None, g)),
                3,
            );
            let td = if !direct::available() {
                f64::INFINITY
            } else {
                time(
                    || {
                        drop(direct::conv2d_forward(
                            &x,
                            dims,
                            &w,
                            (c, k, k),
                            &b,
                            None,
                            g,
                            Some(&packed32),
                        ))
                    },
                    3,
                )
            };
            let t16 = if !dpbf16::available() {
                f64::INFINITY
            } else {
                time(
                    || {
                        drop(dpbf16::conv2d_forward(
                            &x,
                            dims,
                            &w,
                            (c, k, k),
                            &b,
                            None,
                            g,
                            Some(&packed),
                        ))
                    },
                    5,
                )
            };
            println!(
                "c {c} {hw}x{hw} up {up} k{k}: f32 im2col {:.1} ms ({:.0} GFLOP/s), f32 direct {:.1} ms ({:.0}), dpbf16 {:.1} ms ({:.0} GFLOP/s, {:.2}x)",
                t32 * 1e3, flops / t32 / 1e9, td * 1e3, flops / td / 1e9, t16 * 1e3, flops / t16 / 1e9, t32 / t16
            );
        }
        return Ok(());
    }
    if std::env::var("AMX").is_ok() {
        // f32 (im2col, Winograd where it is used) against the AMX bf16 and 3xbf16 kernels.
        use coda::kernels::{amx, conv2d::conv2d_forward};
        assert!(amx::available(), "this CPU has no AMX bf16");
        for &(c, hw, up, k) in &[
            (128usize, 256usize, 1usize, 3usize),
            (256, 128, 1, 3),
            (512, 64, 1, 3),
            (512, 32, 1, 3),
            (256, 128, 2, 3),
            (128, 256, 1, 1),
        ] {
            let x: Vec<f32> = (0..c * hw * hw)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let w: Vec<f32> = (0..c * c * k * k)
                .map(|i| ((i * 104729) % 1013) as f32 / 10130.0 - 0.05)
                .collect();
            let b = vec![0f32; c];
            let g = ConvGeometry {
                stride: 1,
                pad: (k / 2, k / 2, k / 2, k / 2),
                upsample: up,
            };
            let flops = 2.0 * (c * c * k * k * hw * hw * up * up) as f64;
            let dims = (1, c, hw, hw);
            // Weights packed once, as the model's convs keep them.
            let p16 = amx::PackedWeights::new(&w, (c, c, k, k), false);
            let p3 = amx::PackedWeights::new(&w, (c, c, k, k), true);
            let t32 = time(
                || drop(conv2d_forward(&x, dims, &w, (c, k, k), &b, None, g)),
                3,
            );
            let amx_time = |three: bool, packed: &amx::PackedWeights| {
                time(
                    || {
                        drop(amx::conv2d_forward(
                            &x,
                            dims,
                            &w,
                            (c, k, k),
                            &b,
                            None,
                            g,
                            three,
                            Some(packed),
                        ))
                    },
                    5,
                )
            };
            let (t16, t3) = (amx_time(false, &p16), amx_time(true, &p3));
            println!(
                "c {c} {hw}x{hw} up {up} k{k}: f32 im2col {:.1} ms ({:.0} GFLOP/s), amx bf16 {:.1} ms ({:.0}), amx 3xbf16 {:.1} ms ({:.0})",
                t32 * 1e3, flops / t32 / 1e9, t16 * 1e3, flops / t16 / 1e9, t3 * 1e3, flops / t3 / 1e9
            );
        }
        return Ok(());
    }
    if let Ok(spec) = std::env::var("TILE_GEMM") {
        // One Winograd tile GEMM (rows x k) · (k x nt), ours against the `gemm` crate's, one
        // thread: TILE_GEMM=rows,k,nt.
        use coda::kernels::{simd, tile_gemm};
        let v: Vec<usize> = spec.split(',').map(|t| t.parse().unwrap()).collect();
        let (rows, k, nt) = (v[0], v[1], v[2]);
        let a: Vec<f32> = (0..rows * k).map(|i| (i % 97) as f32 * 1e-2).collect();
        let b: Vec<f32> = (0..k * nt).map(|i| (i % 89) as f32 * 1e-2).collect();
        let mut m = vec![0f32; rows * nt];
        let flops = 2.0 * (rows * k * nt) as f64 * 36.0;
        // 36 of them, as in one F(4x4) block.
        let ours = time(
            || {
                for _ in 0..36 {
                    // SAFETY: buffers of the stated shapes.
                    unsafe {
                        tile_gemm::gemm(
                            simd::isa(),
                            (rows, k, nt),
                            a.as_ptr(),
                            b.as_ptr(),
                            nt,
                            m.as_mut_ptr(),
                            nt,
                        )
                    }
                }
            },
            20,
        );
        let crate_ = time(
            || {
                for _ in 0..36 {
                    // SAFETY: as above.
                    unsafe {
                        coda::kernels::sgemm::gemm(
                            rows,
                            nt,
                            k,
                            m.as_mut_ptr(),
                            1,
                            nt as isize,
                            false,
                            a.as_ptr(),
                            1,
                            k as isize,
                            b.as_ptr(),
                            1,
                            nt as isize,
                            0.0,
                            1.0,
                            gemm::Parallelism::None,
                        )
                    }
                }
            },
            20,
        );
        println!(
            "tile GEMM {rows}x{k}x{nt} ({}): ours {:.0} GFLOP/s, gemm crate {:.0} GFLOP/s",
            simd::isa().name(),
            flops / ours / 1e9,
            flops / crate_ / 1e9
        );
        return Ok(());
    }
    if let Ok(spec) = std::env::var("W4_ONLY") {
        // One F(4x4, 3x3) conv repeatedly, for a profiler: W4_ONLY=channels,size[,batch]. Times
        // it with its weights transformed beforehand, with the whole transform per call (what
        // inference does on many blocks), and with each task transforming its own rows (few
        // blocks).
        use coda::kernels::winograd4::{conv3x3_forward, transform_weights, Weights};
        let v: Vec<usize> = spec.split(',').map(|t| t.parse().unwrap()).collect();
        let (c, hw, n) = (v[0], v[1], v.get(2).copied().unwrap_or(1));
        let x: Vec<f32> = (0..n * c * hw * hw)
            .map(|i| ((i * 7919) % 1009) as f32 / 1009.0)
            .collect();
        let w: Vec<f32> = (0..c * c * 9)
            .map(|i| ((i * 31) % 101) as f32 * 1e-3)
            .collect();
        let b = vec![0f32; c];
        let dims = (n, c, hw, hw);
        let u4 = transform_weights(&w, c, c);
        let t = time(
            || {
                drop(conv3x3_forward(
                    &x,
                    dims,
                    Weights::Transformed(&u4),
                    c,
                    &b,
                    None,
                    1,
                ))
            },
            10,
        );
        let tu = time(|| drop(transform_weights(&w, c, c)), 10);
        let per_call = time(
            || {
                let u = transform_weights(&w, c, c);
                drop(conv3x3_forward(
                    &x,
                    dims,
                    Weights::Transformed(&u),
                    c,
                    &b,
                    None,
                    1,
                ))
            },
            10,
        );
        let fused = time(
            || drop(conv3x3_forward(&x, dims, Weights::Raw(&w), c, &b, None, 1)),
            10,
        );
        let fuses = coda::kernels::winograd4::fuses_weight_transform(n, c, hw, hw);
        println!(
            "F(4x4) {c}ch {hw}x{hw} batch {n}: {:.1} ms with U ready (weight transform {:.2} ms); \
             transform per call {:.1} ms, fused {:.1} ms (inference runs {})",
            t * 1e3,
            tu * 1e3,
            per_call * 1e3,
            fused * 1e3,
            if fuses { "fused" } else { "per call" }
        );
        return Ok(());
    }
    if std::env::var("UPSAMPLE_BF16").is_ok() && coda::kernels::dpbf16::available() {
        // The decoder's upsampling conv in bf16 (AVX512_BF16): nine taps on the upsampled input
        // against the four sub-pixel phases, weights packed beforehand as a model conv keeps them.
        use coda::kernels::amx::Packed;
        use coda::kernels::dpbf16::pack_weights;
        let g = ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        };
        for &(c, hw) in &[
            (64usize, 128usize),
            (128, 64),
            (512, 16),
            (128, 128),
            (256, 64),
            (256, 128),
            (512, 32),
            (512, 64),
        ] {
            let x: Vec<f32> = (0..c * hw * hw)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0)
                .collect();
            let w: Vec<f32> = (0..c * c * 9)
                .map(|i| ((i * 31) % 101) as f32 * 1e-3)
                .collect();
            let b = vec![0f32; c];
            let nine_w = pack_weights(&w, (c, c, 3, 3));
            let k = coda::kernels::subpixel::phase_weights(&w, c, c);
            let phases =
                Packed::PhasePairs(std::array::from_fn(|p| pack_weights(&k[p], (c, c, 2, 2))));
            let dims = (1, c, hw, hw);
            let nine = time(
                || {
                    coda::kernels::dpbf16::conv2d_forward(
                        &x,
                        dims,
                        &w,
                        (c, 3, 3),
                        &b,
                        None,
                        g,
                        Some(&nine_w),
                    );
                },
                3,
            );
            let sub = time(
                || {
                    coda::kernels::conv2d::dpbf16_forward(
                        &x,
                        dims,
                        &w,
                        (c, 3, 3),
                        &b,
                        None,
                        g,
                        Some(&phases),
                    );
                },
                3,
            );
            println!(
                "bf16 upsampling conv c {c} {hw}->{}: nine taps {:.1} ms, sub-pixel {:.1} ms",
                2 * hw,
                nine * 1e3,
                sub * 1e3
            );
        }
        return Ok(());
    }
    if std::env::var("UPSAMPLE_CONV").is_ok() {
        // The decoder's upsampling conv: 9 taps on the upsampled input (implicit GEMM or
        // F(2x2)), the 4-phase sub-pixel form, F(4x4) on a formed upsampled input and on the
        // virtual one (weights transformed beforehand), and what f32_forward picks (with its
        // weight transform).
        use coda::kernels::conv2d::f32_forward;
        let g = ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        };
        for &(c, hw) in &[
            (64usize, 128usize),
            (128, 64),
            (512, 16),
            (128, 128),
            (256, 64),
            (256, 128),
            (512, 32),
            (512, 64),
        ] {
            let x: Vec<f32> = (0..c * hw * hw)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0)
                .collect();
            let w: Vec<f32> = (0..c * c * 9)
                .map(|i| ((i * 31) % 101) as f32 * 1e-3)
                .collect();
            let b = vec![0f32; c];
            let flops = 2.0 * (c * c * 9 * 4 * hw * hw) as f64;
            let nine = if coda::kernels::direct::available() {
                time(
                    || {
                        coda::kernels::direct::conv2d_forward(
                            &x,
                            (1, c, hw, hw),
                            &w,
                            (c, 3, 3),
                            &b,
                            None,
                            g,
                            None,
                        );
                    },
                    3,
                )
            } else {
                time(
                    || {
                        coda::kernels::conv2d::conv2d_forward(
                            &x,
                            (1, c, hw, hw),
                            &w,
                            (c, 3, 3),
                            &b,
                            None,
                            g,
                        );
                    },
                    3,
                )
            };
            let wino = time(
                || {
                    let u = coda::kernels::winograd::transform_weights(&w, c, c);
                    coda::kernels::winograd::conv3x3_forward(
                        &x,
                        (1, c, hw, hw),
                        &u,
                        c,
                        &b,
                        None,
                        2,
                    );
                },
                3,
            );
            let sub = time(
                || {
                    coda::kernels::subpixel::forward((1, c, hw, hw), &w, c, |k, pg| {
                        f32_forward(&x, (1, c, hw, hw), k, (c, 2, 2), &b, None, pg).0
                    });
                },
                3,
            );
            let picked = time(
                || {
                    f32_forward(&x, (1, c, hw, hw), &w, (c, 3, 3), &b, None, g);
                },
                3,
            );
            let u4 = coda::kernels::winograd4::transform_weights(&w, c, c);
            let w4 = time(
                || {
                    let h2 = 2 * hw;
                    let mut up = vec![0f32; c * h2 * h2];
                    for (ci, plane) in up.chunks_mut(h2 * h2).enumerate() {
                        for y in 0..h2 {
                            let src = &x[ci * hw * hw + (y / 2) * hw..][..hw];
                            for (xx, v) in plane[y * h2..][..h2].iter_mut().enumerate() {
                                *v = src[xx / 2];
                            }
                        }
                    }
                    coda::kernels::winograd4::conv3x3_forward(
                        &up,
                        (1, c, h2, h2),
                        coda::kernels::winograd4::Weights::Transformed(&u4),
                        c,
                        &b,
                        None,
                        1,
                    );
                },
                3,
            );
            let w4f = time(
                || {
                    coda::kernels::winograd4::conv3x3_forward(
                        &x,
                        (1, c, hw, hw),
                        coda::kernels::winograd4::Weights::Transformed(&u4),
                        c,
                        &b,
                        None,
                        2,
                    );
                },
                3,
            );
            println!(
                "  upsampled + F(4x4) (cached U) {:.1} ms, fused {:.1} ms",
                w4 * 1e3,
                w4f * 1e3
            );
            println!(
                "upsample conv {c}ch {hw}->{}: 9-tap {:.1} ms ({:.0} GFLOP/s-equiv), winograd {:.1} ms, sub-pixel {:.1} ms, f32_forward picks {:.1} ms",
                2 * hw, nine * 1e3, flops / nine / 1e9, wino * 1e3, sub * 1e3, picked * 1e3
            );
        }
        return Ok(());
    }
    if std::env::var("CONV_BACKWARD").is_ok() {
        // The training convs of tiny-cpu (batch 8) and one FLUX-decoder-size layer: our
        // backward (dx and dW) and forward, to set against scripts' PyTorch convolution_backward.
        use coda::kernels::conv2d::{
            conv2d_backward, conv2d_backward_some, conv2d_forward, f32_forward,
        };
        for &(n, c, hw, co) in &[
            (8usize, 32usize, 64usize, 32usize),
            (8, 64, 32, 64),
            (8, 128, 16, 16 * 8),
            (8, 128, 8, 128),
            (8, 64, 64, 32),
            (4, 128, 64, 128),
        ] {
            let x: Vec<f32> = (0..n * c * hw * hw)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0)
                .collect();
            let w: Vec<f32> = (0..co * c * 9)
                .map(|i| ((i * 31) % 101) as f32 * 1e-3)
                .collect();
            let dy: Vec<f32> = (0..n * co * hw * hw)
                .map(|i| ((i * 13) % 17) as f32 * 0.05)
                .collect();
            let b = vec![0f32; co];
            let g = ConvGeometry::same(1, 1);
            let bw = time(
                || {
                    conv2d_backward(&x, (n, c, hw, hw), &w, (co, 3, 3), &dy, g);
                },
                5,
            );
            let fw = time(
                || {
                    conv2d_forward(&x, (n, c, hw, hw), &w, (co, 3, 3), &b, None, g);
                },
                5,
            );
            let part = |need| {
                time(
                    || {
                        conv2d_backward_some(&x, (n, c, hw, hw), &w, (co, 3, 3), &dy, g, need);
                    },
                    5,
                )
            };
            let (dx_only, dw_only) = (part((true, false)), part((false, true)));
            if coda::kernels::direct::available() {
                let d = time(
                    || {
                        coda::kernels::direct::conv2d_forward(
                            &x,
                            (n, c, hw, hw),
                            &w,
                            (co, 3, 3),
                            &b,
                            None,
                            g,
                            None,
                        );
                    },
                    5,
                );
                println!("  direct (implicit GEMM) forward {:.2} ms", d * 1e3);
            }
            let best = time(
                || {
                    f32_forward(&x, (n, c, hw, hw), &w, (co, 3, 3), &b, None, g);
                },
                5,
            );
            println!(
                "conv3x3 {n}x{c}x{hw}x{hw} -> {co}: backward {:.2} ms (dx {:.2}, dW {:.2}), forward (im2col) {:.2} ms, (f32_forward) {:.2} ms",
                bw * 1e3,
                dx_only * 1e3,
                dw_only * 1e3,
                fw * 1e3,
                best * 1e3
            );
        }
        return Ok(());
    }
    if std::env::var("ONLY_TRACKED").is_ok() {
        backward_alone();
        for _ in 0..3 {
            tracked_parts()?;
        }
        return Ok(());
    }
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
    backward_alone();
    tracked_parts()?;
    // Convolution forward and backward, as training runs it.
    for &(n, c, hw) in &[(4usize, 128usize, 64usize), (4, 256, 32)] {
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?)?;
        let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.05, (c, c, 3, 3), &dev)?)?;
        let b = candle_core::Var::from_tensor(&Tensor::zeros(c, candle_core::DType::F32, &dev)?)?;
        let g = ConvGeometry::same(1, 1);
        let ours = time(
            || {
                conv2d(&x, &w, &b, g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            },
            2,
        );
        let candle = time(
            || {
                coda::kernels::conv2d_composite(&x, &w, &b, g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            },
            1,
        );
        println!(
            "conv3x3 fwd+bwd {n}x{c}x{hw}x{hw}: ours {:.1} ms, candle {:.1} ms ({:.1}x)",
            ours * 1e3,
            candle * 1e3,
            candle / ours
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

#[allow(dead_code)]
fn backward_alone() {
    use coda::kernels::conv2d::conv2d_backward;
    let (n, c, hw) = (4usize, 128usize, 64usize);
    let x: Vec<f32> = (0..n * c * hw * hw).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..c * c * 9).map(|i| (i % 5) as f32 * 0.01).collect();
    let dy: Vec<f32> = (0..n * c * hw * hw).map(|i| (i % 3) as f32 * 0.1).collect();
    let t = time(
        || {
            conv2d_backward(
                &x,
                (n, c, hw, hw),
                &w,
                (c, 3, 3),
                &dy,
                ConvGeometry::same(1, 1),
            );
        },
        2,
    );
    println!("conv2d_backward alone 4x128x64x64: {:.1} ms", t * 1e3);
}

#[allow(dead_code)]
fn tracked_parts() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 128, 64, 64), &dev)?)?;
    let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.05, (128, 128, 3, 3), &dev)?)?;
    let b = candle_core::Var::from_tensor(&Tensor::zeros(128, candle_core::DType::F32, &dev)?)?;
    let g = ConvGeometry::same(1, 1);
    let f = time(
        || {
            conv2d(&x, &w, &b, g).unwrap();
        },
        2,
    );
    let y = conv2d(&x, &w, &b, g)?;
    let s = time(
        || {
            y.sum_all().unwrap();
        },
        2,
    );
    let bw = time(
        || {
            y.sum_all().unwrap().backward().unwrap();
        },
        2,
    );
    println!(
        "tracked: forward {:.1} ms, sum {:.1} ms, sum+backward {:.1} ms",
        f * 1e3,
        s * 1e3,
        bw * 1e3
    );
    Ok(())
}
