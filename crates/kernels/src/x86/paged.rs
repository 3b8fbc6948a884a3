//! `paged::avx2`: the AVX2 + FMA + F16C (x86-64) kernels of [`crate::paged`], in the
//! `x86/` directory with the other x86 kernels (room beside it for `arm/`).

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{KvChunk, KvDtype, KvRows};
use crate::attention::avx2::{hsum, hsum_x8, softmax};

/// A KV element type: its rows and an 8-wide load widened to f32.
pub(crate) trait Elem: Copy {
    fn rows<'a>(r: &KvRows<'a>) -> &'a [Self];
    /// # Safety
    /// 8 readable elements at `p`; the CPU has AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
    /// Rounds the probabilities in place to this type (nearest-even), as `KvDtype::round`.
    fn round(p: &mut [f32]);
}

impl Elem for f32 {
    fn rows<'a>(r: &KvRows<'a>) -> &'a [f32] {
        match *r {
            KvRows::F32(s) => s,
            _ => unreachable!("chunk dtypes were checked"),
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable floats at `p` (unaligned load).
        unsafe { _mm256_loadu_ps(p) }
    }
    fn round(_: &mut [f32]) {}
}

impl Elem for f16 {
    fn rows<'a>(r: &KvRows<'a>) -> &'a [f16] {
        match *r {
            KvRows::F16(s) => s,
            _ => unreachable!("chunk dtypes were checked"),
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f16 at `p` (16 bytes, unaligned load).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    fn round(p: &mut [f32]) {
        // SAFETY: `round` is only called on the AVX2 paths (`attend`, the splice kernels), whose
        // callers guarantee F16C.
        unsafe { round_f16(p) }
    }
}

impl Elem for bf16 {
    fn rows<'a>(r: &KvRows<'a>) -> &'a [bf16] {
        match *r {
            KvRows::Bf16(s) => s,
            _ => unreachable!("chunk dtypes were checked"),
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 at `p` (16 bytes, unaligned load); a bf16
        // is the upper half of the f32 with the same bits.
        unsafe {
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(w, 16))
        }
    }
    fn round(p: &mut [f32]) {
        p.iter_mut().for_each(|x| *x = KvDtype::Bf16.round(*x));
    }
}

/// f32 → f16 (nearest-even, as `half`) → f32 in place, 8 at a time.
#[target_feature(enable = "avx2,fma,f16c")]
fn round_f16(p: &mut [f32]) {
    let mut ch = p.chunks_exact_mut(8);
    for c in &mut ch {
        // SAFETY: `c` holds exactly 8 floats.
        unsafe {
            let x = _mm256_loadu_ps(c.as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    ch.into_remainder()
        .iter_mut()
        .for_each(|x| *x = KvDtype::F16.round(*x));
}

/// # Safety
/// The CPU has AVX2, FMA and F16C; `hd` is a multiple of 8; every chunk holds `dtype` rows and was
/// bounds-checked for `hd`; `q` holds `lims.len() * hd` values; every `lims[i] <= n_max`, and
/// `n_max` is at most the total key count.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend(
    dtype: KvDtype,
    hd: usize,
    chunks: &[KvChunk<'_>],
    scale: f32,
    q: &[f32],
    lims: &[usize],
    n_max: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            KvDtype::F32 => attend_t::<f32>(hd, chunks, scale, q, lims, n_max, scores, out, lse),
            KvDtype::F16 => attend_t::<f16>(hd, chunks, scale, q, lims, n_max, scores, out, lse),
            KvDtype::Bf16 => attend_t::<bf16>(hd, chunks, scale, q, lims, n_max, scores, out, lse),
        }
    }
}

/// # Safety
/// As [`attend`], with `E` the chunks' element type.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_t<E: Elem>(
    hd: usize,
    chunks: &[KvChunk<'_>],
    scale: f32,
    q: &[f32],
    lims: &[usize],
    n_max: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let m = lims.len();
    scores.clear();
    scores.resize(m * n_max, 0.0);
    // Query vectors in passes of at most 4, balanced (9 heads: 3 + 3 + 3).
    let n_pass = m.div_ceil(4);
    let mut g0 = 0;
    for p in 0..n_pass {
        let gs = (m - g0).div_ceil(n_pass - p);
        let lim = &lims[g0..g0 + gs];
        let args = Group {
            hd,
            chunks,
            scale,
            q: &q[g0 * hd..][..gs * hd],
            lim,
            n_max,
            scores: &mut scores[g0 * n_max..][..gs * n_max],
            out: &mut out[g0 * hd..][..gs * hd],
            lse: &mut lse[g0..g0 + gs],
        };
        // SAFETY: forwarded from the caller; the slices above hold `gs` query vectors.
        unsafe {
            match gs {
                1 => group::<E, 1>(args),
                2 => group::<E, 2>(args),
                3 => group::<E, 3>(args),
                _ => group::<E, 4>(args),
            }
        }
        g0 += gs;
    }
}

struct Group<'a, 'b> {
    hd: usize,
    chunks: &'a [KvChunk<'b>],
    scale: f32,
    /// `G` rounded query vectors.
    q: &'a [f32],
    /// Keys attended by each of them.
    lim: &'a [usize],
    /// Score row length.
    n_max: usize,
    /// `G` score rows of `n_max`.
    scores: &'a mut [f32],
    out: &'a mut [f32],
    lse: &'a mut [f32],
}

/// `G` query vectors (1 to 4) in one pass over the keys.
///
/// # Safety
/// As [`attend`], for the `G` vectors of `a`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<E: Elem, const G: usize>(a: Group<'_, '_>) {
    let Group {
        hd,
        chunks,
        scale,
        q,
        lim,
        n_max,
        scores,
        out,
        lse,
    } = a;
    debug_assert!(q.len() == G * hd && lim.len() == G && scores.len() == G * n_max);
    let n_hi = lim.iter().copied().max().unwrap_or(0);
    let sp = scores.as_mut_ptr();
    let qp = q.as_ptr();
    let scale_v = _mm256_set1_ps(scale);

    // Q·Kᵀ: `KB` keys × `G` vectors of 8-lane accumulators (at most 8 in all), each key row loaded
    // once per 8 dimensions for all vectors. Scores past a vector's count are computed and ignored.
    let kb = 8 / G;
    let mut base = 0;
    for ch in chunks {
        if base >= n_hi {
            break;
        }
        let n = ch.n_keys.min(n_hi - base);
        if n == 0 {
            continue;
        }
        let kp = E::rows(&ch.k)[ch.off..].as_ptr();
        // SAFETY: `i < n <= n_keys`, and the chunk was checked to hold rows
        // `(n_keys - 1) * stride + off + hd` long.
        let row = |i: usize| unsafe { kp.add(i * ch.stride) };
        let mut i = 0;
        while i + kb <= n {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..hd).step_by(8) {
                // SAFETY: `c + 8 <= hd`; `q` holds `G * hd` floats and every key row `hd` values.
                unsafe {
                    let qv: [__m256; G] =
                        std::array::from_fn(|h| _mm256_loadu_ps(qp.add(h * hd + c)));
                    for k in 0..kb {
                        let kv = E::load8(row(i + k).add(c));
                        for h in 0..G {
                            acc[h * kb + k] = _mm256_fmadd_ps(qv[h], kv, acc[h * kb + k]);
                        }
                    }
                }
            }
            let mut s = [0f32; 8];
            // SAFETY: `s` holds 8 floats.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), _mm256_mul_ps(hsum_x8(acc), scale_v)) };
            for h in 0..G {
                for k in 0..kb {
                    // SAFETY: `base + i + k < base + n <= n_hi <= n_max`, `h < G`.
                    unsafe { *sp.add(h * n_max + base + i + k) = s[h * kb + k] };
                }
            }
            i += kb;
        }
        while i < n {
            let mut acc = [_mm256_setzero_ps(); G];
            for c in (0..hd).step_by(8) {
                // SAFETY: as above.
                unsafe {
                    let kv = E::load8(row(i).add(c));
                    for (h, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(h * hd + c)), kv, *a);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                // SAFETY: `base + i < n_hi <= n_max`, `h < G`.
                unsafe { *sp.add(h * n_max + base + i) = hsum(*a) * scale };
            }
            i += 1;
        }
        base += ch.n_keys;
    }

    for h in 0..G {
        let s = &mut scores[h * n_max..][..lim[h]];
        lse[h] = softmax(s);
        E::round(s);
    }
    let n_lo = lim.iter().copied().min().unwrap_or(0);
    let pv = Pv {
        hd,
        chunks,
        lim,
        n_lo,
        n_hi,
        n_max,
        p: scores.as_ptr(),
        out: out.as_mut_ptr(),
    };
    // P·V in blocks of `NT` 8-wide output tiles (`G * NT <= 16` accumulators).
    let max_nt = match G {
        1 => 8,
        2 => 4,
        _ => 2,
    };
    let tiles = hd / 8;
    let mut t0 = 0;
    while t0 < tiles {
        let nt = (tiles - t0).min(max_nt);
        let nt = if nt >= 8 {
            8
        } else if nt >= 4 {
            4
        } else if nt >= 2 {
            2
        } else {
            1
        };
        // SAFETY: `8 * (t0 + nt) <= hd`; the rest is forwarded from the caller.
        unsafe {
            match nt {
                8 => pv_tiles::<E, G, 8>(&pv, 8 * t0),
                4 => pv_tiles::<E, G, 4>(&pv, 8 * t0),
                2 => pv_tiles::<E, G, 2>(&pv, 8 * t0),
                _ => pv_tiles::<E, G, 1>(&pv, 8 * t0),
            }
        }
        t0 += nt;
    }
}

/// The `P·V` operands of one group of `G` query vectors.
struct Pv<'a, 'b> {
    hd: usize,
    chunks: &'a [KvChunk<'b>],
    lim: &'a [usize],
    /// Fewest and most keys attended by a vector of the group.
    n_lo: usize,
    n_hi: usize,
    /// Probability row length.
    n_max: usize,
    /// `G` probability rows of `n_max`.
    p: *const f32,
    /// `G` output rows of `hd`.
    out: *mut f32,
}

/// Calls `f(j, row)` for every key `j` in `lo..hi` with `j % 8 == lane`, in order (`row` points at
/// the key's value row, offset applied).
#[inline(always)]
fn lane_keys<E: Elem>(
    chunks: &[KvChunk<'_>],
    lane: usize,
    lo: usize,
    hi: usize,
    mut f: impl FnMut(usize, *const E),
) {
    let mut base = 0;
    for ch in chunks {
        if base >= hi {
            break;
        }
        let (s, e) = (base.max(lo), (base + ch.n_keys).min(hi));
        if s < e {
            let vp = E::rows(&ch.v)[ch.off..].as_ptr();
            let mut j = s + (lane + 8 - s % 8) % 8;
            while j < e {
                // `j - base < n_keys`: inside the chunk's checked rows (`wrapping_add` keeps the
                // pointer arithmetic safe; dereferencing is the caller's business).
                f(j, vp.wrapping_add((j - base) * ch.stride));
                j += 8;
            }
        }
        base += ch.n_keys;
    }
}

/// `P·V` for output dimensions `c0..c0 + 8 * NT` of the `G` vectors: for each lane `l`, the keys
/// `j ≡ l (mod 8)` summed in order with FMA (each value row loaded once for all vectors, each
/// probability broadcast once for all tiles), then the 8 lanes reduced by the `hsum8` tree.
///
/// # Safety
/// As [`attend`]; `c0 + 8 * NT <= hd`, `G` probability rows of `n_max` at `a.p`, `G` output rows
/// of `hd` at `a.out`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_tiles<E: Elem, const G: usize, const NT: usize>(a: &Pv<'_, '_>, c0: usize) {
    let mut lanes = [[[_mm256_setzero_ps(); NT]; 8]; G];
    for l in 0..8 {
        let mut acc = [[_mm256_setzero_ps(); NT]; G];
        // Keys every vector attends.
        lane_keys::<E>(a.chunks, l, 0, a.n_lo, |j, row| {
            let p: [__m256; G] = std::array::from_fn(|h| {
                // SAFETY: `j < n_lo <= n_max`, `h < G`.
                unsafe { _mm256_broadcast_ss(&*a.p.add(h * a.n_max + j)) }
            });
            for t in 0..NT {
                // SAFETY: `row` is a checked value row of `hd` values and `c0 + 8 * t + 8 <= hd`.
                let v = unsafe { E::load8(row.add(c0 + 8 * t)) };
                for h in 0..G {
                    acc[h][t] = _mm256_fmadd_ps(p[h], v, acc[h][t]);
                }
            }
        });
        // Keys only some attend (the multi-row variant).
        lane_keys::<E>(a.chunks, l, a.n_lo, a.n_hi, |j, row| {
            for h in 0..G {
                if j >= a.lim[h] {
                    continue;
                }
                // SAFETY: `j < lim[h] <= n_max`, `h < G`.
                let p = unsafe { _mm256_broadcast_ss(&*a.p.add(h * a.n_max + j)) };
                for t in 0..NT {
                    // SAFETY: as above.
                    let v = unsafe { E::load8(row.add(c0 + 8 * t)) };
                    acc[h][t] = _mm256_fmadd_ps(p, v, acc[h][t]);
                }
            }
        });
        for h in 0..G {
            lanes[h][l] = acc[h];
        }
    }
    for (h, lh) in lanes.iter().enumerate() {
        for t in 0..NT {
            let r = _mm256_add_ps(
                _mm256_add_ps(
                    _mm256_add_ps(lh[0][t], lh[4][t]),
                    _mm256_add_ps(lh[2][t], lh[6][t]),
                ),
                _mm256_add_ps(
                    _mm256_add_ps(lh[1][t], lh[5][t]),
                    _mm256_add_ps(lh[3][t], lh[7][t]),
                ),
            );
            // SAFETY: `h < G` output rows of `hd` and `c0 + 8 * t + 8 <= hd`.
            unsafe { _mm256_storeu_ps(a.out.add(h * a.hd + c0 + 8 * t), r) };
        }
    }
}
