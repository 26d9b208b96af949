//! Helpers for loops the compiler can vectorise: a branch-free exp, and the run-time check for
//! AVX2+FMA (the default x86-64 target only allows SSE2, so hot loops get a second copy compiled
//! with `#[target_feature(enable = "avx2,fma")]`).

/// exp(x) for f32 in the style of Cephes `expf`: range reduction by ln 2 and a degree-6
/// polynomial; relative error about 2e-7 (one or two ulps). Branch-free, so loops over slices
/// of it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // Scale by 2^n through the exponent bits.
    // SAFETY: x is clamped above, so n lies in [-126, 127]; the unchecked conversion avoids
    // the saturating `as` cast, whose NaN/overflow checks kept the loops from vectorising.
    let bits = ((unsafe { n.to_int_unchecked::<i32>() } + 127) as u32) << 23;
    e * f32::from_bits(bits)
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Whether the CPU can run the `avx2,fma` versions of our loops (checked once, then cached).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU can run the `avx512f` versions of our loops.
#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let want = (x as f64).exp();
            let rel = ((super::exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }
}
