//! Attention of one query head over f16 keys and values, with llama.cpp's prompt-path numerics.
//!
//! `Q·Kᵀ`: the query is rounded to f16; each score is an 8-lane FMA dot product (element `i` in lane
//! `i % 8`) reduced by [`hsum8`], then scaled. Softmax as [`ops::softmax_in_place`]. `P·V`: the
//! probabilities are rounded to f16; for each output dimension the keys are summed in 8 lanes (key `j`
//! in lane `j % 8`) with FMA and reduced by [`hsum8`]. That is the order of llamafile's tinyBLAS GEMM
//! llama.cpp uses for multi-token batches, and the AVX2 path computes exactly the same operations as the
//! scalar one, so results are bit-identical across paths, batches and threads.

use half::f16;

use crate::ops::{self, hsum8};
use crate::simd::{self, Path};

/// Scratch space for [`attend_head`], reused across calls.
#[derive(Default)]
pub struct HeadScratch {
    scores: Vec<f32>,
    /// 8 accumulators (one per lane) of `head_dim` floats each.
    lanes: Vec<f32>,
}

/// Keys and values of one KV head: key `j` is `k[j * stride + off ..][..head_dim]`, likewise for `v`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub n_keys: usize,
    pub stride: usize,
    pub off: usize,
}

impl KvView<'_> {
    fn check(&self, hd: usize) {
        if self.n_keys > 0 {
            let last = (self.n_keys - 1) * self.stride + self.off + hd;
            assert!(
                last <= self.k.len() && last <= self.v.len(),
                "KV view out of bounds"
            );
        }
    }
}

/// Attends one query head (already rounded to f16) over `kv`, writing `head_dim` outputs. Returns the
/// log-sum-exp of the scaled scores (for merging partial attention states); `-inf` with no keys, when
/// the output is zero.
pub fn attend_head(
    q16: &[f16],
    kv: KvView<'_>,
    scale: f32,
    scratch: &mut HeadScratch,
    out: &mut [f32],
) -> f32 {
    let hd = q16.len();
    assert_eq!(out.len(), hd);
    kv.check(hd);
    #[cfg(target_arch = "x86_64")]
    if simd::path() == Path::Avx2 && hd.is_multiple_of(8) {
        // SAFETY: `Path::Avx2` is chosen only when the CPU has AVX2, FMA and F16C; bounds were checked.
        return unsafe { avx2::attend_head(q16, kv, scale, scratch, out) };
    }
    scalar_attend_head(q16, kv, scale, scratch, out)
}

/// The portable reference.
pub fn scalar_attend_head(
    q16: &[f16],
    kv: KvView<'_>,
    scale: f32,
    scratch: &mut HeadScratch,
    out: &mut [f32],
) -> f32 {
    let hd = q16.len();
    kv.check(hd);
    let HeadScratch { scores, lanes } = scratch;
    scores.clear();
    scores.extend((0..kv.n_keys).map(|j| {
        let kj = &kv.k[j * kv.stride + kv.off..][..hd];
        ops::dot_f16(q16, kj) * scale
    }));
    let lse = ops::softmax_in_place(scores);
    lanes.clear();
    lanes.resize(8 * hd, 0.0);
    for (j, &p) in scores.iter().enumerate() {
        let p = f16::from_f32(p).to_f32();
        let acc = &mut lanes[(j % 8) * hd..][..hd];
        let vj = &kv.v[j * kv.stride + kv.off..][..hd];
        for (a, &x) in acc.iter_mut().zip(vj) {
            *a = p.mul_add(x.to_f32(), *a);
        }
    }
    for (d, o) in out.iter_mut().enumerate() {
        let l: [f32; 8] = std::array::from_fn(|lane| lanes[lane * hd + d]);
        *o = hsum8(&l);
    }
    lse
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
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

    /// `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`, as `ops::hsum8`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(x: __m256) -> f32 {
        let a = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let b = _mm_add_ps(a, _mm_movehl_ps(a, a));
        let c = _mm_add_ss(b, _mm_movehdup_ps(b));
        _mm_cvtss_f32(c)
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
        let HeadScratch { scores, lanes } = scratch;
        scores.clear();
        scores.reserve(kv.n_keys);
        for j in 0..kv.n_keys {
            let kj = kv.k[j * kv.stride + kv.off..][..hd].as_ptr();
            let mut acc = _mm256_setzero_ps();
            for c in (0..hd).step_by(8) {
                // SAFETY: `c + 8 <= hd` and both rows hold `hd` values.
                acc = unsafe { _mm256_fmadd_ps(load8(q16.as_ptr().add(c)), load8(kj.add(c)), acc) };
            }
            scores.push(hsum(acc) * scale);
        }
        let lse = crate::ops::softmax_in_place(scores);
        lanes.clear();
        lanes.resize(8 * hd, 0.0);
        for (j, &p) in scores.iter().enumerate() {
            let pv = _mm256_set1_ps(f16::from_f32(p).to_f32());
            let acc = lanes[(j % 8) * hd..][..hd].as_mut_ptr();
            let vj = kv.v[j * kv.stride + kv.off..][..hd].as_ptr();
            for c in (0..hd).step_by(8) {
                // SAFETY: `c + 8 <= hd`; `acc` and `vj` each hold `hd` values.
                unsafe {
                    let a = _mm256_loadu_ps(acc.add(c));
                    _mm256_storeu_ps(acc.add(c), _mm256_fmadd_ps(pv, load8(vj.add(c)), a));
                }
            }
        }
        for c in (0..hd).step_by(8) {
            // SAFETY: lane `l` holds `hd` floats at `l * hd`; `c + 8 <= hd`; `out` holds `hd` floats.
            unsafe {
                let base = lanes.as_ptr().add(c);
                let a04 = _mm256_add_ps(_mm256_loadu_ps(base), _mm256_loadu_ps(base.add(4 * hd)));
                let a15 = _mm256_add_ps(
                    _mm256_loadu_ps(base.add(hd)),
                    _mm256_loadu_ps(base.add(5 * hd)),
                );
                let a26 = _mm256_add_ps(
                    _mm256_loadu_ps(base.add(2 * hd)),
                    _mm256_loadu_ps(base.add(6 * hd)),
                );
                let a37 = _mm256_add_ps(
                    _mm256_loadu_ps(base.add(3 * hd)),
                    _mm256_loadu_ps(base.add(7 * hd)),
                );
                let r = _mm256_add_ps(_mm256_add_ps(a04, a26), _mm256_add_ps(a15, a37));
                _mm256_storeu_ps(out.as_mut_ptr().add(c), r);
            }
        }
        lse
    }
}
