//! Tests of the block pool and the prefix cache: budget and refcount accounting, storage round trips
//! per dtype, prefix lookup, eviction (pins, outside references, leaves first, LRU), pending nodes and
//! salted hashes. The property tests compare against small models kept by the test itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ep_kernels::paged::KvRows;
use ep_kv::{block_hashes, BlockHash, BlockId, BlockPool, Hit, KvDtype, KvLayout, PrefixCache};
use half::{bf16, f16};
use proptest::prelude::*;

fn layout(dtype: KvDtype) -> KvLayout {
    KvLayout {
        n_layer: 2,
        n_head_kv: 2,
        head_dim: 3,
        block_tokens: 8,
        dtype,
    }
}

fn dtype_of(i: u8) -> KvDtype {
    match i % 3 {
        0 => KvDtype::F32,
        1 => KvDtype::F16,
        _ => KvDtype::Bf16,
    }
}

fn pool_of(n_blocks: usize) -> BlockPool {
    let l = layout(KvDtype::F32);
    BlockPool::new(l, n_blocks * l.block_bytes()).unwrap()
}

// ---------------------------------------------------------------------------------------------------
// (a) Pool: budget and reference counts.
// ---------------------------------------------------------------------------------------------------

#[test]
fn layout_geometry() {
    let l = layout(KvDtype::F16);
    assert_eq!(l.kv_width(), 6);
    assert_eq!(l.slab_len(), 48);
    assert_eq!(l.block_bytes(), 2 * 2 * 48 * 2);
    assert_eq!(layout(KvDtype::F32).block_bytes(), 2 * 2 * 48 * 4);
    assert_eq!(layout(KvDtype::Bf16).block_bytes(), 2 * 2 * 48 * 2);
    assert_eq!(l.blocks_for(0), 0);
    assert_eq!(l.blocks_for(1), 1);
    assert_eq!(l.blocks_for(8), 1);
    assert_eq!(l.blocks_for(9), 2);
}

#[test]
fn pool_rejects_bad_configs() {
    let l = layout(KvDtype::F32);
    // Budget below one block.
    assert!(BlockPool::new(l, l.block_bytes() - 1).is_err());
    assert!(BlockPool::new(l, 0).is_err());
    // Exactly one block fits.
    assert_eq!(BlockPool::new(l, l.block_bytes()).unwrap().n_blocks(), 1);
    for bt in [0, 4, 12] {
        assert!(BlockPool::new(
            KvLayout {
                block_tokens: bt,
                ..l
            },
            1 << 20
        )
        .is_err());
    }
    assert!(BlockPool::new(KvLayout { n_layer: 0, ..l }, 1 << 20).is_err());
    assert!(BlockPool::new(KvLayout { n_head_kv: 0, ..l }, 1 << 20).is_err());
    assert!(BlockPool::new(KvLayout { head_dim: 0, ..l }, 1 << 20).is_err());
    // More blocks than a BlockId can name: refused before anything is allocated.
    assert!(BlockPool::new(l, l.block_bytes() * (BlockId::MAX as usize + 1)).is_err());
}

#[test]
fn pool_alloc_until_full_then_reuse() {
    let l = layout(KvDtype::Bf16);
    let mut p = BlockPool::new(l, 5 * l.block_bytes() + l.block_bytes() / 2).unwrap();
    assert_eq!(p.n_blocks(), 5);
    assert_eq!(p.n_free(), 5);
    assert_eq!(p.used_bytes(), 0);
    let ids: Vec<BlockId> = (0..5).map(|_| p.alloc().unwrap()).collect();
    assert_eq!(ids, vec![0, 1, 2, 3, 4], "low ids first");
    assert_eq!(p.alloc(), None);
    assert_eq!(p.used_bytes(), 5 * l.block_bytes());
    assert!(p.used_bytes() <= p.budget_bytes());
    p.retain(3);
    p.release(3);
    assert_eq!(p.alloc(), None, "block 3 still has a reference");
    p.release(3);
    assert_eq!(p.ref_count(3), 0);
    assert_eq!(p.alloc(), Some(3));
    assert_eq!(p.ref_count(3), 1);
}

#[test]
#[should_panic(expected = "release of free block")]
fn release_of_free_block_panics() {
    let mut p = pool_of(2);
    let b = p.alloc().unwrap();
    p.release(b);
    p.release(b);
}

#[test]
#[should_panic(expected = "retain of free block")]
fn retain_of_free_block_panics() {
    let mut p = pool_of(2);
    p.retain(1);
}

#[derive(Clone, Debug)]
enum PoolOp {
    Alloc,
    Retain(usize),
    Release(usize),
}

fn pool_op() -> impl Strategy<Value = PoolOp> {
    prop_oneof![
        3 => Just(PoolOp::Alloc),
        2 => any::<usize>().prop_map(PoolOp::Retain),
        3 => any::<usize>().prop_map(PoolOp::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pool_budget_and_refcounts(
        dt in 0u8..3,
        nb in 1usize..10,
        extra_frac in 0.0f64..1.0,
        ops in prop::collection::vec(pool_op(), 0..200),
    ) {
        let l = layout(dtype_of(dt));
        let extra = ((l.block_bytes() - 1) as f64 * extra_frac) as usize;
        let budget = nb * l.block_bytes() + extra;
        let mut p = BlockPool::new(l, budget).unwrap();
        prop_assert_eq!(p.n_blocks(), budget / l.block_bytes());
        prop_assert_eq!(p.n_blocks(), nb);
        prop_assert_eq!(p.budget_bytes(), budget);
        // Model: live block -> reference count.
        let mut refs: BTreeMap<BlockId, u32> = BTreeMap::new();
        for op in ops {
            match op {
                PoolOp::Alloc => match p.alloc() {
                    Some(b) => {
                        prop_assert!((b as usize) < nb, "id {} out of range", b);
                        prop_assert!(!refs.contains_key(&b), "block {} handed out twice", b);
                        refs.insert(b, 1);
                    }
                    None => prop_assert_eq!(refs.len(), nb, "alloc failed with free blocks left"),
                },
                PoolOp::Retain(i) => {
                    if !refs.is_empty() {
                        let b = *refs.keys().nth(i % refs.len()).unwrap();
                        p.retain(b);
                        *refs.get_mut(&b).unwrap() += 1;
                    }
                }
                PoolOp::Release(i) => {
                    if !refs.is_empty() {
                        let b = *refs.keys().nth(i % refs.len()).unwrap();
                        p.release(b);
                        let r = refs.get_mut(&b).unwrap();
                        *r -= 1;
                        if *r == 0 {
                            refs.remove(&b);
                        }
                    }
                }
            }
            prop_assert!(refs.len() <= nb);
            prop_assert_eq!(p.n_free(), nb - refs.len());
            prop_assert_eq!(p.used_bytes(), refs.len() * l.block_bytes());
            prop_assert!(p.used_bytes() <= p.budget_bytes());
            for b in 0..nb as BlockId {
                prop_assert_eq!(p.ref_count(b), refs.get(&b).copied().unwrap_or(0), "block {}", b);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// (b) Pool storage: write / chunk / read_f32 / copy_block.
// ---------------------------------------------------------------------------------------------------

/// What the pool should store for `x` in `dtype`, as f32.
fn stored(dtype: KvDtype, x: f32) -> f32 {
    match dtype {
        KvDtype::F32 => x,
        KvDtype::F16 => f16::from_f32(x).to_f32(),
        KvDtype::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

fn rows_f32(r: &KvRows<'_>) -> Vec<f32> {
    match r {
        KvRows::F32(d) => d.to_vec(),
        KvRows::F16(d) => d.iter().map(|x| x.to_f32()).collect(),
        KvRows::Bf16(d) => d.iter().map(|x| x.to_f32()).collect(),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn rounding_is_really_applied() {
    // Guards the round-trip tests against a `stored` that would be the identity.
    let x = 1.0 + 1.0 / 4096.0;
    assert_eq!(stored(KvDtype::F32, x), x);
    assert_ne!(stored(KvDtype::F16, x), x);
    assert_ne!(stored(KvDtype::Bf16, 1.01), 1.01);
    let l = layout(KvDtype::F16);
    let mut p = BlockPool::new(l, l.block_bytes()).unwrap();
    let b = p.alloc().unwrap();
    let k = vec![x; l.kv_width()];
    p.write(0, b, 0, &k, &k);
    assert_eq!(p.read_f32(0, b).0[0], 1.0);
}

#[derive(Clone, Debug)]
struct Write {
    layer: usize,
    block: usize,
    slot: usize,
    n: usize,
    seed: u32,
}

fn write_op() -> impl Strategy<Value = Write> {
    (0usize..2, 0usize..3, 0usize..8, 1usize..9, any::<u32>()).prop_map(
        |(layer, block, slot, n, seed)| Write {
            layer,
            block,
            slot,
            n,
            seed,
        },
    )
}

/// Deterministic values from a seed, over a wide range (subnormal-ish to beyond f16's max, both signs).
fn values(seed: u32, n: usize) -> Vec<f32> {
    let mut x = seed as u64 | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let m = ((x >> 40) as u32 as f32) / (1u32 << 24) as f32 - 0.5;
            let e = ((x >> 20) % 44) as i32 - 24;
            m * 2f32.powi(e)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn write_read_chunk_round_trip(
        dt in 0u8..3,
        writes in prop::collection::vec(write_op(), 1..30),
        copies in prop::collection::vec((0usize..3, 0usize..3, 0usize..12), 0..4),
    ) {
        let dtype = dtype_of(dt);
        let l = layout(dtype);
        let w = l.kv_width();
        let sl = l.slab_len();
        let mut p = BlockPool::new(l, 3 * l.block_bytes()).unwrap();
        let blocks: Vec<BlockId> = (0..3).map(|_| p.alloc().unwrap()).collect();
        // Model: [layer][block] -> (K, V) as stored f32 values. The pool starts zeroed.
        let mut model = vec![vec![(vec![0f32; sl], vec![0f32; sl]); 3]; 2];
        for wr in &writes {
            let n = wr.n.min(8 - wr.slot);
            let k = values(wr.seed, n * w);
            let v = values(wr.seed ^ 0x5bd1_e995, n * w);
            p.write(wr.layer, blocks[wr.block], wr.slot, &k, &v);
            let m = &mut model[wr.layer][wr.block];
            for i in 0..n * w {
                m.0[wr.slot * w + i] = stored(dtype, k[i]);
                m.1[wr.slot * w + i] = stored(dtype, v[i]);
            }
        }
        for &(from, to, n) in &copies {
            p.copy_block(blocks[from], blocks[to], n);
            let len = n.min(8) * w;
            for layer in model.iter_mut() {
                let (fk, fv) = layer[from].clone();
                layer[to].0[..len].copy_from_slice(&fk[..len]);
                layer[to].1[..len].copy_from_slice(&fv[..len]);
            }
        }
        for (layer, m_layer) in model.iter().enumerate() {
            for (bi, &b) in blocks.iter().enumerate() {
                let (k, v) = p.read_f32(layer, b);
                prop_assert_eq!(bits(&k), bits(&m_layer[bi].0), "K layer {} block {}", layer, bi);
                prop_assert_eq!(bits(&v), bits(&m_layer[bi].1), "V layer {} block {}", layer, bi);
                for kv_head in 0..l.n_head_kv {
                    for n_keys in [0, 3, 8, 20] {
                        let c = p.chunk(layer, b, n_keys, kv_head);
                        prop_assert_eq!(c.n_keys, n_keys.min(8));
                        prop_assert_eq!(c.stride, w);
                        prop_assert_eq!(c.off, kv_head * l.head_dim);
                        let (ck, cv) = (rows_f32(&c.k), rows_f32(&c.v));
                        prop_assert_eq!(ck.len(), sl);
                        prop_assert_eq!(bits(&ck), bits(&m_layer[bi].0));
                        prop_assert_eq!(bits(&cv), bits(&m_layer[bi].1));
                        let is_dtype = matches!(
                            (&c.k, dtype),
                            (KvRows::F32(_), KvDtype::F32)
                                | (KvRows::F16(_), KvDtype::F16)
                                | (KvRows::Bf16(_), KvDtype::Bf16)
                        );
                        prop_assert!(is_dtype, "chunk rows in the wrong dtype");
                    }
                }
            }
        }
    }
}

#[test]
fn write_lands_at_slot_and_layer_only() {
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
        let l = layout(dtype);
        let w = l.kv_width();
        let mut p = BlockPool::new(l, 2 * l.block_bytes()).unwrap();
        let (a, b) = (p.alloc().unwrap(), p.alloc().unwrap());
        let k: Vec<f32> = (0..2 * w).map(|i| i as f32 + 1.0).collect();
        let v: Vec<f32> = (0..2 * w).map(|i| -(i as f32) - 1.0).collect();
        p.write(1, b, 3, &k, &v);
        let (rk, rv) = p.read_f32(1, b);
        assert!(rk[..3 * w].iter().all(|&x| x == 0.0));
        assert_eq!(&rk[3 * w..5 * w], &k[..]);
        assert_eq!(&rv[3 * w..5 * w], &v[..]);
        assert!(rk[5 * w..].iter().all(|&x| x == 0.0));
        // Other layer and other block untouched.
        assert!(p.read_f32(0, b).0.iter().all(|&x| x == 0.0));
        assert!(p.read_f32(1, a).0.iter().all(|&x| x == 0.0));
        assert!(p.read_f32(1, a).1.iter().all(|&x| x == 0.0));
        // copy_block of 4 slots copies slots 0..4 (all layers) and leaves the rest of the target.
        let fill: Vec<f32> = vec![7.0; 8 * w];
        p.write(0, a, 0, &fill, &fill);
        p.write(1, a, 0, &fill, &fill);
        p.copy_block(b, a, 4);
        let (ak, av) = p.read_f32(1, a);
        assert!(ak[..3 * w].iter().all(|&x| x == 0.0));
        assert_eq!(&ak[3 * w..4 * w], &k[..w]);
        assert_eq!(&av[3 * w..4 * w], &v[..w]);
        assert!(ak[4 * w..].iter().all(|&x| x == 7.0));
        assert!(p.read_f32(0, a).0[..4 * w].iter().all(|&x| x == 0.0));
        assert!(p.read_f32(0, a).0[4 * w..].iter().all(|&x| x == 7.0));
        // The source is unchanged.
        assert_eq!(&p.read_f32(1, b).0[3 * w..5 * w], &k[..]);
    }
}

#[test]
#[should_panic(expected = "write past block end")]
fn write_past_block_end_panics() {
    let l = layout(KvDtype::F32);
    let mut p = BlockPool::new(l, l.block_bytes()).unwrap();
    let b = p.alloc().unwrap();
    let k = vec![1.0; 2 * l.kv_width()];
    p.write(0, b, 7, &k, &k);
}

// ---------------------------------------------------------------------------------------------------
// (c) Prefix cache.
// ---------------------------------------------------------------------------------------------------

fn root() -> BlockHash {
    BlockHash::root(b"test-model")
}

/// The hash chain of a path of choices (one block per choice).
fn path_hashes(path: &[u8]) -> Vec<BlockHash> {
    let mut h = root();
    path.iter()
        .enumerate()
        .map(|(d, &c)| {
            h = h.chain(&[c as u32, 1000 + d as u32], None);
            h
        })
        .collect()
}

fn hash_of(path: &[u8]) -> BlockHash {
    *path_hashes(path).last().expect("non-empty path")
}

/// Inserts a chain of fresh blocks for `path` (all nodes new); returns the blocks, which keep the
/// allocation's reference (the caller's hold) on top of the tree's.
fn insert_chain(c: &mut PrefixCache, p: &mut BlockPool, path: &[u8], ready: bool) -> Vec<BlockId> {
    let hs = path_hashes(path);
    let mut out = Vec::new();
    for (i, h) in hs.iter().enumerate() {
        let b = p.alloc().expect("free block");
        assert!(c.insert(p, *h, i.checked_sub(1).map(|j| hs[j]), b, ready));
        out.push(b);
    }
    out
}

#[test]
fn lookup_returns_longest_present_prefix() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    assert_eq!(c.root(), root());
    assert!(c.is_empty());
    let blocks = insert_chain(&mut c, &mut p, &[1, 2, 3], true);
    assert_eq!(c.len(), 3);
    let hs = path_hashes(&[1, 2, 3, 4, 5]);
    let want: Vec<Hit> = blocks
        .iter()
        .map(|&block| Hit { block, ready: true })
        .collect();
    assert_eq!(c.lookup(&hs), want);
    assert_eq!(c.peek(&hs), want);
    assert_eq!(c.lookup(&hs[..2]), want[..2]);
    assert_eq!(c.lookup(&[]), vec![]);
    // A diverging path matches only the common part.
    assert_eq!(c.lookup(&path_hashes(&[1, 9, 3])), want[..1]);
    assert_eq!(c.peek(&path_hashes(&[2, 2, 3])), vec![]);
    // Lookup stops at the first missing hash even if later ones are present.
    assert_eq!(c.lookup(&[hs[0], hs[4], hs[1], hs[2]]), want[..1]);
    // Readiness is reported per node.
    let b4 = p.alloc().unwrap();
    assert!(c.insert(&mut p, hs[3], Some(hs[2]), b4, false));
    let got = c.peek(&hs);
    assert_eq!(got.len(), 4);
    assert_eq!(
        got[3],
        Hit {
            block: b4,
            ready: false
        }
    );
    c.mark_ready(&hs[3]);
    assert!(c.peek(&hs)[3].ready);
}

#[test]
fn insert_refuses_duplicates_and_orphans() {
    let mut p = pool_of(6);
    let mut c = PrefixCache::new(root());
    let hs = path_hashes(&[1, 2, 3]);
    let a = p.alloc().unwrap();
    assert!(c.insert(&mut p, hs[0], None, a, true));
    assert_eq!(p.ref_count(a), 2, "the tree takes one reference");
    let b = p.alloc().unwrap();
    // Duplicate hash: refused, no reference taken.
    assert!(!c.insert(&mut p, hs[0], None, b, true));
    assert_eq!(p.ref_count(b), 1);
    assert_eq!(c.block_of(&hs[0]), Some(a));
    // Missing parent: refused, no reference taken, nothing inserted.
    assert!(!c.insert(&mut p, hs[2], Some(hs[1]), b, true));
    assert_eq!(p.ref_count(b), 1);
    assert!(!c.contains(&hs[2]));
    assert_eq!(c.len(), 1);
    // The refused orphan did not count as a child of anything: the root block is still evictable.
    p.release(a);
    p.release(b);
    assert_eq!(c.evict(&mut p, 10), 1);
    assert!(c.is_empty());
    assert_eq!(p.n_free(), 6);
}

#[test]
fn eviction_basics() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let a = insert_chain(&mut c, &mut p, &[1, 2], true); // 1 <- 1.2
    let b = insert_chain(&mut c, &mut p, &[3], true); // 3
    let hs_a = path_hashes(&[1, 2]);
    let h3 = hash_of(&[3]);
    // Everything is still held by its inserter: nothing to evict.
    assert_eq!(c.reclaimable(&p), 0);
    assert_eq!(c.evict(&mut p, 10), 0);
    for &x in a.iter().chain(&b) {
        p.release(x);
    }
    assert_eq!(c.reclaimable(&p), 3);
    assert!(c.is_reclaimable(&p, &hs_a[0]));
    // Pinned chain 1 <- 1.2: only node 3 goes.
    assert_eq!(c.pin(&hs_a).len(), 2);
    assert!(c.is_pinned(&hs_a[0]) && c.is_pinned(&hs_a[1]));
    assert_eq!(c.reclaimable(&p), 1);
    let free0 = p.n_free();
    assert_eq!(c.evict(&mut p, 10), 1);
    assert_eq!(p.n_free(), free0 + 1);
    assert!(!c.contains(&h3));
    assert_eq!(c.evictions(), 1);
    // Pins nest.
    c.pin(&hs_a);
    c.unpin(&hs_a);
    assert_eq!(c.evict(&mut p, 10), 0);
    c.unpin(&hs_a);
    assert!(!c.is_pinned(&hs_a[0]));
    // Someone else holds the leaf: neither it nor (having a child) its parent can go.
    p.retain(a[1]);
    assert_eq!(c.evict(&mut p, 10), 0);
    assert!(!c.is_reclaimable(&p, &hs_a[1]));
    p.release(a[1]);
    // Leaf first, then its parent, in one call.
    assert_eq!(c.evict(&mut p, 10), 2);
    assert!(c.is_empty());
    assert_eq!(c.evictions(), 3);
    assert_eq!(p.n_free(), 8);
}

#[test]
fn pending_nodes_are_not_evicted_and_remove_pending_checks() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let hs = path_hashes(&[1, 2]);
    let b0 = insert_chain(&mut c, &mut p, &[1], true)[0];
    let b1 = p.alloc().unwrap();
    assert!(c.insert(&mut p, hs[1], Some(hs[0]), b1, false));
    p.release(b0);
    p.release(b1);
    // Not ready: not reclaimable and never evicted (and its parent has a child).
    assert!(!c.is_reclaimable(&p, &hs[1]));
    assert_eq!(c.evict(&mut p, 10), 0);
    // remove_pending: refuses a ready node, a wrong block, a node with children.
    assert!(!c.remove_pending(&mut p, &hs[0], b0), "node is ready");
    assert!(!c.remove_pending(&mut p, &hs[1], b0), "wrong block");
    assert!(!c.remove_pending(&mut p, &hash_of(&[7]), b1), "absent");
    let b2 = p.alloc().unwrap();
    let h2 = hash_of(&[1, 2, 3]);
    assert!(c.insert(&mut p, h2, Some(hs[1]), b2, false));
    assert!(!c.remove_pending(&mut p, &hs[1], b1), "has a child");
    assert!(c.remove_pending(&mut p, &h2, b2));
    assert_eq!(p.ref_count(b2), 1, "the tree's reference is dropped");
    assert!(c.remove_pending(&mut p, &hs[1], b1));
    assert_eq!(p.ref_count(b1), 0);
    assert!(!c.contains(&hs[1]));
    // The parent is a leaf again and can go.
    assert_eq!(c.evict(&mut p, 10), 1);
    // mark_ready makes a pending node evictable.
    let b3 = insert_chain(&mut c, &mut p, &[4], false)[0];
    p.release(b3);
    assert_eq!(c.evict(&mut p, 10), 0);
    c.mark_ready(&hash_of(&[4]));
    assert!(!c.remove_pending(&mut p, &hash_of(&[4]), b3), "ready now");
    assert_eq!(c.evict(&mut p, 10), 1);
}

#[test]
fn eviction_is_lru_one_at_a_time() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    for path in [[1u8], [2], [3], [4]] {
        let b = insert_chain(&mut c, &mut p, &path, true);
        p.release(b[0]);
    }
    // Use order now: 3, 1, 4, 2 (2 most recent).
    c.lookup(&path_hashes(&[3]));
    c.lookup(&path_hashes(&[1]));
    c.lookup(&path_hashes(&[4]));
    c.lookup(&path_hashes(&[2]));
    // peek does not count as a use.
    c.peek(&path_hashes(&[3]));
    let mut order = Vec::new();
    for _ in 0..4 {
        let before: Vec<u8> = (1..=4).filter(|&x| c.contains(&hash_of(&[x]))).collect();
        assert_eq!(c.evict(&mut p, 1), 1);
        let gone = before
            .into_iter()
            .find(|&x| !c.contains(&hash_of(&[x])))
            .unwrap();
        order.push(gone);
    }
    assert_eq!(order, vec![3, 1, 4, 2]);
}

/// With `want > 1`, eviction should still take the least recently used evictable leaf at each step,
/// including a parent that became a leaf during the same call (the module docs: "eviction takes the
/// least recently used such leaf").
///
/// Here chain A <- B and then a leaf X: one-at-a-time LRU removes B, then A (now a leaf, older than
/// X). A per-round implementation would remove B and X.
#[test]
fn eviction_is_lru_across_a_multi_block_call() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let hs = path_hashes(&[1, 2]);
    let a = p.alloc().unwrap();
    assert!(c.insert(&mut p, hs[0], None, a, true)); // A, tick 1
    let b = p.alloc().unwrap();
    assert!(c.insert(&mut p, hs[1], Some(hs[0]), b, true)); // B, tick 2
    let x = insert_chain(&mut c, &mut p, &[9], true)[0]; // X, tick 3
    for blk in [a, x, b] {
        p.release(blk);
    }
    assert_eq!(c.evict(&mut p, 2), 2);
    assert!(
        !c.contains(&hs[1]) && !c.contains(&hs[0]),
        "B, then A (now a leaf, older than X)"
    );
    assert!(c.contains(&hash_of(&[9])), "X was used last");
}

/// `reclaimable()` must not count a node that cannot be freed because something below it stays (a pin
/// on a child alone, a reference to a child block alone, a pending child under a computed parent):
/// here the parent is evictable on its own, but its pinned child keeps it.
#[test]
fn reclaimable_equals_full_evict_without_precondition() {
    let mut p = pool_of(4);
    let mut c = PrefixCache::new(root());
    let hs = path_hashes(&[1, 2]);
    let bl = insert_chain(&mut c, &mut p, &[1, 2], true);
    for &b in &bl {
        p.release(b);
    }
    c.pin(&hs[1..]); // the child only
    let r = c.reclaimable(&p);
    assert_eq!(r, c.evict(&mut p, usize::MAX));
}

/// `pin` counts only the nodes present now, but `unpin` decrements whatever is present later, so a
/// caller that pins a prefix before it is cached and later unpins the same hashes (as the engine's
/// `pin_prefix` / `unpin_prefix` do) removes another caller's pins.
///
/// `pin` returns what it pinned, and unpinning exactly that leaves B's pins in place.
#[test]
fn balanced_pin_unpin_keeps_other_pins() {
    let mut p = pool_of(4);
    let mut c = PrefixCache::new(root());
    let hs = path_hashes(&[1, 2]);
    let pin_a = c.pin(&hs);
    assert!(pin_a.is_empty(), "A pins before anything is cached");
    for b in insert_chain(&mut c, &mut p, &[1, 2], true) {
        p.release(b);
    }
    assert_eq!(c.pin(&hs).len(), 2, "B pins");
    c.unpin(&pin_a); // A undoes its pin
    assert!(
        c.is_pinned(&hs[0]) && c.is_pinned(&hs[1]),
        "B's pins were taken"
    );
    assert_eq!(c.evict(&mut p, usize::MAX), 0);
}

// Model-based property test of the cache. Nodes are paths of choices (one block each); the test keeps
// its own tree, pool references, pins and recency stamps.

#[derive(Clone, Debug)]
struct MNode {
    block: BlockId,
    ready: bool,
    pins: u32,
    stamp: u64,
}

#[derive(Clone, Debug)]
struct Seq {
    /// Blocks held (one reference each), whole chain from the root.
    blocks: Vec<BlockId>,
    /// (path, block) of the nodes this sequence inserted as pending.
    pending: Vec<(Vec<u8>, BlockId)>,
}

struct World {
    pool: BlockPool,
    cache: PrefixCache,
    nodes: BTreeMap<Vec<u8>, MNode>,
    /// Outside references to blocks (besides the tree's one per node).
    holds: Vec<BlockId>,
    seqs: Vec<Seq>,
    /// Outstanding prefix pins (engine-like ops).
    pinned: Vec<Vec<u8>>,
    clock: u64,
    engine_like: bool,
}

impl World {
    fn new(n_blocks: usize, engine_like: bool) -> Self {
        Self {
            pool: pool_of(n_blocks),
            cache: PrefixCache::new(root()),
            nodes: BTreeMap::new(),
            holds: Vec::new(),
            seqs: Vec::new(),
            pinned: Vec::new(),
            clock: 0,
            engine_like,
        }
    }

    fn outside_refs(&self, b: BlockId) -> usize {
        self.holds.iter().filter(|&&x| x == b).count()
            + self
                .seqs
                .iter()
                .map(|s| s.blocks.iter().filter(|&&x| x == b).count())
                .sum::<usize>()
    }

    fn children(&self, path: &[u8]) -> impl Iterator<Item = &Vec<u8>> + '_ {
        let path = path.to_vec();
        self.nodes
            .keys()
            .filter(move |k| k.len() == path.len() + 1 && k.starts_with(&path))
    }

    /// Ready, unpinned and referenced by the tree alone.
    fn state_evictable(&self, n: &MNode) -> bool {
        n.ready && n.pins == 0 && self.outside_refs(n.block) == 0
    }

    fn evictable_leaves(&self) -> Vec<Vec<u8>> {
        self.nodes
            .iter()
            .filter(|(k, n)| self.children(k).next().is_none() && self.state_evictable(n))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Nodes a full eviction can free: the whole subtree is state-evictable.
    fn fully_evictable(&self) -> usize {
        self.nodes
            .keys()
            .filter(|k| {
                self.nodes
                    .iter()
                    .filter(|(d, _)| d.starts_with(k))
                    .all(|(_, n)| self.state_evictable(n))
            })
            .count()
    }

    /// "Ancestors of a node in use or pinned are themselves in use or pinned" (and not-ready nodes
    /// only under in-use ancestors).
    fn precondition_holds(&self) -> bool {
        self.nodes.iter().all(|(k, n)| {
            self.state_evictable(n)
                || (1..k.len()).all(|d| !self.state_evictable(&self.nodes[&k[..d]]))
        })
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.cache.len(), self.nodes.len());
        let mut expected_refs: HashMap<BlockId, usize> = HashMap::new();
        for (k, n) in &self.nodes {
            let h = hash_of(k);
            prop_assert!(self.cache.contains(&h), "node {:?} missing", k);
            prop_assert_eq!(self.cache.block_of(&h), Some(n.block));
            prop_assert_eq!(self.cache.is_pinned(&h), n.pins > 0);
            prop_assert_eq!(
                self.cache.is_reclaimable(&self.pool, &h),
                self.state_evictable(n)
            );
            *expected_refs.entry(n.block).or_default() += 1;
        }
        for b in self
            .holds
            .iter()
            .chain(self.seqs.iter().flat_map(|s| &s.blocks))
        {
            *expected_refs.entry(*b).or_default() += 1;
        }
        for b in 0..self.pool.n_blocks() as BlockId {
            let want = expected_refs.get(&b).copied().unwrap_or(0) as u32;
            prop_assert_eq!(self.pool.ref_count(b), want, "refcount of block {}", b);
        }
        prop_assert_eq!(
            self.pool.n_free(),
            self.pool.n_blocks() - expected_refs.len()
        );
        // What a full eviction would free, whatever pins and references sit where.
        let reclaimable = self.cache.reclaimable(&self.pool);
        prop_assert_eq!(reclaimable, self.fully_evictable());
        if self.engine_like {
            prop_assert!(
                self.precondition_holds(),
                "test bug: engine-like ops broke the precondition"
            );
        }
        Ok(())
    }

    /// Evicts and checks the result against the model. Returns how many were freed.
    fn evict(&mut self, want: usize) -> Result<usize, TestCaseError> {
        let leaves_before = self.evictable_leaves();
        let free_before = self.pool.n_free();
        let evictions_before = self.cache.evictions();
        let fully = self.fully_evictable();
        let precondition = self.precondition_holds();
        let reclaimable = self.cache.reclaimable(&self.pool);
        let freed = self.cache.evict(&mut self.pool, want);
        let gone: BTreeSet<Vec<u8>> = self
            .nodes
            .keys()
            .filter(|k| !self.cache.contains(&hash_of(k)))
            .cloned()
            .collect();
        prop_assert_eq!(freed, gone.len(), "evict's count");
        prop_assert!(freed <= want);
        prop_assert_eq!(self.pool.n_free(), free_before + freed, "pool free count");
        prop_assert_eq!(self.cache.evictions(), evictions_before + freed as u64);
        for k in &gone {
            let n = &self.nodes[k];
            prop_assert!(n.pins == 0, "evicted pinned node {:?}", k);
            prop_assert!(n.ready, "evicted pending node {:?}", k);
            prop_assert!(
                self.outside_refs(n.block) == 0,
                "evicted node {:?} whose block is in use",
                k
            );
            for ch in self.children(k) {
                prop_assert!(
                    gone.contains(ch),
                    "evicted {:?} but left its child {:?}",
                    k,
                    ch
                );
            }
        }
        if want == 1 && freed == 1 {
            let k = gone.iter().next().unwrap();
            prop_assert!(leaves_before.contains(k), "evicted non-leaf {:?}", k);
            let min = leaves_before
                .iter()
                .map(|l| self.nodes[l].stamp)
                .min()
                .unwrap();
            prop_assert_eq!(self.nodes[k].stamp, min, "not the least recently used leaf");
        }
        for k in &gone {
            self.nodes.remove(k);
        }
        if freed < want {
            prop_assert!(
                self.evictable_leaves().is_empty(),
                "stopped with evictable leaves left"
            );
            prop_assert_eq!(
                freed,
                fully,
                "a full eviction frees exactly the evictable subtrees"
            );
            if precondition {
                prop_assert_eq!(freed, reclaimable, "reclaimable() vs a full eviction");
            }
        }
        Ok(freed)
    }

    /// A block for a new node: free one, else evict one (as the engine does).
    fn alloc(&mut self) -> Result<Option<BlockId>, TestCaseError> {
        if let Some(b) = self.pool.alloc() {
            return Ok(Some(b));
        }
        if self.evict(1)? > 0 {
            return Ok(Some(self.pool.alloc().expect("evicted block is free")));
        }
        Ok(None)
    }

    fn lookup(&mut self, path: &[u8], peek: bool) -> Result<(), TestCaseError> {
        let hs = path_hashes(path);
        let got = if peek {
            self.cache.peek(&hs)
        } else {
            self.cache.lookup(&hs)
        };
        let mut want = Vec::new();
        for d in 1..=path.len() {
            match self.nodes.get(&path[..d]) {
                Some(n) => want.push(Hit {
                    block: n.block,
                    ready: n.ready,
                }),
                None => break,
            }
        }
        prop_assert_eq!(&got, &want, "lookup/peek of {:?}", path);
        if !peek {
            self.clock += 1;
            for d in 1..=want.len() {
                self.nodes.get_mut(&path[..d]).unwrap().stamp = self.clock;
            }
        }
        Ok(())
    }

    fn insert(&mut self, path: &[u8], block: BlockId, ready: bool) -> Result<bool, TestCaseError> {
        let parent = (path.len() > 1).then(|| hash_of(&path[..path.len() - 1]));
        let ok = self
            .cache
            .insert(&mut self.pool, hash_of(path), parent, block, ready);
        let expect = !self.nodes.contains_key(path)
            && (path.len() == 1 || self.nodes.contains_key(&path[..path.len() - 1]));
        prop_assert_eq!(ok, expect, "insert of {:?}", path);
        if ok {
            self.clock += 1;
            self.nodes.insert(
                path.to_vec(),
                MNode {
                    block,
                    ready,
                    pins: 0,
                    stamp: self.clock,
                },
            );
        }
        Ok(ok)
    }

    fn pin(&mut self, paths: &[Vec<u8>], unpin: bool) -> Result<(), TestCaseError> {
        let hs: Vec<BlockHash> = paths.iter().map(|p| hash_of(p)).collect();
        if unpin {
            self.cache.unpin(&hs);
        } else {
            let n = self.cache.pin(&hs).len();
            let present = paths.iter().filter(|p| self.nodes.contains_key(*p)).count();
            prop_assert_eq!(n, present);
        }
        for p in paths {
            if let Some(n) = self.nodes.get_mut(p) {
                n.pins = if unpin {
                    n.pins.saturating_sub(1)
                } else {
                    n.pins + 1
                };
            }
        }
        Ok(())
    }

    fn remove_pending(&mut self, path: &[u8], block: BlockId) -> Result<bool, TestCaseError> {
        let ok = self
            .cache
            .remove_pending(&mut self.pool, &hash_of(path), block);
        let expect = self
            .nodes
            .get(path)
            .is_some_and(|n| !n.ready && n.block == block)
            && self.children(path).next().is_none();
        prop_assert_eq!(ok, expect, "remove_pending of {:?}", path);
        if ok {
            self.nodes.remove(path);
        }
        Ok(ok)
    }
}

fn prefixes(path: &[u8]) -> Vec<Vec<u8>> {
    (1..=path.len()).map(|d| path[..d].to_vec()).collect()
}

#[derive(Clone, Debug)]
enum CacheOp {
    // Arbitrary ops.
    Insert {
        path: Vec<u8>,
        ready: bool,
        hold: bool,
    },
    Lookup(Vec<u8>),
    Peek(Vec<u8>),
    PinOne(Vec<u8>),
    UnpinOne(Vec<u8>),
    HoldOne(Vec<u8>),
    DropHold(usize),
    MarkReady(Vec<u8>),
    RemovePending {
        path: Vec<u8>,
        right_block: bool,
    },
    Evict(usize),
    // Engine-like ops.
    Admit {
        path: Vec<u8>,
        pending_from: usize,
    },
    Finish(usize),
    Cancel(usize),
    PinPrefix(Vec<u8>),
    /// Undoes an earlier PinPrefix (the i-th outstanding one).
    UnpinPrefix(usize),
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0u8..3, 1..5)
}

fn evict_want() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(1usize), 1 => 2usize..5, 1 => Just(usize::MAX)]
}

fn arbitrary_op() -> impl Strategy<Value = CacheOp> {
    prop_oneof![
        6 => (path(), prop::bool::weighted(0.8), any::<bool>())
            .prop_map(|(path, ready, hold)| CacheOp::Insert { path, ready, hold }),
        3 => path().prop_map(CacheOp::Lookup),
        1 => path().prop_map(CacheOp::Peek),
        1 => path().prop_map(CacheOp::PinOne),
        1 => path().prop_map(CacheOp::UnpinOne),
        1 => path().prop_map(CacheOp::HoldOne),
        2 => any::<usize>().prop_map(CacheOp::DropHold),
        1 => path().prop_map(CacheOp::MarkReady),
        1 => (path(), prop::bool::weighted(0.8))
            .prop_map(|(path, right_block)| CacheOp::RemovePending { path, right_block }),
        3 => evict_want().prop_map(CacheOp::Evict),
    ]
}

fn engine_op() -> impl Strategy<Value = CacheOp> {
    prop_oneof![
        5 => (path(), 0usize..6).prop_map(|(path, pending_from)| CacheOp::Admit { path, pending_from }),
        3 => any::<usize>().prop_map(CacheOp::Finish),
        2 => any::<usize>().prop_map(CacheOp::Cancel),
        2 => path().prop_map(CacheOp::Lookup),
        1 => path().prop_map(CacheOp::Peek),
        1 => path().prop_map(CacheOp::PinPrefix),
        1 => any::<usize>().prop_map(CacheOp::UnpinPrefix),
        2 => evict_want().prop_map(CacheOp::Evict),
    ]
}

fn run_world(w: &mut World, ops: Vec<CacheOp>) -> Result<(), TestCaseError> {
    for op in ops {
        match op {
            CacheOp::Insert { path, ready, hold } => {
                let Some(b) = w.alloc()? else { continue };
                w.insert(&path, b, ready)?;
                if hold {
                    w.holds.push(b);
                } else {
                    w.pool.release(b);
                }
            }
            CacheOp::Lookup(p) => w.lookup(&p, false)?,
            CacheOp::Peek(p) => w.lookup(&p, true)?,
            CacheOp::PinOne(p) => w.pin(&[p], false)?,
            CacheOp::UnpinOne(p) => w.pin(&[p], true)?,
            CacheOp::PinPrefix(p) => {
                // Unpin later exactly what was pinned (the present nodes are a prefix of the chain).
                let present = prefixes(&p)
                    .into_iter()
                    .take_while(|q| w.nodes.contains_key(q))
                    .count();
                w.pin(&prefixes(&p), false)?;
                w.pinned.push(p[..present].to_vec());
            }
            CacheOp::UnpinPrefix(i) => {
                if !w.pinned.is_empty() {
                    let p = w.pinned.swap_remove(i % w.pinned.len());
                    if !p.is_empty() {
                        w.pin(&prefixes(&p), true)?;
                    }
                }
            }
            CacheOp::HoldOne(p) => {
                if let Some(n) = w.nodes.get(&p) {
                    let b = n.block;
                    w.pool.retain(b);
                    w.holds.push(b);
                }
            }
            CacheOp::DropHold(i) => {
                if !w.holds.is_empty() {
                    let b = w.holds.swap_remove(i % w.holds.len());
                    w.pool.release(b);
                }
            }
            CacheOp::MarkReady(p) => {
                w.cache.mark_ready(&hash_of(&p));
                if let Some(n) = w.nodes.get_mut(&p) {
                    n.ready = true;
                }
            }
            CacheOp::RemovePending { path, right_block } => {
                let b = match w.nodes.get(&path) {
                    Some(n) if right_block => n.block,
                    Some(n) => (n.block + 1) % w.pool.n_blocks() as BlockId,
                    None => 0,
                };
                w.remove_pending(&path, b)?;
            }
            CacheOp::Evict(want) => {
                w.evict(want)?;
            }
            CacheOp::Admit { path, pending_from } => {
                // As the engine: wait (skip) if a cached prefix block is still pending.
                let hits = w.cache.peek(&path_hashes(&path));
                if hits.iter().any(|h| !h.ready) {
                    continue;
                }
                w.lookup(&path, false)?;
                let mut seq = Seq {
                    blocks: Vec::new(),
                    pending: Vec::new(),
                };
                for h in &hits {
                    w.pool.retain(h.block);
                    seq.blocks.push(h.block);
                }
                // The sequence's blocks count as held from here on (the model sees them).
                w.seqs.push(seq);
                let si = w.seqs.len() - 1;
                for d in hits.len() + 1..=path.len() {
                    let Some(b) = w.alloc()? else { break };
                    w.seqs[si].blocks.push(b);
                    let ready = d <= pending_from;
                    prop_assert!(w.insert(&path[..d], b, ready)?, "chain insert refused");
                    if !ready {
                        w.seqs[si].pending.push((path[..d].to_vec(), b));
                    }
                }
            }
            CacheOp::Finish(i) => {
                if !w.seqs.is_empty() {
                    let s = w.seqs.swap_remove(i % w.seqs.len());
                    for (p, _) in &s.pending {
                        w.cache.mark_ready(&hash_of(p));
                        w.nodes.get_mut(p).unwrap().ready = true;
                    }
                    for b in s.blocks {
                        w.pool.release(b);
                    }
                }
            }
            CacheOp::Cancel(i) => {
                if !w.seqs.is_empty() {
                    let s = w.seqs.swap_remove(i % w.seqs.len());
                    for (p, b) in s.pending.iter().rev() {
                        prop_assert!(w.remove_pending(p, *b)?, "own pending node not removed");
                    }
                    for b in s.blocks {
                        w.pool.release(b);
                    }
                }
            }
        }
        w.check()?;
    }
    // Release everything outside the tree; then a full eviction empties the tree except pins.
    for b in std::mem::take(&mut w.holds) {
        w.pool.release(b);
    }
    for s in std::mem::take(&mut w.seqs) {
        // As the engine's release: drop the sequence's pending nodes first.
        for (p, b) in s.pending.iter().rev() {
            prop_assert!(w.remove_pending(p, *b)?, "own pending node not removed");
        }
        for b in s.blocks {
            w.pool.release(b);
        }
    }
    w.check()?;
    w.evict(usize::MAX)?;
    w.check()?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary operations (including pins on single nodes and outside references to single blocks):
    /// eviction never frees a pinned, pending or outside-referenced block, frees leaves before their
    /// parents, takes the LRU leaf, and its count matches the pool.
    #[test]
    fn cache_arbitrary_ops(
        n_blocks in 3usize..16,
        ops in prop::collection::vec(arbitrary_op(), 0..120),
    ) {
        let mut w = World::new(n_blocks, false);
        run_world(&mut w, ops)?;
    }

    /// Engine-like use (sequences hold whole chains, pending suffixes, prefix pins): additionally,
    /// `reclaimable()` always equals what a full eviction frees.
    #[test]
    fn cache_engine_like_ops(
        n_blocks in 3usize..16,
        ops in prop::collection::vec(engine_op(), 0..120),
    ) {
        let mut w = World::new(n_blocks, true);
        run_world(&mut w, ops)?;
    }
}

// ---------------------------------------------------------------------------------------------------
// (d) Hashes and salts.
// ---------------------------------------------------------------------------------------------------

fn salt(s: &[u8]) -> Option<&[u8]> {
    Some(s)
}

#[test]
fn hash_distinguishes_inputs() {
    let r = root();
    let all = [
        r.chain(&[], None),
        r.chain(&[], salt(b"")),
        r.chain(&[0], None),
        r.chain(&[1, 2], None),
        r.chain(&[2, 1], None),
        r.chain(&[1, 2], salt(b"a")),
        r.chain(&[1, 2], salt(b"b")),
        r.chain(&[1, 2], salt(b"")),
        r.chain(&[1, 2], salt(b"ab")),
        BlockHash::root(b"other").chain(&[1, 2], None),
        r.chain(&[1], None).chain(&[2], None),
        BlockHash::root(b""),
        r,
    ];
    let set: BTreeSet<BlockHash> = all.iter().copied().collect();
    assert_eq!(set.len(), all.len(), "collision among {all:?}");
    // Deterministic.
    assert_eq!(
        r.chain(&[1, 2], salt(b"a")),
        root().chain(&[1, 2], salt(b"a"))
    );
    assert_eq!(BlockHash::root(b"test-model"), r);
}

#[test]
fn block_hashes_shape() {
    let r = root();
    let toks: Vec<u32> = (0..40).collect();
    let hs = block_hashes(r, &toks, 16, 0, None);
    assert_eq!(hs.len(), 2, "full blocks only");
    assert_eq!(hs[0], r.chain(&toks[..16], None));
    assert_eq!(hs[1], hs[0].chain(&toks[16..32], None));
    assert!(block_hashes(r, &toks[..15], 16, 0, salt(b"s")).is_empty());
    // Salt boundary: public_len 16 leaves block 0 public, 17 makes block 1 the first private one.
    let s = Some(&b"tenant"[..]);
    for public_len in [16, 17, 31, 32] {
        let hs = block_hashes(r, &toks, 16, public_len, s);
        assert_eq!(hs[0], r.chain(&toks[..16], None), "public_len {public_len}");
        let salted1 = hs[0].chain(&toks[16..32], s);
        assert_eq!(hs[1] == salted1, public_len < 32, "public_len {public_len}");
    }
    let hs = block_hashes(r, &toks, 16, 15, s);
    assert_eq!(hs[0], r.chain(&toks[..16], s));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn salts_separate_tenants(
        toks in prop::collection::vec(any::<u32>(), 0..100),
        bt in prop_oneof![Just(8usize), Just(16usize)],
        public_extra in 0usize..120,
        s1 in prop::collection::vec(any::<u8>(), 0..8),
        s2 in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        prop_assume!(s1 != s2);
        let public_len = public_extra.min(toks.len() + bt);
        let r = root();
        let n = toks.len() / bt;
        let a = block_hashes(r, &toks, bt, public_len, Some(&s1[..]));
        let b = block_hashes(r, &toks, bt, public_len, Some(&s2[..]));
        let none = block_hashes(r, &toks, bt, public_len, None);
        let unsalted = block_hashes(r, &toks, bt, 0, None);
        prop_assert_eq!(a.len(), n);
        prop_assert_eq!(b.len(), n);
        prop_assert_eq!(&none, &unsalted, "no salt: public_len is irrelevant");
        // Block i holds positions i*bt .. (i+1)*bt - 1: the first one holding a position >= public_len.
        let first_private = public_len / bt;
        for i in 0..n {
            if i < first_private {
                prop_assert_eq!(a[i], none[i], "public block {} salted", i);
                prop_assert_eq!(b[i], none[i]);
            } else {
                prop_assert_ne!(a[i], b[i], "private block {} equal across salts", i);
                prop_assert_ne!(a[i], none[i], "private block {} equals unsalted", i);
                prop_assert_ne!(b[i], none[i]);
            }
        }
        // Same salt, same tokens: same hashes; and a prefix of the tokens gives a prefix of the hashes.
        prop_assert_eq!(&a, &block_hashes(r, &toks, bt, public_len, Some(&s1[..])));
        let cut = toks.len() / 2;
        let a_cut = block_hashes(r, &toks[..cut], bt, public_len, Some(&s1[..]));
        prop_assert_eq!(&a_cut[..], &a[..a_cut.len()]);
        // The chain carries the salt: salting only the first private block changes every later one,
        // even though the later blocks are chained without a salt here.
        if first_private < n {
            let mut prev = if first_private == 0 { r } else { none[first_private - 1] };
            for i in first_private..n {
                let salt = if i == first_private { Some(&s1[..]) } else { None };
                prev = prev.chain(&toks[i * bt..(i + 1) * bt], salt);
                prop_assert_ne!(prev, none[i], "block {} lost the salt of block {}", i, first_private);
            }
        }
    }
}
