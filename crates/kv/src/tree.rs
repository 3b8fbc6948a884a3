//! The prefix tree: full KV blocks keyed by a chained hash, shared between sequences, evicted LRU.
//!
//! Block `i` of a sequence is identified by `hash_i = H(hash_{i-1}, tokens of block i, salt)`, with
//! `hash_{-1}` the root: a hash of the model's identity and the KV layout ([`crate::identity::cache_root`]). Equal hashes mean equal
//! token prefixes under the same model, layout and salt, so the block's KV can be shared. The hash is
//! SHA-256 over a fixed byte encoding (little-endian, versioned), truncated to 128 bits: deterministic
//! across processes and machines, unlike a process-seeded hasher.
//!
//! The tree holds one pool reference per node. A node is evictable when nothing else references its
//! block, it has no children and it is not pinned; eviction takes the least recently used such leaf.
//! A salt (one per tenant) makes private blocks unmatchable across tenants: the same tokens under
//! different salts hash differently, and the chain carries the salt to every block after it.

use std::collections::HashMap;
use std::fmt;

use sha2::{Digest, Sha256};

use crate::pool::{BlockId, BlockPool};

/// A block's chained hash (or the root's).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 16]);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", self.to_hex())
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

const DOMAIN: &[u8] = b"edgeprompt/kv-block/v1";

impl BlockHash {
    /// The root of every chain: the model's fingerprint (which must cover everything that changes the
    /// KV: weights, architecture, KV dtype, block size).
    pub fn root(fingerprint: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(b"/root");
        h.update((fingerprint.len() as u64).to_le_bytes());
        h.update(fingerprint);
        Self::from_digest(h)
    }

    /// The hash of a block holding `tokens` after a block (or root) hashed `self`, under `salt`.
    pub fn chain(&self, tokens: &[u32], salt: Option<&[u8]>) -> Self {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(self.0);
        h.update((tokens.len() as u64).to_le_bytes());
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        match salt {
            None => h.update([0u8]),
            Some(s) => {
                h.update([1u8]);
                h.update((s.len() as u64).to_le_bytes());
                h.update(s);
            }
        }
        Self::from_digest(h)
    }

    fn from_digest(h: Sha256) -> Self {
        let d = h.finalize();
        let mut o = [0u8; 16];
        o.copy_from_slice(&d[..16]);
        Self(o)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Hashes of the full blocks of `tokens`: block `i` covers `tokens[i*bt..(i+1)*bt]`; it is salted when
/// it holds any position at or beyond `public_len` (so a public shared prefix stays shareable across
/// tenants while everything after it carries the tenant's salt).
pub fn block_hashes(
    root: BlockHash,
    tokens: &[u32],
    block_tokens: usize,
    public_len: usize,
    salt: Option<&[u8]>,
) -> Vec<BlockHash> {
    let mut out = Vec::with_capacity(tokens.len() / block_tokens);
    let mut prev = root;
    for (i, blk) in tokens.chunks_exact(block_tokens).enumerate() {
        let end = (i + 1) * block_tokens;
        let s = if end > public_len { salt } else { None };
        prev = prev.chain(blk, s);
        out.push(prev);
    }
    out
}

struct Node {
    block: BlockId,
    parent: Option<BlockHash>,
    children: u32,
    pins: u32,
    last_use: u64,
    /// False while the sequence that inserted it has not yet computed all of its positions.
    ready: bool,
}

/// A cached block found by [`PrefixCache::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub block: BlockId,
    pub ready: bool,
}

/// Shared full blocks by chained hash.
pub struct PrefixCache {
    root: BlockHash,
    nodes: HashMap<BlockHash, Node>,
    tick: u64,
    evictions: u64,
}

impl PrefixCache {
    pub fn new(root: BlockHash) -> Self {
        Self {
            root,
            nodes: HashMap::new(),
            tick: 0,
            evictions: 0,
        }
    }

    pub fn root(&self) -> BlockHash {
        self.root
    }
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    pub fn contains(&self, h: &BlockHash) -> bool {
        self.nodes.contains_key(h)
    }
    /// Blocks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
    pub fn block_of(&self, h: &BlockHash) -> Option<BlockId> {
        self.nodes.get(h).map(|n| n.block)
    }
    pub fn is_pinned(&self, h: &BlockHash) -> bool {
        self.nodes.get(h).is_some_and(|n| n.pins > 0)
    }

    /// The longest prefix of `hashes` present in the tree, marking those nodes used now.
    pub fn lookup(&mut self, hashes: &[BlockHash]) -> Vec<Hit> {
        self.tick += 1;
        let mut out = Vec::new();
        for h in hashes {
            match self.nodes.get_mut(h) {
                Some(n) => {
                    n.last_use = self.tick;
                    out.push(Hit {
                        block: n.block,
                        ready: n.ready,
                    });
                }
                None => break,
            }
        }
        out
    }

    /// The longest present prefix of `hashes`, without touching recency.
    pub fn peek(&self, hashes: &[BlockHash]) -> Vec<Hit> {
        hashes
            .iter()
            .map_while(|h| self.nodes.get(h))
            .map(|n| Hit {
                block: n.block,
                ready: n.ready,
            })
            .collect()
    }

    /// Adds `block` under `hash` (its parent must be present, or `None` for a first block) and takes a
    /// pool reference to it. Returns false, changing nothing, when the hash is already present or the
    /// parent is missing.
    pub fn insert(
        &mut self,
        pool: &mut BlockPool,
        hash: BlockHash,
        parent: Option<BlockHash>,
        block: BlockId,
        ready: bool,
    ) -> bool {
        if self.nodes.contains_key(&hash) {
            return false;
        }
        if let Some(p) = parent {
            match self.nodes.get_mut(&p) {
                Some(pn) => pn.children += 1,
                None => return false,
            }
        }
        self.tick += 1;
        pool.retain(block);
        self.nodes.insert(
            hash,
            Node {
                block,
                parent,
                children: 0,
                pins: 0,
                last_use: self.tick,
                ready,
            },
        );
        true
    }

    /// Marks a node's block as fully computed.
    pub fn mark_ready(&mut self, hash: &BlockHash) {
        if let Some(n) = self.nodes.get_mut(hash) {
            n.ready = true;
        }
    }

    /// Removes a node that is not ready (its sequence went away before computing it) if it still maps
    /// to `block` and has no children. Returns whether it was removed.
    pub fn remove_pending(
        &mut self,
        pool: &mut BlockPool,
        hash: &BlockHash,
        block: BlockId,
    ) -> bool {
        match self.nodes.get(hash) {
            Some(n) if !n.ready && n.block == block && n.children == 0 => {}
            _ => return false,
        }
        self.remove(pool, hash);
        true
    }

    fn remove(&mut self, pool: &mut BlockPool, hash: &BlockHash) {
        if let Some(n) = self.nodes.remove(hash) {
            if let Some(p) = n.parent.and_then(|p| self.nodes.get_mut(&p)) {
                p.children -= 1;
            }
            pool.release(n.block);
        }
    }

    /// Pins the nodes of `hashes` that are present (a pinned node is never evicted) and returns the
    /// hashes it pinned: pass exactly those to [`unpin`](Self::unpin), so one caller never removes
    /// another's pins.
    pub fn pin(&mut self, hashes: &[BlockHash]) -> Vec<BlockHash> {
        let mut pinned = Vec::new();
        for h in hashes {
            if let Some(node) = self.nodes.get_mut(h) {
                node.pins += 1;
                pinned.push(*h);
            }
        }
        pinned
    }

    /// Undoes one pin of each node of `pinned` (what [`pin`](Self::pin) returned).
    pub fn unpin(&mut self, pinned: &[BlockHash]) {
        for h in pinned {
            if let Some(node) = self.nodes.get_mut(h) {
                node.pins = node.pins.saturating_sub(1);
            }
        }
    }

    fn evictable(&self, n: &Node, pool: &BlockPool) -> bool {
        n.ready && n.pins == 0 && pool.ref_count(n.block) == 1
    }

    /// Blocks that eviction could free now: nodes held by the tree alone, unpinned and computed, with
    /// no node below them that is not (a node is freed only after all its children).
    pub fn reclaimable(&self, pool: &BlockPool) -> usize {
        let mut blocked: std::collections::HashSet<BlockHash> = std::collections::HashSet::new();
        for n in self.nodes.values().filter(|n| !self.evictable(n, pool)) {
            let mut up = n.parent;
            while let Some(p) = up {
                if !blocked.insert(p) {
                    break;
                }
                up = self.nodes.get(&p).and_then(|pn| pn.parent);
            }
        }
        self.nodes
            .iter()
            .filter(|(h, n)| self.evictable(n, pool) && !blocked.contains(h))
            .count()
    }

    /// Whether the block behind `hash` would be freed by eviction (so taking it uses up reclaimable
    /// space).
    pub fn is_reclaimable(&self, pool: &BlockPool, hash: &BlockHash) -> bool {
        self.nodes
            .get(hash)
            .is_some_and(|n| self.evictable(n, pool))
    }

    /// Evicts the least recently used evictable leaf, one at a time, until `want` blocks were freed or
    /// none is left. Returns the number freed.
    pub fn evict(&mut self, pool: &mut BlockPool, want: usize) -> usize {
        let mut freed = 0;
        while freed < want {
            let victim = self
                .nodes
                .iter()
                .filter(|(_, n)| n.children == 0 && self.evictable(n, pool))
                .min_by_key(|(h, n)| (n.last_use, **h))
                .map(|(h, _)| *h);
            let Some(h) = victim else { break };
            self.remove(pool, &h);
            self.evictions += 1;
            freed += 1;
        }
        freed
    }
}
