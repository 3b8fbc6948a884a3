//! Attention modes over random prefix trees against a naive f64 reference.
//!
//! Random trees (depth 1–4, fan-out 1–8, node lengths 0–300; inner nodes whole blocks, as only full
//! blocks are shared), GQA ratios 1/3/4, head dims 64/128, every KV dtype: the sequences' block tables
//! share the tree's blocks, each sequence adds a decode row (or a few prefill rows). `paged`, `relay`
//! and `splice` must agree bit for bit, and match the reference computed in f64 on the same rounded
//! inputs (Q and the stored K/V rounded to the dtype, and P rounded to it before P·V):
//! `max |o − o_ref| ≤ 1e-4 · max |o_ref|` plus, for 16-bit dtypes, the rounding of P itself
//! (`u · max |v|` with u = 2⁻¹¹ for f16, 2⁻⁸ for bf16: our P is rounded from an f32 softmax, the
//! reference's from an f64 one, and a value at a rounding boundary may land on either side).

use ep_engine::attn::PagedAttention;
use ep_engine::splice::{plan_step, AttnMode, SpliceArena, SpliceAttention};
use ep_kernels::paged::KvDtype;
use ep_kernels::simd::Path;
use ep_kv::{BlockId, BlockPool, KvLayout};
use ep_model::kv::{Attention, AttnShape, SeqSlice};
use proptest::prelude::*;

const BT: usize = 16;

#[derive(Clone, Debug)]
struct Case {
    shape: AttnShape,
    dtype: KvDtype,
    /// Per sequence: its keys already stored (a path through the tree), as block-table indices into
    /// `blocks`, and the number of keys.
    seqs: Vec<(Vec<usize>, usize)>,
    /// Rows each sequence adds this step.
    new_rows: Vec<usize>,
    seed: u64,
}

fn rng(seed: u64) -> impl FnMut() -> f32 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A random tree as the sequences' paths: `(block indices, keys)`, blocks numbered from 0.
fn tree(
    depth: usize,
    fanout: &[usize],
    lens: &[usize],
    leaf_lens: &[usize],
) -> (Vec<(Vec<usize>, usize)>, usize) {
    // Breadth-first: every node has `fanout[level]` children; inner node length in whole blocks.
    let mut next_block = 0usize;
    let mut frontier: Vec<(Vec<usize>, usize)> = vec![(Vec::new(), 0)];
    for level in 0..depth {
        let mut nf = Vec::new();
        for (i, (blocks, keys)) in frontier.iter().enumerate() {
            let f = fanout[(level + i) % fanout.len()].max(1);
            for c in 0..f {
                let mut b = blocks.clone();
                let mut k = *keys;
                if level + 1 < depth {
                    let n = lens[(level * 7 + i * 3 + c) % lens.len()] / BT;
                    for _ in 0..n {
                        b.push(next_block);
                        next_block += 1;
                    }
                    k += n * BT;
                } else {
                    let n = leaf_lens[(i + c) % leaf_lens.len()];
                    for _ in 0..n.div_ceil(BT) {
                        b.push(next_block);
                        next_block += 1;
                    }
                    k += n;
                }
                nf.push((b, k));
            }
        }
        frontier = nf;
    }
    (frontier, next_block)
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=4,
        prop::collection::vec(1usize..=8, 1..4),
        prop::collection::vec(0usize..=300, 1..6),
        prop::collection::vec(0usize..=300, 1..6),
        prop::sample::select(vec![1usize, 3, 4]),
        prop::sample::select(vec![64usize, 128]),
        prop::sample::select(vec![KvDtype::F32, KvDtype::F16, KvDtype::Bf16]),
        any::<u64>(),
        prop::collection::vec(1usize..=3, 1..4),
    )
        .prop_map(
            |(depth, fanout, lens, leaf_lens, ratio, hd, dtype, seed, rows)| {
                let (mut seqs, _) = tree(depth, &fanout, &lens, &leaf_lens);
                // Keep the test small: at most 24 sequences.
                seqs.truncate(24);
                let new_rows = (0..seqs.len()).map(|i| rows[i % rows.len()]).collect();
                Case {
                    shape: AttnShape {
                        n_layer: 1,
                        n_head: 2 * ratio,
                        n_head_kv: 2,
                        head_dim: hd,
                    },
                    dtype,
                    seqs,
                    new_rows,
                    seed,
                }
            },
        )
}

struct Setup {
    pool: BlockPool,
    tables: Vec<Vec<BlockId>>,
    slices: Vec<SeqSlice>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn setup(c: &Case) -> Setup {
    let sh = c.shape;
    let kw = sh.kv_width();
    let n_shared: usize = c
        .seqs
        .iter()
        .flat_map(|s| s.0.iter())
        .max()
        .map_or(0, |m| m + 1);
    // Private blocks for the new rows of each sequence (their last partial block is copied: a tree
    // leaf's partial block belongs to one sequence, so it is never shared).
    let extra: usize = c
        .seqs
        .iter()
        .zip(&c.new_rows)
        .map(|(s, &r)| (s.1 + r).div_ceil(BT) + 1)
        .sum();
    let layout = KvLayout {
        n_layer: 1,
        n_head_kv: sh.n_head_kv,
        head_dim: sh.head_dim,
        block_tokens: BT,
        dtype: c.dtype,
    };
    let mut pool = BlockPool::new(layout, (n_shared + extra + 1) * layout.block_bytes()).unwrap();
    let mut next = rng(c.seed);
    let mut blocks: Vec<BlockId> = Vec::new();
    for _ in 0..n_shared {
        let b = pool.alloc().unwrap();
        let kk: Vec<f32> = (0..BT * kw).map(|_| next()).collect();
        let vv: Vec<f32> = (0..BT * kw).map(|_| next()).collect();
        pool.write(0, b, 0, &kk, &vv);
        blocks.push(b);
    }
    let mut tables = Vec::new();
    let mut slices = Vec::new();
    let mut row = 0;
    for (i, (path, keys)) in c.seqs.iter().enumerate() {
        let full = keys / BT;
        let mut t: Vec<BlockId> = path[..full].iter().map(|&p| blocks[p]).collect();
        // The partial last block (if any) becomes this sequence's own copy.
        if keys % BT != 0 {
            let own = pool.alloc().unwrap();
            pool.copy_block(blocks[path[full]], own, keys % BT);
            t.push(own);
        }
        let n_rows = c.new_rows[i];
        while t.len() * BT < keys + n_rows {
            t.push(pool.alloc().unwrap());
        }
        tables.push(t);
        slices.push(SeqSlice {
            seq: i,
            rows: row..row + n_rows,
            pos: *keys,
        });
        row += n_rows;
    }
    let q = (0..row * sh.q_width()).map(|_| next()).collect();
    let k = (0..row * kw).map(|_| next()).collect();
    let v = (0..row * kw).map(|_| next()).collect();
    Setup {
        pool,
        tables,
        slices,
        q,
        k,
        v,
    }
}

fn run(c: &Case, mode: AttnMode) -> (Vec<f32>, Setup, usize) {
    let mut s = setup(c);
    let mut out = vec![0f32; s.q.len()];
    let mut shared = 0;
    match mode {
        AttnMode::Paged => {
            let mut a = PagedAttention {
                shape: c.shape,
                pool: &mut s.pool,
                tables: &s.tables,
            };
            a.attend(Path::detect(), 0, &s.slices, &s.q, &s.k, &s.v, &mut out)
                .unwrap();
        }
        _ => {
            let mut arena = SpliceArena::default();
            let layout = *s.pool.layout();
            let plan = plan_step(
                mode,
                c.shape,
                layout.dtype,
                layout.block_tokens,
                &s.slices,
                &s.tables,
            );
            let mut a = SpliceAttention {
                mode,
                shape: c.shape,
                pool: &mut s.pool,
                tables: &s.tables,
                arena: &mut arena,
                plan: &plan,
            };
            a.attend(Path::detect(), 0, &s.slices, &s.q, &s.k, &s.v, &mut out)
                .unwrap();
            shared = plan.shared_nodes;
        }
    }
    (out, s, shared)
}

/// The f64 reference over the pool after the step (K/V as stored), Q and P rounded to the dtype.
fn reference(c: &Case, s: &Setup) -> Vec<f64> {
    let sh = c.shape;
    let (qw, kw, hd, g) = (sh.q_width(), sh.kv_width(), sh.head_dim, sh.group());
    let mut out = vec![0f64; s.q.len()];
    for sl in &s.slices {
        let table = &s.tables[sl.seq];
        let kv: Vec<(Vec<f32>, Vec<f32>)> = table.iter().map(|&b| s.pool.read_f32(0, b)).collect();
        for (j, r) in sl.rows.clone().enumerate() {
            let n = sl.pos + j + 1;
            for h in 0..sh.n_head {
                let kvh = h / g;
                let q: Vec<f64> = s.q[r * qw + h * hd..][..hd]
                    .iter()
                    .map(|&x| c.dtype.round(x) as f64)
                    .collect();
                let key = |t: usize| &kv[t / BT].0[(t % BT) * kw + kvh * hd..][..hd];
                let val = |t: usize| &kv[t / BT].1[(t % BT) * kw + kvh * hd..][..hd];
                let scores: Vec<f64> = (0..n)
                    .map(|t| {
                        q.iter()
                            .zip(key(t))
                            .map(|(a, &b)| a * b as f64)
                            .sum::<f64>()
                            * sh.scale() as f64
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                for (t, &sc) in scores.iter().enumerate() {
                    let p = c.dtype.round(((sc - m).exp() / z) as f32) as f64;
                    for (d, &x) in val(t).iter().enumerate() {
                        out[r * qw + h * hd + d] += p * x as f64;
                    }
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn modes_match_each_other_and_the_f64_reference(c in case()) {
        let (paged, s, _) = run(&c, AttnMode::Paged);
        let (relay, _, _) = run(&c, AttnMode::Relay);
        let (splice, _, _) = run(&c, AttnMode::Splice);
        prop_assert!(paged.iter().zip(&splice).all(|(a, b)| a.to_bits() == b.to_bits()),
            "splice differs from paged");
        prop_assert!(paged.iter().zip(&relay).all(|(a, b)| a.to_bits() == b.to_bits()),
            "relay differs from paged");
        let r = reference(&c, &s);
        let max_ref = r.iter().fold(0f64, |m, x| m.max(x.abs()));
        let u = match c.dtype {
            KvDtype::F32 => 0.0,
            KvDtype::F16 => 2f64.powi(-11),
            KvDtype::Bf16 => 2f64.powi(-8),
        };
        let bound = 1e-4 * max_ref + u * 1.0; // |v| ≤ 1
        let err = paged.iter().zip(&r).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        prop_assert!(err <= bound, "max |o - o_ref| = {err:e} > {bound:e} ({:?})", c.dtype);
    }
}

/// The planner attends shared nodes jointly where it pays: 32 sequences under one 2048-key prompt.
#[test]
fn splice_attends_a_large_shared_node_jointly() {
    let c = Case {
        shape: AttnShape {
            n_layer: 1,
            n_head: 9,
            n_head_kv: 3,
            head_dim: 64,
        },
        dtype: KvDtype::F16,
        seqs: (0..32)
            .map(|i| {
                let mut p: Vec<usize> = (0..128).collect();
                p.extend([128 + 2 * i, 129 + 2 * i]);
                (p, 2048 + 20)
            })
            .collect(),
        new_rows: vec![1; 32],
        seed: 3,
    };
    let (paged, _, _) = run(&c, AttnMode::Paged);
    let (splice, _, nodes) = run(&c, AttnMode::Splice);
    assert_eq!(nodes, 1);
    assert!(paged
        .iter()
        .zip(&splice)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let (_, _, relay_nodes) = run(&c, AttnMode::Relay);
    assert_eq!(relay_nodes, 1);
}

/// The random trees above do exercise joint nodes (not only the plain fallback).
#[test]
fn random_trees_exercise_joint_nodes() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = case();
    let (mut joint, mut relay_joint, n) = (0, 0, 48);
    for _ in 0..n {
        let c = strategy.new_tree(&mut runner).unwrap().current();
        if run(&c, AttnMode::Splice).2 > 0 {
            joint += 1;
        }
        if run(&c, AttnMode::Relay).2 > 0 {
            relay_joint += 1;
        }
    }
    assert!(
        joint >= n / 4,
        "only {joint} of {n} random trees had a joint node"
    );
    assert!(relay_joint >= 1 && relay_joint <= joint);
}
