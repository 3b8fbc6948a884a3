//! Float element-wise and row ops, with llama.cpp's CPU numerics where they matter.
//!
//! Each function works on one row (or one head) at a time and its result depends only on that row, so a
//! row's output is the same whatever batch it was computed in.

use half::f16;

/// RMSNorm of one row followed by the weight, as ggml: the sum of squares in f64, then
/// `y = x * (1/sqrt(mean + eps)) * w` in f32.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), w.len());
    debug_assert_eq!(x.len(), out.len());
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0f32 / (mean + eps).sqrt();
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * scale * wv;
    }
}

/// RoPE rotation table for one position: `(cos, sin)` per rotated pair, computed as ggml does (the
/// angle advanced by repeated multiplication with `base^(-2/n_dims)` in f32).
pub fn rope_table(
    pos: usize,
    n_dims: usize,
    freq_base: f32,
    freq_scale: f32,
    out: &mut Vec<(f32, f32)>,
) {
    out.clear();
    let theta_scale = freq_base.powf(-2.0f32 / n_dims as f32);
    let mut theta = pos as f32;
    for _ in 0..n_dims / 2 {
        let t = freq_scale * theta;
        out.push((t.cos(), t.sin()));
        theta *= theta_scale;
    }
}

/// One rotation, with the fused multiply-adds GCC contracts llama.cpp's `x0*cos - x1*sin` and
/// `x0*sin + x1*cos` into (measured: this is the form that reproduces llama.cpp's activations bit for bit).
#[inline]
fn rotate(x0: f32, x1: f32, c: f32, s: f32) -> (f32, f32) {
    (x0.mul_add(c, -(x1 * s)), x0.mul_add(s, x1 * c))
}

/// Rotates one head in place, "normal" (adjacent-pair) RoPE as llama.cpp applies to Llama GGUFs, whose
/// Q/K weights were permuted at conversion. Dimensions past the table stay as they are.
pub fn rope_apply_norm(head: &mut [f32], table: &[(f32, f32)]) {
    for (pair, &(c, s)) in head.chunks_exact_mut(2).zip(table) {
        (pair[0], pair[1]) = rotate(pair[0], pair[1], c, s);
    }
}

/// Rotates one head in place, "neox" (half-split) RoPE: pairs `(i, i + n_dims/2)`.
pub fn rope_apply_neox(head: &mut [f32], table: &[(f32, f32)]) {
    let half = table.len();
    for (i, &(c, s)) in table.iter().enumerate() {
        (head[i], head[i + half]) = rotate(head[i], head[i + half], c, s);
    }
}

/// `exp` as ggml's vectorised `ggml_v_expf` computes it (one lane of it): a range reduction and a
/// degree-5 polynomial, within 1.5 ulp of the true value. llama.cpp's softmax and SiLU use it; using the
/// same function (not libm's `expf`) keeps our activations bit-identical to llama.cpp's, which matters
/// because the following Q8 activation quantisation turns one-ulp differences into rounding flips.
#[inline(always)]
pub fn ggml_expf(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let e = z.to_bits() << 23;
    let k = c(e.wrapping_add(1.0f32.to_bits()));
    let big = n.abs() > 126.0;
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6) * b);
    if !big {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = c(g.wrapping_add(0x7f00_0000));
    let s2 = c(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

pub use crate::reduce::hsum8;

/// Softmax in place over `x` (already scaled and masked), as ggml: subtract the max, exponentiate with
/// [`ggml_expf`], sum each group of 8 in f32 then the groups in f64, multiply by the reciprocal. Returns
/// the log-sum-exp of the input (used to merge partial attention states).
#[inline]
pub fn softmax_in_place(x: &mut [f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return f32::NEG_INFINITY;
    }
    let mut sum = 0f64;
    let mut chunks = x.chunks_exact_mut(8);
    for ch in &mut chunks {
        let mut l = [0f32; 8];
        for (v, o) in ch.iter_mut().zip(l.iter_mut()) {
            *v = ggml_expf(*v - max);
            *o = *v;
        }
        sum += hsum8(&l) as f64;
    }
    // A tail shorter than 8 counts as a group padded with zeros (ggml pads the KV length).
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut l = [0f32; 8];
        for (v, o) in tail.iter_mut().zip(l.iter_mut()) {
            *v = ggml_expf(*v - max);
            *o = *v;
        }
        sum += hsum8(&l) as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
    max + (sum as f32).ln()
}

/// SiLU as ggml's vectorised path: `x / (1 + exp(-x))` with [`ggml_expf`].
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + ggml_expf(-x))
}

/// SwiGLU: `out = silu(gate) * up`, on kernel path `path` (both give the same bits; [`Path::Avx2`]
/// on a CPU without it, see [`Path::is_available`], runs the portable code).
///
/// [`Path::Avx2`]: crate::simd::Path::Avx2
/// [`Path::is_available`]: crate::simd::Path::is_available
pub fn swiglu(path: crate::simd::Path, gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if path == crate::simd::Path::Avx2 && crate::simd::avx2_available() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { swiglu_fma(gate, up, out) };
    }
    let _ = path;
    swiglu_portable(gate, up, out)
}

#[inline(always)]
fn swiglu_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// The same code compiled with FMA enabled, so `mul_add` is one instruction instead of a libm call
/// (identical results: both are the fused operation).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_fma(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_portable(gate, up, out)
}

/// `y += x`.
pub fn add_in_place(y: &mut [f32], x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// Rounds f32 values to f16 (nearest-even), as ggml's FP32_TO_FP16.
pub fn to_f16(x: &[f32], out: &mut [f16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f16::from_f32(v);
    }
}

/// Dot product of two f16 vectors, accumulated in f32 in a fixed order: 8 lanes (element `i` into lane
/// `i % 8`) with fused multiply-adds, then [`hsum8`] — the order of llama.cpp's prompt-path GEMM.
pub fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] = x[l].to_f32().mul_add(y[l].to_f32(), acc[l]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = x.to_f32().mul_add(y.to_f32(), tail);
    }
    hsum8(&acc) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_expf_is_within_two_ulp_of_exp() {
        let mut x = -100.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = ggml_expf(x) as f64;
            assert!(
                (got - want).abs()
                    <= 2.0 * f32::EPSILON as f64 * want.max(f32::MIN_POSITIVE as f64),
                "{x}: {got} vs {want}"
            );
            x += 0.173;
        }
        assert_eq!(ggml_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(ggml_expf(0.0), 1.0);
        assert!(ggml_expf(f32::NAN).is_nan());
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 2.0, 0.5, 1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-5, &mut out);
        let ms = x.iter().map(|v| (v * v) as f64).sum::<f64>() / 4.0;
        for i in 0..4 {
            let want = x[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                out[i]
            );
        }
    }

    #[test]
    fn softmax_sums_to_one_and_returns_lse() {
        let mut x = [0.5f32, -1.0, 2.0, f32::NEG_INFINITY];
        let orig = x;
        let lse = softmax_in_place(&mut x);
        let want: f64 = orig[..3]
            .iter()
            .map(|&v| (v as f64).exp())
            .sum::<f64>()
            .ln();
        assert!((lse as f64 - want).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for i in 0..3 {
            assert!((x[i] as f64 - ((orig[i] as f64) - want).exp()).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_by_position_angle() {
        let mut t = Vec::new();
        rope_table(3, 4, 10000.0, 1.0, &mut t);
        // Pair 0 rotates by 3 rad, pair 1 by 3 * 10000^(-1/2).
        let a1 = 3.0f64 * 10000f64.powf(-0.5);
        let mut h = [1.0f32, 0.0, 0.0, 1.0];
        rope_apply_norm(&mut h, &t);
        assert!((h[0] as f64 - 3f64.cos()).abs() < 1e-6);
        assert!((h[1] as f64 - 3f64.sin()).abs() < 1e-6);
        assert!((h[2] as f64 + a1.sin()).abs() < 1e-6);
        assert!((h[3] as f64 - a1.cos()).abs() < 1e-6);
        let mut n = [1.0f32, 0.0, 0.0, 1.0];
        rope_apply_neox(&mut n, &t);
        // neox pairs (0,2) and (1,3).
        assert!((n[0] as f64 - 3f64.cos()).abs() < 1e-6);
        assert!((n[2] as f64 - 3f64.sin()).abs() < 1e-6);
        assert!((n[1] as f64 + a1.sin()).abs() < 1e-6);
        assert!((n[3] as f64 - a1.cos()).abs() < 1e-6);
    }

    #[test]
    fn f16_dot_matches_f64() {
        let a: Vec<f16> = (0..37)
            .map(|i| f16::from_f32((i as f32 * 0.37).sin()))
            .collect();
        let b: Vec<f16> = (0..37)
            .map(|i| f16::from_f32((i as f32 * 0.11).cos()))
            .collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| x.to_f64() * y.to_f64()).sum();
        assert!((dot_f16(&a, &b) as f64 - want).abs() < 1e-5);
    }
}
