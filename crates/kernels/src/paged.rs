//! Attention over a paged KV store: one KV head, all the query heads that share it, keys in blocks.
//!
//! The key sequence is a list of [`KvChunk`]s (typically one per KV block), each a run of consecutive
//! keys with its own slices, row stride and head offset; the KV dtype is F32, F16 or BF16. The numerics
//! per query head are exactly [`attention::attend_head`](crate::attention::attend_head)'s, with "f16"
//! read as "the KV dtype":
//!
//! - the query is rounded to the KV dtype (nearest-even; unchanged for F32);
//! - the score of key `j` is the 8-lane FMA dot product over `head_dim` (element `i` in lane `i % 8`)
//!   reduced by [`hsum8`], times `scale`;
//! - softmax over all scores of the head as [`ops::softmax_in_place`];
//! - the probabilities are rounded to the KV dtype, and `P·V` sums key `j` — its index in the whole
//!   sequence, not in its chunk — into lane `j % 8` with FMA, the lanes reduced by [`hsum8`].
//!
//! So with F16 KV each head's output is bit-identical to `attend_head` over the same keys laid out
//! contiguously, whatever the chunking. The gain is memory traffic: the query heads are processed
//! together inside the key loops (up to four per pass), so every K and V row is loaded once for all of
//! them instead of once per head. The AVX2 path computes the same operations as the scalar one and is
//! bit-identical to it for every dtype.
//!
//! [`attend_rows_group`] does the same for several query rows at once, row `t` attending the first
//! `n_keys[t]` keys: each (row, head) is computed by the same operations as a lone [`attend_group`]
//! call, so the results are bit-identical to per-row calls while K/V rows are shared across rows too.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

use crate::ops::{self, hsum8};
use crate::simd::{self, Path};

/// Element type of a paged KV store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    /// `"f32"`, `"f16"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }

    /// `x` rounded to this dtype (nearest-even) and widened back; `x` itself for F32.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            KvDtype::F32 => x,
            KvDtype::F16 => f16::from_f32(x).to_f32(),
            KvDtype::Bf16 => bf16::from_f32(x).to_f32(),
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no KV dtype.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown KV dtype {0:?} (expected f32, f16 or bf16)")]
pub struct ParseKvDtypeError(pub String);

impl FromStr for KvDtype {
    type Err = ParseKvDtypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            "bf16" => Ok(KvDtype::Bf16),
            _ => Err(ParseKvDtypeError(s.to_string())),
        }
    }
}

/// Rows of keys or values in one of the KV dtypes.
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl KvRows<'_> {
    pub fn dtype(&self) -> KvDtype {
        match self {
            KvRows::F32(_) => KvDtype::F32,
            KvRows::F16(_) => KvDtype::F16,
            KvRows::Bf16(_) => KvDtype::Bf16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(s) => s.len(),
            KvRows::F16(s) => s.len(),
            KvRows::Bf16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `start..start + out.len()` widened to f32 (exact).
    pub(crate) fn row_to_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            KvRows::F32(s) => out.copy_from_slice(&s[start..][..n]),
            KvRows::F16(s) => {
                for (o, x) in out.iter_mut().zip(&s[start..][..n]) {
                    *o = x.to_f32();
                }
            }
            KvRows::Bf16(s) => {
                for (o, x) in out.iter_mut().zip(&s[start..][..n]) {
                    *o = x.to_f32();
                }
            }
        }
    }
}

/// A run of consecutive keys: key `j` of the run is `k[j * stride + off ..][..head_dim]` (same for `v`).
#[derive(Clone, Copy, Debug)]
pub struct KvChunk<'a> {
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
    pub n_keys: usize,
    pub stride: usize,
    pub off: usize,
}

/// Checks every chunk (one dtype throughout, K and V rows in bounds); returns the dtype (`None` when
/// there are no chunks) and the total number of keys.
pub(crate) fn check_chunks(chunks: &[KvChunk<'_>], hd: usize) -> (Option<KvDtype>, usize) {
    let dtype = chunks.first().map(|c| c.k.dtype());
    let mut total = 0usize;
    for (i, c) in chunks.iter().enumerate() {
        let (dk, dv) = (c.k.dtype(), c.v.dtype());
        assert!(
            Some(dk) == dtype && Some(dv) == dtype,
            "KV chunk {i}: K is {dk}, V is {dv}, but chunk 0 is {}",
            dtype.map_or("?", KvDtype::name)
        );
        if c.n_keys > 0 {
            let end = (c.n_keys - 1)
                .checked_mul(c.stride)
                .and_then(|x| x.checked_add(c.off))
                .and_then(|x| x.checked_add(hd));
            assert!(
                end.is_some_and(|e| e <= c.k.len() && e <= c.v.len()),
                "KV chunk {i} out of bounds: {} keys, stride {}, offset {}, head_dim {hd}, but K holds {} \
                 and V {} elements",
                c.n_keys,
                c.stride,
                c.off,
                c.k.len(),
                c.v.len()
            );
        }
        total = total
            .checked_add(c.n_keys)
            .expect("KV chunk key counts overflow");
    }
    (dtype, total)
}

/// Scratch space for [`attend_group`] and [`attend_rows_group`], reused across calls (no allocation once
/// it has grown to the largest shape).
#[derive(Default)]
pub struct GroupScratch {
    /// The queries rounded to the KV dtype, one `head_dim` row per query vector.
    q: Vec<f32>,
    /// Keys attended by each query vector.
    lims: Vec<usize>,
    /// Scores, then probabilities: `n_max` per query vector.
    scores: Vec<f32>,
    /// Scalar path: 8 lane accumulators of `head_dim` per query vector.
    lanes: Vec<f32>,
    /// Scalar path: one K or V row widened to f32.
    row: Vec<f32>,
}

/// Attends `g = q.len() / head_dim` query heads (f32, already rotated, not yet rounded) sharing one
/// KV head over the keys of `chunks` in order (their concatenation is the key sequence; all chunks
/// must have the same dtype), on kernel path `path`. Writes `g * head_dim` outputs into `out` and
/// each head's log-sum-exp of the scaled scores into `lse` (`g` values; `-inf` and zero output when
/// there are no keys). Both paths give the same bits; [`Path::Avx2`] on a CPU without it (see
/// [`Path::is_available`]), or with `head_dim` not a multiple of 8, runs the scalar code.
///
/// # Panics
/// If the shapes disagree (`q.len()` not a multiple of `head_dim`, `out.len() != q.len()`,
/// `lse.len() != g`), a chunk's rows are out of bounds, or the chunks mix dtypes.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    path: Path,
    q: &[f32],
    head_dim: usize,
    chunks: &[KvChunk<'_>],
    scale: f32,
    scratch: &mut GroupScratch,
    out: &mut [f32],
    lse: &mut [f32],
) {
    run(path, q, head_dim, None, chunks, scale, scratch, out, lse)
}

/// [`attend_group`] for `r = n_keys.len()` query rows at once: `q_rows` holds `r` rows of
/// `g * head_dim` values, row `t` attends the first `n_keys[t]` keys of the chunk sequence. `out` is laid
/// out like `q_rows`, `lse` holds `r * g` values (row-major). Each row's results are bit-identical to an
/// [`attend_group`] call over its first `n_keys[t]` keys; K/V rows are shared by all rows and heads.
///
/// # Panics
/// As [`attend_group`], and if `q_rows.len()` is not `r * g * head_dim` or some `n_keys[t]` exceeds the
/// total number of keys.
#[allow(clippy::too_many_arguments)]
pub fn attend_rows_group(
    path: Path,
    q_rows: &[f32],
    n_keys: &[usize],
    head_dim: usize,
    chunks: &[KvChunk<'_>],
    scale: f32,
    scratch: &mut GroupScratch,
    out: &mut [f32],
    lse: &mut [f32],
) {
    run(
        path,
        q_rows,
        head_dim,
        Some(n_keys),
        chunks,
        scale,
        scratch,
        out,
        lse,
    )
}

#[allow(clippy::too_many_arguments)]
fn run(
    path: Path,
    q: &[f32],
    hd: usize,
    row_keys: Option<&[usize]>,
    chunks: &[KvChunk<'_>],
    scale: f32,
    scratch: &mut GroupScratch,
    out: &mut [f32],
    lse: &mut [f32],
) {
    assert!(hd > 0, "head_dim must be positive");
    assert!(
        q.len().is_multiple_of(hd),
        "query length {} is not a multiple of head_dim {hd}",
        q.len()
    );
    let m = q.len() / hd;
    assert_eq!(out.len(), q.len(), "output length must equal query length");
    assert_eq!(
        lse.len(),
        m,
        "lse length must equal the number of query heads"
    );
    let (dtype, total) = check_chunks(chunks, hd);

    let lims = &mut scratch.lims;
    lims.clear();
    match row_keys {
        None => lims.resize(m, total),
        Some(nk) => {
            let r = nk.len();
            assert!(
                (r == 0 && m == 0) || (r > 0 && m.is_multiple_of(r)),
                "{m} query heads do not split into {r} rows"
            );
            if let Some(g) = m.checked_div(r) {
                for &n in nk {
                    assert!(n <= total, "a row attends {n} keys but there are {total}");
                    lims.extend(std::iter::repeat_n(n, g));
                }
            }
        }
    }
    let n_max = lims.iter().copied().max().unwrap_or(0);
    let Some(dtype) = dtype.filter(|_| n_max > 0) else {
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        return;
    };
    scratch.q.clear();
    scratch.q.extend(q.iter().map(|&x| dtype.round(x)));

    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx2 && hd.is_multiple_of(8) && simd::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); `hd` is a multiple of 8; every chunk
        // was bounds-checked for `hd` and has dtype `dtype`; `lims` are at most the total key count.
        unsafe {
            avx2::attend(
                dtype,
                hd,
                chunks,
                scale,
                &scratch.q,
                &scratch.lims,
                n_max,
                &mut scratch.scores,
                out,
                lse,
            )
        };
        return;
    }
    let _ = path;
    scalar(dtype, hd, chunks, scale, scratch, n_max, out, lse);
}

/// Dot product in `ops::dot_f16`'s order: lanes `i % 8` with FMA, reduced by [`hsum8`]; a tail (when
/// `head_dim` is not a multiple of 8) accumulated separately and added last.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let s = hsum8(&acc);
    if ca.remainder().is_empty() {
        return s;
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = x.mul_add(*y, tail);
    }
    s + tail
}

/// The portable path: keys in order, every K and V row widened once and used by all query vectors.
#[allow(clippy::too_many_arguments)]
fn scalar(
    dtype: KvDtype,
    hd: usize,
    chunks: &[KvChunk<'_>],
    scale: f32,
    scratch: &mut GroupScratch,
    n_max: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let GroupScratch {
        q,
        lims,
        scores,
        lanes,
        row,
    } = scratch;
    let m = lims.len();
    scores.clear();
    scores.resize(m * n_max, 0.0);
    row.clear();
    row.resize(hd, 0.0);
    let keys = || {
        chunks
            .iter()
            .flat_map(|c| (0..c.n_keys).map(move |i| (c, i * c.stride + c.off)))
            .take(n_max)
            .enumerate()
    };
    for (j, (c, start)) in keys() {
        c.k.row_to_f32(start, row);
        for (qi, &lim) in lims.iter().enumerate() {
            if j < lim {
                scores[qi * n_max + j] = dot(&q[qi * hd..][..hd], row) * scale;
            }
        }
    }
    for (qi, &lim) in lims.iter().enumerate() {
        let s = &mut scores[qi * n_max..][..lim];
        lse[qi] = ops::softmax_in_place(s);
        s.iter_mut().for_each(|p| *p = dtype.round(*p));
    }
    lanes.clear();
    lanes.resize(m * 8 * hd, 0.0);
    for (j, (c, start)) in keys() {
        c.v.row_to_f32(start, row);
        for (qi, &lim) in lims.iter().enumerate() {
            if j < lim {
                let p = scores[qi * n_max + j];
                let acc = &mut lanes[(qi * 8 + j % 8) * hd..][..hd];
                for (a, &x) in acc.iter_mut().zip(row.iter()) {
                    *a = p.mul_add(x, *a);
                }
            }
        }
    }
    for (qi, o) in out.chunks_exact_mut(hd).enumerate() {
        let l = &lanes[qi * 8 * hd..][..8 * hd];
        for (d, od) in o.iter_mut().enumerate() {
            let v: [f32; 8] = std::array::from_fn(|lane| l[lane * hd + d]);
            *od = hsum8(&v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
// Head, lane and tile indices address several register arrays at once.
#[allow(clippy::needless_range_loop)]
#[path = "x86/paged.rs"]
pub(crate) mod avx2;
