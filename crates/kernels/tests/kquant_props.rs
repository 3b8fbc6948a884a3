//! Property tests of the K-quant kernels: the scalar and AVX2 paths agree bit for bit (dot products
//! over 1..=8 super-blocks, Q8_K quantisation), whatever the bytes; and the quantised dot product is
//! within rounding of the f64 dot product of the dequantised rows.

use ep_kernels::kquant::{self, KType, Q8K_BYTES, QK_K};
use ep_kernels::simd::Path;
use half::f16;
use proptest::prelude::*;

fn ktype() -> impl Strategy<Value = KType> {
    prop_oneof![Just(KType::Q4K), Just(KType::Q5K), Just(KType::Q6K)]
}

/// Offsets of the f16 super-block scales in a block of `ty`.
fn scale_offsets(ty: KType) -> &'static [usize] {
    match ty {
        KType::Q4K | KType::Q5K => &[0, 2],
        KType::Q6K => &[208],
    }
}

/// Rewrites every f16 super-block scale of `w` to a finite normal value of moderate size (exponent
/// forced into 2^-10..2^5, sign and mantissa kept).
fn tame_scales(ty: KType, w: &mut [u8]) {
    for b in w.chunks_exact_mut(ty.type_size()) {
        for &o in scale_offsets(ty) {
            let h = u16::from_le_bytes([b[o], b[o + 1]]);
            let exp = ((h >> 10) & 31) % 16 + 5;
            let h = (h & 0x83ff) | (exp << 10);
            b[o..o + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
}

/// `nb` blocks of `ty`: arbitrary bytes.
fn weight_bytes(ty: KType, nb: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), nb * ty.type_size())
}

/// Activation floats: per 256-block, a scale in 1e-3..1e3 (or zero), with occasional outliers.
fn act_floats(nb: usize) -> impl Strategy<Value = Vec<f32>> {
    let block = (
        prop::collection::vec(-1.0f32..1.0, QK_K),
        prop_oneof![Just(0.0f32), 1e-3f32..1e3],
        prop::option::of((0usize..QK_K, -50.0f32..50.0)),
    )
        .prop_map(|(mut v, s, outlier)| {
            for x in &mut v {
                *x *= s;
            }
            if let Some((at, x)) = outlier {
                v[at] = x * s.max(1.0);
            }
            v
        });
    prop::collection::vec(block, nb).prop_map(|bs| bs.concat())
}

/// Any f32 bit pattern (NaNs, infinities, subnormals) mixed with ordinary values.
fn wild_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => -1.0f32..1.0,
        1 => any::<u32>().prop_map(f32::from_bits),
        1 => prop_oneof![
            Just(0.0f32),
            Just(-0.0),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(f32::NAN),
            Just(1e-38),
            Just(-3e-39),
            Just(f32::MAX),
        ],
    ]
}

fn q8k(x: &[f32]) -> Vec<u8> {
    let mut a = vec![0u8; x.len() / QK_K * Q8K_BYTES];
    kquant::quantize_row_q8_k_with(Path::Scalar, x, &mut a);
    a
}

/// Equal bits, or both NaN (NaN payloads are not part of the contract).
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn avx2() -> bool {
    Path::Avx2.is_available()
}

fn dot_both(ty: KType, n: usize, w: &[u8], a: &[u8]) -> (f32, f32) {
    (
        kquant::vec_dot_k_with(Path::Scalar, ty, n, w, a),
        kquant::vec_dot_k_with(Path::Avx2, ty, n, w, a),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Realistic rows: tamed weight scales, activations quantised from floats. Bit-identical.
    #[test]
    fn scalar_equals_avx2_quantised_activations(
        (ty, w, x) in (ktype(), 1usize..=8).prop_flat_map(|(ty, nb)| {
            (Just(ty), weight_bytes(ty, nb), act_floats(nb))
        })
    ) {
        prop_assume!(avx2());
        let mut w = w;
        tame_scales(ty, &mut w);
        let a = q8k(&x);
        let (s, v) = dot_both(ty, x.len(), &w, &a);
        prop_assert_eq!(s.to_bits(), v.to_bits(), "{}: scalar {:e} vs avx2 {:e}", ty.name(), s, v);
    }

    /// Arbitrary bytes on both sides (quants of -128, bsums that wrap in i16, any f16/f32 scales):
    /// still the same bits (or both NaN).
    #[test]
    fn scalar_equals_avx2_any_bytes(
        (ty, nb, w, a) in (ktype(), 1usize..=8).prop_flat_map(|(ty, nb)| {
            (Just(ty), Just(nb), weight_bytes(ty, nb), prop::collection::vec(any::<u8>(), nb * Q8K_BYTES))
        }),
        finite in any::<bool>(),
    ) {
        prop_assume!(avx2());
        let (mut w, mut a) = (w, a);
        if finite {
            tame_scales(ty, &mut w);
            for b in a.chunks_exact_mut(Q8K_BYTES) {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let d = if d.is_finite() { d.clamp(-1e3, 1e3) } else { 0.5 };
                b[..4].copy_from_slice(&d.to_le_bytes());
            }
        }
        let (s, v) = dot_both(ty, nb * QK_K, &w, &a);
        prop_assert!(same(s, v), "{}: scalar {:e} vs avx2 {:e}", ty.name(), s, v);
    }

    /// Q8_K quantisation: same bytes on both paths, for any floats (NaN, inf, subnormals included).
    #[test]
    fn q8k_scalar_equals_avx2(
        x in (1usize..=4).prop_flat_map(|nb| prop::collection::vec(wild_f32(), nb * QK_K)),
        scale in prop_oneof![Just(1.0f32), Just(1e-30f32), Just(1e30f32), Just(1e-38f32)],
    ) {
        prop_assume!(avx2());
        let x: Vec<f32> = x.iter().map(|v| v * scale).collect();
        let mut s = vec![0u8; x.len() / QK_K * Q8K_BYTES];
        let mut v = vec![0x55u8; s.len()];
        kquant::quantize_row_q8_k_with(Path::Scalar, &x, &mut s);
        kquant::quantize_row_q8_k_with(Path::Avx2, &x, &mut v);
        prop_assert_eq!(s, v);
    }

    /// The quantised dot product equals the f64 dot product of the dequantised rows, up to f32
    /// rounding (relative to the sum of the magnitudes of the terms, the mins terms included).
    #[test]
    fn dot_matches_dequantised_f64(
        (ty, w, x) in (ktype(), 1usize..=8).prop_flat_map(|(ty, nb)| {
            (Just(ty), weight_bytes(ty, nb), act_floats(nb))
        })
    ) {
        let mut w = w;
        tame_scales(ty, &mut w);
        let n = x.len();
        let a = q8k(&x);
        let mut wf = vec![0f32; n];
        kquant::dequantize_row_k(ty, &w, &mut wf);
        let mut exact = 0f64;
        let mut mag = 0f64;
        for (i, &wv) in wf.iter().enumerate() {
            let ab = &a[i / QK_K * Q8K_BYTES..];
            let da = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]) as f64;
            let av = da * ab[4 + i % QK_K] as i8 as f64;
            exact += wv as f64 * av;
            mag += (wv as f64 * av).abs() + weight_min_term(ty, &w, i).abs() * av.abs();
        }
        for path in [Path::Scalar, Path::Avx2] {
            if !path.is_available() {
                continue;
            }
            let got = kquant::vec_dot_k_with(path, ty, n, &w, &a) as f64;
            let tol = 1e-5 * mag + 1e-30;
            prop_assert!(
                (got - exact).abs() <= tol,
                "{} {:?}: {:e} vs f64 {:e} (tol {:e})", ty.name(), path, got, exact, tol
            );
        }
    }
}

/// `|dmin * m|` of element `i`'s sub-block (0 for Q6_K): the dmin part of the weight, which the
/// quantised dot product sums separately (so its magnitude counts in the rounding bound).
fn weight_min_term(ty: KType, w: &[u8], i: usize) -> f64 {
    if ty == KType::Q6K {
        return 0.0;
    }
    let b = &w[i / QK_K * ty.type_size()..];
    let dmin = f16::from_bits(u16::from_le_bytes([b[2], b[3]])).to_f64();
    let (_, m) = kquant::scalar::scales_mins_k4(&b[4..16]);
    dmin * m[i % QK_K / 32] as f64
}

/// Hand-made blocks: the Q8_K block layout and the value decoders agree with dequantisation.
#[test]
fn decoders_agree_with_dequantisation() {
    let mut w = vec![0u8; 210];
    for (i, b) in w.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    // Q4_K: d = 1, dmin = 0.5.
    let mut q4 = w[..144].to_vec();
    q4[0..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
    q4[2..4].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
    let mut y = vec![0f32; QK_K];
    kquant::dequantize_row_k(KType::Q4K, &q4, &mut y);
    let (sc, m) = kquant::scalar::scales_mins_k4(&q4[4..16]);
    for (e, &v) in y.iter().enumerate() {
        let want =
            sc[e / 32] as f32 * kquant::scalar::q4_k_quant(&q4, e) as f32 - 0.5 * m[e / 32] as f32;
        assert_eq!(v, want, "q4_K element {e}");
    }
    // Q6_K: d = 0.25.
    let mut q6 = w.clone();
    q6[208..210].copy_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
    kquant::dequantize_row_k(KType::Q6K, &q6, &mut y);
    for (e, &v) in y.iter().enumerate() {
        let q = kquant::scalar::q6_k_quant(&q6, e) as i32 - 32;
        let want = 0.25 * q6[192 + e / 16] as i8 as f32 * q as f32;
        assert_eq!(v, want, "q6_K element {e}");
    }
    // Q8_K: d = 1/iscale, bsums = group sums.
    let x: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 100.0) * 0.25).collect();
    let a = q8k(&x);
    let d = f32::from_le_bytes(a[..4].try_into().unwrap());
    assert_eq!(d, 1.0 / (-127.0 / 38.75)); // max |x| = 155 * 0.25, positive: d < 0
    for g in 0..16 {
        let s: i32 = a[4 + 16 * g..20 + 16 * g]
            .iter()
            .map(|&q| q as i8 as i32)
            .sum();
        assert_eq!(
            i16::from_le_bytes([a[260 + 2 * g], a[261 + 2 * g]]) as i32,
            s
        );
    }
}
