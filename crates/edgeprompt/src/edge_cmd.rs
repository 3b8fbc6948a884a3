//! `edgeprompt edge`: the OpenAI-compatible server ([`ep_edge::serve`]) over a loaded model.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ep_edge::fetch::FetcherConfig;
use ep_edge::{ApiKeys, EdgeConfig, Fetcher};
use ep_engine::Engine;

use crate::{load, thread_pool, Common, EngineOpts};

#[derive(Args)]
pub struct EdgeArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    engine: EngineOpts,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// The model id clients name (default: the model file's stem); cloud prompts are
    /// "<model-id>:<cloud-prompt-name>".
    #[arg(long)]
    model_id: Option<String>,
    /// The cloud serving cloud prompts' KV (without it: plain inference, no cloud prompts).
    #[arg(long)]
    cloud_url: Option<String>,
    /// Bearer token for the cloud.
    #[arg(long, env = "EDGEPROMPT_CLOUD_TOKEN")]
    cloud_token: Option<String>,
    /// The cloud's manifest signing key (hex Ed25519 public key) to pin.
    #[arg(long)]
    cloud_key: Option<String>,
    /// A private CA certificate (PEM) the cloud's TLS certificate chains to.
    #[arg(long)]
    cloud_ca: Option<PathBuf>,
    /// Allow plain http:// to a cloud that is not on loopback (the token and KV travel in clear).
    #[arg(long)]
    allow_plain_http: bool,
    /// Disk cache of fetched cloud prompts (signed manifest + KV stream per prompt; re-checked on load).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// How cloud prompts' KV is obtained: `adaptive` (measure the link and this edge's prefill, then
    /// fetch, recompute or split per prompt for the lowest expected time to first token), or one of
    /// `fetch-f16`, `fetch-int8`, `fetch-int4`, `recompute`, `split`.
    #[arg(long, default_value = "adaptive")]
    kv_strategy: String,
    /// The quality floor of the adaptive choice: the KV codecs it may fetch (`raw` is exact;
    /// `int8`, `int4` are lossy, see `edgeprompt bench codecs`).
    #[arg(long, value_delimiter = ',', default_value = "raw")]
    kv_codecs: Vec<String>,
    /// Measurement switch: requests over a cloud prompt wait until its KV has fully arrived, instead
    /// of running each layer as soon as it is present.
    #[arg(long)]
    kv_serial: bool,
    /// Byte budget of the disk cache, in MiB.
    #[arg(long, default_value_t = 4096)]
    cache_mib: u64,
    /// API keys: one per line, or `key tenant` pairs (without: the bearer token is the tenant).
    #[arg(long)]
    api_keys: Option<PathBuf>,
    /// Requests held beyond the engine's batch before answering 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Sequences the engine runs at once.
    #[arg(long, default_value_t = 64)]
    max_seqs: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for (400 beyond; the OpenAPI description's maximum).
    /// Without: what the context leaves.
    #[arg(long)]
    max_tokens_limit: Option<usize>,
    /// Seconds a response may wait for a client that reads nothing (a zero receive window) before
    /// its connection is closed and its request cancelled.
    #[arg(long, default_value_t = 30.0)]
    write_stall_secs: f64,
}

pub fn run(a: EdgeArgs) -> Result<()> {
    if a.max_seqs == 0 {
        bail!("--max-seqs must be at least 1");
    }
    if a.max_tokens_limit == Some(0) {
        bail!("--max-tokens-limit must be at least 1");
    }
    if !(a.write_stall_secs.is_finite() && a.write_stall_secs > 0.0) {
        bail!("--write-stall-secs must be a positive number of seconds");
    }
    let api_keys = match &a.api_keys {
        Some(p) => Some(ApiKeys::load(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let pool = Arc::new(thread_pool(a.common.threads)?);
    let path = a
        .common
        .model
        .clone()
        .unwrap_or_else(ep_model::paths::default_model_path);
    let l = pool.install(|| load(&a.common))?;
    let cfg = ep_engine::EngineConfig {
        max_seqs: a.max_seqs,
        // A server runs for days: its step counters are the totals on /metrics.
        step_log: false,
        ..a.engine.config(l.n_ctx)?
    };
    let tok = Arc::new(l.tok);
    let engine = Arc::new(Engine::start(
        Arc::new(l.model),
        tok.clone(),
        cfg,
        Some(pool),
    )?);
    let model_id = a.model_id.clone().unwrap_or_else(|| {
        path.file_stem()
            .or(path.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "edgeprompt".into())
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let policy = ep_edge::plan::Policy::parse(&a.kv_strategy)
        .map_err(|e| anyhow::anyhow!("--kv-strategy: {e}"))?;
    let mut codecs = Vec::new();
    for name in &a.kv_codecs {
        match ep_kv::codec::parse(name.trim()) {
            Some(c) => codecs.push(c),
            None => bail!("--kv-codecs: unknown codec '{name}' (raw, int8, int4)"),
        }
    }
    let fetcher: Option<Arc<Fetcher>> = match &a.cloud_url {
        None => None,
        Some(url) => {
            let template_digest = l
                .template
                .as_ref()
                .map(|t| t.source_digest())
                .unwrap_or([0; 32]);
            let fc = FetcherConfig {
                token: a.cloud_token.clone(),
                cloud_key: a.cloud_key.clone(),
                cloud_ca: a.cloud_ca.clone(),
                allow_plain_http: a.allow_plain_http,
                cache_dir: a.cache_dir.clone(),
                cache_budget_bytes: a.cache_mib << 20,
                policy,
                codecs,
                serial: a.kv_serial,
                ..FetcherConfig::new(url.clone())
            };
            let _guard = rt.enter();
            Some(Arc::new(
                Fetcher::new(fc, engine.clone(), template_digest)
                    .map_err(|e| anyhow::anyhow!("--cloud-url {url}: {e}"))?,
            ))
        }
    };
    let cfg = EdgeConfig {
        listen: a.listen,
        model_id,
        api_keys,
        max_queue: a.max_queue,
        max_body_bytes: a.max_body_bytes,
        max_tokens_limit: a.max_tokens_limit,
        write_stall: std::time::Duration::from_secs_f64(a.write_stall_secs),
        ..EdgeConfig::default()
    };
    eprintln!(
        "edge: serving '{}' on http://{} (Ctrl-C or SIGTERM stops it after the running requests); \
         operator page: http://{}/",
        cfg.model_id, cfg.listen, cfg.listen
    );
    rt.block_on(ep_edge::serve(
        cfg,
        engine,
        tok,
        l.template,
        fetcher,
        shutdown_signal(),
    ))
    .with_context(|| format!("serving on {}", a.listen))?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("edge: stopping (finishing running requests)");
}
