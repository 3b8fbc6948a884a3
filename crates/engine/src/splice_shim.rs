//! TEMPORARY scalar stand-in for the kernel's splice phases (replaced when the kernel lands).

use ep_kernels::ops::{self, hsum8};
use ep_kernels::paged::{KvChunk, KvDtype, KvRows};

fn val(r: &KvRows<'_>, i: usize) -> f32 {
    match r {
        KvRows::F32(s) => s[i],
        KvRows::F16(s) => s[i].to_f32(),
        KvRows::Bf16(s) => s[i].to_f32(),
    }
}

fn keys<'a>(chunks: &'a [KvChunk<'a>]) -> impl Iterator<Item = (&'a KvChunk<'a>, usize)> + 'a {
    chunks
        .iter()
        .flat_map(|c| (0..c.n_keys).map(move |i| (c, i * c.stride + c.off)))
}

#[allow(clippy::too_many_arguments)]
pub fn splice_scores(
    hd: usize,
    chunks: &[KvChunk<'_>],
    scale: f32,
    q: &[f32],
    lims: &[usize],
    key_base: usize,
    scores: &mut [f32],
    row_len: usize,
) {
    for (i, (c, start)) in keys(chunks).enumerate() {
        for (v, &lim) in lims.iter().enumerate() {
            if i < lim {
                let qv = &q[v * hd..][..hd];
                let mut acc = [0f32; 8];
                for d in 0..hd {
                    acc[d % 8] = qv[d].mul_add(val(&c.k, start + d), acc[d % 8]);
                }
                scores[v * row_len + key_base + i] = hsum8(&acc) * scale;
            }
        }
    }
}

pub fn splice_softmax(dtype: KvDtype, scores: &mut [f32]) -> f32 {
    let lse = ops::softmax_in_place(scores);
    scores.iter_mut().for_each(|p| *p = dtype.round(*p));
    lse
}

pub fn splice_pv(
    hd: usize,
    chunks: &[KvChunk<'_>],
    probs: &[f32],
    row_len: usize,
    lims: &[usize],
    key_base: usize,
    lanes: &mut [f32],
) {
    for (i, (c, start)) in keys(chunks).enumerate() {
        let j = key_base + i;
        for (v, &lim) in lims.iter().enumerate() {
            if i < lim {
                let p = probs[v * row_len + j];
                let acc = &mut lanes[(v * 8 + j % 8) * hd..][..hd];
                for (d, a) in acc.iter_mut().enumerate() {
                    *a = p.mul_add(val(&c.v, start + d), *a);
                }
            }
        }
    }
}

pub fn splice_finish(hd: usize, lanes: &[f32], out: &mut [f32]) {
    for (v, o) in out.chunks_exact_mut(hd).enumerate() {
        let l = &lanes[v * 8 * hd..][..8 * hd];
        for (d, od) in o.iter_mut().enumerate() {
            let x: [f32; 8] = std::array::from_fn(|lane| l[lane * hd + d]);
            *od = hsum8(&x);
        }
    }
}
