//! Attention of one head: the AVX2 path equals the scalar reference bit for bit, and both agree with a
//! naive f64 computation on the same f16-rounded inputs.

use ep_kernels::attention::{attend_head, HeadScratch, KvView};
use ep_kernels::simd::Path;
use half::f16;
use proptest::prelude::*;

/// Naive attention in f64 over the f16 inputs (Q, K, V already f16); returns (output, lse).
fn naive(q: &[f16], kv: &KvView<'_>, hd: usize, scale: f32) -> (Vec<f64>, f64) {
    let s: Vec<f64> = (0..kv.n_keys)
        .map(|j| {
            let k = &kv.k[j * kv.stride + kv.off..][..hd];
            q.iter()
                .zip(k)
                .map(|(a, b)| a.to_f64() * b.to_f64())
                .sum::<f64>()
                * scale as f64
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
    let mut o = vec![0f64; hd];
    for (j, x) in s.iter().enumerate() {
        let p = (x - m).exp() / z;
        for (d, od) in o.iter_mut().enumerate() {
            *od += p * kv.v[j * kv.stride + kv.off + d].to_f64();
        }
    }
    (o, m + z.ln())
}

fn data(n: usize, seed: u64, amp: f32) -> Vec<f16> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * amp)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn avx2_equals_scalar_and_both_match_f64(
        n_keys in 1usize..300, hd8 in 1usize..17, heads in 1usize..4, seed in any::<u64>(), amp in 0.1f32..64.0
    ) {
        let hd = hd8 * 8;
        let stride = heads * hd;
        let off = (heads - 1) * hd;
        let k = data(n_keys * stride, seed, amp);
        let v = data(n_keys * stride, seed ^ 0xabc, 2.0);
        let q = data(hd, seed ^ 0x123, amp);
        let kv = KvView { k: &k, v: &v, n_keys, stride, off };
        let scale = 1.0 / (hd as f32).sqrt();
        let mut s1 = HeadScratch::default();
        let mut ref_out = vec![0f32; hd];
        let ref_lse = attend_head(Path::Scalar, &q, kv, scale, &mut s1, &mut ref_out);
        let mut out = vec![0f32; hd];
        // On a CPU without AVX2, `Path::Avx2` runs the scalar code.
        let lse = attend_head(Path::Avx2, &q, kv, scale, &mut HeadScratch::default(), &mut out);
        prop_assert_eq!(lse.to_bits(), ref_lse.to_bits());
        for (a, b) in out.iter().zip(&ref_out) {
            prop_assert_eq!(a.to_bits(), b.to_bits());
        }
        let (o64, lse64) = naive(&q, &kv, hd, scale);
        let max_ref = o64.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
        for (a, b) in out.iter().zip(&o64) {
            // P is rounded to f16 before P·V (as llama.cpp does): relative error up to 2^-11 per term.
            prop_assert!((*a as f64 - b).abs() <= 2e-3 * max_ref, "{} vs {}", a, b);
        }
        prop_assert!((lse as f64 - lse64).abs() <= 1e-4 * lse64.abs().max(1.0));
    }
}

#[test]
fn explicit_paths_are_equal() {
    let hd = 64;
    let k = data(40 * hd, 1, 3.0);
    let v = data(40 * hd, 2, 3.0);
    let q = data(hd, 3, 3.0);
    let kv = KvView {
        k: &k,
        v: &v,
        n_keys: 40,
        stride: hd,
        off: 0,
    };
    let mut a = vec![0f32; hd];
    let mut b = vec![0f32; hd];
    let mut c = vec![0f32; hd];
    let la = attend_head(
        Path::detect(),
        &q,
        kv,
        0.125,
        &mut HeadScratch::default(),
        &mut a,
    );
    let lb = attend_head(
        Path::Scalar,
        &q,
        kv,
        0.125,
        &mut HeadScratch::default(),
        &mut b,
    );
    let lc = attend_head(
        Path::Avx2,
        &q,
        kv,
        0.125,
        &mut HeadScratch::default(),
        &mut c,
    );
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!([la.to_bits(), lb.to_bits()], [lc.to_bits(); 2]);
    assert!(a.iter().all(|x| x.is_finite()));
}
