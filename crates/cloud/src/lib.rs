//! The EdgePrompt cloud: a registry of cloud prompts, their KV precomputed through the engine, encoded
//! once as an `ep_kv::wire` stream with an Ed25519-signed manifest ([`ep_proto::Manifest`]), kept in a
//! [`Store`] (a directory, or Redis shared by replicas) and served over HTTP to edges (the routes of
//! `ep_proto`, plus `/health`, `/metrics` and `/openapi.json`).
//!
//! **Registry.** A name points at versions; each version is a content id
//! (`ep_proto::prompt_id(identity digest, tokens)`). Registering new content under a name makes it the
//! current version; the previous one stays servable until its lease runs out (`lease_secs`, renewed by
//! edges with `POST /v1/kv/{id}/lease`), then it is garbage-collected with its KV unless another
//! version still names the same id. Registering content already stored computes nothing.
//!
//! **Status.** `queued → computing → ready | failed`, with `progress` (0 queued, 0.1 computing, 0.8
//! KV computed, 1 stored). Logs name prompts, ids, versions and token counts, never text or token ids.

pub mod http;
pub mod render;
pub mod store;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use ep_engine::Engine;
use ep_kv::identity::hex;
use ep_model::chat::ChatTemplate;
use ep_model::tokenizer::Tokenizer;
use ep_proto::{
    CloudPromptInfo, FrameRef, Layout, Manifest, PromptContent, PromptStatus, SignedManifest,
    MANIFEST_FORMAT,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use render::{render_cloud_prompt, template_digest, RenderError};
pub use store::{open_store, DirStore, Lease, RedisStore, Store, StoreError};

/// The model a cloud computes KV with.
pub struct CloudModel {
    pub engine: Arc<Engine>,
    pub tok: Arc<Tokenizer>,
    /// The chat template messages are rendered with (`None`: only text prompts are accepted).
    pub template: Option<Arc<ChatTemplate>>,
}

/// TLS certificate chain and private key (PEM files).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Settings of a cloud.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    /// Address to listen on (port 0: any free port; [`CloudServer::addr`] tells which).
    pub listen: SocketAddr,
    /// Bearer token every route but `/health` and `/openapi.json` requires.
    pub token: Option<String>,
    /// Serve HTTPS with these files.
    pub tls: Option<TlsFiles>,
    /// Tokens per KV frame.
    pub frame_tokens: usize,
    /// The wire codecs each prompt's KV is encoded with once and served in (`?codec=`); raw is
    /// always among them.
    pub codecs: Vec<u8>,
    /// Lease of a superseded version when its registration gives none (seconds).
    pub default_lease_secs: u64,
    /// Longest lease a registration may ask for (seconds).
    pub max_lease_secs: u64,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// How often expired superseded versions are collected.
    pub gc_interval: Duration,
    /// How long a replica's claim on a computation lasts unless renewed (it renews every third of
    /// it while it computes): a replica that dies mid-computation leaves the job to another after
    /// this long.
    pub job_lease: Duration,
    /// How often a replica looks for unfinished computations nobody holds (a replica that died,
    /// or this one restarted) and takes them over.
    pub takeover_interval: Duration,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8400)),
            token: None,
            tls: None,
            frame_tokens: 256,
            codecs: ep_kv::codec::CODECS.to_vec(),
            default_lease_secs: 600,
            max_lease_secs: 7 * 24 * 3600,
            max_body_bytes: 4 << 20,
            gc_interval: Duration::from_secs(30),
            job_lease: Duration::from_secs(15),
            takeover_interval: Duration::from_secs(5),
        }
    }
}

/// Errors of starting a cloud.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cloud configuration: {0}")]
    Config(String),
}

/// The registry's document of one name: its versions, oldest first; the last is current.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct NameRecord {
    name: String,
    versions: Vec<VersionRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct VersionRecord {
    id: String,
    version: u32,
    status: PromptStatus,
    progress: f32,
    tokens: usize,
    created_at: u64,
    lease_secs: u64,
    #[serde(default)]
    lease_until: Option<u64>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    stream_bytes: u64,
    #[serde(default)]
    kv: Vec<ep_proto::KvVariant>,
    content: PromptContent,
}

impl VersionRecord {
    fn info(&self, name: &str) -> CloudPromptInfo {
        CloudPromptInfo {
            name: name.to_string(),
            id: self.id.clone(),
            version: self.version,
            status: self.status,
            progress: self.progress,
            tokens: self.tokens,
            created_at: self.created_at,
            lease_until: self.lease_until,
            error: self.error.clone(),
            kv: self.kv.clone(),
        }
    }
}

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

pub(crate) struct Metrics {
    pub registry: prometheus_client::registry::Registry,
    pub registered: Counter,
    pub computed: Counter,
    pub failed: Counter,
    pub taken_over: Counter,
    pub elsewhere: Counter,
    pub kv_bytes: Counter,
    pub frames: Counter,
    pub requests: Family<RouteLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = prometheus_client::registry::Registry::with_prefix("edgeprompt_cloud");
        let m = Metrics {
            registered: Counter::default(),
            computed: Counter::default(),
            failed: Counter::default(),
            taken_over: Counter::default(),
            elsewhere: Counter::default(),
            kv_bytes: Counter::default(),
            frames: Counter::default(),
            requests: Family::default(),
            registry: Default::default(),
        };
        registry.register(
            "prompts_registered",
            "Cloud prompt versions registered",
            m.registered.clone(),
        );
        registry.register(
            "prompts_computed",
            "Cloud prompt KV computed and stored",
            m.computed.clone(),
        );
        registry.register(
            "prompts_failed",
            "Cloud prompt KV computations that failed",
            m.failed.clone(),
        );
        registry.register(
            "prompt_jobs_taken_over",
            "Unfinished computations nobody held that this replica took over (leased and ran)",
            m.taken_over.clone(),
        );
        registry.register(
            "prompt_jobs_elsewhere",
            "Computations this replica left to the replica holding their lease",
            m.elsewhere.clone(),
        );
        registry.register(
            "kv_frames_served",
            "KV frames whose first byte this replica sent (stream or frame route)",
            m.frames.clone(),
        );
        registry.register(
            "kv_bytes_served",
            "KV stream and frame bytes sent",
            m.kv_bytes.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            m.requests.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// A stored manifest, parsed and as served.
pub(crate) struct StoredManifest {
    pub signed: SignedManifest,
    pub json: Bytes,
}

struct Job {
    name: String,
    id: String,
    tokens: Vec<u32>,
    content: PromptContent,
    /// Queued by a sweep: an unfinished computation nobody held.
    takeover: bool,
}

/// Errors the HTTP layer reports: a status and an OpenAI-style body.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: axum::http::StatusCode,
    pub body: ep_proto::ErrorBody,
    /// Seconds for a `Retry-After` header (a store that is down for now).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(
        status: axum::http::StatusCode,
        message: impl Into<String>,
        param: Option<&str>,
        code: &str,
    ) -> Self {
        let kind = match status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        ApiError {
            status,
            body: ep_proto::ErrorBody::new(message, kind, param, Some(code)),
            retry_after: None,
        }
    }
    pub fn bad(message: impl Into<String>, param: Option<&str>, code: &str) -> Self {
        Self::new(axum::http::StatusCode::BAD_REQUEST, message, param, code)
    }
    pub fn not_found(message: impl Into<String>, code: &str) -> Self {
        Self::new(axum::http::StatusCode::NOT_FOUND, message, None, code)
    }
    pub fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {message}");
        Self::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            message.to_string(),
            None,
            "internal_error",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            // Redis restarting or out of reach: the request may succeed shortly, so say so.
            tracing::warn!("the store is unavailable: {e}");
            return ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    format!("the store is unavailable; retry later ({e})"),
                    None,
                    "store_unavailable",
                )
            };
        }
        ApiError::internal(e)
    }
}

/// The shared state of a running cloud.
pub(crate) struct Cloud {
    pub cfg: CloudConfig,
    pub store: Arc<dyn Store>,
    model: CloudModel,
    key: SigningKey,
    pub identity_hex: String,
    identity_digest: [u8; 32],
    template_digest: String,
    jobs: mpsc::UnboundedSender<Job>,
    /// Ids queued or computing in this process.
    inflight: Mutex<HashSet<String>>,
    /// Serialises this process's read-modify-write of records (the store's [`Lease::Registry`]
    /// serialises the replicas').
    registry_lock: tokio::sync::Mutex<()>,
    /// This replica's name in leases (random per process).
    pub replica: String,
    /// Numbers the registry leases this replica takes.
    lock_seq: std::sync::atomic::AtomicU64,
    pub metrics: Metrics,
}

/// How long the registry lease lasts if its holder dies holding it.
const REGISTRY_LEASE: Duration = Duration::from_secs(10);
/// How long a registry operation waits for the lease before answering 503.
const REGISTRY_WAIT: Duration = Duration::from_secs(10);

/// The registry held by this replica: the process's lock and the store's lease (released when
/// dropped, in the background).
pub(crate) struct RegistryGuard<'a> {
    _local: tokio::sync::MutexGuard<'a, ()>,
    store: Arc<dyn Store>,
    token: String,
}

impl Drop for RegistryGuard<'_> {
    fn drop(&mut self) {
        let (store, token) = (self.store.clone(), std::mem::take(&mut self.token));
        // Drop cannot await: the release runs as a task. Each acquisition has its own token, so a
        // later one of this replica waits for this release instead of taking it over.
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Err(e) = store.release_lease(&Lease::Registry, &token).await {
                    tracing::warn!("releasing the registry lease: {e}");
                }
            });
        }
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub use ep_proto::{valid_id, valid_name};

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The stream and the unsigned manifest of computed KV.
pub fn build_manifest(
    kv: &ep_engine::PromptKv,
    identity: &ep_kv::identity::ContentIdentity,
    frame_tokens: usize,
    codec: u8,
    content: PromptContent,
    template_digest: String,
) -> Result<(Vec<u8>, Manifest), ep_kv::codec::CodecError> {
    let digest = identity.digest();
    let (header, frames) = kv.to_frames_codec(digest, frame_tokens, codec)?;
    let header_bytes = header.encode();
    let mut offset = header_bytes.len() as u64;
    let refs: Vec<FrameRef> = frames
        .iter()
        .map(|f| {
            let bytes = f.encoded_len() as u64;
            let r = FrameRef {
                layer: f.layer,
                start: f.start,
                end: f.end,
                codec: f.codec,
                offset,
                bytes,
                digest: hex(&f.digest),
            };
            offset += bytes;
            r
        })
        .collect();
    let stream = ep_engine::kvio::encode_stream(&header, &frames);
    debug_assert_eq!(stream.len() as u64, offset);
    let l = header.layout;
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        id: ep_proto::prompt_id(&digest, &header.tokens),
        identity: identity.to_hex(),
        identity_digest: hex(&digest),
        content,
        template_digest,
        tokens: header.tokens.clone(),
        layout: Layout {
            n_layer: l.n_layer,
            n_head_kv: l.n_head_kv,
            head_dim: l.head_dim,
            block_tokens: l.block_tokens,
            dtype: l.dtype.name().to_string(),
        },
        block_hashes: header.block_hashes.iter().map(|h| h.to_hex()).collect(),
        header_bytes: header_bytes.len() as u64,
        header_digest: hex(blake3::hash(&header_bytes).as_bytes()),
        frames: refs,
        stream_bytes: stream.len() as u64,
        created_at: now_secs(),
    };
    Ok((stream, manifest))
}

pub use ep_kv::codec::variant_key as kv_key;

/// The listing entry of an encoding of `bytes` stream bytes.
fn kv_variant(codec: u8, bytes: u64) -> ep_proto::KvVariant {
    ep_proto::KvVariant {
        codec: ep_kv::codec::codec_name(codec).unwrap_or("?").to_string(),
        bytes,
    }
}

impl Cloud {
    pub fn public_key_hex(&self) -> String {
        hex(self.key.verifying_key().as_bytes())
    }

    /// Takes the registry for a read-modify-write of records: this process's lock, then the store's
    /// lease (waited for, else 503 with `Retry-After`).
    async fn registry(&self) -> Result<RegistryGuard<'_>, ApiError> {
        let local = self.registry_lock.lock().await;
        let n = self
            .lock_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = format!("{}:{n}", self.replica);
        let t0 = Instant::now();
        let mut wait = Duration::from_millis(2);
        loop {
            if self
                .store
                .try_lease(&Lease::Registry, &token, REGISTRY_LEASE)
                .await?
            {
                return Ok(RegistryGuard {
                    _local: local,
                    store: self.store.clone(),
                    token,
                });
            }
            if t0.elapsed() > REGISTRY_WAIT {
                return Err(ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "the registry is held by another replica; retry later",
                        None,
                        "registry_busy",
                    )
                });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
        }
    }

    async fn load_record(&self, name: &str) -> Result<Option<NameRecord>, ApiError> {
        match self.store.get_record(name).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ApiError::internal(format!("the record of '{name}' is corrupt: {e}"))),
        }
    }

    async fn save_record(&self, rec: &NameRecord) -> Result<(), ApiError> {
        let b = serde_json::to_vec(rec).map_err(ApiError::internal)?;
        Ok(self.store.put_record(&rec.name, &b).await?)
    }

    /// The stored manifest of `id` (read from the store each time, so that what another replica
    /// collected is not served from memory).
    pub async fn manifest(&self, id: &str) -> Result<Option<Arc<StoredManifest>>, ApiError> {
        self.manifest_codec(id, ep_kv::identity::CODEC_RAW).await
    }

    /// The stored manifest of the KV of `id` encoded with `codec`.
    pub async fn manifest_codec(
        &self,
        id: &str,
        codec: u8,
    ) -> Result<Option<Arc<StoredManifest>>, ApiError> {
        let Some(json) = self.store.get_manifest(&kv_key(id, codec)).await? else {
            return Ok(None);
        };
        let signed: SignedManifest = serde_json::from_slice(&json)
            .map_err(|e| ApiError::internal(format!("the manifest of {id} is corrupt: {e}")))?;
        Ok(Some(Arc::new(StoredManifest {
            signed,
            json: Bytes::from(json),
        })))
    }

    /// Registers content under a name (`POST /v1/cloud-prompts`). Returns the version and whether it
    /// is new.
    pub async fn register(
        &self,
        req: ep_proto::RegisterCloudPrompt,
    ) -> Result<(CloudPromptInfo, bool), ApiError> {
        if !valid_name(&req.name) {
            return Err(ApiError::bad(
                "'name' must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'",
                Some("name"),
                "invalid_name",
            ));
        }
        let content = req
            .content()
            .map_err(|m| ApiError::bad(m, Some("messages"), "invalid_content"))?;
        let lease_secs = req.lease_secs.unwrap_or(self.cfg.default_lease_secs);
        if lease_secs == 0 || lease_secs > self.cfg.max_lease_secs {
            return Err(ApiError::bad(
                format!(
                    "'lease_secs' must be between 1 and {}",
                    self.cfg.max_lease_secs
                ),
                Some("lease_secs"),
                "invalid_lease",
            ));
        }
        let (tok, template, c) = (
            self.model.tok.clone(),
            self.model.template.clone(),
            content.clone(),
        );
        let tokens =
            tokio::task::spawn_blocking(move || render_cloud_prompt(&tok, template.as_deref(), &c))
                .await
                .map_err(ApiError::internal)?
                .map_err(|e| ApiError::bad(e.to_string(), None, "render_failed"))?;
        let max = self.model.engine.config().max_seq_len;
        if tokens.len() >= max {
            return Err(ApiError::bad(
                format!(
                    "the prompt has {} tokens; this cloud's engine holds at most {}",
                    tokens.len(),
                    max - 1
                ),
                None,
                "prompt_too_long",
            ));
        }
        let id = ep_proto::prompt_id(&self.identity_digest, &tokens);
        let _g = self.registry().await?;
        let now = now_secs();
        let mut rec = self.load_record(&req.name).await?.unwrap_or(NameRecord {
            name: req.name.clone(),
            versions: Vec::new(),
        });
        if let Some(cur) = rec.versions.last() {
            if cur.id == id {
                let stale = match cur.status {
                    PromptStatus::Ready => false,
                    PromptStatus::Failed => true,
                    // Queued or computing: stale when neither this replica has it in hand nor any
                    // replica holds its lease.
                    _ => !self.in_hand(&id).await?,
                };
                let info = cur.info(&rec.name);
                if stale {
                    self.enqueue(&mut rec, &id, tokens, content, false).await?;
                    let info = rec.versions.last().expect("current").info(&rec.name);
                    return Ok((info, false));
                }
                return Ok((info, false));
            }
        }
        let version = rec.versions.last().map_or(1, |v| v.version + 1);
        if let Some(prev) = rec.versions.last_mut() {
            prev.lease_until = Some(now + prev.lease_secs);
        }
        rec.versions.push(VersionRecord {
            id: id.clone(),
            version,
            status: PromptStatus::Queued,
            progress: 0.0,
            tokens: tokens.len(),
            created_at: now,
            lease_secs,
            lease_until: None,
            error: None,
            stream_bytes: 0,
            kv: Vec::new(),
            content: content.clone(),
        });
        self.metrics.registered.inc();
        tracing::info!(
            name = %req.name,
            id = short(&id),
            version,
            tokens = tokens.len(),
            "cloud prompt registered"
        );
        self.enqueue(&mut rec, &id, tokens, content, false).await?;
        let info = rec.versions.last().expect("current").info(&rec.name);
        Ok((info, true))
    }

    /// Queues the computation of the current version (`id`) of `rec` and saves the record.
    async fn enqueue(
        &self,
        rec: &mut NameRecord,
        id: &str,
        tokens: Vec<u32>,
        content: PromptContent,
        takeover: bool,
    ) -> Result<(), ApiError> {
        let v = rec.versions.last_mut().expect("a current version");
        v.status = PromptStatus::Queued;
        v.progress = 0.0;
        v.error = None;
        self.save_record(rec).await?;
        self.inflight
            .lock()
            .expect("inflight")
            .insert(id.to_string());
        let _ = self.jobs.send(Job {
            name: rec.name.clone(),
            id: id.to_string(),
            tokens,
            content,
            takeover,
        });
        Ok(())
    }

    /// Updates the status of version `id` of `name`.
    async fn set_status(
        &self,
        name: &str,
        id: &str,
        status: PromptStatus,
        progress: f32,
        error: Option<String>,
        kv: Vec<ep_proto::KvVariant>,
    ) -> Result<(), ApiError> {
        let stream_bytes = kv.iter().find(|v| v.codec == "raw").map_or(0, |v| v.bytes);
        let _g = self.registry().await?;
        let Some(mut rec) = self.load_record(name).await? else {
            return Ok(());
        };
        let mut changed = false;
        for v in rec.versions.iter_mut().filter(|v| v.id == id) {
            v.status = status;
            v.progress = progress;
            v.error = error.clone();
            if stream_bytes > 0 {
                v.stream_bytes = stream_bytes;
                v.kv = kv.clone();
            }
            changed = true;
        }
        if changed {
            self.save_record(&rec).await?;
        }
        Ok(())
    }

    async fn run_job(&self, job: Job) {
        let done = || {
            self.inflight.lock().expect("inflight").remove(&job.id);
        };
        // One replica computes: the one that holds the job's lease.
        let lease = Lease::Job(job.id.clone());
        let ttl = self.cfg.job_lease;
        match self.store.try_lease(&lease, &self.replica, ttl).await {
            Ok(true) if job.takeover => {
                self.metrics.taken_over.inc();
                tracing::info!(name = %job.name, id = short(&job.id), "took over an unfinished computation");
            }
            Ok(true) => {}
            Ok(false) => {
                self.metrics.elsewhere.inc();
                tracing::info!(name = %job.name, id = short(&job.id), "another replica holds the computation");
                return done();
            }
            Err(e) => {
                // Left unfinished in the record: a sweep takes it up again.
                tracing::warn!(name = %job.name, id = short(&job.id), "cannot take the computation's lease: {e}");
                return done();
            }
        }
        let renewer = {
            let (store, lease, owner) = (self.store.clone(), lease.clone(), self.replica.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match store.renew_lease(&lease, &owner, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!("the computation's lease was lost; another replica may compute it too");
                            break;
                        }
                        Err(e) => tracing::warn!("renewing the computation's lease: {e}"),
                    }
                }
            })
        };
        let t0 = Instant::now();
        let r = self.compute(&job).await;
        let (status, progress, error, kv) = match r {
            Ok(kv) => (PromptStatus::Ready, 1.0, None, kv),
            Err(e) => (PromptStatus::Failed, 0.0, Some(e), Vec::new()),
        };
        let bytes: u64 = kv.iter().map(|v| v.bytes).sum();
        match &error {
            None => tracing::info!(
                name = %job.name,
                id = short(&job.id),
                tokens = job.tokens.len(),
                stream_bytes = bytes,
                secs = t0.elapsed().as_secs_f64(),
                "cloud prompt ready"
            ),
            Some(e) => {
                self.metrics.failed.inc();
                tracing::warn!(name = %job.name, id = short(&job.id), "cloud prompt failed: {e}")
            }
        }
        if let Err(e) = self
            .set_status(&job.name, &job.id, status, progress, error, kv)
            .await
        {
            tracing::error!(name = %job.name, "cannot record the prompt's status: {:?}", e.body);
        }
        renewer.abort();
        if let Err(e) = self.store.release_lease(&lease, &self.replica).await {
            tracing::warn!(
                id = short(&job.id),
                "releasing the computation's lease: {e}"
            );
        }
        done();
    }

    /// The encodings of `id`'s KV in the store, with their stream sizes.
    async fn variants(&self, id: &str) -> Result<Vec<ep_proto::KvVariant>, ApiError> {
        let mut out = Vec::new();
        for &codec in &self.cfg.codecs {
            if let Some(m) = self.manifest_codec(id, codec).await? {
                out.push(kv_variant(codec, m.signed.manifest.stream_bytes));
            }
        }
        Ok(out)
    }

    /// Computes the KV of a job, encodes it once with each of the configured codecs, signs and stores
    /// every encoding (raw last: its manifest's presence means the job is done); returns what is
    /// stored.
    async fn compute(&self, job: &Job) -> Result<Vec<ep_proto::KvVariant>, String> {
        let err = |e: ApiError| e.body.error.message;
        if self.manifest(&job.id).await.map_err(err)?.is_some() {
            tracing::info!(id = short(&job.id), "KV already stored; not recomputed");
            return self.variants(&job.id).await.map_err(err);
        }
        self.set_status(
            &job.name,
            &job.id,
            PromptStatus::Computing,
            0.1,
            None,
            Vec::new(),
        )
        .await
        .map_err(err)?;
        tracing::info!(name = %job.name, id = short(&job.id), tokens = job.tokens.len(), "computing KV");
        let engine = self.model.engine.clone();
        let tokens = job.tokens.clone();
        let kv = tokio::task::spawn_blocking(move || engine.export_blocking(tokens))
            .await
            .map_err(|e| format!("the compute task failed: {e}"))?
            .map_err(|e| format!("computing the KV: {e}"))?;
        self.set_status(
            &job.name,
            &job.id,
            PromptStatus::Computing,
            0.8,
            None,
            Vec::new(),
        )
        .await
        .map_err(err)?;
        let kv = Arc::new(kv);
        let mut codecs: Vec<u8> = self
            .cfg
            .codecs
            .iter()
            .copied()
            .filter(|&c| c != ep_kv::identity::CODEC_RAW)
            .collect();
        codecs.push(ep_kv::identity::CODEC_RAW);
        let mut out = Vec::new();
        for codec in codecs {
            let (engine, frame_tokens, content, tdig, key, kv) = (
                self.model.engine.clone(),
                self.cfg.frame_tokens,
                job.content.clone(),
                match &job.content {
                    PromptContent::Messages(_) => self.template_digest.clone(),
                    PromptContent::Text(_) => String::new(),
                },
                self.key.clone(),
                kv.clone(),
            );
            let (stream, signed_json, manifest) = tokio::task::spawn_blocking(move || {
                let (stream, m) =
                    build_manifest(&kv, engine.identity(), frame_tokens, codec, content, tdig)?;
                let signed = ep_proto::sign(&key, m);
                let json = serde_json::to_vec(&signed).expect("a manifest serialises");
                Ok::<_, ep_kv::codec::CodecError>((stream, json, signed))
            })
            .await
            .map_err(|e| format!("the encode task failed: {e}"))?
            .map_err(|e| {
                format!(
                    "encoding the KV with {}: {e}",
                    ep_kv::codec::codec_name(codec).unwrap_or("?")
                )
            })?;
            if manifest.manifest.id != job.id {
                return Err("the computed KV's id differs from the registered one".into());
            }
            let n = stream.len() as u64;
            self.store
                .put_kv(&kv_key(&job.id, codec), Bytes::from(stream), &signed_json)
                .await
                .map_err(|e| e.to_string())?;
            out.push(kv_variant(codec, n));
        }
        self.metrics.computed.inc();
        out.reverse();
        Ok(out)
    }

    /// The current version of every name.
    pub async fn list(&self) -> Result<Vec<CloudPromptInfo>, ApiError> {
        let mut out = Vec::new();
        for name in self.store.list_names().await? {
            if let Some(rec) = self.load_record(&name).await? {
                if let Some(v) = rec.versions.last() {
                    out.push(v.info(&rec.name));
                }
            }
        }
        Ok(out)
    }

    /// The current version of `name`.
    pub async fn get(&self, name: &str) -> Result<CloudPromptInfo, ApiError> {
        let unknown =
            || ApiError::not_found(format!("no cloud prompt '{name}'"), "prompt_not_found");
        if !valid_name(name) {
            return Err(unknown());
        }
        let rec = self.load_record(name).await?.ok_or_else(unknown)?;
        rec.versions
            .last()
            .map(|v| v.info(&rec.name))
            .ok_or_else(unknown)
    }

    /// Removes `name` and every version of it (their KV unless another name holds the same id).
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        let unknown =
            || ApiError::not_found(format!("no cloud prompt '{name}'"), "prompt_not_found");
        if !valid_name(name) {
            return Err(unknown());
        }
        let _g = self.registry().await?;
        let rec = self.load_record(name).await?.ok_or_else(unknown)?;
        self.store.delete_record(name).await?;
        let ids: HashSet<String> = rec.versions.iter().map(|v| v.id.clone()).collect();
        self.drop_unreferenced(ids).await?;
        tracing::info!(name = %name, "cloud prompt deleted");
        Ok(())
    }

    /// Deletes the KV of those `ids` no record names.
    async fn drop_unreferenced(&self, mut ids: HashSet<String>) -> Result<(), ApiError> {
        for name in self.store.list_names().await? {
            if let Some(rec) = self.load_record(&name).await? {
                for v in &rec.versions {
                    ids.remove(&v.id);
                }
            }
        }
        for id in ids {
            for &codec in &self.cfg.codecs {
                if codec != ep_kv::identity::CODEC_RAW {
                    self.store.delete_kv(&kv_key(&id, codec)).await?;
                }
            }
            self.store.delete_kv(&id).await?;
            tracing::info!(id = short(&id), "KV deleted");
        }
        Ok(())
    }

    /// Renews the lease of version `id` (`POST /v1/kv/{id}/lease`).
    pub async fn renew(&self, id: &str) -> Result<ep_proto::Lease, ApiError> {
        let unknown =
            || ApiError::not_found(format!("no cloud prompt version {id}"), "kv_not_found");
        if !valid_id(id) {
            return Err(unknown());
        }
        let _g = self.registry().await?;
        let now = now_secs();
        let mut until = None;
        for name in self.store.list_names().await? {
            let Some(mut rec) = self.load_record(&name).await? else {
                continue;
            };
            let last = rec.versions.len().saturating_sub(1);
            let mut changed = false;
            for (i, v) in rec
                .versions
                .iter_mut()
                .enumerate()
                .filter(|(_, v)| v.id == id)
            {
                let t = now + v.lease_secs;
                if i < last {
                    if v.lease_until.is_some_and(|u| u < now) {
                        continue; // expired: collected soon, not revived
                    }
                    v.lease_until = Some(v.lease_until.map_or(t, |u| u.max(t)));
                    changed = true;
                }
                until = Some(until.map_or(t, |u: u64| u.max(t)));
            }
            if changed {
                self.save_record(&rec).await?;
            }
        }
        until
            .map(|lease_until| ep_proto::Lease {
                id: id.to_string(),
                lease_until,
            })
            .ok_or_else(unknown)
    }

    /// Removes superseded versions whose lease has run out, and their KV; returns how many.
    pub async fn gc(&self) -> Result<usize, ApiError> {
        let _g = self.registry().await?;
        let now = now_secs();
        let mut expired = HashSet::new();
        for name in self.store.list_names().await? {
            let Some(mut rec) = self.load_record(&name).await? else {
                continue;
            };
            let n = rec.versions.len();
            let mut keep = Vec::with_capacity(n);
            for (i, v) in rec.versions.drain(..).enumerate() {
                if i + 1 < n && v.lease_until.is_some_and(|u| u < now) {
                    tracing::info!(name = %name, version = v.version, id = short(&v.id), "superseded version expired");
                    expired.insert(v.id);
                } else {
                    keep.push(v);
                }
            }
            if keep.len() != n {
                rec.versions = keep;
                self.save_record(&rec).await?;
            }
        }
        let count = expired.len();
        if count > 0 {
            self.drop_unreferenced(expired).await?;
        }
        Ok(count)
    }

    /// Ready current versions (`GET /v1/prefetch`).
    pub async fn prefetch(&self) -> Result<ep_proto::PrefetchHints, ApiError> {
        let mut ids = Vec::new();
        for name in self.store.list_names().await? {
            if let Some(rec) = self.load_record(&name).await? {
                if let Some(v) = rec
                    .versions
                    .last()
                    .filter(|v| v.status == PromptStatus::Ready)
                {
                    ids.push(ep_proto::PrefetchHint {
                        name: rec.name.clone(),
                        id: v.id.clone(),
                        tokens: v.tokens,
                        stream_bytes: v.stream_bytes,
                    });
                }
            }
        }
        Ok(ep_proto::PrefetchHints { ids })
    }

    /// Whether the computation of `id` is in hand: queued or running in this replica, or its job
    /// lease held by some replica.
    async fn in_hand(&self, id: &str) -> Result<bool, ApiError> {
        if self.inflight.lock().expect("inflight").contains(id) {
            return Ok(true);
        }
        Ok(self
            .store
            .lease_holder(&Lease::Job(id.to_string()))
            .await?
            .is_some())
    }

    /// Takes over the unfinished computations nobody holds: current versions the store records as
    /// queued or computing whose job lease no replica holds (a replica died computing it, or this
    /// one stopped) and that this replica does not have in hand; returns how many it queued.
    async fn sweep(&self) -> Result<usize, ApiError> {
        let mut queued = 0;
        for name in self.store.list_names().await? {
            let unfinished = |rec: &NameRecord| {
                rec.versions
                    .last()
                    .filter(|v| matches!(v.status, PromptStatus::Queued | PromptStatus::Computing))
                    .map(|v| (v.id.clone(), v.content.clone()))
            };
            // Read first without the registry: most records are finished.
            let Some((id, _)) = self.load_record(&name).await?.as_ref().and_then(unfinished) else {
                continue;
            };
            if self.in_hand(&id).await? {
                continue;
            }
            let _g = self.registry().await?;
            let Some(mut rec) = self.load_record(&name).await? else {
                continue;
            };
            let Some((id, content)) = unfinished(&rec) else {
                continue;
            };
            // Again under the registry: another replica's sweep may have queued it meanwhile.
            if self.in_hand(&id).await? {
                continue;
            }
            let tok = self.model.tok.clone();
            let template = self.model.template.clone();
            let c = content.clone();
            let tokens = tokio::task::spawn_blocking(move || {
                render_cloud_prompt(&tok, template.as_deref(), &c)
            })
            .await
            .map_err(ApiError::internal)?;
            match tokens {
                Ok(t) if ep_proto::prompt_id(&self.identity_digest, &t) == id => {
                    tracing::info!(name = %name, id = short(&id), "an unfinished computation nobody holds");
                    self.enqueue(&mut rec, &id, t, content, true).await?;
                    queued += 1;
                }
                _ => {
                    tracing::warn!(name = %name, "an unfinished version no longer renders to its id; left as it is")
                }
            }
        }
        Ok(queued)
    }
}

/// A running cloud server.
pub struct CloudServer {
    addr: SocketAddr,
    tls: bool,
    key_hex: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl CloudServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Its base URL (`http://…` or `https://…`).
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }
    /// The manifest signing key (hex): what edges pin with `--cloud-key`.
    pub fn public_key(&self) -> &str {
        &self.key_hex
    }

    /// Stops accepting connections, lets requests in flight finish, then stops.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
        match (&mut self.server).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Runs until `signal` completes, then shuts down gracefully.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        signal.await;
        self.shutdown().await
    }
}

/// A fresh Ed25519 signing-key seed from the OS's random source.
pub fn generate_seed() -> [u8; 32] {
    SigningKey::generate(&mut rand::rngs::OsRng).to_bytes()
}

/// The public key (hex) of a signing-key seed.
pub fn public_key_of(seed: &[u8; 32]) -> String {
    hex(SigningKey::from_bytes(seed).verifying_key().as_bytes())
}

/// The public key (hex) of the signing key in `store`, if one was generated.
pub async fn stored_public_key(store: &dyn Store) -> Result<Option<String>, StoreError> {
    Ok(store
        .signing_key()
        .await?
        .map(|seed| hex(SigningKey::from_bytes(&seed).verifying_key().as_bytes())))
}

/// Runs `f` every `every` (the first time at once) until aborted, logging its errors as `what`.
fn periodic<F, Fut>(every: Duration, what: &'static str, f: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<usize, ApiError>> + Send,
{
    tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            if let Err(e) = f().await {
                tracing::warn!("{what}: {:?}", e.body);
            }
        }
    })
}

/// Starts a cloud: the signing key from the store (generated when absent), the compute worker, the
/// collector of expired versions and the HTTP(S) server.
pub async fn serve(
    mut cfg: CloudConfig,
    store: Arc<dyn Store>,
    model: CloudModel,
) -> Result<CloudServer, CloudError> {
    if !cfg.codecs.contains(&ep_kv::identity::CODEC_RAW) {
        cfg.codecs.push(ep_kv::identity::CODEC_RAW);
    }
    cfg.codecs.sort_unstable();
    cfg.codecs.dedup();
    if cfg.frame_tokens == 0 {
        return Err(CloudError::Config("frame_tokens must be at least 1".into()));
    }
    if let Some(&c) = cfg
        .codecs
        .iter()
        .find(|&&c| ep_kv::codec::codec_name(c).is_none())
    {
        return Err(CloudError::Config(format!("unknown KV codec id {c}")));
    }
    if cfg.token.as_deref().is_some_and(str::is_empty) {
        return Err(CloudError::Config("the token is empty".into()));
    }
    let seed = store.signing_key_or_insert(generate_seed()).await?;
    let key = SigningKey::from_bytes(&seed);
    let identity = model.engine.identity().clone();
    let template_digest = model
        .template
        .as_deref()
        .map(|t| hex(&template_digest(t)))
        .unwrap_or_default();
    let (jtx, mut jrx) = mpsc::unbounded_channel::<Job>();
    let cloud = Arc::new(Cloud {
        cfg: cfg.clone(),
        store,
        model,
        key,
        identity_hex: identity.to_hex(),
        identity_digest: identity.digest(),
        template_digest,
        jobs: jtx,
        inflight: Mutex::new(HashSet::new()),
        registry_lock: tokio::sync::Mutex::new(()),
        replica: format!("{}-{}", std::process::id(), &hex(&generate_seed())[..12]),
        lock_seq: Default::default(),
        metrics: Metrics::new(),
    });
    let key_hex = cloud.public_key_hex();
    let worker = {
        let c = cloud.clone();
        tokio::spawn(async move {
            while let Some(job) = jrx.recv().await {
                c.run_job(job).await;
            }
        })
    };
    let gc = {
        let c = cloud.clone();
        periodic(cfg.gc_interval, "collecting expired versions", move || {
            let c = c.clone();
            async move { c.gc().await }
        })
    };
    // The sweep's first tick is at once: what this replica left unfinished when it stopped.
    let sweeper = {
        let c = cloud.clone();
        periodic(
            cfg.takeover_interval,
            "looking for unfinished computations",
            move || {
                let c = c.clone();
                async move { c.sweep().await }
            },
        )
    };
    let app = http::router(cloud.clone());
    let std_listener = std::net::TcpListener::bind(cfg.listen)?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = match &cfg.tls {
        None => {
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.await;
                    })
                    .await
            })
        }
        Some(tls) => {
            let rc = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
                .await
                .map_err(|e| {
                    CloudError::Config(format!(
                        "TLS certificate {} / key {}: {e}",
                        tls.cert.display(),
                        tls.key.display()
                    ))
                })?;
            let handle = axum_server::Handle::new();
            let h = handle.clone();
            tokio::spawn(async move {
                let _ = stop_rx.await;
                h.graceful_shutdown(Some(Duration::from_secs(10)));
            });
            let srv = axum_server::from_tcp_rustls(std_listener, rc)?;
            tokio::spawn(async move { srv.handle(handle).serve(app.into_make_service()).await })
        }
    };
    tracing::info!(
        addr = %addr,
        tls = cfg.tls.is_some(),
        store = %cloud.store.describe(),
        identity = %cloud.identity_hex,
        key = %key_hex,
        "cloud listening"
    );
    Ok(CloudServer {
        addr,
        tls: cfg.tls.is_some(),
        key_hex,
        stop: Some(stop_tx),
        server,
        tasks: vec![worker, gc, sweeper],
    })
}
