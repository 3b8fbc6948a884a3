//! `kquant::scalar`: the portable Rust, the numeric reference kernels of [`crate::kquant`], in the
//! `generic/` directory with the other portable kernels.

use super::{f16_at, f32_at, le_u16, write_bsums, KType, Q8K_BSUMS, Q8K_BYTES, QK_K};

/// The eight 6-bit sub-block scales and eight 6-bit mins packed in the 12 `scales` bytes of a
/// Q4_K/Q5_K block (ggml's `get_scale_min_k4` for `j = 0..8`): `j < 4`: `sc = s[j] & 63`,
/// `m = s[j+4] & 63`; else `sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4`,
/// `m = (s[j+4] >> 4) | (s[j] >> 6) << 4`.
#[inline]
pub fn scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, m)
}

/// The 4-bit quant of element `e` (0..256) of a Q4_K block's `qs` (or Q5_K's low bits).
#[inline(always)]
fn nibble_k(qs: &[u8], e: usize) -> u8 {
    let byte = qs[32 * (e / 64) + e % 32];
    if e % 64 < 32 {
        byte & 0xF
    } else {
        byte >> 4
    }
}

/// The 4-bit quant of element `e` of a Q4_K block.
#[inline(always)]
pub fn q4_k_quant(b: &[u8], e: usize) -> u8 {
    nibble_k(&b[16..144], e)
}

/// The 5-bit quant (0..32) of element `e` of a Q5_K block.
#[inline(always)]
pub fn q5_k_quant(b: &[u8], e: usize) -> u8 {
    let hi = (b[16 + e % 32] >> (e / 32)) & 1;
    nibble_k(&b[48..176], e) | (hi << 4)
}

/// The unsigned 6-bit quant (0..64; the weight is `q - 32`) of element `e` of a Q6_K block:
/// element `128h + 32k + l` has its low bits in `ql[64h + 32(k%2) + l]` (low nibble for `k < 2`,
/// high for `k >= 2`) and its high bits in bits `2k..2k+2` of `qh[32h + l]`.
#[inline(always)]
pub fn q6_k_quant(b: &[u8], e: usize) -> u8 {
    let (h, k, l) = (e / 128, (e / 32) % 4, e % 32);
    let lo = b[64 * h + 32 * (k % 2) + l];
    let lo = if k < 2 { lo & 0xF } else { lo >> 4 };
    let hi = (b[128 + 32 * h + l] >> (2 * k)) & 3;
    lo | (hi << 4)
}

/// Dequantises one Q4_K block into `y[..256]`.
pub fn dequantize_block_q4_k(b: &[u8], y: &mut [f32]) {
    dequantize_block_scaled_min(b, y, q4_k_quant)
}

/// Q4_K / Q5_K dequantisation: `d·sc[s]·q − dmin·m[s]` per 32-element sub-block, `quant` giving
/// element `e`'s unsigned quant.
fn dequantize_block_scaled_min(b: &[u8], y: &mut [f32], quant: impl Fn(&[u8], usize) -> u8) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, m) = scales_mins_k4(&b[4..16]);
    for (s, ys) in y[..QK_K].chunks_exact_mut(32).enumerate() {
        let d1 = d * sc[s] as f32;
        let m1 = dmin * m[s] as f32;
        for (l, v) in ys.iter_mut().enumerate() {
            *v = d1 * quant(b, 32 * s + l) as f32 - m1;
        }
    }
}

/// Dequantises one Q5_K block into `y[..256]`.
pub fn dequantize_block_q5_k(b: &[u8], y: &mut [f32]) {
    dequantize_block_scaled_min(b, y, q5_k_quant)
}

/// Dequantises one Q6_K block into `y[..256]`: `(d * sc) * (q - 32)`.
pub fn dequantize_block_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for (e, v) in y[..QK_K].iter_mut().enumerate() {
        let sc = b[192 + e / 16] as i8;
        let q = q6_k_quant(b, e) as i32 - 32;
        *v = d * sc as f32 * q as f32;
    }
}

/// ggml's `nearest_int`: `bits(f + 12582912) & 0x7fffff - 0x400000` (round-half-even for
/// |f| < 2^22).
#[inline(always)]
pub fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Quantises one 256-element block to Q8_K (`out`: 292 bytes), as `quantize_row_q8_K_ref`.
pub fn quantize_block_q8_k(x: &[f32], out: &mut [u8]) {
    let x = &x[..QK_K];
    let out = &mut out[..Q8K_BYTES];
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        let av = v.abs();
        if av > amax {
            amax = av;
            max = v;
        }
    }
    if amax == 0.0 {
        out.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    for (o, &v) in out[4..Q8K_BSUMS].iter_mut().zip(x) {
        *o = nearest_int(iscale * v).min(127) as u8;
    }
    write_bsums(out);
    out[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// Quantises a row (a multiple of 256 elements) to Q8_K. `dst`: `x.len() / 256 * 292` bytes.
pub fn quantize_row_q8_k(x: &[f32], dst: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q8K_BYTES)) {
        quantize_block_q8_k(xb, ob);
    }
}

#[inline(always)]
fn bsum(a: &[u8], g: usize) -> i16 {
    le_u16(a, Q8K_BSUMS + 2 * g) as i16
}

/// The eight i32 lanes of `Σ_c sc[c] * Σ_{e in 4l..4l+4} q[32c + e] * q8[32c + e]` over the eight
/// 32-element chunks `c`, with `scale(c, l)` the scale of chunk `c` in lane `l`.
#[inline(always)]
fn lanes(q: impl Fn(usize) -> i32, a: &[u8], scale: impl Fn(usize, usize) -> i32) -> [i32; 8] {
    std::array::from_fn(|l| {
        (0..8)
            .map(|c| {
                let p: i32 = (32 * c + 4 * l..32 * c + 4 * l + 4)
                    .map(|e| q(e) * a[4 + e] as i8 as i32)
                    .sum();
                scale(c, l) * p
            })
            .fold(0i32, i32::wrapping_add)
    })
}

/// The eight i32 lane sums of one Q4_K x Q8_K block (before the scale by `d`).
pub fn block_lanes_q4_k(w: &[u8], a: &[u8]) -> [i32; 8] {
    let (sc, _) = scales_mins_k4(&w[4..16]);
    lanes(|e| q4_k_quant(w, e) as i32, a, |c, _| sc[c] as i32)
}

/// The eight i32 lane sums of one Q5_K x Q8_K block (before the scale by `d`).
pub fn block_lanes_q5_k(w: &[u8], a: &[u8]) -> [i32; 8] {
    let (sc, _) = scales_mins_k4(&w[4..16]);
    lanes(|e| q5_k_quant(w, e) as i32, a, |c, _| sc[c] as i32)
}

/// The eight i32 lane sums of one Q6_K x Q8_K block (before the scale by `d`), the `-32` offset
/// included: lane `l` minus `32 * (bsum[2l]*sc[2l] + bsum[2l+1]*sc[2l+1])`.
pub fn block_lanes_q6_k(w: &[u8], a: &[u8]) -> [i32; 8] {
    let sc = |g: usize| w[192 + g] as i8 as i32;
    let mut s = lanes(|e| q6_k_quant(w, e) as i32, a, |c, l| sc(2 * c + l / 4));
    for (l, v) in s.iter_mut().enumerate() {
        let sub = (bsum(a, 2 * l) as i32 * sc(2 * l))
            .wrapping_add(bsum(a, 2 * l + 1) as i32 * sc(2 * l + 1));
        *v = v.wrapping_sub(sub.wrapping_shl(5));
    }
    s
}

/// The four i32 `mins · bsums` pair sums of a Q4_K/Q5_K block (`madd(mins, hadd(bsums))`):
/// `k`: `m[2k] * (b[4k] + b[4k+1]) + m[2k+1] * (b[4k+2] + b[4k+3])`, the `b` sums wrapping in i16.
pub fn mins_pairs(w: &[u8], a: &[u8]) -> [i32; 4] {
    let (_, m) = scales_mins_k4(&w[4..16]);
    let q8s: [i16; 8] = std::array::from_fn(|k| bsum(a, 2 * k).wrapping_add(bsum(a, 2 * k + 1)));
    std::array::from_fn(|k| {
        (m[2 * k] as i32 * q8s[2 * k] as i32)
            .wrapping_add(m[2 * k + 1] as i32 * q8s[2 * k + 1] as i32)
    })
}

/// ggml's `hsum_float_8` ([`crate::reduce::hsum8`]).
#[inline]
pub fn hsum_float_8(a: [f32; 8]) -> f32 {
    crate::reduce::hsum8(&a)
}

#[inline(always)]
fn fma_lanes(acc: &mut [f32; 8], d: f32, lanes: [i32; 8]) {
    for (s, q) in acc.iter_mut().zip(lanes) {
        *s = d.mul_add(q as f32, *s);
    }
}

/// Q4_K weights x Q8_K activations, `n` elements (a multiple of 256).
pub fn dot_q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let bs = KType::Q4K.type_size();
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    for i in 0..n / QK_K {
        let wb = &w[i * bs..(i + 1) * bs];
        let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
        let da = f32_at(ab, 0);
        let d = da * f16_at(wb, 0);
        let dmin = -da * f16_at(wb, 2);
        for (s, p) in acc_m.iter_mut().zip(mins_pairs(wb, ab)) {
            *s = dmin.mul_add(p as f32, *s);
        }
        fma_lanes(&mut acc, d, block_lanes_q4_k(wb, ab));
    }
    hsum_float_8(acc) + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]))
}

/// Q5_K weights x Q8_K activations, `n` elements (a multiple of 256).
pub fn dot_q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let bs = KType::Q5K.type_size();
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for i in 0..n / QK_K {
        let wb = &w[i * bs..(i + 1) * bs];
        let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
        let da = f32_at(ab, 0);
        let d = da * f16_at(wb, 0);
        let dmin = -da * f16_at(wb, 2);
        let m = mins_pairs(wb, ab).into_iter().fold(0i32, i32::wrapping_add);
        summs = dmin.mul_add(m as f32, summs);
        fma_lanes(&mut acc, d, block_lanes_q5_k(wb, ab));
    }
    hsum_float_8(acc) + summs
}

/// Q6_K weights x Q8_K activations, `n` elements (a multiple of 256).
pub fn dot_q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let bs = KType::Q6K.type_size();
    let mut acc = [0f32; 8];
    for i in 0..n / QK_K {
        let wb = &w[i * bs..(i + 1) * bs];
        let ab = &a[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
        let d = f32_at(ab, 0) * f16_at(wb, 208);
        fma_lanes(&mut acc, d, block_lanes_q6_k(wb, ab));
    }
    hsum_float_8(acc)
}

/// Dispatch on the weight type; lengths are the caller's business (slicing panics if short).
pub fn vec_dot_unchecked(ty: KType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    match ty {
        KType::Q4K => dot_q4_k_q8_k(n, w, a),
        KType::Q5K => dot_q5_k_q8_k(n, w, a),
        KType::Q6K => dot_q6_k_q8_k(n, w, a),
    }
}
