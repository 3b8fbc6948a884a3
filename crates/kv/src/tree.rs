//! The prefix tree: full KV blocks keyed by a chained hash, shared between sequences, evicted LRU.
//!
//! Block `i` of a sequence is identified by `hash_i = H(hash_{i-1}, tokens of block i, salt)`, with
//! `hash_{-1}` the root: a hash of the model's identity and the KV layout ([`crate::identity::cache_root`]). Equal hashes mean equal
//! token prefixes under the same model, layout and salt, so the block's KV can be shared. The hash is
//! SHA-256 over a fixed byte encoding (little-endian, versioned), truncated to 128 bits: deterministic
//! across processes and machines, unlike a process-seeded hasher.
//!
//! The tree holds one pool reference per node. A node is **idle** when it is computed, unpinned and
//! nothing but the tree references its block; an idle node keeps the time it became idle. Idle leaves
//! wait in an LRU list ordered by that time and are evicted from its old end when a block is needed;
//! an idle node with children joins the list, at its own time, when its last child goes — so leaves
//! always go before their ancestors, and releasing a sequence's blocks last-to-first (as vLLM's
//! free-block queue does) makes its deepest blocks the oldest. Every node below an idle node is idle
//! too (a sequence holds its whole path, pins cover whole prefixes of computed nodes), so the number of
//! blocks eviction can free is exactly the idle count — a counter, not a walk. Every transition (a
//! sequence acquiring or releasing a cached block, pins, readiness, children) goes through the cache
//! so the list and the count stay exact; each costs O(log n).
//! A salt (one per tenant) makes private blocks unmatchable across tenants: the same tokens under
//! different salts hash differently, and the chain carries the salt to every block after it.

use std::collections::{BTreeMap, HashMap};
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
    /// False while the sequence that inserted it has not yet computed all of its positions.
    ready: bool,
    /// Position in the idle list while idle.
    idle_key: Option<u64>,
    /// The block's KV came from an import (another process computed it).
    imported: bool,
    /// The import still filling this block layer by layer (its id), if any.
    importing: Option<u64>,
}

/// A cached block found by [`PrefixCache::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub block: BlockId,
    pub ready: bool,
    /// Its KV came from an import.
    pub imported: bool,
    /// An import is still writing its layers.
    pub importing: Option<u64>,
}

/// Shared full blocks by chained hash.
pub struct PrefixCache {
    root: BlockHash,
    nodes: HashMap<BlockHash, Node>,
    by_block: HashMap<BlockId, BlockHash>,
    /// Idle leaves, oldest first.
    idle: BTreeMap<u64, BlockHash>,
    /// Idle nodes that still have children (they join `idle` when their last child goes).
    idle_inner: usize,
    next_idle: u64,
    pinned_nodes: usize,
    evictions: u64,
}

impl PrefixCache {
    pub fn new(root: BlockHash) -> Self {
        Self {
            root,
            nodes: HashMap::new(),
            by_block: HashMap::new(),
            idle: BTreeMap::new(),
            idle_inner: 0,
            next_idle: 0,
            pinned_nodes: 0,
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
    /// Nodes with at least one pin.
    pub fn pinned_nodes(&self) -> usize {
        self.pinned_nodes
    }

    fn hit(n: &Node) -> Hit {
        Hit {
            block: n.block,
            ready: n.ready,
            imported: n.imported,
            importing: n.importing,
        }
    }

    /// The longest prefix of `hashes` present in the tree (nothing changes).
    pub fn lookup(&self, hashes: &[BlockHash]) -> Vec<Hit> {
        hashes
            .iter()
            .map_while(|h| self.nodes.get(h))
            .map(Self::hit)
            .collect()
    }

    /// The same as [`lookup`](Self::lookup).
    pub fn peek(&self, hashes: &[BlockHash]) -> Vec<Hit> {
        self.lookup(hashes)
    }

    /// How many leading blocks of `hashes` are present.
    pub fn present(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.nodes.contains_key(h))
            .count()
    }

    /// Of the present prefix of `hashes`, how many nodes are idle (taking them uses up reclaimable
    /// space).
    pub fn idle_among(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .map_while(|h| self.nodes.get(h))
            .filter(|n| n.idle_key.is_some())
            .count()
    }

    /// Takes one pool reference to each block of the present prefix of `hashes` (a sequence starts
    /// using them) and returns them.
    pub fn acquire(&mut self, pool: &mut BlockPool, hashes: &[BlockHash]) -> Vec<BlockId> {
        let mut out = Vec::new();
        for h in hashes {
            let Some(n) = self.nodes.get_mut(h) else {
                break;
            };
            pool.retain(n.block);
            out.push(n.block);
            self.refresh(pool, h);
        }
        out
    }

    /// Drops one reference to `block` held outside the tree (a sequence's). A cached block left held
    /// by the tree alone becomes idle (the newest in the LRU list). Release a sequence's blocks
    /// last-to-first so its leaves are evicted before their ancestors.
    pub fn release(&mut self, pool: &mut BlockPool, block: BlockId) {
        assert!(
            pool.ref_count(block) > 1 || !self.by_block.contains_key(&block),
            "release of block {block} that only the prefix cache holds"
        );
        pool.release(block);
        if let Some(h) = self.by_block.get(&block).copied() {
            self.refresh(pool, &h);
        }
    }

    fn idle_now(n: &Node, pool: &BlockPool) -> bool {
        n.ready && n.pins == 0 && n.importing.is_none() && pool.ref_count(n.block) == 1
    }

    /// Puts a node on or off the idle list (or count) according to its state.
    fn refresh(&mut self, pool: &BlockPool, h: &BlockHash) {
        let Some(n) = self.nodes.get_mut(h) else {
            return;
        };
        let idle = Self::idle_now(n, pool);
        match (idle, n.idle_key) {
            (true, None) => {
                let k = self.next_idle;
                self.next_idle += 1;
                n.idle_key = Some(k);
                if n.children == 0 {
                    self.idle.insert(k, *h);
                } else {
                    self.idle_inner += 1;
                }
            }
            (false, Some(k)) => {
                n.idle_key = None;
                if n.children == 0 {
                    self.idle.remove(&k);
                } else {
                    self.idle_inner -= 1;
                }
            }
            _ => {}
        }
    }

    /// A child was added under `p` (present).
    fn child_added(&mut self, p: &BlockHash) {
        let n = self.nodes.get_mut(p).expect("parent present");
        if n.children == 0 {
            if let Some(k) = n.idle_key {
                self.idle.remove(&k);
                self.idle_inner += 1;
            }
        }
        n.children += 1;
    }

    /// A child under `p` went (if `p` is present): an idle parent left childless joins the list at the
    /// time it became idle.
    fn child_removed(&mut self, p: &BlockHash) {
        let Some(n) = self.nodes.get_mut(p) else {
            return;
        };
        n.children -= 1;
        if n.children == 0 {
            if let Some(k) = n.idle_key {
                self.idle_inner -= 1;
                self.idle.insert(k, *p);
            }
        }
    }

    /// Adds `block` under `hash` (its parent must be present, or `None` for a first block) and takes a
    /// pool reference to it. Returns false, changing nothing, when the hash is already present, the
    /// parent is missing, or the block is already another node's.
    pub fn insert(
        &mut self,
        pool: &mut BlockPool,
        hash: BlockHash,
        parent: Option<BlockHash>,
        block: BlockId,
        ready: bool,
    ) -> bool {
        if self.nodes.contains_key(&hash) || self.by_block.contains_key(&block) {
            return false;
        }
        if let Some(p) = parent {
            if !self.nodes.contains_key(&p) {
                return false;
            }
            self.child_added(&p);
        }
        pool.retain(block);
        self.nodes.insert(
            hash,
            Node {
                block,
                parent,
                children: 0,
                pins: 0,
                ready,
                idle_key: None,
                imported: false,
                importing: None,
            },
        );
        self.by_block.insert(block, hash);
        self.refresh(pool, &hash);
        true
    }

    /// Marks a node's block as fully computed.
    pub fn mark_ready(&mut self, pool: &BlockPool, hash: &BlockHash) {
        if let Some(n) = self.nodes.get_mut(hash) {
            n.ready = true;
        }
        self.refresh(pool, hash);
    }

    /// Marks a node as filled by import `import` (its layers are still arriving) or, with `None`, as
    /// complete. Imported nodes stay marked as imported.
    pub fn set_importing(&mut self, pool: &BlockPool, hash: &BlockHash, import: Option<u64>) {
        if let Some(n) = self.nodes.get_mut(hash) {
            n.imported = true;
            n.importing = import;
        }
        self.refresh(pool, hash);
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
            Some(n) if !n.ready && n.block == block && n.children == 0 && n.pins == 0 => {}
            _ => return false,
        }
        self.remove(pool, hash);
        true
    }

    /// Removes an unpinned leaf node whatever its state (an import that was abandoned), dropping the
    /// tree's reference. Returns whether it was removed (false when absent, pinned or with children).
    pub fn remove_leaf(&mut self, pool: &mut BlockPool, hash: &BlockHash) -> bool {
        match self.nodes.get(hash) {
            Some(n) if n.children == 0 && n.pins == 0 => {}
            _ => return false,
        }
        self.remove(pool, hash);
        true
    }

    fn remove(&mut self, pool: &mut BlockPool, hash: &BlockHash) {
        if let Some(n) = self.nodes.remove(hash) {
            if let Some(k) = n.idle_key {
                if n.children == 0 {
                    self.idle.remove(&k);
                } else {
                    self.idle_inner -= 1;
                }
            }
            if let Some(p) = n.parent {
                self.child_removed(&p);
            }
            if n.pins > 0 {
                self.pinned_nodes -= 1;
            }
            self.by_block.remove(&n.block);
            pool.release(n.block);
        }
    }

    /// Pins the nodes of `hashes` that are present and computed (not pending, not being imported; a
    /// pinned node is never evicted or removed) and returns the hashes it pinned: pass exactly those
    /// to [`unpin`](Self::unpin), so one caller never removes another's pins.
    pub fn pin(&mut self, pool: &BlockPool, hashes: &[BlockHash]) -> Vec<BlockHash> {
        let mut pinned = Vec::new();
        for h in hashes {
            if let Some(node) = self.nodes.get_mut(h) {
                if !node.ready || node.importing.is_some() {
                    continue;
                }
                node.pins += 1;
                if node.pins == 1 {
                    self.pinned_nodes += 1;
                }
                pinned.push(*h);
                self.refresh(pool, h);
            }
        }
        pinned
    }

    /// How many of the present nodes of `hashes` are not pinned yet (what pinning them adds to
    /// [`pinned_nodes`](Self::pinned_nodes)).
    pub fn unpinned_among(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .filter_map(|h| self.nodes.get(h))
            .filter(|n| n.pins == 0)
            .count()
    }

    /// Undoes one pin of each node of `pinned` (what [`pin`](Self::pin) returned), last to first.
    pub fn unpin(&mut self, pool: &BlockPool, pinned: &[BlockHash]) {
        for h in pinned.iter().rev() {
            if let Some(node) = self.nodes.get_mut(h) {
                if node.pins == 1 {
                    self.pinned_nodes -= 1;
                }
                node.pins = node.pins.saturating_sub(1);
            }
            self.refresh(pool, h);
        }
    }

    /// Blocks that eviction could free now: the idle nodes (everything below an idle node is idle).
    pub fn reclaimable(&self) -> usize {
        self.idle.len() + self.idle_inner
    }

    /// Whether the node behind `hash` is idle (taking it uses up reclaimable space).
    pub fn is_reclaimable(&self, hash: &BlockHash) -> bool {
        self.nodes.get(hash).is_some_and(|n| n.idle_key.is_some())
    }

    /// Evicts idle leaves, oldest first (a parent left childless and idle joins at its own time), until
    /// `want` blocks were freed or no idle leaf is left. Returns the number freed.
    pub fn evict(&mut self, pool: &mut BlockPool, want: usize) -> usize {
        let mut freed = 0;
        while freed < want {
            let Some((_, h)) = self.idle.pop_first() else {
                break;
            };
            // Off the list already: `remove` must not look for it there.
            self.nodes.get_mut(&h).expect("idle node present").idle_key = None;
            self.remove(pool, &h);
            self.evictions += 1;
            freed += 1;
        }
        freed
    }
}
