//! `reduce::avx2`: the AVX2 + FMA + F16C (x86-64) kernels of [`crate::reduce`], in the
//! `x86/` directory with the other x86 kernels (room beside it for `arm/`).

use std::arch::x86_64::*;

/// [`super::hsum8`] of the lanes of `x`.
///
/// # Safety
/// The CPU must support AVX2 (callers are AVX2 kernels).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum8(x: __m256) -> f32 {
    let a = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
    let b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    let c = _mm_add_ss(b, _mm_movehdup_ps(b));
    _mm_cvtss_f32(c)
}
