//! Attention of one query head over f16 keys and values, with llama.cpp's prompt-path numerics.
//!
//! `Q·Kᵀ`: the query is rounded to f16; each score is an 8-lane FMA dot product (element `i` in lane
//! `i % 8`) reduced by [`hsum8`], then scaled. Softmax as [`ops::softmax_in_place`]. `P·V`: the
//! probabilities are rounded to f16; for each output dimension the keys are summed in 8 lanes (key `j`
//! in lane `j % 8`) with FMA and reduced by [`hsum8`]. That is the order of llamafile's tinyBLAS GEMM
//! llama.cpp uses for multi-token batches, and the AVX2 path computes exactly the same operations as the
//! scalar one, so results are bit-identical across paths, batches and threads.

use half::f16;

use crate::ops::{self, hsum8};
use crate::simd::{self, Path};

/// Scratch space for [`attend_head`], reused across calls.
#[derive(Default)]
pub struct HeadScratch {
    scores: Vec<f32>,
    /// 8 accumulators (one per lane) of `head_dim` floats each.
    lanes: Vec<f32>,
}

/// Keys and values of one KV head: key `j` is `k[j * stride + off ..][..head_dim]`, likewise for `v`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub n_keys: usize,
    pub stride: usize,
    pub off: usize,
}

impl KvView<'_> {
    fn check(&self, hd: usize) {
        if self.n_keys > 0 {
            let last = (self.n_keys - 1) * self.stride + self.off + hd;
            assert!(
                last <= self.k.len() && last <= self.v.len(),
                "KV view out of bounds"
            );
        }
    }
}

/// Attends one query head (already rounded to f16) over `kv` on kernel path `path`, writing
/// `head_dim` outputs. Returns the log-sum-exp of the scaled scores (for merging partial attention
/// states); `-inf` with no keys, when the output is zero. Both paths give the same bits;
/// [`Path::Avx2`] on a CPU without it (see [`Path::is_available`]), or with `head_dim` not a
/// multiple of 8, runs the scalar code.
pub fn attend_head(
    path: Path,
    q16: &[f16],
    kv: KvView<'_>,
    scale: f32,
    scratch: &mut HeadScratch,
    out: &mut [f32],
) -> f32 {
    let hd = q16.len();
    assert_eq!(out.len(), hd);
    kv.check(hd);
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx2 && hd.is_multiple_of(8) && simd::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); `hd` is a multiple of 8;
        // bounds were checked.
        return unsafe { avx2::attend_head(q16, kv, scale, scratch, out) };
    }
    let _ = path;
    scalar(q16, kv, scale, scratch, out)
}

/// The portable reference.
fn scalar(
    q16: &[f16],
    kv: KvView<'_>,
    scale: f32,
    scratch: &mut HeadScratch,
    out: &mut [f32],
) -> f32 {
    let hd = q16.len();
    kv.check(hd);
    let HeadScratch { scores, lanes } = scratch;
    scores.clear();
    scores.extend((0..kv.n_keys).map(|j| {
        let kj = &kv.k[j * kv.stride + kv.off..][..hd];
        ops::dot_f16(q16, kj) * scale
    }));
    let lse = ops::softmax_in_place(scores);
    lanes.clear();
    lanes.resize(8 * hd, 0.0);
    for (j, &p) in scores.iter().enumerate() {
        let p = f16::from_f32(p).to_f32();
        let acc = &mut lanes[(j % 8) * hd..][..hd];
        let vj = &kv.v[j * kv.stride + kv.off..][..hd];
        for (a, &x) in acc.iter_mut().zip(vj) {
            *a = p.mul_add(x.to_f32(), *a);
        }
    }
    for (d, o) in out.iter_mut().enumerate() {
        let l: [f32; 8] = std::array::from_fn(|lane| lanes[lane * hd + d]);
        *o = hsum8(&l);
    }
    lse
}

#[cfg(target_arch = "x86_64")]
#[path = "x86/attention.rs"]
pub(crate) mod avx2;
