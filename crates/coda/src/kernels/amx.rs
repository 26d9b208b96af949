//! Reduced-precision convolution forward on Intel AMX (the tile units of Sapphire Rapids and
//! later): products of bf16 operands accumulated in f32 by `tdpbf16ps`, which multiplies a 16x32
//! by a 32x16 tile in one instruction (measured here: ~3 TFLOP/s per core for the instruction
//! alone, ~0.8-1 TFLOP/s with its tile loads, against ~0.15 for f32 AVX-512 FMA).
//!
//! An implicit GEMM, no im2col: each image's input is converted once to bf16 in a padded layout
//! (row, channel pair, column phase, column, 2) from which a B tile (32 input channels x 16
//! output pixels, one tap) is 16 rows of 64 contiguous bytes; the weights are converted once per
//! call into A tiles (16 output channels x 32 input channels, one tap). Each 32x32 block of the
//! output (bias and residual preloaded) sits in four tile registers while taps and channel
//! blocks stream through. Padding, stride 2 (a column phase per tap) and nearest-2x upsampling
//! (materialised in the packed input) are handled by the packing.
//!
//! Two modes (see [`super::Precision`]): `bf16` rounds both operands to bf16 (8-bit mantissa);
//! `bf16x3` splits each into hi + lo bf16 parts and sums hi·hi + hi·lo + lo·hi, three passes
//! that keep ~16 bits of each product (the "3xBF16" scheme of oneDNN / cuBLAS).
//!
//! The tile registers are invisible to the compiler, so they keep their contents between the
//! `asm!` blocks below; no other code in the process uses them.

use super::conv2d::{init_accumulator, ConvGeometry, OutPtr};
use rayon::prelude::*;

/// AMX tiles in the kernel: 16 rows x 64 bytes (16 f32 or 32 bf16 per row).
const TILE: usize = 512; // u16 elements per A or B tile (16 x 32)

/// Whether our kernels use AMX bf16: the CPU and OS have it (see [`detected`]) and the
/// `CODA_CPU_ISA` cap allows it, or this thread emulates it (`with_emulated_tiles`, tests only).
pub fn available() -> bool {
    super::simd::isa() >= super::simd::Isa::Amx || emulated()
}

/// Whether this CPU and OS run AMX bf16 (asks Linux for the tile state once).
pub fn detected() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID.(7,0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let r = std::arch::x86_64::__cpuid_count(7, 0);
    if (r.edx >> 22) & 1 == 0 || (r.edx >> 24) & 1 == 0 {
        return false;
    }
    // The kernel hands out the 8 KiB tile state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM,
    // XFEATURE_XTILEDATA). Without it the first tile instruction raises SIGILL.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// f32 -> bf16 with round-to-nearest-even (what `vcvtneps2bf16` does for finite values).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// hi = bf16(x), lo = bf16(x - hi): x ≈ hi + lo to ~16 mantissa bits.
#[inline(always)]
fn split(x: f32) -> (u16, u16) {
    let hi = to_bf16(x);
    (hi, to_bf16(x - from_bf16(hi)))
}

/// One image's input, padded (and upsampled) as the conv reads it, in the layout AMX's B tiles
/// load straight from: bf16, (row, channel pair, column phase, column, 2), channels padded to a
/// multiple of 32. A B tile (32 channels x 16 output pixels of one row, one tap) is then 16
/// rows of 64 contiguous bytes at a fixed stride: no im2col at all. Strided convs read one
/// column phase (x mod stride) per tap, so their pixels are contiguous too.
pub(super) struct PackedInput {
    pub(super) hi: Vec<u32>,
    lo: Vec<u32>,
    /// Channel pairs (cp / 2).
    pairs: usize,
    /// Columns per phase.
    wq: usize,
}

impl PackedInput {
    /// Offset (in channel pairs) of (virtual row y, channel pair 0, phase, column q).
    fn at(&self, s: usize, y: usize, phase: usize, q: usize) -> usize {
        (y * self.pairs * s + phase) * self.wq + q
    }
}

/// Geometry of one AMX conv call.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    g: ConvGeometry,
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// Output columns rounded up to the 32 of a pair of tiles.
    owp: usize,
    /// Input channels rounded up to the 32 of a tile.
    pub(super) cp: usize,
    /// Output channels rounded up to 32.
    mp: usize,
    /// Virtual (padded) rows the conv reads.
    hv: usize,
    /// Columns per phase.
    pub(super) wq: usize,
}

impl Plan {
    pub(super) fn new(
        (cin, h, w): (usize, usize, usize),
        (cout, kh, kw): (usize, usize, usize),
        g: ConvGeometry,
    ) -> Self {
        let (oh, ow) = g.output_size(h, w, kh, kw);
        let s = g.stride;
        let owp = ow.div_ceil(32) * 32;
        Plan {
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            g,
            oh,
            ow,
            owp,
            cp: cin.div_ceil(32) * 32,
            mp: cout.div_ceil(32) * 32,
            hv: (oh - 1) * s + kh,
            wq: owp + (kw - 1) / s + 1,
        }
    }
}

/// Run `fill(index, hi_chunk, lo_chunk)` over matching `chunk`-sized pieces of `hi` and (for
/// 3xbf16) `lo`, in parallel.
fn par_fill_pair<T: Send>(
    hi: &mut [T],
    lo: &mut [T],
    chunk: usize,
    three: bool,
    fill: impl Fn(usize, &mut [T], Option<&mut [T]>) + Sync,
) {
    if three {
        hi.par_chunks_mut(chunk)
            .zip(lo.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(i, (h, l))| fill(i, h, Some(l)));
    } else {
        hi.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, h)| fill(i, h, None));
    }
}

/// A channel pair of one pixel as the u32 a B tile row holds: the even channel in the low half.
#[inline(always)]
fn pair(v0: f32, v1: f32) -> u32 {
    to_bf16(v0) as u32 | (to_bf16(v1) as u32) << 16
}

/// Pack image `x` (cin, h, w) for [`Plan`] `p`: virtual pixel (y', x') holds the (upsampled)
/// input at (y' - pad_top, x' - pad_left), zero outside.
#[inline(never)]
pub(super) fn pack_input(x: &[f32], p: &Plan, three: bool) -> PackedInput {
    let s = p.g.stride;
    let up = p.g.upsample;
    let (pt, _, pl, _) = p.g.pad;
    let pairs = p.cp / 2;
    let row_len = pairs * s * p.wq;
    let mut hi = vec![0u32; p.hv * row_len];
    let mut lo = vec![0u32; if three { p.hv * row_len } else { 0 }];
    let (vh, vw) = (p.h * up, p.w * up);
    let zeros = vec![0f32; p.w];
    let fill = |yv: usize, hrow: &mut [u32], lrow: Option<&mut [u32]>| {
        let Some(uy) = yv.checked_sub(pt).filter(|&u| u < vh) else {
            return;
        };
        let sy = uy / up;
        // Valid virtual columns: pl <= x' < pl + vw.
        let x_end = (pl + vw).min(p.wq * s);
        let n_src = (x_end - pl).div_ceil(up).min(p.w);
        let mut lrow = lrow;
        for pr in 0..pairs {
            let src = |c: usize| -> &[f32] {
                if c < p.cin {
                    &x[(c * p.h + sy) * p.w..][..n_src]
                } else {
                    &zeros[..n_src]
                }
            };
            let (r0, r1) = (src(2 * pr), src(2 * pr + 1));
            if s == 1 && up == 1 {
                // The common case, contiguous: vectorises.
                let d = &mut hrow[pr * p.wq + pl..][..n_src];
                match lrow.as_deref_mut() {
                    None => {
                        for ((o, &a), &b) in d.iter_mut().zip(r0).zip(r1) {
                            *o = pair(a, b);
                        }
                    }
                    Some(l) => {
                        let dl = &mut l[pr * p.wq + pl..][..n_src];
                        for (((o, ol), &a), &b) in d.iter_mut().zip(dl.iter_mut()).zip(r0).zip(r1) {
                            *o = pair(a, b);
                            *ol = pair(a - from_bf16(*o as u16), b - from_bf16((*o >> 16) as u16));
                        }
                    }
                }
                continue;
            }
            if s == 1 && up == 2 && lrow.is_none() {
                // The decoder's upsampling convs: each source pixel fills two columns.
                let d = &mut hrow[pr * p.wq + pl..x_end.min(p.wq) + pr * p.wq];
                for (o, (&a, &b)) in d.chunks_mut(2).zip(r0.iter().zip(r1)) {
                    o.fill(pair(a, b));
                }
                continue;
            }
            for xv in pl..x_end {
                let sx = (xv - pl) / up;
                let (a, b) = (r0[sx], r1[sx]);
                let at = (pr * s + xv % s) * p.wq + xv / s;
                let v = pair(a, b);
                hrow[at] = v;
                if let Some(l) = lrow.as_deref_mut() {
                    l[at] = pair(a - from_bf16(v as u16), b - from_bf16((v >> 16) as u16));
                }
            }
        }
    };
    par_fill_pair(&mut hi, &mut lo, row_len, three, fill);
    PackedInput {
        hi,
        lo,
        pairs,
        wq: p.wq,
    }
}

/// The weights (cout, cin, kh, kw) as A tiles: per 16-row block of output channels, per tap,
/// per 32 input channels, 16 rows of 32 values (zero beyond cout and cin). Returns (hi, lo); lo
/// is empty unless `three`.
/// A conv's weights converted for [`conv2d_forward`], for reuse across calls (the conversion
/// was ~5% of a decode when repeated on every call).
#[derive(Debug)]
pub struct PackedWeights {
    /// (cout, cin, kh, kw)
    dims: (usize, usize, usize, usize),
    three: bool,
    hi: Vec<u16>,
    lo: Vec<u16>,
}

impl PackedWeights {
    pub fn new(w: &[f32], (cout, cin, kh, kw): (usize, usize, usize, usize), three: bool) -> Self {
        let p = Plan::new((cin, 1, 1), (cout, kh, kw), ConvGeometry::same(1, kh / 2));
        let (hi, lo) = pack_weights(w, &p, three);
        PackedWeights {
            dims: (cout, cin, kh, kw),
            three,
            hi,
            lo,
        }
    }

    pub fn three(&self) -> bool {
        self.three
    }
}

/// A conv's weights in the layout of the kernel that runs them.
#[derive(Debug)]
pub enum Packed {
    /// AMX A tiles (bf16 or bf16x3).
    Tiles(PackedWeights),
    /// bf16 channel pairs for [`super::dpbf16`].
    Pairs(Vec<u32>),
    /// An upsampling conv's four sub-pixel phase kernels ([`super::subpixel::phase_weights`]),
    /// each as bf16 channel pairs for [`super::dpbf16`].
    PhasePairs([Vec<u32>; 4]),
    /// f32 weights in the form their kernel reads.
    F32(super::conv2d::F32Weights),
}

/// The packed weights of one conv, kept beside its (immutable, inference) weight tensor: packed
/// at the first call, again only if the kernel or the tensor changes.
#[derive(Debug, Default)]
pub struct WeightCache(std::sync::Mutex<Option<CachedWeights>>);

/// The weight tensor packed, the kernel it was packed for, whether as sub-pixel phases, the f32
/// kernel (on the f32 backend).
type CachedWeights = (
    candle_core::TensorId,
    super::ConvBackend,
    bool,
    Option<super::conv2d::F32Kernel>,
    std::sync::Arc<Packed>,
);

impl WeightCache {
    /// The packed form of `weight` for this thread's precision and the kernel that runs it, or
    /// None where there is nothing to cache: f32, a weight that is a training variable (updated
    /// in place), or one that is not f32 on the CPU.
    pub fn get(
        &self,
        weight: &candle_core::Tensor,
    ) -> candle_core::Result<Option<std::sync::Arc<Packed>>> {
        self.get_for_backend(weight, super::conv_backend(), false)
    }

    /// As [`get`](Self::get) for a conv of geometry `g` on (cin, h, w) images: an upsampling
    /// 3x3 conv on the AVX512_BF16 kernel keeps its four sub-pixel phase kernels instead of the
    /// 3x3 one; on the f32 backend, the weights as the f32 kernel for that shape reads them,
    /// where [`F32Weights::worth_keeping`](super::conv2d::F32Weights::worth_keeping) says so.
    pub fn get_for_conv(
        &self,
        weight: &candle_core::Tensor,
        g: super::ConvGeometry,
        (h, w): (usize, usize),
        residual: bool,
    ) -> candle_core::Result<Option<std::sync::Arc<Packed>>> {
        let backend = super::conv_backend();
        if backend == super::ConvBackend::F32 {
            if weight.rank() != 4 {
                return Ok(None);
            }
            let (cout, cin, kh, kw) = weight.dims4()?;
            let kernel = super::conv2d::f32_kernel(cin, (h, w), (cout, kh, kw), residual, g);
            if !super::conv2d::F32Weights::worth_keeping(kernel) {
                return Ok(None);
            }
            return self.lookup(weight, backend, false, Some(kernel));
        }
        if backend == super::ConvBackend::DotBf16 && weight.rank() == 4 {
            let (cout, cin, kh, kw) = weight.dims4()?;
            if super::conv2d::bf16_runs_f32_winograd(cin, (h, w), (cout, kh, kw), residual, g) {
                // Runs f32 Winograd, which keeps no weights (`F32Weights::worth_keeping`).
                return Ok(None);
            }
        }
        let subpixel = backend == super::ConvBackend::DotBf16
            && weight.rank() == 4
            && super::subpixel::applies(weight.dim(2)?, weight.dim(3)?, g);
        self.get_for_backend(weight, backend, subpixel)
    }

    /// As [`get`](Self::get) for the AMX kernel in an explicit mode (`three`: bf16x3).
    pub fn get_for(
        &self,
        weight: &candle_core::Tensor,
        three: bool,
    ) -> candle_core::Result<Option<std::sync::Arc<Packed>>> {
        self.get_for_backend(weight, super::ConvBackend::Amx(three), false)
    }

    pub(crate) fn get_for_backend(
        &self,
        weight: &candle_core::Tensor,
        backend: super::ConvBackend,
        subpixel: bool,
    ) -> candle_core::Result<Option<std::sync::Arc<Packed>>> {
        if backend == super::ConvBackend::F32 {
            return Ok(None);
        }
        self.lookup(weight, backend, subpixel, None)
    }

    /// The cached form of `weight` for (backend, subpixel, f32 kernel), packed on a miss; None
    /// for weights that must not be cached (training variables, updated in place) or that no
    /// kernel of ours reads.
    fn lookup(
        &self,
        weight: &candle_core::Tensor,
        backend: super::ConvBackend,
        subpixel: bool,
        f32_kernel: Option<super::conv2d::F32Kernel>,
    ) -> candle_core::Result<Option<std::sync::Arc<Packed>>> {
        if weight.is_variable()
            || !super::custom_ops(weight.device())
            || weight.dtype() != candle_core::DType::F32
        {
            return Ok(None);
        }
        let mut slot = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight cache poisoned".into()))?;
        if let Some((id, b, sp, k, p)) = slot.as_ref() {
            if *id == weight.id() && *b == backend && *sp == subpixel && *k == f32_kernel {
                return Ok(Some(p.clone()));
            }
        }
        let dims = weight.dims4()?;
        let w = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let p = std::sync::Arc::new(match backend {
            super::ConvBackend::F32 => {
                let kernel = f32_kernel.expect("the f32 backend names its kernel");
                match super::conv2d::F32Weights::prepare(kernel, &w, dims) {
                    Some(p) => Packed::F32(p),
                    None => return Ok(None),
                }
            }
            super::ConvBackend::Amx(three) => Packed::Tiles(PackedWeights::new(&w, dims, three)),
            _ if subpixel => {
                let (cout, cin, ..) = dims;
                let kernels = super::subpixel::phase_weights(&w, cout, cin);
                Packed::PhasePairs(std::array::from_fn(|p| {
                    super::dpbf16::pack_weights(&kernels[p], (cout, cin, 2, 2))
                }))
            }
            _ => Packed::Pairs(super::dpbf16::pack_weights(&w, dims)),
        });
        *slot = Some((weight.id(), backend, subpixel, f32_kernel, p.clone()));
        Ok(Some(p))
    }
}

fn pack_weights(w: &[f32], p: &Plan, three: bool) -> (Vec<u16>, Vec<u16>) {
    let taps = p.kh * p.kw;
    let cbs = p.cp / 32;
    let block = taps * cbs * TILE; // one 16-row block of output channels
    let mut hi = vec![0u16; p.mp / 16 * block];
    let mut lo = vec![0u16; if three { hi.len() } else { 0 }];
    let fill = |mb: usize, hb: &mut [u16], mut lb: Option<&mut [u16]>| {
        for r in 0..16 {
            let co = mb * 16 + r;
            if co >= p.cout {
                break;
            }
            for ci in 0..p.cin {
                let src = &w[(co * p.cin + ci) * taps..][..taps];
                for (tap, &v) in src.iter().enumerate() {
                    let at = (tap * cbs + ci / 32) * TILE + r * 32 + ci % 32;
                    match lb.as_deref_mut() {
                        Some(l) => (hb[at], l[at]) = split(v),
                        None => hb[at] = to_bf16(v),
                    }
                }
            }
        }
    };
    par_fill_pair(&mut hi, &mut lo, block, three, fill);
    (hi, lo)
}

/// The 64-byte operand of `ldtilecfg` (palette 1: bytes per row and rows of each tile).
#[repr(C, align(64))]
pub(super) struct TileConfig {
    pub(super) palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    pub(super) colsb: [u16; 16],
    pub(super) rows: [u8; 16],
}

impl TileConfig {
    /// Palette 1, every tile unused.
    pub(super) fn new() -> Self {
        TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        }
    }
}

/// The tile operations [`conv2d_forward`] issues: [`Hardware`] runs them on the CPU's tile
/// unit; the software model in `amx_emulator` runs them anywhere, for tests.
///
/// # Safety
/// Each function has the contract of the `tiles` function of the same name.
#[allow(clippy::missing_safety_doc)]
pub(super) trait TileUnit {
    unsafe fn configure(cfg: &TileConfig);
    unsafe fn release();
    unsafe fn load_c(c: *const f32, ldc: usize);
    unsafe fn store_c(c: *mut f32, ldc: usize);
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot(
        a0: *const u16,
        a1: *const u16,
        b0: *const u16,
        b1: *const u16,
        kb: usize,
        bs: usize,
        bstep: usize,
    );
    unsafe fn dot3(a: [*const u16; 4], b: [*const u16; 4], kb: usize, bs: usize, bstep: usize);
}

/// The CPU's own tile unit (the `asm!` blocks of `tiles`).
pub(super) struct Hardware;

impl TileUnit for Hardware {
    unsafe fn configure(cfg: &TileConfig) {
        tiles::configure(cfg)
    }
    unsafe fn release() {
        tiles::release()
    }
    unsafe fn load_c(c: *const f32, ldc: usize) {
        tiles::load_c(c, ldc)
    }
    unsafe fn store_c(c: *mut f32, ldc: usize) {
        tiles::store_c(c, ldc)
    }
    unsafe fn dot(
        a0: *const u16,
        a1: *const u16,
        b0: *const u16,
        b1: *const u16,
        kb: usize,
        bs: usize,
        bstep: usize,
    ) {
        tiles::dot(a0, a1, b0, b1, kb, bs, bstep)
    }
    unsafe fn dot3(a: [*const u16; 4], b: [*const u16; 4], kb: usize, bs: usize, bstep: usize) {
        tiles::dot3(a, b, kb, bs, bstep)
    }
}

#[cfg(any(test, feature = "internals"))]
thread_local! {
    // Set by `with_emulated_tiles`: this thread's AMX convolutions run on the software model.
    static EMULATED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with this thread's AMX convolutions (the bf16 and bf16x3 precisions) on a software
/// model of the tile unit (`amx_emulator`), on any CPU: slow, for tests of the AMX kernel's
/// packing and tiling on machines without AMX. Scoped and per thread, as
/// [`with_precision`](super::with_precision) is.
#[cfg(any(test, feature = "internals"))]
pub fn with_emulated_tiles<T>(f: impl FnOnce() -> T) -> T {
    super::scoped(&EMULATED, true, f)
}

/// Whether this thread is inside [`with_emulated_tiles`].
fn emulated() -> bool {
    #[cfg(any(test, feature = "internals"))]
    {
        EMULATED.with(|c| c.get())
    }
    #[cfg(not(any(test, feature = "internals")))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::asm;

    /// # Safety
    /// The CPU must support AMX-BF16 and the thread must have AMX tile data permission
    /// (`available()` checks both); `cfg` must describe the tiles the kernels below use.
    pub unsafe fn configure(cfg: &super::TileConfig) {
        asm!("ldtilecfg [{}]", in(reg) cfg as *const super::TileConfig, options(nostack, readonly));
    }

    /// # Safety
    /// AMX must be available (as for `configure`).
    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// tmm0..tmm3 = the 32x32 f32 block at `c` (row stride `ldc` bytes), as (rows 0-15, cols
    /// 0-15), (0-15, 16-31), (16-31, 0-15), (16-31, 16-31).
    ///
    /// # Safety
    /// Tiles configured (`configure`); `c` points to 32 readable rows of 32 f32, `ldc` bytes
    /// apart.
    pub unsafe fn load_c(c: *const f32, ldc: usize) {
        asm!(
            "tileloadd tmm0, [{c} + {s}*1]",
            "tileloadd tmm1, [{c1} + {s}*1]",
            "tileloadd tmm2, [{c2} + {s}*1]",
            "tileloadd tmm3, [{c3} + {s}*1]",
            c = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) (c as *const u8).add(16 * ldc),
            c3 = in(reg) (c as *const u8).add(16 * ldc + 64),
            s = in(reg) ldc,
            options(nostack, readonly),
        );
    }

    /// As `load_c`, writing: `c` points to 32 writable rows of 32 f32, `ldc` bytes apart.
    ///
    /// # Safety
    /// Tiles configured; the 32 x 32 block at `c` is writable and not aliased.
    pub unsafe fn store_c(c: *mut f32, ldc: usize) {
        asm!(
            "tilestored [{c} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) (c as *mut u8).add(16 * ldc),
            c3 = in(reg) (c as *mut u8).add(16 * ldc + 64),
            s = in(reg) ldc,
            options(nostack),
        );
    }

    /// tmm0..3 += A[0..2] · B[0..2] over `kb` K blocks. a0/a1 walk consecutive 1 KiB tiles of
    /// two 16-row blocks of A; b0/b1 are two B tiles of `bs` bytes per row, the next K block
    /// `bstep` bytes further.
    ///
    /// # Safety
    /// Tiles configured; `kb > 0`; a0/a1 point to `kb` readable 1 KiB tiles each, b0/b1 to
    /// `kb` tiles of 16 rows of `bs` bytes, `bstep` bytes apart.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dot(
        a0: *const u16,
        a1: *const u16,
        b0: *const u16,
        b1: *const u16,
        kb: usize,
        bs: usize,
        bstep: usize,
    ) {
        debug_assert!(kb > 0);
        asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm6, [{b0} + {bs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {bs}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, {bstep}",
            "add {b1}, {bstep}",
            "dec {n}",
            "jnz 2b",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            n = inout(reg) kb => _,
            s = in(reg) 64usize,
            bs = in(reg) bs,
            bstep = in(reg) bstep,
            options(nostack, readonly),
        );
    }

    /// The three passes of 3xbf16 in one loop: tmm0..3 += Ah·Bh + Ah·Bl + Al·Bh per K block,
    /// with the A-hi tiles loaded once for the first two products (10 tile loads per 12
    /// products instead of 12). `a` = (hi0, hi1, lo0, lo1), `b` = (hi0, hi1, lo0, lo1).
    ///
    /// # Safety
    /// As `dot`, for each of the four A and four B pointers.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dot3(a: [*const u16; 4], b: [*const u16; 4], kb: usize, bs: usize, bstep: usize) {
        debug_assert!(kb > 0);
        asm!(
            "2:",
            "tileloadd tmm4, [{ah0} + {s}*1]",
            "tileloadd tmm6, [{bh0} + {bs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{bh1} + {bs}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{ah1} + {s}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm6, [{bl0} + {bs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm7, [{bl1} + {bs}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm4, [{al0} + {s}*1]",
            "tileloadd tmm6, [{bh0} + {bs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{bh1} + {bs}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{al1} + {s}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {ah0}, 1024",
            "add {ah1}, 1024",
            "add {al0}, 1024",
            "add {al1}, 1024",
            "add {bh0}, {bstep}",
            "add {bh1}, {bstep}",
            "add {bl0}, {bstep}",
            "add {bl1}, {bstep}",
            "dec {n}",
            "jnz 2b",
            ah0 = inout(reg) a[0] => _,
            ah1 = inout(reg) a[1] => _,
            al0 = inout(reg) a[2] => _,
            al1 = inout(reg) a[3] => _,
            bh0 = inout(reg) b[0] => _,
            bh1 = inout(reg) b[1] => _,
            bl0 = inout(reg) b[2] => _,
            bl1 = inout(reg) b[3] => _,
            n = inout(reg) kb => _,
            s = in(reg) 64usize,
            bs = in(reg) bs,
            bstep = in(reg) bstep,
            options(nostack, readonly),
        );
    }
}

/// Stand-ins on other CPUs, never called (`available()` is false there).
///
/// # Safety
/// None needed: they do nothing; they are `unsafe` to match the x86 signatures.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::missing_safety_doc)]
mod tiles {
    pub unsafe fn configure(_: &super::TileConfig) {
        unreachable!("AMX on a non-x86 CPU")
    }
    pub unsafe fn release() {}
    pub unsafe fn load_c(_: *const f32, _: usize) {}
    pub unsafe fn store_c(_: *mut f32, _: usize) {}
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dot(
        _: *const u16,
        _: *const u16,
        _: *const u16,
        _: *const u16,
        _: usize,
        _: usize,
        _: usize,
    ) {
    }
    pub unsafe fn dot3(_: [*const u16; 4], _: [*const u16; 4], _: usize, _: usize, _: usize) {}
}

/// Units (one output row's 32 columns) per task: ~256 pixels, fewer when that would leave
/// threads idle.
fn units_per_task(n: usize, units: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let want = (n * units).div_ceil(2 * threads).div_ceil(n.max(1));
    want.clamp(1, 8).min(units.max(1))
}

/// As [`super::conv2d::conv2d_forward`] with bf16 (or 3xbf16) products on AMX, as an implicit
/// GEMM over the packed input. Callers check [`available`] first.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    weight: &[f32],
    wdims: (usize, usize, usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
    three: bool,
    packed: Option<&PackedWeights>,
) -> (Vec<f32>, usize, usize) {
    assert!(available(), "AMX conv called on a CPU without AMX bf16");
    #[cfg(any(test, feature = "internals"))]
    if emulated() {
        return forward_on::<super::amx_emulator::Emulated>(
            x, dims, weight, wdims, bias, residual, g, three, packed,
        );
    }
    forward_on::<Hardware>(x, dims, weight, wdims, bias, residual, g, three, packed)
}

/// [`conv2d_forward`] on tile unit `T`.
#[allow(clippy::too_many_arguments)]
fn forward_on<T: TileUnit>(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
    three: bool,
    packed: Option<&PackedWeights>,
) -> (Vec<f32>, usize, usize) {
    let p = Plan::new((cin, h, w), (cout, kh, kw), g);
    let (oh, ow) = (p.oh, p.ow);
    let pixels = oh * ow;
    let s = g.stride;
    let taps = kh * kw;
    let cbs = p.cp / 32;
    let fresh;
    let (a_hi, a_lo) = match packed {
        Some(pw) if pw.dims == (cout, cin, kh, kw) && pw.three == three => (&pw.hi, &pw.lo),
        _ => {
            fresh = pack_weights(weight, &p, three);
            (&fresh.0, &fresh.1)
        }
    };
    let mut out = vec![0f32; n * cout * pixels];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let mut cfg = TileConfig::new();
    for i in 0..8 {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    let upr = p.owp / 32; // units per output row
    let units = oh * upr;
    let per_task = units_per_task(n, units);
    let tasks_per_image = units.div_ceil(per_task);
    // B tiles: a row is the next channel pair; the next K block is 16 pairs further.
    let bs = s * p.wq * 4;
    let bstep = 16 * bs;
    for b in 0..n {
        let input = pack_input(&x[b * cin * h * w..(b + 1) * cin * h * w], &p, three);
        (0..tasks_per_image).into_par_iter().for_each_init(
            || vec![0f32; 32 * 32],
            |scratch, task| {
                let u0 = task * per_task;
                let u1 = (u0 + per_task).min(units);
                let img = b * cout * pixels;
                let dst = out_ptr.at(img);
                // SAFETY: this task owns the output pixels of units u0..u1 of image b.
                for u in u0..u1 {
                    let (y, x0) = (u / upr, (u % upr) * 32);
                    let cols = 32.min(ow - x0.min(ow));
                    for (co, &bc) in bias.iter().enumerate() {
                        let o = co * pixels + y * ow + x0;
                        let row = unsafe { std::slice::from_raw_parts_mut(dst.add(o), cols) };
                        init_accumulator(row, bc, residual.map(|r| &r[img + o..][..cols]));
                    }
                }
                unsafe { T::configure(&cfg) };
                for m0 in (0..p.mp).step_by(32) {
                    for u in u0..u1 {
                        let (y, x0) = (u / upr, (u % upr) * 32);
                        let full = m0 + 32 <= cout && x0 + 32 <= ow;
                        // SAFETY: full blocks lie inside this task's pixels of the output;
                        // partial ones go through the 32x32 scratch. A and B offsets stay in
                        // their packed buffers (Plan pads both for the last tile).
                        unsafe {
                            let (c, ldc) = if full {
                                (dst.add(m0 * pixels + y * ow + x0), pixels * 4)
                            } else {
                                for r in 0..32 {
                                    for cc in 0..32 {
                                        scratch[r * 32 + cc] = if m0 + r < cout && x0 + cc < ow {
                                            *dst.add((m0 + r) * pixels + y * ow + x0 + cc)
                                        } else {
                                            0.0
                                        };
                                    }
                                }
                                (scratch.as_mut_ptr(), 128)
                            };
                            T::load_c(c, ldc);
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let tap = ky * kw + kx;
                                    let at = input.at(s, y * s + ky, kx % s, x0 + kx / s);
                                    let a = |buf: &[u16], r: usize| {
                                        buf[((m0 / 16 + r) * taps + tap) * cbs * TILE..].as_ptr()
                                    };
                                    let bp = |buf: &[u32], c: usize| {
                                        buf[at + 16 * c..].as_ptr() as *const u16
                                    };
                                    let (hi, lo) = (&input.hi, &input.lo);
                                    if three {
                                        T::dot3(
                                            [a(a_hi, 0), a(a_hi, 1), a(a_lo, 0), a(a_lo, 1)],
                                            [bp(hi, 0), bp(hi, 1), bp(lo, 0), bp(lo, 1)],
                                            cbs,
                                            bs,
                                            bstep,
                                        );
                                    } else {
                                        T::dot(
                                            a(a_hi, 0),
                                            a(a_hi, 1),
                                            bp(hi, 0),
                                            bp(hi, 1),
                                            cbs,
                                            bs,
                                            bstep,
                                        );
                                    }
                                }
                            }
                            T::store_c(c, ldc);
                            if !full {
                                for r in 0..32.min(cout - m0) {
                                    for cc in 0..32.min(ow.saturating_sub(x0)) {
                                        *dst.add((m0 + r) * pixels + y * ow + x0 + cc) =
                                            scratch[r * 32 + cc];
                                    }
                                }
                            }
                        }
                    }
                }
                unsafe { T::release() };
            },
        );
    }
    (out, oh, ow)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        let (hi, lo) = split(std::f32::consts::PI);
        let err = (from_bf16(hi) + from_bf16(lo) - std::f32::consts::PI).abs();
        assert!(err < 1e-4 * std::f32::consts::PI / 256.0, "{err}");
    }

    pub(in crate::kernels) fn values(len: usize, seed: usize, exact: bool) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let v = ((i * 7919 + seed * 104729) % 1013) as f32 / 1013.0 - 0.5;
                // Multiples of 1/16 in [-0.5, 0.5] are exact in bf16.
                if exact {
                    (v * 16.0).round() / 16.0
                } else {
                    v
                }
            })
            .collect()
    }

    /// Odd shapes: non-square, channel counts that are not multiples of 16 or 32, several K
    /// chunks, every geometry of the VAE, batch 1 and 3, outputs not divisible by the tile.
    /// (n, cin, h, w, cout, kh, kw, geometry)
    pub(in crate::kernels) type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        ConvGeometry,
    );
    pub(in crate::kernels) const CASES: &[Case] = &[
        // (n, cin, h, w, cout, kh, kw, geometry)
        (
            1,
            3,
            13,
            17,
            5,
            3,
            3,
            ConvGeometry {
                stride: 1,
                pad: (1, 1, 1, 1),
                upsample: 1,
            },
        ),
        (
            3,
            40,
            9,
            11,
            37,
            3,
            3,
            ConvGeometry {
                stride: 2,
                pad: (0, 1, 0, 1),
                upsample: 1,
            },
        ),
        (
            2,
            70,
            7,
            6,
            33,
            1,
            1,
            ConvGeometry {
                stride: 1,
                pad: (0, 0, 0, 0),
                upsample: 1,
            },
        ),
        (
            1,
            20,
            5,
            7,
            48,
            3,
            3,
            ConvGeometry {
                stride: 1,
                pad: (1, 1, 1, 1),
                upsample: 2,
            },
        ),
        (
            1,
            300,
            6,
            9,
            70,
            3,
            3,
            ConvGeometry {
                stride: 1,
                pad: (1, 1, 1, 1),
                upsample: 1,
            },
        ),
        (
            3,
            64,
            24,
            23,
            64,
            3,
            3,
            ConvGeometry {
                stride: 1,
                pad: (1, 1, 1, 1),
                upsample: 1,
            },
        ),
    ];

    /// Whether the AMX kernel also runs on the CPU's tile unit here (else only on the software
    /// model): mandatory where `CODA_REQUIRE_AMX` is set.
    fn hardware_tiles() -> bool {
        let on = super::super::simd::isa() >= super::super::simd::Isa::Amx;
        if !on {
            assert!(
                std::env::var("CODA_REQUIRE_AMX").is_err(),
                "CODA_REQUIRE_AMX is set but this CPU/OS gives no AMX (or CODA_CPU_ISA caps it)"
            );
            eprintln!(
                "SKIP the AMX kernel on hardware tiles: this CPU has no AMX bf16 (or {} caps \
                 it); it runs on the software model of the tile unit only",
                super::super::simd::ISA_ENV
            );
        }
        on
    }

    /// The AMX conv on every case against the f32 conv, on the software model of the tile unit
    /// (any CPU) and, where the CPU has AMX, on its tiles: exact operands give the same bits on
    /// both, as the SDM's definition of `tdpbf16ps` leaves no rounding choice for exact sums.
    fn check(three: bool) {
        let hardware = hardware_tiles();
        for (i, &(n, cin, h, w, cout, kh, kw, g)) in CASES.iter().enumerate() {
            for exact in [true, false] {
                let x = values(n * cin * h * w, i, exact);
                let wt = values(cout * cin * kh * kw, i + 17, exact);
                let bias = values(cout, i + 5, false);
                let (oh, ow) = g.output_size(h, w, kh, kw);
                let res = values(n * cout * oh * ow, i + 9, false);
                let dims = (n, cin, h, w);
                let wd = (cout, kh, kw);
                let (want, _, _) =
                    super::super::conv2d::conv2d_forward(&x, dims, &wt, wd, &bias, Some(&res), g);
                let run = || {
                    let (got, goh, gow) =
                        conv2d_forward(&x, dims, &wt, wd, &bias, Some(&res), g, three, None);
                    assert_eq!((goh, gow), (oh, ow));
                    // Weights packed ahead (as a model conv keeps them): the very same result.
                    let pw = PackedWeights::new(&wt, (cout, cin, kh, kw), three);
                    let (again, _, _) =
                        conv2d_forward(&x, dims, &wt, wd, &bias, Some(&res), g, three, Some(&pw));
                    assert_eq!(got, again, "case {i}: prepacked weights");
                    got
                };
                let model = with_emulated_tiles(run);
                let mut outputs = vec![("software model", model.clone())];
                if hardware {
                    let got = run();
                    if exact {
                        assert_eq!(got, model, "case {i}: hardware tiles vs their model");
                    }
                    outputs.push(("hardware tiles", got));
                }
                // Error bound relative to Σ|w||x| of each output.
                let ax: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                let aw: Vec<f32> = wt.iter().map(|v| v.abs()).collect();
                let zero = vec![0f32; cout];
                let (mag, _, _) =
                    super::super::conv2d::conv2d_forward(&ax, dims, &aw, wd, &zero, None, g);
                let tol = if exact {
                    1e-6
                } else if three {
                    1.0 / 32768.0
                } else {
                    1.0 / 128.0
                };
                for (on, got) in &outputs {
                    for (j, ((a, b), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                        assert!(
                            (a - b).abs() <= tol * (m + 1e-3),
                            "{on}: case {i} exact={exact} three={three} at {j}: {a} vs {b} \
                             (scale {m})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn weight_cache_packs_once_per_tensor_and_mode_and_never_for_variables(
    ) -> candle_core::Result<()> {
        use candle_core::{Device, Tensor, Var};
        use std::sync::Arc;
        let w = Tensor::randn(0f32, 1.0, (5, 3, 3, 3), &Device::Cpu)?;
        let cache = WeightCache::default();
        let a = cache
            .get_for(&w, false)?
            .expect("a plain f32 CPU weight is cached");
        let b = cache.get_for(&w, false)?.unwrap();
        assert!(Arc::ptr_eq(&a, &b), "second call: the same packed weights");
        let c = cache.get_for(&w, true)?.unwrap();
        assert!(
            matches!(&*c, Packed::Tiles(t) if t.three()) && !Arc::ptr_eq(&a, &c),
            "another mode: packed again"
        );
        let other = (&w + 1.0)?;
        let d = cache.get_for(&other, true)?.unwrap();
        assert!(!Arc::ptr_eq(&c, &d), "another tensor: packed again");
        let v = Var::from_tensor(&w)?;
        assert!(
            cache.get_for(v.as_tensor(), false)?.is_none(),
            "training variables change in place: never cached"
        );
        Ok(())
    }

    #[test]
    fn bf16_conv_matches_f32_within_bf16_rounding() {
        check(false);
    }

    #[test]
    fn bf16x3_conv_matches_f32_within_its_rounding() {
        check(true);
    }
}
