//! The attention step of the forward pass, behind a KV interface.
//!
//! The forward pass computes Q, K and V for the new tokens of a batch and hands them, layer by layer, to
//! an [`Attention`] implementation, which stores K/V where it keeps them and returns each query's
//! attention output. [`ContiguousKv`] keeps every sequence's KV in one growing f16 buffer per layer and is
//! the reference; the engine supplies paged and spliced implementations over the same interface.
//!
//! Numerics, shared by every implementation (as llama.cpp's CPU backend without flash attention): K and V
//! are stored in f16, Q is rounded to f16 before `Q·Kᵀ`, scores are scaled by `1/sqrt(head_dim)`, softmax
//! in f32 with an f64 sum, and probabilities are rounded to f16 before `P·V`.

use std::ops::Range;

use ep_kernels::attention::{attend_head, HeadScratch, KvView};
use ep_kernels::ops;
use ep_kernels::simd::Path;
use half::f16;
use rayon::prelude::*;

use crate::ModelError;

/// Identifies a sequence in a KV store.
pub type SeqId = usize;

/// Shape of the attention step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    pub fn group(&self) -> usize {
        self.n_head / self.n_head_kv
    }
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// One sequence's part of a batch: `rows` of the batch's activations hold its new tokens, the first at
/// position `pos` (the number of tokens the sequence already has in the KV store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSlice {
    pub seq: SeqId,
    pub rows: Range<usize>,
    pub pos: usize,
}

/// For each of `n_rows` batch rows, the index of the slice holding it (`usize::MAX` for a row outside
/// every slice, which attention leaves untouched).
pub fn slice_of_rows(slices: &[SeqSlice], n_rows: usize) -> Vec<usize> {
    let mut by_row = vec![usize::MAX; n_rows];
    for (i, sl) in slices.iter().enumerate() {
        by_row[sl.rows.clone()].fill(i);
    }
    by_row
}

/// Stores K/V of new tokens and computes attention for their queries.
pub trait Attention {
    /// For `layer`: append `k`, `v` (rows × kv_width) for each slice, then write into `out` (rows ×
    /// q_width) each query row's attention over its sequence's KV up to and including its own
    /// position. `q` rows are already rotated. The attention kernels run on `kernels` (the model's
    /// path, [`crate::Model::kernels`]).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        kernels: Path,
        layer: usize,
        slices: &[SeqSlice],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
    ) -> Result<(), ModelError>;
}

#[derive(Default)]
struct SeqKv {
    len: usize,
    /// Per layer: positions × kv_width, f16.
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

/// The reference KV store: each sequence's K/V in one contiguous f16 buffer per layer.
pub struct ContiguousKv {
    shape: AttnShape,
    max_len: usize,
    seqs: Vec<Option<SeqKv>>,
}

impl ContiguousKv {
    /// A store whose sequences may hold up to `max_len` tokens each.
    pub fn new(shape: AttnShape, max_len: usize) -> Self {
        Self {
            shape,
            max_len,
            seqs: Vec::new(),
        }
    }

    /// Creates an empty sequence and returns its id.
    pub fn add_seq(&mut self) -> SeqId {
        let s = SeqKv {
            len: 0,
            k: vec![Vec::new(); self.shape.n_layer],
            v: vec![Vec::new(); self.shape.n_layer],
        };
        if let Some(i) = self.seqs.iter().position(Option::is_none) {
            self.seqs[i] = Some(s);
            i
        } else {
            self.seqs.push(Some(s));
            self.seqs.len() - 1
        }
    }

    /// Creates a new sequence holding a copy of `seq`'s KV (its own copy: attention reads it separately).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId, ModelError> {
        let src = self
            .seqs
            .get(seq)
            .and_then(Option::as_ref)
            .ok_or_else(|| ModelError::Kv(format!("unknown sequence {seq}")))?;
        let copy = SeqKv {
            len: src.len,
            k: src.k.clone(),
            v: src.v.clone(),
        };
        let id = self.add_seq();
        self.seqs[id] = Some(copy);
        Ok(id)
    }

    /// Frees a sequence.
    pub fn remove_seq(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.get_mut(seq) {
            *s = None;
        }
    }

    /// Number of tokens stored for a sequence (0 for an unknown one).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs
            .get(seq)
            .and_then(Option::as_ref)
            .map_or(0, |s| s.len)
    }

    /// Drops a sequence's tokens from position `len` on.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        let w = self.shape.kv_width();
        if let Some(Some(s)) = self.seqs.get_mut(seq) {
            if len < s.len {
                s.len = len;
                for l in 0..self.shape.n_layer {
                    s.k[l].truncate(len * w);
                    s.v[l].truncate(len * w);
                }
            }
        }
    }

    /// A sequence's stored K and V rows of `layer` (positions × kv_width, f16).
    pub fn rows(&self, seq: SeqId, layer: usize) -> Option<(&[f16], &[f16])> {
        let s = self.seqs.get(seq)?.as_ref()?;
        Some((s.k.get(layer)?, s.v.get(layer)?))
    }

    /// Appends K and V rows (whole rows of kv_width, f16) to one layer of a sequence — KV computed
    /// elsewhere. The sequence's length is the fewest tokens any layer holds.
    pub fn push_rows(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f16],
        v: &[f16],
    ) -> Result<(), ModelError> {
        let (kw, n_layer, max_len) = (self.shape.kv_width(), self.shape.n_layer, self.max_len);
        let s = self
            .seqs
            .get_mut(seq)
            .and_then(Option::as_mut)
            .ok_or_else(|| ModelError::Kv(format!("unknown sequence {seq}")))?;
        if layer >= n_layer || k.len() != v.len() || !k.len().is_multiple_of(kw) {
            return Err(ModelError::Kv(format!(
                "rows for layer {layer}: {} K and {} V values, not whole rows of {kw}",
                k.len(),
                v.len()
            )));
        }
        let end = s.k[layer].len() / kw + k.len() / kw;
        if end > max_len {
            return Err(ModelError::ContextFull {
                needed: end,
                max: max_len,
            });
        }
        s.k[layer].extend_from_slice(k);
        s.v[layer].extend_from_slice(v);
        s.len = s.k.iter().map(|l| l.len() / kw).min().unwrap_or(0);
        Ok(())
    }

    /// Largest number of tokens one sequence may hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

impl Attention for ContiguousKv {
    fn attend(
        &mut self,
        kernels: Path,
        layer: usize,
        slices: &[SeqSlice],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let sh = self.shape;
        let (qw, kw, hd) = (sh.q_width(), sh.kv_width(), sh.head_dim);
        // Store the new K/V.
        for sl in slices {
            let max_len = self.max_len;
            let s = self
                .seqs
                .get_mut(sl.seq)
                .and_then(Option::as_mut)
                .ok_or_else(|| ModelError::Kv(format!("unknown sequence {}", sl.seq)))?;
            if s.k[layer].len() != sl.pos * kw {
                return Err(ModelError::Kv(format!(
                    "sequence {} holds {} tokens at layer {layer}, batch says position {}",
                    sl.seq,
                    s.k[layer].len() / kw,
                    sl.pos
                )));
            }
            let end = sl.pos + sl.rows.len();
            if end > max_len {
                return Err(ModelError::ContextFull {
                    needed: end,
                    max: max_len,
                });
            }
            let rows = sl.rows.start * kw..sl.rows.end * kw;
            s.k[layer].extend(k[rows.clone()].iter().map(|&x| f16::from_f32(x)));
            s.v[layer].extend(v[rows].iter().map(|&x| f16::from_f32(x)));
            if layer + 1 == sh.n_layer {
                s.len = end;
            }
        }
        let seqs = &self.seqs;
        let by_row = slice_of_rows(slices, q.len() / qw);
        // One task per (query row, head): a single decoding sequence still spreads over all threads.
        out.par_chunks_mut(hd).enumerate().for_each_init(
            || (HeadScratch::default(), vec![f16::ZERO; hd]),
            |(scratch, q16), (i, o)| {
                let (r, h) = (i / sh.n_head, i % sh.n_head);
                let si = by_row[r];
                if si == usize::MAX {
                    return;
                }
                let sl = &slices[si];
                let s = seqs[sl.seq].as_ref().expect("checked above");
                let n_keys = sl.pos + (r - sl.rows.start) + 1;
                let kvh = h / sh.group();
                ops::to_f16(&q[r * qw + h * hd..r * qw + (h + 1) * hd], q16);
                let view = KvView {
                    k: &s.k[layer],
                    v: &s.v[layer],
                    n_keys,
                    stride: kw,
                    off: kvh * hd,
                };
                attend_head(kernels, q16, view, sh.scale(), scratch, o);
            },
        );
        Ok(())
    }
}
