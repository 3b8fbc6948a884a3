//! Quantisation, dequantisation and dot products against naive references, and SIMD against scalar.

mod common;

use common::{block_strategy, random_weights, row_strategy, Rng};
use ep_kernels::quant::{self, scalar, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, GgmlType, QK};
use ep_kernels::simd::{self, Path};
use half::{bf16, f16};
use proptest::prelude::*;

/// ggml's formula, written plainly: amax, d = amax/127, id = 127/amax, q = round-half-even(x * id).
fn naive_q8(x: &[f32]) -> (f32, Vec<i8>, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let q: Vec<i8> = x
        .iter()
        .map(|&v| (v * id).round_ties_even() as i8)
        .collect();
    let sum = q.iter().map(|&v| v as i32).sum();
    (d, q, sum)
}

fn naive_quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; x.len() / QK * BlockQ8_0::BYTES];
    for (xb, ob) in x.chunks(QK).zip(out.chunks_mut(BlockQ8_0::BYTES)) {
        let (d, q, _) = naive_q8(xb);
        let blk = BlockQ8_0 {
            d: f16::from_f32(d),
            qs: q.try_into().unwrap(),
        };
        blk.write(ob);
    }
    out
}

fn naive_quantize_q8_1(x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; x.len() / QK * BlockQ8_1::BYTES];
    for (xb, ob) in x.chunks(QK).zip(out.chunks_mut(BlockQ8_1::BYTES)) {
        let (d, q, sum) = naive_q8(xb);
        let blk = BlockQ8_1 {
            d: f16::from_f32(d),
            s: f16::from_f32(d * sum as f32),
            qs: q.try_into().unwrap(),
        };
        blk.write(ob);
    }
    out
}

fn quantized(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut a = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    quant::quantize_activation_row_with(Path::detect(), ty, x, &mut a);
    a
}

#[test]
fn q8_rounds_half_to_even() {
    // amax 127 -> id = 1: x * id is exactly x.
    let mut x = [0f32; 32];
    let vals = [
        127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 126.5, -126.5, 0.49999997, 4.5, 5.5,
    ];
    x[..vals.len()].copy_from_slice(&vals);
    let want: [i8; 14] = [127, 0, 2, 2, 0, -2, -2, 4, -4, 126, -126, 0, 4, 6];
    let mut q0 = [0u8; 34];
    quant::quantize_row_q8_0_with(Path::detect(), &x, &mut q0);
    let b = BlockQ8_0::read(&q0);
    assert_eq!(b.d, f16::from_f32(1.0));
    assert_eq!(&b.qs[..14], &want);
    let mut q1 = [0u8; 36];
    quant::quantize_row_q8_1_with(Path::detect(), &x, &mut q1);
    let b1 = BlockQ8_1::read(&q1);
    assert_eq!(b1.qs, b.qs);
    let sum: i32 = want.iter().map(|&v| v as i32).sum();
    assert_eq!(b1.s, f16::from_f32(sum as f32));

    // amax 63.5 -> id = 2: x = k/2 + 1/4 gives x * id = k + 1/2.
    let mut x = [0f32; 32];
    x[0] = -63.5;
    x[1] = 0.25; // 0.5 -> 0
    x[2] = 0.75; // 1.5 -> 2
    x[3] = 1.25; // 2.5 -> 2
    x[4] = -1.25; // -2.5 -> -2
    quant::quantize_row_q8_0_with(Path::detect(), &x, &mut q0);
    let b = BlockQ8_0::read(&q0);
    assert_eq!(&b.qs[..5], &[-127, 0, 2, 2, -2]);
    // d is amax / 127 = 0.5, stored as f16.
    assert_eq!(b.d, f16::from_f32(0.5));
}

#[test]
fn q8_1_sum_uses_unrounded_d() {
    // d = 1/127 is not representable in f16; s must be f16(d_f32 * Σq), not f16(f16(d) * Σq).
    let mut x = [0f32; 32];
    for (i, v) in x.iter_mut().enumerate() {
        *v = if i % 2 == 0 { 1.0 } else { 0.25 };
    }
    let mut q1 = [0u8; 36];
    quant::quantize_row_q8_1_with(Path::detect(), &x, &mut q1);
    let b = BlockQ8_1::read(&q1);
    let d = 1.0f32 / 127.0;
    let sum: i32 = b.qs.iter().map(|&v| v as i32).sum();
    assert_eq!(sum, 16 * 127 + 16 * 32);
    assert_eq!(b.s, f16::from_f32(d * sum as f32));
}

#[test]
fn q8_zero_block() {
    let x = [0f32; 64];
    let mut q1 = [0u8; 72];
    quant::quantize_row_q8_1_with(Path::detect(), &x, &mut q1);
    assert!(q1.iter().all(|&b| b == 0));
}

#[test]
fn q8_tiny_amax_saturates_like_ggml() {
    // 127 / amax overflows f32: ggml's cvtps_epi32 turns inf and NaN (0 * inf) into INT_MIN, which the
    // packs saturate to -128.
    let mut x = [0f32; 32];
    x[0] = 2e-37;
    x[1] = -1e-37;
    let mut q0 = [0u8; 34];
    quant::quantize_row_q8_0_with(Path::detect(), &x, &mut q0);
    let b = BlockQ8_0::read(&q0);
    assert!(b.qs.iter().all(|&q| q == -128), "{:?}", b.qs);
}

#[test]
fn q8_special_blocks_simd_equal_scalar() {
    let Some(p) = avx2() else { return };
    let mut blocks: Vec<[f32; 32]> = Vec::new();
    // Overflowing 127 / amax (inf, and NaN for 0 * inf), a NaN first, a NaN last, infinities, and
    // a sum of quants that overflows f16 for Q8_1's `s`.
    let mut b = [0f32; 32];
    b[0] = 2e-37;
    b[1] = -1e-37;
    blocks.push(b);
    let mut b = [1f32; 32];
    b[0] = f32::NAN;
    blocks.push(b);
    let mut b = [1f32; 32];
    b[31] = f32::from_bits(0xFFC1_2345);
    blocks.push(b);
    let mut b = [-2f32; 32];
    b[7] = f32::INFINITY;
    blocks.push(b);
    blocks.push([f32::MAX; 32]);
    blocks.push([3e4; 32]);
    blocks.push([-0.0; 32]);
    for b in &blocks {
        let mut s = [0u8; 36];
        let mut v = [0u8; 36];
        quant::quantize_row_q8_1_with(Path::Scalar, b, &mut s);
        quant::quantize_row_q8_1_with(p, b, &mut v);
        assert_eq!(s, v, "q8_1 of {b:?}");
        let (mut s, mut v) = ([0u8; 34], [0u8; 34]);
        quant::quantize_row_q8_0_with(Path::Scalar, b, &mut s);
        quant::quantize_row_q8_0_with(p, b, &mut v);
        assert_eq!(s, v, "q8_0 of {b:?}");
    }
    // The saturation cases really are exercised.
    let mut q = [0u8; 34];
    quant::quantize_row_q8_0_with(p, &blocks[0], &mut q);
    assert!(BlockQ8_0::read(&q).qs.iter().all(|&v| v == -128));
}

#[test]
fn bf16_conversion_matches_ggml_formula() {
    let cases = [
        (1.0f32, 0x3F80u16),
        (f32::from_bits(0x3F80_8000), 0x3F80), // tie, even stays
        (f32::from_bits(0x3F81_8000), 0x3F82), // tie, odd rounds up
        (f32::from_bits(0x3F80_8001), 0x3F81),
        (f32::INFINITY, 0x7F80),
        (f32::MAX, 0x7F80), // rounds to inf
        (-0.0, 0x8000),
    ];
    for (x, want) in cases {
        assert_eq!(quant::f32_to_bf16(x), want, "{x:e}");
    }
    // Signalling NaN is made quiet.
    assert_eq!(quant::f32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
    assert_eq!(quant::f32_to_f16_ggml(f32::NAN), 0x7E00);
}

fn naive_dequant(ty: GgmlType, src: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            src.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        ),
        GgmlType::F16 => out.extend(
            src.chunks(2)
                .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            src.chunks(2)
                .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32()),
        ),
        GgmlType::Q4_0 => {
            for c in src.chunks(18) {
                let b = BlockQ4_0::read(c);
                out.extend((0..32).map(|i| (b.nibble(i) as f32 - 8.0) * b.d.to_f32()));
            }
        }
        GgmlType::Q4_1 => {
            for c in src.chunks(20) {
                let b = BlockQ4_1::read(c);
                out.extend((0..32).map(|i| b.nibble(i) as f32 * b.d.to_f32() + b.m.to_f32()));
            }
        }
        GgmlType::Q8_0 => {
            for c in src.chunks(34) {
                let b = BlockQ8_0::read(c);
                out.extend(b.qs.iter().map(|&q| q as f32 * b.d.to_f32()));
            }
        }
        GgmlType::Q5_0 => {
            for c in src.chunks(22) {
                let d = f16_of(c, 0) as f32;
                out.extend((0..32).map(|i| (q5(&c[2..6], &c[6..22], i) - 16) as f32 * d));
            }
        }
        GgmlType::Q5_1 => {
            for c in src.chunks(24) {
                let (d, m) = (f16_of(c, 0) as f32, f16_of(c, 2) as f32);
                out.extend((0..32).map(|i| q5(&c[4..8], &c[8..24], i) as f32 * d + m));
            }
        }
        GgmlType::Q8_1 => {
            for c in src.chunks(36) {
                let b = BlockQ8_1::read(c);
                out.extend(b.qs.iter().map(|&q| q as f32 * b.d.to_f32()));
            }
        }
        GgmlType::Q8_K => {
            for c in src.chunks(292) {
                let d = f32::from_le_bytes(c[..4].try_into().unwrap());
                out.extend(c[4..260].iter().map(|&q| d * q as i8 as f32));
            }
        }
        // Checked against gguf-py's dequantisers in `kquant_matmul.rs`.
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            unreachable!("{ty:?} is not in ALL_TYPES")
        }
    }
    out
}

const ALL_TYPES: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
];

const WEIGHT_TYPES: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// Naive lane-free dot product: Σ_blocks d_w * d_a * Σ q_w q_a (+ m_w * s_a), in f64, with the sum of
/// |terms| (per element) for a tolerance.
fn naive_quant_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> (f64, f64) {
    let (mut sum, mut mag) = (0f64, 0f64);
    for b in 0..n / QK {
        let (d, prods, extra): (f64, Vec<i32>, f64) = match ty {
            GgmlType::Q4_0 => {
                let wb = BlockQ4_0::read(&w[b * 18..]);
                let ab = BlockQ8_0::read(&a[b * 34..]);
                let p = (0..32).map(|i| (wb.nibble(i) as i32 - 8) * ab.qs[i] as i32);
                (wb.d.to_f64() * ab.d.to_f64(), p.collect(), 0.0)
            }
            GgmlType::Q4_1 => {
                let wb = BlockQ4_1::read(&w[b * 20..]);
                let ab = BlockQ8_1::read(&a[b * 36..]);
                let p = (0..32).map(|i| wb.nibble(i) as i32 * ab.qs[i] as i32);
                let extra = wb.m.to_f64() * ab.s.to_f64();
                (wb.d.to_f64() * ab.d.to_f64(), p.collect(), extra)
            }
            GgmlType::Q8_0 => {
                let wb = BlockQ8_0::read(&w[b * 34..]);
                let ab = BlockQ8_0::read(&a[b * 34..]);
                let p = (0..32).map(|i| wb.qs[i] as i32 * ab.qs[i] as i32);
                (wb.d.to_f64() * ab.d.to_f64(), p.collect(), 0.0)
            }
            GgmlType::Q5_0 => {
                let wb = &w[b * 22..(b + 1) * 22];
                let ab = BlockQ8_0::read(&a[b * 34..]);
                let p = (0..32).map(|i| (q5(&wb[2..6], &wb[6..22], i) - 16) * ab.qs[i] as i32);
                (f16_of(wb, 0) * ab.d.to_f64(), p.collect(), 0.0)
            }
            GgmlType::Q5_1 => {
                let wb = &w[b * 24..(b + 1) * 24];
                let ab = BlockQ8_1::read(&a[b * 36..]);
                let p = (0..32).map(|i| q5(&wb[4..8], &wb[8..24], i) * ab.qs[i] as i32);
                let extra = f16_of(wb, 2) * ab.s.to_f64();
                (f16_of(wb, 0) * ab.d.to_f64(), p.collect(), extra)
            }
            _ => unreachable!(),
        };
        let sumi: i32 = prods.iter().sum();
        sum += d * sumi as f64 + extra;
        mag += prods.iter().map(|&p| (d * p as f64).abs()).sum::<f64>() + extra.abs();
    }
    (sum, mag)
}

/// Element `i` of a 5-bit block as ggml's `block_q5_0` / `block_q5_1` define it: the nibble (byte `i`
/// low half for `i < 16`, byte `i - 16` high half otherwise) with bit `i` of `qh` as bit 4.
fn q5(qh: &[u8], qs: &[u8], i: usize) -> i32 {
    let nib = if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 };
    let hi = (u32::from_le_bytes(qh.try_into().unwrap()) >> i) & 1;
    nib as i32 | (hi as i32) << 4
}

fn f16_of(b: &[u8], at: usize) -> f64 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f64()
}

fn naive_float_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> (f64, f64) {
    let wv = naive_dequant(ty, w, n);
    let av = naive_dequant(ty, a, n);
    let terms = wv.iter().zip(&av).map(|(&x, &y)| x as f64 * y as f64);
    terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()))
}

/// Values that stress the quantiser: NaNs (with payloads and either sign), infinities, zeros of
/// either sign, subnormals, the f32 extremes, tiny maxima whose `127 / amax` overflows, and ties.
fn special_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        1 => Just(f32::NAN),
        1 => Just(-f32::NAN),
        1 => (1u32..0x40_0000).prop_map(|p| f32::from_bits(0x7F80_0000 | p)),
        1 => (1u32..0x40_0000).prop_map(|p| f32::from_bits(0xFFC0_0000 | p)),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => (1u32..0x80_0000).prop_map(f32::from_bits),
        1 => Just(f32::MAX),
        1 => Just(f32::MIN),
        1 => Just(f32::MIN_POSITIVE),
        1 => prop::sample::select(vec![2e-37f32, -1e-37, 3e-39, 1e38, -3e38]),
        2 => (-127i32..127).prop_map(|k| k as f32 + 0.5),
        4 => -1e3f32..1e3,
    ]
}

/// The AVX2 quantisers write exactly the bytes of the scalar ones (Q8_0 and Q8_1).
fn quantize_paths_agree(x: &[f32]) -> Result<(), TestCaseError> {
    let Some(p) = avx2() else { return Ok(()) };
    let n = x.len();
    let mut s0 = vec![0u8; n / QK * BlockQ8_0::BYTES];
    let mut v0 = vec![0xAAu8; s0.len()];
    quant::quantize_row_q8_0_with(Path::Scalar, x, &mut s0);
    quant::quantize_row_q8_0_with(p, x, &mut v0);
    prop_assert_eq!(&s0, &v0, "q8_0 of {:?}", x);
    let mut s1 = vec![0u8; n / QK * BlockQ8_1::BYTES];
    let mut v1 = vec![0xAAu8; s1.len()];
    quant::quantize_row_q8_1_with(Path::Scalar, x, &mut s1);
    quant::quantize_row_q8_1_with(p, x, &mut v1);
    prop_assert_eq!(&s1, &v1, "q8_1 of {:?}", x);
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
        let mut a = vec![0u8; ty.row_bytes(n).unwrap()];
        let mut b = vec![0xAAu8; a.len()];
        quant::quantize_activation_row_with(Path::Scalar, ty, x, &mut a);
        quant::quantize_activation_row_with(p, ty, x, &mut b);
        prop_assert_eq!(&a, &b, "{:?} activation row", ty);
    }
    Ok(())
}

fn avx2() -> Option<Path> {
    simd::avx2_available().then_some(Path::Avx2)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn quantize_q8_0_matches_naive(x in row_strategy(20)) {
        prop_assert_eq!(quantized(GgmlType::Q8_0, &x), naive_quantize_q8_0(&x));
    }

    #[test]
    fn quantize_q8_1_matches_naive(x in row_strategy(20)) {
        prop_assert_eq!(quantized(GgmlType::Q8_1, &x), naive_quantize_q8_1(&x));
    }

    #[test]
    fn quantize_simd_equals_scalar(x in row_strategy(20)) {
        quantize_paths_agree(&x)?;
    }

    #[test]
    fn quantize_simd_equals_scalar_on_special_values(
        x in prop::collection::vec(special_value(), 32..=96),
    ) {
        let n = x.len() / QK * QK;
        quantize_paths_agree(&x[..n])?;
    }

    #[test]
    fn q8_roundtrip_error_is_half_a_step(x in block_strategy()) {
        let q = quantized(GgmlType::Q8_0, &x);
        let mut y = [0f32; 32];
        quant::dequantize_row(GgmlType::Q8_0, &q, &mut y);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = amax / 127.0;
        let d16 = BlockQ8_0::read(&q).d.to_f32();
        // Half a step, plus up to 127 times the f16 rounding error of d (d may even round to 0).
        let bound = (0.5 * step + 127.0 * (step - d16).abs()) * (1.0 + 1e-5);
        for (a, b) in x.iter().zip(&y) {
            prop_assert!((a - b).abs() <= bound, "{a} vs {b}, step {step}, d16 {d16}");
        }
    }

    #[test]
    fn dequantize_matches_naive(nb in 1usize..20, seed in any::<u64>()) {
        for ty in ALL_TYPES {
            let n = nb * QK;
            let w = random_weights(ty, 1, n, seed);
            let mut y = vec![0f32; n];
            quant::dequantize_row(ty, &w, &mut y);
            let want = naive_dequant(ty, &w, n);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                prop_assert_eq!(a.to_bits(), b.to_bits(), "{:?} element {}: {} vs {}", ty, i, a, b);
            }
        }
    }

    #[test]
    fn block_lane_sums_are_exact(seed in any::<u64>(), x in block_strategy()) {
        // Activations from the quantiser are in -127..=127, so the sign trick is exact.
        let a0 = quantized(GgmlType::Q8_0, &x);
        let a1 = quantized(GgmlType::Q8_1, &x);
        let ab0 = BlockQ8_0::read(&a0);
        let ab1 = BlockQ8_1::read(&a1);
        let w40 = random_weights(GgmlType::Q4_0, 1, 32, seed);
        let w41 = random_weights(GgmlType::Q4_1, 1, 32, seed ^ 1);
        let w80 = random_weights(GgmlType::Q8_0, 1, 32, seed ^ 2);
        let (b40, b41, b80) = (BlockQ4_0::read(&w40), BlockQ4_1::read(&w41), BlockQ8_0::read(&w80));
        let l40 = scalar::block_lanes_q4_0_q8_0(&w40, &a0);
        let l41 = scalar::block_lanes_q4_1_q8_1(&w41, &a1);
        let l80 = scalar::block_lanes_q8_0_q8_0(&w80, &a0);
        for l in 0..8 {
            let e = 4 * l..4 * l + 4;
            prop_assert_eq!(l40[l], e.clone().map(|i| (b40.nibble(i) as i32 - 8) * ab0.qs[i] as i32).sum::<i32>());
            prop_assert_eq!(l41[l], e.clone().map(|i| b41.nibble(i) as i32 * ab1.qs[i] as i32).sum::<i32>());
            prop_assert_eq!(l80[l], e.map(|i| b80.qs[i] as i32 * ab0.qs[i] as i32).sum::<i32>());
        }
    }

    #[test]
    fn quant_dots_simd_equal_scalar_and_naive(x in row_strategy(20), seed in any::<u64>()) {
        let n = x.len();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0] {
            let w = random_weights(ty, 1, n, seed);
            let a = quantized(ty.vec_dot_type().unwrap(), &x);
            let s = quant::vec_dot_with(Path::Scalar, ty, n, &w, &a);
            if let Some(p) = avx2() {
                let v = quant::vec_dot_with(p, ty, n, &w, &a);
                prop_assert_eq!(s.to_bits(), v.to_bits(), "{:?}: scalar {} vs avx2 {}", ty, s, v);
            }
            let (want, mag) = naive_quant_dot(ty, n, &w, &a);
            if mag.is_finite() && mag < f32::MAX as f64 {
                prop_assert!((s as f64 - want).abs() <= 1e-6 * mag + 1e-30, "{:?}: {} vs {} (mag {})", ty, s, want, mag);
            } else {
                // Q8_1's f16 `s` overflows when a block's Σx exceeds 65504, as in ggml.
                prop_assert!(!s.is_finite(), "{:?}: {} vs {}", ty, s, want);
            }
        }
    }

    #[test]
    fn float_dots_simd_equal_scalar_and_naive(n in 1usize..700, seed in any::<u64>()) {
        let mut r = Rng(seed);
        let x: Vec<f32> = (0..n).map(|_| r.unit() * 3.0).collect();
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let w = if ty == GgmlType::F32 {
                random_weights(ty, 1, n, seed ^ 7)
            } else {
                random_weights(ty, 1, n, seed ^ 9)
            };
            let a = quantized(ty, &x);
            let s = quant::vec_dot_with(Path::Scalar, ty, n, &w, &a);
            if let Some(p) = avx2() {
                let v = quant::vec_dot_with(p, ty, n, &w, &a);
                prop_assert_eq!(s.to_bits(), v.to_bits(), "{:?}: scalar {} vs avx2 {}", ty, s, v);
            }
            let (want, mag) = naive_float_dot(ty, n, &w, &a);
            prop_assert!((s as f64 - want).abs() <= 1e-6 * mag + 1e-30, "{:?}: {} vs {} (mag {})", ty, s, want, mag);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn typed_avx2_entry_points_agree(nb in 1usize..20, seed in any::<u64>()) {
        prop_assume!(simd::avx2_available());
        let n = nb * QK;
        let x = common::random_activations(1, n, seed);
        let a0 = quantized(GgmlType::Q8_0, &x);
        let a1 = quantized(GgmlType::Q8_1, &x);
        let w40 = random_weights(GgmlType::Q4_0, 1, n, seed);
        let w41 = random_weights(GgmlType::Q4_1, 1, n, seed);
        let w80 = random_weights(GgmlType::Q8_0, 1, n, seed);
        prop_assert_eq!(quant::avx2::dot_q4_0_q8_0(n, &w40, &a0).to_bits(), scalar::dot_q4_0_q8_0(n, &w40, &a0).to_bits());
        prop_assert_eq!(quant::avx2::dot_q4_1_q8_1(n, &w41, &a1).to_bits(), scalar::dot_q4_1_q8_1(n, &w41, &a1).to_bits());
        prop_assert_eq!(quant::avx2::dot_q8_0_q8_0(n, &w80, &a0).to_bits(), scalar::dot_q8_0_q8_0(n, &w80, &a0).to_bits());
    }
}

#[test]
fn q8_0_weights_with_minus_128_and_wrapped_activation() {
    // ggml's sign trick wraps -(-128): a weight < 0 against an activation of -128 contributes
    // -128 * |w| instead of +128 * |w|. Both paths must reproduce it.
    let mut w = [0u8; 34];
    let mut a = [0u8; 34];
    BlockQ8_0 {
        d: f16::ONE,
        qs: std::array::from_fn(|i| if i % 2 == 0 { -128 } else { -3 }),
    }
    .write(&mut w);
    BlockQ8_0 {
        d: f16::ONE,
        qs: std::array::from_fn(|i| if i < 16 { -128 } else { 127 }),
    }
    .write(&mut a);
    let lanes = scalar::block_lanes_q8_0_q8_0(&w, &a);
    // elements 0..16: w = -128/-3 against a = -128 -> -(128*128) and -(3*128)
    assert_eq!(lanes[0], 2 * (-128 * 128) + 2 * (-3 * 128));
    // elements 16..32: against 127 -> exact products
    assert_eq!(lanes[4], 2 * (-128 * 127) + 2 * (-3 * 127));
    let s = quant::vec_dot_with(Path::Scalar, GgmlType::Q8_0, 32, &w, &a);
    if let Some(p) = avx2() {
        let v = quant::vec_dot_with(p, GgmlType::Q8_0, 32, &w, &a);
        assert_eq!(s.to_bits(), v.to_bits());
    }
    assert_eq!(s, lanes.iter().sum::<i32>() as f32);
}

#[test]
fn every_weight_type_has_a_vec_dot_type() {
    for ty in WEIGHT_TYPES {
        assert!(ty.vec_dot_type().is_some());
    }
    assert_eq!(GgmlType::Q8_1.vec_dot_type(), None);
    assert_eq!(GgmlType::Q8_K.vec_dot_type(), None);
    assert_eq!(GgmlType::Q4_1.vec_dot_type(), Some(GgmlType::Q8_1));
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        assert_eq!(ty.vec_dot_type(), Some(GgmlType::Q8_K));
    }
}

#[test]
fn ggml_ids_sizes_and_names() {
    // (type, ggml id, block size, block bytes, name) as in ggml's type traits.
    let table = [
        (GgmlType::F32, 0, 1, 4, "f32"),
        (GgmlType::F16, 1, 1, 2, "f16"),
        (GgmlType::Q4_0, 2, 32, 18, "q4_0"),
        (GgmlType::Q4_1, 3, 32, 20, "q4_1"),
        (GgmlType::Q5_0, 6, 32, 22, "q5_0"),
        (GgmlType::Q5_1, 7, 32, 24, "q5_1"),
        (GgmlType::Q8_0, 8, 32, 34, "q8_0"),
        (GgmlType::Q8_1, 9, 32, 36, "q8_1"),
        (GgmlType::Q4_K, 12, 256, 144, "q4_K"),
        (GgmlType::Q5_K, 13, 256, 176, "q5_K"),
        (GgmlType::Q6_K, 14, 256, 210, "q6_K"),
        (GgmlType::Q8_K, 15, 256, 292, "q8_K"),
        (GgmlType::BF16, 30, 1, 2, "bf16"),
    ];
    for (ty, id, bs, bytes, name) in table {
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert_eq!(ty.id(), id);
        assert_eq!(ty.block_size(), bs, "{ty:?}");
        assert_eq!(ty.type_size(), bytes, "{ty:?}");
        assert_eq!(ty.name(), name);
        assert_eq!(quant::ggml_type_name(id), name);
    }
    assert_eq!(GgmlType::Q4_K.row_bytes(512), Some(288));
    assert_eq!(GgmlType::Q6_K.row_bytes(288), None);
    for id in [4, 5, 10, 11, 16, 20, 31, 1000] {
        assert_eq!(GgmlType::from_id(id), None, "id {id}");
    }
}
