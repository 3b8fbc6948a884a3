//! `attention::avx2`: the AVX2 + FMA + F16C (x86-64) kernels of [`crate::attention`], in the
//! `x86/` directory with the other x86 kernels (room beside it for `arm/`).

use std::arch::x86_64::*;

use half::f16;

use super::{HeadScratch, KvView};

/// 8 f16 → 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8(p: *const f16) -> __m256 {
    // SAFETY: the caller guarantees 8 readable f16 at `p` (16 bytes, unaligned load).
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

pub(crate) use crate::reduce::avx2::hsum8 as hsum;

/// ggml's `ggml_v_expf` (AVX2): the same operations as the scalar `ops::ggml_expf`, per lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn v_expf(x: __m256) -> __m256 {
    let c = |b: u32| _mm256_set1_ps(f32::from_bits(b));
    let r = c(0x4b40_0000);
    let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), r);
    let n = _mm256_sub_ps(z, r);
    let b = _mm256_fnmadd_ps(n, c(0x35bf_be8e), _mm256_fnmadd_ps(n, c(0x3f31_7200), x));
    let e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
    let k = _mm256_castsi256_ps(_mm256_add_epi32(
        e,
        _mm256_castps_si256(_mm256_set1_ps(1.0)),
    ));
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let big = _mm256_cmp_ps(abs_n, _mm256_set1_ps(126.0), _CMP_GT_OQ);
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
            u,
            _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
        ),
        u,
        _mm256_mul_ps(c(0x3f7f_fff6), b),
    );
    if _mm256_movemask_ps(big) == 0 {
        return _mm256_fmadd_ps(j, k, k);
    }
    let g = _mm256_and_si256(
        _mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)),
        _mm256_set1_epi32(0x8200_0000u32 as i32),
    );
    let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
    let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    let huge = _mm256_cmp_ps(abs_n, _mm256_set1_ps(192.0), _CMP_GT_OQ);
    _mm256_or_ps(
        _mm256_and_ps(huge, _mm256_mul_ps(s1, s1)),
        _mm256_andnot_ps(
            huge,
            _mm256_or_ps(
                _mm256_and_ps(big, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                _mm256_andnot_ps(big, _mm256_fmadd_ps(k, j, k)),
            ),
        ),
    )
}

/// Softmax in place, the same arithmetic as `ops::softmax_in_place` (8 exps at a time, each group
/// summed by the `hsum8` tree, groups in f64). Returns the log-sum-exp.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn softmax(x: &mut [f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return f32::NEG_INFINITY;
    }
    let mv = _mm256_set1_ps(max);
    let mut sum = 0f64;
    let mut chunks = x.chunks_exact_mut(8);
    for ch in &mut chunks {
        // SAFETY: `ch` holds exactly 8 floats.
        unsafe {
            let e = v_expf(_mm256_sub_ps(_mm256_loadu_ps(ch.as_ptr()), mv));
            _mm256_storeu_ps(ch.as_mut_ptr(), e);
            sum += hsum(e) as f64;
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut l = [0f32; 8];
        for (v, o) in tail.iter_mut().zip(l.iter_mut()) {
            *v = crate::ops::ggml_expf(*v - max);
            *o = *v;
        }
        sum += crate::ops::hsum8(&l) as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
    max + (sum as f32).ln()
}

/// The 8 dot-product sums of `acc[0..8]`, each reduced by the `hsum8` tree, as one vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_x8(a: [__m256; 8]) -> __m256 {
    // b_i = [lo(a_i)+hi(a_i) | lo(a_{i+4})+hi(a_{i+4})] = [t0..t3 of key i | of key i+4].
    let b: [__m256; 4] = std::array::from_fn(|i| {
        _mm256_add_ps(
            _mm256_permute2f128_ps(a[i], a[i + 4], 0x20),
            _mm256_permute2f128_ps(a[i], a[i + 4], 0x31),
        )
    });
    // Per 128-bit half: p = [t0+t2, t1+t3] of keys (0,1), q = the same of keys (2,3).
    let p = _mm256_add_ps(
        _mm256_unpacklo_ps(b[0], b[1]),
        _mm256_unpackhi_ps(b[0], b[1]),
    );
    let q = _mm256_add_ps(
        _mm256_unpacklo_ps(b[2], b[3]),
        _mm256_unpackhi_ps(b[2], b[3]),
    );
    _mm256_add_ps(
        _mm256_shuffle_ps(p, q, 0b01_00_01_00),
        _mm256_shuffle_ps(p, q, 0b11_10_11_10),
    )
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C; `q16.len()` is a multiple of 8 and `kv` was bounds-checked.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend_head(
    q16: &[f16],
    kv: KvView<'_>,
    scale: f32,
    scratch: &mut HeadScratch,
    out: &mut [f32],
) -> f32 {
    let hd = q16.len();
    let scores = &mut scratch.scores;
    scores.clear();
    scores.resize(kv.n_keys, 0.0);
    let (kbase, vbase) = (kv.k[kv.off..].as_ptr(), kv.v[kv.off..].as_ptr());
    // SAFETY: `j < n_keys` (here and in `vrow`), and the caller checked that key/value rows
    // `(n_keys - 1) * stride + off + hd` lie inside `k` and `v`.
    let row = |j: usize| unsafe { kbase.add(j * kv.stride) };
    let scale_v = _mm256_set1_ps(scale);
    let mut j = 0;
    // Eight keys at a time: the query chunk is loaded once per eight keys.
    while j + 8 <= kv.n_keys {
        let rows: [*const f16; 8] = std::array::from_fn(|i| row(j + i));
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..hd).step_by(8) {
            // SAFETY: `c + 8 <= hd`; the query and every key row hold `hd` values.
            unsafe {
                let qv = load8(q16.as_ptr().add(c));
                for i in 0..8 {
                    acc[i] = _mm256_fmadd_ps(qv, load8(rows[i].add(c)), acc[i]);
                }
            }
        }
        let s8 = _mm256_mul_ps(hsum_x8(acc), scale_v);
        // SAFETY: `j + 8 <= n_keys == scores.len()`.
        unsafe { _mm256_storeu_ps(scores.as_mut_ptr().add(j), s8) };
        j += 8;
    }
    for (jj, sc) in scores.iter_mut().enumerate().skip(j) {
        let kj = row(jj);
        let mut acc = _mm256_setzero_ps();
        for c in (0..hd).step_by(8) {
            // SAFETY: `c + 8 <= hd` and both rows hold `hd` values.
            acc = unsafe { _mm256_fmadd_ps(load8(q16.as_ptr().add(c)), load8(kj.add(c)), acc) };
        }
        *sc = hsum(acc) * scale;
    }
    let lse = softmax(scores);
    // P·V: for each 8-wide chunk of the head, 8 accumulators in registers (key `j` into `j % 8`).
    for p in scores.iter_mut() {
        *p = f16::from_f32(*p).to_f32();
    }
    // SAFETY: as for `row`.
    let vrow = |j: usize| unsafe { vbase.add(j * kv.stride) };
    for c in (0..hd).step_by(8) {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (j, &p) in scores.iter().enumerate() {
            // SAFETY: `c + 8 <= hd` and every value row holds `hd` values.
            acc[j % 8] =
                unsafe { _mm256_fmadd_ps(_mm256_set1_ps(p), load8(vrow(j).add(c)), acc[j % 8]) };
        }
        let r = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6])),
            _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7])),
        );
        // SAFETY: `out` holds `hd` floats and `c + 8 <= hd`.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c), r) };
    }
    lse
}
