//! `splice` and `relay` attention: the batch's block tables form a prefix tree; each shared tree node is
//! attended by the queries of all sequences below it in one product, reading its K/V once per step.
//!
//! **Exactness.** Attention is computed in three phases per query vector (one query head of one row):
//! scores of every key, one softmax over the whole score row, then `P·V` with key `j` in lane `j % 8`.
//! The tree only changes *who computes which keys together*: a shared node writes the score columns of
//! its keys for all vectors below it, and later continues their lane accumulators over its values,
//! nodes along a path in key order. Every vector therefore sees exactly the per-element operations of
//! `paged` attention (`ep_kernels::paged::attend_group`), and the outputs are bit-identical across
//! modes — `splice` changes cost, never results.
//!
//! **Planning** (once per forward pass; the block tables are the same for every layer): sequences are
//! sorted by their block lists, which makes every tree node's sequences — and so its rows and query
//! vectors — a contiguous range. A node (a maximal run of blocks held by the same set of ≥ 2
//! sequences) is computed jointly when the cost model says it pays; otherwise its keys fold into each
//! sequence's own run. `relay` keeps exactly one node: the longest run from the first block shared by
//! the largest group of sequences (RelayAttention's single system prompt); everything else goes the
//! sequence's own way.
//!
//! **Cost model.** Joint computation saves re-reading the node's K and V for every sequence past the
//! first: `(k − 1) · L · 2 · head_dim · b` bytes for `k` sequences, `L` keys, `b` bytes per value. It
//! costs spilling and reloading each query vector's 8 lane accumulators (`2 · 8 · head_dim · 4` bytes
//! per vector) around the node. A node is kept when the saving is larger. With no node kept, the step
//! runs the plain `paged` path itself, so `splice` does not lose where nothing is shared.

use std::ops::Range;

use ep_kernels::paged::{KvChunk, KvDtype};
use ep_kernels::simd::Path;
use ep_kv::{BlockId, BlockPool};
use ep_model::kv::{Attention, AttnShape, SeqSlice};
use ep_model::ModelError;
use rayon::prelude::*;

use crate::attn::PagedAttention;
use ep_kernels::splice::{
    splice_finish, splice_pv, splice_scores, splice_softmax, Rows, SpliceNode, Vectors,
};

/// How the engine computes attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnMode {
    /// Every sequence attends its own block table (PagedAttention).
    Paged,
    /// One shared system prefix attended jointly, the rest per sequence (RelayAttention).
    Relay,
    /// The whole prefix tree, every shared node attended jointly where it pays.
    Splice,
}

impl AttnMode {
    pub fn name(self) -> &'static str {
        match self {
            AttnMode::Paged => "paged",
            AttnMode::Relay => "relay",
            AttnMode::Splice => "splice",
        }
    }
}

impl std::str::FromStr for AttnMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "paged" => Ok(AttnMode::Paged),
            "relay" => Ok(AttnMode::Relay),
            "splice" => Ok(AttnMode::Splice),
            _ => Err(format!(
                "unknown attention mode '{s}' (expected paged, relay or splice)"
            )),
        }
    }
}

/// A piece of work: the query vectors of arena rows `rows` attend keys `key_base..key_base + n_keys`
/// of their sequences, held in `blocks`.
#[derive(Clone, Debug)]
struct Item {
    rows: Range<usize>,
    blocks: Vec<BlockId>,
    key_base: usize,
    n_keys: usize,
    shared: bool,
}

/// What the planner decided for one forward pass.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Arena row → (batch row, keys it attends).
    rows: Vec<(usize, usize)>,
    /// Items by stage: the items of a stage cover disjoint rows; stages run in order.
    stages: Vec<Vec<Item>>,
    row_len: usize,
    /// Tree nodes computed jointly, and the keys they hold.
    pub shared_nodes: usize,
    pub shared_keys: usize,
    /// A sequence's own keys attended by several of its rows at once (a prompt chunk) where that pays.
    pub joint_rows: bool,
}

impl Plan {
    /// Whether anything is computed jointly — a shared node, or a prompt chunk's rows over their own
    /// keys — with the phases' score rows small enough to stay in cache (otherwise the plain paged path
    /// runs: it keeps each vector's scores in L1).
    pub fn is_joint(&self, n_vectors: usize) -> bool {
        (self.shared_nodes > 0 || self.joint_rows)
            && n_vectors * self.row_len * 4 <= SCORE_ARENA_BYTES
    }
}

/// Largest score arena (all query vectors × their keys, f32) the phases may use. Beyond it the score
/// rows spill from cache to DRAM three times per layer, which costs more than re-reading shared K/V
/// from cache (measured: a single 512-token prompt chunk over 2048 keys was 15% slower jointly).
pub const SCORE_ARENA_BYTES: usize = 16 << 20;

/// Whether computing a node of `l` keys jointly for `k` sequences holding `vectors` query vectors
/// pays (see the module docs).
pub fn joint_pays(k: usize, l: usize, vectors: usize, head_dim: usize, dtype: KvDtype) -> bool {
    if k < 2 || l == 0 {
        return false;
    }
    let saved = (k - 1) * l * 2 * head_dim * dtype.bytes();
    let cost = vectors * 2 * 8 * head_dim * 4;
    saved > cost
}

/// Builds the plan for `slices` over `tables`.
pub fn plan(
    mode: AttnMode,
    shape: AttnShape,
    dtype: KvDtype,
    bt: usize,
    slices: &[SeqSlice],
    tables: &[Vec<BlockId>],
) -> Plan {
    let g = shape.group();
    // Each sequence's blocks up to its last row's keys.
    let path = |s: &SeqSlice| -> &[BlockId] {
        let n = s.pos + s.rows.len();
        &tables[s.seq][..n.div_ceil(bt)]
    };
    let mut order: Vec<usize> = (0..slices.len()).collect();
    order.sort_by(|&a, &b| path(&slices[a]).cmp(path(&slices[b])));
    // Arena rows in that order.
    let mut rows = Vec::new();
    let mut seq_rows = Vec::with_capacity(order.len());
    for &si in &order {
        let s = &slices[si];
        let start = rows.len();
        for (j, r) in s.rows.clone().enumerate() {
            rows.push((r, s.pos + j + 1));
        }
        seq_rows.push(start..rows.len());
    }
    let row_len = rows.iter().map(|r| r.1).max().unwrap_or(0);
    // Kept (jointly computed) nodes: (first sequence, end sequence, first block, end block).
    let mut kept: Vec<(usize, usize, usize, usize)> = Vec::new();
    if mode != AttnMode::Paged {
        let paths: Vec<&[BlockId]> = order.iter().map(|&si| path(&slices[si])).collect();
        let mut nodes = Vec::new();
        split_nodes(&paths, 0, paths.len(), 0, &mut nodes);
        let vectors = |a: usize, b: usize| (seq_rows[b - 1].end - seq_rows[a].start) * g;
        match mode {
            AttnMode::Splice => {
                for (a, b, d0, d1) in nodes {
                    let l = ((d1 - d0) * bt)
                        .min(min_keys(&rows, &seq_rows[a..b]).saturating_sub(d0 * bt));
                    if joint_pays(b - a, l, vectors(a, b), shape.head_dim, dtype) {
                        kept.push((a, b, d0, d1));
                    }
                }
            }
            AttnMode::Relay => {
                // The root-level node with the most sequences (the first of equals).
                if let Some(&n) = nodes
                    .iter()
                    .filter(|n| n.2 == 0)
                    .max_by_key(|n| (n.1 - n.0, std::cmp::Reverse(n.0)))
                {
                    let (a, b, d0, d1) = n;
                    let l = ((d1 - d0) * bt).min(min_keys(&rows, &seq_rows[a..b]));
                    if joint_pays(b - a, l, vectors(a, b), shape.head_dim, dtype) {
                        kept.push(n);
                    }
                }
            }
            AttnMode::Paged => {}
        }
    }
    let shared_nodes = kept.len();
    let shared_keys = kept.iter().map(|k| (k.3 - k.2) * bt).sum();
    // Per sequence: its kept nodes in path order, the gaps between them as its own items.
    let mut stages: Vec<Vec<Item>> = Vec::new();
    let mut push = |stage: usize, item: Item| {
        if stages.len() <= stage {
            stages.resize(stage + 1, Vec::new());
        }
        stages[stage].push(item);
    };
    for (p, &si) in order.iter().enumerate() {
        let s = &slices[si];
        let blocks = path(s);
        let end_keys = s.pos + s.rows.len();
        let mut on_path: Vec<&(usize, usize, usize, usize)> =
            kept.iter().filter(|k| k.0 <= p && p < k.1).collect();
        on_path.sort_by_key(|k| k.2);
        let mut stage = 0;
        let mut at = 0; // next block of the path not yet covered
        for k in on_path {
            if k.2 > at {
                push(stage, own_item(&seq_rows[p], blocks, at, k.2, end_keys, bt));
                stage += 1;
            }
            if k.0 == p {
                // The node's first sequence emits the joint item.
                // Shared blocks are full (only full blocks enter the prefix cache).
                let l = (k.3 - k.2) * bt;
                push(
                    stage,
                    Item {
                        rows: seq_rows[k.0].start..seq_rows[k.1 - 1].end,
                        blocks: blocks[k.2..k.3].to_vec(),
                        key_base: k.2 * bt,
                        n_keys: l,
                        shared: true,
                    },
                );
            }
            stage += 1;
            at = k.3;
        }
        if at < blocks.len() {
            push(
                stage,
                own_item(&seq_rows[p], blocks, at, blocks.len(), end_keys, bt),
            );
        }
    }
    // Rows of one prompt chunk read their sequence's own keys once for all of them; with several rows
    // that pays like a node shared by that many sequences.
    let joint_rows = mode != AttnMode::Paged
        && stages.iter().flatten().any(|it| {
            let n = it.rows.len();
            !it.shared && n >= 2 && joint_pays(n, it.n_keys, n * g, shape.head_dim, dtype)
        });
    Plan {
        rows,
        stages,
        row_len,
        shared_nodes,
        shared_keys,
        joint_rows,
    }
}

fn own_item(
    rows: &Range<usize>,
    blocks: &[BlockId],
    b0: usize,
    b1: usize,
    end_keys: usize,
    bt: usize,
) -> Item {
    Item {
        rows: rows.clone(),
        blocks: blocks[b0..b1].to_vec(),
        key_base: b0 * bt,
        n_keys: (b1 * bt).min(end_keys) - b0 * bt,
        shared: false,
    }
}

/// Fewest keys attended by a row of the given sequences.
fn min_keys(rows: &[(usize, usize)], seqs: &[Range<usize>]) -> usize {
    seqs.iter()
        .flat_map(|r| rows[r.clone()].iter().map(|x| x.1))
        .min()
        .unwrap_or(0)
}

/// The tree nodes of sorted `paths[a..b]` below block `d`: maximal runs of blocks held by the same ≥ 2
/// sequences, as (first sequence, end sequence, first block, end block).
fn split_nodes(
    paths: &[&[BlockId]],
    a: usize,
    b: usize,
    d: usize,
    out: &mut Vec<(usize, usize, usize, usize)>,
) {
    let mut i = a;
    while i < b {
        let Some(&blk) = paths[i].get(d) else {
            i += 1;
            continue;
        };
        let mut j = i + 1;
        while j < b && paths[j].get(d) == Some(&blk) {
            j += 1;
        }
        if j - i >= 2 {
            // Extend while every sequence of the group holds the same next block.
            let mut e = d + 1;
            while paths[i].get(e).is_some()
                && (i + 1..j).all(|x| paths[x].get(e) == paths[i].get(e))
            {
                e += 1;
            }
            out.push((i, j, d, e));
            split_nodes(paths, i, j, e, out);
        }
        i = j;
    }
}

/// Reusable buffers of the splice phases.
#[derive(Default)]
pub struct SpliceArena {
    q: Vec<f32>,
    scores: Vec<f32>,
    lanes: Vec<f32>,
    out: Vec<f32>,
}

/// The plan one step hands to every layer: [`plan`], reduced to the plain path (nothing joint) where
/// the joint phases would not pay or their score rows would not stay in cache.
pub fn plan_step(
    mode: AttnMode,
    shape: AttnShape,
    dtype: KvDtype,
    bt: usize,
    slices: &[SeqSlice],
    tables: &[Vec<BlockId>],
) -> Plan {
    let mut p = plan(mode, shape, dtype, bt, slices, tables);
    if !p.is_joint(p.rows.len() * shape.n_head) {
        // Report what runs: the plain path.
        p.shared_nodes = 0;
        p.shared_keys = 0;
        p.joint_rows = false;
    }
    p
}

/// Splice (or relay) attention over the block pool for one layer of a forward pass, by a plan made
/// for the batch's slices ([`plan_step`]).
pub struct SpliceAttention<'a> {
    pub mode: AttnMode,
    pub shape: AttnShape,
    pub pool: &'a mut BlockPool,
    pub tables: &'a [Vec<BlockId>],
    pub arena: &'a mut SpliceArena,
    pub plan: &'a Plan,
}

/// Splits `data` (vectors of `stride` values) into the mutable pieces of the given vector ranges,
/// which must be sorted and disjoint.
fn split_ranges<'d>(
    mut data: &'d mut [f32],
    stride: usize,
    ranges: &[Range<usize>],
) -> Vec<&'d mut [f32]> {
    let mut out = Vec::with_capacity(ranges.len());
    let mut at = 0;
    for r in ranges {
        let (_, rest) = data.split_at_mut((r.start - at) * stride);
        let (piece, rest) = rest.split_at_mut((r.end - r.start) * stride);
        out.push(piece);
        data = rest;
        at = r.end;
    }
    out
}

/// One task of a stage: an item's vectors of one KV head.
struct Task<'i> {
    item: &'i Item,
    kv_head: usize,
    /// Arena vectors `vecs` (contiguous).
    vecs: Range<usize>,
}

/// The tasks of one stage, sorted by first vector: each item's vectors of each KV head, large joint
/// items split in two so both threads share the node.
fn tasks_of(items: &[Item], nkv: usize, n_rows: usize, g: usize) -> Vec<Task<'_>> {
    let mut t = Vec::new();
    for h in 0..nkv {
        for it in items {
            let v0 = (h * n_rows + it.rows.start) * g;
            let v1 = (h * n_rows + it.rows.end) * g;
            // Large items split so both threads work on them (each part re-reads the item's K/V, from
            // cache); a prompt chunk's rows split further, they are many.
            let parts = ((v1 - v0) / (8 * g)).clamp(1, if it.shared { 2 } else { 8 });
            let step = (v1 - v0).div_ceil(parts).div_ceil(g) * g;
            let mut s = v0;
            while s < v1 {
                let e = (s + step).min(v1);
                t.push(Task {
                    item: it,
                    kv_head: h,
                    vecs: s..e,
                });
                s = e;
            }
        }
    }
    t.sort_by_key(|t| t.vecs.start);
    t
}

impl Attention for SpliceAttention<'_> {
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
        let bt = self.pool.layout().block_tokens;
        let dtype = self.pool.layout().dtype;
        let plan = self.plan;
        if plan.shared_nodes == 0 && !plan.joint_rows {
            // Nothing shared pays: the plain path, with no splice overhead.
            let mut paged = PagedAttention {
                shape: sh,
                pool: self.pool,
                tables: self.tables,
            };
            return paged.attend(kernels, layer, slices, q, k, v, out);
        }
        // Store the new K/V (the paged path's first half), then attend by the plan.
        let mut store = PagedAttention {
            shape: sh,
            pool: self.pool,
            tables: self.tables,
        };
        store.store(layer, slices, k, v)?;
        let (qw, hd, g, nkv) = (sh.q_width(), sh.head_dim, sh.group(), sh.n_head_kv);
        let n_rows = plan.rows.len();
        let n_vec = nkv * n_rows * g;
        let row_len = plan.row_len;
        let a = &mut *self.arena;
        // Vector (h, arena row ar, k) at (h * n_rows + ar) * g + k.
        a.q.resize(n_vec * hd, 0.0);
        for h in 0..nkv {
            for (ar, &(r, _)) in plan.rows.iter().enumerate() {
                let dst = &mut a.q[(h * n_rows + ar) * g * hd..][..g * hd];
                let src = &q[r * qw + h * g * hd..][..g * hd];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = dtype.round(s);
                }
            }
        }
        a.scores.resize(n_vec * row_len, 0.0);
        a.lanes.clear();
        a.lanes.resize(n_vec * 8 * hd, 0.0);
        let pool: &BlockPool = self.pool;
        // A task's key limits (per vector: the item's keys it attends) and the item's chunks.
        let inputs = |t: &Task<'_>| -> (Vec<usize>, Vec<KvChunk<'_>>) {
            let it = t.item;
            let row0 = t.kv_head * n_rows;
            let lims = (t.vecs.start / g..t.vecs.end / g)
                .flat_map(|vr| {
                    let n = plan.rows[vr - row0].1;
                    std::iter::repeat_n(n.saturating_sub(it.key_base).min(it.n_keys), g)
                })
                .collect();
            let chunks = it
                .blocks
                .iter()
                .enumerate()
                .map(|(i, &b)| pool.chunk(layer, b, (it.n_keys - i * bt).min(bt), t.kv_head))
                .collect();
            (lims, chunks)
        };
        let tasks_of = |items| tasks_of(items, nkv, n_rows, g);
        let scale = sh.scale();
        // Phase 1: scores, stage by stage.
        for items in &plan.stages {
            let tasks = tasks_of(items);
            let ranges: Vec<Range<usize>> = tasks.iter().map(|t| t.vecs.clone()).collect();
            let pieces = split_ranges(&mut a.scores, row_len, &ranges);
            let qv = &a.q;
            tasks.par_iter().zip(pieces).for_each(|(t, sc)| {
                let (lims, chunks) = inputs(t);
                let node = SpliceNode {
                    chunks: &chunks,
                    key_base: t.item.key_base,
                    lims: &lims,
                };
                let q = Vectors {
                    data: &qv[t.vecs.start * hd..t.vecs.end * hd],
                    head_dim: hd,
                };
                splice_scores(kernels, node, q, scale, Rows { data: sc, row_len });
            });
        }
        // Phase 2: one softmax per vector over its whole row.
        a.scores
            .par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(vi, s)| {
                let ar = (vi / g) % n_rows;
                splice_softmax(kernels, dtype, &mut s[..plan.rows[ar].1]);
            });
        // Phase 3: P·V, stage by stage (a vector's keys in order).
        for items in &plan.stages {
            let tasks = tasks_of(items);
            let ranges: Vec<Range<usize>> = tasks.iter().map(|t| t.vecs.clone()).collect();
            let pieces = split_ranges(&mut a.lanes, 8 * hd, &ranges);
            let probs = &a.scores;
            tasks.par_iter().zip(pieces).for_each(|(t, ln)| {
                let (lims, chunks) = inputs(t);
                let node = SpliceNode {
                    chunks: &chunks,
                    key_base: t.item.key_base,
                    lims: &lims,
                };
                let probs = Rows {
                    data: &probs[t.vecs.start * row_len..t.vecs.end * row_len],
                    row_len,
                };
                splice_pv(kernels, node, probs, hd, ln);
            });
        }
        // Finish: reduce the lanes and scatter to the output rows.
        a.out.resize(n_vec * hd, 0.0);
        a.out
            .par_chunks_mut(g * hd)
            .zip(a.lanes.par_chunks(g * 8 * hd))
            .for_each(|(o, l)| splice_finish(hd, l, o));
        for h in 0..nkv {
            for (ar, &(r, _)) in plan.rows.iter().enumerate() {
                out[r * qw + h * g * hd..][..g * hd]
                    .copy_from_slice(&a.out[(h * n_rows + ar) * g * hd..][..g * hd]);
            }
        }
        Ok(())
    }
}
