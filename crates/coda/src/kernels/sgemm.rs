//! f32 GEMM through the `gemm` crate on the kernel path `CODA_CPU_ISA` allows. The crate picks
//! its AVX-512 kernels by CPU detection alone, so under an AVX2 (or scalar) cap we call its FMA
//! (or scalar) micro-kernels through the same generic driver its own dispatcher calls
//! (gemm-common's `gemm_def!`/`__inject_mod!`): an AVX-512 machine then measures and tests what
//! an AVX2-only machine runs.

use super::simd::{isa, Isa};

/// `dst := alpha * dst + beta * lhs @ rhs` (when `read_dst`; else `beta * lhs @ rhs`), with the
/// `gemm::gemm` argument conventions (column stride before row stride), no conjugation.
///
/// # Safety
/// As `gemm::gemm`: the pointers and strides must describe valid m x k, k x n and m x n
/// matrices, `dst` not aliasing the inputs.
#[allow(clippy::too_many_arguments)]
#[inline]
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    // `gemm::gemm` turns a row-major destination into a column-major one (Cᵀ = Bᵀ·Aᵀ: its
    // micro-kernels run along columns) before its dispatcher reaches the generic driver that
    // the capped paths below call directly; without it that driver packed both operands of
    // every Winograd tile GEMM (13% of a MAR decode under the AVX2 cap, 2% with AVX-512).
    // Done here for every path (`gemm::gemm` then finds nothing to turn).
    let (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) =
        if dst_cs.abs() < dst_rs.abs() {
            (
                n, m, dst_rs, dst_cs, rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs,
            )
        } else {
            (
                m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
            )
        };
    macro_rules! with_kernels {
        ($simd:expr, $n:expr, $ukr:path) => {{
            use $ukr as u;
            gemm_common::gemm::gemm_basic_generic::<
                _,
                f32,
                { $n },
                { u::MR_DIV_N * $n },
                { u::NR },
                { u::MR_DIV_N },
                { u::H_M },
                { u::H_N },
            >(
                $simd,
                m,
                n,
                k,
                dst,
                dst_cs,
                dst_rs,
                read_dst,
                lhs,
                lhs_cs,
                lhs_rs,
                rhs,
                rhs_cs,
                rhs_rs,
                alpha,
                beta,
                false,
                false,
                false,
                |a, b, c| a * b + c,
                &u::UKR,
                &u::H_UKR,
                false,
                parallelism,
            )
        }};
    }
    #[cfg(target_arch = "x86_64")]
    {
        // The level the crate would pick by itself, and ours if the cap is lower.
        let path = isa();
        if path < super::simd::detected().min(Isa::Avx512) {
            if path >= Isa::Avx2 {
                // gemm-f32's `fma` module: N = 4 * 2 lanes of f32 (gemm_def!(f32, 2)).
                let simd = gemm_common::simd::V3::try_new().expect("AVX2+FMA was detected");
                return with_kernels!(simd, 8, gemm_f32::microkernel::fma::f32);
            }
            return with_kernels!(
                gemm_common::simd::Scalar,
                1,
                gemm_f32::microkernel::scalar::f32
            );
        }
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        read_dst,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        alpha,
        beta,
        false,
        false,
        false,
        parallelism,
    )
}
