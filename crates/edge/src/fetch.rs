//! The edge's side of the cloud–edge API: resolving a cloud prompt by name, fetching its signed
//! manifest and KV stream, checking signature, identity, layout, template and every digest, importing
//! the KV through the engine as it arrives (requests run the layers present), pinning it, and keeping it
//! in a disk cache so a restarted edge does not fetch again. Upstream it sends requests by name or id
//! only — nothing derived from user content.
//!
//! **Trust.** A manifest is used only if its Ed25519 signature verifies under the pinned cloud key
//! ([`FetcherConfig::cloud_key`]). Without a pinned key the first key seen is trusted and remembered
//! in the cache directory — allowed only when the cloud is on loopback. Plain HTTP is refused off
//! loopback unless [`FetcherConfig::allow_plain_http`].
//!
//! **Streaming.** The stream is cut at the manifest's frame boundaries: the header is imported as soon
//! as it is complete ([`Fetcher::resolve`] returns then), each frame is decoded (its BLAKE3 checked),
//! compared with the manifest's entry and written to the import. A frame that fails is refetched alone
//! from `/v1/kv/{id}/frames/{layer}/{start}` (the bad bytes are never written); an interrupted stream
//! resumes with `Range` where it stopped.
//!
//! **Traffic.** [`Fetcher::traffic`] counts the HTTP/1.1 messages exchanged with the cloud: request
//! line, header lines and body up; status line, header lines and body down (every header is set
//! explicitly, so the count is what is written; transfer-encoding framing and TLS records are not
//! counted).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ep_engine::{Engine, KvImport};
use ep_kv::wire::{Frame, Item, KvHeader, StreamReader};
use ep_proto::{CloudPromptInfo, CloudPromptList, Manifest, PromptContent, SignedManifest};
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use tokio::sync::{oneshot, watch, OnceCell};

use crate::cache::{DiskCache, NameEntry};
use crate::plan::{
    self, Arrivals, Costs, LinkEstimator, Offer, Plan, Policy, PrefillModel, Strategy,
};
use ep_kv::identity::CODEC_RAW;

/// A cloud prompt this edge can serve: its content, its token ids (the prefix a request extends; never
/// re-tokenized) and its KV, imported or being imported (held pinned while this value lives).
pub struct ReadyPrompt {
    pub name: String,
    pub id: String,
    pub version: u32,
    pub content: PromptContent,
    pub tokens: Vec<u32>,
    /// Whether the KV came from the disk cache (no KV fetched).
    pub from_cache: bool,
    /// The wire codec the KV went through (requests over it use that codec's cache root).
    pub codec: u8,
    /// How the KV was obtained: `cache`, or a strategy label (`fetch-f16`, `split`, …).
    pub strategy: String,
    /// Bytes of KV stream this prompt came with (fetched, or read from the disk cache; 0 when
    /// recomputed).
    pub kv_bytes: u64,
    /// The import (pinned while held); emptied when the fetch fails, so requests over it recompute.
    import: ImportSlot,
    progress: watch::Receiver<Progress>,
    n_layer: usize,
}

/// How far the KV of a [`ReadyPrompt`] has arrived.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub frames_written: usize,
    pub frames: usize,
    pub done: bool,
    pub error: Option<String>,
}

impl std::fmt::Debug for ReadyPrompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadyPrompt")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("version", &self.version)
            .field("tokens", &self.tokens.len())
            .field("from_cache", &self.from_cache)
            .finish_non_exhaustive()
    }
}

impl ReadyPrompt {
    /// A prompt with no KV behind it (its requests compute the prefix): what rendering needs, for
    /// callers that hold a cloud prompt's manifest data without an import.
    pub fn without_kv(
        name: String,
        id: String,
        version: u32,
        content: PromptContent,
        tokens: Vec<u32>,
    ) -> Self {
        // Nothing to fetch: complete from the start.
        let (_tx, progress) = watch::channel(Progress {
            done: true,
            ..Progress::default()
        });
        Self {
            name,
            id,
            version,
            content,
            tokens,
            from_cache: false,
            codec: CODEC_RAW,
            strategy: "none".into(),
            kv_bytes: 0,
            import: Arc::default(),
            progress,
            n_layer: 0,
        }
    }

    /// Layers of the KV present for every token in the engine.
    pub fn ready_layers(&self) -> usize {
        self.import
            .lock()
            .expect("import slot")
            .as_ref()
            .map_or(0, |i| i.ready_layers())
    }

    /// Whether this prompt's KV is imported and pinned in the engine (not when recomputed, or
    /// once a failed fetch abandoned it).
    pub fn pinned(&self) -> bool {
        self.import.lock().expect("import slot").is_some()
    }

    /// Frames written so far, and whether the fetch ended (and how).
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Whether the fetch failed (the import is then abandoned; requests over it recompute).
    pub fn failed(&self) -> Option<String> {
        self.progress.borrow().error.clone()
    }

    /// Waits until every frame is written and present in the engine (and, with a disk cache, the
    /// KV is stored there).
    pub async fn wait_complete(&self) -> Result<(), FetchError> {
        let mut rx = self.progress.clone();
        loop {
            let p = rx.borrow_and_update().clone();
            if let Some(e) = p.error {
                return Err(FetchError::Refused {
                    name: self.name.clone(),
                    why: e,
                });
            }
            if p.done {
                break;
            }
            if rx.changed().await.is_err() {
                let p = rx.borrow().clone();
                if p.done {
                    break;
                }
                return Err(FetchError::Unavailable {
                    name: self.name.clone(),
                    why: "the fetch stopped".into(),
                });
            }
        }
        while self.ready_layers() < self.n_layer {
            let err = self
                .import
                .lock()
                .expect("import slot")
                .as_ref()
                .map_or(Some("the import was dropped".to_string()), |i| {
                    i.error().map(|e| e.to_string())
                });
            if let Some(e) = err {
                return Err(FetchError::Refused {
                    name: self.name.clone(),
                    why: e,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }
}

/// Why a cloud prompt cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The cloud has no such prompt (HTTP 404 to the client).
    #[error("unknown cloud prompt '{0}'")]
    NotFound(String),
    /// The cloud cannot be reached and the prompt is not cached (HTTP 503).
    #[error("the cloud is unavailable and cloud prompt '{name}' is not cached here: {why}")]
    Unavailable { name: String, why: String },
    /// The prompt exists but is not ready yet (HTTP 503 with Retry-After).
    #[error("cloud prompt '{0}' is still being computed")]
    NotReady(String),
    /// What the cloud sent cannot be used: bad signature, another model, layout or template (HTTP 502).
    #[error("cloud prompt '{name}' refused: {why}")]
    Refused { name: String, why: String },
}

/// A fetcher that cannot be set up (bad URL, missing key, unreadable CA or cache directory).
#[derive(Debug, thiserror::Error)]
#[error("cloud fetcher: {0}")]
pub struct SetupError(pub String);

/// Byte counters of the traffic with the cloud.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Bytes of requests sent to the cloud (request lines, headers, bodies).
    pub bytes_up: u64,
    /// Bytes received from the cloud (status lines, headers, bodies).
    pub bytes_down: u64,
    /// KV streams fetched (from the cloud; disk-cache loads are not counted).
    pub streams_fetched: u64,
    /// Cloud prompts loaded from the disk cache.
    pub cache_loads: u64,
    /// Frames that failed their checks in the stream and were fetched again alone.
    pub frames_refetched: u64,
    /// Stream requests resumed with `Range` after an interruption.
    pub resumes: u64,
    /// KV bytes (stream and frames) received.
    pub kv_bytes: u64,
    /// HTTP requests sent.
    pub requests: u64,
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    streams: AtomicU64,
    cache_loads: AtomicU64,
    refetched: AtomicU64,
    resumes: AtomicU64,
    kv_bytes: AtomicU64,
    requests: AtomicU64,
}

/// One HTTP request this edge sent to the cloud: its request line (method and target — never a
/// body: the edge sends none), the bytes it took up and the bytes of its answer read so far.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct UpstreamRequest {
    /// Unix time in milliseconds when it was sent.
    pub at_ms: u64,
    /// `GET /v1/cloud-prompts/law` (the request line without the HTTP version).
    pub line: String,
    /// Request line, headers and body, as counted in [`TrafficStats::bytes_up`].
    pub bytes_up: u64,
    /// Bytes of request bodies (always 0: the edge's requests carry none).
    pub body_bytes_up: u64,
    /// Status line, headers and the body bytes read within the request that caused it (a KV stream
    /// read in the background counts in [`TrafficStats`] and the prompt's `kv_bytes`).
    pub bytes_down: u64,
    pub status: u16,
    /// Which request this is, to add body bytes to it as they arrive.
    #[serde(skip)]
    #[schema(ignore)]
    seq: u64,
}

/// What is wrong with a manifest's frame table for a model of `n_layer` layers and frames of `codec`:
/// `None` when its frames follow the header contiguously, layer-major with ascending token ranges,
/// each non-empty and of `codec`, and cover every token of every layer and the whole stream.
pub fn frame_table_problem(m: &ep_proto::Manifest, n_layer: usize, codec: u8) -> Option<String> {
    let mut off = m.header_bytes;
    let mut covered = vec![0u32; n_layer];
    for f in &m.frames {
        if f.offset != off || f.layer as usize >= n_layer || covered[f.layer as usize] != f.start {
            return Some("its frame table is not a contiguous layer-major stream".into());
        }
        if f.codec != codec {
            return Some(format!(
                "its frames are encoded with {}, not the {} asked for",
                ep_kv::codec::codec_name(f.codec).unwrap_or("an unknown codec"),
                ep_kv::codec::codec_name(codec).unwrap_or("?")
            ));
        }
        if f.end <= f.start || f.bytes < ep_kv::wire::FRAME_HEADER_BYTES as u64 {
            return Some("its frame table has an empty frame".into());
        }
        covered[f.layer as usize] = f.end;
        off = match off.checked_add(f.bytes) {
            Some(o) => o,
            None => return Some("its frame table runs past 2^64 bytes".into()),
        };
    }
    if off != m.stream_bytes || covered.iter().any(|&c| c as usize != m.tokens.len()) {
        return Some("its frame table does not cover the stream".into());
    }
    None
}

#[cfg(test)]
impl UpstreamRequest {
    pub(crate) fn for_test(line: &str) -> Self {
        Self {
            at_ms: 0,
            line: line.to_string(),
            bytes_up: line.len() as u64,
            body_bytes_up: 0,
            bytes_down: 0,
            status: 200,
            seq: 0,
        }
    }
}

/// The sequence number of an upstream request, carried in its response's extensions.
#[derive(Clone, Copy)]
struct Seq(u64);

/// What went to the cloud on behalf of one request, gathered by [`record_upstream`].
pub type UpstreamLog = Arc<Mutex<Vec<UpstreamRequest>>>;

tokio::task_local! {
    static UPSTREAM: UpstreamLog;
}

/// Runs `f`, collecting every request the fetcher sends to the cloud while it runs in this task
/// (work spawned onto other tasks, such as a KV stream read in the background, is not included).
pub async fn record_upstream<F: std::future::Future>(f: F) -> (F::Output, Vec<UpstreamRequest>) {
    let log = UpstreamLog::default();
    let out = UPSTREAM.scope(log.clone(), f).await;
    let lines = std::mem::take(&mut *log.lock().expect("upstream log"));
    (out, lines)
}

/// The requests gathered so far by the enclosing [`record_upstream`] (empty outside one).
pub fn upstream_so_far() -> Vec<UpstreamRequest> {
    UPSTREAM
        .try_with(|l| l.lock().expect("upstream log").clone())
        .unwrap_or_default()
}

/// The last requests sent to the cloud by this edge, for whatever cause (bounded).
const UPSTREAM_RECENT: usize = 64;

/// Unix time in milliseconds.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A cloud prompt this edge holds, as the operator page lists it.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct HeldPrompt {
    pub name: String,
    pub id: String,
    pub version: u32,
    pub tokens: usize,
    /// `raw` for the exact stream (in the stored dtype), `int8`, `int4`.
    pub codec: String,
    /// `cache`, `recompute`, `fetch-f16`, `split`, …
    pub strategy: String,
    pub kv_bytes: u64,
    pub frames_written: usize,
    pub frames: usize,
    pub done: bool,
    pub error: Option<String>,
    pub pinned: bool,
}

/// Settings of a [`Fetcher`].
#[derive(Clone, Debug)]
pub struct FetcherConfig {
    /// The cloud's base URL (`https://host:port`, or `http://…` on loopback).
    pub cloud_url: String,
    /// Bearer token for the cloud.
    pub token: Option<String>,
    /// The cloud's manifest-signing public key (hex), pinned. Required unless the cloud is on
    /// loopback (then the first key seen is trusted and remembered in the cache directory).
    pub cloud_key: Option<String>,
    /// A private CA certificate (PEM) the cloud's TLS certificate chains to.
    pub cloud_ca: Option<PathBuf>,
    /// Allow plain HTTP to a cloud off loopback.
    pub allow_plain_http: bool,
    /// Disk cache directory (`None`: no disk cache).
    pub cache_dir: Option<PathBuf>,
    /// Byte budget of the disk cache.
    pub cache_budget_bytes: u64,
    /// How long a name's resolution is reused before asking the cloud again.
    pub name_ttl: Duration,
    /// Connect timeout, and the timeout of small requests (names, manifests, frames).
    pub timeout: Duration,
    /// Longest wait for the next bytes of a stream.
    pub read_timeout: Duration,
    /// Attempts at a stream after an interruption (each resumes where the last stopped).
    pub retries: u32,
    /// How often leases of held prompts are renewed.
    pub lease_renew: Duration,
    /// How a prompt's KV is obtained: adaptive (the edge measures and chooses) or one fixed
    /// strategy.
    pub policy: Policy,
    /// The codecs the quality floor allows (raw is exact; int8 and int4 are lossy).
    pub codecs: Vec<u8>,
    /// A measurement switch: [`Fetcher::resolve`] returns only once the KV has fully arrived, so
    /// requests do not run layers while the rest streams in.
    pub serial: bool,
}

impl FetcherConfig {
    /// Defaults for a cloud at `cloud_url`.
    pub fn new(cloud_url: impl Into<String>) -> Self {
        Self {
            cloud_url: cloud_url.into(),
            token: None,
            cloud_key: None,
            cloud_ca: None,
            allow_plain_http: false,
            cache_dir: None,
            cache_budget_bytes: 4 << 30,
            name_ttl: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retries: 5,
            lease_renew: Duration::from_secs(120),
            policy: Policy::FetchRaw,
            codecs: vec![CODEC_RAW],
            serial: false,
        }
    }
}

struct NameSeen {
    info: CloudPromptInfo,
    at: Instant,
}

type Cell = Arc<OnceCell<Arc<ReadyPrompt>>>;

struct Inner {
    cfg: FetcherConfig,
    http: reqwest::Client,
    /// The cloud URL without a trailing slash, and its path (prefix of request targets).
    base: String,
    base_path: String,
    host: HeaderValue,
    engine: Arc<Engine>,
    template_hex: String,
    /// The pinned (or first-seen) cloud key.
    key: Mutex<Option<String>>,
    tofu: bool,
    cache: Option<DiskCache>,
    names: Mutex<HashMap<String, NameSeen>>,
    prompts: Mutex<HashMap<String, Cell>>,
    /// The id each name was last served from.
    served: Mutex<HashMap<String, String>>,
    n: Counters,
    /// The link as measured from this edge's own transfers and probes.
    link: LinkEstimator,
    /// The prefill model and KV decode speeds, once measured (adaptive policy only).
    calib: OnceCell<Calibration>,
    /// Done once the link was probed and the speeds measured.
    warm: OnceCell<()>,
    /// The decisions taken, newest last (bounded), and their count per strategy.
    decisions: Mutex<Decisions>,
    /// The last requests sent to the cloud, newest last.
    upstream: Mutex<std::collections::VecDeque<UpstreamRequest>>,
}

/// This edge's own speeds, measured at start.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    pub prefill: PrefillModel,
    pub decode_s_per_token: [f64; 3],
    /// The fixed cost of one more prefill request (a split's).
    pub request_s: f64,
}

/// One decision on how to get a prompt's KV.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Decision {
    pub name: String,
    pub id: String,
    pub tokens: usize,
    pub strategy: String,
    pub codec: String,
    /// For a split: the tokens recomputed here.
    pub split_from: Option<u32>,
    pub expected_ms: f64,
    pub reason: String,
    pub rtt_ms: Option<f64>,
    pub mbit_per_s: Option<f64>,
}

#[derive(Default)]
struct Decisions {
    recent: std::collections::VecDeque<Decision>,
    counts: std::collections::BTreeMap<String, u64>,
}

impl Decisions {
    /// Counts a decision for `label`, keeping the last 32 that come with their details.
    fn record(&mut self, label: &str, d: Option<Decision>) {
        *self.counts.entry(label.to_string()).or_default() += 1;
        if let Some(d) = d {
            self.recent.push_back(d);
            while self.recent.len() > 32 {
                self.recent.pop_front();
            }
        }
    }
}

/// Resolves, fetches and holds cloud prompts for one edge.
pub struct Fetcher {
    inner: Arc<Inner>,
}

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn refused(name: &str, why: impl Into<String>) -> FetchError {
    FetchError::Refused {
        name: name.to_string(),
        why: why.into(),
    }
}

fn unavailable(name: &str, why: impl std::fmt::Display) -> FetchError {
    FetchError::Unavailable {
        name: name.to_string(),
        why: why.to_string(),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn header_lines_len(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + 2 + v.len() + 2) as u64)
        .sum::<u64>()
        + 2
}

impl Fetcher {
    /// A fetcher for the cloud of `cfg`, importing into `engine`; `template_digest` is BLAKE3 of this
    /// edge's chat template source (messages prompts must have been rendered with the same one).
    pub fn new(
        cfg: FetcherConfig,
        engine: Arc<Engine>,
        template_digest: [u8; 32],
    ) -> Result<Self, SetupError> {
        let url = reqwest::Url::parse(&cfg.cloud_url)
            .map_err(|e| SetupError(format!("cloud URL '{}': {e}", cfg.cloud_url)))?;
        let host = url
            .host_str()
            .ok_or_else(|| SetupError(format!("cloud URL '{}' has no host", cfg.cloud_url)))?
            .to_string();
        let loopback = is_loopback_host(&host);
        match url.scheme() {
            "https" => {}
            "http" if loopback || cfg.allow_plain_http => {}
            "http" => {
                return Err(SetupError(format!(
                    "plain HTTP to {host} would expose the token and KV: use https:// (or allow plain HTTP explicitly)"
                )))
            }
            s => return Err(SetupError(format!("unsupported scheme '{s}'"))),
        }
        let cache = match &cfg.cache_dir {
            Some(d) => Some(
                DiskCache::open(d, cfg.cache_budget_bytes)
                    .map_err(|e| SetupError(format!("cache directory {}: {e}", d.display())))?,
            ),
            None => None,
        };
        let (key, tofu) = match &cfg.cloud_key {
            Some(k) => {
                ep_proto::verifying_key(k)
                    .map_err(|e| SetupError(format!("--cloud-key: {e}")))?;
                (Some(k.to_ascii_lowercase()), false)
            }
            None if loopback => {
                let remembered = cache.as_ref().and_then(|c| c.cloud_key());
                tracing::warn!(
                    cloud = %cfg.cloud_url,
                    remembered = remembered.is_some(),
                    "no cloud key pinned: trusting the key of the first manifest on first use (allowed for a loopback cloud only)"
                );
                (remembered, true)
            }
            None => {
                return Err(SetupError(format!(
                    "the cloud at {host} is not on loopback: pin its key (--cloud-key, printed by `edgeprompt cloud key`)"
                )))
            }
        };
        let mut b = reqwest::Client::builder()
            .http1_only()
            .connect_timeout(cfg.timeout)
            .read_timeout(cfg.read_timeout)
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(ca) = &cfg.cloud_ca {
            let pem = std::fs::read(ca)
                .map_err(|e| SetupError(format!("--cloud-ca {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| SetupError(format!("--cloud-ca {}: {e}", ca.display())))?;
            b = b.add_root_certificate(cert);
        }
        let http = b
            .build()
            .map_err(|e| SetupError(format!("HTTP client: {e}")))?;
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let base = cfg.cloud_url.trim_end_matches('/').to_string();
        let base_path = url.path().trim_end_matches('/').to_string();
        let inner = Arc::new(Inner {
            http,
            base,
            base_path,
            host: HeaderValue::from_str(&host_header)
                .map_err(|e| SetupError(format!("cloud host: {e}")))?,
            engine,
            template_hex: ep_proto::hex(&template_digest),
            key: Mutex::new(key),
            tofu,
            cache,
            names: Mutex::new(HashMap::new()),
            prompts: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            n: Counters::default(),
            upstream: Mutex::default(),
            link: LinkEstimator::default(),
            calib: OnceCell::new(),
            warm: OnceCell::new(),
            decisions: Mutex::default(),
            cfg,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(renew_leases(Arc::downgrade(&inner)));
            let i = inner.clone();
            if matches!(inner.cfg.policy, Policy::Adaptive | Policy::Split) {
                rt.spawn(async move { i.warm_up().await });
            } else {
                // One round trip at start: the cloud's reachability is logged early and a
                // connection is open when the first prompt is asked for.
                rt.spawn(async move {
                    match i.send(Method::GET, "/health", &[]).await {
                        Ok(r) => {
                            let _ = i.body(r).await;
                        }
                        Err(e) => tracing::warn!("the cloud is not reachable yet: {e}"),
                    }
                });
            }
        }
        Ok(Fetcher { inner })
    }

    /// The cloud prompt `name`: returns once its KV import has started (the header checked and
    /// imported; frames keep arriving in the background), so requests can be submitted at once.
    pub async fn resolve(&self, name: &str) -> Result<Arc<ReadyPrompt>, FetchError> {
        let inner = &self.inner;
        if !ep_proto::valid_name(name) {
            return Err(FetchError::NotFound(name.to_string()));
        }
        let (id, version) = match inner.lookup(name).await {
            Ok(info) => match info.status {
                ep_proto::PromptStatus::Ready => (info.id, info.version),
                status => {
                    // A version is being computed (or failed): keep serving the last one served.
                    let prev = inner.served.lock().expect("served").get(name).cloned();
                    if let Some(id) = prev {
                        if let Some(p) = inner.held(&id) {
                            return Ok(p);
                        }
                    }
                    return Err(match status {
                        ep_proto::PromptStatus::Failed => refused(
                            name,
                            format!(
                                "the cloud failed to compute it: {}",
                                info.error.unwrap_or_default()
                            ),
                        ),
                        _ => FetchError::NotReady(name.to_string()),
                    });
                }
            },
            Err(Lookup::NotFound) => return Err(FetchError::NotFound(name.to_string())),
            Err(Lookup::Refused(why)) => return Err(refused(name, why)),
            Err(Lookup::Down(why)) => {
                // The cloud is down: the id served last, else the one the disk cache remembers.
                let prev = inner.served.lock().expect("served").get(name).cloned();
                if let Some(p) = prev.and_then(|id| inner.held(&id)) {
                    return Ok(p);
                }
                let entry = inner.cache.as_ref().and_then(|c| c.name(name));
                let cached_kv = |id: &str| {
                    inner.cache.as_ref().is_some_and(|c| {
                        inner
                            .cache_codecs()
                            .into_iter()
                            .any(|k| c.contains(&ep_kv::codec::variant_key(id, k)))
                    })
                };
                match entry {
                    Some(e) if cached_kv(&e.id) => {
                        tracing::info!(
                            name,
                            id = short(&e.id),
                            "the cloud is down: serving the cached KV"
                        );
                        (e.id, e.version)
                    }
                    Some(e) => match inner.recompute_cached(name, &e.id, e.version) {
                        // Seen before, its KV not kept: recomputed here from its token ids.
                        Some(p) => return Ok(p),
                        None => return Err(unavailable(name, why)),
                    },
                    None => return Err(unavailable(name, why)),
                }
            }
        };
        let offer = inner
            .names
            .lock()
            .expect("names")
            .get(name)
            .map(|s| s.info.clone());
        let p = inner.get_or_load(name, &id, version, offer).await?;
        let prev = inner
            .served
            .lock()
            .expect("served")
            .insert(name.to_string(), id.clone());
        if inner.cfg.serial {
            p.wait_complete().await?;
        }
        if let Some(old) = prev.filter(|o| *o != id) {
            // The name moved on: requests in flight keep the old prompt alive through their Arc.
            inner.prompts.lock().expect("prompts").remove(&old);
        }
        if let Some(c) = &inner.cache {
            let _ = c.set_name(
                name,
                NameEntry {
                    id: id.clone(),
                    version,
                },
            );
        }
        Ok(p)
    }

    /// The cloud prompts the cloud lists now (for `GET /v1/models`); cached ones when it is down.
    pub async fn list(&self) -> Result<Vec<CloudPromptInfo>, FetchError> {
        let inner = &self.inner;
        match inner.get_json::<CloudPromptList>("/v1/cloud-prompts").await {
            Ok(l) => Ok(l.data),
            Err(Lookup::Refused(why)) => Err(refused("*", why)),
            Err(_) => {
                let Some(c) = &inner.cache else {
                    return Ok(Vec::new());
                };
                Ok(c.all_names()
                    .into_iter()
                    .filter(|(_, e)| c.contains(&e.id))
                    .map(|(name, e)| CloudPromptInfo {
                        name,
                        id: e.id,
                        version: e.version,
                        status: ep_proto::PromptStatus::Ready,
                        progress: 1.0,
                        tokens: 0,
                        created_at: 0,
                        lease_until: None,
                        error: None,
                        kv: Vec::new(),
                    })
                    .collect())
            }
        }
    }

    /// Traffic with the cloud so far.
    pub fn traffic(&self) -> TrafficStats {
        let n = &self.inner.n;
        TrafficStats {
            bytes_up: n.up.load(Ordering::Relaxed),
            bytes_down: n.down.load(Ordering::Relaxed),
            streams_fetched: n.streams.load(Ordering::Relaxed),
            cache_loads: n.cache_loads.load(Ordering::Relaxed),
            frames_refetched: n.refetched.load(Ordering::Relaxed),
            resumes: n.resumes.load(Ordering::Relaxed),
            kv_bytes: n.kv_bytes.load(Ordering::Relaxed),
            requests: n.requests.load(Ordering::Relaxed),
        }
    }

    /// The cloud key manifests are checked against (pinned, or trusted on first use).
    pub fn cloud_key(&self) -> Option<String> {
        self.inner.key.lock().expect("key").clone()
    }

    /// The link as this edge measured it (round trip, bytes per second), once it has.
    pub fn link(&self) -> Option<plan::LinkEstimate> {
        self.inner.link.estimate()
    }

    /// Whether the adaptive policy's start-up measurements (link probe, prefill and decode speeds)
    /// are done.
    pub fn planner_ready(&self) -> bool {
        self.inner.warm.initialized()
    }

    /// The latest decisions on how to get prompts' KV (newest last), and the count per strategy.
    pub fn decisions(&self) -> (Vec<Decision>, Vec<(String, u64)>) {
        let d = self.inner.decisions.lock().expect("decisions");
        (
            d.recent.iter().cloned().collect(),
            d.counts.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        )
    }

    /// The last requests this edge sent to the cloud, for whatever cause (newest last, bounded).
    pub fn upstream_recent(&self) -> Vec<UpstreamRequest> {
        self.inner
            .upstream
            .lock()
            .expect("upstream")
            .iter()
            .cloned()
            .collect()
    }

    /// The cloud prompts held now (fetched, being fetched, loaded from the disk cache or
    /// recomputed), by name.
    pub fn held(&self) -> Vec<HeldPrompt> {
        let cells: Vec<Cell> = self
            .inner
            .prompts
            .lock()
            .expect("prompts")
            .values()
            .cloned()
            .collect();
        let mut out: Vec<HeldPrompt> = cells
            .iter()
            .filter_map(|c| c.get())
            .map(|p| {
                let pr = p.progress();
                HeldPrompt {
                    name: p.name.clone(),
                    id: p.id.clone(),
                    version: p.version,
                    tokens: p.tokens.len(),
                    codec: ep_kv::codec::codec_name(p.codec).unwrap_or("?").to_string(),
                    strategy: p.strategy.clone(),
                    kv_bytes: p.kv_bytes,
                    frames_written: pr.frames_written,
                    frames: pr.frames,
                    done: pr.done,
                    error: pr.error,
                    pinned: p.pinned(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
        out
    }

    /// Measures the link now (a few small requests, then a bulk probe), as the adaptive policy does
    /// at start.
    pub async fn probe_link(&self) {
        self.inner.probe_link().await
    }
}

enum Lookup {
    NotFound,
    Refused(String),
    Down(String),
}

/// Renews the leases of the prompts held, until the fetcher is dropped.
async fn renew_leases(inner: Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => i.cfg.lease_renew,
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(i) = inner.upgrade() else {
            return;
        };
        let ids: Vec<String> = i.prompts.lock().expect("prompts").keys().cloned().collect();
        for id in ids {
            let path = format!("/v1/kv/{id}/lease");
            match i.send(Method::POST, &path, &[]).await {
                Ok(r) => {
                    let ok = r.status().is_success();
                    let _ = i.body(r).await;
                    if !ok {
                        tracing::debug!(id = short(&id), "lease not renewed");
                    }
                }
                Err(e) => tracing::debug!(id = short(&id), "lease renewal: {e}"),
            }
        }
    }
}

impl Inner {
    /// Sends a request with every header explicit, counting its bytes and the response head's.
    async fn send(
        &self,
        method: Method,
        path: &str,
        extra: &[(HeaderName, String)],
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::HOST, self.host.clone());
        h.insert(reqwest::header::ACCEPT, HeaderValue::from_static("*/*"));
        if let Some(t) = &self.cfg.token {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
                h.insert(reqwest::header::AUTHORIZATION, v);
            }
        }
        if method == Method::POST {
            h.insert(
                reqwest::header::CONTENT_LENGTH,
                HeaderValue::from_static("0"),
            );
        }
        for (k, v) in extra {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(k.clone(), v);
            }
        }
        let line = format!("{method} {}{path}", self.base_path);
        let bytes_up = (line.len() + " HTTP/1.1\r\n".len()) as u64 + header_lines_len(&h);
        self.n.up.fetch_add(bytes_up, Ordering::Relaxed);
        let seq = self.n.requests.fetch_add(1, Ordering::Relaxed);
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .headers(h)
            .send()
            .await?;
        let s = r.status();
        let status_line = format!(
            "HTTP/1.1 {} {}\r\n",
            s.as_u16(),
            s.canonical_reason().unwrap_or("")
        );
        let head_down = status_line.len() as u64 + header_lines_len(r.headers());
        self.n.down.fetch_add(head_down, Ordering::Relaxed);
        let entry = UpstreamRequest {
            at_ms: unix_ms(),
            line,
            bytes_up,
            body_bytes_up: 0,
            bytes_down: head_down,
            status: s.as_u16(),
            seq,
        };
        let _ = UPSTREAM.try_with(|l| l.lock().expect("upstream log").push(entry.clone()));
        {
            let mut recent = self.upstream.lock().expect("upstream");
            recent.push_back(entry);
            while recent.len() > UPSTREAM_RECENT {
                recent.pop_front();
            }
        }
        r.extensions_mut().insert(Seq(seq));
        Ok(r)
    }

    /// Counts `n` bytes of the body of the upstream request `seq` (its entries in the task's log and
    /// in the recent list).
    fn count_down(&self, seq: Option<Seq>, n: u64) {
        self.n.down.fetch_add(n, Ordering::Relaxed);
        let Some(Seq(seq)) = seq else { return };
        let _ = UPSTREAM.try_with(|l| {
            if let Some(e) = l
                .lock()
                .expect("upstream log")
                .iter_mut()
                .rev()
                .find(|e| e.seq == seq)
            {
                e.bytes_down += n;
            }
        });
        if let Some(e) = self
            .upstream
            .lock()
            .expect("upstream")
            .iter_mut()
            .rev()
            .find(|e| e.seq == seq)
        {
            e.bytes_down += n;
        }
    }

    /// A response's whole body, counted.
    async fn body(&self, r: reqwest::Response) -> Result<bytes::Bytes, reqwest::Error> {
        let seq = r.extensions().get::<Seq>().copied();
        let b = r.bytes().await?;
        self.count_down(seq, b.len() as u64);
        Ok(b)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Lookup> {
        let r = tokio::time::timeout(self.cfg.timeout, self.send(Method::GET, path, &[]))
            .await
            .map_err(|_| Lookup::Down("the cloud did not answer in time".into()))?
            .map_err(|e| Lookup::Down(format!("cannot reach the cloud: {e}")))?;
        let status = r.status();
        let body = tokio::time::timeout(self.cfg.timeout, self.body(r))
            .await
            .map_err(|_| Lookup::Down("the cloud did not answer in time".into()))?
            .map_err(|e| Lookup::Down(format!("reading the cloud's answer: {e}")))?;
        match status {
            s if s.is_success() => serde_json::from_slice(&body)
                .map_err(|e| Lookup::Refused(format!("the cloud's answer is not valid: {e}"))),
            StatusCode::NOT_FOUND => Err(Lookup::NotFound),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Lookup::Refused(
                "the cloud refused this edge's token".into(),
            )),
            s if s.is_server_error() => Err(Lookup::Down(format!("the cloud answered {s}"))),
            s => Err(Lookup::Refused(format!("the cloud answered {s}"))),
        }
    }

    /// The registry's current version of `name` (reused for `name_ttl`).
    async fn lookup(&self, name: &str) -> Result<CloudPromptInfo, Lookup> {
        if let Some(s) = self.names.lock().expect("names").get(name) {
            if s.at.elapsed() < self.cfg.name_ttl && s.info.status == ep_proto::PromptStatus::Ready
            {
                return Ok(s.info.clone());
            }
        }
        let info: CloudPromptInfo = self.get_json(&format!("/v1/cloud-prompts/{name}")).await?;
        self.names.lock().expect("names").insert(
            name.to_string(),
            NameSeen {
                info: info.clone(),
                at: Instant::now(),
            },
        );
        Ok(info)
    }

    /// The prompt of `id` if it is held and its fetch has not failed.
    fn held(&self, id: &str) -> Option<Arc<ReadyPrompt>> {
        let cell = self.prompts.lock().expect("prompts").get(id).cloned()?;
        cell.get().filter(|p| p.failed().is_none()).cloned()
    }

    /// The held prompt of `id`, else loaded from the disk cache, else fetched; concurrent callers
    /// share one load.
    async fn get_or_load(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        version: u32,
        info: Option<CloudPromptInfo>,
    ) -> Result<Arc<ReadyPrompt>, FetchError> {
        let cell = {
            let mut m = self.prompts.lock().expect("prompts");
            let c = m.entry(id.to_string()).or_default();
            if c.get().is_some_and(|p| p.failed().is_some()) {
                *c = Arc::default();
            }
            c.clone()
        };
        cell.get_or_try_init(|| async {
            if let Some(p) = self.load_cached(name, id, version).await {
                return Ok(p);
            }
            self.obtain(name, id, version, info).await
        })
        .await
        .cloned()
    }

    /// The key manifests must be signed with; on first use (loopback only) the one this manifest
    /// names, remembered.
    fn check_signature(&self, name: &str, s: &SignedManifest) -> Result<(), FetchError> {
        let mut key = self.key.lock().expect("key");
        let pinned = match &*key {
            Some(k) => k.clone(),
            None if self.tofu => {
                ep_proto::verify(&s.key, s).map_err(|e| refused(name, e.to_string()))?;
                tracing::warn!(key = %s.key, "trusting the cloud key on first use");
                if let Some(c) = &self.cache {
                    let _ = c.set_cloud_key(&s.key);
                }
                *key = Some(s.key.to_ascii_lowercase());
                return Ok(());
            }
            None => return Err(refused(name, "no cloud key is pinned")),
        };
        ep_proto::verify(&pinned, s).map_err(|e| refused(name, e.to_string()))
    }

    /// Checks a signed manifest for `id`: signature, format, id, identity, layout, template, and the
    /// frame table (contiguous, covering every token of every layer).
    fn check_manifest(
        &self,
        name: &str,
        id: &str,
        codec: u8,
        s: &SignedManifest,
    ) -> Result<(), FetchError> {
        self.check_signature(name, s)?;
        let m = &s.manifest;
        let r = |why: String| Err(refused(name, why));
        if m.format != ep_proto::MANIFEST_FORMAT {
            return r(format!("unknown manifest format '{}'", m.format));
        }
        if m.id != id {
            return r(format!("the manifest is of {}, not {id}", m.id));
        }
        let ours = self.engine.identity().digest();
        if m.identity_digest != ep_proto::hex(&ours) {
            return r(format!(
                "its KV was computed by another model or build ({}; this edge runs {})",
                m.identity,
                self.engine.identity().to_hex()
            ));
        }
        if ep_proto::prompt_id(&ours, &m.tokens) != m.id {
            return r("its id is not the hash of its tokens".into());
        }
        let l = self.engine.layout();
        let want = ep_proto::Layout {
            n_layer: l.n_layer as u32,
            n_head_kv: l.n_head_kv as u32,
            head_dim: l.head_dim as u32,
            block_tokens: l.block_tokens as u32,
            dtype: l.dtype.name().to_string(),
        };
        if m.layout != want {
            return r(format!(
                "its KV layout {:?} is not this edge's {want:?} (run with the cloud's --kv-dtype and --block-size)",
                m.layout
            ));
        }
        if let PromptContent::Messages(_) = m.content {
            if m.template_digest != self.template_hex {
                return r("it was rendered with another chat template than this edge's".into());
            }
        }
        match frame_table_problem(m, l.n_layer, codec) {
            Some(why) => r(why),
            None => Ok(()),
        }
    }

    /// Checks a decoded header against the manifest.
    fn check_header(
        &self,
        name: &str,
        m: &Manifest,
        h: &KvHeader,
        bytes: &[u8],
    ) -> Result<(), FetchError> {
        if ep_proto::hex(blake3::hash(bytes).as_bytes()) != m.header_digest
            || h.tokens != m.tokens
            || h.block_hashes
                .iter()
                .map(|b| b.to_hex())
                .ne(m.block_hashes.iter().cloned())
        {
            return Err(refused(
                name,
                "the stream's header differs from the manifest",
            ));
        }
        Ok(())
    }

    /// The encodings a cached copy of a prompt may be in: the exact KV first, then the lossy ones
    /// the quality floor allows.
    fn cache_codecs(&self) -> Vec<u8> {
        let mut v = vec![CODEC_RAW];
        v.extend(self.cfg.codecs.iter().copied().filter(|&c| c != CODEC_RAW));
        v
    }

    /// A prompt whose KV this edge does not hold but whose signed manifest it cached: served for
    /// recomputing from its token ids (the manifest checked again).
    fn recompute_cached(&self, name: &str, id: &str, version: u32) -> Option<Arc<ReadyPrompt>> {
        let cache = self.cache.as_ref()?;
        for codec in self.cache_codecs() {
            let Some(mjson) = cache.read_manifest(&ep_kv::codec::variant_key(id, codec)) else {
                continue;
            };
            let Ok(s) = serde_json::from_slice::<SignedManifest>(&mjson) else {
                continue;
            };
            if self.check_manifest(name, id, codec, &s).is_err() {
                continue;
            }
            tracing::info!(
                target: "ep_edge::decision",
                name,
                id = short(id),
                "the cloud is down and this KV is not cached: recomputing it from the cached token ids"
            );
            self.decisions
                .lock()
                .expect("decisions")
                .record("recompute", None);
            let m = s.manifest;
            let p = Arc::new(ReadyPrompt {
                strategy: "recompute".into(),
                ..ReadyPrompt::without_kv(
                    name.to_string(),
                    id.to_string(),
                    version,
                    m.content,
                    m.tokens,
                )
            });
            let cell: Cell = Arc::default();
            let _ = cell.set(p.clone());
            self.prompts
                .lock()
                .expect("prompts")
                .insert(id.to_string(), cell);
            return Some(p);
        }
        None
    }

    /// Loads `id` from the disk cache (checking it all again); `None` when absent or bad.
    async fn load_cached(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        version: u32,
    ) -> Option<Arc<ReadyPrompt>> {
        let cache = self.cache.as_ref()?;
        let mut found = None;
        for codec in self.cache_codecs() {
            let key = ep_kv::codec::variant_key(id, codec);
            match cache.read(&key) {
                Ok(Some(x)) => {
                    found = Some((codec, key, x));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(id = short(id), "reading the KV disk cache: {e}");
                }
            }
        }
        let (codec, key, (mjson, stream)) = found?;
        match self
            .import_cached(name, id, version, codec, &mjson, &stream)
            .await
        {
            Ok(p) => {
                self.n.cache_loads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    name,
                    id = short(id),
                    bytes = stream.len(),
                    "cloud prompt loaded from the disk cache"
                );
                Some(p)
            }
            Err(e) => {
                tracing::warn!(name, id = short(id), "dropping a bad disk-cache entry: {e}");
                cache.remove(&key);
                None
            }
        }
    }

    async fn import_cached(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        version: u32,
        codec: u8,
        mjson: &[u8],
        stream: &[u8],
    ) -> Result<Arc<ReadyPrompt>, FetchError> {
        let s: SignedManifest = serde_json::from_slice(mjson)
            .map_err(|e| refused(name, format!("cached manifest: {e}")))?;
        self.check_manifest(name, id, codec, &s)?;
        let m = &s.manifest;
        if stream.len() as u64 != m.stream_bytes {
            return Err(refused(name, "the cached stream has the wrong length"));
        }
        let hb = m.header_bytes as usize;
        let mut rd = StreamReader::new();
        rd.push(&stream[..hb]);
        let header = match rd.next_item() {
            Ok(Some(Item::Header(h))) => h,
            _ => return Err(refused(name, "the cached stream's header is bad")),
        };
        self.check_header(name, m, &header, &stream[..hb])?;
        let mut frames = Vec::with_capacity(m.frames.len());
        for fr in &m.frames {
            rd.push(&stream[fr.offset as usize..(fr.offset + fr.bytes) as usize]);
            match rd.next_item() {
                Ok(Some(Item::Frame(f))) if frame_matches(&f, fr) => frames.push(f),
                _ => return Err(refused(name, "a cached frame is bad")),
            }
        }
        let import = self
            .engine
            .import_header_codec(&header, codec)
            .await
            .map_err(|e| refused(name, e.to_string()))?;
        for f in &frames {
            import
                .write_frame(f)
                .map_err(|e| refused(name, e.to_string()))?;
        }
        let (ptx, prx) = watch::channel(Progress {
            frames_written: frames.len(),
            frames: frames.len(),
            done: true,
            error: None,
        });
        drop(ptx);
        Ok(Arc::new(ReadyPrompt {
            name: name.to_string(),
            id: id.to_string(),
            version,
            content: m.content.clone(),
            tokens: m.tokens.clone(),
            from_cache: true,
            codec,
            strategy: "cache".into(),
            kv_bytes: stream.len() as u64,
            import: Arc::new(Mutex::new(Some(Arc::new(import)))),
            progress: prx,
            n_layer: header.layout.n_layer as usize,
        }))
    }

    /// The signed manifest of `id`'s KV in `codec`, checked.
    async fn get_manifest(
        &self,
        name: &str,
        id: &str,
        codec: u8,
    ) -> Result<SignedManifest, FetchError> {
        let path = match codec {
            CODEC_RAW => format!("/v1/kv/{id}/manifest"),
            c => format!(
                "/v1/kv/{id}/manifest?codec={}",
                ep_kv::codec::codec_name(c).unwrap_or("raw")
            ),
        };
        let s: SignedManifest = match self.get_json(&path).await {
            Ok(s) => s,
            Err(Lookup::NotFound) => return Err(FetchError::NotFound(name.to_string())),
            Err(Lookup::Refused(why)) => return Err(refused(name, why)),
            Err(Lookup::Down(why)) => return Err(unavailable(name, why)),
        };
        self.check_manifest(name, id, codec, &s)?;
        Ok(s)
    }

    /// This edge's prefill model and decode speeds: measured once (a prefill of random tokens under
    /// a throwaway salt, timed twice; each codec's decoder on a synthetic frame).
    async fn calibration(self: &Arc<Self>) -> Calibration {
        *self
            .calib
            .get_or_init(|| async {
                let engine = self.engine.clone();
                let cfg = engine.model_config().clone();
                let cap = engine.config().max_seq_len.saturating_sub(2).max(16);
                // Two sizes, each the faster of two runs: the per-token and per-pair costs.
                let (n1, n2, n0) = (64.min(cap / 2), 384.min(cap), 8);
                let mut t = [f64::INFINITY; 3];
                for (slot, &n) in [n1, n2, n0].iter().enumerate() {
                    for round in 0..2u32 {
                        let tokens: Vec<u32> = (0..n)
                            .map(|i| {
                                ((i as u64 * 2_654_435_761 + round as u64 * 7 + slot as u64)
                                    % cfg.n_vocab as u64) as u32
                            })
                            .collect();
                        let params = ep_model::generate::GenerateParams {
                            max_tokens: 1,
                            ..Default::default()
                        };
                        let mut req = ep_engine::Request::new(tokens, params);
                        let salt = format!("calibration-{slot}-{round}-{}", std::process::id())
                            .into_bytes();
                        req.salt = Some(salt.clone());
                        let t0 = Instant::now();
                        if let Ok(mut st) = engine.submit(req) {
                            while let Some(ev) = st.next().await {
                                if matches!(
                                    ev,
                                    ep_engine::Event::Done(_) | ep_engine::Event::Error(_)
                                ) {
                                    break;
                                }
                            }
                            t[slot] = t[slot].min(t0.elapsed().as_secs_f64());
                        }
                        let _ = engine.purge_salt(salt).await;
                    }
                }
                let ratio = PrefillModel::work_ratio(&cfg);
                let prefill = match PrefillModel::fitted(n1, t[0], n2, t[1]) {
                    Some(m) if m.s_pair >= 0.0 && m.s_tok > 0.0 => m,
                    _ if t[1].is_finite() => PrefillModel::calibrated(n2, t[1], ratio),
                    _ => PrefillModel::calibrated(n2, n2 as f64 / 200.0, ratio),
                };
                // A tiny request: what one request costs beyond its tokens.
                let request_s = if t[2].is_finite() {
                    (t[2] - prefill.secs(n0)).max(0.01)
                } else {
                    0.05
                };
                let layout = ep_kv::wire::WireLayout::from(engine.layout());
                let decode_s_per_token =
                    tokio::task::spawn_blocking(move || decode_speeds(&layout))
                        .await
                        .unwrap_or([0.0; 3]);
                tracing::info!(
                    target: "ep_edge::decision",
                    prefill_tokens_per_s_at_1k = 1024.0 / prefill.secs(1024),
                    prefill_tokens_per_s_at_4k = 4096.0 / prefill.secs(4096),
                    decode_int8_us_per_token = decode_s_per_token[1] * 1e6,
                    decode_int4_us_per_token = decode_s_per_token[2] * 1e6,
                    request_ms = request_s * 1000.0,
                    "calibrated this edge's prefill and KV decoding"
                );
                Calibration {
                    prefill,
                    decode_s_per_token,
                    request_s,
                }
            })
            .await
    }

    /// Measures the link: round trips of three small requests, then the steady rate of bulk probes
    /// growing from 64 KiB to at most 8 MiB within about 25 round trips (at most 4 s).
    async fn probe_link(&self) {
        for _ in 0..3 {
            let t0 = Instant::now();
            match self.send(Method::GET, "/health", &[]).await {
                Ok(r) => {
                    self.link.rtt_sample(t0.elapsed().as_secs_f64());
                    let _ = self.body(r).await;
                }
                Err(e) => {
                    tracing::debug!("link probe: {e}");
                    return;
                }
            }
        }
        let rtt = self.link.rtt().unwrap_or(0.05).max(0.002);
        // Long enough to be well past slow start (and a shaper's first burst): ~25 round trips.
        // Transfers that each complete (none cut short, so no stale bytes queue in front of the
        // next request), growing to fill what is left of the budget at the rate seen so far.
        let budget = (25.0 * rtt).clamp(0.25, 4.0);
        let t0 = Instant::now();
        let mut size: u64 = 64 << 10;
        let r = loop {
            let path = format!("/v1/probe?bytes={size}");
            let Ok(r) = self.send(Method::GET, &path, &[]).await else {
                return;
            };
            if !r.status().is_success() {
                let _ = self.body(r).await;
                return;
            }
            let mut arr = Arrivals::new(Instant::now());
            let seq = r.extensions().get::<Seq>().copied();
            let mut body = r.bytes_stream();
            while let Some(chunk) = body.next().await {
                let Ok(chunk) = chunk else {
                    return;
                };
                self.count_down(seq, chunk.len() as u64);
                arr.push(chunk.len());
            }
            let whole = arr.total() as f64 / arr.elapsed().max(1e-6);
            let this = arr.rate().unwrap_or(whole).max(whole);
            let left = budget - t0.elapsed().as_secs_f64();
            if size >= 8 << 20 || left < 3.0 * rtt {
                break this;
            }
            size = ((this * left * 0.7) as u64).clamp(size * 2, 8 << 20);
        };
        self.link.rate_sample(r);
        tracing::info!(
            target: "ep_edge::decision",
            rtt_ms = rtt * 1000.0,
            mbit_per_s = r * 8e-6,
            last_probe_bytes = size,
            probe_ms = t0.elapsed().as_secs_f64() * 1000.0,
            "measured the link to the cloud"
        );
    }

    /// Probes the link and measures this edge's speeds, once (started with the fetcher).
    async fn warm_up(self: &Arc<Self>) {
        self.warm
            .get_or_init(|| async {
                self.probe_link().await;
                let _ = self.calibration().await;
            })
            .await;
    }

    /// The costs the decision weighs now: the link measured (probed again when the start-up probe
    /// got nothing), this edge's speeds.
    async fn costs(self: &Arc<Self>) -> Costs {
        self.warm_up().await;
        if self.link.estimate().is_none() {
            self.probe_link().await;
        }
        let c = self.calibration().await;
        let e = self.link.estimate();
        Costs {
            rtt_s: e.map_or(0.05, |e| e.rtt_s),
            bytes_per_s: e.map_or(1e6, |e| e.bytes_per_s),
            prefill: c.prefill,
            decode_s_per_token: c.decode_s_per_token,
            split_overhead_s: c.request_s,
            turn_tokens: 32,
        }
    }

    /// Decides how to get `id`'s KV and starts getting it; returns once requests can be submitted
    /// over it.
    async fn obtain(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        version: u32,
        info: Option<CloudPromptInfo>,
    ) -> Result<Arc<ReadyPrompt>, FetchError> {
        let bt = self.engine.layout().block_tokens;
        let mut sizes: Vec<(u8, u64)> = info
            .as_ref()
            .map(|i| {
                i.kv.iter()
                    .filter_map(|v| Some((ep_kv::codec::parse(&v.codec)?, v.bytes)))
                    .collect()
            })
            .unwrap_or_default();
        if sizes.is_empty() {
            // An older cloud: raw only.
            sizes.push((CODEC_RAW, 0));
        }
        let n_tokens = info.as_ref().map_or(0, |i| i.tokens);
        let policy = self.cfg.policy.clone();
        let (plan, costs) = match policy {
            Policy::FetchRaw => (
                Plan {
                    strategy: Strategy::Fetch { codec: CODEC_RAW },
                    expected_s: 0.0,
                    options: Vec::new(),
                },
                None,
            ),
            // Too short to split or to weigh: fetched.
            Policy::Adaptive | Policy::Split if n_tokens < bt * 2 => (
                Plan {
                    strategy: Strategy::Fetch { codec: CODEC_RAW },
                    expected_s: 0.0,
                    options: Vec::new(),
                },
                None,
            ),
            _ => {
                let costs = if policy == Policy::Adaptive || policy == Policy::Split {
                    self.costs().await
                } else {
                    let c = self.calib.get().copied();
                    Costs {
                        rtt_s: 0.0,
                        bytes_per_s: 1.0,
                        prefill: c.map_or(
                            PrefillModel {
                                s_tok: 1.0,
                                s_pair: 0.0,
                            },
                            |c| c.prefill,
                        ),
                        decode_s_per_token: [0.0; 3],
                        split_overhead_s: 0.0,
                        turn_tokens: 0,
                    }
                };
                let offer = Offer {
                    n_tokens,
                    sizes: sizes.clone(),
                    split_points: (1..n_tokens.div_ceil(bt))
                        .map(|b| (b * bt) as u32)
                        .collect(),
                };
                let allowed = if policy == Policy::Adaptive || policy == Policy::Split {
                    self.cfg.codecs.clone()
                } else {
                    ep_kv::codec::CODECS.to_vec()
                };
                let weighed = matches!(policy, Policy::Adaptive | Policy::Split);
                (
                    plan::choose(&policy, &allowed, &costs, &offer),
                    weighed.then_some(costs),
                )
            }
        };
        let codec = plan.strategy.codec();
        let s = self.get_manifest(name, id, codec).await?;
        if let Some(c) = &self.cache {
            // The token ids, kept so the prompt can be recomputed if the cloud goes down.
            if let Ok(j) = serde_json::to_vec(&s) {
                let _ = c.put_manifest(&ep_kv::codec::variant_key(id, codec), &j);
            }
        }
        let m = &s.manifest;
        // A split happens at a frame start that is also a block start: the best of those by the
        // same costs (without them, the nearest to the plan's point).
        let strategy = match plan.strategy {
            Strategy::Split { codec, from } => {
                let starts: Vec<u32> = m
                    .frames
                    .iter()
                    .filter(|f| {
                        f.layer == 0 && f.start > 0 && (f.start as usize).is_multiple_of(bt)
                    })
                    .map(|f| f.start)
                    .collect();
                let offer = Offer {
                    n_tokens: m.tokens.len(),
                    sizes: sizes.clone(),
                    split_points: starts.clone(),
                };
                let at = match &costs {
                    Some(c) => starts
                        .iter()
                        .copied()
                        .filter_map(|st| {
                            c.expected(Strategy::Split { codec, from: st }, &offer)
                                .map(|t| (st, t))
                        })
                        .min_by(|a, b| a.1.total_cmp(&b.1))
                        .map(|(st, _)| st),
                    None => starts.iter().copied().min_by_key(|&st| st.abs_diff(from)),
                };
                match at {
                    Some(from) => Strategy::Split { codec, from },
                    None => Strategy::Fetch { codec },
                }
            }
            other => other,
        };
        let label = strategy.label(self.engine.layout().dtype.name());
        let reason = match &costs {
            None => format!("fixed policy {policy:?}"),
            Some(_) => {
                let mut opts: Vec<(String, f64)> = plan
                    .options
                    .iter()
                    .map(|(s, t)| (s.label(self.engine.layout().dtype.name()), *t))
                    .collect();
                opts.sort_by(|a, b| a.1.total_cmp(&b.1));
                let mut seen = std::collections::HashSet::new();
                opts.retain(|(l, _)| seen.insert(l.clone()));
                opts.iter()
                    .take(4)
                    .map(|(l, t)| format!("{l} {:.0} ms", t * 1000.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let est = self.link.estimate();
        let d = Decision {
            name: name.to_string(),
            id: id.to_string(),
            tokens: m.tokens.len(),
            strategy: label.clone(),
            codec: ep_kv::codec::codec_name(codec).unwrap_or("?").to_string(),
            split_from: match strategy {
                Strategy::Split { from, .. } => Some(from),
                _ => None,
            },
            expected_ms: if costs.is_some() {
                plan.expected_s * 1000.0
            } else {
                0.0
            },
            reason,
            rtt_ms: est.map(|e| e.rtt_s * 1000.0),
            mbit_per_s: est.map(|e| e.bytes_per_s * 8e-6),
        };
        tracing::info!(
            target: "ep_edge::decision",
            name,
            id = short(id),
            tokens = d.tokens,
            strategy = %d.strategy,
            split_from = ?d.split_from,
            expected_ms = d.expected_ms,
            rtt_ms = ?d.rtt_ms,
            mbit_per_s = ?d.mbit_per_s,
            options = %d.reason,
            "KV strategy chosen"
        );
        self.decisions
            .lock()
            .expect("decisions")
            .record(&label, Some(d));
        match strategy {
            Strategy::Recompute => Ok(Arc::new(ReadyPrompt {
                strategy: label,
                ..ReadyPrompt::without_kv(
                    name.to_string(),
                    id.to_string(),
                    version,
                    m.content.clone(),
                    m.tokens.clone(),
                )
            })),
            Strategy::Fetch { codec } => {
                self.fetch(name, id, version, s, codec, 0, None, label)
                    .await
            }
            Strategy::Split { codec, from } => {
                // The first tokens computed here, into the codec's cache root, while the rest arrive.
                let mut req = ep_engine::Request::new(
                    m.tokens[..from as usize].to_vec(),
                    ep_model::generate::GenerateParams {
                        max_tokens: 1,
                        ..Default::default()
                    },
                );
                req.public_prefix = from as usize;
                req.kv_codec = codec;
                let (tx, rx) = oneshot::channel();
                match self.engine.submit(req) {
                    Ok(mut st) => {
                        tokio::spawn(async move {
                            let mut r = Err("the prefix computation stopped".to_string());
                            while let Some(ev) = st.next().await {
                                match ev {
                                    ep_engine::Event::Done(_) => {
                                        r = Ok(());
                                        break;
                                    }
                                    ep_engine::Event::Error(e) => {
                                        r = Err(format!("computing the prefix: {e:?}"));
                                        break;
                                    }
                                    _ => {}
                                }
                            }
                            let _ = tx.send(r);
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("computing the prefix: {e}")));
                    }
                }
                self.fetch(name, id, version, s, codec, from, Some(rx), label)
                    .await
            }
        }
    }

    /// Fetches `id`'s KV in `codec` from token `from` (the tokens before it computed here, done when
    /// `prefix` answers): the stream in a background task; returns once the header is imported.
    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        version: u32,
        s: SignedManifest,
        codec: u8,
        from: u32,
        prefix: Option<oneshot::Receiver<Result<(), String>>>,
        strategy: String,
    ) -> Result<Arc<ReadyPrompt>, FetchError> {
        let mjson = serde_json::to_vec(&s).map_err(|e| refused(name, e.to_string()))?;
        let (htx, hrx) = oneshot::channel();
        let slot: ImportSlot = Arc::default();
        // The frames this stream carries, at their offsets in it.
        let mut off = s.manifest.header_bytes;
        let frames: Vec<ep_proto::FrameRef> = s
            .manifest
            .frames
            .iter()
            .filter(|f| f.start >= from)
            .map(|f| {
                let mut f = f.clone();
                f.offset = off;
                off += f.bytes;
                f
            })
            .collect();
        let (ptx, prx) = watch::channel(Progress {
            frames: frames.len(),
            ..Progress::default()
        });
        self.n.streams.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            name,
            id = short(id),
            bytes = off,
            from,
            "fetching cloud prompt KV"
        );
        let job = StreamJob {
            inner: self.clone(),
            name: name.to_string(),
            id: id.to_string(),
            manifest: s.manifest.clone(),
            frames,
            total: off,
            codec,
            from,
            prefix,
            pending: Vec::new(),
            mjson,
            header_tx: Some(htx),
            progress: ptx,
            slot: slot.clone(),
        };
        tokio::spawn(job.run());
        let header = hrx
            .await
            .map_err(|_| unavailable(name, "the stream task stopped"))??;
        Ok(Arc::new(ReadyPrompt {
            name: name.to_string(),
            id: id.to_string(),
            version,
            content: s.manifest.content.clone(),
            tokens: s.manifest.tokens.clone(),
            from_cache: false,
            codec,
            strategy,
            kv_bytes: off,
            import: slot,
            progress: prx,
            n_layer: header.layout.n_layer as usize,
        }))
    }
}

/// Seconds per token (all layers) to decode each codec's frames, measured on a synthetic frame.
fn decode_speeds(layout: &ep_kv::wire::WireLayout) -> [f64; 3] {
    let n = 64usize;
    let row = layout.n_head_kv as usize * layout.head_dim as usize;
    let mut k = Vec::with_capacity(n * row * layout.dtype.bytes());
    let mut v = Vec::with_capacity(k.capacity());
    for i in 0..n * row {
        let x = ((i * 7919 % 1000) as f32 - 500.0) / 250.0;
        for (buf, y) in [(&mut k, x), (&mut v, -x * 0.5)] {
            match layout.dtype {
                ep_kv::KvDtype::F32 => buf.extend_from_slice(&y.to_le_bytes()),
                _ => buf.extend_from_slice(&half::f16::from_f32(y).to_le_bytes()),
            }
        }
    }
    let mut out = [0.0; 3];
    for (i, &codec) in ep_kv::codec::CODECS.iter().enumerate().take(3) {
        let Ok(payload) = ep_kv::codec::encode(codec, layout, n, &k, &v) else {
            continue;
        };
        let t0 = Instant::now();
        let reps = 3;
        for _ in 0..reps {
            let _ = ep_kv::codec::decode(codec, layout, n, &payload);
        }
        out[i] = t0.elapsed().as_secs_f64() / reps as f64 / n as f64 * layout.n_layer as f64;
    }
    out
}

fn frame_matches(f: &Frame, r: &ep_proto::FrameRef) -> bool {
    f.layer == r.layer
        && f.start == r.start
        && f.end == r.end
        && f.codec == r.codec
        && ep_proto::hex(&f.digest) == r.digest
}

type HeaderResult = Result<KvHeader, FetchError>;

/// A frame decoded into raw rows: layer, token range, K rows, V rows.
type Rows = (usize, usize, usize, Vec<u8>, Vec<u8>);
type ImportSlot = Arc<Mutex<Option<Arc<KvImport>>>>;

/// One stream being fetched.
struct StreamJob {
    inner: Arc<Inner>,
    name: String,
    id: String,
    manifest: Manifest,
    /// The frames this stream carries (those from `from` on), at their offsets in it.
    frames: Vec<ep_proto::FrameRef>,
    /// The stream's length.
    total: u64,
    codec: u8,
    from: u32,
    /// For a split: answers when the tokens before `from` are computed here; the import begins
    /// then (frames arriving before are decoded at once and wait in `pending` as rows).
    prefix: Option<oneshot::Receiver<Result<(), String>>>,
    pending: Vec<Rows>,
    mjson: Vec<u8>,
    header_tx: Option<oneshot::Sender<HeaderResult>>,
    progress: watch::Sender<Progress>,
    slot: ImportSlot,
}

/// Where the stream stands.
struct Cursor {
    /// Absolute offset of the next byte to receive.
    pos: u64,
    /// Item being received: 0 the header, i + 1 frame i.
    item: usize,
    reader: StreamReader,
    header_bytes: Vec<u8>,
    header: Option<KvHeader>,
    import: Option<Arc<KvImport>>,
    /// The whole stream as checked, for the disk cache.
    keep: Option<Vec<u8>>,
}

impl StreamJob {
    async fn run(mut self) {
        let r = self.stream().await;
        let err = match r {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = &err {
            // An incomplete import is abandoned: requests over it recompute the prefix.
            self.slot.lock().expect("import slot").take();
            tracing::warn!(name = %self.name, id = short(&self.id), "fetching the KV failed: {e}");
            if let Some(tx) = self.header_tx.take() {
                let _ = tx.send(Err(refused(&self.name, e.clone())));
            }
        }
        self.progress.send_modify(|p| {
            p.error = err;
            p.done = true;
        });
    }

    /// The end of item `i` (0 the header, i + 1 frame i).
    fn item_end(&self, i: usize) -> u64 {
        if i == 0 {
            self.manifest.header_bytes
        } else {
            let f = &self.frames[i - 1];
            f.offset + f.bytes
        }
    }

    async fn stream(&mut self) -> Result<(), FetchError> {
        let total = self.total;
        let mut c = Cursor {
            pos: 0,
            item: 0,
            reader: StreamReader::new(),
            header_bytes: Vec::with_capacity(self.manifest.header_bytes as usize),
            header: None,
            import: None,
            // Only a whole stream goes to the disk cache.
            keep: self
                .inner
                .cache
                .as_ref()
                .filter(|_| self.from == 0)
                .map(|_| Vec::with_capacity(total as usize)),
        };
        let mut failures = 0u32;
        let path = self.query_path(format!("/v1/kv/{}/stream", self.id), true);
        while c.pos < total {
            let range = (c.pos > 0).then(|| {
                (
                    reqwest::header::RANGE,
                    format!("bytes={}-{}", c.pos, total - 1),
                )
            });
            if c.pos > 0 {
                self.inner.n.resumes.fetch_add(1, Ordering::Relaxed);
            }
            let extra: Vec<_> = range.into_iter().collect();
            let before = c.pos;
            let r = self.inner.send(Method::GET, &path, &extra).await;
            let err = match r {
                Ok(resp) => {
                    let st = resp.status();
                    if (c.pos == 0 && st == StatusCode::OK)
                        || (c.pos > 0 && st == StatusCode::PARTIAL_CONTENT)
                    {
                        match self.consume(resp, &mut c).await {
                            Ok(()) => None,
                            Err(Stop::Fatal(e)) => return Err(e),
                            Err(Stop::Interrupted(why)) => Some(why),
                        }
                    } else if st == StatusCode::NOT_FOUND {
                        return Err(unavailable(&self.name, "the cloud no longer has this KV"));
                    } else if st.is_client_error() {
                        return Err(refused(&self.name, format!("the cloud answered {st}")));
                    } else {
                        Some(format!("the cloud answered {st}"))
                    }
                }
                Err(e) => Some(format!("cannot reach the cloud: {e}")),
            };
            if let Some(why) = err {
                if c.pos > before {
                    failures = 0;
                }
                failures += 1;
                if failures > self.inner.cfg.retries {
                    return Err(unavailable(&self.name, why));
                }
                tracing::info!(name = %self.name, at = c.pos, "stream interrupted ({why}); resuming");
                tokio::time::sleep(Duration::from_millis(50 << failures.min(6))).await;
            }
        }
        // Every frame arrived: the import begins now if it waited for the prefix.
        match self.begin_import(&mut c, true).await {
            Ok(()) => {}
            Err(Stop::Fatal(e)) => return Err(e),
            Err(Stop::Interrupted(why)) => return Err(unavailable(&self.name, why)),
        }
        // Every frame is written: store the checked stream.
        if let (Some(cache), Some(keep)) = (&self.inner.cache, c.keep.take()) {
            let key = ep_kv::codec::variant_key(&self.id, self.codec);
            match cache.put(&key, &self.mjson, &keep) {
                Ok(true) => {}
                Ok(false) => tracing::info!(
                    id = short(&self.id),
                    "KV larger than the disk cache budget; not cached"
                ),
                Err(e) => tracing::warn!(id = short(&self.id), "writing the KV disk cache: {e}"),
            }
        }
        tracing::info!(name = %self.name, id = short(&self.id), "cloud prompt KV complete");
        Ok(())
    }

    /// `path` with this stream's query (`codec`, and `from` for the stream).
    fn query_path(&self, path: String, stream: bool) -> String {
        let mut q = Vec::new();
        if self.codec != CODEC_RAW {
            q.push(format!(
                "codec={}",
                ep_kv::codec::codec_name(self.codec).unwrap_or("raw")
            ));
        }
        if stream && self.from > 0 {
            q.push(format!("from={}", self.from));
        }
        if q.is_empty() {
            path
        } else {
            format!("{path}?{}", q.join("&"))
        }
    }

    /// Begins the import once the header is in and (for a split) the prefix is computed; writes the
    /// frames that waited. With `wait`, waits for the prefix.
    async fn begin_import(&mut self, c: &mut Cursor, wait: bool) -> Result<(), Stop> {
        if c.import.is_some() {
            return Ok(());
        }
        let Some(h) = c.header.clone() else {
            return Ok(());
        };
        if let Some(rx) = self.prefix.as_mut() {
            let r = if wait {
                rx.await
            } else {
                match rx.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Ok(r) => Ok(r),
                    Err(oneshot::error::TryRecvError::Closed) => {
                        Ok(Err("the prefix computation stopped".into()))
                    }
                }
            };
            self.prefix = None;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Stop::Fatal(refused(&self.name, e))),
                Err(_) => {
                    return Err(Stop::Fatal(refused(
                        &self.name,
                        "the prefix computation stopped",
                    )))
                }
            }
        }
        let import = self
            .inner
            .engine
            .import_header_codec(&h, self.codec)
            .await
            .map_err(|e| Stop::Fatal(refused(&self.name, e.to_string())))?;
        let import = Arc::new(import);
        for (layer, start, end, k, v) in std::mem::take(&mut self.pending) {
            import
                .write_rows(layer, start, end, k, v)
                .map_err(|e| Stop::Fatal(refused(&self.name, e.to_string())))?;
            self.progress.send_modify(|p| p.frames_written += 1);
        }
        c.import = Some(import.clone());
        *self.slot.lock().expect("import slot") = Some(import);
        if let Some(tx) = self.header_tx.take() {
            let _ = tx.send(Ok(h));
        }
        Ok(())
    }

    /// Feeds one response's body, cut at item boundaries.
    async fn consume(&mut self, resp: reqwest::Response, c: &mut Cursor) -> Result<(), Stop> {
        let seq = resp.extensions().get::<Seq>().copied();
        let mut body = resp.bytes_stream();
        let mut arr = Arrivals::new(Instant::now());
        let r = self.consume_body(&mut body, c, &mut arr, seq).await;
        if arr.total() >= 256 << 10 {
            if let Some(rate) = arr.rate() {
                self.inner.link.rate_sample(rate);
            }
        }
        r
    }

    async fn consume_body(
        &mut self,
        body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
        c: &mut Cursor,
        arr: &mut Arrivals,
        seq: Option<Seq>,
    ) -> Result<(), Stop> {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Stop::Interrupted(format!("reading the stream: {e}")))?;
            arr.push(chunk.len());
            self.inner.count_down(seq, chunk.len() as u64);
            self.inner
                .n
                .kv_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let mut rest: &[u8] = &chunk;
            while !rest.is_empty() {
                if c.item > self.frames.len() {
                    return Err(Stop::Interrupted(
                        "the stream is longer than its manifest".into(),
                    ));
                }
                let end = self.item_end(c.item);
                let take = rest.len().min((end - c.pos) as usize);
                c.reader.push(&rest[..take]);
                if c.item == 0 {
                    c.header_bytes.extend_from_slice(&rest[..take]);
                }
                rest = &rest[take..];
                c.pos += take as u64;
                if c.pos == end {
                    self.item_done(c).await?;
                }
            }
            if self.prefix.is_some() {
                self.begin_import(c, false).await?;
            }
        }
        if c.pos < self.total {
            return Err(Stop::Interrupted("the stream ended early".into()));
        }
        Ok(())
    }

    /// The bytes of the current item are all pushed: decode, check and use it.
    async fn item_done(&mut self, c: &mut Cursor) -> Result<(), Stop> {
        let item = c.reader.next_item();
        if c.item == 0 {
            let h = match item {
                Ok(Some(Item::Header(h))) => h,
                _ => {
                    return Err(Stop::Fatal(refused(
                        &self.name,
                        "the stream's header is bad",
                    )));
                }
            };
            self.inner
                .check_header(&self.name, &self.manifest, &h, &c.header_bytes)
                .map_err(Stop::Fatal)?;
            if let Some(k) = c.keep.as_mut() {
                k.extend_from_slice(&c.header_bytes);
            }
            c.header = Some(h);
            c.item = 1;
            return self.begin_import(c, false).await;
        }
        let fr = self.frames[c.item - 1].clone();
        let good = match item {
            Ok(Some(Item::Frame(f))) if frame_matches(&f, &fr) => Some(f),
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    _ => "it differs from the manifest".into(),
                };
                tracing::warn!(
                    name = %self.name,
                    layer = fr.layer,
                    start = fr.start,
                    "a frame failed its check ({why}); refetching it alone"
                );
                // The reader is failed (or misaligned): start a new one after the header.
                c.reader = StreamReader::new();
                c.reader.push(&c.header_bytes);
                let _ = c.reader.next_item();
                None
            }
        };
        let f = match good {
            Some(f) => f,
            None => self.refetch(&fr, c).await?,
        };
        if let Some(k) = c.keep.as_mut() {
            f.encode_into(k);
        }
        match c.import.as_ref() {
            Some(import) => {
                import
                    .write_frame(&f)
                    .map_err(|e| Stop::Fatal(refused(&self.name, e.to_string())))?;
                self.progress.send_modify(|p| p.frames_written += 1);
            }
            None => {
                // Decoded now, while the prefix is computed, so that only copying is left after.
                let h = c.header.as_ref().expect("the header came first");
                let bad = |e: String| Stop::Fatal(refused(&self.name, e));
                ep_kv::wire::validate_frame(h, &f).map_err(|e| bad(e.to_string()))?;
                if f.codec != self.codec {
                    return Err(bad("a frame of another codec".into()));
                }
                let n = (f.end - f.start) as usize;
                let (k, v) = ep_kv::codec::decode(f.codec, &h.layout, n, &f.payload)
                    .map_err(|e| bad(e.to_string()))?;
                self.pending
                    .push((f.layer as usize, f.start as usize, f.end as usize, k, v));
            }
        }
        c.item += 1;
        Ok(())
    }

    /// One frame fetched alone, checked like the stream's.
    async fn refetch(&self, fr: &ep_proto::FrameRef, c: &Cursor) -> Result<Frame, Stop> {
        self.inner.n.refetched.fetch_add(1, Ordering::Relaxed);
        let path = self.query_path(
            format!("/v1/kv/{}/frames/{}/{}", self.id, fr.layer, fr.start),
            false,
        );
        let header = c.header.as_ref().expect("the header came first");
        let mut last = String::new();
        for attempt in 0..=self.inner.cfg.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
            }
            let r = match self.inner.send(Method::GET, &path, &[]).await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    last = format!("the cloud answered {}", r.status());
                    let _ = self.inner.body(r).await;
                    continue;
                }
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let b = match self.inner.body(r).await {
                Ok(b) => b,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            self.inner
                .n
                .kv_bytes
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            match Frame::decode(&b) {
                Ok((f, n))
                    if n == b.len()
                        && frame_matches(&f, fr)
                        && ep_kv::wire::validate_frame(header, &f).is_ok() =>
                {
                    return Ok(f)
                }
                _ => {
                    // The cloud serves this frame bad too: it cannot be used.
                    return Err(Stop::Fatal(refused(
                        &self.name,
                        format!(
                            "the frame of layer {}, tokens {}..{} is bad when fetched alone too",
                            fr.layer, fr.start, fr.end
                        ),
                    )));
                }
            }
        }
        Err(Stop::Fatal(unavailable(
            &self.name,
            format!("refetching a frame: {last}"),
        )))
    }
}

enum Stop {
    /// Retry from where the stream stands.
    Interrupted(String),
    /// Give up.
    Fatal(FetchError),
}
