//! The Winograd convolutions' tile GEMMs, M (rows x nt) = U (rows x k) · V (k x nt), all
//! row-major: U a transformed weight matrix (cout x cin), V the transformed input of a block of
//! tiles (cin x tiles), M their products before the output transform. The micro-kernels
//! broadcast U's values and read V's rows where they lie: nothing is packed. Through the `gemm`
//! crate these small products (k = 64-512, nt = 32-192, 36 per block of tiles) were packed on
//! every call: 49% of the samples of an F(4x4) conv (128 channels, 256x256, AVX-512) were under
//! `sgemm::gemm`, its packing included.

use super::simd::Isa;

/// `m[r * ldm + j] = Σ_i u[r * k + i] · v[i * ldv + j]` for r < rows, j < nt.
///
/// # Safety
/// `u` holds rows x k values, `v` k rows of at least nt values ldv apart, `m` rows rows of at
/// least nt values ldm apart, not overlapping the inputs.
#[inline]
pub unsafe fn gemm(
    isa: Isa,
    (rows, k, nt): (usize, usize, usize),
    u: *const f32,
    v: *const f32,
    ldv: usize,
    m: *mut f32,
    ldm: usize,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => {
            return avx512::gemm((rows, k, nt), u, v, ldv, m, ldm)
        }
        Isa::Avx2 => return avx2::gemm((rows, k, nt), u, v, ldv, m, ldm),
        Isa::Scalar => {}
    }
    let _ = isa;
    super::sgemm::gemm(
        rows,
        nt,
        k,
        m,
        1,
        ldm as isize,
        false,
        u,
        1,
        k as isize,
        v,
        1,
        ldv as isize,
        0.0,
        1.0,
        gemm::Parallelism::None,
    )
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Output rows per micro-tile: 8 rows x 3 vectors of 16 = 24 accumulators, 3 loads of V
    /// and 8 broadcasts of U per 24 FMAs.
    const MR: usize = 8;

    /// See [`super::gemm`].
    ///
    /// # Safety
    /// As [`super::gemm`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm(
        (rows, k, nt): (usize, usize, usize),
        u: *const f32,
        v: *const f32,
        ldv: usize,
        m: *mut f32,
        ldm: usize,
    ) {
        let mut c0 = 0;
        while c0 < nt {
            let width = (nt - c0).min(48);
            // Each strip of columns stays in L1/L2 while every row block of U passes over it.
            match width.div_ceil(16) {
                3 => strip::<3>((rows, k), width, u, v.add(c0), ldv, m.add(c0), ldm),
                2 => strip::<2>((rows, k), width, u, v.add(c0), ldv, m.add(c0), ldm),
                _ => strip::<1>((rows, k), width, u, v.add(c0), ldv, m.add(c0), ldm),
            }
            c0 += width;
        }
    }

    /// Columns 0..width (<= 16 NV) of M, every row.
    #[target_feature(enable = "avx512f")]
    unsafe fn strip<const NV: usize>(
        (rows, k): (usize, usize),
        width: usize,
        u: *const f32,
        v: *const f32,
        ldv: usize,
        m: *mut f32,
        ldm: usize,
    ) {
        let masks: [__mmask16; NV] = std::array::from_fn(|j| {
            let live = width.saturating_sub(16 * j).min(16);
            ((1u32 << live) - 1) as __mmask16
        });
        for r0 in (0..rows).step_by(MR) {
            let live = (rows - r0).min(MR);
            // A partial block repeats its last row (computed, not stored).
            let up: [*const f32; MR] = std::array::from_fn(|i| u.add((r0 + i.min(live - 1)) * k));
            let mut acc = [[_mm512_setzero_ps(); NV]; MR];
            let mut vp = v;
            for i in 0..k {
                let b: [__m512; NV] =
                    std::array::from_fn(|j| _mm512_maskz_loadu_ps(masks[j], vp.add(16 * j)));
                for (row, p) in acc.iter_mut().zip(&up) {
                    let w = _mm512_set1_ps(*p.add(i));
                    for (a, b) in row.iter_mut().zip(&b) {
                        *a = _mm512_fmadd_ps(w, *b, *a);
                    }
                }
                vp = vp.add(ldv);
            }
            for (r, row) in acc.iter().enumerate().take(live) {
                for (j, a) in row.iter().enumerate() {
                    _mm512_mask_storeu_ps(m.add((r0 + r) * ldm + 16 * j), masks[j], *a);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Output rows per micro-tile: 6 rows x 2 vectors of 8 = 12 accumulators, 2 loads of V and
    /// 6 broadcasts per 12 FMAs (of 16 registers).
    const MR: usize = 6;

    /// See [`super::gemm`].
    ///
    /// # Safety
    /// As [`super::gemm`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm(
        (rows, k, nt): (usize, usize, usize),
        u: *const f32,
        v: *const f32,
        ldv: usize,
        m: *mut f32,
        ldm: usize,
    ) {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let all = _mm256_set1_epi32(-1);
        let mut c0 = 0;
        while c0 < nt {
            // Strips of 16 columns, then one of 8, then a masked one: `vmaskmovps` in the loop
            // halved the rate of full strips, and a half-empty strip costs as much as a full one.
            let width = match nt - c0 {
                w if w >= 16 => 16,
                w if w >= 8 => 8,
                w => w,
            };
            let (v, m) = (v.add(c0), m.add(c0));
            if width == 16 {
                strip::<2>((rows, k, ldv), u, m, ldm, [all; 2], |p| {
                    [_mm256_loadu_ps(v.add(p)), _mm256_loadu_ps(v.add(p + 8))]
                });
            } else if width == 8 {
                strip::<1>((rows, k, ldv), u, m, ldm, [all], |p| {
                    [_mm256_loadu_ps(v.add(p))]
                });
            } else {
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(width as i32), lane);
                strip::<1>((rows, k, ldv), u, m, ldm, [mask], |p| {
                    [_mm256_maskload_ps(v.add(p), mask)]
                });
            }
            c0 += width;
        }
        /// Every row block of one strip; `load(i · ldv)` gives V's row i of the strip.
        #[inline(always)]
        unsafe fn strip<const NV: usize>(
            (rows, k, ldv): (usize, usize, usize),
            u: *const f32,
            m: *mut f32,
            ldm: usize,
            store_masks: [__m256i; NV],
            load: impl Fn(usize) -> [__m256; NV],
        ) {
            for r0 in (0..rows).step_by(MR) {
                let live = (rows - r0).min(MR);
                let up: [*const f32; MR] =
                    std::array::from_fn(|i| u.add((r0 + i.min(live - 1)) * k));
                let acc = tile::<NV>((k, ldv), &up, &load);
                for (r, row) in acc.iter().enumerate().take(live) {
                    for (j, a) in row.iter().enumerate() {
                        _mm256_maskstore_ps(m.add((r0 + r) * ldm + 8 * j), store_masks[j], *a);
                    }
                }
            }
        }
    }

    /// Σ_i U[r][i] · V[i][strip] for the MR rows `up` points at.
    #[inline(always)]
    unsafe fn tile<const NV: usize>(
        (k, ldv): (usize, usize),
        up: &[*const f32; MR],
        load: &impl Fn(usize) -> [__m256; NV],
    ) -> [[__m256; NV]; MR] {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let mut vp = 0;
        for i in 0..k {
            let b = load(vp);
            for (row, p) in acc.iter_mut().zip(up) {
                let w = _mm256_broadcast_ss(&*p.add(i));
                for (a, b) in row.iter_mut().zip(&b) {
                    *a = _mm256_fmadd_ps(w, *b, *a);
                }
            }
            vp += ldv;
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path this CPU has against f64 sums, on shapes with partial row blocks and column
    /// strips (rows 1-13, nt 1-100, leading dimensions wider than nt), outputs between the
    /// written values left as they were.
    #[test]
    fn matches_f64_products_on_ragged_shapes() {
        let paths: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&p| p <= super::super::simd::isa())
            .collect();
        for &(rows, k, nt) in &[
            (1, 1, 1),
            (13, 7, 100),
            (8, 64, 48),
            (9, 33, 17),
            (4, 128, 96),
            (5, 3, 33),
            // AVX2's 16-, 8- and masked strips in one row.
            (7, 20, 29),
        ] {
            let (ldv, ldm) = (nt + 3, nt + 5);
            let u: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let v: Vec<f32> = (0..k * ldv)
                .map(|i| ((i * 104729) % 1013) as f32 / 1013.0 - 0.5)
                .collect();
            for &isa in &paths {
                let mut m = vec![f32::NAN; rows * ldm];
                // SAFETY: buffers of the stated shapes.
                unsafe {
                    gemm(
                        isa,
                        (rows, k, nt),
                        u.as_ptr(),
                        v.as_ptr(),
                        ldv,
                        m.as_mut_ptr(),
                        ldm,
                    )
                };
                for r in 0..rows {
                    for j in 0..ldm {
                        let got = m[r * ldm + j];
                        if j >= nt {
                            assert!(got.is_nan(), "{isa:?} wrote ({r}, {j}) past nt {nt}");
                            continue;
                        }
                        let (mut want, mut mag) = (0f64, 0f64);
                        for i in 0..k {
                            let p = u[r * k + i] as f64 * v[i * ldv + j] as f64;
                            want += p;
                            mag += p.abs();
                        }
                        // f32 sums of k products, rounding errors of random sign: measured at
                        // most 4.6e-8 · √k · Σ|products| (k = 7); bound 10x that.
                        let err = (got as f64 - want).abs();
                        assert!(
                            err <= 5e-7 * (k as f64).sqrt() * mag + 1e-30,
                            "{isa:?} {rows}x{k}x{nt} at ({r}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
