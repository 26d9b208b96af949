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

/// Instruction-set levels of our kernel paths, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust (what the compiler makes of it for the build's target).
    Scalar,
    /// AVX2 + FMA copies of the hot loops.
    Avx2,
    /// AVX-512F copies.
    Avx512,
    /// AVX-512 with bf16 dot products (`vdpbf16ps`: AMD Zen 4 and later, Intel Cooper Lake
    /// and Sapphire Rapids): the bf16 precision's convolutions.
    Avx512Bf16,
    /// AMX bf16 tiles (the bf16 and bf16x3 precisions only).
    Amx,
}

impl Isa {
    pub const ALL: [Isa; 5] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }
}

/// The environment variable that caps the kernel paths (`scalar`, `avx2`, `avx512`,
/// `avx512bf16`, `amx`), so
/// that a machine can measure and test the paths below its best one.
pub const ISA_ENV: &str = "CODA_CPU_ISA";

/// The cap: 0 = not read yet, else 1 + the Isa's index.
static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The best path this CPU (and OS, for AMX) can run, whatever the cap (detected once; the
/// kernels ask on every block).
pub fn detected() -> Isa {
    static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(detect)
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let avx512 = avx2 && std::arch::is_x86_feature_detected!("avx512f");
        // The levels are cumulative: every AMX CPU also has AVX512_BF16.
        let bf16 = avx512 && std::arch::is_x86_feature_detected!("avx512bf16");
        if bf16 && super::amx::detected() {
            Isa::Amx
        } else if bf16 {
            Isa::Avx512Bf16
        } else if avx512 {
            Isa::Avx512
        } else if avx2 {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Scalar
    }
}

fn cap() -> Isa {
    let c = CAP.load(std::sync::atomic::Ordering::Relaxed);
    if c > 0 {
        return Isa::ALL[(c - 1) as usize];
    }
    let from_env = std::env::var(ISA_ENV).ok().map(|v| {
        Isa::ALL
            .into_iter()
            .find(|i| i.name() == v.trim().to_ascii_lowercase())
            .unwrap_or_else(|| {
                eprintln!(
                    "warning: {ISA_ENV}={v} is not one of scalar, avx2, avx512, avx512bf16, amx; ignored"
                );
                Isa::Amx
            })
    });
    let c = from_env.unwrap_or(Isa::Amx);
    CAP.store(c as u8 + 1, std::sync::atomic::Ordering::Relaxed);
    c
}

/// Cap the kernel paths for this process (tests and benchmarks run every path this way);
/// None restores the environment's cap or none.
pub fn set_isa_cap(isa: Option<Isa>) {
    CAP.store(
        isa.map_or(0, |i| i as u8 + 1),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The path our kernels take: the best one the CPU has, at most the cap.
pub fn isa() -> Isa {
    detected().min(cap())
}

/// Whether our kernels run their `avx2,fma` versions (the CPU has them and the cap allows).
#[inline]
pub fn has_avx2_fma() -> bool {
    isa() >= Isa::Avx2
}

/// Whether our kernels run their `avx512f` versions.
#[inline]
pub fn has_avx512() -> bool {
    isa() >= Isa::Avx512
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
