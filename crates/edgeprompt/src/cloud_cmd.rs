//! `edgeprompt cloud`: the cloud prompt registry and KV server (`ep_cloud`), and `edgeprompt cloud key`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::{serve, thread_pool, Common, EngineOpts};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct CloudArgs {
    #[command(subcommand)]
    cmd: Option<CloudCommand>,
    #[command(flatten)]
    serve: CloudServeArgs,
}

#[derive(Subcommand)]
enum CloudCommand {
    /// Print the public key (hex) manifests are signed with — what edges pin with --cloud-key. The key
    /// is generated and stored when the store has none.
    Key(CloudKeyArgs),
}

#[derive(Args)]
struct CloudKeyArgs {
    /// The store: a directory, redis://HOST:PORT or redis-cluster://HOST:PORT[,HOST:PORT…].
    #[arg(long)]
    store: String,
}

#[derive(Args)]
struct CloudServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8400")]
    listen: SocketAddr,
    /// The store: a directory (created if missing), or redis://HOST:PORT (one Redis server) or
    /// redis-cluster://HOST:PORT[,HOST:PORT…] (a Redis Cluster, any of its nodes) shared by several
    /// replicas.
    #[arg(long)]
    store: Option<String>,
    /// Bearer token required on every route but /health and /openapi.json.
    #[arg(long, env = "EDGEPROMPT_CLOUD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// TLS certificate chain (PEM); serves HTTPS with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Tokens per KV frame.
    #[arg(long, default_value_t = 256)]
    frame_tokens: usize,
    /// KV encodings to compute once per prompt and serve (`raw` is always served).
    #[arg(long, value_delimiter = ',', default_value = "raw,int8,int4")]
    kv_codecs: Vec<String>,
    /// How long a superseded version stays servable after edges last renewed its lease (seconds),
    /// when its registration gives none.
    #[arg(long, default_value_t = 600)]
    lease_secs: u64,
    /// How long a replica's claim on a computation lasts unless renewed (seconds): a replica that
    /// dies computing leaves the job to another after this long.
    #[arg(long, default_value_t = 15)]
    job_lease_secs: u64,
    /// How often a replica looks for unfinished computations nobody holds and takes them over
    /// (seconds).
    #[arg(long, default_value_t = 5)]
    takeover_secs: u64,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    engine: EngineOpts,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub(crate) fn run(a: CloudArgs) -> Result<()> {
    match a.cmd {
        Some(CloudCommand::Key(k)) => runtime()?.block_on(async {
            let store = ep_cloud::open_store(&k.store).await?;
            let fresh = ed25519_seed();
            let seed = store.signing_key_or_insert(fresh).await?;
            let key = ep_cloud::public_key_of(&seed);
            println!("{key}");
            Ok(())
        }),
        None => serve_cloud(a.serve),
    }
}

fn ed25519_seed() -> [u8; 32] {
    ep_cloud::generate_seed()
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn serve_cloud(a: CloudServeArgs) -> Result<()> {
    let Some(store_spec) = a.store.clone() else {
        bail!("--store DIR|redis://HOST:PORT|redis-cluster://HOST:PORT[,…] is required");
    };
    if a.job_lease_secs < 3 {
        bail!("--job-lease-secs must be at least 3 (it is renewed every third of it)");
    }
    if a.takeover_secs == 0 {
        bail!("--takeover-secs must be at least 1");
    }
    if a.frame_tokens == 0 {
        bail!("--frame-tokens must be at least 1");
    }
    let mut codecs = Vec::new();
    for name in &a.kv_codecs {
        match ep_kv::codec::parse(name.trim()) {
            Some(c) => codecs.push(c),
            None => bail!("--kv-codecs: unknown codec '{name}' (raw, int8, int4)"),
        }
    }
    let sv = serve(&a.common, &a.engine, thread_pool(a.common.threads)?)?;
    let model = ep_cloud::CloudModel {
        engine: Arc::new(sv.engine),
        tok: sv.tok,
        template: sv.template.map(Arc::new),
    };
    let cfg = ep_cloud::CloudConfig {
        listen: a.listen,
        token: a.token.clone(),
        tls: match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => Some(ep_cloud::TlsFiles { cert, key }),
            _ => None,
        },
        frame_tokens: a.frame_tokens,
        codecs,
        default_lease_secs: a.lease_secs,
        job_lease: std::time::Duration::from_secs(a.job_lease_secs),
        takeover_interval: std::time::Duration::from_secs(a.takeover_secs),
        ..ep_cloud::CloudConfig::default()
    };
    runtime()?.block_on(async move {
        let store = ep_cloud::open_store(&store_spec)
            .await
            .with_context(|| format!("opening the store {store_spec}"))?;
        let server = ep_cloud::serve(cfg, store, model).await?;
        eprintln!(
            "cloud listening on {} (manifest key {})",
            server.url(),
            server.public_key()
        );
        server.run_until(shutdown_signal()).await?;
        eprintln!("cloud stopped");
        Ok(())
    })
}
