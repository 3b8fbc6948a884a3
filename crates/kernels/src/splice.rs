//! Hierarchical attention splicing: [`attend_group`](crate::paged::attend_group)'s phases, split so that
//! query vectors of many sequences can read a shared run of keys (a node of a prefix tree) once.
//!
//! The sequences of a batch form a prefix tree (a cloud prompt, a tenant context, each request's
//! tail); a node holds a run of consecutive keys, key `key_base` of every sequence below it onwards.
//! For each node, all query vectors of all sequences below it are processed together, so the node's K
//! and V rows are read once per step for all of them. The phases:
//!
//! 1. [`splice_scores`] per node: the score of each of the node's keys for each vector (8-lane FMA dot
//!    over `head_dim` reduced by [`hsum8`], times `scale`), written into the vector's score row at the
//!    key's global index;
//! 2. [`splice_softmax`] per vector, once over its whole row: softmax and rounding of P to the KV dtype;
//! 3. [`splice_pv`] per node, root first: `P·V` with key `j` (global) summed into lane `j % 8` with FMA,
//!    continuing each vector's 8 lane accumulators across nodes;
//! 4. [`splice_finish`]: the lanes reduced by the [`hsum8`] tree.
//!
//! Nodes along a path hold consecutive key ranges and are processed in key order, so every vector sees
//! exactly `attend_group`'s operations in `attend_group`'s order: the results are bit-identical to
//! `attend_group` (all keys) and `attend_rows_group` (per-row key counts) over the concatenated chunks,
//! for every KV dtype and on both paths (the AVX2 path equals the scalar one bit for bit).
//!
//! Speed: a node's keys are processed in tiles of about 32 KB of rows (widened to f32 once when many
//! vectors share them), and inside a tile the vectors in register-blocked passes, so every K/V row comes
//! from memory once per call however many vectors read it.

use crate::ops::{self, hsum8};
use crate::paged::{check_chunks, dot, KvChunk, KvDtype};
use crate::simd::{self, Path};

/// One prefix-tree node as the splice phases see it.
#[derive(Clone, Copy, Debug)]
pub struct SpliceNode<'a, 'b> {
    /// The node's keys: the chunks concatenated in order (one dtype throughout).
    pub chunks: &'a [KvChunk<'b>],
    /// Position of the node's first key in every vector's sequence: its column in the rows.
    pub key_base: usize,
    /// How many of the node's keys each vector attends (`m = lims.len()` vectors).
    pub lims: &'a [usize],
}

/// Per-vector rows of a phase's scores or probabilities: vector `v`'s row is
/// `data[v * row_len..(v + 1) * row_len]`, indexed by key position.
#[derive(Debug)]
pub struct Rows<S> {
    pub data: S,
    pub row_len: usize,
}

/// `m` query vectors of `head_dim` values, one after another.
#[derive(Clone, Copy, Debug)]
pub struct Vectors<'a> {
    pub data: &'a [f32],
    pub head_dim: usize,
}

/// Phase 1 for one node, on kernel path `path`. `q` holds the node's `m = node.lims.len()` query
/// vectors, already rounded to the KV dtype; vector `v` attends the first `node.lims[v]` keys of the
/// node. Writes the score (dot × `scale`) of node key `i < lims[v]` into row `v` of `scores` at
/// column `key_base + i`; nothing else is written. Both paths give the same bits; [`Path::Avx2`] on
/// a CPU without it (see [`Path::is_available`]), or with `head_dim` not a multiple of 8, runs the
/// scalar code (likewise in [`splice_softmax`] and [`splice_pv`]).
///
/// # Panics
/// If `head_dim` is 0, `q` is not `m` vectors, `scores` is not `m` rows, some `lims[v]` exceeds the
/// node's key count or `key_base + lims[v] > row_len`, a chunk is out of bounds or the chunks mix
/// dtypes.
pub fn splice_scores(
    path: Path,
    node: SpliceNode<'_, '_>,
    q: Vectors<'_>,
    scale: f32,
    scores: Rows<&mut [f32]>,
) {
    scores_impl(
        path,
        q.head_dim,
        node.chunks,
        scale,
        q.data,
        node.lims,
        node.key_base,
        scores.data,
        scores.row_len,
    )
}

/// Phase 2 for one vector, on kernel path `path`: softmax over its `scores` in place (as
/// `ops::softmax_in_place`) and the probabilities rounded to `dtype` (nearest-even), exactly what
/// `attend_group` does between its phases. Returns the log-sum-exp of the scores (`-inf`, and all
/// zeros, when there are none).
pub fn splice_softmax(path: Path, dtype: KvDtype, scores: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx2 && simd::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::softmax_round(dtype, scores) };
    }
    let _ = path;
    let lse = ops::softmax_in_place(scores);
    scores.iter_mut().for_each(|p| *p = dtype.round(*p));
    lse
}

/// Phase 3 for one node, on kernel path `path` (`node` as in [`splice_scores`]): for each vector `v`
/// and each node key `i < lims[v]` in increasing order, with `j = key_base + i` and `p` the
/// probability in row `v`, column `j` of `probs`,
/// `lanes[v * 8 * head_dim + (j % 8) * head_dim + d] = fma(p, V_i[d], lanes[..])` for every `d`.
/// The lanes carry over between nodes; the caller zeroes them before the first node.
///
/// # Panics
/// As [`splice_scores`] (with `probs` for `scores`), and if `lanes.len() != m * 8 * head_dim`.
pub fn splice_pv(
    path: Path,
    node: SpliceNode<'_, '_>,
    probs: Rows<&[f32]>,
    head_dim: usize,
    lanes: &mut [f32],
) {
    pv_impl(
        path,
        head_dim,
        node.chunks,
        probs.data,
        probs.row_len,
        node.lims,
        node.key_base,
        lanes,
    )
}

/// Final step: `out[v * head_dim + d]` = [`hsum8`] of the 8 lanes `lanes[v * 8 * head_dim +
/// l * head_dim + d]`, `l = 0..8` (`attend_group`'s reduction). `out` holds `m * head_dim` values.
///
/// # Panics
/// If `head_dim` is 0 or `lanes.len() != 8 * out.len()` or `out.len()` is not a multiple of `head_dim`.
pub fn splice_finish(head_dim: usize, lanes: &[f32], out: &mut [f32]) {
    assert!(head_dim > 0, "head_dim must be positive");
    assert!(
        out.len().is_multiple_of(head_dim),
        "output length {} is not a multiple of head_dim {head_dim}",
        out.len()
    );
    assert_eq!(
        Some(lanes.len()),
        out.len().checked_mul(8),
        "lanes must hold 8 accumulators of head_dim per output vector"
    );
    for (o, l) in out
        .chunks_exact_mut(head_dim)
        .zip(lanes.chunks_exact(8 * head_dim))
    {
        for (d, od) in o.iter_mut().enumerate() {
            let v: [f32; 8] = std::array::from_fn(|lane| l[lane * head_dim + d]);
            *od = hsum8(&v);
        }
    }
}

/// Checks the shapes shared by the node phases (`rows` is the length of `scores` or `probs`); returns
/// the dtype and the most keys a vector attends, or `None` when there is nothing to do.
fn check_node(
    hd: usize,
    chunks: &[KvChunk<'_>],
    rows: usize,
    row_len: usize,
    lims: &[usize],
    key_base: usize,
    what: &str,
) -> Option<(KvDtype, usize)> {
    assert!(hd > 0, "head_dim must be positive");
    let (dtype, total) = check_chunks(chunks, hd);
    let m = lims.len();
    assert_eq!(
        Some(rows),
        m.checked_mul(row_len),
        "{what} length must be {m} vectors × row_len {row_len}"
    );
    for (v, &lim) in lims.iter().enumerate() {
        assert!(
            lim <= total,
            "vector {v} attends {lim} keys of the node, but it holds {total}"
        );
        assert!(
            lim == 0 || key_base.checked_add(lim).is_some_and(|e| e <= row_len),
            "vector {v}: keys {key_base}..{key_base}+{lim} do not fit a row of {row_len}"
        );
    }
    let n_hi = lims.iter().copied().max().unwrap_or(0);
    dtype.filter(|_| n_hi > 0).map(|d| (d, n_hi))
}

/// The node's keys in order: `(chunk, start of the key's row)`.
fn node_keys<'a, 'b>(
    chunks: &'a [KvChunk<'b>],
) -> impl Iterator<Item = (&'a KvChunk<'b>, usize)> + 'a {
    chunks
        .iter()
        .flat_map(|c| (0..c.n_keys).map(move |i| (c, i * c.stride + c.off)))
}

#[allow(clippy::too_many_arguments)]
fn scores_impl(
    path: Path,
    hd: usize,
    chunks: &[KvChunk<'_>],
    scale: f32,
    q: &[f32],
    lims: &[usize],
    key_base: usize,
    scores: &mut [f32],
    row_len: usize,
) {
    let m = lims.len();
    assert_eq!(
        Some(q.len()),
        m.checked_mul(hd),
        "query length must be {m} vectors × head_dim {hd}"
    );
    let Some((dtype, n_hi)) =
        check_node(hd, chunks, scores.len(), row_len, lims, key_base, "scores")
    else {
        return;
    };

    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx2 && hd.is_multiple_of(8) && simd::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C; `hd` is a multiple of 8; the chunks were checked
        // for `hd` and hold `dtype` rows; `q` holds `m * hd` values; every `lims[v] <= n_hi` is at
        // most the node's key count, and `key_base + lims[v] <= row_len`, `scores.len() == m * row_len`.
        unsafe {
            avx2::scores(
                dtype, hd, chunks, scale, q, lims, key_base, scores, row_len, n_hi,
            )
        };
        return;
    }
    let _ = (path, dtype);
    let mut row = vec![0f32; hd];
    for (i, (c, start)) in node_keys(chunks).take(n_hi).enumerate() {
        c.k.row_to_f32(start, &mut row);
        for (v, &lim) in lims.iter().enumerate() {
            if i < lim {
                scores[v * row_len + key_base + i] = dot(&q[v * hd..][..hd], &row) * scale;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn pv_impl(
    path: Path,
    hd: usize,
    chunks: &[KvChunk<'_>],
    probs: &[f32],
    row_len: usize,
    lims: &[usize],
    key_base: usize,
    lanes: &mut [f32],
) {
    let m = lims.len();
    assert_eq!(
        Some(lanes.len()),
        m.checked_mul(hd).and_then(|x| x.checked_mul(8)),
        "lanes must hold {m} vectors × 8 × head_dim {hd}"
    );
    let Some((dtype, n_hi)) = check_node(hd, chunks, probs.len(), row_len, lims, key_base, "probs")
    else {
        return;
    };

    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx2 && hd.is_multiple_of(8) && simd::avx2_available() {
        // SAFETY: as in `scores_impl`, with `probs` for `scores`; `lanes` holds `m * 8 * hd` values.
        unsafe {
            avx2::pv(
                dtype, hd, chunks, probs, row_len, lims, key_base, lanes, n_hi,
            )
        };
        return;
    }
    let _ = (path, dtype);
    let mut row = vec![0f32; hd];
    for (i, (c, start)) in node_keys(chunks).take(n_hi).enumerate() {
        c.v.row_to_f32(start, &mut row);
        let j = key_base + i;
        for (v, &lim) in lims.iter().enumerate() {
            if i < lim {
                let p = probs[v * row_len + j];
                let acc = &mut lanes[(v * 8 + j % 8) * hd..][..hd];
                for (a, &x) in acc.iter_mut().zip(&row) {
                    *a = p.mul_add(x, *a);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
// Vector, key and tile indices address several register arrays at once.
#[allow(clippy::needless_range_loop)]
#[path = "x86/splice.rs"]
mod avx2;
