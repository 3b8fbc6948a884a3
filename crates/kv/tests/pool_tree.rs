//! Tests of the block pool and the prefix cache: budget and refcount accounting, storage round trips
//! per dtype, prefix lookup, eviction (pins, outside references, leaves first, in the order nodes
//! became idle), pending and importing nodes, and salted hashes. The property tests compare against
//! small models kept by the test itself.

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

/// A hit on a block computed here (not imported).
fn hit(block: BlockId, ready: bool) -> Hit {
    Hit {
        block,
        ready,
        imported: false,
        importing: None,
    }
}

/// Inserts a chain of fresh blocks for `path` (all nodes new); returns the blocks, which keep the
/// allocation's reference (the caller's hold, as a sequence's) on top of the tree's.
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

/// Drops the caller's references to `blocks` through the cache, last to first (as a sequence does).
fn release_all(c: &mut PrefixCache, p: &mut BlockPool, blocks: &[BlockId]) {
    for &b in blocks.iter().rev() {
        c.release(p, b);
    }
}

/// Evicts one block at a time and names which of `paths` went each time.
fn eviction_order(c: &mut PrefixCache, p: &mut BlockPool, paths: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut order = Vec::new();
    while c.reclaimable() > 0 {
        let before: Vec<&[u8]> = paths
            .iter()
            .copied()
            .filter(|x| c.contains(&hash_of(x)))
            .collect();
        assert_eq!(c.evict(p, 1), 1, "an idle node left but nothing evicted");
        let gone: Vec<&[u8]> = before
            .into_iter()
            .filter(|x| !c.contains(&hash_of(x)))
            .collect();
        assert_eq!(gone.len(), 1, "evict(1) removed {gone:?}");
        order.push(gone[0].to_vec());
    }
    order
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
    let want: Vec<Hit> = blocks.iter().map(|&b| hit(b, true)).collect();
    assert_eq!(c.lookup(&hs), want);
    assert_eq!(c.peek(&hs), want);
    assert_eq!(c.present(&hs), 3);
    assert_eq!(c.lookup(&hs[..2]), want[..2]);
    assert_eq!(c.lookup(&[]), vec![]);
    assert_eq!(c.present(&[]), 0);
    // A diverging path matches only the common part.
    assert_eq!(c.lookup(&path_hashes(&[1, 9, 3])), want[..1]);
    assert_eq!(c.present(&path_hashes(&[1, 9, 3])), 1);
    assert_eq!(c.peek(&path_hashes(&[2, 2, 3])), vec![]);
    // Lookup stops at the first missing hash even if later ones are present.
    assert_eq!(c.lookup(&[hs[0], hs[4], hs[1], hs[2]]), want[..1]);
    assert_eq!(c.present(&[hs[0], hs[4], hs[1], hs[2]]), 1);
    // Readiness is reported per node.
    let b4 = p.alloc().unwrap();
    assert!(c.insert(&mut p, hs[3], Some(hs[2]), b4, false));
    let got = c.peek(&hs);
    assert_eq!(got.len(), 4);
    assert_eq!(got[3], hit(b4, false));
    c.mark_ready(&p, &hs[3]);
    assert!(c.peek(&hs)[3].ready);
    // Lookups change nothing: no reference is taken and nothing becomes (or stops being) idle.
    assert_eq!(p.ref_count(blocks[0]), 2);
    release_all(&mut c, &mut p, &blocks);
    c.release(&mut p, b4);
    assert_eq!(c.reclaimable(), 4);
    assert_eq!(c.idle_among(&hs), 4);
    c.lookup(&hs);
    c.peek(&hs);
    assert_eq!(c.reclaimable(), 4);
    assert_eq!(p.ref_count(blocks[0]), 1);
}

#[test]
fn insert_refuses_duplicates_orphans_and_used_blocks() {
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
    // A block already behind another node: refused, no reference taken, the parent gains no child.
    assert!(!c.insert(&mut p, hs[1], Some(hs[0]), a, true));
    assert!(!c.insert(&mut p, hash_of(&[5]), None, a, true));
    assert_eq!(p.ref_count(a), 2);
    assert!(!c.contains(&hs[1]) && !c.contains(&hash_of(&[5])));
    assert_eq!(c.len(), 1);
    // The refused inserts did not count as children of anything: the root block is still evictable.
    c.release(&mut p, a);
    c.release(&mut p, b); // not cached: just freed
    assert_eq!(p.ref_count(b), 0);
    assert_eq!(c.reclaimable(), 1);
    assert_eq!(c.evict(&mut p, 10), 1);
    assert!(c.is_empty());
    assert_eq!(c.reclaimable(), 0);
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
    assert_eq!(c.reclaimable(), 0);
    assert!(!c.is_reclaimable(&hs_a[0]));
    assert_eq!(c.evict(&mut p, 10), 0);
    release_all(&mut c, &mut p, &a);
    release_all(&mut c, &mut p, &b);
    assert_eq!(c.reclaimable(), 3);
    assert!(c.is_reclaimable(&hs_a[0]) && c.is_reclaimable(&hs_a[1]) && c.is_reclaimable(&h3));
    assert!(!c.is_reclaimable(&hash_of(&[7])), "absent");
    // Pinned chain 1 <- 1.2: only node 3 goes.
    assert_eq!(c.unpinned_among(&hs_a), 2);
    assert_eq!(c.pin(&p, &hs_a), hs_a);
    assert_eq!(c.unpinned_among(&hs_a), 0);
    assert_eq!(c.pinned_nodes(), 2);
    assert!(c.is_pinned(&hs_a[0]) && c.is_pinned(&hs_a[1]));
    assert!(!c.is_reclaimable(&hs_a[0]));
    assert_eq!(c.reclaimable(), 1);
    let free0 = p.n_free();
    assert_eq!(c.evict(&mut p, 10), 1);
    assert_eq!(p.n_free(), free0 + 1);
    assert!(!c.contains(&h3));
    assert_eq!(c.evictions(), 1);
    assert_eq!(c.reclaimable(), 0);
    // Pins nest.
    c.pin(&p, &hs_a);
    assert_eq!(c.pinned_nodes(), 2);
    c.unpin(&p, &hs_a);
    assert_eq!(c.reclaimable(), 0);
    assert_eq!(c.evict(&mut p, 10), 0);
    c.unpin(&p, &hs_a);
    assert!(!c.is_pinned(&hs_a[0]));
    assert_eq!(c.pinned_nodes(), 0);
    assert_eq!(c.reclaimable(), 2);
    // A sequence holds the chain: nothing can go.
    assert_eq!(c.acquire(&mut p, &path_hashes(&[1, 2, 9])), a);
    assert_eq!(p.ref_count(a[1]), 2);
    assert_eq!(c.reclaimable(), 0);
    assert!(!c.is_reclaimable(&hs_a[1]));
    assert_eq!(c.evict(&mut p, 10), 0);
    release_all(&mut c, &mut p, &a);
    // Leaf first, then its parent, in one call.
    assert_eq!(c.reclaimable(), 2);
    assert_eq!(c.evict(&mut p, 10), 2);
    assert!(c.is_empty());
    assert_eq!(c.evictions(), 3);
    assert_eq!(c.reclaimable(), 0);
    assert_eq!(p.n_free(), 8);
}

#[test]
fn acquire_and_release_move_nodes_off_and_onto_the_idle_list() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let a = insert_chain(&mut c, &mut p, &[1, 2, 3], true);
    let hs = path_hashes(&[1, 2, 3]);
    release_all(&mut c, &mut p, &a);
    assert_eq!(c.reclaimable(), 3);
    // Acquire takes the present prefix only, one reference each.
    assert_eq!(c.acquire(&mut p, &path_hashes(&[1, 2, 7, 8])), a[..2]);
    assert_eq!(c.acquire(&mut p, &path_hashes(&[4])), Vec::<BlockId>::new());
    assert_eq!(c.acquire(&mut p, &[]), Vec::<BlockId>::new());
    assert_eq!(
        (p.ref_count(a[0]), p.ref_count(a[1]), p.ref_count(a[2])),
        (2, 2, 1)
    );
    assert_eq!(c.reclaimable(), 1);
    assert_eq!(c.idle_among(&hs), 1);
    assert!(c.is_reclaimable(&hs[2]) && !c.is_reclaimable(&hs[1]));
    // Two holders: the node is idle only after both released.
    assert_eq!(c.acquire(&mut p, &hs[..1]), a[..1]);
    c.release(&mut p, a[1]);
    c.release(&mut p, a[0]);
    assert_eq!(c.reclaimable(), 2);
    assert!(!c.is_reclaimable(&hs[0]));
    c.release(&mut p, a[0]);
    assert_eq!(c.reclaimable(), 3);
    assert_eq!(p.ref_count(a[0]), 1);
    // A block that is not cached is simply released.
    let x = p.alloc().unwrap();
    p.retain(x);
    c.release(&mut p, x);
    assert_eq!(p.ref_count(x), 1);
    c.release(&mut p, x);
    assert_eq!(p.ref_count(x), 0);
    assert_eq!(c.reclaimable(), 3);
    assert_eq!(c.evict(&mut p, usize::MAX), 3);
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
    c.release(&mut p, b1);
    c.release(&mut p, b0);
    // Not ready: not reclaimable and never evicted. Its parent is idle but not freeable (a pending
    // node below an idle one is outside the precondition, so reclaimable() counts the parent): the
    // eviction passes over it and stops.
    assert!(!c.is_reclaimable(&hs[1]));
    assert!(c.is_reclaimable(&hs[0]));
    assert_eq!(c.reclaimable(), 1);
    assert_eq!(c.evict(&mut p, 10), 0);
    assert_eq!(c.evictions(), 0);
    assert_eq!(c.reclaimable(), 1, "passing over a node keeps it idle");
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
    c.release(&mut p, b2);
    assert!(c.remove_pending(&mut p, &hs[1], b1));
    assert_eq!(p.ref_count(b1), 0);
    assert!(!c.contains(&hs[1]));
    // The parent is a leaf again and can go.
    assert_eq!(c.evict(&mut p, 10), 1);
    assert_eq!(c.reclaimable(), 0);
    // mark_ready makes a pending node idle, and evictable.
    let b3 = insert_chain(&mut c, &mut p, &[4], false)[0];
    c.release(&mut p, b3);
    assert_eq!(c.reclaimable(), 0);
    assert_eq!(c.evict(&mut p, 10), 0);
    c.mark_ready(&p, &hash_of(&[4]));
    assert!(c.is_reclaimable(&hash_of(&[4])));
    assert_eq!(c.reclaimable(), 1);
    assert!(!c.remove_pending(&mut p, &hash_of(&[4]), b3), "ready now");
    assert_eq!(c.evict(&mut p, 10), 1);
    assert_eq!(p.n_free(), 8);
}

#[test]
fn importing_nodes_and_remove_leaf() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let hs = path_hashes(&[1, 2]);
    let a = insert_chain(&mut c, &mut p, &[1, 2], true);
    c.set_importing(&p, &hs[1], Some(7));
    release_all(&mut c, &mut p, &a);
    assert_eq!(
        c.lookup(&hs)[1],
        Hit {
            block: a[1],
            ready: true,
            imported: true,
            importing: Some(7)
        }
    );
    assert_eq!(c.peek(&hs), c.lookup(&hs));
    assert!(!c.lookup(&hs)[0].imported);
    // Still importing: not idle, never evicted (nor its parent).
    assert!(!c.is_reclaimable(&hs[1]));
    assert_eq!(c.evict(&mut p, usize::MAX), 0);
    // Import complete: idle, still marked as imported.
    c.set_importing(&p, &hs[1], None);
    assert!(c.is_reclaimable(&hs[1]));
    assert_eq!(c.reclaimable(), 2);
    assert_eq!(
        c.lookup(&hs)[1],
        Hit {
            block: a[1],
            ready: true,
            imported: true,
            importing: None
        }
    );
    // An import marked on an idle node takes it off the idle list.
    c.set_importing(&p, &hs[1], Some(8));
    assert_eq!(c.reclaimable(), 1);
    // Nodes being imported cannot be pinned (only their import's own pin, taken before, holds them).
    assert!(c.pin(&p, &hs[1..]).is_empty());
    assert_eq!(c.pinned_nodes(), 0);
    // remove_leaf: refuses a node with children, a pinned one and an absent one; removes a leaf
    // whatever its other state (importing, held), dropping only the tree's reference.
    assert!(!c.remove_leaf(&mut p, &hs[0]), "has a child");
    assert!(!c.remove_leaf(&mut p, &hash_of(&[9])), "absent");
    assert_eq!(c.acquire(&mut p, &hs), a);
    c.set_importing(&p, &hs[1], None);
    let pin = c.pin(&p, &hs[1..]);
    assert_eq!(c.pinned_nodes(), 1);
    assert!(!c.remove_leaf(&mut p, &hs[1]), "pinned");
    c.unpin(&p, &pin);
    c.set_importing(&p, &hs[1], Some(9));
    assert!(c.remove_leaf(&mut p, &hs[1]));
    assert!(!c.contains(&hs[1]));
    assert_eq!(c.pinned_nodes(), 0);
    assert_eq!(p.ref_count(a[1]), 1, "the holder's reference stays");
    c.release(&mut p, a[1]); // no longer cached: freed
    assert_eq!(p.ref_count(a[1]), 0);
    c.release(&mut p, a[0]);
    // The parent is a leaf now.
    assert!(c.is_reclaimable(&hs[0]));
    assert!(c.remove_leaf(&mut p, &hs[0]));
    assert_eq!(c.reclaimable(), 0);
    assert!(c.is_empty());
    assert_eq!(c.evictions(), 0, "removals are not evictions");
    assert_eq!(p.n_free(), 8);
}

/// Eviction order is the order in which nodes became idle: a lookup (or peek) is no use and does not
/// refresh a node; a sequence acquiring and releasing one does.
#[test]
fn eviction_follows_the_order_of_becoming_idle() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let mut blocks = BTreeMap::new();
    for x in [1u8, 2, 3, 4] {
        blocks.insert(x, insert_chain(&mut c, &mut p, &[x], true)[0]);
    }
    // Idle order: 3, 1, 4, 2.
    for x in [3u8, 1, 4, 2] {
        c.release(&mut p, blocks[&x]);
    }
    // Lookups and peeks in another order change nothing.
    for x in [2u8, 4, 1, 3] {
        c.lookup(&path_hashes(&[x]));
        c.peek(&path_hashes(&[x]));
    }
    let all: [&[u8]; 4] = [&[1], &[2], &[3], &[4]];
    let mut c2 = PrefixCache::new(root());
    let mut p2 = pool_of(8);
    for x in [3u8, 1, 4, 2] {
        let b = insert_chain(&mut c2, &mut p2, &[x], true);
        c2.release(&mut p2, b[0]);
    }
    // A use (acquire, release) makes 3 the newest.
    let b3 = c2.acquire(&mut p2, &path_hashes(&[3]));
    release_all(&mut c2, &mut p2, &b3);
    assert_eq!(
        eviction_order(&mut c, &mut p, &all),
        vec![vec![3], vec![1], vec![4], vec![2]]
    );
    assert_eq!(
        eviction_order(&mut c2, &mut p2, &all),
        vec![vec![1], vec![4], vec![2], vec![3]]
    );
    // Unpinning makes a node idle too, as the newest.
    let mut c3 = PrefixCache::new(root());
    let mut p3 = pool_of(8);
    for x in [1u8, 2, 3] {
        let b = insert_chain(&mut c3, &mut p3, &[x], true);
        c3.release(&mut p3, b[0]);
    }
    let pin = c3.pin(&p3, &path_hashes(&[1]));
    c3.unpin(&p3, &pin);
    let three: [&[u8]; 3] = [&[1], &[2], &[3]];
    assert_eq!(
        eviction_order(&mut c3, &mut p3, &three),
        vec![vec![2], vec![3], vec![1]]
    );
}

/// A call that leaves an idle node idle (marking a ready node ready, completing an import that was
/// not running, an unbalanced unpin) does not move it: only becoming idle does.
#[test]
fn staying_idle_keeps_the_place() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    for x in [1u8, 2, 3] {
        let b = insert_chain(&mut c, &mut p, &[x], true);
        c.release(&mut p, b[0]);
    }
    let h1 = hash_of(&[1]);
    c.mark_ready(&p, &h1);
    c.set_importing(&p, &h1, None);
    c.unpin(&p, &[h1]);
    assert!(!c.is_pinned(&h1));
    assert_eq!(c.pinned_nodes(), 0);
    assert_eq!(c.reclaimable(), 3);
    let all: [&[u8]; 3] = [&[1], &[2], &[3]];
    assert_eq!(
        eviction_order(&mut c, &mut p, &all),
        vec![vec![1], vec![2], vec![3]]
    );
}

/// A sequence releasing its path last to first makes its leaf the oldest, so one eviction call takes
/// the leaf and then its ancestors, and nodes that became idle in between keep their turn.
#[test]
fn release_last_to_first_makes_the_leaf_oldest() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let abc = insert_chain(&mut c, &mut p, &[1, 2, 3], true);
    let x = insert_chain(&mut c, &mut p, &[9], true);
    let y = insert_chain(&mut c, &mut p, &[8], true);
    // Idle order: X, C, B, A, Y.
    c.release(&mut p, x[0]);
    release_all(&mut c, &mut p, &abc);
    c.release(&mut p, y[0]);
    assert_eq!(c.evict(&mut p, 1), 1);
    assert!(!c.contains(&hash_of(&[9])), "X became idle first");
    assert_eq!(c.evict(&mut p, 2), 2);
    assert!(!c.contains(&hash_of(&[1, 2, 3])) && !c.contains(&hash_of(&[1, 2])));
    assert!(c.contains(&hash_of(&[1])) && c.contains(&hash_of(&[8])));
    assert_eq!(c.evict(&mut p, 1), 1);
    assert!(!c.contains(&hash_of(&[1])), "A before Y");
    assert_eq!(c.len(), 1);
}

/// An idle node that still has children waits until its last child goes, then joins the list at the
/// time it became idle: leaves always go before their ancestors, even when the ancestors became idle
/// first, and in the order they became idle otherwise.
#[test]
fn eviction_passes_over_idle_nodes_with_children() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let ab = insert_chain(&mut c, &mut p, &[1, 2], true);
    let y = insert_chain(&mut c, &mut p, &[8], true);
    let z = insert_chain(&mut c, &mut p, &[7], true);
    // Idle order: A (parent of B), Y, B, Z (the path released first to last).
    c.release(&mut p, ab[0]);
    c.release(&mut p, y[0]);
    c.release(&mut p, ab[1]);
    c.release(&mut p, z[0]);
    assert_eq!(c.reclaimable(), 4);
    // A waits for its child; Y is the oldest leaf.
    assert_eq!(c.evict(&mut p, 1), 1);
    assert!(!c.contains(&hash_of(&[8])));
    assert!(c.contains(&hash_of(&[1])));
    let rest: [&[u8]; 3] = [&[1], &[1, 2], &[7]];
    // Once B goes, A (idle before Z) goes before Z.
    assert_eq!(
        eviction_order(&mut c, &mut p, &rest),
        vec![vec![1, 2], vec![1], vec![7]]
    );
    assert!(c.is_empty());
    assert_eq!(p.n_free(), 8);
}

/// Unpinning goes last to first, so a pinned chain's leaf becomes idle before its ancestors: here A
/// (unpinned last) goes after B but before X, which became idle after the unpin.
#[test]
fn unpin_goes_last_to_first() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let hs = path_hashes(&[1, 2]);
    let ab = insert_chain(&mut c, &mut p, &[1, 2], true);
    let x = insert_chain(&mut c, &mut p, &[9], true);
    let pin = c.pin(&p, &hs);
    release_all(&mut c, &mut p, &ab);
    assert_eq!(c.reclaimable(), 0);
    c.unpin(&p, &pin);
    c.release(&mut p, x[0]);
    assert_eq!(c.reclaimable(), 3);
    let all: [&[u8]; 3] = [&[1], &[1, 2], &[9]];
    // (First to last would give the same order: A, idle first, still waits for its child B.)
    assert_eq!(
        eviction_order(&mut c, &mut p, &all),
        vec![vec![1, 2], vec![1], vec![9]]
    );
}

/// `reclaimable()` counts the idle nodes; that is what eviction can free when every node below an
/// idle node is idle (the engine's discipline). A pin on a child alone breaks that: the parent is
/// idle but kept by its child, and the eviction stops rather than take it.
#[test]
fn reclaimable_counts_idle_nodes_under_the_precondition() {
    let mut p = pool_of(4);
    let mut c = PrefixCache::new(root());
    let hs = path_hashes(&[1, 2]);
    let bl = insert_chain(&mut c, &mut p, &[1, 2], true);
    release_all(&mut c, &mut p, &bl);
    let pin = c.pin(&p, &hs[1..]); // the child only
    assert_eq!(c.reclaimable(), 1);
    assert!(c.is_reclaimable(&hs[0]));
    assert_eq!(c.evict(&mut p, usize::MAX), 0);
    assert!(c.contains(&hs[0]) && c.contains(&hs[1]));
    c.unpin(&p, &pin);
    assert_eq!(c.reclaimable(), 2);
    assert_eq!(c.evict(&mut p, usize::MAX), 2);
    assert_eq!(p.n_free(), 4);
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
    let pin_a = c.pin(&p, &hs);
    assert!(pin_a.is_empty(), "A pins before anything is cached");
    let bl = insert_chain(&mut c, &mut p, &[1, 2], true);
    release_all(&mut c, &mut p, &bl);
    assert_eq!(c.pin(&p, &hs).len(), 2, "B pins");
    c.unpin(&p, &pin_a); // A undoes its pin
    assert!(
        c.is_pinned(&hs[0]) && c.is_pinned(&hs[1]),
        "B's pins were taken"
    );
    assert_eq!(c.pinned_nodes(), 2);
    assert_eq!(c.reclaimable(), 0);
    assert_eq!(c.evict(&mut p, usize::MAX), 0);
}

/// At scale the idle count stays exact and eviction is a pop from the old end of the list: 100,000
/// idle nodes in chains released last to first, half of them evicted in one call (which would take
/// minutes if each eviction walked the tree).
#[test]
fn reclaimable_stays_exact_at_scale() {
    const CHAINS: usize = 10_000;
    const DEPTH: usize = 10;
    let l = KvLayout {
        n_layer: 1,
        n_head_kv: 1,
        head_dim: 1,
        block_tokens: 8,
        dtype: KvDtype::F16,
    };
    let n = CHAINS * DEPTH;
    let mut p = BlockPool::new(l, n * l.block_bytes()).unwrap();
    let mut c = PrefixCache::new(root());
    let chain = |i: usize| -> Vec<BlockHash> {
        let mut h = root();
        (0..DEPTH)
            .map(|d| {
                h = h.chain(&[i as u32, d as u32], None);
                h
            })
            .collect()
    };
    let chains: Vec<Vec<BlockHash>> = (0..CHAINS).map(chain).collect();
    for hs in &chains {
        let mut blocks = Vec::with_capacity(DEPTH);
        for (d, h) in hs.iter().enumerate() {
            let b = p.alloc().expect("sized to fit");
            assert!(c.insert(&mut p, *h, d.checked_sub(1).map(|j| hs[j]), b, true));
            blocks.push(b);
        }
        release_all(&mut c, &mut p, &blocks);
    }
    assert_eq!(p.n_free(), 0);
    assert_eq!(c.len(), n);
    assert_eq!(c.reclaimable(), n);
    // Sequences take every 100th chain again: off the idle list.
    let mut held = Vec::new();
    for hs in chains.iter().step_by(100) {
        held.push(c.acquire(&mut p, hs));
    }
    let held_nodes = held.len() * DEPTH;
    assert_eq!(c.reclaimable(), n - held_nodes);
    for blocks in &held {
        release_all(&mut c, &mut p, blocks);
    }
    assert_eq!(c.reclaimable(), n);
    // The held chains are the newest now; the oldest 50,000 idle nodes are the first 5,000 chains
    // that were not held (leaves first within each, so no node is ever passed over).
    let half = n / 2;
    assert_eq!(c.evict(&mut p, half), half);
    assert_eq!(c.evictions(), half as u64);
    assert_eq!(c.reclaimable(), n - half);
    assert_eq!(c.len(), n - half);
    assert_eq!(p.n_free(), half);
    let gone_chains: Vec<usize> = (0..CHAINS)
        .filter(|i| i % 100 != 0)
        .take(half / DEPTH)
        .collect();
    let gone: BTreeSet<usize> = gone_chains.iter().copied().collect();
    for (i, hs) in chains.iter().enumerate() {
        for h in hs {
            assert_eq!(c.contains(h), !gone.contains(&i), "chain {i}");
        }
    }
    // The rest goes in one call too.
    assert_eq!(c.evict(&mut p, usize::MAX), n - half);
    assert_eq!(c.reclaimable(), 0);
    assert!(c.is_empty());
    assert_eq!(p.n_free(), n);
}

// Model-based property test of the cache. Nodes are paths of choices (one block each); the test keeps
// its own tree, pool references, pins, import marks and, for each idle node, when it became idle (or
// was last passed over by an eviction): eviction must take the oldest idle node without children.

#[derive(Clone, Debug)]
struct MNode {
    block: BlockId,
    ready: bool,
    pins: u32,
    imported: bool,
    importing: Option<u64>,
    /// While the node is idle: the time it became idle, or the last time an eviction passed it over.
    idle_since: Option<u64>,
}

#[derive(Clone, Debug)]
struct Seq {
    /// Blocks held (one reference each), whole chain from the root.
    blocks: Vec<BlockId>,
    /// (path, block) of the nodes this sequence inserted as pending.
    pending: Vec<(Vec<u8>, BlockId)>,
}

/// A pin handle: what `pin` returned, and the model's paths for it.
#[derive(Clone, Debug)]
struct PinHandle {
    paths: Vec<Vec<u8>>,
    hashes: Vec<BlockHash>,
}

/// An import in the engine's manner: the present prefix pinned, new nodes inserted ready, pinned and
/// marked as importing until it finishes.
#[derive(Clone, Debug)]
struct Import {
    pin: PinHandle,
    /// The nodes it inserted, first to last.
    targets: Vec<Vec<u8>>,
    finished: bool,
}

struct World {
    pool: BlockPool,
    cache: PrefixCache,
    nodes: BTreeMap<Vec<u8>, MNode>,
    /// Outside references to blocks (besides the tree's one per node).
    holds: Vec<BlockId>,
    seqs: Vec<Seq>,
    /// Outstanding pins.
    pinned: Vec<PinHandle>,
    imports: Vec<Import>,
    next_import: u64,
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
            imports: Vec::new(),
            next_import: 0,
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

    fn has_children(nodes: &BTreeMap<Vec<u8>, MNode>, path: &[u8]) -> bool {
        nodes
            .keys()
            .any(|k| k.len() == path.len() + 1 && k.starts_with(path))
    }

    fn path_of_block(&self, b: BlockId) -> Option<Vec<u8>> {
        self.nodes
            .iter()
            .find(|(_, n)| n.block == b)
            .map(|(k, _)| k.clone())
    }

    /// Idle by its state: ready, unpinned, not importing and referenced by the tree alone.
    fn idle_state(&self, n: &MNode) -> bool {
        n.ready && n.pins == 0 && n.importing.is_none() && self.outside_refs(n.block) == 0
    }

    /// Brings the node's idle mark in line with its state after one change to it: a node that just
    /// became idle is the newest idle node.
    fn settle(&mut self, path: &[u8]) {
        let Some(n) = self.nodes.get(path) else {
            return;
        };
        let idle = self.idle_state(n);
        let was = n.idle_since.is_some();
        if idle && !was {
            self.clock += 1;
            self.nodes.get_mut(path).unwrap().idle_since = Some(self.clock);
        } else if !idle {
            self.nodes.get_mut(path).unwrap().idle_since = None;
        }
    }

    fn idle_count(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| n.idle_since.is_some())
            .count()
    }

    /// The oldest idle node without children: what the next single eviction must take.
    fn oldest_idle_leaf(&self) -> Option<Vec<u8>> {
        self.nodes
            .iter()
            .filter(|(k, _)| !Self::has_children(&self.nodes, k))
            .filter_map(|(k, n)| n.idle_since.map(|s| (s, k)))
            .min()
            .map(|(_, k)| k.clone())
    }

    /// Nodes a full eviction can free: the whole subtree is idle.
    fn fully_evictable(&self) -> usize {
        self.nodes
            .keys()
            .filter(|k| {
                self.nodes
                    .iter()
                    .filter(|(d, _)| d.starts_with(k))
                    .all(|(_, n)| n.idle_since.is_some())
            })
            .count()
    }

    /// Every node below an idle node is idle (a sequence holds its whole path, pins cover whole
    /// prefixes, pending and importing nodes only under held or pinned ancestors).
    fn precondition_holds(&self) -> bool {
        self.nodes.iter().all(|(k, n)| {
            n.idle_since.is_some() || (1..k.len()).all(|d| self.nodes[&k[..d]].idle_since.is_none())
        })
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.cache.len(), self.nodes.len());
        prop_assert_eq!(self.cache.is_empty(), self.nodes.is_empty());
        let mut expected_refs: HashMap<BlockId, usize> = HashMap::new();
        for (k, n) in &self.nodes {
            let h = hash_of(k);
            prop_assert!(self.cache.contains(&h), "node {:?} missing", k);
            prop_assert_eq!(self.cache.block_of(&h), Some(n.block));
            prop_assert_eq!(self.cache.is_pinned(&h), n.pins > 0);
            prop_assert_eq!(
                n.idle_since.is_some(),
                self.idle_state(n),
                "test bug: the model missed a transition of {:?}",
                k
            );
            prop_assert_eq!(
                self.cache.is_reclaimable(&h),
                n.idle_since.is_some(),
                "is_reclaimable of {:?}",
                k
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
        prop_assert_eq!(
            self.cache.pinned_nodes(),
            self.nodes.values().filter(|n| n.pins > 0).count()
        );
        // The counter is the idle count; under the precondition it is what a full eviction frees,
        // otherwise it may overstate that.
        let reclaimable = self.cache.reclaimable();
        prop_assert_eq!(
            reclaimable,
            self.idle_count(),
            "reclaimable() vs idle nodes"
        );
        let fully = self.fully_evictable();
        prop_assert!(reclaimable >= fully);
        if self.precondition_holds() {
            prop_assert_eq!(reclaimable, fully, "reclaimable() vs a full eviction");
        }
        if self.engine_like {
            prop_assert!(
                self.precondition_holds(),
                "engine-like ops broke the precondition"
            );
        }
        Ok(())
    }

    /// What `evict(want)` must do: take the idle leaf that became idle first (a parent becomes a leaf
    /// when its last child goes, keeping its own time); stop after `want` evictions or when no idle
    /// leaf is left. Returns the model after it and the evicted paths in order.
    fn predict_evict(&self, want: usize) -> (BTreeMap<Vec<u8>, MNode>, u64, Vec<Vec<u8>>) {
        let mut nodes = self.nodes.clone();
        let clock = self.clock;
        let mut gone = Vec::new();
        while gone.len() < want {
            let leaf = nodes
                .iter()
                .filter(|(k, n)| n.idle_since.is_some() && !Self::has_children(&nodes, k))
                .min_by_key(|(_, n)| n.idle_since)
                .map(|(k, _)| k.clone());
            let Some(k) = leaf else { break };
            nodes.remove(&k);
            gone.push(k);
        }
        (nodes, clock, gone)
    }

    /// Evicts and checks the result against the model. Returns how many were freed.
    fn evict(&mut self, want: usize) -> Result<usize, TestCaseError> {
        let free_before = self.pool.n_free();
        let evictions_before = self.cache.evictions();
        let fully = self.fully_evictable();
        let precondition = self.precondition_holds();
        let idle_before = self.idle_count();
        let oldest_leaf = self.oldest_idle_leaf();
        let (after, clock, predicted) = self.predict_evict(want);
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
            prop_assert!(n.importing.is_none(), "evicted importing node {:?}", k);
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
        // The first eviction of a call is always the oldest idle leaf.
        match &oldest_leaf {
            Some(k) if want > 0 => {
                prop_assert!(gone.contains(k), "the oldest idle leaf {:?} stayed", k);
                if want == 1 {
                    prop_assert_eq!(gone.len(), 1);
                }
            }
            _ => prop_assert_eq!(freed, 0, "evicted without an idle leaf"),
        }
        let predicted_set: BTreeSet<Vec<u8>> = predicted.iter().cloned().collect();
        prop_assert_eq!(
            &gone,
            &predicted_set,
            "evicted vs the model (in order {:?})",
            predicted
        );
        self.nodes = after;
        self.clock = clock;
        if freed < want {
            prop_assert!(
                self.oldest_idle_leaf().is_none(),
                "stopped with an idle leaf left"
            );
            prop_assert_eq!(
                freed,
                fully,
                "a full eviction frees exactly the idle subtrees"
            );
            if precondition {
                prop_assert_eq!(freed, idle_before, "reclaimable() vs a full eviction");
                prop_assert_eq!(self.cache.reclaimable(), 0);
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

    /// Drops one outside reference to `b` through the cache (the caller already removed it from its
    /// list).
    fn release(&mut self, b: BlockId) {
        self.cache.release(&mut self.pool, b);
        if let Some(p) = self.path_of_block(b) {
            self.settle(&p);
        }
    }

    /// Releases a sequence's blocks one at a time (it is no longer in `seqs`), last to first unless
    /// told otherwise.
    fn release_blocks(&mut self, mut blocks: Vec<BlockId>, last_to_first: bool) {
        if !last_to_first {
            blocks.reverse();
        }
        // Keep the rest counted as held while releasing one by one.
        let base = self.holds.len();
        self.holds.extend_from_slice(&blocks);
        while self.holds.len() > base {
            let b = self.holds.pop().unwrap();
            self.release(b);
        }
    }

    /// Acquires the present prefix of `path` through the cache and checks the blocks; the caller
    /// stores them and then calls `settle_blocks`.
    fn acquire(
        &mut self,
        hs: &[BlockHash],
        paths: &[Vec<u8>],
    ) -> Result<Vec<BlockId>, TestCaseError> {
        let got = self.cache.acquire(&mut self.pool, hs);
        let want: Vec<BlockId> = paths
            .iter()
            .map_while(|p| self.nodes.get(p))
            .map(|n| n.block)
            .collect();
        prop_assert_eq!(&got, &want, "acquire of {:?}", paths);
        Ok(got)
    }

    fn settle_blocks(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            if let Some(p) = self.path_of_block(b) {
                self.settle(&p);
            }
        }
    }

    /// Looks `path` up (or peeks) and checks the hits and the per-prefix counts; nothing changes.
    fn lookup(&mut self, path: &[u8], peek: bool) -> Result<Vec<Hit>, TestCaseError> {
        let hs = path_hashes(path);
        let got = if peek {
            self.cache.peek(&hs)
        } else {
            self.cache.lookup(&hs)
        };
        let mut want = Vec::new();
        let mut idle = 0;
        let mut unpinned = 0;
        for d in 1..=path.len() {
            match self.nodes.get(&path[..d]) {
                Some(n) => {
                    want.push(Hit {
                        block: n.block,
                        ready: n.ready,
                        imported: n.imported,
                        importing: n.importing,
                    });
                    idle += usize::from(n.idle_since.is_some());
                    unpinned += usize::from(n.pins == 0);
                }
                None => break,
            }
        }
        prop_assert_eq!(&got, &want, "lookup/peek of {:?}", path);
        prop_assert_eq!(self.cache.present(&hs), want.len());
        prop_assert_eq!(self.cache.idle_among(&hs), idle);
        prop_assert_eq!(self.cache.unpinned_among(&hs), unpinned);
        Ok(got)
    }

    fn insert(&mut self, path: &[u8], block: BlockId, ready: bool) -> Result<bool, TestCaseError> {
        let parent = (path.len() > 1).then(|| hash_of(&path[..path.len() - 1]));
        let ok = self
            .cache
            .insert(&mut self.pool, hash_of(path), parent, block, ready);
        let expect = !self.nodes.contains_key(path)
            && (path.len() == 1 || self.nodes.contains_key(&path[..path.len() - 1]))
            && self.path_of_block(block).is_none();
        prop_assert_eq!(ok, expect, "insert of {:?}", path);
        if ok {
            self.nodes.insert(
                path.to_vec(),
                MNode {
                    block,
                    ready,
                    pins: 0,
                    imported: false,
                    importing: None,
                    idle_since: None,
                },
            );
            self.settle(path);
        }
        Ok(ok)
    }

    /// Pins the present, computed (ready, not importing) nodes of `paths` and returns the handle.
    fn pin(&mut self, paths: &[Vec<u8>]) -> Result<PinHandle, TestCaseError> {
        let hs: Vec<BlockHash> = paths.iter().map(|p| hash_of(p)).collect();
        let got = self.cache.pin(&self.pool, &hs);
        let present: Vec<Vec<u8>> = paths
            .iter()
            .filter(|p| {
                self.nodes
                    .get(*p)
                    .is_some_and(|n| n.ready && n.importing.is_none())
            })
            .cloned()
            .collect();
        let want: Vec<BlockHash> = present.iter().map(|p| hash_of(p)).collect();
        prop_assert_eq!(&got, &want, "pin returns what it pinned");
        for p in &present {
            self.nodes.get_mut(p).unwrap().pins += 1;
            self.settle(p);
        }
        Ok(PinHandle {
            paths: present,
            hashes: got,
        })
    }

    /// Undoes one pin of each present node of `paths` (whatever pinned it), last to first.
    fn unpin(&mut self, pin: &PinHandle) {
        self.cache.unpin(&self.pool, &pin.hashes);
        for p in pin.paths.iter().rev() {
            if let Some(n) = self.nodes.get_mut(p) {
                n.pins = n.pins.saturating_sub(1);
                self.settle(p);
            }
        }
    }

    fn mark_ready(&mut self, path: &[u8]) {
        self.cache.mark_ready(&self.pool, &hash_of(path));
        if let Some(n) = self.nodes.get_mut(path) {
            n.ready = true;
            self.settle(path);
        }
    }

    fn set_importing(&mut self, path: &[u8], import: Option<u64>) {
        self.cache.set_importing(&self.pool, &hash_of(path), import);
        if let Some(n) = self.nodes.get_mut(path) {
            n.imported = true;
            n.importing = import;
            self.settle(path);
        }
    }

    fn remove_pending(&mut self, path: &[u8], block: BlockId) -> Result<bool, TestCaseError> {
        let ok = self
            .cache
            .remove_pending(&mut self.pool, &hash_of(path), block);
        let expect = self
            .nodes
            .get(path)
            .is_some_and(|n| !n.ready && n.block == block && n.pins == 0)
            && self.children(path).next().is_none();
        prop_assert_eq!(ok, expect, "remove_pending of {:?}", path);
        if ok {
            self.nodes.remove(path);
        }
        Ok(ok)
    }

    fn remove_leaf(&mut self, path: &[u8]) -> Result<bool, TestCaseError> {
        let ok = self.cache.remove_leaf(&mut self.pool, &hash_of(path));
        let expect = self.nodes.get(path).is_some_and(|n| n.pins == 0)
            && self.children(path).next().is_none();
        prop_assert_eq!(ok, expect, "remove_leaf of {:?}", path);
        if ok {
            self.nodes.remove(path);
        }
        Ok(ok)
    }

    /// Releases a sequence as the engine does: its pending nodes first (deepest first), then its
    /// blocks.
    fn drop_seq(&mut self, s: Seq, last_to_first: bool) -> Result<(), TestCaseError> {
        for (p, b) in s.pending.iter().rev() {
            prop_assert!(self.remove_pending(p, *b)?, "own pending node not removed");
        }
        self.release_blocks(s.blocks, last_to_first);
        Ok(())
    }

    /// Ends an import as the engine does: unpin; an unfinished one also removes its nodes, deepest
    /// first.
    fn drop_import(&mut self, imp: Import) -> Result<(), TestCaseError> {
        self.unpin(&imp.pin);
        if !imp.finished {
            for p in imp.targets.iter().rev() {
                prop_assert!(self.remove_leaf(p)?, "abandoned import node not removed");
            }
        }
        Ok(())
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
    /// Inserts under `path` the block of an existing node (refused).
    InsertUsed {
        path: Vec<u8>,
        of: usize,
    },
    Lookup(Vec<u8>),
    Peek(Vec<u8>),
    PinOne(Target),
    UnpinOne(Target),
    HoldOne(Target),
    DropHold(usize),
    MarkReady(Target),
    SetImporting(Target, Option<u64>),
    RemovePending {
        path: Target,
        right_block: bool,
    },
    RemoveLeaf(Target),
    Evict(usize),
    // Engine-like ops.
    Admit {
        path: Vec<u8>,
        pending_from: usize,
    },
    Finish {
        i: usize,
        last_to_first: bool,
    },
    Cancel(usize),
    PinPrefix(Vec<u8>),
    /// Undoes an earlier PinPrefix (the i-th outstanding one).
    UnpinPrefix(usize),
    ImportBegin(Vec<u8>),
    ImportFinish(usize),
    ImportRelease(usize),
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0u8..3, 1..5)
}

/// The node an arbitrary op acts on: any path (often absent), or the i-th node present.
#[derive(Clone, Debug)]
enum Target {
    Path(Vec<u8>),
    Node(usize),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        1 => path().prop_map(Target::Path),
        2 => any::<usize>().prop_map(Target::Node),
    ]
}

impl World {
    fn resolve(&self, t: Target) -> Vec<u8> {
        match t {
            Target::Path(p) => p,
            Target::Node(_) if self.nodes.is_empty() => vec![0],
            Target::Node(i) => self.nodes.keys().nth(i % self.nodes.len()).unwrap().clone(),
        }
    }
}

fn evict_want() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(1usize), 1 => 2usize..5, 1 => Just(usize::MAX)]
}

fn arbitrary_op() -> impl Strategy<Value = CacheOp> {
    prop_oneof![
        6 => (path(), prop::bool::weighted(0.8), any::<bool>())
            .prop_map(|(path, ready, hold)| CacheOp::Insert { path, ready, hold }),
        1 => (path(), any::<usize>()).prop_map(|(path, of)| CacheOp::InsertUsed { path, of }),
        3 => path().prop_map(CacheOp::Lookup),
        1 => path().prop_map(CacheOp::Peek),
        1 => target().prop_map(CacheOp::PinOne),
        1 => target().prop_map(CacheOp::UnpinOne),
        2 => target().prop_map(CacheOp::HoldOne),
        2 => any::<usize>().prop_map(CacheOp::DropHold),
        1 => target().prop_map(CacheOp::MarkReady),
        1 => (target(), prop::option::of(0u64..3)).prop_map(|(p, i)| CacheOp::SetImporting(p, i)),
        1 => (target(), prop::bool::weighted(0.8))
            .prop_map(|(path, right_block)| CacheOp::RemovePending { path, right_block }),
        1 => target().prop_map(CacheOp::RemoveLeaf),
        3 => evict_want().prop_map(CacheOp::Evict),
    ]
}

fn engine_op() -> impl Strategy<Value = CacheOp> {
    prop_oneof![
        5 => (path(), 0usize..6).prop_map(|(path, pending_from)| CacheOp::Admit { path, pending_from }),
        3 => (any::<usize>(), prop::bool::weighted(0.75))
            .prop_map(|(i, last_to_first)| CacheOp::Finish { i, last_to_first }),
        2 => any::<usize>().prop_map(CacheOp::Cancel),
        2 => path().prop_map(CacheOp::Lookup),
        1 => path().prop_map(CacheOp::Peek),
        1 => path().prop_map(CacheOp::PinPrefix),
        1 => any::<usize>().prop_map(CacheOp::UnpinPrefix),
        1 => path().prop_map(CacheOp::ImportBegin),
        1 => any::<usize>().prop_map(CacheOp::ImportFinish),
        1 => any::<usize>().prop_map(CacheOp::ImportRelease),
        2 => evict_want().prop_map(CacheOp::Evict),
    ]
}

fn run_world(w: &mut World, ops: Vec<CacheOp>) -> Result<(), TestCaseError> {
    for op in ops {
        match op {
            CacheOp::Insert { path, ready, hold } => {
                let Some(b) = w.alloc()? else { continue };
                // The allocation's reference counts as held while inserting.
                w.holds.push(b);
                w.insert(&path, b, ready)?;
                if !hold {
                    w.holds.pop();
                    w.release(b);
                }
            }
            CacheOp::InsertUsed { path, of } => {
                if !w.nodes.is_empty() {
                    let b = w.nodes.values().nth(of % w.nodes.len()).unwrap().block;
                    prop_assert!(!w.insert(&path, b, true)?, "insert of a used block");
                }
            }
            CacheOp::Lookup(p) => {
                w.lookup(&p, false)?;
            }
            CacheOp::Peek(p) => {
                w.lookup(&p, true)?;
            }
            CacheOp::PinOne(p) => {
                let p = w.resolve(p);
                w.pin(&[p])?;
            }
            CacheOp::UnpinOne(p) => {
                let p = w.resolve(p);
                // Not necessarily balanced: takes whatever pin the node has.
                w.unpin(&PinHandle {
                    hashes: vec![hash_of(&p)],
                    paths: vec![p],
                });
            }
            CacheOp::HoldOne(p) => {
                let p = w.resolve(p);
                let got = w.acquire(&[hash_of(&p)], &[p])?;
                w.holds.extend_from_slice(&got);
                w.settle_blocks(&got);
            }
            CacheOp::DropHold(i) => {
                if !w.holds.is_empty() {
                    let b = w.holds.swap_remove(i % w.holds.len());
                    w.release(b);
                }
            }
            CacheOp::MarkReady(p) => {
                let p = w.resolve(p);
                w.mark_ready(&p);
            }
            CacheOp::SetImporting(p, i) => {
                let p = w.resolve(p);
                w.set_importing(&p, i);
            }
            CacheOp::RemovePending { path, right_block } => {
                let path = w.resolve(path);
                let b = match w.nodes.get(&path) {
                    Some(n) if right_block => n.block,
                    Some(n) => (n.block + 1) % w.pool.n_blocks() as BlockId,
                    None => 0,
                };
                w.remove_pending(&path, b)?;
            }
            CacheOp::RemoveLeaf(p) => {
                let p = w.resolve(p);
                w.remove_leaf(&p)?;
            }
            CacheOp::Evict(want) => {
                w.evict(want)?;
            }
            CacheOp::Admit { path, pending_from } => {
                // As the engine: wait (skip) while a cached prefix block is pending or importing.
                let hits = w.lookup(&path, true)?;
                if hits.iter().any(|h| !h.ready || h.importing.is_some()) {
                    continue;
                }
                let hs = path_hashes(&path);
                let got = w.acquire(&hs, &prefixes(&path))?;
                prop_assert_eq!(got.len(), hits.len());
                // The sequence's blocks count as held from here on (the model sees them).
                w.seqs.push(Seq {
                    blocks: got.clone(),
                    pending: Vec::new(),
                });
                w.settle_blocks(&got);
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
            CacheOp::Finish { i, last_to_first } => {
                if !w.seqs.is_empty() {
                    let k = i % w.seqs.len();
                    // Computed while still held: mark ready first to last, then release.
                    for (p, _) in w.seqs[k].pending.clone() {
                        w.mark_ready(&p);
                    }
                    let s = w.seqs.swap_remove(k);
                    w.release_blocks(s.blocks, last_to_first);
                }
            }
            CacheOp::Cancel(i) => {
                if !w.seqs.is_empty() {
                    let s = w.seqs.swap_remove(i % w.seqs.len());
                    w.drop_seq(s, true)?;
                }
            }
            CacheOp::PinPrefix(p) => {
                // As the engine's pin_prefix, but only up to the first pending or importing node: a
                // pin on a node that is then removed (remove_pending / remove_leaf) is silently
                // dropped, and its stale handle would later unpin a re-inserted node.
                let ps = prefixes(&p);
                let hits = w.lookup(&p, true)?;
                let n = hits
                    .iter()
                    .take_while(|h| h.ready && h.importing.is_none())
                    .count();
                let pin = w.pin(&ps[..n])?;
                prop_assert_eq!(pin.paths.len(), n);
                w.pinned.push(pin);
            }
            CacheOp::UnpinPrefix(i) => {
                if !w.pinned.is_empty() {
                    let pin = w.pinned.swap_remove(i % w.pinned.len());
                    w.unpin(&pin);
                }
            }
            CacheOp::ImportBegin(p) => {
                let hits = w.lookup(&p, true)?;
                if hits.iter().any(|h| !h.ready || h.importing.is_some()) {
                    continue;
                }
                let ps = prefixes(&p);
                // Pin the present part first so allocation cannot evict it.
                let mut pin = w.pin(&ps[..hits.len()])?;
                let id = w.next_import;
                w.next_import += 1;
                let mut targets = Vec::new();
                for q in &ps[hits.len()..] {
                    let Some(b) = w.alloc()? else { break };
                    w.holds.push(b);
                    prop_assert!(w.insert(q, b, true)?, "import insert refused");
                    let one = w.pin(std::slice::from_ref(q))?;
                    pin.paths.extend(one.paths);
                    pin.hashes.extend(one.hashes);
                    w.set_importing(q, Some(id));
                    // The tree holds the block now; drop the allocation's reference.
                    w.holds.pop();
                    w.release(b);
                    targets.push(q.clone());
                }
                w.imports.push(Import {
                    pin,
                    targets,
                    finished: false,
                });
            }
            CacheOp::ImportFinish(i) => {
                if !w.imports.is_empty() {
                    let k = i % w.imports.len();
                    if !w.imports[k].finished {
                        for q in w.imports[k].targets.clone() {
                            w.set_importing(&q, None);
                        }
                        w.imports[k].finished = true;
                    }
                }
            }
            CacheOp::ImportRelease(i) => {
                if !w.imports.is_empty() {
                    let imp = w.imports.swap_remove(i % w.imports.len());
                    w.drop_import(imp)?;
                }
            }
        }
        w.check()?;
    }
    // Release everything outside the tree; then a full eviction empties the tree except what stays
    // pinned or importing (in the engine-like world: everything).
    let holds = std::mem::take(&mut w.holds);
    w.release_blocks(holds, true);
    for s in std::mem::take(&mut w.seqs) {
        w.drop_seq(s, true)?;
    }
    for imp in std::mem::take(&mut w.imports) {
        w.drop_import(imp)?;
    }
    if w.engine_like {
        for pin in std::mem::take(&mut w.pinned) {
            w.unpin(&pin);
        }
    }
    w.check()?;
    w.evict(usize::MAX)?;
    w.check()?;
    prop_assert_eq!(w.fully_evictable(), 0);
    if w.engine_like {
        prop_assert!(w.cache.is_empty(), "{} nodes left", w.cache.len());
        prop_assert_eq!(w.cache.reclaimable(), 0);
        prop_assert_eq!(w.pool.n_free(), w.pool.n_blocks());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary operations (pins on single nodes, outside references to single blocks, imports and
    /// removals anywhere): the idle list matches the model, eviction never frees a pinned, pending,
    /// importing or outside-referenced block, frees leaves before their parents, takes the oldest
    /// idle leaf first, and its count matches the pool.
    #[test]
    fn cache_arbitrary_ops(
        n_blocks in 3usize..16,
        ops in prop::collection::vec(arbitrary_op(), 0..120),
    ) {
        let mut w = World::new(n_blocks, false);
        run_world(&mut w, ops)?;
    }

    /// Engine-like use (sequences hold whole chains, pending suffixes, prefix pins, imports):
    /// additionally, every node below an idle node is idle, so `reclaimable()` always equals what a
    /// full eviction frees.
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

/// Pending nodes cannot be pinned, so removing one never drops a pin that a later pin of the same
/// hash would then lose (the pin of A stays A's, and unpinning it touches nothing else).
#[test]
fn pins_never_land_on_pending_nodes() {
    let mut p = pool_of(8);
    let mut c = PrefixCache::new(root());
    let hs = path_hashes(&[1, 2]);
    let a = insert_chain(&mut c, &mut p, &[1], true);
    let b = p.alloc().unwrap();
    assert!(c.insert(&mut p, hs[1], Some(hs[0]), b, false));
    let h1 = c.pin(&p, &hs);
    assert_eq!(h1, vec![hs[0]], "the pending child is not pinned");
    assert!(c.remove_pending(&mut p, &hs[1], b));
    assert!(c.insert(&mut p, hs[1], Some(hs[0]), b, false));
    c.mark_ready(&p, &hs[1]);
    let h2 = c.pin(&p, &hs);
    assert_eq!(h2, hs);
    c.unpin(&p, &h1);
    c.release(&mut p, b);
    c.release(&mut p, a[0]);
    assert!(c.is_pinned(&hs[1]) && c.is_pinned(&hs[0]));
    assert_eq!(c.evict(&mut p, usize::MAX), 0, "h2 still pins both");
    c.unpin(&p, &h2);
    assert_eq!(c.evict(&mut p, usize::MAX), 2);
}

/// A long chain whose ancestors became idle first (released first to last) is evicted leaf first in
/// one pass: every eviction takes the list's head, nothing is passed over again and again.
#[test]
fn a_chain_released_first_to_last_evicts_leaf_first() {
    let n = 20_000usize;
    let mut p = pool_of(n);
    let mut c = PrefixCache::new(root());
    let mut prev = root();
    let mut hashes = Vec::with_capacity(n);
    let mut blocks = Vec::with_capacity(n);
    for i in 0..n {
        let h = prev.chain(&[i as u32], None);
        let b = p.alloc().unwrap();
        let parent = (i > 0).then_some(prev);
        assert!(c.insert(&mut p, h, parent, b, true));
        hashes.push(h);
        blocks.push(b);
        prev = h;
    }
    for &b in &blocks {
        c.release(&mut p, b);
    }
    assert_eq!(c.reclaimable(), n);
    assert_eq!(c.evict(&mut p, 1), 1);
    assert!(!c.contains(&hashes[n - 1]), "the leaf goes first");
    assert_eq!(c.evict(&mut p, usize::MAX), n - 1);
    assert!(c.is_empty());
    assert_eq!(p.n_free(), n);
}
