//! EdgePrompt serving engine: a scheduler with continuous batching and chunked prefill over a paged KV
//! store with prefix sharing, behind an async `submit → token stream` API.
//!
//! [`Engine::start`] moves the model onto an engine thread that runs [`core::Core::step`] in a loop;
//! [`Engine::submit`] validates a request and returns a [`RequestStream`] of [`Event`]s (one per
//! generated token, with its time since submission, then a [`Finished`] with the reason). Dropping the
//! stream or calling [`Engine::cancel`] stops the request and frees its KV at the next step boundary.

pub mod attn;
pub mod core;
pub mod splice;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ep_kv::{KvDtype, KvError};
use ep_model::generate::{FinishReason, GenerateParams};
use ep_model::tokenizer::Tokenizer;
use ep_model::{Model, ModelError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub use crate::core::{Core, LayerGate};
pub use crate::splice::AttnMode;

/// Identifies a submitted request.
pub type RequestId = u64;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("engine configuration: {0}")]
    Config(String),
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Data type of stored K/V.
    pub kv_dtype: KvDtype,
    /// Token positions per KV block (a multiple of 8).
    pub block_tokens: usize,
    /// Hard limit on KV memory; the pool holds `kv_budget_bytes / block_bytes` blocks.
    pub kv_budget_bytes: usize,
    /// Longest sequence (prompt + generated) allowed.
    pub max_seq_len: usize,
    /// Tokens one forward step may process (decode tokens plus prompt chunks).
    pub max_step_tokens: usize,
    /// Sequences running at once.
    pub max_seqs: usize,
    /// Finish every pending prompt before running decode steps (the offline-batch regime the
    /// benchmarks measure); otherwise decode steps carry prompt chunks along.
    pub prefill_first: bool,
    /// How attention is computed (results are identical; cost differs).
    pub attn_mode: AttnMode,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_dtype: KvDtype::F16,
            block_tokens: 16,
            kv_budget_bytes: 1 << 30,
            max_seq_len: 8192,
            max_step_tokens: 512,
            max_seqs: 256,
            prefill_first: false,
            attn_mode: AttnMode::Splice,
        }
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt token ids (template already applied).
    pub prompt: Vec<u32>,
    /// Token limit, sampling, stop strings, EOS handling (`n_batch` is not used: the engine's step
    /// budget decides prefill chunks).
    pub params: GenerateParams,
    /// Tenant salt: every KV block holding a position at or after `public_prefix` is keyed with it,
    /// so such blocks are never shared with another tenant.
    pub salt: Option<Vec<u8>>,
    /// Leading prompt tokens that are public (a cloud prompt), shareable across tenants.
    pub public_prefix: usize,
    /// External KV arriving layer by layer: the prefill is held at a layer boundary until the gate
    /// reports that layer present.
    pub gate: Option<Arc<LayerGate>>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, params: GenerateParams) -> Self {
        Self {
            prompt,
            params,
            salt: None,
            public_prefix: 0,
            gate: None,
        }
    }
}

/// What a request's stream carries.
#[derive(Clone, Debug)]
pub enum Event {
    /// A generated token and the text that became final with it (empty while bytes of a character
    /// or a possible stop string are held back; empty for the end-of-generation token).
    Token {
        token: u32,
        text: String,
        /// Time since submission.
        elapsed: Duration,
    },
    /// The request ended.
    Done(Finished),
    /// The request failed or was cancelled; no more events follow.
    Error(String),
}

/// The end of a request.
#[derive(Clone, Debug)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    pub generated: usize,
    /// Text held back until the end (the tail of the last token's text).
    pub text_tail: String,
    /// Time to the first generated token.
    pub first_token: Duration,
    pub total: Duration,
    /// How often the request was preempted and recomputed.
    pub preemptions: usize,
}

/// What one engine step did.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStat {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub running: usize,
    pub waiting: usize,
    pub kv_used_bytes: usize,
    /// Tree nodes attended jointly in this step (splice/relay) and the keys they hold.
    pub shared_nodes: usize,
    pub shared_keys: usize,
    /// Wall time of the whole step.
    pub secs: f64,
    /// The scheduler's share of `secs`: everything but the forward passes (admission, planning, block
    /// growth, eviction and preemption, prefix-cache registration, sampling and streaming).
    pub sched_secs: f64,
}

/// Engine-wide counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    pub kv_budget_bytes: usize,
    pub kv_used_bytes: usize,
    pub cached_blocks: usize,
    pub evictions: u64,
    pub preemptions: u64,
    pub steps: u64,
}

enum Cmd {
    Submit(RequestId, Box<Request>, UnboundedSender<Event>, Instant),
    Cancel(RequestId),
    Pin(Vec<u32>, mpsc::Sender<usize>),
    Stop,
}

#[derive(Default)]
struct Shared {
    steps: Vec<StepStat>,
    stats: EngineStats,
}

/// A running engine: the model on its own thread, fed through a queue.
pub struct Engine {
    model: Arc<Model>,
    cfg: EngineConfig,
    tx: mpsc::Sender<Cmd>,
    next_id: AtomicU64,
    shared: Arc<Mutex<Shared>>,
    thread: Option<JoinHandle<()>>,
    n_blocks: usize,
    layout: ep_kv::KvLayout,
}

impl Engine {
    /// Starts the engine thread. `pool` runs the kernels (the global rayon pool when `None`).
    pub fn start(
        model: Arc<Model>,
        tok: Arc<Tokenizer>,
        cfg: EngineConfig,
        pool: Option<Arc<rayon::ThreadPool>>,
    ) -> Result<Self, EngineError> {
        if cfg.max_step_tokens == 0 || cfg.max_seqs == 0 {
            return Err(EngineError::Config(
                "max_step_tokens and max_seqs must be at least 1".into(),
            ));
        }
        let fp = model.fingerprint();
        // Build the pool here so a bad budget fails the caller, not the thread.
        let probe = Core::new(&model, &tok, cfg.clone(), &fp)?;
        let (n_blocks, layout) = (probe.pool().n_blocks(), *probe.pool().layout());
        drop(probe);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (m, t, c, sh) = (model.clone(), tok, cfg.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("ep-engine".into())
            .spawn(move || {
                let run = || engine_loop(&m, &t, c, &fp, rx, &sh);
                match pool {
                    Some(p) => p.install(run),
                    None => run(),
                }
            })
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            model,
            cfg,
            tx,
            next_id: AtomicU64::new(1),
            shared,
            thread: Some(thread),
            n_blocks,
            layout,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Validates and queues a request; its tokens arrive on the returned stream.
    pub fn submit(&self, req: Request) -> Result<RequestStream, EngineError> {
        core::validate(&self.model, &self.cfg, self.layout, self.n_blocks, &req)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = unbounded_channel();
        self.tx
            .send(Cmd::Submit(id, Box::new(req), etx, Instant::now()))
            .map_err(|_| EngineError::Stopped)?;
        Ok(RequestStream {
            id,
            rx: erx,
            cancel: self.tx.clone(),
        })
    }

    /// Stops a request; its KV is freed before the next step.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Cmd::Cancel(id));
    }

    /// Pins the cached blocks of a public token prefix (computed by an earlier request) so eviction
    /// keeps them. Returns the number of blocks pinned.
    pub fn pin_prefix(&self, tokens: Vec<u32>) -> Result<usize, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Cmd::Pin(tokens, tx))
            .map_err(|_| EngineError::Stopped)?;
        rx.recv().map_err(|_| EngineError::Stopped)
    }

    /// Removes and returns the per-step statistics gathered so far.
    pub fn take_step_stats(&self) -> Vec<StepStat> {
        std::mem::take(&mut self.shared.lock().expect("engine stats lock").steps)
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.lock().expect("engine stats lock").stats
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn engine_loop(
    model: &Model,
    tok: &Tokenizer,
    cfg: EngineConfig,
    fp: &[u8],
    rx: mpsc::Receiver<Cmd>,
    shared: &Mutex<Shared>,
) {
    let mut core = match Core::new(model, tok, cfg, fp) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("engine failed to start: {e}");
            return;
        }
    };
    let mut steps = 0u64;
    loop {
        // Take every queued command; block for one when there is nothing to run.
        let mut cmds: Vec<Cmd> = rx.try_iter().collect();
        if cmds.is_empty() && !core.has_work() {
            match rx.recv() {
                Ok(c) => cmds.push(c),
                Err(_) => return,
            }
            cmds.extend(rx.try_iter());
        }
        for c in cmds {
            match c {
                Cmd::Submit(id, req, tx, at) => {
                    if let Err(e) = core.add(id, *req, tx.clone(), at) {
                        let _ = tx.send(Event::Error(e.to_string()));
                    }
                }
                Cmd::Cancel(id) => {
                    core.cancel(id);
                }
                Cmd::Pin(tokens, reply) => {
                    let _ = reply.send(core.pin_prefix(&tokens).len());
                }
                Cmd::Stop => return,
            }
        }
        core.reap_closed();
        if let Some(st) = core.step() {
            steps += 1;
            let mut sh = shared.lock().expect("engine stats lock");
            if sh.steps.len() < 1 << 20 {
                sh.steps.push(st);
            }
            sh.stats = EngineStats {
                kv_budget_bytes: core.pool().budget_bytes(),
                kv_used_bytes: core.pool().used_bytes(),
                cached_blocks: core.cache().len(),
                evictions: core.cache().evictions(),
                preemptions: core.preemptions(),
                steps,
            };
        } else if core.has_work() {
            // Only held sequences or requests waiting on a prefix in flight: do not spin.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The events of one request. Dropping it cancels the request.
pub struct RequestStream {
    id: RequestId,
    rx: UnboundedReceiver<Event>,
    cancel: mpsc::Sender<Cmd>,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }
    /// The next event (async); `None` after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
    /// The next event, blocking the calling thread (not for use inside an async runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
    /// The next event if one is ready now.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
    /// Waits for the end and collects the result.
    pub fn collect_blocking(mut self) -> Result<Output, EngineError> {
        let mut out = Output::default();
        while let Some(e) = self.blocking_next() {
            match e {
                Event::Token { token, text, .. } => {
                    out.tokens.push(token);
                    out.text.push_str(&text);
                }
                Event::Done(f) => {
                    out.text.push_str(&f.text_tail);
                    out.finished = Some(f);
                    return Ok(out);
                }
                Event::Error(m) => return Err(EngineError::Request(m)),
            }
        }
        Err(EngineError::Stopped)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        let _ = self.cancel.send(Cmd::Cancel(self.id));
    }
}

/// A request's collected result.
#[derive(Clone, Debug, Default)]
pub struct Output {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finished: Option<Finished>,
}
