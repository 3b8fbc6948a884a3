//! `quant::scalar`: the portable Rust, the numeric reference kernels of [`crate::quant`], in the
//! `generic/` directory with the other portable kernels.

use super::{
    bf16_to_f32, f16_to_f32, kquant, le_u16, q5_code, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1,
    GgmlType, KType, QK,
};

/// `|x| * sign(y, x)` as `_mm256_sign_epi8` + `_mm256_maddubs_epi16` compute one product: exact
/// `x * y`, except that `y = -128` with `x < 0` wraps (`-128 * |x|`), as in ggml.
#[inline(always)]
fn sign_mul(x: i8, y: i8) -> i32 {
    let sy = match x {
        0 => 0,
        x if x < 0 => y.wrapping_neg(),
        _ => y,
    };
    x.unsigned_abs() as i32 * sy as i32
}

// No `maddubs` pair sum can saturate: |x| <= 128 and sign(y, x) in -128..=127 keep a pair of
// products within -32768..=32512 (and 15 * 127 * 2 for Q4_1), so plain i32 sums are exact.

/// The eight i32 lane sums of one Q4_0 x Q8_0 block (lane `l` = elements `4l..4l+4`), as ggml's
/// AVX2 `mul_sum_i8_pairs_float` before its conversion to f32. `w`, `a`: the blocks' bytes.
pub fn block_lanes_q4_0_q8_0(w: &[u8], a: &[u8]) -> [i32; 8] {
    let wb = BlockQ4_0::read(w);
    let ab = BlockQ8_0::read(a);
    std::array::from_fn(|l| {
        (4 * l..4 * l + 4)
            .map(|e| sign_mul(wb.nibble(e) as i8 - 8, ab.qs[e]))
            .sum()
    })
}

/// The eight i32 lane sums of one Q4_1 x Q8_1 block (`Σ nibble * q`, unsigned x signed).
pub fn block_lanes_q4_1_q8_1(w: &[u8], a: &[u8]) -> [i32; 8] {
    let wb = BlockQ4_1::read(w);
    let ab = BlockQ8_1::read(a);
    std::array::from_fn(|l| {
        (4 * l..4 * l + 4)
            .map(|e| wb.nibble(e) as i32 * ab.qs[e] as i32)
            .sum()
    })
}

/// The eight i32 lane sums of one Q8_0 x Q8_0 block.
pub fn block_lanes_q8_0_q8_0(w: &[u8], a: &[u8]) -> [i32; 8] {
    let wb = BlockQ8_0::read(w);
    let ab = BlockQ8_0::read(a);
    std::array::from_fn(|l| {
        (4 * l..4 * l + 4)
            .map(|e| sign_mul(wb.qs[e], ab.qs[e]))
            .sum()
    })
}

/// The eight i32 lane sums of one Q5_0 x Q8_0 block (`Σ (code - 16) * q` by the sign trick).
pub fn block_lanes_q5_0_q8_0(w: &[u8], a: &[u8]) -> [i32; 8] {
    let qh = u32::from_le_bytes([w[2], w[3], w[4], w[5]]);
    let ab = BlockQ8_0::read(a);
    std::array::from_fn(|l| {
        (4 * l..4 * l + 4)
            .map(|e| sign_mul(q5_code(&w[6..22], qh, e) as i8 - 16, ab.qs[e]))
            .sum()
    })
}

/// The eight i32 lane sums of one Q5_1 x Q8_1 block (`Σ code * q`, unsigned x signed).
pub fn block_lanes_q5_1_q8_1(w: &[u8], a: &[u8]) -> [i32; 8] {
    let qh = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
    let ab = BlockQ8_1::read(a);
    std::array::from_fn(|l| {
        (4 * l..4 * l + 4)
            .map(|e| q5_code(&w[8..24], qh, e) as i32 * ab.qs[e] as i32)
            .sum()
    })
}

/// ggml's `hsum_float_8` ([`crate::reduce::hsum8`]).
#[inline]
pub fn hsum_float_8(a: [f32; 8]) -> f32 {
    crate::reduce::hsum8(&a)
}

pub use crate::reduce::{reduce_bf16x8x4, reduce_f32x8x4};

#[inline(always)]
fn fma_lanes(acc: &mut [f32; 8], d: f32, lanes: [i32; 8]) {
    for (s, q) in acc.iter_mut().zip(lanes) {
        *s = d.mul_add(q as f32, *s);
    }
}

/// Q4_0 weights x Q8_0 activations, `n` elements.
pub fn dot_q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for b in 0..n / QK {
        let wb = &w[b * BlockQ4_0::BYTES..(b + 1) * BlockQ4_0::BYTES];
        let ab = &a[b * BlockQ8_0::BYTES..(b + 1) * BlockQ8_0::BYTES];
        let d = f16_to_f32(le_u16(wb, 0)) * f16_to_f32(le_u16(ab, 0));
        fma_lanes(&mut acc, d, block_lanes_q4_0_q8_0(wb, ab));
    }
    hsum_float_8(acc)
}

/// Q4_1 weights x Q8_1 activations, `n` elements: `hsum(Σ lane-wise fma(dw*da, lanes)) + Σ fma(m, s)`.
pub fn dot_q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for b in 0..n / QK {
        let wb = &w[b * BlockQ4_1::BYTES..(b + 1) * BlockQ4_1::BYTES];
        let ab = &a[b * BlockQ8_1::BYTES..(b + 1) * BlockQ8_1::BYTES];
        let (dw, m) = (f16_to_f32(le_u16(wb, 0)), f16_to_f32(le_u16(wb, 2)));
        let (da, s) = (f16_to_f32(le_u16(ab, 0)), f16_to_f32(le_u16(ab, 2)));
        summs = m.mul_add(s, summs);
        fma_lanes(&mut acc, dw * da, block_lanes_q4_1_q8_1(wb, ab));
    }
    hsum_float_8(acc) + summs
}

/// Q8_0 weights x Q8_0 activations, `n` elements.
pub fn dot_q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for b in 0..n / QK {
        let wb = &w[b * BlockQ8_0::BYTES..(b + 1) * BlockQ8_0::BYTES];
        let ab = &a[b * BlockQ8_0::BYTES..(b + 1) * BlockQ8_0::BYTES];
        let d = f16_to_f32(le_u16(wb, 0)) * f16_to_f32(le_u16(ab, 0));
        fma_lanes(&mut acc, d, block_lanes_q8_0_q8_0(wb, ab));
    }
    hsum_float_8(acc)
}

/// Q5_0 weights x Q8_0 activations, `n` elements (as [`dot_q4_0_q8_0`]).
pub fn dot_q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for b in 0..n / QK {
        let wb = &w[b * 22..(b + 1) * 22];
        let ab = &a[b * BlockQ8_0::BYTES..(b + 1) * BlockQ8_0::BYTES];
        let d = f16_to_f32(le_u16(wb, 0)) * f16_to_f32(le_u16(ab, 0));
        fma_lanes(&mut acc, d, block_lanes_q5_0_q8_0(wb, ab));
    }
    hsum_float_8(acc)
}

/// Q5_1 weights x Q8_1 activations, `n` elements (as [`dot_q4_1_q8_1`]).
pub fn dot_q5_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for b in 0..n / QK {
        let wb = &w[b * 24..(b + 1) * 24];
        let ab = &a[b * BlockQ8_1::BYTES..(b + 1) * BlockQ8_1::BYTES];
        let (dw, m) = (f16_to_f32(le_u16(wb, 0)), f16_to_f32(le_u16(wb, 2)));
        let (da, s) = (f16_to_f32(le_u16(ab, 0)), f16_to_f32(le_u16(ab, 2)));
        summs = m.mul_add(s, summs);
        fma_lanes(&mut acc, dw * da, block_lanes_q5_1_q8_1(wb, ab));
    }
    hsum_float_8(acc) + summs
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(le_u16(b, 2 * i))
}

#[inline(always)]
fn bf16_at(b: &[u8], i: usize) -> f32 {
    bf16_to_f32(le_u16(b, 2 * i))
}

#[inline(always)]
fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// The leftovers of `ggml_vec_dot_f16` (elements `from..n`), added in f64 to the vector part `head`.
pub(crate) fn f16_tail(head: f32, from: usize, n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = head as f64;
    for i in from..n {
        sum += (f16_at(w, i) * f16_at(a, i)) as f64;
    }
    sum as f32
}

/// The leftovers of `ggml_vec_dot_bf16`, added in f64.
pub(crate) fn bf16_tail(head: f32, from: usize, n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = head as f64;
    for i in from..n {
        sum += (bf16_at(w, i) * bf16_at(a, i)) as f64;
    }
    sum as f32
}

/// The leftovers of `ggml_vec_dot_f32` as GCC compiled them: the first `r & !3` of the `r`
/// leftover products unfused and added in order, the last `r & 3` fused (FMA).
pub(crate) fn f32_tail(head: f32, from: usize, n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = head;
    let unfused = from + ((n - from) & !3);
    for i in from..unfused {
        sum += f32_at(w, i) * f32_at(a, i);
    }
    for i in unfused..n {
        sum = f32_at(w, i).mul_add(f32_at(a, i), sum);
    }
    sum
}

/// F16 weights x F16 activations (`ggml_vec_dot_f16`, AVX2): 4x8 FMA accumulators over the first
/// `n & !31` elements, their reduction, the rest in f64.
pub fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let np = n & !31;
    let sum = fma_4x8(np, |e| (f16_at(w, e), f16_at(a, e)));
    f16_tail(reduce_f32x8x4(sum), np, n, w, a)
}

/// ggml's 4x8 FMA accumulators over the first `np` (a multiple of 32) elements: element
/// `i + 8j + l` of each 32-element step goes into accumulator `j`, lane `l`. `xy(e)` gives the pair.
#[inline(always)]
fn fma_4x8(np: usize, xy: impl Fn(usize) -> (f32, f32)) -> [[f32; 8]; 4] {
    let mut sum = [[0f32; 8]; 4];
    for i in (0..np).step_by(32) {
        for (j, s) in sum.iter_mut().enumerate() {
            for (l, v) in s.iter_mut().enumerate() {
                let (x, y) = xy(i + 8 * j + l);
                *v = x.mul_add(y, *v);
            }
        }
    }
    sum
}

/// BF16 weights x BF16 activations (`ggml_vec_dot_bf16`, AVX2 branch; GCC fuses its mul + add).
pub fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let np = n & !31;
    let sum = fma_4x8(np, |e| (bf16_at(w, e), bf16_at(a, e)));
    bf16_tail(reduce_bf16x8x4(sum), np, n, w, a)
}

/// F32 x F32 (`ggml_vec_dot_f32`, AVX2).
pub fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let np = n & !31;
    let sum = fma_4x8(np, |e| (f32_at(w, e), f32_at(a, e)));
    f32_tail(reduce_f32x8x4(sum), np, n, w, a)
}

/// Dispatch on the weight type; lengths already checked.
pub(crate) fn vec_dot_unchecked(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    match ty {
        GgmlType::F32 => dot_f32(n, w, a),
        GgmlType::F16 => dot_f16(n, w, a),
        GgmlType::BF16 => dot_bf16(n, w, a),
        GgmlType::Q4_0 => dot_q4_0_q8_0(n, w, a),
        GgmlType::Q4_1 => dot_q4_1_q8_1(n, w, a),
        GgmlType::Q5_0 => dot_q5_0_q8_0(n, w, a),
        GgmlType::Q5_1 => dot_q5_1_q8_1(n, w, a),
        GgmlType::Q8_0 => dot_q8_0_q8_0(n, w, a),
        GgmlType::Q4_K => kquant::scalar::vec_dot_unchecked(KType::Q4K, n, w, a),
        GgmlType::Q5_K => kquant::scalar::vec_dot_unchecked(KType::Q5K, n, w, a),
        GgmlType::Q6_K => kquant::scalar::vec_dot_unchecked(KType::Q6K, n, w, a),
        GgmlType::Q8_1 | GgmlType::Q8_K => {
            unreachable!("{} has no vec_dot (checked by the caller)", ty.name())
        }
    }
}
