//! The scheduler: continuous batching over the block pool, one forward step at a time.
//!
//! Every request is a [`Seq`] with an explicit [`State`] (waiting or running on a slot); two ordered
//! indexes by arrival (`waiting`, `running`) say who is next to admit and who is the newest to
//! preempt. A prompt's block hashes are computed once, at submission.
//!
//! Each [`Core::step`] (1) admits waiting requests first come, first served while their prompt blocks
//! fit (free blocks plus the prefix cache's idle count — a counter), sharing every full prompt block
//! the cache already holds; (2) picks the step's tokens under a token budget — one token for each
//! decoding sequence, then prompt chunks (chunked prefill) in arrival order; (3) grows block tables,
//! evicting idle cached blocks and, when memory is still short, preempting the most recently arrived
//! sequence (its blocks are freed; it re-enters the queue and is recomputed later, giving the same
//! tokens); (4) runs **one** batched forward pass layer by layer: a sequence whose prefix KV is still
//! being imported leaves the batch at the first layer not yet present, keeping its activations, and
//! rejoins the batched pass at that layer in a later step once the layer has arrived — the rest of the
//! batch is never held back; (5) samples, streams tokens, registers newly filled blocks in the prefix
//! cache and retires finished sequences.
//!
//! Imports ([`Core::import_begin`], [`Core::import_rows`]) write another process's KV of a public
//! prefix into pinned cache blocks, layer by layer; exports ([`crate::Request::export_kv`]) read a
//! computed prompt's KV back in the pool's stored dtype.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ep_kv::identity::{cache_root, CODEC_RAW};
use ep_kv::{block_hashes, BlockHash, BlockId, BlockPool, KvLayout, PrefixCache};
use ep_model::generate::FinishReason;
use ep_model::kv::SeqSlice;
use ep_model::llama::Hidden;
use ep_model::sampling::{Sampler, StopMatcher};
use ep_model::tokenizer::{StreamDecoder, Tokenizer};
use ep_model::{BatchSeq, LayerTimes, LogitsFor, Model};

use crate::attn::PagedAttention;
use crate::splice::{AttnMode, Plan, SpliceArena, SpliceAttention};
use crate::{
    EngineConfig, EngineError, Event, Failure, Finished, InvalidKind, InvalidRequest, PromptKv,
    Request, RequestId, StepStat, TokenLogprobs, MAX_TOP_LOGPROBS,
};

/// Identifies an import of external KV.
pub type ImportId = u64;
/// Identifies a pin of a cached prefix.
pub type PinId = u64;

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Queued for admission (new, or preempted and to be recomputed).
    Waiting,
    /// Admitted: holds KV blocks and the forward pass's sequence number `slot`.
    Running { slot: usize },
}

/// A prefill stopped at a layer boundary because its prefix's next layer has not arrived.
struct Held {
    h: Hidden,
    /// The layer to run next.
    next: usize,
    /// Token rows `start..start + n`.
    start: usize,
    n: usize,
}

/// The partial last block of an import, copied layer by layer into a sequence's own block.
struct TailCopy {
    src: BlockId,
    dst: BlockId,
    n: usize,
    /// Layers copied so far.
    layers: usize,
}

struct Seq<'a> {
    id: RequestId,
    state: State,
    arrival: u64,
    req: Request,
    sampler: Sampler,
    decoder: StreamDecoder<'a>,
    stops: StopMatcher,
    tx: crate::Events,
    submitted: Instant,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    n_prompt: usize,
    /// Tokens whose KV is in the blocks (for every layer).
    computed: usize,
    blocks: Vec<BlockId>,
    /// Hashes of the full blocks of `tokens` (computed once; extended as generated blocks fill).
    hashes: Vec<BlockHash>,
    /// Leading blocks that are in the prefix cache (matched, or inserted by this sequence).
    registered: usize,
    /// Blocks this sequence inserted before computing them: (index, hash).
    pending: Vec<(usize, BlockHash)>,
    /// Prompt tokens found in the prefix cache at (first) admission, and those of them imported.
    cached_tokens: usize,
    imported_tokens: usize,
    /// `cached_tokens` and `imported_tokens` are (re)measured at the next admission.
    measure: bool,
    preemptions: usize,
    first_token: Option<Duration>,
    held: Option<Held>,
    /// The import whose layers this sequence's prefix is waiting for.
    gate: Option<ImportId>,
    tail: Option<TailCopy>,
}

impl Seq<'_> {
    fn generated(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }
    /// Extends the chain of block hashes (from `root`) to the first `n` full blocks of `tokens`.
    fn extend_hashes(&mut self, root: BlockHash, bt: usize, n: usize) {
        while self.hashes.len() < n {
            let idx = self.hashes.len();
            let prev = idx.checked_sub(1).map_or(root, |p| self.hashes[p]);
            let h = prev.chain(
                &self.tokens[idx * bt..(idx + 1) * bt],
                self.salt_for(idx, bt),
            );
            self.hashes.push(h);
        }
    }
    fn salt_for(&self, block: usize, bt: usize) -> Option<&[u8]> {
        if (block + 1) * bt > self.req.public_prefix {
            self.req.salt.as_deref()
        } else {
            None
        }
    }
    fn slot(&self) -> usize {
        match self.state {
            State::Running { slot } => slot,
            State::Waiting => usize::MAX,
        }
    }
}

/// Progress of an import, shared with its handle.
#[derive(Debug, Default)]
pub struct ImportProgress {
    ready: AtomicUsize,
    status: AtomicU8,
}

/// What became of an import.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportStatus {
    /// Layers are still arriving.
    Filling,
    /// Every layer is present.
    Complete,
    /// It was abandoned before completing (its blocks were dropped).
    Aborted,
}

impl ImportProgress {
    /// Layers `0..ready_layers()` are present for every token.
    pub fn ready_layers(&self) -> usize {
        self.ready.load(Ordering::Acquire)
    }
    pub fn status(&self) -> ImportStatus {
        match self.status.load(Ordering::Acquire) {
            0 => ImportStatus::Filling,
            1 => ImportStatus::Complete,
            _ => ImportStatus::Aborted,
        }
    }
}

/// Errors of an import.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("the import is empty (no tokens)")]
    Empty,
    #[error("token id {0} is outside the vocabulary")]
    Token(u32),
    #[error("the KV of {tokens} tokens does not fit in the KV memory now ({free} blocks free or reclaimable, {need} needed)")]
    OutOfKvMemory {
        tokens: usize,
        need: usize,
        free: usize,
    },
    #[error("pinning {want} more blocks would pass the cap on pinned KV ({cap} blocks; {pinned} pinned)")]
    PinCap {
        want: usize,
        pinned: usize,
        cap: usize,
    },
    #[error("part of this prefix is being computed or imported by another request now; retry")]
    Busy,
    #[error("unknown import {0}")]
    Unknown(ImportId),
    #[error("rows {start}..{end} of layer {layer}: {what}")]
    Rows {
        layer: usize,
        start: usize,
        end: usize,
        what: String,
    },
}

struct Import {
    /// The root its hashes chain from (its codec's).
    root: BlockHash,
    n_tokens: usize,
    hashes: Vec<BlockHash>,
    /// Per full block: the block this import writes (`None`: already cached and computed).
    targets: Vec<Option<BlockId>>,
    pinned: Vec<BlockHash>,
    /// The partial last block (held by the import) and its tokens.
    tail: Option<(BlockId, Vec<u32>)>,
    /// Tokens `0..cached` were in cached blocks when the import began (a prompt sharing its
    /// prefix): rows written for them are the same content by their chained hashes and are skipped.
    cached: usize,
    /// Per layer: which tokens are present (bitset) and how many.
    covered: Vec<Vec<u64>>,
    counts: Vec<usize>,
    ready: usize,
    progress: Arc<ImportProgress>,
}

impl Import {
    fn complete(&self) -> bool {
        self.ready == self.counts.len()
    }
    /// Where a prompt extending this import's full blocks looks for its partial last block: the
    /// hash of the last full block (the root when there is none).
    fn tail_key(&self) -> BlockHash {
        self.hashes.last().copied().unwrap_or(self.root)
    }
}

/// An entry of the per-layer log ([`EngineConfig::layer_log`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerEvent {
    /// Layer `layer` ran in step `step` for these requests (one batched call).
    Ran {
        step: u64,
        layer: usize,
        requests: Vec<RequestId>,
    },
    /// Layer `layer` of import `import` became present before step `step`.
    Arrived {
        step: u64,
        import: ImportId,
        layer: usize,
    },
}

/// The scheduler and the KV store of one engine.
pub struct Core<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    cfg: EngineConfig,
    layout: KvLayout,
    pool: BlockPool,
    cache: PrefixCache,
    seqs: HashMap<RequestId, Seq<'a>>,
    /// Waiting and running requests by arrival.
    waiting: BTreeMap<u64, RequestId>,
    running: BTreeMap<u64, RequestId>,
    /// Block tables by slot (the sequence id the forward pass sees).
    tables: Vec<Vec<BlockId>>,
    free_slots: Vec<usize>,
    arrivals: u64,
    preemptions: u64,
    arena: SpliceArena,
    /// Jointly attended nodes and keys of the last forward pass.
    last_shared: (usize, usize),
    /// Where the last step's forward pass spent its time (weights include the logits' product).
    last_times: LayerTimes,
    imports: HashMap<ImportId, Import>,
    /// Imports with a partial last block, by the hash of their last full block (or the root).
    import_tails: HashMap<BlockHash, ImportId>,
    next_import: ImportId,
    pins: HashMap<PinId, Vec<BlockHash>>,
    next_pin: PinId,
    max_pinned: usize,
    /// Partial last blocks held by imports.
    import_tail_blocks: usize,
    steps: u64,
    layer_log: Vec<LayerEvent>,
    identity: [u8; 32],
    /// Cache nodes inserted with each tenant salt (some may have been evicted since), so a tenant's
    /// private KV can be purged ([`Core::purge_salt`]); `salted_len` counts the entries.
    salted: HashMap<Vec<u8>, HashSet<BlockHash>>,
    salted_len: usize,
}

/// A sequence's share of one step: tokens `start..start + n`.
struct Planned {
    id: RequestId,
    start: usize,
    n: usize,
}

enum Grow {
    Ready,
    /// The sequence itself was preempted (it is the most recently arrived).
    Preempted,
    /// It is the only sequence and the pool cannot hold more of it.
    Alone,
}

impl<'a> Core<'a> {
    /// A scheduler over a fresh pool for the model whose content identity digest is `identity`
    /// (`ep_kv::identity::ContentIdentity::digest`): block hashes chain from
    /// `cache_root(identity, dtype, block size, codec)`, exact KV under the raw codec, KV derived from a
    /// lossy import under that codec's root.
    pub fn new(
        model: &'a Model,
        tok: &'a Tokenizer,
        cfg: EngineConfig,
        identity: [u8; 32],
    ) -> Result<Self, EngineError> {
        let root = cache_root(&identity, cfg.kv_dtype, cfg.block_tokens, CODEC_RAW);
        let layout = layout_of(model, &cfg);
        let pool = BlockPool::new(layout, cfg.kv_budget_bytes)?;
        let max_pinned = ((pool.n_blocks() as f64) * cfg.max_pinned_share.clamp(0.0, 1.0)) as usize;
        Ok(Self {
            model,
            tok,
            cfg,
            layout,
            pool,
            cache: PrefixCache::new(root),
            identity,
            seqs: HashMap::new(),
            waiting: BTreeMap::new(),
            running: BTreeMap::new(),
            tables: Vec::new(),
            free_slots: Vec::new(),
            arrivals: 0,
            preemptions: 0,
            arena: SpliceArena::default(),
            last_shared: (0, 0),
            last_times: LayerTimes::default(),
            imports: HashMap::new(),
            import_tails: HashMap::new(),
            next_import: 1,
            pins: HashMap::new(),
            next_pin: 1,
            max_pinned,
            import_tail_blocks: 0,
            steps: 0,
            layer_log: Vec::new(),
            salted: HashMap::new(),
            salted_len: 0,
        })
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }
    /// The root block hashes chain from for KV of `codec` (raw: exact KV).
    pub fn root_for(&self, codec: u8) -> BlockHash {
        if codec == CODEC_RAW {
            self.cache.root()
        } else {
            cache_root(
                &self.identity,
                self.layout.dtype,
                self.layout.block_tokens,
                codec,
            )
        }
    }
    pub fn cache(&self) -> &PrefixCache {
        &self.cache
    }
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }
    pub fn n_running(&self) -> usize {
        self.running.len()
    }
    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// The most blocks pins (and imports) may hold.
    pub fn max_pinned_blocks(&self) -> usize {
        self.max_pinned
    }
    /// Removes and returns the per-layer log gathered so far.
    pub fn take_layer_log(&mut self) -> Vec<LayerEvent> {
        std::mem::take(&mut self.layer_log)
    }

    /// Checks a request against the model and the memory; the error says what is wrong.
    pub fn validate(&self, req: &Request) -> Result<(), InvalidRequest> {
        validate(
            self.model,
            &self.cfg,
            self.layout,
            self.pool.n_blocks(),
            req,
        )
    }

    /// Queues a request (its prompt is hashed here, once). Its events go to `tx`.
    pub fn add(
        &mut self,
        id: RequestId,
        req: Request,
        tx: crate::Events,
        submitted: Instant,
    ) -> Result<(), InvalidRequest> {
        self.validate(&req)?;
        let sampler = Sampler::new(req.params.sampling.clone())
            .map_err(|e| InvalidRequest::new(InvalidKind::Sampling, e.to_string()))?;
        self.arrivals += 1;
        let hashes = block_hashes(
            self.root_for(req.kv_codec),
            &req.prompt,
            self.layout.block_tokens,
            req.public_prefix,
            req.salt.as_deref(),
        );
        let seq = Seq {
            id,
            state: State::Waiting,
            arrival: self.arrivals,
            sampler,
            decoder: StreamDecoder::new(self.tok),
            stops: StopMatcher::new(req.params.stop.clone()),
            tx,
            submitted,
            tokens: req.prompt.clone(),
            n_prompt: req.prompt.len(),
            computed: 0,
            blocks: Vec::new(),
            hashes,
            registered: 0,
            pending: Vec::new(),
            cached_tokens: 0,
            imported_tokens: 0,
            measure: true,
            preemptions: 0,
            first_token: None,
            held: None,
            gate: None,
            tail: None,
            req,
        };
        self.waiting.insert(seq.arrival, id);
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Ends a request with `failure` and frees its memory. Returns whether it was known.
    fn drop_seq(&mut self, id: RequestId, failure: Failure) -> bool {
        let Some(s) = self.take(id) else {
            return false;
        };
        let _ = s.tx.send(Event::Error(failure));
        self.release(s);
        true
    }

    /// Stops a request now and frees its memory. Returns whether it was known.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        self.drop_seq(id, Failure::Cancelled)
    }

    /// Cancels every request whose stream was dropped.
    pub fn reap_closed(&mut self) {
        let closed: Vec<RequestId> = self
            .seqs
            .values()
            .filter(|s| s.tx.is_closed())
            .map(|s| s.id)
            .collect();
        for id in closed {
            self.cancel(id);
        }
    }

    /// Removes a sequence from the map and its index.
    fn take(&mut self, id: RequestId) -> Option<Seq<'a>> {
        let s = self.seqs.remove(&id)?;
        match s.state {
            State::Waiting => self.waiting.remove(&s.arrival),
            State::Running { .. } => self.running.remove(&s.arrival),
        };
        Some(s)
    }

    /// Frees a sequence's blocks and slot (blocks registered and computed stay cached, idle once
    /// nothing else holds them; the deepest go first).
    fn release(&mut self, mut s: Seq<'a>) -> Seq<'a> {
        for &(i, h) in s.pending.iter().rev() {
            self.cache.remove_pending(&mut self.pool, &h, s.blocks[i]);
        }
        s.pending.clear();
        for &b in s.blocks.iter().rev() {
            self.cache.release(&mut self.pool, b);
        }
        if let Some(t) = s.tail.take() {
            self.cache.release(&mut self.pool, t.src);
        }
        s.blocks.clear();
        s.registered = 0;
        s.computed = 0;
        s.held = None;
        s.gate = None;
        if let State::Running { slot } = s.state {
            self.tables[slot].clear();
            self.free_slots.push(slot);
        }
        s.state = State::Waiting;
        s
    }

    fn take_slot(&mut self) -> usize {
        self.free_slots.pop().unwrap_or_else(|| {
            self.tables.push(Vec::new());
            self.tables.len() - 1
        })
    }

    /// Takes a free block, evicting an idle cached block if needed.
    fn alloc_block(&mut self) -> Option<BlockId> {
        if let Some(b) = self.pool.alloc() {
            return Some(b);
        }
        if self.cache.evict(&mut self.pool, 1) > 0 {
            return self.pool.alloc();
        }
        None
    }

    /// Blocks obtainable now: free plus idle cached ones.
    fn available(&self) -> usize {
        self.pool.n_free() + self.cache.reclaimable()
    }

    /// Admits waiting requests in arrival order while memory allows.
    fn admit(&mut self) {
        let bt = self.layout.block_tokens;
        let queue: Vec<RequestId> = self.waiting.values().copied().collect();
        for id in queue {
            if self.running.len() >= self.cfg.max_seqs {
                break;
            }
            let root = self.root_for(self.seqs[&id].req.kv_codec);
            let s = self.seqs.get_mut(&id).expect("waiting sequences exist");
            // Hashes of blocks generated before a preemption.
            s.extend_hashes(root, bt, s.tokens.len() / bt);
            let s = &self.seqs[&id];
            // Never match the whole sequence: the last token is recomputed for its logits.
            let usable = ((s.tokens.len() - 1) / bt).min(s.hashes.len());
            let hits = self.cache.lookup(&s.hashes[..usable]);
            if hits.iter().any(|h| !h.ready) {
                // Another sequence is computing this prefix now: wait for it rather than compute it
                // twice; later requests may pass meanwhile (this one is admitted once it is ready).
                continue;
            }
            let need = self.layout.blocks_for(s.tokens.len() + 1) - hits.len();
            let avail = self.available() - self.cache.idle_among(&s.hashes[..hits.len()]);
            if need > avail {
                if self.running.is_empty() {
                    // Nothing running will free memory: what is missing is held by pins and imports.
                    // Fail it clearly rather than wait, and let the requests behind it go on.
                    let f = Failure::OutOfKvMemory {
                        tokens: s.tokens.len() + 1,
                        capacity: (avail + hits.len()) * bt,
                    };
                    tracing::warn!(
                        request = id,
                        "a request does not fit beside the pinned KV; failing it"
                    );
                    self.drop_seq(id, f);
                    continue;
                }
                // First come, first served: nothing behind a request that does not fit may pass it.
                break;
            }
            let mut s = self.take(id).expect("waiting sequences exist");
            let n_hits = hits.len();
            s.blocks = self.cache.acquire(&mut self.pool, &s.hashes[..n_hits]);
            s.registered = n_hits;
            s.computed = n_hits * bt;
            s.gate = hits.iter().find_map(|h| h.importing);
            let mut imported = hits.iter().filter(|h| h.imported).count() * bt;
            // Blocks for the rest of the prompt (and the first generated token), inserted into the
            // cache as pending so an identical prompt waits for them instead of recomputing.
            let mut ok = true;
            while s.blocks.len() < self.layout.blocks_for(s.tokens.len() + 1) {
                match self.alloc_block() {
                    Some(b) => s.blocks.push(b),
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                // Reclaimable space was overestimated (should not happen): put it back.
                let s = self.release(s);
                self.waiting.insert(s.arrival, s.id);
                self.seqs.insert(s.id, s);
                break;
            }
            // The partial last block of an import this prompt extends: copied, not recomputed.
            let key = n_hits.checked_sub(1).map_or(root, |i| s.hashes[i]);
            if let Some(&iid) = self.import_tails.get(&key) {
                let imp = &self.imports[&iid];
                if let Some((src, toks)) = &imp.tail {
                    let at = n_hits * bt;
                    if n_hits == imp.hashes.len()
                        && s.tokens.len() > at + toks.len()
                        && s.tokens[at..at + toks.len()] == toks[..]
                    {
                        self.pool.retain(*src);
                        s.tail = Some(TailCopy {
                            src: *src,
                            dst: s.blocks[n_hits],
                            n: toks.len(),
                            layers: 0,
                        });
                        s.computed += toks.len();
                        imported += toks.len();
                        if !imp.complete() {
                            s.gate = Some(iid);
                        }
                    }
                }
            }
            if s.measure {
                s.cached_tokens = s.computed;
                s.imported_tokens = imported;
                s.measure = false;
            }
            while s.registered < s.hashes.len() && s.registered < s.blocks.len() {
                let idx = s.registered;
                let parent = idx.checked_sub(1).map(|p| s.hashes[p]);
                if !self
                    .cache
                    .insert(&mut self.pool, s.hashes[idx], parent, s.blocks[idx], false)
                {
                    break;
                }
                s.pending.push((idx, s.hashes[idx]));
                if let Some(salt) = s.salt_for(idx, bt) {
                    note_salted(&mut self.salted, &mut self.salted_len, salt, s.hashes[idx]);
                }
                s.registered += 1;
            }
            self.prune_salted();
            let slot = self.take_slot();
            s.state = State::Running { slot };
            self.tables[slot].clone_from(&s.blocks);
            self.running.insert(s.arrival, s.id);
            self.seqs.insert(s.id, s);
        }
    }

    /// Frees running sequence `id` and queues it for recomputation (arrival order kept).
    fn preempt(&mut self, id: RequestId) {
        let Some(s) = self.take(id) else { return };
        let mut s = self.release(s);
        s.preemptions += 1;
        self.preemptions += 1;
        tracing::debug!(request = s.id, "preempted (KV memory full); will recompute");
        self.waiting.insert(s.arrival, s.id);
        self.seqs.insert(s.id, s);
    }

    /// Makes sure sequence `id` has blocks for `upto` positions, evicting cached blocks and then
    /// preempting the most recently arrived sequence (which may be `id` itself).
    fn grow(&mut self, id: RequestId, upto: usize) -> Grow {
        loop {
            let Some(s) = self.seqs.get(&id).filter(|s| s.state != State::Waiting) else {
                return Grow::Preempted;
            };
            if s.blocks.len() >= self.layout.blocks_for(upto) {
                return Grow::Ready;
            }
            if let Some(b) = self.alloc_block() {
                let s = self.seqs.get_mut(&id).expect("checked above");
                s.blocks.push(b);
                self.tables[s.slot()].push(b);
                continue;
            }
            let (_, &newest) = self
                .running
                .iter()
                .next_back()
                .expect("sequence id is running");
            if newest == id && self.running.len() == 1 {
                return Grow::Alone;
            }
            self.preempt(newest);
        }
    }

    /// Runs one scheduling step and forward pass. Returns `None` when there was nothing to do.
    pub fn step(&mut self) -> Option<StepStat> {
        let t0 = Instant::now();
        self.last_shared = (0, 0);
        self.last_times = LayerTimes::default();
        self.admit();
        if self.running.is_empty() {
            return None;
        }
        self.steps += 1;
        // Decode sequences first, then prompt chunks, under the token budget.
        let mut order: Vec<(bool, u64, RequestId)> = self
            .running
            .iter()
            .map(|(&a, &id)| {
                let s = &self.seqs[&id];
                (s.tokens.len() - s.computed > 1, a, id)
            })
            .collect();
        order.sort_unstable();
        let any_prefill = order
            .iter()
            .any(|&(p, _, id)| p && self.seqs[&id].held.is_none());
        let mut budget = self.cfg.max_step_tokens;
        let mut plan: Vec<(RequestId, usize)> = Vec::new();
        for &(_, _, id) in &order {
            let s = &self.seqs[&id];
            if s.held.is_some() {
                continue;
            }
            let want = s.tokens.len() - s.computed;
            if want == 1 && any_prefill && self.cfg.prefill_first {
                continue;
            }
            // Its reader is behind (a client that stopped reading): no token until it catches up.
            let cap = self.cfg.max_unread_events;
            if want == 1 && cap > 0 && s.tx.unread() >= cap {
                continue;
            }
            let n = want.min(budget);
            if n == 0 {
                break;
            }
            budget -= n;
            plan.push((id, n));
        }
        // Blocks for every planned token (may preempt sequences, planned ones included).
        for &(id, n) in &plan {
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            let upto = s.computed + n;
            if let Grow::Alone = self.grow(id, upto) {
                // The only sequence and still out of memory: it can never grow, so it ends here.
                let s = &self.seqs[&id];
                let f = Failure::OutOfKvMemory {
                    tokens: s.tokens.len(),
                    capacity: self.pool.n_blocks() * self.layout.block_tokens,
                };
                tracing::warn!(
                    request = id,
                    "KV memory full with a single sequence; stopping it"
                );
                self.drop_seq(id, f);
            }
        }
        let planned: Vec<Planned> = plan
            .into_iter()
            .filter_map(|(id, n)| {
                let s = self.seqs.get(&id).filter(|s| s.state != State::Waiting)?;
                Some(Planned {
                    id,
                    start: s.computed,
                    n,
                })
            })
            .collect();
        let (mut prefill_tokens, mut decode_tokens) = (0, 0);
        for p in &planned {
            if p.n > 1 {
                prefill_tokens += p.n;
            } else {
                decode_tokens += 1;
            }
        }
        let has_held = self.seqs.values().any(|s| s.held.is_some());
        if planned.is_empty() && !has_held {
            return None;
        }
        let tf = Instant::now();
        let (rows, layer_calls) = match self.forward(&planned) {
            Ok(r) => r,
            Err(e) => {
                let ids: Vec<RequestId> = planned.iter().map(|p| p.id).collect();
                for id in ids {
                    self.drop_seq(id, Failure::Internal(e.to_string()));
                }
                (Vec::new(), 0)
            }
        };
        let forward_secs = tf.elapsed().as_secs_f64();
        self.register_blocks();
        self.sample_and_emit(rows);
        let secs = t0.elapsed().as_secs_f64();
        Some(StepStat {
            prefill_tokens,
            decode_tokens,
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_used_bytes: self.pool.used_bytes(),
            shared_nodes: self.last_shared.0,
            shared_keys: self.last_shared.1,
            layer_calls,
            weights_secs: self.last_times.weights.as_secs_f64(),
            attention_secs: self.last_times.attention.as_secs_f64(),
            secs,
            sched_secs: secs - forward_secs,
        })
    }

    /// Layers present for sequence `id`'s prefix (all when it waits for no import).
    fn allowed_layers(&self, id: RequestId) -> usize {
        let n_layer = self.model.cfg.n_layer;
        match self.seqs[&id].gate.and_then(|g| self.imports.get(&g)) {
            Some(imp) => imp.ready,
            None => n_layer,
        }
    }

    /// One batched forward pass: the planned rows from layer 0, held prefills joining at their layer
    /// once it is present, sequences whose next layer is missing leaving (held for a later step).
    /// Returns the logits of the rows that sample and the number of layer calls.
    #[allow(clippy::type_complexity)]
    fn forward(
        &mut self,
        plan: &[Planned],
    ) -> Result<(Vec<(RequestId, Vec<f32>)>, usize), EngineError> {
        let model = self.model;
        let n_layer = model.cfg.n_layer;
        let batch: Vec<BatchSeq<'_>> = plan
            .iter()
            .map(|p| {
                let s = &self.seqs[&p.id];
                BatchSeq {
                    seq: s.slot(),
                    tokens: &s.tokens[p.start..p.start + p.n],
                    pos: p.start,
                    logits: LogitsFor::None,
                }
            })
            .collect();
        let mut cur = model.embed(&batch)?;
        drop(batch);
        // Members of `cur` in slice order: (id, start, n).
        let mut members: Vec<(RequestId, usize, usize)> =
            plan.iter().map(|p| (p.id, p.start, p.n)).collect();
        let held_ids: Vec<RequestId> = {
            let mut v: Vec<(u64, RequestId)> = self
                .seqs
                .values()
                .filter(|s| s.held.is_some())
                .map(|s| (s.arrival, s.id))
                .collect();
            v.sort_unstable();
            v.into_iter().map(|x| x.1).collect()
        };
        let mut plan_cache: Option<Plan> = None;
        let mut layer_calls = 0;
        for l in 0..n_layer {
            let mut changed = l == 0;
            // Held prefills whose next layer is `l` and present join.
            for &id in &held_ids {
                let next = self.seqs[&id].held.as_ref().map(|h| h.next);
                if next == Some(l) && self.allowed_layers(id) > l {
                    let h = self.seqs.get_mut(&id).and_then(|s| s.held.take());
                    let h = h.expect("held above");
                    append_hidden(&mut cur, &h.h);
                    members.push((id, h.start, h.n));
                    changed = true;
                }
            }
            // Sequences whose layer `l` is missing leave, keeping their activations.
            let mut i = 0;
            while i < members.len() {
                let (id, start, n) = members[i];
                if self.allowed_layers(id) <= l {
                    let h = take_hidden(&mut cur, i);
                    self.seqs.get_mut(&id).expect("member").held = Some(Held {
                        h,
                        next: l,
                        start,
                        n,
                    });
                    members.remove(i);
                    changed = true;
                } else {
                    i += 1;
                }
            }
            if members.is_empty() {
                continue;
            }
            // Partial import blocks copied into the sequences' own blocks for this layer.
            for &(id, _, _) in &members {
                if let Some(t) = self.seqs.get_mut(&id).and_then(|s| s.tail.as_mut()) {
                    if t.layers == l {
                        self.pool.copy_block_layer(l, t.src, t.dst, t.n);
                        t.layers += 1;
                    }
                }
            }
            if changed || plan_cache.is_none() {
                plan_cache = Some(crate::splice::plan_step(
                    self.cfg.attn_mode,
                    model.attn_shape(),
                    self.layout.dtype,
                    self.layout.block_tokens,
                    &cur.slices,
                    &self.tables,
                ));
            }
            let p = plan_cache.as_ref().expect("made above");
            self.last_shared = (p.shared_nodes, p.shared_keys);
            match self.cfg.attn_mode {
                AttnMode::Paged => {
                    let mut attn = PagedAttention {
                        shape: model.attn_shape(),
                        pool: &mut self.pool,
                        tables: &self.tables,
                    };
                    model.layer_timed(l, &mut cur, &mut attn, &mut self.last_times)?;
                }
                mode => {
                    let mut attn = SpliceAttention {
                        mode,
                        shape: model.attn_shape(),
                        pool: &mut self.pool,
                        tables: &self.tables,
                        arena: &mut self.arena,
                        plan: p,
                    };
                    model.layer_timed(l, &mut cur, &mut attn, &mut self.last_times)?;
                }
            }
            layer_calls += 1;
            if self.cfg.layer_log {
                self.layer_log.push(LayerEvent::Ran {
                    step: self.steps,
                    layer: l,
                    requests: members.iter().map(|m| m.0).collect(),
                });
            }
        }
        // Members completed every layer: their tokens are computed.
        let mut rows = Vec::new();
        let mut logit_rows = Vec::new();
        for (i, &(id, start, n)) in members.iter().enumerate() {
            let s = self.seqs.get_mut(&id).expect("member");
            s.computed = start + n;
            if s.computed == s.tokens.len() {
                rows.push(id);
                logit_rows.push(cur.slices[i].rows.end - 1);
            }
            if s.tail.as_ref().is_some_and(|t| t.layers == n_layer) {
                let t = s.tail.take().expect("checked");
                self.cache.release(&mut self.pool, t.src);
            }
            if s.gate
                .is_some_and(|g| self.imports.get(&g).is_none_or(|i| i.complete()))
            {
                s.gate = None;
            }
        }
        let mut out = Vec::with_capacity(rows.len());
        if !rows.is_empty() {
            let t = Instant::now();
            let logits = model.logits(&cur, &logit_rows)?;
            self.last_times.weights += t.elapsed();
            let nv = model.cfg.n_vocab;
            for (j, id) in rows.into_iter().enumerate() {
                self.export_if_asked(id);
                out.push((id, logits[j * nv..(j + 1) * nv].to_vec()));
            }
        }
        Ok((out, layer_calls))
    }

    /// Sends the KV of a prompt whose request asked for it (once, when the prompt is computed).
    fn export_if_asked(&mut self, id: RequestId) {
        let s = &self.seqs[&id];
        if !s.req.export_kv || s.generated() > 0 {
            return;
        }
        let bt = self.layout.block_tokens;
        let n = s.n_prompt;
        let mut layers = Vec::with_capacity(self.layout.n_layer);
        for l in 0..self.layout.n_layer {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            let mut t = 0;
            while t < n {
                let m = (bt - t % bt).min(n - t);
                self.pool
                    .read_raw(l, s.blocks[t / bt], t % bt, m, &mut k, &mut v);
                t += m;
            }
            layers.push((k, v));
        }
        let kv = PromptKv {
            tokens: s.tokens[..n].to_vec(),
            layout: self.layout,
            block_hashes: block_hashes(self.root_for(s.req.kv_codec), &s.tokens[..n], bt, n, None),
            layers,
        };
        let _ = s.tx.send(Event::Kv(Box::new(kv)));
    }

    /// Inserts newly filled blocks into the prefix cache and marks computed pending ones ready.
    fn register_blocks(&mut self) {
        let bt = self.layout.block_tokens;
        let ids: Vec<RequestId> = self.running.values().copied().collect();
        for id in ids {
            let root = self.root_for(self.seqs[&id].req.kv_codec);
            let s = self.seqs.get_mut(&id).expect("running sequences exist");
            let full = s.computed / bt;
            let (cache, pool) = (&mut self.cache, &mut self.pool);
            // Pending blocks now computed.
            s.pending.retain(|&(idx, h)| {
                if idx < full {
                    cache.mark_ready(pool, &h);
                    false
                } else {
                    true
                }
            });
            s.extend_hashes(root, bt, full);
            while s.registered < full {
                let idx = s.registered;
                let parent = idx.checked_sub(1).map(|p| s.hashes[p]);
                if !cache.insert(pool, s.hashes[idx], parent, s.blocks[idx], true) {
                    break;
                }
                if let Some(salt) = s.salt_for(idx, bt) {
                    note_salted(&mut self.salted, &mut self.salted_len, salt, s.hashes[idx]);
                }
                s.registered += 1;
            }
        }
        self.prune_salted();
    }

    /// Forgets salted entries whose nodes left the cache once they outnumber the pool's blocks twice.
    fn prune_salted(&mut self) {
        if self.salted_len <= 2 * self.pool.n_blocks().max(1) {
            return;
        }
        let cache = &self.cache;
        self.salted.retain(|_, set| {
            set.retain(|h| cache.contains(h));
            !set.is_empty()
        });
        self.salted_len = self.salted.values().map(HashSet::len).sum();
    }

    /// Drops the idle cached blocks inserted under tenant salt `salt` (deepest first, as a block's
    /// descendants carry its salt too) and returns how many were freed. Blocks running requests hold
    /// stay cached.
    pub fn purge_salt(&mut self, salt: &[u8]) -> usize {
        let Some(mut set) = self.salted.remove(salt) else {
            return 0;
        };
        let before = set.len();
        let mut freed = 0;
        loop {
            let (cache, pool) = (&mut self.cache, &mut self.pool);
            let n = set.len();
            set.retain(|h| {
                if !cache.contains(h) {
                    return false;
                }
                if cache.remove_idle_leaf(pool, h) {
                    freed += 1;
                    return false;
                }
                true
            });
            if set.len() == n {
                break;
            }
        }
        self.salted_len -= before - set.len();
        if !set.is_empty() {
            self.salted.insert(salt.to_vec(), set);
        }
        freed
    }

    fn sample_and_emit(&mut self, rows: Vec<(RequestId, Vec<f32>)>) {
        let mut done: Vec<(RequestId, FinishReason)> = Vec::new();
        for (id, logits) in rows {
            let max_len = self.cfg.max_seq_len;
            let tok = self.tok;
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            let next = s.sampler.sample(&logits, &s.tokens);
            let logprobs = s
                .req
                .params
                .logprobs
                .map(|k| Box::new(token_logprobs(&logits, next, k)));
            s.tokens.push(next);
            let elapsed = s.submitted.elapsed();
            s.first_token.get_or_insert(elapsed);
            let eog = tok.is_eog(next) && !s.req.params.ignore_eos;
            let mut text = String::new();
            let mut stopped = false;
            if !eog {
                let piece = s.decoder.push(next);
                let (out, st) = s.stops.push(&piece);
                text = out;
                stopped = st;
            }
            let _ = s.tx.send(Event::Token {
                token: next,
                text,
                elapsed,
                logprobs,
            });
            let reason = if eog || stopped {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.req.params.max_tokens || s.tokens.len() >= max_len {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(r) = reason {
                done.push((s.id, r));
            }
        }
        for (id, r) in done {
            if let Some(s) = self.take(id) {
                self.finish(s, r);
            }
        }
    }

    fn finish(&mut self, s: Seq<'a>, reason: FinishReason) {
        let mut s = self.release(s);
        let mut tail = String::new();
        if !s.stops.is_stopped() {
            let (out, stopped) = s.stops.push(&s.decoder.finish());
            tail.push_str(&out);
            if !stopped {
                tail.push_str(&s.stops.finish());
            }
        }
        let _ = s.tx.send(Event::Done(Finished {
            reason,
            prompt_tokens: s.n_prompt,
            cached_tokens: s.cached_tokens,
            imported_tokens: s.imported_tokens,
            generated: s.generated(),
            text_tail: tail,
            first_token: s.first_token.unwrap_or_default(),
            total: s.submitted.elapsed(),
            preemptions: s.preemptions,
        }));
    }

    /// Pins the cached blocks of a public (unsalted) token prefix so eviction keeps them, within the
    /// cap on pinned blocks. Returns the pin and the number of blocks it holds.
    pub fn pin_prefix(&mut self, tokens: &[u32]) -> Result<(PinId, usize), ImportError> {
        let hashes = block_hashes(
            self.cache.root(),
            tokens,
            self.layout.block_tokens,
            tokens.len(),
            None,
        );
        // The computed prefix (pending and importing blocks are not pinned).
        let present = self
            .cache
            .lookup(&hashes)
            .iter()
            .take_while(|h| h.ready && h.importing.is_none())
            .count();
        self.check_pin_cap(&hashes[..present], 0)?;
        let pinned = self.cache.pin(&self.pool, &hashes[..present]);
        let n = pinned.len();
        let id = self.next_pin;
        self.next_pin += 1;
        self.pins.insert(id, pinned);
        Ok((id, n))
    }

    fn check_pin_cap(&self, hashes: &[BlockHash], new_nodes: usize) -> Result<(), ImportError> {
        let want = self.cache.unpinned_among(hashes) + new_nodes;
        // Imports' partial last blocks are held as long as the import, like pins.
        let pinned = self.cache.pinned_nodes() + self.import_tail_blocks;
        if pinned + want > self.max_pinned {
            return Err(ImportError::PinCap {
                want,
                pinned,
                cap: self.max_pinned,
            });
        }
        Ok(())
    }

    /// Undoes a [`pin_prefix`](Self::pin_prefix).
    pub fn unpin(&mut self, pin: PinId) {
        if let Some(hs) = self.pins.remove(&pin) {
            self.cache.unpin(&self.pool, &hs);
        }
    }

    /// Starts importing the KV of the public prefix `tokens`: its full blocks enter the prefix cache as
    /// one pinned public run (blocks already cached and computed are reused), the partial last block
    /// is held by the import; layers become usable as [`import_rows`](Self::import_rows) fills them.
    /// `codec` is the codec the KV went through: a lossy one puts the blocks under that codec's root,
    /// so only requests asking for it ([`crate::Request::kv_codec`]) use them.
    pub fn import_begin(
        &mut self,
        tokens: Vec<u32>,
        codec: u8,
    ) -> Result<(ImportId, Arc<ImportProgress>), ImportError> {
        if tokens.is_empty() {
            return Err(ImportError::Empty);
        }
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.model.cfg.n_vocab)
        {
            return Err(ImportError::Token(t));
        }
        let bt = self.layout.block_tokens;
        let n = tokens.len();
        let root = self.root_for(codec);
        let hashes = block_hashes(root, &tokens, bt, n, None);
        let hits = self.cache.lookup(&hashes);
        if hits.iter().any(|h| !h.ready || h.importing.is_some()) {
            return Err(ImportError::Busy);
        }
        let tail_len = n % bt;
        let new_full = hashes.len() - hits.len();
        let need = new_full + usize::from(tail_len > 0);
        let free = self.available() - self.cache.idle_among(&hashes[..hits.len()]);
        if need > free {
            return Err(ImportError::OutOfKvMemory {
                tokens: n,
                need,
                free,
            });
        }
        self.check_pin_cap(&hashes[..hits.len()], new_full + usize::from(tail_len > 0))?;
        let id = self.next_import;
        self.next_import += 1;
        // Pin the present part first so allocation cannot evict it.
        let mut pinned = self.cache.pin(&self.pool, &hashes[..hits.len()]);
        let mut targets: Vec<Option<BlockId>> = vec![None; hits.len()];
        for i in hits.len()..hashes.len() {
            let b = self.alloc_block().expect("counted above");
            let parent = i.checked_sub(1).map(|p| hashes[p]);
            let ok = self
                .cache
                .insert(&mut self.pool, hashes[i], parent, b, true);
            debug_assert!(ok, "import nodes are new");
            // Pinned while it looks computed, then marked as filling (nothing else can pin it now).
            pinned.extend(self.cache.pin(&self.pool, &hashes[i..i + 1]));
            self.cache.set_importing(&self.pool, &hashes[i], Some(id));
            // The tree holds the block now; drop the allocation's reference.
            self.pool.release(b);
            targets.push(Some(b));
        }
        let tail = (tail_len > 0).then(|| {
            self.import_tail_blocks += 1;
            let b = self.alloc_block().expect("counted above");
            (b, tokens[n - tail_len..].to_vec())
        });
        let n_layer = self.layout.n_layer;
        let words = n.div_ceil(64);
        let mut covered = vec![vec![0u64; words]; n_layer];
        let mut counts = vec![0usize; n_layer];
        // Tokens of blocks already cached are present in every layer.
        let present_tokens = hits.len() * bt;
        for l in 0..n_layer {
            for t in 0..present_tokens {
                covered[l][t / 64] |= 1 << (t % 64);
            }
            counts[l] = present_tokens;
        }
        let progress = Arc::new(ImportProgress::default());
        let mut imp = Import {
            root,
            n_tokens: n,
            hashes,
            targets,
            pinned,
            tail,
            cached: present_tokens,
            covered,
            counts,
            ready: 0,
            progress: progress.clone(),
        };
        if imp.tail.is_some() {
            let key = imp.tail_key();
            self.import_tails.insert(key, id);
        }
        Self::advance(&mut imp);
        let done = imp.complete();
        self.imports.insert(id, imp);
        if done {
            self.finish_import(id);
        }
        Ok((id, progress))
    }

    /// Recomputes how many leading layers are complete.
    fn advance(imp: &mut Import) -> bool {
        let before = imp.ready;
        while imp.ready < imp.counts.len() && imp.counts[imp.ready] == imp.n_tokens {
            imp.ready += 1;
        }
        imp.progress.ready.store(imp.ready, Ordering::Release);
        imp.ready > before
    }

    fn finish_import(&mut self, id: ImportId) {
        let Some(imp) = self.imports.get(&id) else {
            return;
        };
        for (h, t) in imp.hashes.iter().zip(&imp.targets) {
            if t.is_some() {
                self.cache.set_importing(&self.pool, h, None);
            }
        }
        imp.progress.status.store(1, Ordering::Release);
    }

    /// Writes layer `layer`'s K and V of tokens `start..end` (little-endian bytes of the stored
    /// dtype, rows of `kv_width` values) into an import. Each token of each layer is written once.
    pub fn import_rows(
        &mut self,
        id: ImportId,
        layer: usize,
        start: usize,
        end: usize,
        k: &[u8],
        v: &[u8],
    ) -> Result<(), ImportError> {
        let bt = self.layout.block_tokens;
        let row = self.layout.kv_width() * self.layout.dtype.bytes();
        let bad = |what: &str| ImportError::Rows {
            layer,
            start,
            end,
            what: what.to_string(),
        };
        let imp = self.imports.get(&id).ok_or(ImportError::Unknown(id))?;
        if layer >= self.layout.n_layer {
            return Err(bad("no such layer"));
        }
        if start >= end || end > imp.n_tokens {
            return Err(bad(&format!(
                "outside the import's {} tokens",
                imp.n_tokens
            )));
        }
        if k.len() != (end - start) * row || v.len() != k.len() {
            return Err(bad(&format!(
                "{} + {} bytes, expected {} each",
                k.len(),
                v.len(),
                (end - start) * row
            )));
        }
        // The rows of blocks already cached (another prompt with this prefix computed or imported
        // them) are not written again: a stream carries every token, the cache had some.
        let from = start.max(imp.cached.min(end));
        if (from..end).any(|t| imp.covered[layer][t / 64] & (1 << (t % 64)) != 0) {
            return Err(bad("tokens already present"));
        }
        if from == end {
            return Ok(());
        }
        let n_full = imp.hashes.len();
        let mut t = from;
        while t < end {
            let m = (bt - t % bt).min(end - t);
            let bi = t / bt;
            let target = if bi < n_full {
                imp.targets[bi]
            } else {
                imp.tail.as_ref().map(|x| x.0)
            };
            if let Some(b) = target {
                let r = (t - start) * row..(t - start + m) * row;
                self.pool.write_raw(layer, b, t % bt, &k[r.clone()], &v[r]);
            }
            t += m;
        }
        let imp = self.imports.get_mut(&id).expect("checked above");
        for t in from..end {
            imp.covered[layer][t / 64] |= 1 << (t % 64);
        }
        imp.counts[layer] += end - from;
        let before = imp.ready;
        if Self::advance(imp) {
            let now = imp.ready;
            if self.cfg.layer_log {
                for l in before..now {
                    self.layer_log.push(LayerEvent::Arrived {
                        step: self.steps,
                        import: id,
                        layer: l,
                    });
                }
            }
            tracing::debug!(import = id, layers = now, "imported KV layers present");
            if self.imports[&id].complete() {
                self.finish_import(id);
            }
        }
        Ok(())
    }

    /// Layers complete in an import.
    pub fn import_ready_layers(&self, id: ImportId) -> Option<usize> {
        self.imports.get(&id).map(|i| i.ready)
    }

    /// Ends an import: a complete one just drops its pin (its blocks stay cached, idle once unused);
    /// an incomplete one is abandoned — its blocks leave the cache and the sequences waiting on it are
    /// preempted, to recompute the prefix themselves.
    pub fn import_release(&mut self, id: ImportId) {
        let Some(imp) = self.imports.remove(&id) else {
            return;
        };
        if let Some((b, _)) = &imp.tail {
            self.import_tail_blocks -= 1;
            let key = imp.tail_key();
            if self.import_tails.get(&key) == Some(&id) {
                self.import_tails.remove(&key);
            }
            self.cache.release(&mut self.pool, *b);
        }
        if imp.complete() {
            self.cache.unpin(&self.pool, &imp.pinned);
            return;
        }
        imp.progress.status.store(2, Ordering::Release);
        // Every sequence holding a block of this import recomputes.
        let gated: Vec<RequestId> = self
            .seqs
            .values()
            .filter(|s| s.gate == Some(id))
            .map(|s| s.id)
            .collect();
        for sid in gated {
            self.preempt(sid);
            if let Some(s) = self.seqs.get_mut(&sid) {
                s.measure = true;
            }
        }
        self.cache.unpin(&self.pool, &imp.pinned);
        for (h, t) in imp.hashes.iter().zip(&imp.targets).rev() {
            if t.is_some() {
                self.cache.remove_leaf(&mut self.pool, h);
            }
        }
        tracing::warn!(
            import = id,
            "KV import abandoned before all layers arrived; its requests recompute"
        );
    }
}

fn note_salted(
    salted: &mut HashMap<Vec<u8>, HashSet<BlockHash>>,
    len: &mut usize,
    salt: &[u8],
    h: BlockHash,
) {
    let set = match salted.get_mut(salt) {
        Some(set) => set,
        None => salted.entry(salt.to_vec()).or_default(),
    };
    if set.insert(h) {
        *len += 1;
    }
}

/// Log-softmax of `logits` (NaN as `-inf`, sums in f64) at `token`, and the `k` most likely tokens
/// (lower id first on ties).
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let clean = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let max = logits
        .iter()
        .map(|&l| clean(l))
        .fold(f32::NEG_INFINITY, f32::max);
    let lse = if max.is_finite() {
        let sum: f64 = logits
            .iter()
            .map(|&l| ((clean(l) - max) as f64).exp())
            .sum();
        max as f64 + sum.ln()
    } else {
        0.0
    };
    let lp = |t: u32| {
        logits
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |&l| (clean(l) as f64 - lse) as f32)
    };
    let k = k.min(logits.len());
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let order = |a: &u32, b: &u32| {
        clean(logits[*b as usize])
            .total_cmp(&clean(logits[*a as usize]))
            .then(a.cmp(b))
    };
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, order);
    }
    ids.truncate(k);
    ids.sort_unstable_by(order);
    TokenLogprobs {
        logprob: lp(token),
        top: ids.into_iter().map(|t| (t, lp(t))).collect(),
    }
}

fn layout_of(model: &Model, cfg: &EngineConfig) -> KvLayout {
    let sh = model.attn_shape();
    KvLayout {
        n_layer: sh.n_layer,
        n_head_kv: sh.n_head_kv,
        head_dim: sh.head_dim,
        block_tokens: cfg.block_tokens,
        dtype: cfg.kv_dtype,
    }
}

/// Appends the rows of `src` to `dst` (slices rebased).
fn append_hidden(dst: &mut Hidden, src: &Hidden) {
    let base = dst.pos.len();
    dst.x.extend_from_slice(&src.x);
    dst.pos.extend_from_slice(&src.pos);
    dst.slices.extend(src.slices.iter().map(|s| SeqSlice {
        seq: s.seq,
        rows: s.rows.start + base..s.rows.end + base,
        pos: s.pos,
    }));
}

/// Removes slice `i`'s rows from `h` and returns them as a batch of their own.
fn take_hidden(h: &mut Hidden, i: usize) -> Hidden {
    let d = h.x.len() / h.pos.len().max(1);
    let s = h.slices.remove(i);
    let n = s.rows.len();
    let x: Vec<f32> = h.x.drain(s.rows.start * d..s.rows.end * d).collect();
    let pos: Vec<usize> = h.pos.drain(s.rows.clone()).collect();
    for o in &mut h.slices[i..] {
        o.rows = o.rows.start - n..o.rows.end - n;
    }
    Hidden {
        x,
        slices: vec![SeqSlice {
            seq: s.seq,
            rows: 0..n,
            pos: s.pos,
        }],
        pos,
    }
}

pub(crate) fn validate(
    model: &Model,
    cfg: &EngineConfig,
    layout: KvLayout,
    n_blocks: usize,
    req: &Request,
) -> Result<(), InvalidRequest> {
    let n = req.prompt.len();
    let bad = InvalidRequest::new;
    if n == 0 {
        return Err(bad(
            InvalidKind::EmptyPrompt,
            "the prompt is empty (no tokens)".into(),
        ));
    }
    if n >= cfg.max_seq_len {
        return Err(bad(InvalidKind::PromptTooLong, format!(
            "the prompt has {n} tokens, more than the context of {} allows (it must leave room for one generated token)",
            cfg.max_seq_len
        )));
    }
    if let Some(&t) = req
        .prompt
        .iter()
        .find(|&&t| t as usize >= model.cfg.n_vocab)
    {
        return Err(bad(
            InvalidKind::TokenOutOfVocabulary,
            format!(
                "token id {t} is outside the vocabulary ({} tokens)",
                model.cfg.n_vocab
            ),
        ));
    }
    if req.params.max_tokens == 0 {
        return Err(bad(
            InvalidKind::MaxTokens,
            "max_tokens must be at least 1".into(),
        ));
    }
    if req.export_kv && req.kv_codec != CODEC_RAW {
        return Err(bad(
            InvalidKind::Export,
            "only exact KV (kv_codec raw) can be exported".into(),
        ));
    }
    if req.public_prefix > n {
        return Err(bad(
            InvalidKind::PublicPrefix,
            format!(
                "the public prefix ({}) is longer than the prompt ({n})",
                req.public_prefix
            ),
        ));
    }
    req.params
        .sampling
        .validate()
        .map_err(|e| bad(InvalidKind::Sampling, e.to_string()))?;
    if let Some(k) = req.params.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
        return Err(bad(
            InvalidKind::Sampling,
            format!("top logprobs must be at most {MAX_TOP_LOGPROBS}, not {k}"),
        ));
    }
    if layout.blocks_for(n + 1) > n_blocks {
        return Err(bad(
            InvalidKind::ExceedsKvBudget,
            format!(
                "the prompt has {n} tokens; the KV budget holds {} ({} blocks of {})",
                n_blocks * layout.block_tokens,
                n_blocks,
                layout.block_tokens
            ),
        ));
    }
    Ok(())
}
