//! ggml's lane-order reductions, in one place: every kernel that sums SIMD lanes the way ggml's x86
//! code does goes through these, so the order that bit-exactness depends on is written once.
//!
//! - [`hsum8`]: ggml's `hsum_float_8` (high half + low half, `movehl`, `movehdup`):
//!   `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`. Also the order of llamafile's tinyBLAS lane sums.
//! - [`reduce_f32x8x4`]: `GGML_F32x8_REDUCE` of four 8-lane accumulators (`ggml_vec_dot_f32/f16`).
//! - [`reduce_bf16x8x4`]: the reduction of ggml's AVX2 `ggml_vec_dot_bf16`.
//!
//! `avx2::hsum8` (crate-internal) is [`hsum8`] on a register.

/// `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))` (ggml's `hsum_float_8`).
#[inline]
pub fn hsum8(l: &[f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (a[0] + a[2]) + (a[1] + a[3])
}

/// `GGML_F32x8_REDUCE` of four 8-lane accumulators: `(x0+x2) + (x1+x3)` lane-wise, then
/// `((t0+t1) + (t2+t3))` with `t_i = x_i + x_{4+i}` (two `hadd`s).
#[inline]
pub fn reduce_f32x8x4(x: [[f32; 8]; 4]) -> f32 {
    let s: [f32; 8] = std::array::from_fn(|l| (x[0][l] + x[2][l]) + (x[1][l] + x[3][l]));
    let t: [f32; 4] = std::array::from_fn(|i| s[i] + s[4 + i]);
    (t[0] + t[1]) + (t[2] + t[3])
}

/// The reduction of ggml's AVX2 `ggml_vec_dot_bf16`: `(c0+c2) + (c1+c3)` lane-wise, then [`hsum8`].
#[inline]
pub fn reduce_bf16x8x4(c: [[f32; 8]; 4]) -> f32 {
    hsum8(&std::array::from_fn(|l| {
        (c[0][l] + c[2][l]) + (c[1][l] + c[3][l])
    }))
}

/// The reductions on AVX2 registers.
#[cfg(target_arch = "x86_64")]
#[path = "x86/reduce.rs"]
pub(crate) mod avx2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_register_sum_is_the_scalar_sum() {
        if !crate::simd::avx2_available() {
            return;
        }
        // Values whose sums round differently in other orders.
        let l = [1e8f32, 1.0, -1e8, 3.5, 7e-3, -2.25, 1e-8, 5e7];
        // SAFETY: AVX2 checked above; `l` is 8 readable f32s.
        let v = unsafe {
            use std::arch::x86_64::_mm256_loadu_ps;
            avx2::hsum8(_mm256_loadu_ps(l.as_ptr()))
        };
        assert_eq!(v.to_bits(), hsum8(&l).to_bits());
        let naive: f32 = l.iter().sum();
        assert_ne!(
            naive.to_bits(),
            hsum8(&l).to_bits(),
            "the test values must tell orders apart"
        );
    }
}
