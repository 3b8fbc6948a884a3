//! EdgePrompt serving engine: a scheduler with continuous batching and chunked prefill over a paged KV
//! store with prefix sharing, behind an async `submit → token stream` API.
//!
//! [`Engine::start`] moves the model onto an engine thread that runs [`core::Core::step`] in a loop;
//! [`Engine::submit`] validates a request and returns a [`RequestStream`] of [`Event`]s (one per
//! generated token, with its time since submission, then a [`Finished`] with the reason). Dropping the
//! stream or calling [`Engine::cancel`] stops the request and frees its KV at the next step boundary.

pub mod attn;
pub mod core;
pub mod kvio;
pub mod splice;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ep_kv::identity::{ContentIdentity, CODEC_RAW};
use ep_kv::{BlockHash, KvDtype, KvError, KvLayout};
use ep_model::generate::{FinishReason, GenerateParams};
use ep_model::tokenizer::Tokenizer;
use ep_model::{Model, ModelError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

pub use crate::core::{
    Core, ImportError, ImportId, ImportProgress, ImportStatus, LayerEvent, PinId, State,
};
pub use crate::splice::AttnMode;

/// Identifies a submitted request.
pub type RequestId = u64;

/// What kind of request was refused (an HTTP layer maps each to a status code without parsing text).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvalidKind {
    EmptyPrompt,
    PromptTooLong,
    TokenOutOfVocabulary,
    MaxTokens,
    Sampling,
    PublicPrefix,
    /// `export_kv` on a request whose KV is not exact.
    Export,
    /// The prompt alone needs more KV than the whole budget.
    ExceedsKvBudget,
}

/// A refused request: its kind and a message naming the value at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    pub kind: InvalidKind,
    pub message: String,
}

impl InvalidRequest {
    pub fn new(kind: InvalidKind, message: String) -> Self {
        Self { kind, message }
    }
}

/// Why a request ended without finishing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Cancelled by its caller (or its stream was dropped).
    #[error("cancelled")]
    Cancelled,
    /// The sequence grew beyond what the KV memory can hold even with nothing else running.
    #[error(
        "out of KV memory: the sequence reached {tokens} tokens; the KV budget holds {capacity}"
    )]
    OutOfKvMemory { tokens: usize, capacity: usize },
    /// Refused at submission.
    #[error("invalid request: {0}")]
    Invalid(InvalidRequest),
    /// A fault inside the engine (a bug or a model error).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidRequest),
    #[error(transparent)]
    Failed(#[from] Failure),
    #[error(transparent)]
    Import(#[from] ImportError),
    /// External KV that this engine must not use (another model or layout, bad hashes or frames).
    #[error("KV refused: {0}")]
    KvRefused(String),
    #[error(transparent)]
    Wire(#[from] ep_kv::wire::WireError),
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
    /// The share of the pool's blocks that pins and imports may hold (so pins cannot starve requests).
    pub max_pinned_share: f64,
    /// Record which requests ran each layer of each step, and when imported layers arrived
    /// ([`Engine::take_layer_log`]).
    pub layer_log: bool,
    /// Keep every step's [`StepStat`] for [`Engine::take_step_stats`] (up to 2^20 of them, ~100
    /// MB); a long-running server that never takes them turns this off — its [`EngineStats`]
    /// totals are kept either way.
    pub step_log: bool,
    /// Events a request's reader may leave untaken before the request stops decoding (it keeps its
    /// KV and resumes when the reader catches up): a client that stops reading costs no compute and
    /// holds a bounded backlog. 0: never pause.
    pub max_unread_events: usize,
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
            max_pinned_share: 0.5,
            layer_log: false,
            step_log: true,
            max_unread_events: 256,
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
    /// Send the prompt's KV ([`Event::Kv`]) once it is computed, before the first token.
    pub export_kv: bool,
    /// The KV this request may reuse: exact KV (`CODEC_RAW`, the default), or KV imported through a
    /// lossy codec (and everything computed over it) under that codec's cache root — never mixed.
    pub kv_codec: u8,
}

impl Request {
    pub fn new(prompt: Vec<u32>, params: GenerateParams) -> Self {
        Self {
            prompt,
            params,
            salt: None,
            public_prefix: 0,
            export_kv: false,
            kv_codec: CODEC_RAW,
        }
    }
}

/// The KV of a computed prompt in the pool's stored dtype: per layer, K rows then V rows of every
/// prompt position (`kv_width` values each, little-endian).
#[derive(Clone, Debug)]
pub struct PromptKv {
    pub tokens: Vec<u32>,
    pub layout: KvLayout,
    /// Chained hashes of the full blocks (public, unsalted) under the engine's cache root.
    pub block_hashes: Vec<ep_kv::BlockHash>,
    pub layers: Vec<(Vec<u8>, Vec<u8>)>,
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
        /// The token's log-probability and the top alternatives, when the request asked for them
        /// ([`GenerateParams::logprobs`]).
        logprobs: Option<Box<TokenLogprobs>>,
    },
    /// The prompt's KV, for a request with [`Request::export_kv`].
    Kv(Box<PromptKv>),
    /// The request ended.
    Done(Finished),
    /// The request failed or was cancelled; no more events follow.
    Error(Failure),
}

/// Log-probabilities of a generated token under the model (log-softmax of the raw logits, before
/// penalties, filters and temperature).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// The sampled token's log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (lower id first on
    /// ties); as many as the request asked for.
    pub top: Vec<(u32, f32)>,
}

/// Most top log-probabilities a request may ask for per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The end of a request.
#[derive(Clone, Debug)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (imported or computed earlier).
    pub cached_tokens: usize,
    /// Of those, tokens whose KV came from an import.
    pub imported_tokens: usize,
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
    /// `Model::layer` calls in the step (one per layer for the whole batch; 0 when nothing ran).
    pub layer_calls: usize,
    /// Of the forward pass: its weight products (the layers' and the logits') and its attention calls
    /// (KV writes and kernels); the rest of `secs − sched_secs` is norms, RoPE, SwiGLU, embedding.
    pub weights_secs: f64,
    pub attention_secs: f64,
    pub secs: f64,
    /// The scheduler's own share of `secs` (everything but the forward pass).
    pub sched_secs: f64,
}

/// Steps of one kind summed since the engine started (see [`EngineStats::decode_steps`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTotals {
    pub steps: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub secs: f64,
    pub sched_secs: f64,
    pub weights_secs: f64,
    pub attention_secs: f64,
}

impl StepTotals {
    /// Adds one step.
    pub fn add(&mut self, st: &StepStat) {
        self.steps += 1;
        self.prefill_tokens += st.prefill_tokens as u64;
        self.decode_tokens += st.decode_tokens as u64;
        self.secs += st.secs;
        self.sched_secs += st.sched_secs;
        self.weights_secs += st.weights_secs;
        self.attention_secs += st.attention_secs;
    }
}

/// Engine-wide counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    /// Steps that ran only decode rows, and steps with prompt rows (with or without decode rows):
    /// what a step costs, where its time goes, and what the prompt chunks add to the decode steps.
    pub decode_steps: StepTotals,
    pub prefill_steps: StepTotals,
    pub kv_budget_bytes: usize,
    pub kv_used_bytes: usize,
    pub cached_blocks: usize,
    pub evictions: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Requests admitted and running, and queued for admission, as of the last loop iteration.
    pub running: usize,
    pub waiting: usize,
}

type Reply<T> = oneshot::Sender<Result<T, ImportError>>;

enum Cmd {
    Submit(RequestId, Box<Request>, Events, Instant),
    Cancel(RequestId),
    Pin(Vec<u32>, Reply<(PinId, usize)>),
    Unpin(PinId),
    ImportBegin(Vec<u32>, u8, Reply<(ImportId, Arc<ImportProgress>)>),
    ImportRows(Box<ImportRows>),
    ImportRelease(ImportId),
    TakeLayerLog(oneshot::Sender<Vec<LayerEvent>>),
    PurgeSalt(Vec<u8>, oneshot::Sender<usize>),
    Stop,
}

struct ImportRows {
    id: ImportId,
    layer: usize,
    start: usize,
    end: usize,
    k: Vec<u8>,
    v: Vec<u8>,
    error: Arc<Mutex<Option<ImportError>>>,
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
    layout: KvLayout,
    root: BlockHash,
    identity: ContentIdentity,
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
        let identity = ContentIdentity::of(&model, &tok);
        let root = identity.cache_root(cfg.kv_dtype, cfg.block_tokens, CODEC_RAW);
        // Build the pool here so a bad budget fails the caller, not the thread.
        let probe = Core::new(&model, &tok, cfg.clone(), identity.digest())?;
        let (n_blocks, layout) = (probe.pool().n_blocks(), *probe.pool().layout());
        drop(probe);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (m, t, c, sh) = (model.clone(), tok, cfg.clone(), shared.clone());
        let digest = identity.digest();
        let thread = std::thread::Builder::new()
            .name("ep-engine".into())
            .spawn(move || {
                let run = || engine_loop(&m, &t, c, digest, rx, &sh);
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
            root,
            identity,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    /// The model's shape.
    pub fn model_config(&self) -> &ep_model::ModelConfig {
        &self.model.cfg
    }
    /// The KV layout of the pool.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    /// The root of the prefix cache's block hashes.
    pub fn cache_root(&self) -> BlockHash {
        self.root
    }
    /// The content identity of the model (what KV it computes).
    pub fn identity(&self) -> &ContentIdentity {
        &self.identity
    }

    /// Validates and queues a request; its tokens arrive on the returned stream.
    pub fn submit(&self, req: Request) -> Result<RequestStream, EngineError> {
        core::validate(&self.model, &self.cfg, self.layout, self.n_blocks, &req)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = unbounded_channel();
        let unread = Arc::new(AtomicUsize::new(0));
        let events = Events {
            tx: etx,
            unread: Some(unread.clone()),
        };
        self.tx
            .send(Cmd::Submit(id, Box::new(req), events, Instant::now()))
            .map_err(|_| EngineError::Stopped)?;
        Ok(RequestStream {
            id,
            rx: erx,
            unread,
            cancel: self.tx.clone(),
        })
    }

    /// Stops a request; its KV is freed before the next step.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Cmd::Cancel(id));
    }

    fn ask<T>(
        &self,
        cmd: impl FnOnce(Reply<T>) -> Cmd,
    ) -> Result<oneshot::Receiver<Result<T, ImportError>>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(cmd(tx)).map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    fn pin_handle(&self, r: (PinId, usize)) -> PinHandle {
        PinHandle {
            id: r.0,
            blocks: r.1,
            tx: self.tx.clone(),
        }
    }

    /// Pins the cached blocks of a public token prefix (computed or imported earlier) so eviction
    /// keeps them, until the returned handle is dropped. Pinned blocks have a cap of their own
    /// ([`EngineConfig::max_pinned_share`]).
    pub async fn pin_prefix(&self, tokens: Vec<u32>) -> Result<PinHandle, EngineError> {
        let rx = self.ask(|r| Cmd::Pin(tokens, r))?;
        let r = rx.await.map_err(|_| EngineError::Stopped)??;
        Ok(self.pin_handle(r))
    }

    /// [`pin_prefix`](Self::pin_prefix) for callers outside an async runtime.
    pub fn pin_prefix_blocking(&self, tokens: Vec<u32>) -> Result<PinHandle, EngineError> {
        let rx = self.ask(|r| Cmd::Pin(tokens, r))?;
        let r = rx.blocking_recv().map_err(|_| EngineError::Stopped)??;
        Ok(self.pin_handle(r))
    }

    fn import_handle(
        &self,
        r: (ImportId, Arc<ImportProgress>),
        tokens: Vec<u32>,
        codec: u8,
    ) -> KvImport {
        KvImport {
            codec,
            id: r.0,
            progress: r.1,
            tokens,
            layout: self.layout,
            tx: self.tx.clone(),
            error: Arc::new(Mutex::new(None)),
            header: None,
        }
    }

    /// Starts importing the KV of the public prefix `tokens` (computed by another process for this
    /// model and layout; see `ep_kv::identity`): write its layers with [`KvImport::write_rows`].
    /// Requests whose prompt extends the prefix may be submitted at once: they run each layer as
    /// soon as it is present. The imported blocks stay pinned until the handle is dropped (an
    /// incomplete import is then abandoned and its requests recompute).
    pub async fn import(&self, tokens: Vec<u32>) -> Result<KvImport, EngineError> {
        self.import_codec(tokens, CODEC_RAW).await
    }

    /// [`import`](Self::import) of KV that went through `codec` (a lossy one is kept under that
    /// codec's cache root: only requests with [`Request::kv_codec`] = `codec` use it).
    pub async fn import_codec(&self, tokens: Vec<u32>, codec: u8) -> Result<KvImport, EngineError> {
        let rx = self.ask(|r| Cmd::ImportBegin(tokens.clone(), codec, r))?;
        let r = rx.await.map_err(|_| EngineError::Stopped)??;
        Ok(self.import_handle(r, tokens, codec))
    }

    /// [`import`](Self::import) for callers outside an async runtime.
    pub fn import_blocking(&self, tokens: Vec<u32>) -> Result<KvImport, EngineError> {
        self.import_codec_blocking(tokens, CODEC_RAW)
    }

    /// [`import_codec`](Self::import_codec) for callers outside an async runtime.
    pub fn import_codec_blocking(
        &self,
        tokens: Vec<u32>,
        codec: u8,
    ) -> Result<KvImport, EngineError> {
        let rx = self.ask(|r| Cmd::ImportBegin(tokens.clone(), codec, r))?;
        let r = rx.blocking_recv().map_err(|_| EngineError::Stopped)??;
        Ok(self.import_handle(r, tokens, codec))
    }

    /// Computes a prompt (through the prefix cache) and returns its KV in the stored dtype.
    pub fn export_blocking(&self, tokens: Vec<u32>) -> Result<PromptKv, EngineError> {
        let params = GenerateParams {
            max_tokens: 1,
            ignore_eos: true,
            ..GenerateParams::default()
        };
        let mut req = Request::new(tokens, params);
        req.export_kv = true;
        req.public_prefix = req.prompt.len();
        let mut st = self.submit(req)?;
        let mut kv = None;
        while let Some(e) = st.blocking_next() {
            match e {
                Event::Kv(k) => kv = Some(*k),
                Event::Error(f) => return Err(EngineError::Failed(f)),
                Event::Done(_) => break,
                Event::Token { .. } => {}
            }
        }
        kv.ok_or(EngineError::Stopped)
    }

    /// Drops the idle cached KV blocks keyed with tenant salt `salt` (a tenant's private KV: every
    /// block past a request's public prefix), freeing their memory; returns how many were freed.
    /// Blocks that running requests still hold stay until those end (purge again then).
    pub async fn purge_salt(&self, salt: Vec<u8>) -> Result<usize, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::PurgeSalt(salt, tx))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// [`purge_salt`](Self::purge_salt) for callers outside an async runtime.
    pub fn purge_salt_blocking(&self, salt: Vec<u8>) -> Result<usize, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::PurgeSalt(salt, tx))
            .map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)
    }

    /// Removes and returns the per-layer log (see [`EngineConfig::layer_log`]).
    pub fn take_layer_log_blocking(&self) -> Vec<LayerEvent> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::TakeLayerLog(tx)).is_err() {
            return Vec::new();
        }
        rx.blocking_recv().unwrap_or_default()
    }

    /// Removes and returns the per-step statistics gathered so far.
    pub fn take_step_stats(&self) -> Vec<StepStat> {
        std::mem::take(&mut self.shared.lock().expect("engine stats lock").steps)
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.lock().expect("engine stats lock").stats
    }
}

/// A pin of a cached prefix; dropping it unpins.
#[derive(Debug)]
pub struct PinHandle {
    id: PinId,
    blocks: usize,
    tx: mpsc::Sender<Cmd>,
}

impl PinHandle {
    /// Blocks it holds pinned.
    pub fn blocks(&self) -> usize {
        self.blocks
    }
}

impl Drop for PinHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Unpin(self.id));
    }
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

/// An import of external KV in progress (or complete, holding its blocks pinned).
pub struct KvImport {
    id: ImportId,
    /// The codec its KV went through (`CODEC_RAW`: exact).
    codec: u8,
    progress: Arc<ImportProgress>,
    tokens: Vec<u32>,
    layout: KvLayout,
    tx: mpsc::Sender<Cmd>,
    error: Arc<Mutex<Option<ImportError>>>,
    /// The stream header this import was started from, if any (frames are checked against it).
    header: Option<ep_kv::wire::KvHeader>,
}

impl KvImport {
    /// The codec its KV went through.
    pub fn codec(&self) -> u8 {
        self.codec
    }
    /// The prefix being imported.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Layers present for every token.
    pub fn ready_layers(&self) -> usize {
        self.progress.ready_layers()
    }
    pub fn status(&self) -> ImportStatus {
        self.progress.status()
    }
    /// The first error the engine found in written rows (the import is then abandoned).
    pub fn error(&self) -> Option<ImportError> {
        self.error.lock().expect("import error lock").clone()
    }

    /// Queues layer `layer`'s K and V rows of tokens `start..end` (little-endian bytes of the stored
    /// dtype). Shapes are checked here; the engine writes them between steps.
    pub fn write_rows(
        &self,
        layer: usize,
        start: usize,
        end: usize,
        k: Vec<u8>,
        v: Vec<u8>,
    ) -> Result<(), EngineError> {
        let row = self.layout.kv_width() * self.layout.dtype.bytes();
        if layer >= self.layout.n_layer
            || start >= end
            || end > self.tokens.len()
            || k.len() != (end - start) * row
            || v.len() != k.len()
        {
            return Err(ImportError::Rows {
                layer,
                start,
                end,
                what: format!(
                    "does not fit {} layers × {} tokens × {row} bytes per row",
                    self.layout.n_layer,
                    self.tokens.len()
                ),
            }
            .into());
        }
        if let Some(e) = self.error() {
            return Err(e.into());
        }
        self.tx
            .send(Cmd::ImportRows(Box::new(ImportRows {
                id: self.id,
                layer,
                start,
                end,
                k,
                v,
                error: self.error.clone(),
            })))
            .map_err(|_| EngineError::Stopped)
    }
}

impl Drop for KvImport {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::ImportRelease(self.id));
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
    identity: [u8; 32],
    rx: mpsc::Receiver<Cmd>,
    shared: &Mutex<Shared>,
) {
    let step_log = cfg.step_log;
    let mut core = match Core::new(model, tok, cfg, identity) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("engine failed to start: {e}");
            return;
        }
    };
    let mut steps = 0u64;
    let mut totals = (StepTotals::default(), StepTotals::default());
    let mut idle = false;
    loop {
        // Take every queued command; block for one when there is nothing to run (or only requests
        // waiting for imported layers, which arrive as commands).
        let mut cmds: Vec<Cmd> = rx.try_iter().collect();
        if cmds.is_empty() && (!core.has_work() || idle) {
            let got = if core.has_work() {
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            cmds.extend(got);
            cmds.extend(rx.try_iter());
        }
        for c in cmds {
            match c {
                Cmd::Submit(id, req, tx, at) => {
                    if let Err(e) = core.add(id, *req, tx.clone(), at) {
                        let _ = tx.send(Event::Error(Failure::Invalid(e)));
                    }
                }
                Cmd::Cancel(id) => {
                    core.cancel(id);
                }
                Cmd::Pin(tokens, reply) => {
                    let _ = reply.send(core.pin_prefix(&tokens));
                }
                Cmd::Unpin(id) => core.unpin(id),
                Cmd::ImportBegin(tokens, codec, reply) => {
                    let _ = reply.send(core.import_begin(tokens, codec));
                }
                Cmd::ImportRows(r) => {
                    if let Err(e) = core.import_rows(r.id, r.layer, r.start, r.end, &r.k, &r.v) {
                        tracing::warn!(import = r.id, "bad imported KV rows: {e}");
                        *r.error.lock().expect("import error lock") = Some(e);
                        core.import_release(r.id);
                    }
                }
                Cmd::ImportRelease(id) => core.import_release(id),
                Cmd::TakeLayerLog(reply) => {
                    let _ = reply.send(core.take_layer_log());
                }
                Cmd::PurgeSalt(salt, reply) => {
                    let _ = reply.send(core.purge_salt(&salt));
                }
                Cmd::Stop => return,
            }
        }
        core.reap_closed();
        idle = true;
        let stepped = core.step();
        let mut sh = shared.lock().expect("engine stats lock");
        if let Some(st) = stepped {
            steps += 1;
            idle = st.layer_calls == 0;
            if st.layer_calls > 0 {
                if st.prefill_tokens > 0 {
                    totals.1.add(&st);
                } else {
                    totals.0.add(&st);
                }
            }
            if step_log && sh.steps.len() < 1 << 20 {
                sh.steps.push(st);
            }
        }
        sh.stats = EngineStats {
            decode_steps: totals.0,
            prefill_steps: totals.1,
            kv_budget_bytes: core.pool().budget_bytes(),
            kv_used_bytes: core.pool().used_bytes(),
            cached_blocks: core.cache().len(),
            evictions: core.cache().evictions(),
            preemptions: core.preemptions(),
            steps,
            running: core.n_running(),
            waiting: core.n_waiting(),
        };
    }
}

/// The engine's side of a request's events: the channel, and how many its reader has not taken yet
/// (the scheduler pauses the request's decoding beyond [`EngineConfig::max_unread_events`]).
#[derive(Clone)]
pub struct Events {
    tx: UnboundedSender<Event>,
    unread: Option<Arc<AtomicUsize>>,
}

impl Events {
    /// Events on `tx` that nobody counts (a caller driving [`Core`] and reading the channel
    /// itself): the request never pauses for its reader.
    pub fn uncounted(tx: UnboundedSender<Event>) -> Self {
        Self { tx, unread: None }
    }
    pub(crate) fn send(&self, e: Event) -> Result<(), Event> {
        if let Some(u) = &self.unread {
            u.fetch_add(1, Ordering::Relaxed);
        }
        self.tx.send(e).map_err(|e| e.0)
    }
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
    /// Events sent and not yet taken by the reader.
    pub(crate) fn unread(&self) -> usize {
        self.unread
            .as_ref()
            .map_or(0, |u| u.load(Ordering::Relaxed))
    }
}

/// The events of one request. Dropping it cancels the request. A request whose reader leaves
/// [`EngineConfig::max_unread_events`] events untaken stops decoding until it takes them.
pub struct RequestStream {
    id: RequestId,
    rx: UnboundedReceiver<Event>,
    unread: Arc<AtomicUsize>,
    cancel: mpsc::Sender<Cmd>,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }
    fn took(&self, e: Option<Event>) -> Option<Event> {
        if e.is_some() {
            self.unread.fetch_sub(1, Ordering::Relaxed);
        }
        e
    }
    /// The next event (async); `None` after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        let e = self.rx.recv().await;
        self.took(e)
    }
    /// The next event, blocking the calling thread (not for use inside an async runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        let e = self.rx.blocking_recv();
        self.took(e)
    }
    /// The next event if one is ready now.
    pub fn try_next(&mut self) -> Option<Event> {
        let e = self.rx.try_recv().ok();
        self.took(e)
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
                Event::Error(f) => return Err(EngineError::Failed(f)),
                Event::Kv(_) => {}
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
