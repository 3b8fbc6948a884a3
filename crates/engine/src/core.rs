//! The scheduler: continuous batching over the block pool, one forward step at a time.
//!
//! Each [`Core::step`] (1) admits waiting requests first come, first served while their prompt blocks
//! fit (free blocks plus what prefix-cache eviction can reclaim), sharing every full prompt block the
//! prefix cache already holds; (2) picks the step's tokens under a token budget — one token for each
//! decoding sequence, then prompt chunks (chunked prefill) in arrival order; (3) grows block tables,
//! evicting cached blocks and, when memory is still short, preempting the most recently arrived
//! sequence (its blocks are freed; it re-enters the queue and is recomputed later, giving the same
//! tokens); (4) runs the forward pass layer by layer through the `paged` attention, holding a sequence
//! whose external KV for the next layer is not yet present; (5) samples, streams tokens, registers
//! newly filled blocks in the prefix cache and retires finished sequences.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ep_kv::{block_hashes, BlockHash, BlockId, BlockPool, KvLayout, PrefixCache};
use ep_model::generate::FinishReason;
use ep_model::llama::Hidden;
use ep_model::sampling::{Sampler, StopMatcher};
use ep_model::tokenizer::{StreamDecoder, Tokenizer};
use ep_model::{BatchSeq, LogitsFor, Model};
use tokio::sync::mpsc::UnboundedSender;

use crate::attn::PagedAttention;
use crate::splice::{AttnMode, SpliceArena, SpliceAttention};
use crate::{EngineConfig, EngineError, Event, Finished, Request, RequestId, StepStat};

struct Seq<'a> {
    id: RequestId,
    slot: usize,
    arrival: u64,
    req: Request,
    sampler: Sampler,
    decoder: StreamDecoder<'a>,
    stops: StopMatcher,
    tx: UnboundedSender<Event>,
    submitted: Instant,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    n_prompt: usize,
    /// Tokens whose KV is in the blocks.
    computed: usize,
    blocks: Vec<BlockId>,
    /// Hashes of full blocks known so far (prompt blocks at admission, generated ones as they fill).
    hashes: Vec<BlockHash>,
    /// Leading blocks that are in the prefix cache (matched, or inserted by this sequence).
    registered: usize,
    /// Blocks this sequence inserted before computing them: (index, hash).
    pending: Vec<(usize, BlockHash)>,
    /// Prompt tokens found in the prefix cache at (first) admission.
    cached_tokens: usize,
    preemptions: usize,
    first_token: Option<Duration>,
    /// A prefill held at a layer boundary: the activations and the next layer to run.
    held: Option<(Hidden, usize, usize)>,
}

impl Seq<'_> {
    fn generated(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }
    fn salt_for(&self, block: usize, bt: usize) -> Option<&[u8]> {
        if (block + 1) * bt > self.req.public_prefix {
            self.req.salt.as_deref()
        } else {
            None
        }
    }
}

/// A request waiting for admission (new, or preempted and to be recomputed).
struct Waiting<'a> {
    seq: Seq<'a>,
}

/// The scheduler and the KV store of one engine.
pub struct Core<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    cfg: EngineConfig,
    layout: KvLayout,
    pool: BlockPool,
    cache: PrefixCache,
    waiting: VecDeque<Waiting<'a>>,
    running: Vec<Seq<'a>>,
    /// Block tables by slot (the sequence id the forward pass sees).
    tables: Vec<Vec<BlockId>>,
    free_slots: Vec<usize>,
    arrivals: u64,
    preemptions: u64,
    arena: SpliceArena,
    /// Jointly attended nodes and keys of the last forward pass.
    last_shared: (usize, usize),
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
    pub fn new(
        model: &'a Model,
        tok: &'a Tokenizer,
        cfg: EngineConfig,
        fingerprint: &[u8],
    ) -> Result<Self, EngineError> {
        let sh = model.attn_shape();
        let layout = KvLayout {
            n_layer: sh.n_layer,
            n_head_kv: sh.n_head_kv,
            head_dim: sh.head_dim,
            block_tokens: cfg.block_tokens,
            dtype: cfg.kv_dtype,
        };
        let pool = BlockPool::new(layout, cfg.kv_budget_bytes)?;
        let mut fp = fingerprint.to_vec();
        fp.extend_from_slice(format!("/{}/{}", cfg.kv_dtype.name(), cfg.block_tokens).as_bytes());
        let cache = PrefixCache::new(BlockHash::root(&fp));
        Ok(Self {
            model,
            tok,
            cfg,
            layout,
            pool,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            tables: Vec::new(),
            free_slots: Vec::new(),
            arrivals: 0,
            preemptions: 0,
            arena: SpliceArena::default(),
            last_shared: (0, 0),
        })
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }
    pub fn cache(&self) -> &PrefixCache {
        &self.cache
    }
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }
    pub fn n_running(&self) -> usize {
        self.running.len()
    }
    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Checks a request against the model and the memory; the error says what is wrong.
    pub fn validate(&self, req: &Request) -> Result<(), EngineError> {
        validate(
            self.model,
            &self.cfg,
            self.layout,
            self.pool.n_blocks(),
            req,
        )
    }

    /// Queues a request. Its events go to `tx`.
    pub fn add(
        &mut self,
        id: RequestId,
        req: Request,
        tx: UnboundedSender<Event>,
        submitted: Instant,
    ) -> Result<(), EngineError> {
        self.validate(&req)?;
        let sampler = Sampler::new(req.params.sampling.clone())
            .map_err(|e| EngineError::Request(e.to_string()))?;
        self.arrivals += 1;
        let seq = Seq {
            id,
            slot: usize::MAX,
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
            hashes: Vec::new(),
            registered: 0,
            pending: Vec::new(),
            cached_tokens: 0,
            preemptions: 0,
            first_token: None,
            held: None,
            req,
        };
        self.waiting.push_back(Waiting { seq });
        Ok(())
    }

    /// Stops a request now and frees its memory. Returns whether it was known.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|w| w.seq.id == id) {
            let w = self.waiting.remove(i).expect("index from position");
            let _ = w.seq.tx.send(Event::Error("cancelled".into()));
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.swap_remove(i);
            let _ = s.tx.send(Event::Error("cancelled".into()));
            self.release(s);
            return true;
        }
        false
    }

    /// Cancels every request whose stream was dropped.
    pub fn reap_closed(&mut self) {
        let closed: Vec<RequestId> = self
            .running
            .iter()
            .map(|s| (s.id, s.tx.is_closed()))
            .chain(
                self.waiting
                    .iter()
                    .map(|w| (w.seq.id, w.seq.tx.is_closed())),
            )
            .filter(|(_, c)| *c)
            .map(|(id, _)| id)
            .collect();
        for id in closed {
            self.cancel(id);
        }
    }

    /// Frees a sequence's blocks and slot (blocks registered and computed stay cached).
    fn release(&mut self, mut s: Seq<'a>) -> Seq<'a> {
        for &(i, h) in s.pending.iter().rev() {
            self.cache.remove_pending(&mut self.pool, &h, s.blocks[i]);
        }
        s.pending.clear();
        for &b in &s.blocks {
            self.pool.release(b);
        }
        s.blocks.clear();
        s.registered = 0;
        s.computed = 0;
        s.held = None;
        if s.slot != usize::MAX {
            self.tables[s.slot].clear();
            self.free_slots.push(s.slot);
            s.slot = usize::MAX;
        }
        s
    }

    fn take_slot(&mut self) -> usize {
        self.free_slots.pop().unwrap_or_else(|| {
            self.tables.push(Vec::new());
            self.tables.len() - 1
        })
    }

    /// Takes a free block, evicting cached blocks if needed.
    fn alloc_block(&mut self) -> Option<BlockId> {
        if let Some(b) = self.pool.alloc() {
            return Some(b);
        }
        if self.cache.evict(&mut self.pool, 1) > 0 {
            return self.pool.alloc();
        }
        None
    }

    /// Admits waiting requests in arrival order while memory allows.
    fn admit(&mut self) {
        let bt = self.layout.block_tokens;
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.cfg.max_seqs {
            let s = &self.waiting[i].seq;
            let hashes = block_hashes(
                self.cache.root(),
                &s.tokens,
                bt,
                s.req.public_prefix,
                s.req.salt.as_deref(),
            );
            // Never match the whole sequence: the last token is recomputed for its logits.
            let usable = (s.tokens.len() - 1) / bt;
            let hits = self.cache.peek(&hashes[..usable.min(hashes.len())]);
            if hits.iter().any(|h| !h.ready) {
                // Another sequence is computing this prefix now: wait for it rather than compute it
                // twice; later requests may pass meanwhile (this one is admitted once it is ready).
                i += 1;
                continue;
            }
            let reused_reclaimable = hashes[..hits.len()]
                .iter()
                .filter(|h| self.cache.is_reclaimable(&self.pool, h))
                .count();
            let need = self.layout.blocks_for(s.tokens.len() + 1) - hits.len();
            let avail =
                self.pool.n_free() + self.cache.reclaimable(&self.pool) - reused_reclaimable;
            if need > avail {
                // First come, first served: nothing behind a request that does not fit may pass it.
                break;
            }
            let mut s = self.waiting.remove(i).expect("index in range").seq;
            let hits = self.cache.lookup(&hashes[..hits.len()]);
            for h in &hits {
                self.pool.retain(h.block);
            }
            s.blocks = hits.iter().map(|h| h.block).collect();
            s.registered = hits.len();
            s.computed = hits.len() * bt;
            if s.preemptions == 0 {
                s.cached_tokens = s.computed;
            }
            s.hashes = hashes;
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
                self.waiting.insert(i, Waiting { seq: s });
                break;
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
                s.registered += 1;
            }
            s.slot = self.take_slot();
            self.running.push(s);
        }
    }

    /// Frees running sequence `i` and queues it for recomputation (arrival order kept).
    fn preempt(&mut self, i: usize) {
        let s = self.running.remove(i);
        let mut s = self.release(s);
        s.preemptions += 1;
        self.preemptions += 1;
        tracing::debug!(request = s.id, "preempted (KV memory full); will recompute");
        let at = self
            .waiting
            .iter()
            .position(|w| w.seq.arrival > s.arrival)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, Waiting { seq: s });
    }

    /// Makes sure sequence `id` has blocks for `upto` positions, evicting cached blocks and then
    /// preempting the most recently arrived sequence (which may be `id` itself).
    fn grow(&mut self, id: RequestId, upto: usize) -> Grow {
        loop {
            let Some(i) = self.running.iter().position(|s| s.id == id) else {
                return Grow::Preempted;
            };
            if self.running[i].blocks.len() >= self.layout.blocks_for(upto) {
                return Grow::Ready;
            }
            if let Some(b) = self.alloc_block() {
                self.running[i].blocks.push(b);
                continue;
            }
            let newest = (0..self.running.len())
                .max_by_key(|&j| self.running[j].arrival)
                .expect("sequence i is running");
            if newest == i && self.running.len() == 1 {
                return Grow::Alone;
            }
            self.preempt(newest);
        }
    }

    fn index_of(&self, id: RequestId) -> Option<usize> {
        self.running.iter().position(|s| s.id == id)
    }

    /// Runs one scheduling step and forward pass. Returns `None` when there was nothing to do.
    pub fn step(&mut self) -> Option<StepStat> {
        let t0 = Instant::now();
        self.last_shared = (0, 0);
        self.admit();
        if self.running.is_empty() {
            return None;
        }
        // Decode sequences first, then prompt chunks, under the token budget.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| {
            let s = &self.running[i];
            (s.tokens.len() - s.computed > 1, s.arrival)
        });
        let any_prefill = self
            .running
            .iter()
            .any(|s| s.held.is_none() && s.tokens.len() - s.computed > 1);
        let mut budget = self.cfg.max_step_tokens;
        let mut plan: Vec<(RequestId, usize)> = Vec::new();
        for i in order {
            let s = &self.running[i];
            if s.held.is_some() {
                continue;
            }
            let want = s.tokens.len() - s.computed;
            if want == 1 && any_prefill && self.cfg.prefill_first {
                continue;
            }
            let n = want.min(budget);
            if n == 0 {
                break;
            }
            budget -= n;
            plan.push((s.id, n));
        }
        // Blocks for every planned token (may preempt sequences, planned ones included).
        for &(id, n) in &plan {
            let Some(i) = self.index_of(id) else { continue };
            let upto = self.running[i].computed + n;
            if let Grow::Alone = self.grow(id, upto) {
                // The only sequence and still out of memory: it can never grow, so it ends here.
                let i = self.index_of(id).expect("a lone sequence is not preempted");
                let s = self.running.swap_remove(i);
                tracing::warn!(
                    request = id,
                    "KV memory full with a single sequence; stopping it"
                );
                self.finish(s, FinishReason::Length);
            }
        }
        let planned: Vec<Planned> = plan
            .into_iter()
            .filter_map(|(id, n)| {
                let s = &self.running[self.index_of(id)?];
                Some(Planned {
                    id,
                    start: s.computed,
                    n,
                })
            })
            .collect();
        for s in &self.running {
            self.tables[s.slot].clone_from(&s.blocks);
        }
        let (mut prefill_tokens, mut decode_tokens) = (0, 0);
        let mut gated = Vec::new();
        let mut plain = Vec::new();
        for p in planned {
            if p.n > 1 {
                prefill_tokens += p.n;
            } else {
                decode_tokens += 1;
            }
            let i = self.index_of(p.id).expect("planned sequences are running");
            if self.running[i].req.gate.is_some() {
                gated.push(p);
            } else {
                plain.push(p);
            }
        }
        let mut logits_rows: Vec<(RequestId, Vec<f32>)> = Vec::new();
        // Time in the forward passes, so the step can report the scheduler's own time.
        let t_fwd = Instant::now();
        if !plain.is_empty() {
            match self.forward(&plain) {
                Ok(l) => logits_rows.extend(l),
                Err(e) => {
                    let ids: Vec<RequestId> = plain.iter().map(|p| p.id).collect();
                    self.fail(&ids, &e.to_string());
                }
            }
        }
        // Gated sequences run alone, layer by layer, as far as their external KV allows; held ones
        // resume where they stopped.
        for p in gated {
            match self.forward_gated(&p) {
                Ok(l) => logits_rows.extend(l),
                Err(e) => self.fail(&[p.id], &e.to_string()),
            }
        }
        let held: Vec<RequestId> = self
            .running
            .iter()
            .filter(|s| s.held.is_some())
            .map(|s| s.id)
            .collect();
        for id in held {
            match self.resume_held(id) {
                Ok(l) => logits_rows.extend(l),
                Err(e) => self.fail(&[id], &e.to_string()),
            }
        }
        let fwd = t_fwd.elapsed();
        self.register_blocks();
        self.sample_and_emit(logits_rows);
        Some(self.stat(t0, fwd, prefill_tokens, decode_tokens))
    }

    fn stat(
        &self,
        t0: Instant,
        fwd: Duration,
        prefill_tokens: usize,
        decode_tokens: usize,
    ) -> StepStat {
        let secs = t0.elapsed().as_secs_f64();
        StepStat {
            prefill_tokens,
            decode_tokens,
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_used_bytes: self.pool.used_bytes(),
            shared_nodes: self.last_shared.0,
            shared_keys: self.last_shared.1,
            secs,
            sched_secs: (secs - fwd.as_secs_f64()).max(0.0),
        }
    }

    fn fail(&mut self, ids: &[RequestId], msg: &str) {
        for &id in ids {
            if let Some(i) = self.index_of(id) {
                let s = self.running.swap_remove(i);
                let _ = s.tx.send(Event::Error(msg.to_string()));
                self.release(s);
            }
        }
    }

    fn batch_of<'s>(running: &'s [Seq<'a>], plan: &[Planned]) -> Vec<BatchSeq<'s>> {
        plan.iter()
            .map(|p| {
                let s = running
                    .iter()
                    .find(|s| s.id == p.id)
                    .expect("planned sequences are running");
                BatchSeq {
                    seq: s.slot,
                    tokens: &s.tokens[p.start..p.start + p.n],
                    pos: p.start,
                    logits: if p.start + p.n == s.tokens.len() {
                        LogitsFor::Last
                    } else {
                        LogitsFor::None
                    },
                }
            })
            .collect()
    }

    /// One forward pass over the planned rows; returns the logits of the rows that sample.
    fn forward(&mut self, plan: &[Planned]) -> Result<Vec<(RequestId, Vec<f32>)>, EngineError> {
        let model = self.model;
        let batch = Self::batch_of(&self.running, plan);
        let logits = match self.cfg.attn_mode {
            AttnMode::Paged => {
                let mut attn = PagedAttention {
                    shape: model.attn_shape(),
                    pool: &mut self.pool,
                    tables: &self.tables,
                };
                model.forward(&batch, &mut attn)?
            }
            mode => {
                let mut attn = SpliceAttention {
                    mode,
                    shape: model.attn_shape(),
                    pool: &mut self.pool,
                    tables: &self.tables,
                    arena: &mut self.arena,
                    plan: None,
                };
                let l = model.forward(&batch, &mut attn)?;
                if let Some(p) = &attn.plan {
                    self.last_shared = (p.shared_nodes, p.shared_keys);
                }
                l
            }
        };
        let nv = model.cfg.n_vocab;
        let mut out = Vec::new();
        let mut row = 0;
        for p in plan {
            let i = self.index_of(p.id).expect("planned sequences are running");
            let s = &mut self.running[i];
            s.computed = p.start + p.n;
            if s.computed == s.tokens.len() {
                out.push((p.id, logits[row * nv..(row + 1) * nv].to_vec()));
                row += 1;
            }
        }
        Ok(out)
    }

    fn forward_gated(&mut self, p: &Planned) -> Result<Option<(RequestId, Vec<f32>)>, EngineError> {
        let h = self
            .model
            .embed(&Self::batch_of(&self.running, std::slice::from_ref(p)))?;
        let i = self.index_of(p.id).expect("planned sequences are running");
        self.running[i].held = Some((h, 0, p.n));
        self.resume_held(p.id)
    }

    /// Runs a held prefill through the layers its gate has made available.
    fn resume_held(&mut self, id: RequestId) -> Result<Option<(RequestId, Vec<f32>)>, EngineError> {
        let model = self.model;
        let n_layer = model.cfg.n_layer;
        let Some(i) = self.index_of(id) else {
            return Ok(None);
        };
        let ready = self.running[i]
            .req
            .gate
            .as_ref()
            .map_or(n_layer, |g| g.ready_layers());
        let Some((mut h, mut next, n)) = self.running[i].held.take() else {
            return Ok(None);
        };
        {
            let mut attn = PagedAttention {
                shape: model.attn_shape(),
                pool: &mut self.pool,
                tables: &self.tables,
            };
            while next < n_layer && next < ready {
                model.layer(next, &mut h, &mut attn)?;
                next += 1;
            }
        }
        if next < n_layer {
            self.running[i].held = Some((h, next, n));
            return Ok(None);
        }
        let s = &mut self.running[i];
        s.computed += n;
        if s.computed == s.tokens.len() {
            let last = h.pos.len() - 1;
            let l = model.logits(&h, &[last])?;
            return Ok(Some((id, l)));
        }
        Ok(None)
    }

    /// Inserts newly filled blocks into the prefix cache and marks computed pending ones ready.
    fn register_blocks(&mut self) {
        let bt = self.layout.block_tokens;
        let root = self.cache.root();
        for s in &mut self.running {
            let full = s.computed / bt;
            // Pending blocks now computed.
            s.pending.retain(|&(idx, h)| {
                if idx < full {
                    self.cache.mark_ready(&h);
                    false
                } else {
                    true
                }
            });
            while s.hashes.len() < full {
                let idx = s.hashes.len();
                let prev = idx.checked_sub(1).map_or(root, |p| s.hashes[p]);
                let salt = s.salt_for(idx, bt);
                let h = prev.chain(&s.tokens[idx * bt..(idx + 1) * bt], salt);
                s.hashes.push(h);
            }
            while s.registered < full {
                let idx = s.registered;
                let parent = idx.checked_sub(1).map(|p| s.hashes[p]);
                if !self
                    .cache
                    .insert(&mut self.pool, s.hashes[idx], parent, s.blocks[idx], true)
                {
                    break;
                }
                s.registered += 1;
            }
        }
    }

    fn sample_and_emit(&mut self, rows: Vec<(RequestId, Vec<f32>)>) {
        let mut done: Vec<(RequestId, FinishReason)> = Vec::new();
        for (id, logits) in rows {
            let Some(i) = self.index_of(id) else { continue };
            let max_len = self.cfg.max_seq_len;
            let tok = self.tok;
            let s = &mut self.running[i];
            let next = s.sampler.sample(&logits, &s.tokens);
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
            if let Some(i) = self.running.iter().position(|s| s.id == id) {
                let s = self.running.swap_remove(i);
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
            generated: s.generated(),
            text_tail: tail,
            first_token: s.first_token.unwrap_or_default(),
            total: s.submitted.elapsed(),
            preemptions: s.preemptions,
        }));
    }

    /// Pins the cached blocks of a public (unsalted) token prefix so eviction keeps them; returns the
    /// hashes pinned (for [`PrefixCache::unpin`]).
    pub fn pin_prefix(&mut self, tokens: &[u32]) -> Vec<BlockHash> {
        let hashes = block_hashes(
            self.cache.root(),
            tokens,
            self.layout.block_tokens,
            tokens.len(),
            None,
        );
        let present = self.cache.peek(&hashes).len();
        self.cache.pin(&hashes[..present])
    }

    /// Undoes a [`pin_prefix`](Self::pin_prefix).
    pub fn unpin(&mut self, pinned: &[BlockHash]) {
        self.cache.unpin(pinned);
    }
}

pub(crate) fn validate(
    model: &Model,
    cfg: &EngineConfig,
    layout: KvLayout,
    n_blocks: usize,
    req: &Request,
) -> Result<(), EngineError> {
    let n = req.prompt.len();
    if n == 0 {
        return Err(EngineError::Request(
            "the prompt is empty (no tokens)".into(),
        ));
    }
    if n >= cfg.max_seq_len {
        return Err(EngineError::Request(format!(
            "the prompt has {n} tokens, more than the context of {} allows (it must leave room for one generated token)",
            cfg.max_seq_len
        )));
    }
    if let Some(&t) = req
        .prompt
        .iter()
        .find(|&&t| t as usize >= model.cfg.n_vocab)
    {
        return Err(EngineError::Request(format!(
            "token id {t} is outside the vocabulary ({} tokens)",
            model.cfg.n_vocab
        )));
    }
    if req.params.max_tokens == 0 {
        return Err(EngineError::Request("max_tokens must be at least 1".into()));
    }
    req.params
        .sampling
        .validate()
        .map_err(|e| EngineError::Request(e.to_string()))?;
    if layout.blocks_for(n + 1) > n_blocks {
        return Err(EngineError::Request(format!(
            "the prompt has {n} tokens; the KV budget holds {} ({} blocks of {})",
            n_blocks * layout.block_tokens,
            n_blocks,
            layout.block_tokens
        )));
    }
    Ok(())
}

/// A gate over a sequence's external KV: layers `0..ready_layers()` are present.
#[derive(Debug, Default)]
pub struct LayerGate {
    ready: std::sync::atomic::AtomicUsize,
}

impl LayerGate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn ready_layers(&self) -> usize {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }
    /// Declares layers `0..n` present.
    pub fn set_ready(&self, n: usize) {
        self.ready.fetch_max(n, std::sync::atomic::Ordering::AcqRel);
    }
}
