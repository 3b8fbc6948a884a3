//! Splice phases: scores node by node → softmax per vector → P·V node by node → finish equals
//! `attend_group` / `attend_rows_group` over the concatenated chunks bit for bit, for every node
//! split, per-vector key limit and KV dtype; every phase on `Path::Avx2` (the scalar code where the
//! CPU lacks AVX2) equals it on `Path::Scalar` bit for bit; scores past a vector's limit are not
//! written; a prefix tree (shared nodes + a tail per sequence) equals per-sequence `attend_group`.

use ep_kernels::paged::{attend_group, attend_rows_group, GroupScratch, KvChunk, KvDtype};
use ep_kernels::simd::Path;
use ep_kernels::splice::{
    splice_finish, splice_pv, splice_scores, splice_softmax, Rows, SpliceNode, Vectors,
};
use proptest::prelude::*;

mod common;

use common::{data, Buf};

/// The blocks of one node: block `i` holds `lens[i]` keys from row `first[i]`, KV head 1 of 2.
struct Node {
    k: Vec<Buf>,
    v: Vec<Buf>,
    first: Vec<usize>,
    lens: Vec<usize>,
    stride: usize,
    off: usize,
}

impl Node {
    fn new(dtype: KvDtype, lens: &[usize], hd: usize, seed: u64) -> Node {
        let stride = 2 * hd;
        let (mut k, mut v, mut first) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &n) in lens.iter().enumerate() {
            let f = (seed as usize + i) % 3;
            let cap = f + n + (i % 2);
            let s = seed.wrapping_add(i as u64 * 7919);
            k.push(Buf::new(dtype, &data(cap * stride, s, 6.0)));
            v.push(Buf::new(dtype, &data(cap * stride, s ^ 0xabc, 2.0)));
            first.push(f);
        }
        Node {
            k,
            v,
            first,
            lens: lens.to_vec(),
            stride,
            off: hd,
        }
    }

    fn n_keys(&self) -> usize {
        self.lens.iter().sum()
    }

    fn chunks(&self) -> Vec<KvChunk<'_>> {
        (0..self.lens.len())
            .map(|i| KvChunk {
                k: self.k[i].rows(self.first[i] * self.stride),
                v: self.v[i].rows(self.first[i] * self.stride),
                n_keys: self.lens[i],
                stride: self.stride,
                off: self.off,
            })
            .collect()
    }
}

/// Chunk lengths taken from `raw` (cycled, each `1..=40`) summing to `total`.
fn chunking(total: usize, raw: &[usize]) -> Vec<usize> {
    let mut lens = Vec::new();
    let mut left = total;
    let mut it = raw.iter().cycle();
    while left > 0 {
        let n = (*it.next().unwrap()).min(left);
        lens.push(n);
        left -= n;
    }
    lens
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

const DTYPES: [KvDtype; 3] = [KvDtype::F32, KvDtype::F16, KvDtype::Bf16];
/// Never produced by the phases: marks score entries that must stay unwritten.
const SENTINEL: u32 = 0x7fc0_dead;

/// What one run of the phases produced.
struct Spliced {
    scores: Vec<f32>,
    lanes: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// The four phases over `nodes` (in order) for `m = lims.len()` vectors, vector `v` attending the
/// first `lims[v]` keys of the path.
#[allow(clippy::too_many_arguments)]
fn splice(
    path: Path,
    dtype: KvDtype,
    hd: usize,
    nodes: &[Vec<KvChunk<'_>>],
    q: &[f32],
    lims: &[usize],
    scale: f32,
    row_len: usize,
) -> Spliced {
    let m = lims.len();
    let qr: Vec<f32> = q.iter().map(|&x| dtype.round(x)).collect();
    let mut scores = vec![f32::from_bits(SENTINEL); m * row_len];
    let node_lims = |base: usize, n: usize| -> Vec<usize> {
        lims.iter()
            .map(|&l| l.saturating_sub(base).min(n))
            .collect()
    };
    let mut base = 0;
    for chunks in nodes {
        let n: usize = chunks.iter().map(|c| c.n_keys).sum();
        let nl = node_lims(base, n);
        splice_scores(
            path,
            SpliceNode {
                chunks,
                key_base: base,
                lims: &nl,
            },
            Vectors {
                data: &qr,
                head_dim: hd,
            },
            scale,
            Rows {
                data: &mut scores,
                row_len,
            },
        );
        base += n;
    }
    // Nothing past a vector's limit was written.
    for (v, &l) in lims.iter().enumerate() {
        assert!(
            scores[v * row_len + l..(v + 1) * row_len]
                .iter()
                .all(|x| x.to_bits() == SENTINEL),
            "vector {v}: a score past its {l} keys was written"
        );
    }
    let lse: Vec<f32> = lims
        .iter()
        .enumerate()
        .map(|(v, &l)| splice_softmax(path, dtype, &mut scores[v * row_len..][..l]))
        .collect();
    let mut lanes = vec![0f32; m * 8 * hd];
    let mut base = 0;
    for chunks in nodes {
        let n: usize = chunks.iter().map(|c| c.n_keys).sum();
        let nl = node_lims(base, n);
        splice_pv(
            path,
            SpliceNode {
                chunks,
                key_base: base,
                lims: &nl,
            },
            Rows {
                data: &scores,
                row_len,
            },
            hd,
            &mut lanes,
        );
        base += n;
    }
    let mut out = vec![0f32; m * hd];
    splice_finish(hd, &lanes, &mut out);
    Spliced {
        scores,
        lanes,
        out,
        lse,
    }
}

fn head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![Just(8usize), Just(16), Just(64), Just(128)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any node split, vectors in rows of `g` heads with per-row key limits: equals
    /// `attend_rows_group` (and `attend_group` when every row attends every key).
    #[test]
    fn phases_equal_attend_rows_group(
        node_sizes in prop::collection::vec(0usize..=120, 1..=5),
        raw in prop::collection::vec(1usize..=40, 1..8),
        hd in head_dim(),
        m in 1usize..40,
        g in prop::sample::select(vec![1usize, 3]),
        row_keys in prop::collection::vec(any::<u32>(), 40),
        mode in 0u8..3,
        slack in 0usize..4,
        seed in any::<u64>(),
    ) {
        let r = (m / g).max(1);
        let m = r * g;
        let total: usize = node_sizes.iter().sum();
        let last = *node_sizes.last().unwrap();
        // 0: every row attends every key; 1: the causal-prefill case (limits inside the last node);
        // 2: any limits.
        let n_keys: Vec<usize> = (0..r)
            .map(|t| match mode {
                0 => total,
                1 => total - (row_keys[t] as usize % (last + 1)),
                _ => row_keys[t] as usize % (total + 1),
            })
            .collect();
        let lims: Vec<usize> = n_keys.iter().flat_map(|&n| std::iter::repeat_n(n, g)).collect();
        let row_len = total + slack;
        let scale = 1.0 / (hd as f32).sqrt();
        let q = data(m * hd, seed ^ 0x55, 3.0);
        for dtype in DTYPES {
            let stores: Vec<Node> = node_sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Node::new(dtype, &chunking(n, &raw[i % raw.len()..]), hd, seed ^ (i as u64 * 131)))
                .collect();
            let nodes: Vec<Vec<KvChunk<'_>>> = stores.iter().map(Node::chunks).collect();
            let all: Vec<KvChunk<'_>> = nodes.concat();

            let fast = splice(Path::Avx2, dtype, hd, &nodes, &q, &lims, scale, row_len);
            let slow = splice(Path::Scalar, dtype, hd, &nodes, &q, &lims, scale, row_len);
            // (b) AVX2 == scalar, phase by phase.
            prop_assert_eq!(bits(&fast.scores), bits(&slow.scores), "{} probabilities", dtype);
            prop_assert_eq!(bits(&fast.lanes), bits(&slow.lanes), "{} lanes", dtype);
            prop_assert_eq!(bits(&fast.out), bits(&slow.out), "{} output", dtype);
            prop_assert_eq!(bits(&fast.lse), bits(&slow.lse), "{} lse", dtype);

            // (a) == attend_rows_group over the concatenated chunks.
            let mut scratch = GroupScratch::default();
            let (mut out, mut lse) = (vec![0f32; m * hd], vec![0f32; m]);
            attend_rows_group(Path::Avx2, &q, &n_keys, hd, &all, scale, &mut scratch, &mut out, &mut lse);
            prop_assert_eq!(bits(&fast.out), bits(&out), "{} output vs attend_rows_group", dtype);
            prop_assert_eq!(bits(&fast.lse), bits(&lse), "{} lse vs attend_rows_group", dtype);
            attend_rows_group(Path::Scalar, &q, &n_keys, hd, &all, scale, &mut scratch, &mut out, &mut lse);
            prop_assert_eq!(bits(&slow.out), bits(&out), "{} scalar output", dtype);
            prop_assert_eq!(bits(&slow.lse), bits(&lse), "{} scalar lse", dtype);
            if mode == 0 {
                attend_group(Path::Avx2, &q, hd, &all, scale, &mut scratch, &mut out, &mut lse);
                prop_assert_eq!(bits(&fast.out), bits(&out), "{} output vs attend_group", dtype);
                prop_assert_eq!(bits(&fast.lse), bits(&lse), "{} lse vs attend_group", dtype);
            }
        }
    }

    /// A prefix tree: shared nodes read once by all sequences' vectors, then each sequence's tail node
    /// with its own vectors; every sequence equals `attend_group` over its whole path.
    #[test]
    fn tree_equals_per_sequence_attend_group(
        shared in prop::collection::vec(0usize..=120, 1..=3),
        tails in prop::collection::vec(0usize..=50, 1..=12),
        raw in prop::collection::vec(1usize..=40, 1..8),
        hd in head_dim(),
        g in 1usize..=3,
        seed in any::<u64>(),
    ) {
        let n_seq = tails.len();
        let m = n_seq * g;
        let shared_total: usize = shared.iter().sum();
        let row_len = shared_total + tails.iter().copied().max().unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        let q = data(m * hd, seed ^ 0x99, 3.0);
        for dtype in DTYPES {
            let qr: Vec<f32> = q.iter().map(|&x| dtype.round(x)).collect();
            let shared_st: Vec<Node> = shared
                .iter()
                .enumerate()
                .map(|(i, &n)| Node::new(dtype, &chunking(n, &raw), hd, seed ^ (i as u64 * 17)))
                .collect();
            let tail_st: Vec<Node> = tails
                .iter()
                .enumerate()
                .map(|(s, &n)| Node::new(dtype, &chunking(n, &raw), hd, seed ^ (1000 + s as u64)))
                .collect();
            let shared_ch: Vec<Vec<KvChunk<'_>>> = shared_st.iter().map(Node::chunks).collect();
            let mut results = Vec::new();
            for path in [Path::Avx2, Path::Scalar] {
                let mut scores = vec![0f32; m * row_len];
                let mut lanes = vec![0f32; m * 8 * hd];
                let mut base = 0;
                for ch in &shared_ch {
                    let n: usize = ch.iter().map(|c| c.n_keys).sum();
                    let lims = vec![n; m];
                    splice_scores(path, SpliceNode { chunks: ch, key_base: base, lims: &lims }, Vectors { data: &qr, head_dim: hd }, scale, Rows { data: &mut scores, row_len });
                    base += n;
                }
                for (s, st) in tail_st.iter().enumerate() {
                    let lims = vec![st.n_keys(); g];
                    let rows = &mut scores[s * g * row_len..][..g * row_len];
                    splice_scores(path, SpliceNode { chunks: &st.chunks(), key_base: base, lims: &lims }, Vectors { data: &qr[s * g * hd..][..g * hd], head_dim: hd }, scale, Rows { data: rows, row_len });
                }
                let mut lse = vec![0f32; m];
                for v in 0..m {
                    let n = shared_total + tails[v / g];
                    let row = &mut scores[v * row_len..][..n];
                    lse[v] = splice_softmax(path, dtype, row);
                }
                let mut base = 0;
                for ch in &shared_ch {
                    let n: usize = ch.iter().map(|c| c.n_keys).sum();
                    let lims = vec![n; m];
                    splice_pv(path, SpliceNode { chunks: ch, key_base: base, lims: &lims }, Rows { data: &scores, row_len }, hd, &mut lanes);
                    base += n;
                }
                for (s, st) in tail_st.iter().enumerate() {
                    let lims = vec![st.n_keys(); g];
                    let p = &scores[s * g * row_len..][..g * row_len];
                    splice_pv(path, SpliceNode { chunks: &st.chunks(), key_base: base, lims: &lims }, Rows { data: p, row_len }, hd, &mut lanes[s * g * 8 * hd..][..g * 8 * hd]);
                }
                let mut out = vec![0f32; m * hd];
                splice_finish(hd, &lanes, &mut out);
                results.push((out, lse));
            }
            prop_assert_eq!(bits(&results[0].0), bits(&results[1].0), "{} avx2 vs scalar", dtype);
            prop_assert_eq!(bits(&results[0].1), bits(&results[1].1), "{} lse avx2 vs scalar", dtype);
            let mut scratch = GroupScratch::default();
            for (s, st) in tail_st.iter().enumerate() {
                let mut path: Vec<KvChunk<'_>> = shared_ch.concat();
                path.extend(st.chunks());
                let (mut out, mut lse) = (vec![0f32; g * hd], vec![0f32; g]);
                attend_group(Path::Avx2, &q[s * g * hd..][..g * hd], hd, &path, scale, &mut scratch, &mut out, &mut lse);
                prop_assert_eq!(bits(&results[0].0[s * g * hd..][..g * hd]), bits(&out), "{} sequence {}", dtype, s);
                prop_assert_eq!(bits(&results[0].1[s * g..][..g]), bits(&lse), "{} sequence {} lse", dtype, s);
            }
        }
    }
}

#[test]
fn large_shared_node_uses_wide_tiles() {
    // 96 vectors over 300 keys in blocks of 16 (several tiles, widened rows), against attend_group.
    let hd = 64;
    for dtype in DTYPES {
        let node = Node::new(dtype, &[16; 19][..], hd, 7);
        let chunks = node.chunks();
        let n = node.n_keys();
        let m = 96;
        let q = data(m * hd, 3, 3.0);
        let lims = vec![n; m];
        let s = splice(
            Path::Avx2,
            dtype,
            hd,
            std::slice::from_ref(&chunks),
            &q,
            &lims,
            0.125,
            n,
        );
        let (mut out, mut lse) = (vec![0f32; m * hd], vec![0f32; m]);
        attend_group(
            Path::Avx2,
            &q,
            hd,
            &chunks,
            0.125,
            &mut GroupScratch::default(),
            &mut out,
            &mut lse,
        );
        assert_eq!(bits(&s.out), bits(&out), "{dtype}");
        assert_eq!(bits(&s.lse), bits(&lse), "{dtype}");
    }
}

#[test]
fn no_keys_leave_lanes_zero() {
    let hd = 16;
    let node = Node::new(KvDtype::F16, &[5], hd, 1);
    let q = data(2 * hd, 2, 1.0);
    let s = splice(
        Path::Avx2,
        KvDtype::F16,
        hd,
        &[node.chunks()],
        &q,
        &[0, 0],
        1.0,
        5,
    );
    assert!(s.out.iter().all(|&x| x.to_bits() == 0));
    assert!(s.lse.iter().all(|&x| x == f32::NEG_INFINITY));
    // No chunks at all.
    let mut scores = vec![0f32; 4];
    splice_scores(
        Path::Avx2,
        SpliceNode {
            chunks: &[],
            key_base: 0,
            lims: &[0, 0],
        },
        Vectors {
            data: &q,
            head_dim: hd,
        },
        1.0,
        Rows {
            data: &mut scores,
            row_len: 2,
        },
    );
    let mut lanes = vec![0f32; 2 * 8 * hd];
    splice_pv(
        Path::Avx2,
        SpliceNode {
            chunks: &[],
            key_base: 0,
            lims: &[0, 0],
        },
        Rows {
            data: &scores,
            row_len: 2,
        },
        hd,
        &mut lanes,
    );
    assert!(lanes.iter().all(|&x| x.to_bits() == 0));
}

#[test]
#[should_panic(expected = "vector 1 attends 6 keys of the node, but it holds 5")]
fn limit_past_node_panics() {
    let hd = 8;
    let node = Node::new(KvDtype::F32, &[5], hd, 1);
    let mut scores = vec![0f32; 2 * 8];
    splice_scores(
        Path::Avx2,
        SpliceNode {
            chunks: &node.chunks(),
            key_base: 0,
            lims: &[5, 6],
        },
        Vectors {
            data: &[0.0; 16],
            head_dim: hd,
        },
        1.0,
        Rows {
            data: &mut scores,
            row_len: 8,
        },
    );
}

#[test]
#[should_panic(expected = "do not fit a row of 8")]
fn row_overflow_panics() {
    let hd = 8;
    let node = Node::new(KvDtype::F32, &[5], hd, 1);
    let mut lanes = vec![0f32; 8 * hd];
    splice_pv(
        Path::Avx2,
        SpliceNode {
            chunks: &node.chunks(),
            key_base: 4,
            lims: &[5],
        },
        Rows {
            data: &[0.0; 8],
            row_len: 8,
        },
        hd,
        &mut lanes,
    );
}

#[test]
#[should_panic(expected = "lanes must hold")]
fn lanes_shape_panics() {
    let hd = 8;
    let node = Node::new(KvDtype::F16, &[5], hd, 1);
    let mut lanes = vec![0f32; 7 * hd];
    splice_pv(
        Path::Avx2,
        SpliceNode {
            chunks: &node.chunks(),
            key_base: 0,
            lims: &[5],
        },
        Rows {
            data: &[0.0; 8],
            row_len: 8,
        },
        hd,
        &mut lanes,
    );
}
