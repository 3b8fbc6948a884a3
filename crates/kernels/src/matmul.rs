//! Matmul of a ggml-typed weight matrix with f32 activations, and row lookup.
//!
//! `out[i*m + j] = dot(w row j, x row i)`: each output element is exactly one call of the dot product of
//! [`crate::quant`] (ggml's `vec_dot` numerics) on the activation row converted once to the weight
//! type's vec-dot type. So a result depends only on its two rows — never on `n`, the thread count or
//! how the work is split.

use rayon::prelude::*;

use crate::quant::{self, dequantize_row, quantize_activation_row_with, ActScales4, GgmlType};
use crate::simd::Path;

pub use crate::quant::KernelError;

/// A weight matrix in ggml layout: `rows` rows (output features) of `cols` elements (input features),
/// row-major, each row `ty.row_bytes(cols)` bytes of GGUF data (little-endian, any alignment).
#[derive(Clone, Copy, Debug)]
pub struct WeightRef<'a> {
    pub ty: GgmlType,
    /// Output features `m`.
    pub rows: usize,
    /// Input features `k`.
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> WeightRef<'a> {
    /// Checks that `cols` is a whole number of blocks and `data` holds exactly `rows` rows.
    pub fn validate(&self) -> Result<(), KernelError> {
        let row_bytes = self.row_bytes()?;
        let expected = row_bytes
            .checked_mul(self.rows)
            .ok_or(KernelError::WeightBytes {
                ty: self.ty.name(),
                rows: self.rows,
                cols: self.cols,
                got: self.data.len(),
                expected: usize::MAX,
            })?;
        if self.data.len() != expected {
            return Err(KernelError::WeightBytes {
                ty: self.ty.name(),
                rows: self.rows,
                cols: self.cols,
                got: self.data.len(),
                expected,
            });
        }
        Ok(())
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> Result<usize, KernelError> {
        self.ty
            .row_bytes(self.cols)
            .ok_or(KernelError::NotBlockAligned {
                ty: self.ty.name(),
                cols: self.cols,
                block: self.ty.block_size(),
            })
    }

    /// The bytes of row `j` (`validate` first).
    fn row(&self, j: usize, row_bytes: usize) -> &'a [u8] {
        &self.data[j * row_bytes..(j + 1) * row_bytes]
    }
}

/// Dequantises row `row` of `w` into `out` (`w.cols` elements): the embedding lookup (ggml's
/// `get_rows`).
pub fn get_row(w: &WeightRef, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
    w.validate()?;
    if row >= w.rows {
        return Err(KernelError::RowOutOfRange { row, rows: w.rows });
    }
    if out.len() != w.cols {
        return Err(KernelError::Length {
            what: "get_row output",
            got: out.len(),
            expected: w.cols,
        });
    }
    let rb = w.row_bytes()?;
    dequantize_row(w.ty, w.row(row, rb), out);
    Ok(())
}

/// Work (multiply-adds) below which the matmul runs on the calling thread only.
const SERIAL_WORK: usize = 1 << 16;
/// Bounds on the weight rows per parallel task (a multiple of 4).
const MIN_CHUNK: usize = 16;
const MAX_CHUNK: usize = 64;

/// `out[i*m + j] = dot(w row j, x row i)` for `i` in `0..n`: `x` is `n x k` row-major f32, `out` is
/// `n x m`, with `m = w.rows`, `k = w.cols`, on kernel path `path` (both paths give the same bits;
/// a path this CPU cannot run is [`KernelError::PathUnavailable`]). Runs on the current rayon pool
/// (call it inside `pool.install`).
pub fn matmul_with(
    path: Path,
    w: &WeightRef,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    if !path.is_available() {
        return Err(KernelError::PathUnavailable(path.name()));
    }
    w.validate()?;
    let at =
        w.ty.vec_dot_type()
            .ok_or(KernelError::UnsupportedWeightType(w.ty.name()))?;
    let (m, k) = (w.rows, w.cols);
    check_len("matmul activations", x.len(), n.checked_mul(k))?;
    check_len("matmul output", out.len(), n.checked_mul(m))?;
    if n == 0 || m == 0 {
        return Ok(());
    }
    if k == 0 {
        // Empty dot products (and no zero-sized chunks below).
        out.fill(0.0);
        return Ok(());
    }
    let wrb = w.row_bytes()?;
    let arb = at.row_bytes(k).ok_or(KernelError::NotBlockAligned {
        ty: at.name(),
        cols: k,
        block: at.block_size(),
    })?;

    // Activations converted once per row, as ggml's `from_float` into `wdata`.
    let mut act = vec![0u8; n * arb];
    if n >= 4 && n * k >= SERIAL_WORK {
        act.par_chunks_mut(arb)
            .zip(x.par_chunks(k))
            .for_each(|(dst, src)| quantize_activation_row_with(path, at, src, dst));
    } else {
        for (dst, src) in act.chunks_mut(arb).zip(x.chunks(k)) {
            quantize_activation_row_with(path, at, src, dst);
        }
    }

    // For the tile kernels: each group of four activation rows' scales as f32, block-major.
    let groups = if quant::has_tile_kernel(path, w.ty) {
        n / 4
    } else {
        0
    };
    let nb = k / quant::QK;
    let g4 = 4 * nb;
    // (K-quant activations carry an f32 scale per super-block: their tile kernel reads it in place.)
    let scaled = matches!(at, GgmlType::Q8_0 | GgmlType::Q8_1);
    let sgroups = if scaled { groups } else { 0 };
    let mut gd = vec![0f32; sgroups * g4];
    let mut gs = vec![
        0f32;
        if at == GgmlType::Q8_1 {
            sgroups * g4
        } else {
            0
        }
    ];
    for g in 0..sgroups {
        let rows = std::array::from_fn(|c| &act[(4 * g + c) * arb..(4 * g + c + 1) * arb]);
        let s = gs.get_mut(g * g4..(g + 1) * g4).unwrap_or_default();
        ActScales4::fill(at, rows, &mut gd[g * g4..(g + 1) * g4], s);
    }

    let job = Job {
        path,
        w: *w,
        wrb,
        act: &act,
        arb,
        n,
        groups,
        nb,
        gd: &gd,
        gs: &gs,
    };

    // SAFETY: `split_columns` gives every task a column range of its own.
    split_columns(m, n, k, out, |j0, len, dst| unsafe {
        job.rows(j0, len, dst)
    });
    Ok(())
}

/// Runs `task(j0, len, out)` for column (weight-row) ranges that cover `0..m` of the `n x m`
/// output `out`, each range given to one task alone; on the current rayon pool, or on this thread
/// when the work (`n m k` multiply-adds) is small.
fn split_columns(
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    task: impl Fn(usize, usize, OutPtr) + Sync,
) {
    debug_assert_eq!(out.len(), n * m);
    let dst = OutPtr {
        p: out.as_mut_ptr(),
        m,
    };
    let serial =
        n.saturating_mul(m).saturating_mul(k) < SERIAL_WORK || rayon::current_num_threads() <= 1;
    if serial {
        task(0, m, dst);
    } else {
        let chunk = chunk_rows(m, rayon::current_num_threads());
        (0..m.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let j0 = c * chunk;
            task(j0, chunk.min(m - j0), dst);
        });
    }
}

fn check_len(what: &'static str, got: usize, expected: Option<usize>) -> Result<(), KernelError> {
    match expected {
        Some(e) if e == got => Ok(()),
        _ => Err(KernelError::Length {
            what,
            got,
            expected: expected.unwrap_or(usize::MAX),
        }),
    }
}

/// Weight rows per task: about 8 tasks per thread, within `MIN_CHUNK..=MAX_CHUNK`, a multiple of 4.
fn chunk_rows(m: usize, threads: usize) -> usize {
    let per = m.div_ceil(threads.max(1) * 8);
    per.next_multiple_of(4).clamp(MIN_CHUNK, MAX_CHUNK)
}

struct Job<'a> {
    path: Path,
    w: WeightRef<'a>,
    wrb: usize,
    act: &'a [u8],
    arb: usize,
    n: usize,
    /// Activation rows `0..4 * groups` go through the tile kernels (four at a time).
    groups: usize,
    nb: usize,
    gd: &'a [f32],
    gs: &'a [f32],
}

/// Activation rows processed against a task's weight rows before moving to the next ones (their
/// quantised rows, 64 x 648 bytes for k = 576, stay in L2; 32 measured the same).
const ACT_TILE: usize = 64;

/// The `n x m` output matrix, written by tasks that own disjoint column (weight-row) ranges.
#[derive(Clone, Copy)]
struct OutPtr {
    p: *mut f32,
    /// Row stride (output features).
    m: usize,
}

// SAFETY: tasks write disjoint elements (each owns a column range); the pointer outlives them (the
// parallel loop ends before `matmul_with` returns).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes element `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` is inside the matrix and no other thread writes it.
    #[inline(always)]
    unsafe fn put(self, i: usize, j: usize, v: f32) {
        // SAFETY: in bounds and unshared (caller).
        unsafe { *self.p.add(i * self.m + j) = v };
    }
}

impl Job<'_> {
    fn act_row(&self, i: usize) -> &[u8] {
        &self.act[i * self.arb..(i + 1) * self.arb]
    }

    /// Activation groups `g0..g1` (rows `4 g0..4 g1`) against weight rows `j0..j0 + len`: one panel
    /// kernel call per weight row (the row unpacked once for all the groups).
    ///
    /// # Safety
    /// As [`Self::rows`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn panels(
        &self,
        j0: usize,
        len: usize,
        g0: usize,
        g1: usize,
        out: OutPtr,
        scratch: &mut Vec<u8>,
        res: &mut Vec<[f32; 4]>,
    ) {
        let (k, ty) = (self.w.cols, self.w.ty);
        let g4 = 4 * self.nb;
        let act = &self.act[4 * g0 * self.arb..4 * g1 * self.arb];
        let sc = ActScales4 {
            d: self.gd.get(g0 * g4..g1 * g4).unwrap_or_default(),
            s: self.gs.get(g0 * g4..g1 * g4).unwrap_or_default(),
        };
        res.resize(g1 - g0, [0.0; 4]);
        for jr in 0..len {
            let wr = self.w.row(j0 + jr, self.wrb);
            quant::vec_dot_panel_with(self.path, ty, k, wr, act, self.arb, &sc, scratch, res);
            for (g, dr) in res.iter().enumerate() {
                for (c, &v) in dr.iter().enumerate() {
                    // SAFETY: column `j0 + jr` is this task's (caller), row `4 (g0 + g) + c < n`.
                    unsafe { out.put(4 * (g0 + g) + c, j0 + jr, v) };
                }
            }
        }
    }

    /// Computes output columns `j0..j0 + len` (weight rows) for all activation rows into `out`.
    ///
    /// # Safety
    /// `j0 + len <= m`, `out` is the `n x m` output, and no other thread writes these columns.
    unsafe fn rows(&self, j0: usize, len: usize, out: OutPtr) {
        let (n, k, ty) = (self.n, self.w.cols, self.w.ty);
        debug_assert!(j0 + len <= self.w.rows);
        let tiled = 4 * self.groups;
        let wrows = &self.w.data[j0 * self.wrb..(j0 + len) * self.wrb];
        if n == 1 {
            // The decode case: all of this task's weight rows against the one activation row (the
            // weights stream once, four rows at a time, with prefetching).
            // SAFETY: columns `j0..j0 + len` of the single output row are this task's alone.
            let o = unsafe { std::slice::from_raw_parts_mut(out.p.add(j0), len) };
            quant::vec_dot_rows_with(self.path, ty, k, wrows, self.wrb, self.act_row(0), o);
            return;
        }
        let mut col = vec![0f32; len];
        let (mut scratch, mut res) = (Vec::new(), Vec::new());
        for i0 in (0..n).step_by(ACT_TILE) {
            let i1 = (i0 + ACT_TILE).min(n);
            // Whole groups of four activation rows: tile kernels.
            let (g0, g1) = (i0 / 4, i1.min(tiled) / 4);
            if g1 > g0 {
                // SAFETY: as for the caller.
                unsafe { self.panels(j0, len, g0, g1, out, &mut scratch, &mut res) };
            }
            // The other activation rows: all of this task's weight rows against each.
            for i in i0.max(4 * g1)..i1 {
                quant::vec_dot_rows_with(
                    self.path,
                    ty,
                    k,
                    wrows,
                    self.wrb,
                    self.act_row(i),
                    &mut col,
                );
                for (jr, &v) in col.iter().enumerate() {
                    // SAFETY: as above.
                    unsafe { out.put(i, j0 + jr, v) };
                }
            }
        }
    }
}

/// `out[i*m + j]` = the f32 dot product (ggml's `vec_dot_f32` order) of weight row `j`, widened
/// exactly to f32, with activation row `i` as given, on kernel path `path`: unlike [`matmul_with`],
/// the activations are not rounded to the weight type's vec-dot type. For dense F16 / BF16 weights
/// that are compared against a framework that computes in f32 (Hugging Face checkpoints); for F32
/// weights it is [`matmul_with`]. Still one dot call per output element on the same two rows, so a
/// result never depends on `n`, threads or chunking. A path this CPU cannot run is
/// [`KernelError::PathUnavailable`].
pub fn matmul_f32_act_with(
    path: Path,
    w: &WeightRef,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    if w.ty == GgmlType::F32 {
        return matmul_with(path, w, x, n, out);
    }
    if !path.is_available() {
        return Err(KernelError::PathUnavailable(path.name()));
    }
    w.validate()?;
    if w.ty.vec_dot_type().is_none() {
        return Err(KernelError::UnsupportedWeightType(w.ty.name()));
    }
    let (m, k) = (w.rows, w.cols);
    check_len("matmul activations", x.len(), n.checked_mul(k))?;
    check_len("matmul output", out.len(), n.checked_mul(m))?;
    if n == 0 || m == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let wrb = w.row_bytes()?;
    let mut act = vec![0u8; n * 4 * k];
    for (dst, src) in act.chunks_mut(4 * k).zip(x.chunks(k)) {
        quantize_activation_row_with(path, GgmlType::F32, src, dst);
    }
    // Each weight row is widened once, then dotted with every activation row.
    split_columns(m, n, k, out, |j0, len, dst| {
        let (mut wf, mut wb) = (vec![0f32; k], vec![0u8; 4 * k]);
        for j in j0..j0 + len {
            dequantize_row(w.ty, w.row(j, wrb), &mut wf);
            for (b, v) in wb.chunks_exact_mut(4).zip(wf.iter()) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            for i in 0..n {
                let a = &act[i * 4 * k..(i + 1) * 4 * k];
                let v = quant::vec_dot_with(path, GgmlType::F32, k, &wb, a);
                // SAFETY: column `j` is this task's (`split_columns`), `i < n`.
                unsafe { dst.put(i, j, v) };
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{f32_to_bf16, f32_to_f16_hw};

    fn weights(ty: GgmlType, m: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut wide = Vec::new();
        for e in 0..m * k {
            let v = ((e * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.37;
            let (b, f) = match ty {
                GgmlType::BF16 => {
                    let b = f32_to_bf16(v);
                    (b.to_le_bytes().to_vec(), crate::quant::bf16_to_f32(b))
                }
                _ => {
                    let b = f32_to_f16_hw(v);
                    (b.to_le_bytes().to_vec(), crate::quant::f16_to_f32(b))
                }
            };
            bytes.extend(b);
            wide.push(f);
        }
        (bytes, wide)
    }

    #[test]
    fn f32_activations_match_f64_and_are_batch_invariant() {
        let (m, k, n) = (37, 100, 9);
        let x: Vec<f32> = (0..n * k)
            .map(|e| ((e * 104729 % 997) as f32 / 997.0 - 0.5) * 3.0)
            .collect();
        let path = Path::detect();
        for ty in [GgmlType::F16, GgmlType::BF16] {
            let (bytes, wide) = weights(ty, m, k);
            let w = WeightRef {
                ty,
                rows: m,
                cols: k,
                data: &bytes,
            };
            let mut out = vec![0f32; n * m];
            matmul_f32_act_with(path, &w, &x, n, &mut out).unwrap();
            for i in 0..n {
                let mut one = vec![0f32; m];
                matmul_f32_act_with(path, &w, &x[i * k..(i + 1) * k], 1, &mut one).unwrap();
                assert_eq!(one, out[i * m..(i + 1) * m], "{ty:?} row {i}");
                for j in 0..m {
                    let r: f64 = (0..k)
                        .map(|e| wide[j * k + e] as f64 * x[i * k + e] as f64)
                        .sum();
                    let d = (out[i * m + j] as f64 - r).abs();
                    assert!(
                        d <= 1e-5 * (1.0 + r.abs()),
                        "{ty:?} ({i},{j}): {} vs {r}",
                        out[i * m + j]
                    );
                }
            }
        }
    }
}
