//! Shared test helpers: input generators and naive references.
#![allow(dead_code)]

use ep_kernels::paged::{KvDtype, KvRows};
use ep_kernels::quant::GgmlType;
use half::{bf16, f16};
use proptest::prelude::*;

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (((self.next_u64() >> 40) as i32) - (1 << 23)) as f32 / 8_388_608.0
    }
    /// A finite, normal f16 scale of either sign, |v| in [2^-14, 2^2).
    pub fn f16_scale(&mut self) -> f16 {
        let sign = self.below(2) as u16;
        let exp = 1 + self.below(16) as u16;
        let man = self.below(1024) as u16;
        f16::from_bits((sign << 15) | (exp << 10) | man)
    }
}

/// Random weight rows of `ty` (`rows` x `cols`): valid finite scales, random quants / values.
pub fn random_weights(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let bytes = ty.row_bytes(cols).unwrap() * rows;
    let mut w = vec![0u8; bytes];
    match ty {
        GgmlType::F32 => {
            for c in w.chunks_exact_mut(4) {
                c.copy_from_slice(&(r.unit() * 2.0).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in w.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(r.unit() * 2.0).to_bits().to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in w.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(r.unit() * 2.0).to_bits().to_le_bytes());
            }
        }
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::Q8_1 => {
            let nscales = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1) {
                2
            } else {
                1
            };
            for b in w.chunks_exact_mut(ty.type_size()) {
                for s in 0..nscales {
                    b[2 * s..2 * s + 2].copy_from_slice(&r.f16_scale().to_bits().to_le_bytes());
                }
                for q in &mut b[2 * nscales..] {
                    *q = r.next_u64() as u8;
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            // Random bytes, then valid finite f16 super-block scales (`d`, `dmin` at 0 and 2 for
            // Q4_K/Q5_K; `d` at 208 for Q6_K).
            let offsets: &[usize] = if ty == GgmlType::Q6_K {
                &[208]
            } else {
                &[0, 2]
            };
            for b in w.chunks_exact_mut(ty.type_size()) {
                for q in b.iter_mut() {
                    *q = r.next_u64() as u8;
                }
                for &o in offsets {
                    b[o..o + 2].copy_from_slice(&r.f16_scale().to_bits().to_le_bytes());
                }
            }
        }
        GgmlType::Q8_K => {
            for b in w.chunks_exact_mut(ty.type_size()) {
                let x: Vec<f32> = (0..256).map(|_| r.unit()).collect();
                ep_kernels::kquant::quantize_row_q8_k_with(ep_kernels::simd::Path::Scalar, &x, b);
            }
        }
    }
    w
}

/// One 32-element activation block: zeros, random at a chosen magnitude, exact rounding ties, or
/// sparse.
pub fn block_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        1 => Just(vec![0.0f32; 32]),
        4 => (
            prop::sample::select(vec![1e-30f32, 1e-6, 1e-3, 0.1, 1.0, 37.5, 1e3, 6e4, 1e6]),
            prop::collection::vec(-1.0f32..1.0, 32)
        )
            .prop_map(|(s, v)| v.into_iter().map(|x| x * s).collect()),
        // amax 127 -> id exactly 1, every other value is k + 0.5: all ties.
        1 => prop::collection::vec(-127i32..127, 32).prop_map(|k| {
            let mut v: Vec<f32> = k.iter().map(|&k| k as f32 + 0.5).collect();
            v[0] = 127.0;
            v
        }),
        1 => (prop::collection::vec(-1.0f32..1.0, 32), any::<u32>()).prop_map(|(v, mask)| {
            v.into_iter()
                .enumerate()
                .map(|(i, x)| if mask >> i & 1 == 1 { x * 50.0 } else { 0.0 })
                .collect()
        }),
    ]
}

/// A row of 1..=max_blocks blocks.
pub fn row_strategy(max_blocks: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(block_strategy(), 1..=max_blocks).prop_map(|b| b.concat())
}

/// `n` activation rows of `k` elements from a seed (a mix of the block kinds above).
pub fn random_activations(n: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    let mut x = vec![0f32; n * k];
    for blk in x.chunks_mut(32) {
        match r.below(8) {
            0 => {}
            1 => {
                for v in blk.iter_mut() {
                    *v = (r.below(254) as i32 - 127) as f32 + 0.5;
                }
                blk[0] = 127.0;
            }
            kind => {
                let s = [1e-4f32, 0.01, 1.0, 3.0, 100.0, 1e4][kind as usize - 2];
                for v in blk.iter_mut() {
                    *v = r.unit() * s;
                }
            }
        }
    }
    x
}

/// xorshift values uniform in `[-amp/2, amp/2)`.
pub fn data(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * amp
        })
        .collect()
}

/// Owned storage of one block in some dtype.
pub enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Buf {
    pub fn new(dtype: KvDtype, x: &[f32]) -> Buf {
        match dtype {
            KvDtype::F32 => Buf::F32(x.to_vec()),
            KvDtype::F16 => Buf::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
            KvDtype::Bf16 => Buf::Bf16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }
    /// The rows from element `start` on.
    pub fn rows(&self, start: usize) -> KvRows<'_> {
        match self {
            Buf::F32(s) => KvRows::F32(&s[start..]),
            Buf::F16(s) => KvRows::F16(&s[start..]),
            Buf::Bf16(s) => KvRows::Bf16(&s[start..]),
        }
    }
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Buf::F32(s) => s[i],
            Buf::F16(s) => s[i].to_f32(),
            Buf::Bf16(s) => s[i].to_f32(),
        }
    }
}
