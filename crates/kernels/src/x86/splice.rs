//! `splice::avx2`: the AVX2 + FMA + F16C (x86-64) kernels of [`crate::splice`], in the
//! `x86/` directory with the other x86 kernels (room beside it for `arm/`).

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::attention::avx2::{hsum_x8, softmax};
use crate::paged::avx2::Elem;
use crate::paged::{KvChunk, KvDtype};

/// Vectors that share a node before its rows are widened to an f32 tile (below, each row is
/// widened inside the kernels instead; F32 rows are never copied).
const WIDEN_MIN_VECTORS: usize = 6;
/// Vectors per pass in the scores phase (3 vectors × 4 keys = 12 accumulators) and in `P·V`
/// (3 vectors × 4 output slices).
const SCORE_PASS: usize = 3;
const PV_PASS: usize = 3;

/// Keys per tile: about 32 KB of f32 rows, a multiple of 8 (more keys per lane per pass amortise
/// the loads and stores of the `P·V` accumulators).
fn tile_keys(hd: usize) -> usize {
    ((8192 / hd).clamp(8, 512) / 8) * 8
}

/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn softmax_round(dtype: KvDtype, x: &mut [f32]) -> f32 {
    let lse = softmax(x);
    match dtype {
        KvDtype::F32 => <f32 as Elem>::round(x),
        KvDtype::F16 => <f16 as Elem>::round(x),
        KvDtype::Bf16 => <bf16 as Elem>::round(x),
    }
    lse
}

/// Position in a chunk list: key `i` of chunk `c`.
struct Cursor {
    c: usize,
    i: usize,
}

impl Cursor {
    /// Pointers to the next `out.len()` K (or V) rows, offset applied. The chunks must hold them.
    fn take<E: Elem>(&mut self, chunks: &[KvChunk<'_>], value: bool, out: &mut [*const E]) {
        for o in out {
            while self.i >= chunks[self.c].n_keys {
                self.c += 1;
                self.i = 0;
            }
            let ch = &chunks[self.c];
            let rows = E::rows(if value { &ch.v } else { &ch.k });
            *o = rows[ch.off + self.i * ch.stride..].as_ptr();
            self.i += 1;
        }
    }
}

/// The rows of one tile: `n` valid ones, then at least 7 copies of the first (so that kernels may
/// compute whole key groups past `n` and drop the results).
enum Rows<'a, E> {
    Direct(&'a [*const E]),
    Widened(&'a [*const f32]),
}

/// Gathers the next `n` rows of the node into `raw` (padded with the first row) and, when `widen`,
/// widens them into `tile` with pointers in `wide`.
///
/// # Safety
/// The CPU has AVX2 and F16C; `hd` is a multiple of 8; the chunks were checked for `hd` and hold at
/// least `n` more keys past the cursor; `0 < n`, `n + 7 <= raw.len() == wide.len()`,
/// `tile.len() >= n * hd`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gather<'a, E: Elem>(
    hd: usize,
    chunks: &[KvChunk<'_>],
    value: bool,
    cur: &mut Cursor,
    n: usize,
    widen: bool,
    raw: &'a mut [*const E],
    tile: &mut [f32],
    wide: &'a mut [*const f32],
) -> Rows<'a, E> {
    cur.take(chunks, value, &mut raw[..n]);
    let first = raw[0];
    raw[n..].iter_mut().for_each(|r| *r = first);
    if !widen {
        return Rows::Direct(raw);
    }
    let tp = tile.as_mut_ptr();
    for (r, &src) in raw[..n].iter().enumerate() {
        for c in (0..hd).step_by(8) {
            // SAFETY: `src` is a checked row of `hd` values, `c + 8 <= hd`, and the tile holds
            // at least `n * hd >= (r + 1) * hd` floats.
            unsafe { _mm256_storeu_ps(tp.add(r * hd + c), E::load8(src.add(c))) };
        }
    }
    for (r, w) in wide.iter_mut().enumerate() {
        *w = tp.wrapping_add(if r < n { r * hd } else { 0 });
    }
    Rows::Widened(wide)
}

/// Splits `m` vectors into balanced passes of at most `g_max`: calls `f(v0, size)` for each.
fn passes(m: usize, g_max: usize, mut f: impl FnMut(usize, usize)) {
    let n_pass = m.div_ceil(g_max);
    let mut v0 = 0;
    for p in 0..n_pass {
        let gs = (m - v0).div_ceil(n_pass - p);
        f(v0, gs);
        v0 += gs;
    }
}

/// The keys of the current tile each vector of a pass attends.
fn counts<const G: usize>(lims: &[usize], v0: usize, t0: usize, n: usize) -> [usize; G] {
    std::array::from_fn(|h| lims[v0 + h].saturating_sub(t0).min(n))
}

/// # Safety
/// The CPU has AVX2, FMA and F16C; `hd` is a multiple of 8; every chunk holds `dtype` rows and was
/// checked for `hd`; `q.len() == lims.len() * hd`, `scores.len() == lims.len() * row_len`; every
/// `lims[v] <= n_hi <=` the node's key count, and `key_base + lims[v] <= row_len`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scores(
    dtype: KvDtype,
    hd: usize,
    chunks: &[KvChunk<'_>],
    scale: f32,
    q: &[f32],
    lims: &[usize],
    key_base: usize,
    scores: &mut [f32],
    row_len: usize,
    n_hi: usize,
) {
    let a = Node {
        hd,
        chunks,
        lims,
        key_base,
        row_len,
        n_hi,
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            KvDtype::F32 => scores_t::<f32>(&a, scale, q, scores),
            KvDtype::F16 => scores_t::<f16>(&a, scale, q, scores),
            KvDtype::Bf16 => scores_t::<bf16>(&a, scale, q, scores),
        }
    }
}

/// # Safety
/// As [`scores`], with `probs` for `scores` and `lanes.len() == lims.len() * 8 * hd`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pv(
    dtype: KvDtype,
    hd: usize,
    chunks: &[KvChunk<'_>],
    probs: &[f32],
    row_len: usize,
    lims: &[usize],
    key_base: usize,
    lanes: &mut [f32],
    n_hi: usize,
) {
    let a = Node {
        hd,
        chunks,
        lims,
        key_base,
        row_len,
        n_hi,
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            KvDtype::F32 => pv_t::<f32>(&a, probs, lanes),
            KvDtype::F16 => pv_t::<f16>(&a, probs, lanes),
            KvDtype::Bf16 => pv_t::<bf16>(&a, probs, lanes),
        }
    }
}

/// The checked shape of one node call.
struct Node<'a, 'b> {
    hd: usize,
    chunks: &'a [KvChunk<'b>],
    lims: &'a [usize],
    key_base: usize,
    row_len: usize,
    /// The most keys a vector attends (the node keys read).
    n_hi: usize,
}

/// Tile loop shared by both phases: calls `f(t0, n, rows)` for consecutive tiles of the first
/// `n_hi` node keys (K rows, or V rows when `value`).
///
/// # Safety
/// As [`scores`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tiles<E: Elem>(
    a: &Node<'_, '_>,
    value: bool,
    mut f: impl FnMut(usize, usize, Rows<'_, E>),
) {
    let hd = a.hd;
    let tk = tile_keys(hd);
    let widen = a.lims.len() >= WIDEN_MIN_VECTORS && std::mem::size_of::<E>() != 4;
    // Room for whole key groups (up to 8 keys) past the tile's last key.
    let mut raw = vec![std::ptr::null::<E>(); tk + 8];
    let mut wide = vec![std::ptr::null::<f32>(); tk + 8];
    let mut tile = vec![0f32; if widen { tk * hd } else { 0 }];
    let mut cur = Cursor { c: 0, i: 0 };
    let mut t0 = 0;
    while t0 < a.n_hi {
        let n = tk.min(a.n_hi - t0);
        // SAFETY: `n_hi - t0 >= n` keys remain past the cursor; the rest is forwarded.
        let rows = unsafe {
            gather::<E>(
                hd, a.chunks, value, &mut cur, n, widen, &mut raw, &mut tile, &mut wide,
            )
        };
        f(t0, n, rows);
        t0 += n;
    }
}

/// # Safety
/// As [`scores`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_t<E: Elem>(a: &Node<'_, '_>, scale: f32, q: &[f32], scores: &mut [f32]) {
    let m = a.lims.len();
    let sp = scores.as_mut_ptr();
    let qp = q.as_ptr();
    // SAFETY: forwarded from the caller.
    unsafe {
        tiles::<E>(a, false, |t0, n, rows| {
            passes(m, SCORE_PASS, |v0, gs| {
                let p = ScorePass {
                    hd: a.hd,
                    q: qp.wrapping_add(v0 * a.hd),
                    out: sp.wrapping_add(v0 * a.row_len + a.key_base + t0),
                    row_len: a.row_len,
                    scale,
                };
                match &rows {
                    Rows::Direct(r) => score_pass_g(&p, r, a.lims, v0, gs, t0, n),
                    Rows::Widened(r) => score_pass_g(&p, r, a.lims, v0, gs, t0, n),
                }
            });
        })
    }
}

/// One pass of vectors over one tile in the scores phase.
struct ScorePass {
    hd: usize,
    /// The pass's first query vector (`G` rows of `hd`).
    q: *const f32,
    /// Score of its first vector for the tile's first key (rows `row_len` apart).
    out: *mut f32,
    row_len: usize,
    scale: f32,
}

/// # Safety
/// As [`scores`]; `1 <= gs <= 3` vectors from `v0` (all in range), tile at node key `t0` with `n`
/// rows (`rows.len() >= n + 7`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn score_pass_g<S: Elem>(
    p: &ScorePass,
    rows: &[*const S],
    lims: &[usize],
    v0: usize,
    gs: usize,
    t0: usize,
    n: usize,
) {
    // SAFETY: forwarded; `counts` are the keys of this tile each vector attends.
    unsafe {
        match gs {
            1 => score_pass::<S, 1, 8>(p, rows, counts::<1>(lims, v0, t0, n)),
            2 => score_pass::<S, 2, 4>(p, rows, counts::<2>(lims, v0, t0, n)),
            _ => score_pass::<S, 3, 4>(p, rows, counts::<3>(lims, v0, t0, n)),
        }
    }
}

/// Scores of `G` vectors for the tile's keys, `KB` keys at a time (`G * KB <= 16` accumulators),
/// each 8-dimension slice of a key row loaded once for the `G` vectors; vector `h` writes its first
/// `cnt[h]` keys.
///
/// # Safety
/// As [`score_pass_g`]; `rows` holds at least `max(cnt) + KB - 1` rows of `hd` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn score_pass<S: Elem, const G: usize, const KB: usize>(
    p: &ScorePass,
    rows: &[*const S],
    cnt: [usize; G],
) {
    let hd = p.hd;
    let hi = cnt.iter().copied().max().unwrap_or(0);
    let scale_v = _mm256_set1_ps(p.scale);
    let mut i = 0;
    while i < hi {
        let r: [*const S; KB] = std::array::from_fn(|k| rows[i + k]);
        let mut acc = [_mm256_setzero_ps(); 16];
        for c in (0..hd).step_by(8) {
            // SAFETY: `c + 8 <= hd`; the pass's `G` query vectors and every row hold `hd` values.
            unsafe {
                let qv: [__m256; G] = std::array::from_fn(|h| _mm256_loadu_ps(p.q.add(h * hd + c)));
                for k in 0..KB {
                    let kv = S::load8(r[k].add(c));
                    for h in 0..G {
                        acc[h * KB + k] = _mm256_fmadd_ps(qv[h], kv, acc[h * KB + k]);
                    }
                }
            }
        }
        let mut s = [0f32; 16];
        for (g8, s8) in s.chunks_exact_mut(8).enumerate().take((G * KB).div_ceil(8)) {
            let a8: [__m256; 8] = std::array::from_fn(|x| acc[8 * g8 + x]);
            // SAFETY: `s8` holds 8 floats.
            unsafe { _mm256_storeu_ps(s8.as_mut_ptr(), _mm256_mul_ps(hsum_x8(a8), scale_v)) };
        }
        for h in 0..G {
            for k in 0..KB {
                if i + k < cnt[h] {
                    // SAFETY: `i + k < cnt[h]`: the key is inside vector `h`'s row (checked
                    // `key_base + lims <= row_len`).
                    unsafe { *p.out.add(h * p.row_len + i + k) = s[h * KB + k] };
                }
            }
        }
        i += KB;
    }
}

/// # Safety
/// As [`pv`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_t<E: Elem>(a: &Node<'_, '_>, probs: &[f32], lanes: &mut [f32]) {
    let m = a.lims.len();
    let hd = a.hd;
    let pp = probs.as_ptr();
    let lp = lanes.as_mut_ptr();
    // SAFETY: forwarded from the caller.
    unsafe {
        tiles::<E>(a, true, |t0, n, rows| {
            passes(m, PV_PASS, |v0, gs| {
                let p = PvPass {
                    hd,
                    phase: (a.key_base + t0) % 8,
                    p: pp.wrapping_add(v0 * a.row_len + a.key_base + t0),
                    row_len: a.row_len,
                    lanes: lp.wrapping_add(v0 * 8 * hd),
                };
                match &rows {
                    Rows::Direct(r) => pv_pass_g(&p, r, a.lims, v0, gs, t0, n),
                    Rows::Widened(r) => pv_pass_g(&p, r, a.lims, v0, gs, t0, n),
                }
            });
        })
    }
}

/// One pass of vectors over one tile in the `P·V` phase.
struct PvPass {
    hd: usize,
    /// Lane of the tile's first key: `(key_base + t0) % 8`.
    phase: usize,
    /// Probability of the pass's first vector for the tile's first key (rows `row_len` apart).
    p: *const f32,
    row_len: usize,
    /// Lanes of the pass's first vector (`8 * hd` per vector).
    lanes: *mut f32,
}

/// # Safety
/// As [`pv`]; `1 <= gs <= 3` vectors from `v0` (all in range), tile at node key `t0` with `n` rows.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_pass_g<S: Elem>(
    p: &PvPass,
    rows: &[*const S],
    lims: &[usize],
    v0: usize,
    gs: usize,
    t0: usize,
    n: usize,
) {
    // SAFETY: forwarded; `counts` are the keys of this tile each vector attends.
    unsafe {
        match gs {
            1 => pv_blocks::<S, 1>(p, rows, counts::<1>(lims, v0, t0, n)),
            2 => pv_blocks::<S, 2>(p, rows, counts::<2>(lims, v0, t0, n)),
            _ => pv_blocks::<S, 3>(p, rows, counts::<3>(lims, v0, t0, n)),
        }
    }
}

/// `P·V` of `G` vectors over the tile in blocks of `NT` 8-wide output slices (`G * NT <= 16`
/// accumulators; the widest block that fits).
///
/// # Safety
/// As [`pv_pass_g`], with `cnt` the keys of the tile each vector attends.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_blocks<S: Elem, const G: usize>(p: &PvPass, rows: &[*const S], cnt: [usize; G]) {
    let max_nt = match G {
        1 => 8,
        2 | 3 => 4,
        _ => 2,
    };
    let slices = p.hd / 8;
    let mut s0 = 0;
    while s0 < slices {
        let nt = match (slices - s0).min(max_nt) {
            8.. => 8,
            4..=7 => 4,
            2 | 3 => 2,
            _ => 1,
        };
        // SAFETY: `8 * (s0 + nt) <= hd`; the rest is forwarded.
        unsafe {
            match nt {
                8 => pv_pass::<S, G, 8>(p, rows, cnt, 8 * s0),
                4 => pv_pass::<S, G, 4>(p, rows, cnt, 8 * s0),
                2 => pv_pass::<S, G, 2>(p, rows, cnt, 8 * s0),
                _ => pv_pass::<S, G, 1>(p, rows, cnt, 8 * s0),
            }
        }
        s0 += nt;
    }
}

/// `P·V` for output dimensions `c0..c0 + 8 * NT` of `G` vectors over the tile: for each lane `l`,
/// the accumulators are loaded from `lanes`, the tile's keys `j ≡ l (mod 8)` added in order with FMA
/// (vector `h` only its first `cnt[h]` keys), and stored back.
///
/// # Safety
/// As [`pv_pass_g`]; `c0 + 8 * NT <= hd`, rows hold `hd` values, `rows.len() >= max(cnt)`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_pass<S: Elem, const G: usize, const NT: usize>(
    p: &PvPass,
    rows: &[*const S],
    cnt: [usize; G],
    c0: usize,
) {
    let hd = p.hd;
    let lo = cnt.iter().copied().min().unwrap_or(0);
    let hi = cnt.iter().copied().max().unwrap_or(0);
    for l in 0..8 {
        let i0 = (l + 8 - p.phase) % 8;
        if i0 >= hi {
            continue;
        }
        // Lane `l` of vector `h`, dimensions from `c0`.
        let lane = |h: usize| p.lanes.wrapping_add(h * 8 * hd + l * hd + c0);
        let mut acc = [[_mm256_setzero_ps(); NT]; G];
        for h in 0..G {
            for t in 0..NT {
                // SAFETY: vector `h` of the pass is in range; `l * hd + c0 + 8 * t + 8 <= 8 * hd`.
                acc[h][t] = unsafe { _mm256_loadu_ps(lane(h).add(8 * t)) };
            }
        }
        let mut i = i0;
        // Keys every vector of the pass attends.
        while i < lo {
            let row = rows[i];
            let pr: [__m256; G] = std::array::from_fn(|h| {
                // SAFETY: `i < cnt[h]`: inside vector `h`'s row.
                unsafe { _mm256_broadcast_ss(&*p.p.add(h * p.row_len + i)) }
            });
            for t in 0..NT {
                // SAFETY: `row` holds `hd` values and `c0 + 8 * t + 8 <= hd`.
                let v = unsafe { S::load8(row.add(c0 + 8 * t)) };
                for h in 0..G {
                    acc[h][t] = _mm256_fmadd_ps(pr[h], v, acc[h][t]);
                }
            }
            i += 8;
        }
        // Keys only some attend.
        while i < hi {
            let row = rows[i];
            for h in 0..G {
                if i >= cnt[h] {
                    continue;
                }
                // SAFETY: `i < cnt[h]`: inside vector `h`'s row.
                let pr = unsafe { _mm256_broadcast_ss(&*p.p.add(h * p.row_len + i)) };
                for t in 0..NT {
                    // SAFETY: as above.
                    let v = unsafe { S::load8(row.add(c0 + 8 * t)) };
                    acc[h][t] = _mm256_fmadd_ps(pr, v, acc[h][t]);
                }
            }
            i += 8;
        }
        for h in 0..G {
            for t in 0..NT {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(lane(h).add(8 * t), acc[h][t]) };
            }
        }
    }
}
