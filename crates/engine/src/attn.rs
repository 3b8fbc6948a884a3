//! `paged` attention: every sequence attends its own block table. Blocks shared by several sequences
//! (a common prefix) are stored once but read once per sequence — the PagedAttention baseline.

use ep_kernels::paged::{attend_group, GroupScratch, KvChunk};
use ep_kernels::simd::Path;
use ep_kv::{BlockId, BlockPool};
use ep_model::kv::{slice_of_rows, Attention, AttnShape, SeqSlice};
use ep_model::ModelError;
use rayon::prelude::*;

/// The attention step over the block pool for one forward pass. `tables[seq]` is the block table of
/// the sequence with id `seq` (the engine's slot number); it must already cover every position the
/// batch writes.
pub struct PagedAttention<'a> {
    pub shape: AttnShape,
    pub pool: &'a mut BlockPool,
    pub tables: &'a [Vec<BlockId>],
}

impl PagedAttention<'_> {
    /// Stores the batch's new K/V (`rows × kv_width` each) for `layer` into the sequences' blocks,
    /// one write per run of rows inside one block.
    pub fn store(
        &mut self,
        layer: usize,
        slices: &[SeqSlice],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), ModelError> {
        let kw = self.shape.kv_width();
        let bt = self.pool.layout().block_tokens;
        for sl in slices {
            let table = self
                .tables
                .get(sl.seq)
                .ok_or_else(|| ModelError::Kv(format!("unknown sequence {}", sl.seq)))?;
            let end = sl.pos + sl.rows.len();
            if table.len() * bt < end {
                return Err(ModelError::Kv(format!(
                    "sequence {} has {} blocks, {end} positions needed",
                    sl.seq,
                    table.len()
                )));
            }
            let mut p = sl.pos;
            while p < end {
                let n = (bt - p % bt).min(end - p);
                let r = sl.rows.start + (p - sl.pos);
                let rows = r * kw..(r + n) * kw;
                self.pool
                    .write(layer, table[p / bt], p % bt, &k[rows.clone()], &v[rows]);
                p += n;
            }
        }
        Ok(())
    }
}

impl Attention for PagedAttention<'_> {
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
        let (qw, hd, g) = (sh.q_width(), sh.head_dim, sh.group());
        let bt = self.pool.layout().block_tokens;
        self.store(layer, slices, k, v)?;
        let by_row = slice_of_rows(slices, q.len() / qw);
        let pool: &BlockPool = self.pool;
        let tables = self.tables;
        // One task per (query row, KV head): the group's query heads read each K/V row once.
        out.par_chunks_mut(g * hd).enumerate().for_each_init(
            || {
                (
                    GroupScratch::default(),
                    Vec::<KvChunk<'_>>::new(),
                    vec![0f32; g],
                )
            },
            |(scratch, chunks, lse), (i, o)| {
                let (r, kvh) = (i / sh.n_head_kv, i % sh.n_head_kv);
                let si = by_row[r];
                if si == usize::MAX {
                    return;
                }
                let sl = &slices[si];
                let table = &tables[sl.seq];
                let n_keys = sl.pos + (r - sl.rows.start) + 1;
                chunks.clear();
                chunks.extend((0..n_keys.div_ceil(bt)).map(|b| {
                    let n = (n_keys - b * bt).min(bt);
                    pool.chunk(layer, table[b], n, kvh)
                }));
                let qs = &q[r * qw + kvh * g * hd..r * qw + (kvh + 1) * g * hd];
                attend_group(kernels, qs, hd, chunks, sh.scale(), scratch, o, lse);
                // The chunk list borrows the pool only for this task.
                chunks.clear();
            },
        );
        Ok(())
    }
}
