//! A software model of the AMX tile unit, for tests on CPUs without AMX: the AMX convolution's
//! packing, tiling, partial blocks, strides and bf16x3 passes then run on every machine, and only
//! the few `asm!` lines of `amx::tiles` stay untested there.
//!
//! It models the instructions the kernel issues (`ldtilecfg`, `tileloadd`, `tdpbf16ps`,
//! `tilestored`, `tilerelease`) as the Intel SDM's pseudocode defines them (Vol. 2, "TDPBF16PS"):
//! for each row m and column n of the f32 destination, over the K dwords of A's row, add
//! a[m][2k]·b[k][2n] and then a[m][2k+1]·b[k][2n+1], each a separate f32 addition (the bf16
//! products are exact in f32), denormal inputs read as zero and denormal results flushed to zero.
//! The tile registers are per thread, as on the hardware. What the hardware would fault on (a
//! tile used before `ldtilecfg`, mismatched tile shapes) panics here.
//!
//! `dot`, `dot3`, `load_c` and `store_c` below transcribe `amx::tiles`' asm blocks instruction
//! by instruction: a change to one must be made to the other.

use super::amx::{TileConfig, TileUnit};
use std::cell::RefCell;

/// Bytes of one tile register (16 rows of 64 bytes).
const TILE_BYTES: usize = 1024;

struct Tiles {
    /// (rows, bytes per row) of each tile, from the last `ldtilecfg`; None before it and after
    /// `tilerelease`.
    shape: Option<[(usize, usize); 8]>,
    data: [[u8; TILE_BYTES]; 8],
}

thread_local! {
    static TILES: RefCell<Tiles> = const {
        RefCell::new(Tiles {
            shape: None,
            data: [[0; TILE_BYTES]; 8],
        })
    };
}

fn shape(t: &Tiles, r: usize) -> (usize, usize) {
    t.shape
        .expect("AMX emulator: tile instruction before ldtilecfg (the CPU would raise #UD)")[r]
}

fn ldtilecfg(cfg: &TileConfig) {
    assert_eq!(cfg.palette, 1, "AMX emulator: only palette 1 exists");
    let shape = std::array::from_fn(|i| {
        let (rows, colsb) = (cfg.rows[i] as usize, cfg.colsb[i] as usize);
        assert!(
            rows <= 16 && colsb <= 64,
            "AMX emulator: tile {i} is {rows}x{colsb} bytes"
        );
        (rows, colsb)
    });
    TILES.with_borrow_mut(|t| {
        t.shape = Some(shape);
        t.data = [[0; TILE_BYTES]; 8];
    });
}

fn tilerelease() {
    TILES.with_borrow_mut(|t| t.shape = None);
}

/// `tileloadd tmm{r}, [base + stride*1]`: row i from base + i·stride; the bytes beyond the
/// configured shape are zeroed.
///
/// # Safety
/// `rows` rows of `colsb` bytes, `stride` bytes apart from `base`, are readable.
unsafe fn tileloadd(r: usize, base: *const u8, stride: usize) {
    TILES.with_borrow_mut(|t| {
        let (rows, colsb) = shape(t, r);
        let tile = &mut t.data[r];
        tile.fill(0);
        for i in 0..rows {
            let src = std::slice::from_raw_parts(base.wrapping_add(i * stride), colsb);
            tile[i * 64..i * 64 + colsb].copy_from_slice(src);
        }
    })
}

/// `tilestored [base + stride*1], tmm{r}`.
///
/// # Safety
/// `rows` rows of `colsb` bytes, `stride` bytes apart from `base`, are writable.
unsafe fn tilestored(r: usize, base: *mut u8, stride: usize) {
    TILES.with_borrow(|t| {
        let (rows, colsb) = shape(t, r);
        for i in 0..rows {
            let dst = std::slice::from_raw_parts_mut(base.wrapping_add(i * stride), colsb);
            dst.copy_from_slice(&t.data[r][i * 64..i * 64 + colsb]);
        }
    })
}

/// bf16 as f32, denormals read as zero (DAZ).
fn bf16_daz(lo: u8, hi: u8) -> f32 {
    ftz(f32::from_bits(((hi as u32) << 24) | ((lo as u32) << 16)))
}

/// A denormal as (signed) zero: results (FTZ) and, through `bf16_daz`, operands (DAZ).
fn ftz(v: f32) -> f32 {
    if v.is_subnormal() {
        0.0f32.copysign(v)
    } else {
        v
    }
}

/// `tdpbf16ps tmm{c}, tmm{a}, tmm{b}` as the SDM defines it (see the module comment).
fn tdpbf16ps(c: usize, a: usize, b: usize) {
    TILES.with_borrow_mut(|t| {
        let (c_rows, c_colsb) = shape(t, c);
        let (a_rows, a_colsb) = shape(t, a);
        let (b_rows, b_colsb) = shape(t, b);
        // The shape checks the CPU makes (#UD otherwise).
        assert!(
            c_rows == a_rows && b_colsb == c_colsb && a_colsb / 4 == b_rows,
            "AMX emulator: tdpbf16ps with C {c_rows}x{c_colsb}, A {a_rows}x{a_colsb}, \
             B {b_rows}x{b_colsb} bytes"
        );
        assert!(
            c != a && c != b && a != b,
            "AMX emulator: tdpbf16ps needs three tiles"
        );
        let (n_cols, k_dwords) = (c_colsb / 4, a_colsb / 4);
        // The operands as f32 once (A by row, B by K row), the accumulators as f32.
        let elems = |tile: usize| -> [f32; 512] {
            let d = &t.data[tile];
            std::array::from_fn(|e| bf16_daz(d[2 * e], d[2 * e + 1]))
        };
        let (av, bv) = (elems(a), elems(b));
        let mut out = [[0f32; 16]; 16];
        for (m, row) in out.iter_mut().enumerate().take(c_rows) {
            for (n, acc) in row.iter_mut().enumerate().take(n_cols) {
                let d = &t.data[c][m * 64 + 4 * n..][..4];
                let mut v = f32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                for k in 0..k_dwords {
                    v = ftz(v + av[m * 32 + 2 * k] * bv[k * 32 + 2 * n]);
                    v = ftz(v + av[m * 32 + 2 * k + 1] * bv[k * 32 + 2 * n + 1]);
                }
                *acc = v;
            }
        }
        let dst = &mut t.data[c];
        dst.fill(0);
        for m in 0..c_rows {
            for n in 0..n_cols {
                dst[m * 64 + 4 * n..][..4].copy_from_slice(&out[m][n].to_le_bytes());
            }
        }
    })
}

/// The tile unit in software (see the module comment).
pub(super) struct Emulated;

impl TileUnit for Emulated {
    unsafe fn configure(cfg: &TileConfig) {
        ldtilecfg(cfg)
    }

    unsafe fn release() {
        tilerelease()
    }

    unsafe fn load_c(c: *const f32, ldc: usize) {
        let c = c as *const u8;
        tileloadd(0, c, ldc);
        tileloadd(1, c.add(64), ldc);
        tileloadd(2, c.add(16 * ldc), ldc);
        tileloadd(3, c.add(16 * ldc + 64), ldc);
    }

    unsafe fn store_c(c: *mut f32, ldc: usize) {
        let c = c as *mut u8;
        tilestored(0, c, ldc);
        tilestored(1, c.add(64), ldc);
        tilestored(2, c.add(16 * ldc), ldc);
        tilestored(3, c.add(16 * ldc + 64), ldc);
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
        assert!(kb > 0, "the asm loop runs at least once");
        let (mut a0, mut a1) = (a0 as *const u8, a1 as *const u8);
        let (mut b0, mut b1) = (b0 as *const u8, b1 as *const u8);
        for _ in 0..kb {
            tileloadd(4, a0, 64);
            tileloadd(6, b0, bs);
            tdpbf16ps(0, 4, 6);
            tileloadd(7, b1, bs);
            tdpbf16ps(1, 4, 7);
            tileloadd(5, a1, 64);
            tdpbf16ps(2, 5, 6);
            tdpbf16ps(3, 5, 7);
            a0 = a0.wrapping_add(1024);
            a1 = a1.wrapping_add(1024);
            b0 = b0.wrapping_add(bstep);
            b1 = b1.wrapping_add(bstep);
        }
    }

    unsafe fn dot3(a: [*const u16; 4], b: [*const u16; 4], kb: usize, bs: usize, bstep: usize) {
        assert!(kb > 0, "the asm loop runs at least once");
        let [mut ah0, mut ah1, mut al0, mut al1] = a.map(|p| p as *const u8);
        let [mut bh0, mut bh1, mut bl0, mut bl1] = b.map(|p| p as *const u8);
        for _ in 0..kb {
            tileloadd(4, ah0, 64);
            tileloadd(6, bh0, bs);
            tdpbf16ps(0, 4, 6);
            tileloadd(7, bh1, bs);
            tdpbf16ps(1, 4, 7);
            tileloadd(5, ah1, 64);
            tdpbf16ps(2, 5, 6);
            tdpbf16ps(3, 5, 7);
            tileloadd(6, bl0, bs);
            tdpbf16ps(0, 4, 6);
            tdpbf16ps(2, 5, 6);
            tileloadd(7, bl1, bs);
            tdpbf16ps(1, 4, 7);
            tdpbf16ps(3, 5, 7);
            tileloadd(4, al0, 64);
            tileloadd(6, bh0, bs);
            tdpbf16ps(0, 4, 6);
            tileloadd(7, bh1, bs);
            tdpbf16ps(1, 4, 7);
            tileloadd(5, al1, 64);
            tdpbf16ps(2, 5, 6);
            tdpbf16ps(3, 5, 7);
            for p in [&mut ah0, &mut ah1, &mut al0, &mut al1] {
                *p = p.wrapping_add(1024);
            }
            for p in [&mut bh0, &mut bh1, &mut bl0, &mut bl1] {
                *p = p.wrapping_add(bstep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TileConfig {
        let mut cfg = TileConfig::new();
        for i in 0..8 {
            cfg.colsb[i] = 64;
            cfg.rows[i] = 16;
        }
        cfg
    }

    /// One `tdpbf16ps` on exact values (small integers: every sum exact in f32) against the
    /// matrix product of its operands as the SDM lays them out: A is 16 x 32 bf16, B holds
    /// K-pairs, row k = (b[2k][n], b[2k+1][n]) for n = 0..16.
    #[test]
    fn tdpbf16ps_is_a_16x32_by_32x16_product_of_pairs() {
        let a: Vec<f32> = (0..16 * 32).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..32 * 16).map(|i| ((i * 5) % 13) as f32 - 6.0).collect(); // [k][n]
        let c0: Vec<f32> = (0..256).map(|i| (i % 9) as f32).collect();
        let a_tile: Vec<u16> = a.iter().map(|&v| super::super::amx::to_bf16(v)).collect();
        // B tile row k2 holds, for each n, the pair (b[2·k2][n], b[2·k2+1][n]).
        let mut b_tile = vec![0u16; 512];
        for k2 in 0..16 {
            for n in 0..16 {
                b_tile[k2 * 32 + 2 * n] = super::super::amx::to_bf16(b[2 * k2 * 16 + n]);
                b_tile[k2 * 32 + 2 * n + 1] = super::super::amx::to_bf16(b[(2 * k2 + 1) * 16 + n]);
            }
        }
        let mut c = c0.clone();
        unsafe {
            ldtilecfg(&config());
            tileloadd(0, c.as_ptr() as *const u8, 64);
            tileloadd(4, a_tile.as_ptr() as *const u8, 64);
            tileloadd(6, b_tile.as_ptr() as *const u8, 64);
            tdpbf16ps(0, 4, 6);
            tilestored(0, c.as_mut_ptr() as *mut u8, 64);
            tilerelease();
        }
        for m in 0..16 {
            for n in 0..16 {
                let want =
                    c0[m * 16 + n] + (0..32).map(|k| a[m * 32 + k] * b[k * 16 + n]).sum::<f32>();
                assert_eq!(c[m * 16 + n], want, "({m}, {n})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "before ldtilecfg")]
    fn a_tile_load_before_the_configuration_faults() {
        let x = [0u8; 1024];
        tilerelease();
        unsafe { tileloadd(0, x.as_ptr(), 64) };
    }

    #[test]
    fn denormals_read_as_zero_and_results_flush_to_zero() {
        // bf16 0x0001 is a denormal: as an operand it is zero.
        assert_eq!(bf16_daz(0x01, 0x00), 0.0);
        assert_eq!(bf16_daz(0x80, 0x3f), 1.0);
        assert_eq!(ftz(f32::MIN_POSITIVE / 2.0), 0.0);
        assert_eq!(ftz(f32::MIN_POSITIVE), f32::MIN_POSITIVE);
    }
}
