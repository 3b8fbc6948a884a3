//! Paged grouped attention: `Path::Avx2` (the scalar code where the CPU lacks AVX2) equals
//! `Path::Scalar` bit for bit for every KV dtype; with F16 KV each head equals `attend_head` over
//! the contiguous keys bit for bit, whatever the chunking; every dtype agrees with a naive f64
//! computation on the same rounded inputs; the multi-row variant equals per-row calls.

use ep_kernels::attention::{attend_head, HeadScratch, KvView};
use ep_kernels::paged::{attend_group, attend_rows_group, GroupScratch, KvChunk, KvDtype, KvRows};
use ep_kernels::simd::Path;
use half::f16;
use proptest::prelude::*;

mod common;

use common::{data, Buf};

/// A paged store for one layer: blocks of `[cap × kv_width]` K and V rows, the chunk `i` using rows
/// `first[i]..first[i] + lens[i]` of block `i` for KV head `kvh`.
struct Store {
    k: Vec<Buf>,
    v: Vec<Buf>,
    first: Vec<usize>,
    lens: Vec<usize>,
    stride: usize,
    off: usize,
    hd: usize,
}

impl Store {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dtype: KvDtype,
        lens: &[usize],
        hd: usize,
        n_kv: usize,
        kvh: usize,
        seed: u64,
        amp: f32,
    ) -> Store {
        let stride = n_kv * hd;
        let (mut k, mut v, mut first) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &n) in lens.iter().enumerate() {
            // Some slack rows before and after the run, as in a partly filled block.
            let f = (seed as usize + i) % 3;
            let cap = f + n + (i % 2);
            let s = seed.wrapping_add(i as u64 * 7919);
            k.push(Buf::new(dtype, &data(cap * stride, s, amp)));
            v.push(Buf::new(dtype, &data(cap * stride, s ^ 0xabc, 2.0)));
            first.push(f);
        }
        Store {
            k,
            v,
            first,
            lens: lens.to_vec(),
            stride,
            off: kvh * hd,
            hd,
        }
    }

    fn chunks(&self) -> Vec<KvChunk<'_>> {
        (0..self.lens.len())
            .map(|i| KvChunk {
                k: self.k[i].rows(self.first[i] * self.stride),
                v: self.v[i].rows(self.first[i] * self.stride),
                n_keys: self.lens[i],
                stride: self.stride,
                off: self.off,
            })
            .collect()
    }

    /// Key (or value) `j` of the whole sequence, widened.
    fn row(&self, j: usize, value: bool) -> Vec<f32> {
        let mut j = j;
        for i in 0..self.lens.len() {
            if j < self.lens[i] {
                let b = if value { &self.v[i] } else { &self.k[i] };
                let start = (self.first[i] + j) * self.stride + self.off;
                return (0..self.hd).map(|d| b.get(start + d)).collect();
            }
            j -= self.lens[i];
        }
        panic!("key out of range")
    }
}

/// Naive attention in f64 on the rounded query and the stored K/V (probabilities not rounded).
fn naive(q: &[f32], store: &Store, n: usize, scale: f32) -> (Vec<f64>, f64) {
    let hd = store.hd;
    let s: Vec<f64> = (0..n)
        .map(|j| {
            let k = store.row(j, false);
            q.iter()
                .zip(&k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale as f64
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
    let mut o = vec![0f64; hd];
    for (j, x) in s.iter().enumerate() {
        let p = (x - m).exp() / z;
        for (od, vd) in o.iter_mut().zip(store.row(j, true)) {
            *od += p * vd as f64;
        }
    }
    (o, m + z.ln())
}

/// Chunk lengths `1..=40` summing to `total` (the last one cut short).
fn chunking(total: usize, raw: &[usize]) -> Vec<usize> {
    let mut lens = Vec::new();
    let mut left = total;
    let mut it = raw.iter().cycle();
    while left > 0 {
        let n = (*it.next().unwrap()).min(left);
        lens.push(n);
        left -= n;
    }
    lens
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

const DTYPES: [KvDtype; 3] = [KvDtype::F32, KvDtype::F16, KvDtype::Bf16];

fn head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(8usize),
        Just(16),
        Just(24),
        Just(32),
        Just(64),
        Just(128)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn group_matches_scalar_attend_head_and_f64(
        total in 0usize..=300,
        raw in prop::collection::vec(1usize..=40, 1..12),
        hd in head_dim(),
        g in prop::sample::select(vec![1usize, 3, 4]),
        kv in (1usize..=3).prop_flat_map(|n| (Just(n), 0..n)),
        seed in any::<u64>(),
        amp in 0.1f32..4.0,
    ) {
        let (n_kv, kvh) = kv;
        let lens = chunking(total, &raw);
        let scale = 1.0 / (hd as f32).sqrt();
        let q = data(g * hd, seed ^ 0x123, amp);
        for dtype in DTYPES {
            let store = Store::new(dtype, &lens, hd, n_kv, kvh, seed, amp);
            let chunks = store.chunks();
            let (mut out, mut lse) = (vec![0f32; g * hd], vec![0f32; g]);
            let (mut sout, mut slse) = (vec![0f32; g * hd], vec![0f32; g]);
            let mut scratch = GroupScratch::default();
            attend_group(Path::Avx2, &q, hd, &chunks, scale, &mut scratch, &mut out, &mut lse);
            attend_group(Path::Scalar, &q, hd, &chunks, scale, &mut scratch, &mut sout, &mut slse);
            // (a) AVX2 path == scalar path.
            prop_assert_eq!(bits(&out), bits(&sout), "{} output", dtype);
            prop_assert_eq!(bits(&lse), bits(&slse), "{} lse", dtype);

            if total == 0 {
                // (d) no keys.
                prop_assert!(out.iter().all(|&x| x.to_bits() == 0));
                prop_assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
                continue;
            }

            // (b) F16: attend_head per head over the contiguous keys.
            if dtype == KvDtype::F16 {
                let stride = store.stride;
                let mut k = vec![f16::ZERO; total * stride];
                let mut v = vec![f16::ZERO; total * stride];
                for j in 0..total {
                    let at = j * stride + store.off;
                    for (d, (kx, vx)) in store.row(j, false).iter().zip(store.row(j, true)).enumerate() {
                        k[at + d] = f16::from_f32(*kx);
                        v[at + d] = f16::from_f32(vx);
                    }
                }
                let view = KvView { k: &k, v: &v, n_keys: total, stride, off: store.off };
                let mut hs = HeadScratch::default();
                for h in 0..g {
                    let q16: Vec<f16> = q[h * hd..][..hd].iter().map(|&x| f16::from_f32(x)).collect();
                    let mut o = vec![0f32; hd];
                    let l = attend_head(Path::Avx2, &q16, view, scale, &mut hs, &mut o);
                    prop_assert_eq!(bits(&o), bits(&out[h * hd..][..hd]), "head {} output", h);
                    prop_assert_eq!(l.to_bits(), lse[h].to_bits(), "head {} lse", h);
                    let l = attend_head(Path::Scalar, &q16, view, scale, &mut hs, &mut o);
                    prop_assert_eq!(bits(&o), bits(&sout[h * hd..][..hd]), "head {} scalar output", h);
                    prop_assert_eq!(l.to_bits(), slse[h].to_bits(), "head {} scalar lse", h);
                }
            }

            // (c) f64 on the rounded query and stored K/V. The output may differ from it by the
            // rounding of P to the KV dtype (relative 2^-11 for f16, 2^-8 for bf16, per term) plus
            // f32 accumulation: the bound is u·Σ_j p_j·|v_jd| + 1e-5·max|o_ref|.
            let u = match dtype {
                KvDtype::F32 => 0.0,
                KvDtype::F16 => 1.0 / 2048.0,
                KvDtype::Bf16 => 1.0 / 256.0,
            };
            for h in 0..g {
                let qr: Vec<f32> = q[h * hd..][..hd].iter().map(|&x| dtype.round(x)).collect();
                let (o64, lse64) = naive(&qr, &store, total, scale);
                let max_ref = o64.iter().fold(0f64, |m, x| m.max(x.abs()));
                // Σ_j p_j |v_jd| ≤ max_j |v_jd|: a cheap upper bound for the P-rounding term.
                let vmax: Vec<f64> = (0..hd)
                    .map(|d| (0..total).map(|j| (store.row(j, true)[d] as f64).abs()).fold(0f64, f64::max))
                    .collect();
                for d in 0..hd {
                    let got = out[h * hd + d] as f64;
                    let tol = u * vmax[d] + 1e-5 * max_ref.max(1e-30);
                    prop_assert!(
                        (got - o64[d]).abs() <= tol,
                        "{} head {} dim {}: {} vs {} (tol {})", dtype, h, d, got, o64[d], tol
                    );
                }
                prop_assert!(
                    (lse[h] as f64 - lse64).abs() <= 1e-5,
                    "{} head {} lse {} vs {}", dtype, h, lse[h], lse64
                );
            }
        }
    }

    #[test]
    fn rows_equal_per_row_calls(
        total in 0usize..=120,
        raw in prop::collection::vec(1usize..=40, 1..8),
        hd in head_dim(),
        g in prop::sample::select(vec![1usize, 3, 4]),
        rows in prop::collection::vec(0usize..=1000, 1..6),
        seed in any::<u64>(),
    ) {
        let lens = chunking(total, &raw);
        let n_keys: Vec<usize> = rows.iter().map(|&x| x % (total + 1)).collect();
        let r = n_keys.len();
        let w = g * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let q = data(r * w, seed ^ 0x77, 2.0);
        for dtype in DTYPES {
            let store = Store::new(dtype, &lens, hd, 2, 1, seed, 2.0);
            let chunks = store.chunks();
            let mut scratch = GroupScratch::default();
            let (mut out, mut lse) = (vec![0f32; r * w], vec![0f32; r * g]);
            attend_rows_group(Path::Avx2, &q, &n_keys, hd, &chunks, scale, &mut scratch, &mut out, &mut lse);
            let (mut sout, mut slse) = (vec![0f32; r * w], vec![0f32; r * g]);
            attend_rows_group(Path::Scalar, &q, &n_keys, hd, &chunks, scale, &mut scratch, &mut sout, &mut slse);
            prop_assert_eq!(bits(&out), bits(&sout), "{} rows output", dtype);
            prop_assert_eq!(bits(&lse), bits(&slse), "{} rows lse", dtype);
            for (t, &n) in n_keys.iter().enumerate() {
                // The chunks cut to the first `n` keys.
                let mut cut = Vec::new();
                let mut left = n;
                for c in &chunks {
                    if left == 0 {
                        break;
                    }
                    let take = c.n_keys.min(left);
                    cut.push(KvChunk { n_keys: take, ..*c });
                    left -= take;
                }
                let (mut o, mut l) = (vec![0f32; w], vec![0f32; g]);
                attend_group(Path::Avx2, &q[t * w..][..w], hd, &cut, scale, &mut scratch, &mut o, &mut l);
                prop_assert_eq!(bits(&o), bits(&out[t * w..][..w]), "{} row {} output", dtype, t);
                prop_assert_eq!(bits(&l), bits(&lse[t * g..][..g]), "{} row {} lse", dtype, t);
            }
        }
    }
}

#[test]
fn no_keys_give_zero_and_minus_infinity() {
    let hd = 64;
    let q = data(3 * hd, 5, 1.0);
    let k = vec![f16::ZERO; 4 * hd];
    let empty = KvChunk {
        k: KvRows::F16(&k),
        v: KvRows::F16(&k),
        n_keys: 0,
        stride: hd,
        off: 0,
    };
    for chunks in [&[][..], &[empty, empty][..]] {
        for path in [Path::Avx2, Path::Scalar] {
            let (mut out, mut lse) = (vec![1f32; 3 * hd], vec![0f32; 3]);
            let mut s = GroupScratch::default();
            attend_group(path, &q, hd, chunks, 0.125, &mut s, &mut out, &mut lse);
            assert!(out.iter().all(|&x| x.to_bits() == 0), "{path:?}");
            assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY), "{path:?}");
        }
    }
}

#[test]
fn large_group_splits_into_passes() {
    // 9 query heads on one KV head (passes of 3), and 7 (4 + 3), against per-head calls.
    let hd = 64;
    let store = Store::new(KvDtype::F16, &[16, 16, 5, 16, 9], hd, 1, 0, 11, 3.0);
    let chunks = store.chunks();
    for g in [7usize, 9] {
        let q = data(g * hd, 3, 3.0);
        let (mut out, mut lse) = (vec![0f32; g * hd], vec![0f32; g]);
        let mut s = GroupScratch::default();
        attend_group(
            Path::Avx2,
            &q,
            hd,
            &chunks,
            0.125,
            &mut s,
            &mut out,
            &mut lse,
        );
        for h in 0..g {
            let (mut o, mut l) = (vec![0f32; hd], [0f32]);
            attend_group(
                Path::Avx2,
                &q[h * hd..][..hd],
                hd,
                &chunks,
                0.125,
                &mut s,
                &mut o,
                &mut l,
            );
            assert_eq!(bits(&o), bits(&out[h * hd..][..hd]));
            assert_eq!(l[0].to_bits(), lse[h].to_bits());
        }
    }
}

#[test]
#[should_panic(expected = "KV chunk 1 out of bounds")]
fn malformed_chunk_panics() {
    let hd = 8;
    let k = vec![0f32; 4 * hd];
    let ok = KvChunk {
        k: KvRows::F32(&k),
        v: KvRows::F32(&k),
        n_keys: 4,
        stride: hd,
        off: 0,
    };
    let bad = KvChunk { n_keys: 5, ..ok };
    let (mut out, mut lse) = (vec![0f32; hd], vec![0f32; 1]);
    attend_group(
        Path::Avx2,
        &[0.0; 8],
        hd,
        &[ok, bad],
        1.0,
        &mut GroupScratch::default(),
        &mut out,
        &mut lse,
    );
}

#[test]
#[should_panic(expected = "KV chunk 1: K is f16")]
fn mixed_dtypes_panic() {
    let hd = 8;
    let k32 = vec![0f32; hd];
    let k16 = vec![f16::ZERO; hd];
    let a = KvChunk {
        k: KvRows::F32(&k32),
        v: KvRows::F32(&k32),
        n_keys: 1,
        stride: hd,
        off: 0,
    };
    let b = KvChunk {
        k: KvRows::F16(&k16),
        v: KvRows::F16(&k16),
        ..a
    };
    let (mut out, mut lse) = (vec![0f32; hd], vec![0f32; 1]);
    attend_group(
        Path::Avx2,
        &[0.0; 8],
        hd,
        &[a, b],
        1.0,
        &mut GroupScratch::default(),
        &mut out,
        &mut lse,
    );
}

#[test]
fn dtype_names_round_trip() {
    for d in DTYPES {
        assert_eq!(d.name().parse::<KvDtype>().unwrap(), d);
        assert_eq!(d.to_string(), d.name());
    }
    assert_eq!("BF16".parse::<KvDtype>().unwrap(), KvDtype::Bf16);
    assert!("q8_0".parse::<KvDtype>().is_err());
    assert_eq!(
        [KvDtype::F32, KvDtype::F16, KvDtype::Bf16].map(KvDtype::bytes),
        [4, 2, 2]
    );
    assert_eq!(KvDtype::Bf16.round(1.0 + 1.0 / 256.0), 1.0); // a tie: to even
    assert_eq!(KvDtype::F16.round(1.0 + 1.0 / 2048.0), 1.0);
}
