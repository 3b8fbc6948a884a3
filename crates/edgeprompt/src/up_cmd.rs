//! `edgeprompt up`: a cloud and an edge on loopback with the embedded defaults. It registers the
//! example cloud prompt (a care-desk assistant's long system prompt with policies and worked
//! examples), sends a chat request carrying private details through the edge, streams the answer, and
//! prints what crossed the network between edge and cloud — bytes each way, the request lines sent up,
//! and that none of the private values (nor their token ids) went up. A recording TCP proxy between
//! the edge and the cloud sees every byte.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ep_edge::fetch::FetcherConfig;
use ep_edge::{EdgeConfig, Fetcher};
use ep_engine::Engine;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{load, thread_pool, Common, EngineOpts};

/// The example cloud prompt `up` registers (written for this project).
pub const UP_CLOUD_PROMPT: &str = include_str!("../assets/up-cloud-prompt.txt");
const PROMPT_NAME: &str = "fjord-care";

/// The private details of the demo: in the user's message and in the shop's edge prompt.
const PRIVATE: [&str; 5] = [
    "Maria Jensen",
    "maria.jensen@example.org",
    "+45 20 12 34 56",
    "FL-0042-7781",
    "DK50 0040 0440 1162 43",
];

#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    engine: EngineOpts,
    /// Where the edge listens (the cloud takes a free loopback port).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// The cloud's store (default: $EDGEPROMPT_HOME/up/store, so the cloud prompt's KV is computed
    /// once across runs).
    #[arg(long)]
    store: Option<PathBuf>,
    /// The demo's user message.
    #[arg(
        long,
        default_value = "Hi, I'm Maria Jensen (maria.jensen@example.org, +45 20 12 34 56). My bill for account FL-0042-7781 is 40 euros higher than usual. What can I do?"
    )]
    message: String,
    /// Tokens to generate for the demo answer.
    #[arg(long, default_value_t = 96)]
    max_tokens: usize,
    /// Exit after the demo instead of serving until Ctrl-C.
    #[arg(long)]
    once: bool,
}

/// Bytes recorded by the proxy, each way.
#[derive(Default)]
struct Recorded {
    up: Vec<u8>,
    down: u64,
}

/// A loopback TCP proxy to `target` recording every byte sent up and counting those coming down.
async fn recording_proxy(target: SocketAddr) -> Result<(SocketAddr, Arc<Mutex<Recorded>>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let rec: Arc<Mutex<Recorded>> = Arc::default();
    let r = rec.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let ru = r.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    ru.lock().expect("recorder").up.extend_from_slice(&buf[..n]);
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = sw.shutdown().await;
            });
            let rd = r.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    rd.lock().expect("recorder").down += n as u64;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = cw.shutdown().await;
            });
        }
    });
    Ok((addr, rec))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Every way a run of token ids could be written up: decimal lists (JSON arrays, text) and
/// little-endian u32 bytes, for every window of 3 consecutive ids.
fn token_forms(ids: &[u32]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for w in ids.windows(3.min(ids.len()).max(1)) {
        let dec: Vec<String> = w.iter().map(|t| t.to_string()).collect();
        out.push(dec.join(",").into_bytes());
        out.push(dec.join(", ").into_bytes());
        out.push(w.iter().flat_map(|t| t.to_le_bytes()).collect());
    }
    out
}

pub fn run(a: UpArgs) -> Result<()> {
    let pool = Arc::new(thread_pool(a.common.threads)?);
    let l = pool.install(|| load(&a.common))?;
    let template = l
        .template
        .context("the model has no chat template; `up` needs a chat model")?;
    // The cloud renders with its own copy of the same template.
    let cloud_template = ep_model::chat::ChatTemplate::new(
        template.source(),
        template.bos_token(),
        template.eos_token(),
    )?;
    let cfg = ep_engine::EngineConfig {
        step_log: false,
        ..a.engine.config(l.n_ctx)?
    };
    let model = Arc::new(l.model);
    let tok = Arc::new(l.tok);
    // One model mapping, two engines: the cloud's (it computes the cloud prompt) and the edge's.
    let cloud_engine = Arc::new(Engine::start(
        model.clone(),
        tok.clone(),
        cfg.clone(),
        Some(pool.clone()),
    )?);
    let edge_engine = Arc::new(Engine::start(model, tok.clone(), cfg, Some(pool))?);
    let store_dir = a
        .store
        .clone()
        .unwrap_or_else(|| ep_model::paths::edgeprompt_home().join("up").join("store"));
    let cache = tempfile::tempdir().context("cannot make the edge's cache directory")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        // The cloud.
        let store: Arc<dyn ep_cloud::Store> = Arc::new(
            ep_cloud::DirStore::open(&store_dir)
                .with_context(|| format!("cloud store {}", store_dir.display()))?,
        );
        let token = ep_proto::hex(&ep_cloud::generate_seed()[..16]);
        let cloud = ep_cloud::serve(
            ep_cloud::CloudConfig {
                listen: "127.0.0.1:0".parse().expect("static address"),
                token: Some(token.clone()),
                ..ep_cloud::CloudConfig::default()
            },
            store,
            ep_cloud::CloudModel {
                engine: cloud_engine,
                tok: tok.clone(),
                template: Some(Arc::new(cloud_template)),
            },
        )
        .await
        .context("starting the cloud")?;
        let http = reqwest::Client::new();
        println!("cloud: {} (store {})", cloud.url(), store_dir.display());
        // Register the example cloud prompt and wait for its KV.
        let reg = http
            .post(format!("{}/v1/cloud-prompts", cloud.url()))
            .bearer_auth(&token)
            .json(&json!({
                "name": PROMPT_NAME,
                "messages": [{"role": "system", "content": UP_CLOUD_PROMPT}],
            }))
            .send()
            .await?;
        if !reg.status().is_success() {
            bail!("registering the cloud prompt: {}", reg.text().await?);
        }
        let bar = ProgressBar::new(100).with_style(
            ProgressStyle::with_template("cloud: computing the KV of '{msg}' [{bar:30}] {pos}%")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(PROMPT_NAME);
        let info: Value = loop {
            let v: Value = http
                .get(format!("{}/v1/cloud-prompts/{PROMPT_NAME}", cloud.url()))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            bar.set_position((v["progress"].as_f64().unwrap_or(0.0) * 100.0) as u64);
            match v["status"].as_str() {
                Some("ready") => break v,
                Some("failed") => bail!("the cloud failed to compute the prompt: {}", v["error"]),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        bar.finish_and_clear();
        let n_cloud = info["tokens"].as_u64().unwrap_or(0);
        println!(
            "cloud: '{PROMPT_NAME}' ready: {n_cloud} tokens, KV {} bytes in f16, signed (key {})",
            n_cloud * 23_040,
            &cloud.public_key()[..16]
        );
        // The edge, reaching the cloud through the recording proxy.
        let (proxy, rec) = recording_proxy(cloud.addr()).await?;
        let fetcher = Arc::new(
            Fetcher::new(
                FetcherConfig {
                    token: Some(token.clone()),
                    cloud_key: Some(cloud.public_key().to_string()),
                    cache_dir: Some(cache.path().to_path_buf()),
                    ..FetcherConfig::new(format!("http://{proxy}"))
                },
                edge_engine.clone(),
                template.source_digest(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("--listen {}", a.listen))?;
        let edge_addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let edge = tokio::spawn(ep_edge::serve_on(
            listener,
            EdgeConfig {
                listen: edge_addr,
                model_id: "edgeprompt".into(),
                ..EdgeConfig::default()
            },
            edge_engine,
            tok.clone(),
            Some(template),
            Some(fetcher.clone()),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let edge_url = format!("http://{edge_addr}");
        println!("edge: {edge_url} (OpenAI-compatible; model 'edgeprompt:{PROMPT_NAME}')");
        // The shop's private notes, registered on the edge only.
        let user_key = "demo-tenant";
        let notes = "Shop notes (private to this edge): subscriber Maria Jensen, plan Fjord Plus since 2023, \
             direct debit from IBAN DK50 0040 0440 1162 43, last bill 57.90 euros including a 40.00 euro \
             roaming charge from a trip outside the EU.";
        let r = http
            .post(format!("{edge_url}/v1/edge-prompts"))
            .bearer_auth(user_key)
            .json(&json!({"name": "shop-notes", "text": notes}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("registering the edge prompt: {}", r.text().await?);
        }
        println!("\nuser: {}\n", a.message);
        print!("assistant: ");
        let t0 = Instant::now();
        let resp = http
            .post(format!("{edge_url}/v1/chat/completions"))
            .bearer_auth(user_key)
            .json(&json!({
                "model": format!("edgeprompt:{PROMPT_NAME}"),
                "edge_prompt": "shop-notes",
                "messages": [{"role": "user", "content": a.message}],
                "temperature": 0,
                "max_tokens": a.max_tokens,
                "stream": true,
                "stream_options": {"include_usage": true},
            }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("the chat request failed: {}", resp.text().await?);
        }
        let mut body = resp.bytes_stream();
        let mut pending = String::new();
        let mut usage = Value::Null;
        let mut ttft = None;
        while let Some(chunk) = body.next().await {
            pending.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(i) = pending.find("\n\n") {
                let event: String = pending.drain(..i + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data)?;
                if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    ttft.get_or_insert_with(|| t0.elapsed());
                    print!("{t}");
                    use std::io::Write as _;
                    let _ = std::io::stdout().flush();
                }
                if !v["usage"].is_null() {
                    usage = v["usage"].clone();
                }
            }
        }
        println!("\n");
        // What crossed the network between edge and cloud.
        let (up, down) = {
            let r = rec.lock().expect("recorder");
            (r.up.clone(), r.down)
        };
        let lines: Vec<String> = String::from_utf8_lossy(&up)
            .lines()
            .filter(|l| {
                ["GET ", "POST ", "PUT ", "DELETE ", "HEAD "]
                    .iter()
                    .any(|m| l.starts_with(m))
            })
            .map(str::to_string)
            .collect();
        let mut leaked = Vec::new();
        for p in PRIVATE.iter().chain([a.message.as_str(), notes].iter()) {
            let ids = tok.encode(p, false).unwrap_or_default();
            if contains(&up, p.as_bytes()) || token_forms(&ids).iter().any(|f| contains(&up, f)) {
                leaked.push(*p);
            }
        }
        println!("network between edge and cloud (recorded by a proxy):");
        println!("  sent up:       {} bytes in {} requests", up.len(), lines.len());
        for l in &lines {
            println!("    {l}");
        }
        println!(
            "  received down: {down} bytes (the cloud prompt's KV: {n_cloud} tokens × 23,040 bytes = {})",
            n_cloud * 23_040
        );
        println!(
            "  usage: {} prompt tokens, {} of them not computed on this edge (cloud KV), {} generated; first token after {:.2} s",
            usage["prompt_tokens"],
            usage["prompt_tokens_details"]["cached_tokens"],
            usage["completion_tokens"],
            ttft.unwrap_or_default().as_secs_f64()
        );
        if leaked.is_empty() {
            println!(
                "  privacy: none of the {} private values, the message or the shop notes — as text or as token ids — went up",
                PRIVATE.len()
            );
        } else {
            bail!("private data went up to the cloud: {leaked:?}");
        }
        if !a.once {
            println!("\noperator page (chat and the privacy audit): {edge_url}/");
            println!("serving until Ctrl-C: try\n  curl {edge_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\":\"edgeprompt:{PROMPT_NAME}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Which plan has 25 GB?\"}}]}}'");
            let _ = tokio::signal::ctrl_c().await;
        }
        let _ = stop_tx.send(());
        let _ = edge.await;
        let _ = cloud.shutdown().await;
        Ok(())
    })
}
