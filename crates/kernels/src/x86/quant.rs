//! `quant::avx2`: the AVX2 + FMA + F16C (x86-64) kernels of [`crate::quant`], in the
//! `x86/` directory with the other x86 kernels (room beside it for `arm/`).

use super::{
    check_dot_args, kquant, scalar, ActScales4, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1,
    GgmlType, KType, QK,
};
use std::arch::x86_64::*;

/// Checks the rows and CPU support, then runs the kernel.
fn checked(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot_args(ty, n, w, a);
    assert!(
        crate::simd::avx2_available(),
        "AVX2 + FMA + F16C not available"
    );
    // SAFETY: lengths and CPU support checked just above.
    unsafe { vec_dot_unchecked(ty, n, w, a) }
}

/// Q4_0 x Q8_0 (see [`scalar::dot_q4_0_q8_0`]).
pub fn dot_q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    checked(GgmlType::Q4_0, n, w, a)
}

/// Q4_1 x Q8_1 (see [`scalar::dot_q4_1_q8_1`]).
pub fn dot_q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    checked(GgmlType::Q4_1, n, w, a)
}

/// Q8_0 x Q8_0 (see [`scalar::dot_q8_0_q8_0`]).
pub fn dot_q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    checked(GgmlType::Q8_0, n, w, a)
}

/// F16 x F16 (see [`scalar::dot_f16`]).
pub fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    checked(GgmlType::F16, n, w, a)
}

/// BF16 x BF16 (see [`scalar::dot_bf16`]).
pub fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    checked(GgmlType::BF16, n, w, a)
}

/// F32 x F32 (see [`scalar::dot_f32`]).
pub fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    checked(GgmlType::F32, n, w, a)
}

/// One weight row x one activation row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and `w`, `a` must be `n`-element rows of `ty` and of
/// its vec-dot type (`ty` not Q8_1).
pub(crate) unsafe fn vec_dot_unchecked(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_assert!(crate::simd::avx2_available());
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let nb = n / QK;
    // SAFETY: the caller guarantees CPU support and rows of `nb` blocks (or `n` elements).
    unsafe {
        match ty {
            GgmlType::Q4_0 => dot_rows::<Q4_0, 1>(nb, [wp], ap, wp, 0)[0],
            GgmlType::Q4_1 => dot_rows::<Q4_1, 1>(nb, [wp], ap, wp, 0)[0],
            GgmlType::Q5_0 => dot_rows::<Q5_0, 1>(nb, [wp], ap, wp, 0)[0],
            GgmlType::Q5_1 => dot_rows::<Q5_1, 1>(nb, [wp], ap, wp, 0)[0],
            GgmlType::Q8_0 => dot_rows::<Q8_0, 1>(nb, [wp], ap, wp, 0)[0],
            GgmlType::F16 => dot_f16_k(n, w, a),
            GgmlType::BF16 => dot_bf16_k(n, w, a),
            GgmlType::F32 => dot_f32_k(n, w, a),
            GgmlType::Q4_K => kquant::avx2::vec_dot_unchecked(KType::Q4K, n, w, a),
            GgmlType::Q5_K => kquant::avx2::vec_dot_unchecked(KType::Q5K, n, w, a),
            GgmlType::Q6_K => kquant::avx2::vec_dot_unchecked(KType::Q6K, n, w, a),
            GgmlType::Q8_1 | GgmlType::Q8_K => {
                unreachable!("{} has no vec_dot (checked by the caller)", ty.name())
            }
        }
    }
}

/// Prefetches (into all cache levels) the `L` cache lines at `p`, `p + 64`, ...: never faults,
/// whatever the address.
#[inline(always)]
fn prefetch_lines(p: *const u8, lines: usize) {
    for l in 0..lines {
        // SAFETY: a prefetch is only a hint: it does not fault on any address, and `wrapping_add`
        // makes no claim that the pointer is in bounds.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * l) as *const i8) };
    }
}

/// How far ahead (bytes) [`vec_dot_rows_unchecked`] prefetches weights: two groups of four rows
/// (2.8 KiB for a 576-column Q4_1 row, 4.8 KiB for Q8_0), enough for the lines to arrive from DRAM
/// in time on Zen 3 (measured: one group ahead is slower, four no faster).
fn prefetch_distance(rb: usize) -> usize {
    2 * 4 * rb
}

/// Consecutive weight rows (`w`: `out.len()` rows of `rb` bytes) x one activation row: `out[r]`
/// is `vec_dot_unchecked(ty, n, row r, a)` bit for bit. Four rows at a time share the activation
/// loads, and the weights are prefetched ahead of use (they stream from DRAM at batch 1).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must hold `out.len()` rows of `rb` bytes, each an
/// `n`-element row of `ty`, and `a` an `n`-element row of its vec-dot type (`ty` not Q8_1).
pub(crate) unsafe fn vec_dot_rows_unchecked(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    rb: usize,
    a: &[u8],
    out: &mut [f32],
) {
    debug_assert!(crate::simd::avx2_available());
    debug_assert!(w.len() >= out.len() * rb);
    let nb = n / QK;
    let ap = a.as_ptr();
    let dist = prefetch_distance(rb);
    let done = out.len() / 4 * 4;
    let mut quads = out.chunks_exact_mut(4);
    for (q, o) in (&mut quads).enumerate() {
        // SAFETY: rows `4q..4q+4` lie within `w` (caller); the prefetch pointer is only a hint.
        unsafe {
            let wp: [*const u8; 4] = std::array::from_fn(|r| w.as_ptr().add((4 * q + r) * rb));
            let pf = wp[0].wrapping_add(dist);
            // Prefetch lines per block: ⌈4 * block bytes / 64⌉.
            let d = match ty {
                GgmlType::Q4_0 => dot_rows::<Q4_0, 4>(nb, wp, ap, pf, lines::<Q4_0>()),
                GgmlType::Q4_1 => dot_rows::<Q4_1, 4>(nb, wp, ap, pf, lines::<Q4_1>()),
                GgmlType::Q5_0 => dot_rows::<Q5_0, 4>(nb, wp, ap, pf, lines::<Q5_0>()),
                GgmlType::Q5_1 => dot_rows::<Q5_1, 4>(nb, wp, ap, pf, lines::<Q5_1>()),
                GgmlType::Q8_0 => dot_rows::<Q8_0, 4>(nb, wp, ap, pf, lines::<Q8_0>()),
                _ => std::array::from_fn(|r| {
                    let row = &w[(4 * q + r) * rb..(4 * q + r + 1) * rb];
                    vec_dot_unchecked(ty, n, row, a)
                }),
            };
            o.copy_from_slice(&d);
        }
    }
    for (r, o) in quads.into_remainder().iter_mut().enumerate() {
        let row = &w[(done + r) * rb..(done + r + 1) * rb];
        // SAFETY: as for the caller.
        *o = unsafe { vec_dot_unchecked(ty, n, row, a) };
    }
}

/// [`super::vec_dot_panel_with`] on AVX2 for the 32-element formats.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `ty` is Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0; `w` holds
/// `nb` blocks of `ty`; `act` is readable for `4 * out.len()` rows of `arb` bytes, each `nb`
/// blocks of the vec-dot type; `sc.d` (and `sc.s` for Q4_1 / Q5_1) hold `4 * nb * out.len()`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn vec_dot_panel_unchecked(
    ty: GgmlType,
    nb: usize,
    w: &[u8],
    act: *const u8,
    arb: usize,
    sc: &ActScales4,
    scratch: &mut Vec<u8>,
    out: &mut [[f32; 4]],
) {
    debug_assert!(crate::simd::avx2_available() && w.len() >= nb * ty.type_size());
    // SAFETY: guaranteed by the caller (see above).
    unsafe {
        match ty {
            GgmlType::Q4_0 => panel::<Q4_0>(nb, w.as_ptr(), act, arb, sc, scratch, out),
            GgmlType::Q4_1 => panel::<Q4_1>(nb, w.as_ptr(), act, arb, sc, scratch, out),
            GgmlType::Q5_0 => panel::<Q5_0>(nb, w.as_ptr(), act, arb, sc, scratch, out),
            GgmlType::Q5_1 => panel::<Q5_1>(nb, w.as_ptr(), act, arb, sc, scratch, out),
            GgmlType::Q8_0 => panel::<Q8_0>(nb, w.as_ptr(), act, arb, sc, scratch, out),
            _ => unreachable!("no panel kernel for {}", ty.name()),
        }
    }
}

/// One weight row of `T` x `out.len()` groups of four activation rows. The row is unpacked
/// once into `scratch`: per block its 32 codes (and for signed formats their absolute values,
/// the sign trick's `|x|`), its `d` and `m` as f32. Per group, the pair scales `dw * da_c` of
/// every block are formed four at a time into `scratch` before the integer work, which then
/// reads them by broadcast loads. Per (row, activation) pair the f32 operations and their order
/// are [`dot_rows`]'s.
///
/// # Safety
/// As [`vec_dot_panel_unchecked`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel<T: Block32>(
    nb: usize,
    w: *const u8,
    act: *const u8,
    arb: usize,
    sc: &ActScales4,
    scratch: &mut Vec<u8>,
    out: &mut [[f32; 4]],
) {
    let t = f16_table();
    let (ab_bytes, aq) = act_layout::<T>();
    let codes = if T::SIGNED { 2 } else { 1 };
    // Layout: codes (nb x 32 bytes, then |codes| for signed), dw (nb f32), mw (nb f32),
    // pair scales (4 nb f32).
    let code_bytes = codes * 32 * nb;
    scratch.resize(code_bytes + 4 * (6 * nb) + 32, 0);
    // 32-byte alignment is not needed (unaligned loads) but keeps the f32s 4-aligned.
    let base = scratch.as_mut_ptr();
    let fp = base
        .wrapping_add(code_bytes)
        .wrapping_add(base.wrapping_add(code_bytes).align_offset(4));
    let (dwp, mwp, ddp) = (
        fp as *mut f32,
        (fp as *mut f32).wrapping_add(nb),
        (fp as *mut f32).wrapping_add(2 * nb),
    );
    // SAFETY: `scratch` holds the layout above (resized just before); weight blocks `b < nb`
    // are readable (caller).
    unsafe {
        for b in 0..nb {
            let wb = w.add(b * T::W);
            let qx = T::codes(wb);
            _mm256_storeu_si256(base.add(32 * b) as *mut __m256i, qx);
            if T::SIGNED {
                let ax = _mm256_sign_epi8(qx, qx);
                _mm256_storeu_si256(base.add(32 * (nb + b)) as *mut __m256i, ax);
                *dwp.add(b) = f16_at(t, wb);
            } else {
                let dm = load_2xf16(wb);
                *dwp.add(b) = _mm_cvtss_f32(dm);
                *mwp.add(b) = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            }
        }
    }
    let ones = _mm256_set1_epi16(1);
    let g4 = 4 * nb;
    for (g, o) in out.iter_mut().enumerate() {
        // SAFETY: group `g`'s rows and scales are readable (caller); `scratch` as above.
        unsafe {
            let sd = sc.d.as_ptr().add(g * g4);
            for b in 0..nb {
                let d4 = _mm_loadu_ps(sd.add(4 * b));
                _mm_storeu_ps(ddp.add(4 * b), _mm_mul_ps(_mm_set1_ps(*dwp.add(b)), d4));
            }
            // (The `m * s` chain runs inside the main loop, where its latency overlaps.)
            let mut summs = _mm_setzero_ps();
            let ap: [*const u8; 4] = std::array::from_fn(|c| act.add((4 * g + c) * arb + aq));
            let mut acc = [_mm256_setzero_ps(); 4];
            for b in 0..nb {
                let ab = b * ab_bytes;
                let qx = _mm256_loadu_si256(base.add(32 * b) as *const __m256i);
                let dp = ddp.add(4 * b);
                if T::SIGNED {
                    let ax = _mm256_loadu_si256(base.add(32 * (nb + b)) as *const __m256i);
                    for c in 0..4 {
                        let qy = _mm256_loadu_si256(ap[c].add(ab) as *const __m256i);
                        let sy = _mm256_sign_epi8(qy, qx);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
                        let d = _mm256_broadcast_ss(&*dp.add(c));
                        acc[c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[c]);
                    }
                } else {
                    let s4 = _mm_loadu_ps(sc.s.as_ptr().add(g * g4 + 4 * b));
                    summs = _mm_fmadd_ps(_mm_set1_ps(*mwp.add(b)), s4, summs);
                    for c in 0..4 {
                        let qy = _mm256_loadu_si256(ap[c].add(ab) as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
                        let d = _mm256_broadcast_ss(&*dp.add(c));
                        acc[c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[c]);
                    }
                }
            }
            let mut m = [0f32; 4];
            _mm_storeu_ps(m.as_mut_ptr(), summs);
            *o = std::array::from_fn(|c| {
                let h = crate::reduce::avx2::hsum8(acc[c]);
                if T::SIGNED {
                    h
                } else {
                    h + m[c]
                }
            });
        }
    }
}

/// ggml's AVX2 `quantize_row_q8_0` (`Q81 = false`) or `quantize_row_q8_1` (`Q81 = true`) of `nb`
/// blocks from `x` into `y`: `amax` by `maxps` in ggml's order, `_mm256_round_ps` to nearest even,
/// `cvtps_epi32` and saturating packs. The f16 scales go through the same conversion as the
/// scalar path ([`super::f32_to_f16_ggml`]), so both paths write the same bytes.
///
/// # Safety
/// `x` must be readable for `32 * nb` f32 and `y` writable for `nb` blocks (34 or 36 bytes each);
/// the CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8<const Q81: bool>(nb: usize, x: *const f32, y: *mut u8) {
    let (bs, qoff) = if Q81 {
        (BlockQ8_1::BYTES, 4)
    } else {
        (BlockQ8_0::BYTES, 2)
    };
    let sign = _mm256_set1_ps(-0.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for i in 0..nb {
        // SAFETY: block `i < nb` of `x` (32 f32) and of `y` (`bs` bytes) are in the ranges the
        // caller guarantees; all loads and stores are unaligned.
        unsafe {
            let xp = x.add(QK * i);
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(xp.add(o)));
            let mut max_abs = _mm256_andnot_ps(sign, v[0]);
            for &vj in &v[1..] {
                max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign, vj));
            }
            let mut max4 = _mm_max_ps(
                _mm256_extractf128_ps::<1>(max_abs),
                _mm256_castps256_ps128(max_abs),
            );
            max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
            max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
            let amax = _mm_cvtss_f32(max4);

            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mul = _mm256_set1_ps(id);
            let q = v.map(|vj| {
                _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(_mm256_mul_ps(vj, mul)))
            });
            let yb = y.add(bs * i);
            std::ptr::copy_nonoverlapping(super::f32_to_f16_ggml(d).to_le_bytes().as_ptr(), yb, 2);
            if Q81 {
                let s =
                    _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2));
                let sum = _mm_cvtsi128_si32(s1);
                std::ptr::copy_nonoverlapping(
                    super::f32_to_f16_ggml(d * sum as f32)
                        .to_le_bytes()
                        .as_ptr(),
                    yb.add(2),
                    2,
                );
            }
            let i01 = _mm256_packs_epi32(q[0], q[1]);
            let i23 = _mm256_packs_epi32(q[2], q[3]);
            let b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i01, i23), perm);
            _mm256_storeu_si256(yb.add(qoff) as *mut __m256i, b);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn lanes(v: __m256) -> [f32; 8] {
    let mut out = [0f32; 8];
    // SAFETY: `out` is 8 writable f32s; the store is unaligned.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn lanes4(v: [__m256; 4]) -> [[f32; 8]; 4] {
    [lanes(v[0]), lanes(v[1]), lanes(v[2]), lanes(v[3])]
}

/// Converts the two f16 values at `p` (little-endian, unaligned) to f32 lanes 0 and 1.
///
/// # Safety
/// `p` must be readable for 4 bytes; the CPU must support F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_2xf16(p: *const u8) -> __m128 {
    // SAFETY: the caller guarantees 4 readable bytes at `p`; `read_unaligned` has no alignment need.
    let bits = unsafe { std::ptr::read_unaligned(p as *const u32) };
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

/// f16 bits -> f32, all 65536 values (exact; ggml's `ggml_table_f32_f16`). Used for lone f16
/// scales: converting one with F16C makes LLVM emit a 16-bit insert into an arbitrary xmm register,
/// a false dependency that can chain a loop's blocks through its accumulator (3x slower).
fn f16_table() -> &'static [f32; 65536] {
    static TABLE: std::sync::OnceLock<Box<[f32; 65536]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let v: Vec<f32> = (0..=u16::MAX).map(super::f16_to_f32).collect();
        v.into_boxed_slice().try_into().expect("65536 entries")
    })
}

/// The f16 at `p` (little-endian, unaligned) as f32, through `t` ([`f16_table`]).
///
/// # Safety
/// `p` must be readable for 2 bytes.
#[inline(always)]
unsafe fn f16_at(t: &[f32; 65536], p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes at `p`.
    t[unsafe { std::ptr::read_unaligned(p as *const u16) } as usize]
}

/// 16 packed nibble bytes to 32 bytes: low nibbles (elements 0..16) in the low lane, high nibbles
/// (elements 16..32) in the high lane (ggml's `bytes_from_nibbles_32`).
///
/// # Safety
/// `p` must be readable for 16 bytes; the CPU must support AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; `loadu` has no alignment need.
    let q = unsafe { _mm_loadu_si128(p as *const __m128i) };
    // Both lanes hold the 16 bytes; the high lane is shifted right by 4 (per dword: the bits that
    // come in from the next byte are masked off below).
    let both = _mm256_srlv_epi32(
        _mm256_broadcastsi128_si256(q),
        _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4),
    );
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// ggml's `mul_sum_i8_pairs` as 8 i32 lanes: `madd(1, maddubs(|x|, sign(y, x)))`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn mul_sum_i8_pairs(x: __m256i, y: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

/// A 32-element ggml weight block format as the integer kernels below see it. Each is dotted with
/// Q8_0 (signed formats) or Q8_1 (formats with a minimum) activation blocks, with ggml's AVX2
/// arithmetic per block: signed codes through `mul_sum_i8_pairs` (the sign trick) and
/// `fma(dw * da, lanes, acc)`; unsigned codes through `maddubs` and `fma(dw * da, lanes, acc)`,
/// the `m * s` terms fused into a separate sum, added after `hsum_float_8`.
trait Block32 {
    /// Bytes per weight block.
    const W: usize;
    /// Signed codes (Q4_0, Q5_0, Q8_0 against Q8_0) or unsigned codes with a minimum (Q4_1, Q5_1
    /// against Q8_1).
    const SIGNED: bool;
    /// The 32 codes of the weight block at `p`, element `e` in byte `e`.
    ///
    /// # Safety
    /// `p` readable for [`Self::W`] bytes; AVX2.
    unsafe fn codes(p: *const u8) -> __m256i;
}

/// Activation block bytes and the offset of its quants for weights `T`.
const fn act_layout<T: Block32>() -> (usize, usize) {
    if T::SIGNED {
        (BlockQ8_0::BYTES, 2)
    } else {
        (BlockQ8_1::BYTES, 4)
    }
}

/// Cache lines to prefetch per block of four rows of `T`: `⌈4 W / 64⌉`.
const fn lines<T: Block32>() -> usize {
    (4 * T::W).div_ceil(64)
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

impl Block32 for Q4_0 {
    const W: usize = BlockQ4_0::BYTES;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        // SAFETY: 16 nibble bytes at `p + 2` (caller); AVX2 (caller).
        unsafe { _mm256_sub_epi8(nibbles_32(p.add(2)), _mm256_set1_epi8(8)) }
    }
}

impl Block32 for Q4_1 {
    const W: usize = BlockQ4_1::BYTES;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        // SAFETY: 16 nibble bytes at `p + 4` (caller); AVX2 (caller).
        unsafe { nibbles_32(p.add(4)) }
    }
}

impl Block32 for Q5_0 {
    const W: usize = 22;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        // SAFETY: `qh` at `p + 2`, nibbles at `p + 6` (caller); AVX2 (caller). ggml: the code
        // with its fifth bit clear gets 0xF0 or-ed in, i.e. `code - 16` as i8.
        unsafe {
            let hi = _mm256_andnot_si256(bits_32(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
            _mm256_or_si256(nibbles_32(p.add(6)), hi)
        }
    }
}

impl Block32 for Q5_1 {
    const W: usize = 24;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        // SAFETY: `qh` at `p + 4`, nibbles at `p + 8` (caller); AVX2 (caller).
        unsafe {
            let hi = _mm256_and_si256(bits_32(p.add(4)), _mm256_set1_epi8(0x10));
            _mm256_or_si256(nibbles_32(p.add(8)), hi)
        }
    }
}

impl Block32 for Q8_0 {
    const W: usize = BlockQ8_0::BYTES;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        // SAFETY: 32 quant bytes at `p + 2` (caller); AVX2 (caller).
        unsafe { _mm256_loadu_si256(p.add(2) as *const __m256i) }
    }
}

/// The 32 bits at `p` (little-endian) as 32 bytes, 0xFF where the bit is set (ggml's
/// `bytes_from_bits_32`).
///
/// # Safety
/// `p` readable for 4 bytes; AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bits_32(p: *const u8) -> __m256i {
    // SAFETY: 4 readable bytes at `p` (caller); unaligned read.
    let x = unsafe { std::ptr::read_unaligned(p as *const u32) };
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// `R` weight rows of `T` x one activation row of `nb` blocks, prefetching `pfl` lines per block
/// from `pf` on (a hint, any address).
///
/// # Safety
/// Each `w[r]` must be readable for `nb` blocks of `T` and `a` for `nb` activation blocks; the
/// CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows<T: Block32, const R: usize>(
    nb: usize,
    w: [*const u8; R],
    a: *const u8,
    pf: *const u8,
    pfl: usize,
) -> [f32; R] {
    let t = f16_table();
    let (ab_bytes, aq) = act_layout::<T>();
    let mut acc = [_mm256_setzero_ps(); R];
    // Unsigned formats: lane 1 holds Σ fma(m, s); lane 0 collects unused products.
    let mut summs = [_mm_setzero_ps(); R];
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        prefetch_lines(pf.wrapping_add(b * R * T::W), pfl);
        // SAFETY: block `b < nb` of each row lies within the readable ranges the caller guarantees.
        unsafe {
            let ab = a.add(b * ab_bytes);
            let qy = _mm256_loadu_si256(ab.add(aq) as *const __m256i);
            if T::SIGNED {
                let da = f16_at(t, ab);
                for r in 0..R {
                    let wb = w[r].add(b * T::W);
                    let d = _mm256_set1_ps(f16_at(t, wb) * da);
                    let q = _mm256_cvtepi32_ps(mul_sum_i8_pairs(T::codes(wb), qy));
                    acc[r] = _mm256_fmadd_ps(d, q, acc[r]);
                }
            } else {
                let ds = load_2xf16(ab); // [d_a, s_a, 0, 0]
                for r in 0..R {
                    let wb = w[r].add(b * T::W);
                    let dm = load_2xf16(wb); // [d_w, m_w, 0, 0]
                    summs[r] = _mm_fmadd_ps(dm, ds, summs[r]);
                    let d = _mm256_broadcastss_ps(_mm_mul_ss(dm, ds));
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(T::codes(wb), qy), ones);
                    acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r]);
                }
            }
        }
    }
    std::array::from_fn(|r| {
        let h = crate::reduce::avx2::hsum8(acc[r]);
        if T::SIGNED {
            h
        } else {
            h + _mm_cvtss_f32(_mm_movehdup_ps(summs[r]))
        }
    })
}

/// F16 x F16; `w`, `a` are `2n` bytes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    assert!(w.len() >= 2 * n && a.len() >= 2 * n);
    let np = n & !31;
    let mut sum = [_mm256_setzero_ps(); 4];
    for i in (0..np).step_by(32) {
        for (j, s) in sum.iter_mut().enumerate() {
            let e = 2 * (i + 8 * j);
            // SAFETY: e + 16 <= 2 * np <= the slices' lengths (asserted above).
            let (x, y) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(e) as *const __m128i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(a.as_ptr().add(e) as *const __m128i)),
                )
            };
            *s = _mm256_fmadd_ps(x, y, *s);
        }
    }
    scalar::f16_tail(scalar::reduce_f32x8x4(lanes4(sum)), np, n, w, a)
}

/// bf16 x 8 (16 bytes at `p`) widened to f32.
///
/// # Safety
/// `p` must be readable for 16 bytes; the CPU must support AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_8xbf16(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// BF16 x BF16; `w`, `a` are `2n` bytes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_bf16_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    assert!(w.len() >= 2 * n && a.len() >= 2 * n);
    let np = n & !31;
    let mut sum = [_mm256_setzero_ps(); 4];
    for i in (0..np).step_by(32) {
        for (j, s) in sum.iter_mut().enumerate() {
            let e = 2 * (i + 8 * j);
            // SAFETY: e + 16 <= 2 * np <= the slices' lengths (asserted above).
            let (x, y) = unsafe {
                (
                    load_8xbf16(w.as_ptr().add(e)),
                    load_8xbf16(a.as_ptr().add(e)),
                )
            };
            *s = _mm256_fmadd_ps(x, y, *s);
        }
    }
    scalar::bf16_tail(scalar::reduce_bf16x8x4(lanes4(sum)), np, n, w, a)
}

/// F32 x F32; `w`, `a` are `4n` bytes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    assert!(w.len() >= 4 * n && a.len() >= 4 * n);
    let np = n & !31;
    let mut sum = [_mm256_setzero_ps(); 4];
    for i in (0..np).step_by(32) {
        for (j, s) in sum.iter_mut().enumerate() {
            let e = 4 * (i + 8 * j);
            // SAFETY: e + 32 <= 4 * np <= the slices' lengths (asserted above).
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(w.as_ptr().add(e) as *const f32),
                    _mm256_loadu_ps(a.as_ptr().add(e) as *const f32),
                )
            };
            *s = _mm256_fmadd_ps(x, y, *s);
        }
    }
    scalar::f32_tail(scalar::reduce_f32x8x4(lanes4(sum)), np, n, w, a)
}
