//! Convolution forward as a tiled im2col over a GEMM microkernel (the `gemm` crate, which picks
//! AVX-512 or AVX2+FMA at run time). No full im2col buffer is ever built: each task gathers a
//! (K x T) column tile for T output pixels, K = C_in·k·k, into a per-thread buffer, and multiplies
//! it straight into the NCHW output, bias included. The zero padding (also the asymmetric
//! (0,1,0,1) of the VAE's downsampler) and a nearest-neighbour upsampling of the input are folded
//! into the gather, so neither a padded nor an upsampled copy of the input exists.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// How the input is mapped onto the conv's taps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub stride: usize,
    /// Zero padding (top, bottom, left, right).
    pub pad: (usize, usize, usize, usize),
    /// Nearest-neighbour upsampling factor applied to the input before the conv (1 = none).
    pub upsample: usize,
}

impl ConvGeometry {
    pub fn same(stride: usize, pad: usize) -> Self {
        Self {
            stride,
            pad: (pad, pad, pad, pad),
            upsample: 1,
        }
    }

    /// Output (height, width) for an input of (h, w).
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> (usize, usize) {
        let (t, b, l, r) = self.pad;
        let vh = h * self.upsample + t + b;
        let vw = w * self.upsample + l + r;
        ((vh - kh) / self.stride + 1, (vw - kw) / self.stride + 1)
    }
}

/// Shared output pointer: tasks write disjoint column ranges of the output.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method, so that closures capture the whole (Sync) wrapper, not the raw pointer field.
    pub(crate) fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay within the output buffer.
        unsafe { self.0.add(offset) }
    }
}

/// Output pixels per column tile: the tile buffer stays within ~1 MiB (L2) and the GEMM's n
/// dimension stays large enough to run at full speed.
fn tile_width(k: usize, pixels: usize) -> usize {
    let t = (1 << 18) / k.max(1);
    t.clamp(64, 1024).min(pixels).max(1)
}

/// Start an output row segment of channel `co` at its bias plus the residual, if any: the GEMM
/// then accumulates into it (shared by the f32 and AMX convolutions).
#[inline]
pub(crate) fn init_accumulator(row: &mut [f32], bias: f32, residual: Option<&[f32]>) {
    match residual {
        Some(r) => {
            for (o, &rv) in row.iter_mut().zip(r) {
                *o = bias + rv;
            }
        }
        None => row.fill(bias),
    }
}

/// y = conv(x, w) + b (+ residual) over contiguous NCHW f32 slices. Returns (out, oh, ow). The
/// residual, of the output's shape, is added for free: it initialises the GEMM's accumulator.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
) -> (Vec<f32>, usize, usize) {
    let (oh, ow) = g.output_size(h, w, kh, kw);
    let pixels = oh * ow;
    let k = cin * kh * kw;
    let mut out = vec![0f32; n * cout * pixels];
    let direct = kh == 1 && kw == 1 && g == ConvGeometry::same(1, 0);
    let t = tile_width(k, pixels);
    let tiles_per_image = pixels.div_ceil(t);
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n * tiles_per_image).into_par_iter().for_each_init(
        || vec![0f32; if direct { 0 } else { k * t }],
        |col, task| {
            let (b, tile) = (task / tiles_per_image, task % tiles_per_image);
            let p0 = tile * t;
            let tw = t.min(pixels - p0);
            let xb = &x[b * cin * h * w..(b + 1) * cin * h * w];
            let base = b * cout * pixels + p0;
            // SAFETY: this task owns columns p0..p0+tw of image b of the output.
            let dst = out_ptr.at(base);
            for (co, &bc) in bias.iter().enumerate() {
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add(co * pixels), tw) };
                init_accumulator(row, bc, residual.map(|r| &r[base + co * pixels..][..tw]));
            }
            let (rhs, rhs_rs) = if direct {
                (xb[p0..].as_ptr(), pixels as isize)
            } else {
                gather(col, tw, xb, (cin, h, w), (kh, kw), (ow, p0, tw), g);
                (col.as_ptr(), tw as isize)
            };
            unsafe {
                super::sgemm::gemm(
                    cout,
                    tw,
                    k,
                    dst,
                    1,
                    pixels as isize,
                    true,
                    weight.as_ptr(),
                    1,
                    k as isize,
                    rhs,
                    1,
                    rhs_rs,
                    1.0,
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    (out, oh, ow)
}

/// Fill `col` (K rows of `tw` values, rows `ld` apart) with the taps of output pixels
/// p0..p0+tw.
#[allow(clippy::too_many_arguments)]
fn gather(
    col: &mut [f32],
    ld: usize,
    x: &[f32],
    (cin, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    (ow, p0, tw): (usize, usize, usize),
    g: ConvGeometry,
) {
    let (pt, _, pl, _) = g.pad;
    let (vh, vw) = ((h * g.upsample) as isize, (w * g.upsample) as isize);
    let up = g.upsample as isize;
    for ci in 0..cin {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = &mut col[((ci * kh + ky) * kw + kx) * ld..][..tw];
                let mut j = 0;
                while j < tw {
                    // One output row segment at a time.
                    let p = p0 + j;
                    let (oy, ox0) = (p / ow, p % ow);
                    let seg = (ow - ox0).min(tw - j);
                    let vy = (oy * g.stride + ky) as isize - pt as isize;
                    let dst = &mut row[j..j + seg];
                    if vy < 0 || vy >= vh {
                        dst.fill(0.0);
                    } else {
                        let src = &plane[(vy / up) as usize * w..][..w];
                        fill_row(
                            dst,
                            src,
                            ox0,
                            kx as isize - pl as isize,
                            g.stride,
                            g.upsample,
                            vw,
                        );
                    }
                    j += seg;
                }
            }
        }
    }
}

/// The adjoint of [`gather`]: add the column tile `col` (K rows of `tw`, `ld` apart) back into
/// the input gradient `dx` (cin, h, w) at the positions the gather read from.
#[allow(clippy::too_many_arguments)]
fn scatter_add(
    dx: &mut [f32],
    col: &[f32],
    ld: usize,
    (cin, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    (ow, p0, tw): (usize, usize, usize),
    g: ConvGeometry,
) {
    let (pt, _, pl, _) = g.pad;
    let (vh, vw) = ((h * g.upsample) as isize, (w * g.upsample) as isize);
    let up = g.upsample as isize;
    for ci in 0..cin {
        let plane = &mut dx[ci * h * w..(ci + 1) * h * w];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = &col[((ci * kh + ky) * kw + kx) * ld..][..tw];
                let mut j = 0;
                while j < tw {
                    let p = p0 + j;
                    let (oy, ox0) = (p / ow, p % ow);
                    let seg = (ow - ox0).min(tw - j);
                    let vy = (oy * g.stride + ky) as isize - pt as isize;
                    if vy >= 0 && vy < vh {
                        let dst = &mut plane[(vy / up) as usize * w..][..w];
                        add_row(
                            dst,
                            &row[j..j + seg],
                            ox0,
                            kx as isize - pl as isize,
                            g.stride,
                            g.upsample,
                            vw,
                        );
                    }
                    j += seg;
                }
            }
        }
    }
}

/// The adjoint of [`fill_row`]: dst[vx / up] += src[i] for the i whose virtual column
/// vx = (ox0 + i)·stride + off lies in [0, vw). The valid range is found first, so the inner loops
/// are branch-free (a vectorised add in the common stride-1 case).
#[inline]
fn add_row(
    dst: &mut [f32],
    src: &[f32],
    ox0: usize,
    off: isize,
    stride: usize,
    up: usize,
    vw: isize,
) {
    let (lo, hi, start) = valid_span(src.len(), ox0, off, stride, vw);
    let src = &src[lo..hi];
    match (stride, up) {
        (1, 1) => {
            for (d, &v) in dst[start..start + src.len()].iter_mut().zip(src) {
                *d += v;
            }
        }
        (1, 2) => {
            for (i, &v) in src.iter().enumerate() {
                dst[(start + i) >> 1] += v;
            }
        }
        _ => {
            for (i, &v) in src.iter().enumerate() {
                dst[(start + i * stride) / up] += v;
            }
        }
    }
}

/// db = Σ dy over images and pixels (f64 sums), for dy (n, cout, pixels).
pub(crate) fn bias_grad(dy: &[f32], n: usize, cout: usize, pixels: usize) -> Vec<f32> {
    // Eight independent f64 sums per run (one chained sum was latency-bound: ~4 cycles per
    // value, 1.8% of a tiny-cpu update), channels in parallel; the order is fixed, so the
    // result does not depend on the thread count.
    let run_sum = |run: &[f32]| {
        let mut acc = [0f64; 8];
        let chunks = run.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v as f64;
            }
        }
        acc.iter().sum::<f64>() + tail
    };
    (0..cout)
        .into_par_iter()
        .map(|co| {
            (0..n)
                .map(|b| run_sum(&dy[(b * cout + co) * pixels..][..pixels]))
                .sum::<f64>() as f32
        })
        .collect()
}

/// Gradients of `conv(x, w) + b` with respect to x, w and b, given the output gradient `dy`:
/// dW = Σ dy_tile · col_tileᵀ, db = Σ dy, and dx = scatter(Wᵀ · dy_tile), tile by tile with the
/// same gather as the forward pass, so every geometry (stride, asymmetric padding, upsampling)
/// is handled by one code path.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    dy: &[f32],
    g: ConvGeometry,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    conv2d_backward_some(
        x,
        (n, cin, h, w),
        weight,
        (cout, kh, kw),
        dy,
        g,
        (true, true),
    )
}

/// As [`conv2d_backward`], computing dx and dW only where `(need_dx, need_dw)` asks (a frozen
/// weight needs no dW, an input image no dx); the skipped ones come back empty.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward_some(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    dy: &[f32],
    g: ConvGeometry,
    (need_dx, need_dw): (bool, bool),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // dW without im2col (register-blocked over pixels, 1.5-3x faster).
    if need_dw && super::weight_grad::available() {
        let dw = super::weight_grad::conv2d_weight_grad(x, (n, cin, h, w), dy, (cout, kh, kw), g);
        if !need_dx {
            let (oh, ow) = g.output_size(h, w, kh, kw);
            return (Vec::new(), dw, bias_grad(dy, n, cout, oh * ow));
        }
        let (dx, _, db) = conv2d_backward_some(
            x,
            (n, cin, h, w),
            weight,
            (cout, kh, kw),
            dy,
            g,
            (need_dx, false),
        );
        return (dx, dw, db);
    }
    let (oh, ow) = g.output_size(h, w, kh, kw);
    // At stride 1, dx is the forward conv of dy with the flipped, transposed kernel and the
    // complementary padding: the forward's kernels (the register-blocked implicit GEMM on
    // AVX-512, Winograd) beat Wᵀ·dy followed by a scatter, whose GEMM has only cout to reduce
    // over. With nearest upsampling that gives the gradient of the upsampled input, which each
    // input pixel receives summed over its up x up copies.
    if need_dx && g.stride == 1 {
        let (pt, pb, pl, pr) = g.pad;
        let mut flipped = vec![0f32; cin * cout * kh * kw];
        for co in 0..cout {
            for ci in 0..cin {
                for t in 0..kh * kw {
                    flipped[(ci * cout + co) * kh * kw + (kh * kw - 1 - t)] =
                        weight[(co * cin + ci) * kh * kw + t];
                }
            }
        }
        let transposed = ConvGeometry {
            stride: 1,
            pad: (kh - 1 - pt, kh - 1 - pb, kw - 1 - pl, kw - 1 - pr),
            upsample: 1,
        };
        let (dxv, vh, vw) = f32_forward(
            dy,
            (n, cout, oh, ow),
            &flipped,
            (cin, kh, kw),
            &vec![0f32; cin],
            None,
            transposed,
        );
        let up = g.upsample;
        debug_assert_eq!((vh, vw), (h * up, w * up));
        let dx = if up == 1 {
            dxv
        } else {
            let mut dx = vec![0f32; n * cin * h * w];
            dx.par_chunks_mut(w)
                .zip(dxv.par_chunks(up * vw))
                .for_each(|(row, src)| {
                    for (xi, d) in row.iter_mut().enumerate() {
                        *d = src
                            .chunks_exact(vw)
                            .map(|r| r[xi * up..(xi + 1) * up].iter().sum::<f32>())
                            .sum();
                    }
                });
            dx
        };
        if !need_dw {
            return (dx, Vec::new(), bias_grad(dy, n, cout, oh * ow));
        }
        let (_, dw, db) = conv2d_backward_gather(
            x,
            (n, cin, h, w),
            weight,
            (cout, kh, kw),
            dy,
            g,
            (false, true),
        );
        return (dx, dw, db);
    }
    conv2d_backward_gather(
        x,
        (n, cin, h, w),
        weight,
        (cout, kh, kw),
        dy,
        g,
        (need_dx, need_dw),
    )
}

/// As [`conv2d_backward_some`], every gradient through the im2col gather (dx by scattering
/// Wᵀ·dy back): the one path for every geometry, and the reference the faster kernels are
/// tested against.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward_gather(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    dy: &[f32],
    g: ConvGeometry,
    (need_dx, need_dw): (bool, bool),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (oh, ow) = g.output_size(h, w, kh, kw);
    let pixels = oh * ow;
    let k = cin * kh * kw;
    let t = tile_width(k, pixels);
    let tiles = pixels.div_ceil(t);
    let db = bias_grad(dy, n, cout, pixels);
    // Small maps: several whole images side by side in one column tile, so that the GEMMs get
    // a wide enough n (dx) or k (dW) dimension (an 8x8 map alone ran at half speed).
    let group = if pixels < tile_width(k, usize::MAX) {
        (tile_width(k, usize::MAX) / pixels).clamp(1, n)
    } else {
        1
    };
    let groups = n.div_ceil(group);
    let par = if groups >= rayon::current_num_threads() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // Groups are independent: each task owns its images' dx and a private dW accumulator.
    let per_group: Vec<(Vec<f32>, Vec<f32>)> = (0..groups)
        .into_par_iter()
        .map(|gi| {
            let images = gi * group..((gi + 1) * group).min(n);
            let count = images.len();
            let xg = &x[images.start * cin * h * w..images.end * cin * h * w];
            let dyg_all = &dy[images.start * cout * pixels..images.end * cout * pixels];
            // The column tiles: (p0, tw) of one image, or every image of the group whole.
            let (width, tiles) = if count == 1 {
                (t, tiles)
            } else {
                (count * pixels, 1)
            };
            let mut dxg = vec![0f32; if need_dx { count * cin * h * w } else { 0 }];
            let mut dw = vec![0f32; if need_dw { cout * k } else { 0 }];
            let mut col = vec![0f32; if need_dw { k * width } else { 0 }];
            let mut dcol = vec![0f32; if need_dx { k * width } else { 0 }];
            // dy of the group's images side by side (cout x count·pixels); one image is read in place.
            let packed_dy: Vec<f32> = if count == 1 {
                Vec::new()
            } else {
                let mut d = vec![0f32; cout * count * pixels];
                for (i, img) in dyg_all.chunks_exact(cout * pixels).enumerate() {
                    for (co, row) in img.chunks_exact(pixels).enumerate() {
                        d[co * count * pixels + i * pixels..][..pixels].copy_from_slice(row);
                    }
                }
                d
            };
            let (dy_src, dy_ld) = if count == 1 {
                (dyg_all, pixels)
            } else {
                (&packed_dy[..], count * pixels)
            };
            for tile in 0..tiles {
                let (p0, tw) = if count == 1 {
                    (tile * t, t.min(pixels - tile * t))
                } else {
                    (0, count * pixels)
                };
                // SAFETY: all pointers address buffers of the stated shapes and strides.
                if need_dw {
                    if count == 1 {
                        gather(&mut col, tw, xg, (cin, h, w), (kh, kw), (ow, p0, tw), g);
                    } else {
                        for (i, xb) in xg.chunks_exact(cin * h * w).enumerate() {
                            gather(
                                &mut col[i * pixels..],
                                tw,
                                xb,
                                (cin, h, w),
                                (kh, kw),
                                (ow, 0, pixels),
                                g,
                            );
                        }
                    }
                    // dW (cout x K) += dy_tile (cout x tw) · colᵀ (tw x K)
                    unsafe {
                        super::sgemm::gemm(
                            cout,
                            k,
                            tw,
                            dw.as_mut_ptr(),
                            1,
                            k as isize,
                            true,
                            dy_src[p0..].as_ptr(),
                            1,
                            dy_ld as isize,
                            col.as_ptr(),
                            tw as isize,
                            1,
                            1.0,
                            1.0,
                            par,
                        )
                    };
                }
                if need_dx {
                    // dcol (K x tw) = Wᵀ (K x cout) · dy_tile (cout x tw)
                    unsafe {
                        super::sgemm::gemm(
                            k,
                            tw,
                            cout,
                            dcol.as_mut_ptr(),
                            1,
                            tw as isize,
                            false,
                            weight.as_ptr(),
                            k as isize,
                            1,
                            dy_src[p0..].as_ptr(),
                            1,
                            dy_ld as isize,
                            0.0,
                            1.0,
                            par,
                        )
                    };
                    if count == 1 {
                        scatter_add(&mut dxg, &dcol, tw, (cin, h, w), (kh, kw), (ow, p0, tw), g);
                    } else {
                        for (i, dxb) in dxg.chunks_exact_mut(cin * h * w).enumerate() {
                            scatter_add(
                                dxb,
                                &dcol[i * pixels..],
                                tw,
                                (cin, h, w),
                                (kh, kw),
                                (ow, 0, pixels),
                                g,
                            );
                        }
                    }
                }
            }
            (dxg, dw)
        })
        .collect();
    let mut dx = Vec::with_capacity(if need_dx { n * cin * h * w } else { 0 });
    let mut dw = vec![0f32; if need_dw { cout * k } else { 0 }];
    for (dxb, dwb) in per_group {
        dx.extend_from_slice(&dxb);
        for (a, v) in dw.iter_mut().zip(dwb) {
            *a += v;
        }
    }
    (dx, dw, db)
}

/// For n columns i whose virtual column is vx = (ox0 + i)·stride + off: the first and
/// one-past-last i with 0 <= vx < vw, and the virtual column of the first.
#[inline]
fn valid_span(n: usize, ox0: usize, off: isize, stride: usize, vw: isize) -> (usize, usize, usize) {
    let s = stride as isize;
    let n = n as isize;
    let vx0 = ox0 as isize * s + off;
    let lo = if vx0 >= 0 { 0 } else { (-vx0 + s - 1) / s }.min(n);
    let hi = if vx0 >= vw {
        0
    } else {
        ((vw - vx0 + s - 1) / s).min(n)
    }
    .max(lo);
    (lo as usize, hi as usize, (vx0 + lo * s) as usize)
}

/// dst[i] = input row at virtual column (ox0 + i)·stride + off (zero outside [0, vw)), where the
/// virtual row is `src` upsampled `up` times. The valid range is found first, so the inner loops
/// are branch-free copies (a memcpy in the common stride-1 case).
#[inline]
fn fill_row(
    dst: &mut [f32],
    src: &[f32],
    ox0: usize,
    off: isize,
    stride: usize,
    up: usize,
    vw: isize,
) {
    let (lo, hi, start) = valid_span(dst.len(), ox0, off, stride, vw);
    dst[..lo].fill(0.0);
    dst[hi..].fill(0.0);
    let d = &mut dst[lo..hi];
    match (stride, up) {
        (1, 1) => d.copy_from_slice(&src[start..start + d.len()]),
        (1, 2) => {
            for (i, v) in d.iter_mut().enumerate() {
                *v = src[(start + i) >> 1];
            }
        }
        _ => {
            for (i, v) in d.iter_mut().enumerate() {
                *v = src[(start + i * stride) / up];
            }
        }
    }
}

/// Convs with at least this many input and output channels use Winograd F(2x2, 3x3) (on
/// AVX-512, where the implicit GEMM is as fast at 128 channels) when F(4x4, 3x3) does not apply.
pub const WINOGRAD_MIN_CHANNELS: usize = 256;
/// Winograd F(4x4, 3x3) from this many input and output channels ...
pub const WINOGRAD4_MIN_CHANNELS: usize = 64;
/// ... on maps of at least this many pixels (per image, not per batch: the kernel chosen, and so
/// the rounding, must not depend on the batch size, or an image's tokens could). From 32x32 on
/// it beat F(2x2) once its weight transform ran in parallel (2 threads, fastest of 5, with the
/// transform: 512 ch 32x32 16.3 vs 22.2 ms on AVX2, 7.2 vs 13.7 on AVX-512); at 16x16 it
/// does not (the transform of 36 matrices per call is then a large part of the work). Below
/// 4096 pixels on AVX-512 only from `WINOGRAD_MIN_CHANNELS`: at 128 channels 32x32 the implicit
/// GEMM was faster there (0.9-1.0 against 1.3-1.4 ms).
pub const WINOGRAD4_MIN_PIXELS: usize = 1024;
/// ... and from `WINOGRAD_MIN_CHANNELS` on maps of at least this many pixels, where a small
/// map's output channels are split between threads and each thread transforms the weights of
/// its own rows (`winograd4::Weights::Raw`). MAR-size tokenizer, 2 threads, AMD EPYC, median per
/// conv over `coda bench --iters 3` (F(4x4) against the implicit GEMM with its packed weights
/// kept): 512 ch 16x16 at batch 1 5.3-6.7 against 7.5-9.3 ms (AVX-512), 6.2-6.8 against
/// 10.3-12.3 (forced AVX2); at batch 8 (whole transform per call) 42.5 against 53.7. The
/// whole transform per call at batch 1 took 13.5 ms on the same day (it writes and reads back
/// 37 MiB: 5-7 ms on 2 threads that day, 1.6 ms on an earlier one).
pub const WINOGRAD4_WIDE_MIN_PIXELS: usize = 256;
/// The upsampling conv (nearest 2x, then 3x3) runs F(4x4, 3x3) on the virtual upsampled input
/// from `WINOGRAD4_MIN_CHANNELS` on inputs of at least this many pixels, its sub-pixel form (16
/// multiply-adds of 36 per output pixel) elsewhere. F(4x4) does 9 of 36 and so won from 64
/// channels (2 threads, fastest of 5, `UPSAMPLE_CONV=1 kernel_bench`, AMD EPYC, weights
/// transformed beforehand): AVX-512 64 ch 128->256 13.0 against 16.1 ms, 128 ch 64->128 10.7
/// against 13.8, 512 ch 32->64 39 against 55, 64->128 128 against 202; forced AVX2 13.6 / 17.5,
/// 13.3 / 16.6, 51 / 81, 190 / 270. At 512 ch 16->32 it tied on AVX-512 (19.7 / 19.8) and lost
/// on AVX2 (28.3 / 21.9). In the MAR-size decoder, with the weight transform that inference
/// does per call (`F32Weights::worth_keeping`): 128 ch 128->256 46 against 74 ms, 256 ch
/// 64->128 46 against 51.
pub const WINOGRAD4_UP_MIN_PIXELS: usize = 1024;
/// F(2x2, 3x3) without the AVX-512 implicit GEMM: against im2col + GEMM on the AVX2 path Winograd
/// measured 1.33-1.5x faster at 128 channels (256x256 and 64x64 maps), even at 64.
pub const WINOGRAD_MIN_CHANNELS_AVX2: usize = 128;
/// F(2x2, 3x3) only on maps of at least this many pixels (per image): below, where F(4x4) does
/// not apply, it lost to im2col and to the implicit GEMM on both paths (2 threads, batch 1,
/// 16x16, `MIN=1 DIRECT=1 kernel_bench`: AVX-512 512 ch 11.3-13.1 ms against 6.3-7.1, 256 ch
/// 3.2-3.5 against 1.6-2.6; AVX2 256 ch 5.1 against 2.3-3.0; 128 ch 8x8 at batch 8 1.58 against
/// im2col's 1.27).
pub const WINOGRAD_MIN_PIXELS: usize = 4096;

/// The kernel the f32 forward runs for one conv on images of one shape (never on the batch
/// size: kernels round differently, and an image's tokens must not depend on its batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Kernel {
    Im2col,
    /// The implicit GEMM of [`super::direct`] (AVX-512 or AVX2).
    ImplicitGemm,
    Winograd4,
    Winograd2,
    /// The upsampling conv as four 2x2 phase convs; per phase, whether it runs the implicit GEMM
    /// (else im2col).
    Subpixel([bool; 4]),
}

/// Which [`F32Kernel`] runs a (cout, cin, kh, kw) conv on (cin, h, w) images: the upsampling
/// conv in its sub-pixel form, Winograd F(4x4) or F(2x2) on wide layers, the implicit GEMM on
/// large maps, im2col + GEMM otherwise.
pub fn f32_kernel(
    cin: usize,
    (h, w): (usize, usize),
    (cout, kh, kw): (usize, usize, usize),
    residual: bool,
    g: ConvGeometry,
) -> F32Kernel {
    if super::subpixel::applies(kh, kw, g) && !residual {
        if super::winograd4::supports(kh, kw, g)
            && cin.min(cout) >= WINOGRAD4_MIN_CHANNELS
            && h * w >= WINOGRAD4_UP_MIN_PIXELS
        {
            return F32Kernel::Winograd4;
        }
        return F32Kernel::Subpixel(std::array::from_fn(|p| {
            let pg = super::subpixel::phase_geometry(p / 2, p % 2);
            f32_kernel(cin, (h, w), (cout, 2, 2), false, pg) == F32Kernel::ImplicitGemm
        }));
    }
    // Winograd F(2x2, 3x3) where it measured faster than im2col (wide layers; at 128
    // channels its transforms cost more than the GEMM FLOPs it saves).
    let min_channels = if super::direct::available() {
        WINOGRAD_MIN_CHANNELS
    } else {
        WINOGRAD_MIN_CHANNELS_AVX2
    };
    // Winograd F(4x4, 3x3): 1.4-2x faster than the best of the others from 64 channels on both
    // paths, where the map is large enough to amortise its weight transform (36 values per
    // weight pair: 1.6-7 ms for 512 x 512 channels on 2 threads, per call in inference; fused
    // into the tile GEMMs' tasks where a call has few blocks).
    if super::winograd4::supports(kh, kw, g)
        && g.upsample == 1
        && cin >= WINOGRAD4_MIN_CHANNELS
        && cout >= WINOGRAD4_MIN_CHANNELS
        && (h * w >= WINOGRAD4_MIN_PIXELS
            || (h * w >= WINOGRAD4_WIDE_MIN_PIXELS && cin.min(cout) >= WINOGRAD_MIN_CHANNELS))
        && (h * w >= 64 * 64 || !super::direct::available() || cin.min(cout) >= min_channels)
    {
        return F32Kernel::Winograd4;
    }
    if super::winograd::supports(kh, kw, g)
        && cin >= min_channels
        && cout >= min_channels
        && h * w >= WINOGRAD_MIN_PIXELS
    {
        return F32Kernel::Winograd2;
    }
    // The implicit GEMM without im2col, measured 1.15-1.33x faster on the VAE's 3x3 convs on
    // AVX-512 and 1.2-3x on AVX2; rows of 8-15 pixels as flat runs of padded rows (8x8, 128
    // channels, batch 8: 1.05-1.08 against im2col's 1.21-1.30 ms on AVX-512, 1.07-1.4x on
    // AVX2), narrower ones through im2col; maps below
    // 32x32 run several images at once (16x16 at batch 8: 2.35 against 2.98 ms; at batch 1,
    // 128-256 channels 1.3-2.4x faster than im2col, 512 a tie). 1x1 convs need no gather: on
    // AVX-512 the GEMM is faster there (0.67-0.84x), but the `gemm` crate's AVX2 kernel ran them
    // at 4-89 GFLOP/s (LoRA's rank-8 1x1 conv: 4), the implicit GEMM 1.5-4.4x faster.
    let (_, ow) = g.output_size(h, w, kh, kw);
    let implicit = (super::direct::available() && kh * kw > 1) || super::direct::available_avx2();
    if (ow >= 16 || super::direct::narrow_applies(w, kw, g)) && implicit {
        F32Kernel::ImplicitGemm
    } else {
        F32Kernel::Im2col
    }
}

/// A conv's f32 weights in the form its [`F32Kernel`] reads (im2col reads them as they are).
/// Inference keeps them beside the model's conv ([`super::amx::WeightCache`]): packing a
/// 512-channel 3x3 weight for the implicit GEMM, or transforming it for Winograd, costs a good
/// part of a 16x16 or 32x32 conv.
#[derive(Debug)]
pub enum F32Weights {
    ImplicitGemm(Vec<f32>),
    Winograd4(Vec<f32>),
    Winograd2(Vec<f32>),
    /// The four phase kernels, each packed for the implicit GEMM or plain (im2col), as its
    /// flag says.
    Subpixel(Box<[(bool, Vec<f32>); 4]>),
}

impl F32Weights {
    /// The (cout, cin, kh, kw) weight `wt` prepared for `kernel`; None for im2col.
    pub fn prepare(
        kernel: F32Kernel,
        wt: &[f32],
        (cout, cin, kh, kw): (usize, usize, usize, usize),
    ) -> Option<F32Weights> {
        Some(match kernel {
            F32Kernel::Im2col => return None,
            F32Kernel::ImplicitGemm => {
                F32Weights::ImplicitGemm(super::direct::pack_weights(wt, (cout, cin, kh, kw)))
            }
            F32Kernel::Winograd4 => {
                F32Weights::Winograd4(super::winograd4::transform_weights(wt, cout, cin))
            }
            F32Kernel::Winograd2 => {
                F32Weights::Winograd2(super::winograd::transform_weights(wt, cout, cin))
            }
            F32Kernel::Subpixel(implicit) => {
                let kernels = super::subpixel::phase_weights(wt, cout, cin);
                let mut it = kernels.into_iter().zip(implicit);
                F32Weights::Subpixel(Box::new(std::array::from_fn(|_| {
                    let (k, imp) = it.next().expect("four phases");
                    let k = if imp {
                        super::direct::pack_weights(&k, (cout, cin, 2, 2))
                    } else {
                        k
                    };
                    (imp, k)
                })))
            }
        })
    }

    /// Whether inference keeps `kernel`'s prepared weights beside the model: the implicit GEMM's
    /// and the sub-pixel phases' (as large as the weight). Winograd's are not kept: 4x the weight
    /// for F(4x4), kept they took a FLUX-size tokenizer's peak RSS from 703 to 1833-1855 MiB at
    /// 256 px (PyTorch: 1748-1859), while their transform is 1.6-7 ms (by the day's memory
    /// speed) of a 512-channel 64x64 conv's 40-50, and small maps transform theirs inside the
    /// tile GEMMs' tasks (`winograd4::Weights::Raw`). The packing kept saves as much on a 16x16
    /// implicit GEMM: MAR, forced AVX2, CPU time of `coda bench --iters 5` 48-49 s -> 40-48 s,
    /// peak RSS 545 -> 642-675 MiB.
    pub fn worth_keeping(kernel: F32Kernel) -> bool {
        matches!(kernel, F32Kernel::ImplicitGemm | F32Kernel::Subpixel(_))
    }

    /// The kernel these weights were prepared for.
    pub fn kernel(&self) -> F32Kernel {
        match self {
            F32Weights::ImplicitGemm(_) => F32Kernel::ImplicitGemm,
            F32Weights::Winograd4(_) => F32Kernel::Winograd4,
            F32Weights::Winograd2(_) => F32Kernel::Winograd2,
            F32Weights::Subpixel(p) => F32Kernel::Subpixel(std::array::from_fn(|i| p[i].0)),
        }
    }
}

/// The f32 forward on the CPU with the kernel [`f32_kernel`] picks. Returns (out, oh, ow).
#[allow(clippy::too_many_arguments)]
pub fn f32_forward(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    wt: &[f32],
    kernel: (usize, usize, usize),
    b: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
) -> (Vec<f32>, usize, usize) {
    f32_forward_prepared(x, dims, wt, kernel, b, residual, g, None)
}

/// As [`f32_forward`], with `prepared` weights where the caller keeps them (used only if they
/// were prepared for the kernel this shape runs; prepared here otherwise). Same bits either way.
#[allow(clippy::too_many_arguments)]
pub fn f32_forward_prepared(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    b: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
    prepared: Option<&F32Weights>,
) -> (Vec<f32>, usize, usize) {
    let kernel = f32_kernel(cin, (h, w), (cout, kh, kw), residual.is_some(), g);
    let up = g.upsample;
    if kernel == F32Kernel::Winograd4
        && !matches!(prepared, Some(F32Weights::Winograd4(_)))
        && super::winograd4::fuses_weight_transform(n, cin, h * up, w * up)
    {
        // Few blocks: each task transforms the weights of its own rows (same bits).
        let u = super::winograd4::Weights::Raw(wt);
        let out = super::winograd4::conv3x3_forward(x, (n, cin, h, w), u, cout, b, residual, up);
        return (out, h * up, w * up);
    }
    let fresh;
    let prepared = match prepared {
        Some(p) if p.kernel() == kernel => Some(p),
        _ => {
            fresh = F32Weights::prepare(kernel, wt, (cout, cin, kh, kw));
            fresh.as_ref()
        }
    };
    let dims = (n, cin, h, w);
    match prepared {
        None => conv2d_forward(x, dims, wt, (cout, kh, kw), b, residual, g),
        Some(F32Weights::ImplicitGemm(a)) => {
            super::direct::conv2d_forward(x, dims, wt, (cout, kh, kw), b, residual, g, Some(a))
        }
        Some(F32Weights::Winograd4(u)) => {
            let u = super::winograd4::Weights::Transformed(u);
            let out = super::winograd4::conv3x3_forward(x, dims, u, cout, b, residual, up);
            (out, h * up, w * up)
        }
        Some(F32Weights::Winograd2(u)) => {
            let (oh, ow) = g.output_size(h, w, kh, kw);
            let out = super::winograd::conv3x3_forward(x, dims, u, cout, b, residual, g.upsample);
            (out, oh, ow)
        }
        Some(F32Weights::Subpixel(phases)) => {
            super::subpixel::forward_phases((n, h, w), cout, |p, pg| {
                let (implicit, k) = &phases[p];
                if *implicit {
                    let k2 = (cout, 2, 2);
                    super::direct::conv2d_forward(x, dims, &[], k2, b, None, pg, Some(k)).0
                } else {
                    conv2d_forward(x, dims, k, (cout, 2, 2), b, None, pg).0
                }
            })
        }
    }
}

/// Whether the bf16 forward runs a conv in f32 as Winograd F(4x4) (as f32 does) instead of the
/// bf16 direct conv: on outputs of at least [`BF16_F32_WINOGRAD_MIN_PIXELS`], where F(4x4)'s 4x
/// fewer multiplies outrun `vdpbf16ps`'s 2x (and f32 operands are exact).
pub fn bf16_runs_f32_winograd(
    cin: usize,
    (h, w): (usize, usize),
    (cout, kh, kw): (usize, usize, usize),
    residual: bool,
    g: ConvGeometry,
) -> bool {
    let pixels = h * w * g.upsample * g.upsample;
    pixels >= BF16_F32_WINOGRAD_MIN_PIXELS
        && f32_kernel(cin, (h, w), (cout, kh, kw), residual, g) == F32Kernel::Winograd4
}

/// MAR-size tokenizer, `coda bench --precision bf16 --iters 3`, 2 threads, AMD EPYC, three
/// alternating runs each, tokenizer encode + decode: F(4x4) in f32 from 256x256 outputs (the
/// 128-channel layers) 994-1123 ms, from 128x128 1094-1152, never 1157-1285; PSNR against f32
/// 49.6-49.7 dB (49.0-49.6 never). Per conv (128 ch, 256x256, median): F(4x4) 44-49 ms, the
/// bf16 direct conv 54-57.
pub const BF16_F32_WINOGRAD_MIN_PIXELS: usize = 256 * 256;

/// The bf16 forward on AVX512_BF16: the convs of large maps that f32 gives to Winograd F(4x4)
/// as in f32 ([`bf16_runs_f32_winograd`]), the upsampling conv as its four sub-pixel phases (16
/// of its 36 multiply-adds per output pixel), every other conv as one implicit GEMM.
/// `packed`: the conv's weights as the cache keeps them, or None (packed here).
#[allow(clippy::too_many_arguments)]
pub fn dpbf16_forward(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    b: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
    packed: Option<&super::amx::Packed>,
) -> (Vec<f32>, usize, usize) {
    use super::amx::Packed;
    if bf16_runs_f32_winograd(cin, (h, w), (cout, kh, kw), residual.is_some(), g) {
        return f32_forward_prepared(x, (n, cin, h, w), wt, (cout, kh, kw), b, residual, g, None);
    }
    if super::subpixel::applies(kh, kw, g) && residual.is_none() {
        let fresh;
        let kernels: &[Vec<u32>; 4] = match packed {
            Some(Packed::PhasePairs(p)) => p,
            _ => {
                let k = super::subpixel::phase_weights(wt, cout, cin);
                fresh =
                    std::array::from_fn(|p| super::dpbf16::pack_weights(&k[p], (cout, cin, 2, 2)));
                &fresh
            }
        };
        // The packed phase kernels stand in for the f32 weight, which is then never read.
        return super::subpixel::forward_phases((n, h, w), cout, |p, pg| {
            let dims = (n, cin, h, w);
            super::dpbf16::conv2d_forward(
                x,
                dims,
                &[],
                (cout, 2, 2),
                b,
                None,
                pg,
                Some(&kernels[p]),
            )
            .0
        });
    }
    let pairs = match packed {
        Some(Packed::Pairs(p)) => Some(p.as_slice()),
        _ => None,
    };
    super::dpbf16::conv2d_forward(x, (n, cin, h, w), wt, (cout, kh, kw), b, residual, g, pairs)
}

struct Conv2dOp {
    geometry: ConvGeometry,
    residual: Option<Tensor>,
    /// Which of (x, weight) need a gradient: frozen weights and input images do not, and
    /// skipping their GEMMs is most of a frozen VAE's backward cost.
    need: (bool, bool),
    /// The weights already converted for the kernel that runs them (inference).
    packed: Option<std::sync::Arc<super::amx::Packed>>,
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "coda-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let f = |s, l| super::f32_slice("coda-conv2d", s, l);
        let (x, wt, b) = (f(xs, xl)?, f(ws, wl)?, f(bs, bl)?);
        let [n, cin, h, w] = *xl.dims() else {
            candle_core::bail!("coda-conv2d: input must be 4-D")
        };
        let [cout, wcin, kh, kw] = *wl.dims() else {
            candle_core::bail!("coda-conv2d: weight must be 4-D")
        };
        if wcin != cin || b.len() != cout {
            candle_core::bail!(
                "coda-conv2d: input {:?}, weight {:?}, bias {:?} disagree",
                xl.dims(),
                wl.dims(),
                bl.dims()
            );
        }
        let (oh, ow) = self.geometry.output_size(h, w, kh, kw);
        let guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &guard {
            None => None,
            Some((storage, layout)) => {
                let candle_core::Storage::Cpu(cpu) = &**storage else {
                    candle_core::bail!("coda-conv2d: residual not on the CPU")
                };
                if layout.dims() != [n, cout, oh, ow] {
                    candle_core::bail!(
                        "coda-conv2d: residual {:?} for an output of {:?}",
                        layout.dims(),
                        [n, cout, oh, ow]
                    );
                }
                Some(super::f32_slice("coda-conv2d", cpu, layout)?)
            }
        };
        match super::conv_backend() {
            super::ConvBackend::Amx(three) => {
                let packed = match self.packed.as_deref() {
                    Some(super::amx::Packed::Tiles(t)) => Some(t),
                    _ => None,
                };
                let (out, oh, ow) = super::amx::conv2d_forward(
                    x,
                    (n, cin, h, w),
                    wt,
                    (cout, kh, kw),
                    b,
                    residual,
                    self.geometry,
                    three,
                    packed,
                );
                return Ok((CpuStorage::F32(out), Shape::from((n, cout, oh, ow))));
            }
            super::ConvBackend::DotBf16 => {
                let (out, oh, ow) = dpbf16_forward(
                    x,
                    (n, cin, h, w),
                    wt,
                    (cout, kh, kw),
                    b,
                    residual,
                    self.geometry,
                    self.packed.as_deref(),
                );
                return Ok((CpuStorage::F32(out), Shape::from((n, cout, oh, ow))));
            }
            super::ConvBackend::F32 => {}
        }
        let prepared = match self.packed.as_deref() {
            Some(super::amx::Packed::F32(p)) => Some(p),
            _ => None,
        };
        let (out, oh, ow) = f32_forward_prepared(
            x,
            (n, cin, h, w),
            wt,
            (cout, kh, kw),
            b,
            residual,
            self.geometry,
            prepared,
        );
        Ok((CpuStorage::F32(out), Shape::from((n, cout, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, cin, h, wd) = x.dims4()?;
        let (cout, _, kh, kw) = w.dims4()?;
        // Read the tensors in place: copying them out was ~7% of a training step.
        let (x, w, grad) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xs, ws, gs) = (
            super::cpu_f32("coda-conv2d", &xs, xl)?,
            super::cpu_f32("coda-conv2d", &ws, wl)?,
            super::cpu_f32("coda-conv2d", &gs, gl)?,
        );
        let (dx, dw, db) = if super::subpixel::applies(kh, kw, self.geometry) {
            super::subpixel::backward((n, cin, h, wd), ws, cout, gs, self.need, |k, dyp, pg| {
                let (dx, dw, _) =
                    conv2d_backward_some(xs, (n, cin, h, wd), k, (cout, 2, 2), dyp, pg, self.need);
                (dx, dw)
            })
        } else {
            conv2d_backward_some(
                xs,
                (n, cin, h, wd),
                ws,
                (cout, kh, kw),
                gs,
                self.geometry,
                self.need,
            )
        };
        let dev = x.device();
        Ok((
            self.need
                .0
                .then(|| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            self.need
                .1
                .then(|| Tensor::from_vec(dw, w.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(db, cout, dev)?),
        ))
    }
}

/// conv(upsample(pad(x))) + bias with our kernel on the CPU for f32 inference; the same from
/// candle's ops elsewhere (other devices, dtypes, or when gradients are tracked).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: ConvGeometry,
) -> candle_core::Result<Tensor> {
    conv2d_residual(x, weight, bias, None, g)
}

/// As [`conv2d`], plus a residual of the output's shape, added inside the kernel.
pub fn conv2d_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    g: ConvGeometry,
) -> candle_core::Result<Tensor> {
    conv2d_residual_cached(x, weight, bias, residual, g, None)
}

/// As [`conv2d_residual`], taking the reduced-precision form of `weight` from `cache` (a model
/// conv's own cache) instead of converting it on every call.
pub fn conv2d_residual_cached(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    g: ConvGeometry,
    cache: Option<&super::amx::WeightCache>,
) -> candle_core::Result<Tensor> {
    let inputs = [Some(x), Some(weight), Some(bias), residual];
    let on_cpu_f32 = super::custom_ops(x.device())
        && inputs
            .iter()
            .flatten()
            .all(|t| t.dtype() == candle_core::DType::F32);
    let tracked = inputs.iter().flatten().any(|t| t.track_op());
    if on_cpu_f32 && !tracked {
        let packed = match cache {
            Some(c) => {
                let (_, _, h, w) = x.dims4()?;
                c.get_for_conv(weight, g, (h, w), residual.is_some())?
            }
            None => None,
        };
        let op = Conv2dOp {
            geometry: g,
            residual: residual.map(|r| r.contiguous()).transpose()?,
            need: (false, false),
            packed,
        };
        x.contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
    } else if on_cpu_f32 {
        // Training: our kernel with its backward; the residual joins outside, so it gets its gradient.
        let op = Conv2dOp {
            geometry: g,
            residual: None,
            need: (x.track_op(), weight.track_op()),
            packed: None,
        };
        let y = x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    } else {
        // Off the kernels (CUDA): in training, the recomputing op (only the needed gradients,
        // only x kept); in inference, candle's ops.
        let y = if tracked {
            super::recompute::conv2d(x, weight, bias, g)?
        } else {
            conv2d_composite(x, weight, bias, g)?
        };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

/// The same computation from candle's ops (differentiable, any device): the reference the kernel
/// is tested against.
pub fn conv2d_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: ConvGeometry,
) -> candle_core::Result<Tensor> {
    let mut x = x.clone();
    if g.upsample > 1 {
        let (_, _, h, w) = x.dims4()?;
        x = x.upsample_nearest2d(h * g.upsample, w * g.upsample)?;
    }
    let (t, b, l, r) = g.pad;
    let symmetric = t == b && l == r && t == l;
    let padding = if symmetric { t } else { 0 };
    if !symmetric {
        x = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
    }
    let y = x.conv2d(weight, padding, g.stride, 1, 1)?;
    y.broadcast_add(&bias.reshape((1, (), 1, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn backward_matches_autograd_of_candle_ops() -> candle_core::Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let cases = [
            (1, 3, 9, 11, 5, 3, ConvGeometry::same(1, 1)),
            (3, 10, 8, 6, 7, 3, ConvGeometry::same(1, 1)),
            (2, 9, 7, 10, 4, 1, ConvGeometry::same(1, 0)),
            (
                2,
                6,
                10,
                12,
                5,
                3,
                ConvGeometry {
                    stride: 2,
                    pad: (0, 1, 0, 1),
                    upsample: 1,
                },
            ),
            (
                2,
                5,
                9,
                13,
                4,
                3,
                ConvGeometry {
                    stride: 2,
                    pad: (1, 1, 1, 1),
                    upsample: 1,
                },
            ),
            (
                1,
                4,
                5,
                6,
                3,
                3,
                ConvGeometry {
                    stride: 1,
                    pad: (1, 1, 1, 1),
                    upsample: 2,
                },
            ),
            // dx through the forward kernels: a map of at least 1024 pixels (the implicit GEMM
            // on AVX-512) and asymmetric padding.
            (2, 16, 34, 33, 8, 3, ConvGeometry::same(1, 1)),
            (
                2,
                5,
                9,
                8,
                4,
                3,
                ConvGeometry {
                    stride: 1,
                    pad: (0, 2, 1, 0),
                    upsample: 1,
                },
            ),
            // Small maps grouped several images per column tile: 5 images in groups of 2.
            (5, 30, 20, 20, 7, 3, ConvGeometry::same(1, 1)),
            // The sub-pixel upsampling conv on a map of more than 1024 output pixels.
            (
                2,
                12,
                16,
                17,
                10,
                3,
                ConvGeometry {
                    stride: 1,
                    pad: (1, 1, 1, 1),
                    upsample: 2,
                },
            ),
        ];
        for (n, cin, h, w, cout, k, g) in cases {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (cout, cin, k, k), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, cout, &dev)?)?;
            let (oh, ow) = g.output_size(h, w, k, k);
            let probe = Tensor::randn(0f32, 1.0, (n, cout, oh, ow), &dev)?;
            let ours = (conv2d(x.as_tensor(), wt.as_tensor(), b.as_tensor(), g)? * &probe)?
                .sum_all()?
                .backward()?;
            let reference = (conv2d_composite(x.as_tensor(), wt.as_tensor(), b.as_tensor(), g)?
                * &probe)?
                .sum_all()?
                .backward()?;
            // The kernel called directly, so that the check cannot pass through a fallback path.
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (dx, dw, db) = conv2d_backward(
                &v(x.as_tensor()),
                (n, cin, h, w),
                &v(wt.as_tensor()),
                (cout, k, k),
                &v(&probe),
                g,
            );
            // Partial gradients (frozen weight; input that needs none) equal the full ones.
            let (dx_only, dw_none, _) = conv2d_backward_some(
                &v(x.as_tensor()),
                (n, cin, h, w),
                &v(wt.as_tensor()),
                (cout, k, k),
                &v(&probe),
                g,
                (true, false),
            );
            assert_eq!(dx_only, dx);
            assert!(dw_none.is_empty());
            let (dx_none, dw_only, _) = conv2d_backward_some(
                &v(x.as_tensor()),
                (n, cin, h, w),
                &v(wt.as_tensor()),
                (cout, k, k),
                &v(&probe),
                g,
                (false, true),
            );
            assert_eq!(dw_only, dw);
            assert!(dx_none.is_empty());
            // Through autograd with a frozen weight: only x and b get gradients.
            let frozen = wt.as_tensor().detach();
            let partial = (conv2d(x.as_tensor(), &frozen, b.as_tensor(), g)? * &probe)?
                .sum_all()?
                .backward()?;
            assert!(partial.get(&frozen).is_none());
            let e = (partial.get(&x).unwrap() - reference.get(&x).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(e < 1e-4, "dx with a frozen weight: {e}");
            let direct = [dx, dw, db];
            for (i, (name, var)) in [("x", &x), ("w", &wt), ("b", &b)].into_iter().enumerate() {
                let (a, r) = (ours.get(var).unwrap(), reference.get(var).unwrap());
                // Relative to the gradient's largest entry (dW sums over every pixel: entries
                // reach ~50 on the larger maps). Measured at most 2.1e-6.
                let scale = r.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                let err = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
                assert!(
                    err < 2e-5,
                    "d{name} {:?}: max err {err}",
                    (n, cin, h, w, cout, k, g)
                );
                let e_direct = v(r)
                    .iter()
                    .zip(&direct[i])
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max)
                    / scale;
                assert!(
                    e_direct < 2e-5,
                    "direct d{name} {:?}: max err {e_direct}",
                    (n, cin, h, w, cout, k, g)
                );
            }
        }
        Ok(())
    }

    #[test]
    fn kernel_matches_candle_on_odd_shapes() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // (n, cin, h, w, cout, k, geometry): non-square, sizes not divisible by tiles, channel
        // counts that are not multiples of 16, batch 1 and 3.
        let cases = [
            (1, 3, 17, 23, 5, 3, ConvGeometry::same(1, 1)),
            (3, 20, 9, 14, 33, 3, ConvGeometry::same(1, 1)),
            (2, 19, 31, 40, 7, 1, ConvGeometry::same(1, 0)),
            (
                3,
                13,
                16,
                22,
                18,
                3,
                ConvGeometry {
                    stride: 2,
                    pad: (0, 1, 0, 1),
                    upsample: 1,
                },
            ),
            (
                1,
                6,
                7,
                5,
                9,
                3,
                ConvGeometry {
                    stride: 1,
                    pad: (1, 1, 1, 1),
                    upsample: 2,
                },
            ),
            (1, 8, 45, 47, 40, 3, ConvGeometry::same(1, 1)),
            // Stride 2 with an odd left padding and rows of >= 16 outputs (the implicit GEMM's
            // packing puts column 1 in phase 0 of the padded row).
            (
                2,
                5,
                34,
                37,
                6,
                3,
                ConvGeometry {
                    stride: 2,
                    pad: (1, 1, 1, 1),
                    upsample: 1,
                },
            ),
            // Wide enough for the Winograd path (the upsampled one takes the sub-pixel form).
            (
                2,
                WINOGRAD_MIN_CHANNELS,
                5,
                7,
                WINOGRAD_MIN_CHANNELS + 3,
                3,
                ConvGeometry::same(1, 1),
            ),
            (
                1,
                WINOGRAD_MIN_CHANNELS + 1,
                3,
                4,
                WINOGRAD_MIN_CHANNELS,
                3,
                ConvGeometry {
                    stride: 1,
                    pad: (1, 1, 1, 1),
                    upsample: 2,
                },
            ),
        ];
        for (n, cin, h, w, cout, k, g) in cases {
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 0.2, (cout, cin, k, k), &dev)?;
            let b = Tensor::randn(0f32, 0.5, cout, &dev)?;
            let fast = conv2d(&x, &wt, &b, g)?;
            let slow = conv2d_composite(&x, &wt, &b, g)?;
            let res = slow.randn_like(0.0, 1.0)?;
            let fused = conv2d_residual(&x, &wt, &b, Some(&res), g)?;
            let e_res = (fused - (&slow + &res)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(e_res < 1e-4, "residual: max err {e_res}");
            assert_eq!(fast.dims(), slow.dims(), "{:?}", (n, cin, h, w, cout, k, g));
            let err = (fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err < 1e-4,
                "{:?}: max err {err}",
                (n, cin, h, w, cout, k, g)
            );
        }
        Ok(())
    }

    /// Each image of a batch gets bit-for-bit the output it gets alone, on every shape class the
    /// kernel choice looks at (implicit GEMM, Winograd F(2x2)/F(4x4), sub-pixel, im2col, 1x1,
    /// stride 2, maps below and above the size thresholds): kernels round differently, so a
    /// choice that counted the batch would let an image's tokens depend on its batch.
    #[test]
    fn cached_f32_weights_give_the_bits_of_fresh_ones() -> candle_core::Result<()> {
        use super::super::amx::{tests::values, Packed, WeightCache};
        let up = ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        };
        let same = ConvGeometry::same(1, 1);
        // One weight per (cin, cout, k, g), run at two sizes in turn: the cache must follow the
        // kernel each size picks (Winograd's weights are prepared afresh each call, the others
        // kept). The kernels covered are checked below.
        let cases = [
            (64, 64, 3, same, [(32, 32), (16, 16), (32, 32)]),
            (128, 128, 3, same, [(64, 64), (16, 16), (64, 64)]),
            (32, 16, 3, up, [(16, 16), (4, 4), (16, 16)]),
            (64, 64, 3, up, [(32, 32), (8, 8), (32, 32)]),
            (
                8,
                32,
                1,
                ConvGeometry::same(1, 0),
                [(16, 24), (4, 4), (16, 24)],
            ),
            (
                32,
                32,
                3,
                ConvGeometry::same(2, 1),
                [(32, 32), (8, 8), (32, 32)],
            ),
        ];
        let mut kinds = std::collections::BTreeSet::new();
        for (i, &(cin, cout, k, g, sizes)) in cases.iter().enumerate() {
            let wt = values(cout * cin * k * k, i + 3, false);
            let b = values(cout, i + 7, false);
            let weight = Tensor::from_vec(wt.clone(), (cout, cin, k, k), &Device::Cpu)?;
            let bias = Tensor::from_vec(b.clone(), cout, &Device::Cpu)?;
            let cache = WeightCache::default();
            for (j, &(h, w)) in sizes.iter().enumerate() {
                let n = 2;
                let x = values(n * cin * h * w, i + j, false);
                let xt = Tensor::from_vec(x.clone(), (n, cin, h, w), &Device::Cpu)?;
                let cached = conv2d_residual_cached(&xt, &weight, &bias, None, g, Some(&cache))?;
                let cached = cached.flatten_all()?.to_vec1::<f32>()?;
                let (fresh, _, _) = f32_forward(&x, (n, cin, h, w), &wt, (cout, k, k), &b, None, g);
                let kernel = f32_kernel(cin, (h, w), (cout, k, k), false, g);
                kinds.insert(format!("{kernel:?}"));
                assert!(
                    cached == fresh,
                    "case {i} ({cin}->{cout} k{k} at {h}x{w}, {kernel:?}): cached weights differ"
                );
                let held = cache.get_for_conv(&weight, g, (h, w), false)?;
                match held.as_deref() {
                    Some(Packed::F32(p)) => assert_eq!(p.kernel(), kernel, "case {i} at {h}x{w}"),
                    None => assert!(
                        !F32Weights::worth_keeping(kernel),
                        "case {i} at {h}x{w}: {kernel:?} not kept"
                    ),
                    Some(_) => panic!("case {i}: an f32 conv cached another form"),
                }
            }
        }
        // Every kernel with weights of its own (F(2x2) is not among the VAE's shapes: F(4x4)
        // takes its convs) and im2col, on this path (the scalar one has no implicit GEMM).
        let implicit = super::super::direct::available() || super::super::direct::available_avx2();
        let expected: &[&str] = if implicit {
            &["ImplicitGemm", "Winograd4", "Subpixel", "Im2col"]
        } else {
            &["Winograd4", "Subpixel", "Im2col"]
        };
        for kind in expected {
            assert!(
                kinds.iter().any(|k| k.starts_with(kind)),
                "no case ran {kind}: {kinds:?}"
            );
        }
        Ok(())
    }

    /// bf16 runs the convs of large maps that f32 gives to F(4x4) exactly as f32 does (and keeps
    /// no packed weights for them), the others with bf16 operands.
    #[test]
    fn bf16_runs_large_f32_winograd_convs_in_f32() -> candle_core::Result<()> {
        use super::super::amx::{tests::values, WeightCache};
        if crate::kernels::dpbf16::tests::skipped("bf16 forward's kernel choice") {
            return Ok(());
        }
        let same = ConvGeometry::same(1, 1);
        let (cin, cout) = (64, 64);
        let wt = values(cout * cin * 9, 1, false);
        let b = values(cout, 2, false);
        let weight = Tensor::from_vec(wt.clone(), (cout, cin, 3, 3), &Device::Cpu)?;
        for (hw, f32_bits) in [(256, true), (128, false)] {
            let dims = (1, cin, hw, hw);
            let x = values(cin * hw * hw, 3, false);
            let (f32_out, _, _) = f32_forward(&x, dims, &wt, (cout, 3, 3), &b, None, same);
            let (bf16_out, _, _) =
                dpbf16_forward(&x, dims, &wt, (cout, 3, 3), &b, None, same, None);
            assert_eq!(
                bf16_out == f32_out,
                f32_bits,
                "{hw}x{hw}: f32 bits {f32_bits}"
            );
            let kept = super::super::with_precision(crate::Precision::Bf16, || {
                WeightCache::default().get_for_conv(&weight, same, (hw, hw), false)
            })?;
            assert_eq!(kept.is_none(), f32_bits, "{hw}x{hw}: packed weights kept");
        }
        Ok(())
    }

    #[test]
    fn f32_forward_of_a_batch_equals_each_image_alone() {
        use super::super::amx::tests::values;
        let up = ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        };
        let cases = [
            (16, 16, 16, 16, 3, ConvGeometry::same(1, 1)),
            (128, 128, 16, 16, 3, ConvGeometry::same(1, 1)),
            (256, 256, 8, 16, 3, ConvGeometry::same(1, 1)),
            (256, 256, 16, 16, 3, ConvGeometry::same(1, 1)),
            (64, 64, 32, 32, 3, ConvGeometry::same(1, 1)),
            (128, 128, 64, 64, 3, ConvGeometry::same(1, 1)),
            (32, 32, 8, 8, 3, ConvGeometry::same(1, 1)),
            (128, 128, 12, 12, 3, ConvGeometry::same(1, 1)),
            (16, 16, 4, 4, 3, ConvGeometry::same(1, 1)),
            (8, 32, 16, 24, 1, ConvGeometry::same(1, 0)),
            (32, 32, 32, 32, 3, ConvGeometry::same(2, 1)),
            (32, 16, 16, 16, 3, up),
            (64, 64, 32, 32, 3, up),
        ];
        let n = 4;
        for (i, &(cin, cout, h, w, k, g)) in cases.iter().enumerate() {
            let x = values(n * cin * h * w, i, false);
            let wt = values(cout * cin * k * k, i + 3, false);
            let b = values(cout, i + 7, false);
            let (all, oh, ow) = f32_forward(&x, (n, cin, h, w), &wt, (cout, k, k), &b, None, g);
            let per = cout * oh * ow;
            for img in 0..n {
                let xi = &x[img * cin * h * w..][..cin * h * w];
                let (one, _, _) = f32_forward(xi, (1, cin, h, w), &wt, (cout, k, k), &b, None, g);
                assert!(
                    one == all[img * per..][..per],
                    "case {i} ({cin}->{cout} {h}x{w} k{k}): image {img} of {n} differs from it alone"
                );
            }
        }
    }
}
