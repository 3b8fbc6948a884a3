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
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::{KvChunk, KvDtype, KvRows};
    use crate::attention::avx2::{hsum, hsum_x8, softmax};

    /// A KV element type: its rows and an 8-wide load widened to f32.
    pub(crate) trait Elem: Copy {
        fn rows<'a>(r: &KvRows<'a>) -> &'a [Self];
        /// # Safety
        /// 8 readable elements at `p`; the CPU has AVX2 and F16C.
        unsafe fn load8(p: *const Self) -> __m256;
        /// Rounds the probabilities in place to this type (nearest-even), as `KvDtype::round`.
        fn round(p: &mut [f32]);
    }

    impl Elem for f32 {
        fn rows<'a>(r: &KvRows<'a>) -> &'a [f32] {
            match *r {
                KvRows::F32(s) => s,
                _ => unreachable!("chunk dtypes were checked"),
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable floats at `p` (unaligned load).
            unsafe { _mm256_loadu_ps(p) }
        }
        fn round(_: &mut [f32]) {}
    }

    impl Elem for f16 {
        fn rows<'a>(r: &KvRows<'a>) -> &'a [f16] {
            match *r {
                KvRows::F16(s) => s,
                _ => unreachable!("chunk dtypes were checked"),
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(p: *const f16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable f16 at `p` (16 bytes, unaligned load).
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
        fn round(p: &mut [f32]) {
            // SAFETY: `round` is only called on the AVX2 paths (`attend`, the splice kernels), whose
            // callers guarantee F16C.
            unsafe { round_f16(p) }
        }
    }

    impl Elem for bf16 {
        fn rows<'a>(r: &KvRows<'a>) -> &'a [bf16] {
            match *r {
                KvRows::Bf16(s) => s,
                _ => unreachable!("chunk dtypes were checked"),
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(p: *const bf16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable bf16 at `p` (16 bytes, unaligned load); a bf16
            // is the upper half of the f32 with the same bits.
            unsafe {
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32(w, 16))
            }
        }
        fn round(p: &mut [f32]) {
            p.iter_mut().for_each(|x| *x = KvDtype::Bf16.round(*x));
        }
    }

    /// f32 → f16 (nearest-even, as `half`) → f32 in place, 8 at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn round_f16(p: &mut [f32]) {
        let mut ch = p.chunks_exact_mut(8);
        for c in &mut ch {
            // SAFETY: `c` holds exactly 8 floats.
            unsafe {
                let x = _mm256_loadu_ps(c.as_ptr());
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        ch.into_remainder()
            .iter_mut()
            .for_each(|x| *x = KvDtype::F16.round(*x));
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `hd` is a multiple of 8; every chunk holds `dtype` rows and was
    /// bounds-checked for `hd`; `q` holds `lims.len() * hd` values; every `lims[i] <= n_max`, and
    /// `n_max` is at most the total key count.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend(
        dtype: KvDtype,
        hd: usize,
        chunks: &[KvChunk<'_>],
        scale: f32,
        q: &[f32],
        lims: &[usize],
        n_max: usize,
        scores: &mut Vec<f32>,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match dtype {
                KvDtype::F32 => {
                    attend_t::<f32>(hd, chunks, scale, q, lims, n_max, scores, out, lse)
                }
                KvDtype::F16 => {
                    attend_t::<f16>(hd, chunks, scale, q, lims, n_max, scores, out, lse)
                }
                KvDtype::Bf16 => {
                    attend_t::<bf16>(hd, chunks, scale, q, lims, n_max, scores, out, lse)
                }
            }
        }
    }

    /// # Safety
    /// As [`attend`], with `E` the chunks' element type.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn attend_t<E: Elem>(
        hd: usize,
        chunks: &[KvChunk<'_>],
        scale: f32,
        q: &[f32],
        lims: &[usize],
        n_max: usize,
        scores: &mut Vec<f32>,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        let m = lims.len();
        scores.clear();
        scores.resize(m * n_max, 0.0);
        // Query vectors in passes of at most 4, balanced (9 heads: 3 + 3 + 3).
        let n_pass = m.div_ceil(4);
        let mut g0 = 0;
        for p in 0..n_pass {
            let gs = (m - g0).div_ceil(n_pass - p);
            let lim = &lims[g0..g0 + gs];
            let args = Group {
                hd,
                chunks,
                scale,
                q: &q[g0 * hd..][..gs * hd],
                lim,
                n_max,
                scores: &mut scores[g0 * n_max..][..gs * n_max],
                out: &mut out[g0 * hd..][..gs * hd],
                lse: &mut lse[g0..g0 + gs],
            };
            // SAFETY: forwarded from the caller; the slices above hold `gs` query vectors.
            unsafe {
                match gs {
                    1 => group::<E, 1>(args),
                    2 => group::<E, 2>(args),
                    3 => group::<E, 3>(args),
                    _ => group::<E, 4>(args),
                }
            }
            g0 += gs;
        }
    }

    struct Group<'a, 'b> {
        hd: usize,
        chunks: &'a [KvChunk<'b>],
        scale: f32,
        /// `G` rounded query vectors.
        q: &'a [f32],
        /// Keys attended by each of them.
        lim: &'a [usize],
        /// Score row length.
        n_max: usize,
        /// `G` score rows of `n_max`.
        scores: &'a mut [f32],
        out: &'a mut [f32],
        lse: &'a mut [f32],
    }

    /// `G` query vectors (1 to 4) in one pass over the keys.
    ///
    /// # Safety
    /// As [`attend`], for the `G` vectors of `a`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<E: Elem, const G: usize>(a: Group<'_, '_>) {
        let Group {
            hd,
            chunks,
            scale,
            q,
            lim,
            n_max,
            scores,
            out,
            lse,
        } = a;
        debug_assert!(q.len() == G * hd && lim.len() == G && scores.len() == G * n_max);
        let n_hi = lim.iter().copied().max().unwrap_or(0);
        let sp = scores.as_mut_ptr();
        let qp = q.as_ptr();
        let scale_v = _mm256_set1_ps(scale);

        // Q·Kᵀ: `KB` keys × `G` vectors of 8-lane accumulators (at most 8 in all), each key row loaded
        // once per 8 dimensions for all vectors. Scores past a vector's count are computed and ignored.
        let kb = 8 / G;
        let mut base = 0;
        for ch in chunks {
            if base >= n_hi {
                break;
            }
            let n = ch.n_keys.min(n_hi - base);
            if n == 0 {
                continue;
            }
            let kp = E::rows(&ch.k)[ch.off..].as_ptr();
            // SAFETY: `i < n <= n_keys`, and the chunk was checked to hold rows
            // `(n_keys - 1) * stride + off + hd` long.
            let row = |i: usize| unsafe { kp.add(i * ch.stride) };
            let mut i = 0;
            while i + kb <= n {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..hd).step_by(8) {
                    // SAFETY: `c + 8 <= hd`; `q` holds `G * hd` floats and every key row `hd` values.
                    unsafe {
                        let qv: [__m256; G] =
                            std::array::from_fn(|h| _mm256_loadu_ps(qp.add(h * hd + c)));
                        for k in 0..kb {
                            let kv = E::load8(row(i + k).add(c));
                            for h in 0..G {
                                acc[h * kb + k] = _mm256_fmadd_ps(qv[h], kv, acc[h * kb + k]);
                            }
                        }
                    }
                }
                let mut s = [0f32; 8];
                // SAFETY: `s` holds 8 floats.
                unsafe { _mm256_storeu_ps(s.as_mut_ptr(), _mm256_mul_ps(hsum_x8(acc), scale_v)) };
                for h in 0..G {
                    for k in 0..kb {
                        // SAFETY: `base + i + k < base + n <= n_hi <= n_max`, `h < G`.
                        unsafe { *sp.add(h * n_max + base + i + k) = s[h * kb + k] };
                    }
                }
                i += kb;
            }
            while i < n {
                let mut acc = [_mm256_setzero_ps(); G];
                for c in (0..hd).step_by(8) {
                    // SAFETY: as above.
                    unsafe {
                        let kv = E::load8(row(i).add(c));
                        for (h, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(h * hd + c)), kv, *a);
                        }
                    }
                }
                for (h, a) in acc.iter().enumerate() {
                    // SAFETY: `base + i < n_hi <= n_max`, `h < G`.
                    unsafe { *sp.add(h * n_max + base + i) = hsum(*a) * scale };
                }
                i += 1;
            }
            base += ch.n_keys;
        }

        for h in 0..G {
            let s = &mut scores[h * n_max..][..lim[h]];
            lse[h] = softmax(s);
            E::round(s);
        }
        let n_lo = lim.iter().copied().min().unwrap_or(0);
        let pv = Pv {
            hd,
            chunks,
            lim,
            n_lo,
            n_hi,
            n_max,
            p: scores.as_ptr(),
            out: out.as_mut_ptr(),
        };
        // P·V in blocks of `NT` 8-wide output tiles (`G * NT <= 16` accumulators).
        let max_nt = match G {
            1 => 8,
            2 => 4,
            _ => 2,
        };
        let tiles = hd / 8;
        let mut t0 = 0;
        while t0 < tiles {
            let nt = (tiles - t0).min(max_nt);
            let nt = if nt >= 8 {
                8
            } else if nt >= 4 {
                4
            } else if nt >= 2 {
                2
            } else {
                1
            };
            // SAFETY: `8 * (t0 + nt) <= hd`; the rest is forwarded from the caller.
            unsafe {
                match nt {
                    8 => pv_tiles::<E, G, 8>(&pv, 8 * t0),
                    4 => pv_tiles::<E, G, 4>(&pv, 8 * t0),
                    2 => pv_tiles::<E, G, 2>(&pv, 8 * t0),
                    _ => pv_tiles::<E, G, 1>(&pv, 8 * t0),
                }
            }
            t0 += nt;
        }
    }

    /// The `P·V` operands of one group of `G` query vectors.
    struct Pv<'a, 'b> {
        hd: usize,
        chunks: &'a [KvChunk<'b>],
        lim: &'a [usize],
        /// Fewest and most keys attended by a vector of the group.
        n_lo: usize,
        n_hi: usize,
        /// Probability row length.
        n_max: usize,
        /// `G` probability rows of `n_max`.
        p: *const f32,
        /// `G` output rows of `hd`.
        out: *mut f32,
    }

    /// Calls `f(j, row)` for every key `j` in `lo..hi` with `j % 8 == lane`, in order (`row` points at
    /// the key's value row, offset applied).
    #[inline(always)]
    fn lane_keys<E: Elem>(
        chunks: &[KvChunk<'_>],
        lane: usize,
        lo: usize,
        hi: usize,
        mut f: impl FnMut(usize, *const E),
    ) {
        let mut base = 0;
        for ch in chunks {
            if base >= hi {
                break;
            }
            let (s, e) = (base.max(lo), (base + ch.n_keys).min(hi));
            if s < e {
                let vp = E::rows(&ch.v)[ch.off..].as_ptr();
                let mut j = s + (lane + 8 - s % 8) % 8;
                while j < e {
                    // `j - base < n_keys`: inside the chunk's checked rows (`wrapping_add` keeps the
                    // pointer arithmetic safe; dereferencing is the caller's business).
                    f(j, vp.wrapping_add((j - base) * ch.stride));
                    j += 8;
                }
            }
            base += ch.n_keys;
        }
    }

    /// `P·V` for output dimensions `c0..c0 + 8 * NT` of the `G` vectors: for each lane `l`, the keys
    /// `j ≡ l (mod 8)` summed in order with FMA (each value row loaded once for all vectors, each
    /// probability broadcast once for all tiles), then the 8 lanes reduced by the `hsum8` tree.
    ///
    /// # Safety
    /// As [`attend`]; `c0 + 8 * NT <= hd`, `G` probability rows of `n_max` at `a.p`, `G` output rows
    /// of `hd` at `a.out`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv_tiles<E: Elem, const G: usize, const NT: usize>(a: &Pv<'_, '_>, c0: usize) {
        let mut lanes = [[[_mm256_setzero_ps(); NT]; 8]; G];
        for l in 0..8 {
            let mut acc = [[_mm256_setzero_ps(); NT]; G];
            // Keys every vector attends.
            lane_keys::<E>(a.chunks, l, 0, a.n_lo, |j, row| {
                let p: [__m256; G] = std::array::from_fn(|h| {
                    // SAFETY: `j < n_lo <= n_max`, `h < G`.
                    unsafe { _mm256_broadcast_ss(&*a.p.add(h * a.n_max + j)) }
                });
                for t in 0..NT {
                    // SAFETY: `row` is a checked value row of `hd` values and `c0 + 8 * t + 8 <= hd`.
                    let v = unsafe { E::load8(row.add(c0 + 8 * t)) };
                    for h in 0..G {
                        acc[h][t] = _mm256_fmadd_ps(p[h], v, acc[h][t]);
                    }
                }
            });
            // Keys only some attend (the multi-row variant).
            lane_keys::<E>(a.chunks, l, a.n_lo, a.n_hi, |j, row| {
                for h in 0..G {
                    if j >= a.lim[h] {
                        continue;
                    }
                    // SAFETY: `j < lim[h] <= n_max`, `h < G`.
                    let p = unsafe { _mm256_broadcast_ss(&*a.p.add(h * a.n_max + j)) };
                    for t in 0..NT {
                        // SAFETY: as above.
                        let v = unsafe { E::load8(row.add(c0 + 8 * t)) };
                        acc[h][t] = _mm256_fmadd_ps(p, v, acc[h][t]);
                    }
                }
            });
            for h in 0..G {
                lanes[h][l] = acc[h];
            }
        }
        for (h, lh) in lanes.iter().enumerate() {
            for t in 0..NT {
                let r = _mm256_add_ps(
                    _mm256_add_ps(
                        _mm256_add_ps(lh[0][t], lh[4][t]),
                        _mm256_add_ps(lh[2][t], lh[6][t]),
                    ),
                    _mm256_add_ps(
                        _mm256_add_ps(lh[1][t], lh[5][t]),
                        _mm256_add_ps(lh[3][t], lh[7][t]),
                    ),
                );
                // SAFETY: `h < G` output rows of `hd` and `c0 + 8 * t + 8 <= hd`.
                unsafe { _mm256_storeu_ps(a.out.add(h * a.hd + c0 + 8 * t), r) };
            }
        }
    }
}
