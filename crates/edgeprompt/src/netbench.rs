//! `edgeprompt bench network`: time to first token of a fresh edge on emulated links, per strategy of
//! getting a cloud prompt's KV (`fetch-f16`, `fetch-int8`, `fetch-int4`, `recompute`, `split`,
//! `adaptive`), the cloud and the edge real processes in two network namespaces joined by a shaped
//! link (`ep_netlab`), the benchmark driving both over unshaped control links.
//!
//! Per profile: the link is built and measured; a cloud starts in its namespace (its store kept
//! across profiles, so each prompt's KV is computed once); per prompt size, per rep, the strategies run
//! in a rotated order, each on a new edge process with an empty cache, which is started, waited for
//! (and for the adaptive policy, for its start-up measurements), then sent one streaming chat request;
//! the time to its first token is recorded. A strategy slower than `--censor` × the best so far in
//! its cell is stopped and recorded as censored.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;

use crate::{load, Common};

#[derive(Args)]
pub(crate) struct NetworkArgs {
    #[command(flatten)]
    common: Common,
    /// Link profiles: fiber, ideal_6g, 5g_urban, cell_edge, congested.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fiber,5g_urban,cell_edge"
    )]
    profiles: Vec<String>,
    /// Custom links MBIT,RTT_MS,LOSS_PCT (repeatable), measured besides the profiles.
    #[arg(long)]
    link: Vec<String>,
    /// Cloud prompt sizes in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    prompt_tokens: Vec<usize>,
    /// Strategies compared (`fetch-f16-serial`: fetch-f16 with requests waiting for the whole KV,
    /// to measure how much of the transfer the layer-by-layer start hides).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fetch-f16,fetch-int8,fetch-int4,recompute,split,adaptive"
    )]
    strategies: Vec<String>,
    /// Tokens of the user turn (text from the same document, after the prompts' part).
    #[arg(long, default_value_t = 16)]
    user_tokens: usize,
    /// Interleaved repetitions per cell (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Stop a strategy slower than this many times the best so far in its cell (censored).
    #[arg(long, default_value_t = 3.0)]
    censor: f64,
    /// Longest wait for a first token, in seconds (longer: censored).
    #[arg(long, default_value_t = 60.0)]
    max_ttft_s: f64,
    /// Tokens per KV frame at the cloud (the granularity of splits).
    #[arg(long, default_value_t = 64)]
    frame_tokens: usize,
    /// Codecs the adaptive edge may fetch (its quality floor).
    #[arg(long, default_value = "raw,int8,int4")]
    adaptive_codecs: String,
    /// Without namespaces: cloud and edge on loopback, unshaped (profile `loopback`; no root needed).
    #[arg(long)]
    loopback: bool,
    /// Public datasets directory (documents/rfc9000.txt is the prompts' text); default
    /// $EDGEPROMPT_DATASETS, then ../shared/datasets.
    #[arg(long)]
    datasets: Option<PathBuf>,
    /// Write the records as JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the cloud's and every edge's log in this directory (default: a scratch directory,
    /// removed).
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Also draw the medians as an SVG bar chart (TTFT per strategy, log scale; censored runs faded
    /// at the limit that stopped them).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Run nothing: read the records of an earlier `--json` file and print the table (and
    /// `--plot`).
    #[arg(long)]
    replot: Option<PathBuf>,
    /// Namespace and device name prefix.
    #[arg(long, default_value = "epb")]
    prefix: String,
}

#[derive(Serialize, serde::Deserialize, Clone, Debug)]
struct Record {
    profile: String,
    link_mbit: f64,
    link_rtt_ms: f64,
    link_loss_pct: f64,
    achieved_rtt_ms: Option<f64>,
    achieved_down_mbit: Option<f64>,
    achieved_up_mbit: Option<f64>,
    model: String,
    prompt_tokens: usize,
    strategy: String,
    rep: usize,
    ttft_ms: Option<f64>,
    /// A second request (another user turn of the same length) once the KV is resident: the edge's
    /// own compute time.
    warm_ttft_ms: Option<f64>,
    user_tokens: usize,
    censored: bool,
    /// For `adaptive`: the strategy it chose.
    chosen: Option<String>,
    /// KV bytes the edge received from the cloud.
    kv_bytes: Option<u64>,
    /// The limit a censored run was stopped at (ms).
    #[serde(default)]
    limit_ms: Option<f64>,
    error: Option<String>,
}

/// Where the two hosts run.
enum Hosts {
    Loopback,
    Netns(Box<ep_netlab::Link>),
}

impl Hosts {
    /// Where a server listens in its host: loopback, or every address of its namespace.
    fn listen(&self, port: u16) -> SocketAddr {
        match self {
            Hosts::Loopback => SocketAddr::from(([127, 0, 0, 1], port)),
            Hosts::Netns(_) => SocketAddr::from(([0, 0, 0, 0], port)),
        }
    }
    /// The cloud as the edge reaches it (over the shaped link).
    fn cloud_for_edge(&self, port: u16) -> SocketAddr {
        match self {
            Hosts::Loopback => SocketAddr::from(([127, 0, 0, 1], port)),
            Hosts::Netns(l) => SocketAddr::new(IpAddr::V4(l.cloud_link_ip()), port),
        }
    }
    /// The cloud as the benchmark reaches it (control link).
    fn cloud_ctl(&self, port: u16) -> SocketAddr {
        match self {
            Hosts::Loopback => SocketAddr::from(([127, 0, 0, 1], port)),
            Hosts::Netns(l) => SocketAddr::new(IpAddr::V4(l.cloud_ctl_ip()), port),
        }
    }
    fn edge_ctl(&self, port: u16) -> SocketAddr {
        match self {
            Hosts::Loopback => SocketAddr::from(([127, 0, 0, 1], port)),
            Hosts::Netns(l) => SocketAddr::new(IpAddr::V4(l.edge_ctl_ip()), port),
        }
    }
    fn command(&self, cloud: bool, exe: &Path) -> Command {
        match self {
            Hosts::Loopback => Command::new(exe),
            Hosts::Netns(l) => {
                let ns = if cloud { l.cloud_ns() } else { l.edge_ns() };
                l.command_in(ns, exe)
            }
        }
    }
}

/// A child process killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last 15 lines of a log file (empty if unreadable), for error messages.
pub(crate) fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18_400)
}

/// Text of the first `n` tokens of `doc` (less a margin for the chat template's own tokens).
pub(crate) fn prompt_text(
    tok: &ep_model::tokenizer::Tokenizer,
    doc: &str,
    n: usize,
) -> Result<String> {
    let ids = tok.encode(doc, false)?;
    let want = n.saturating_sub(24).max(1);
    if ids.len() < want {
        bail!(
            "the prompts' text has {} tokens, fewer than the {n} asked for",
            ids.len()
        );
    }
    Ok(tok.decode(&ids[..want]))
}

pub(crate) async fn wait_http(client: &reqwest::Client, url: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if t0.elapsed() > limit {
            bail!("{url} did not answer within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A metric's value in Prometheus text (first sample whose line starts with `name`).
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The strategy label in a `kv_strategy_decisions_total{strategy="…"}` line.
fn chosen_strategy(text: &str) -> Option<String> {
    text.lines()
        .filter(|l| l.starts_with("edgeprompt:kv_strategy_decisions_total{strategy=\""))
        .filter(|l| !l.ends_with(" 0"))
        .find_map(|l| l.split('"').nth(1).map(str::to_string))
}

struct CloudRun {
    _proc: Proc,
    port: u16,
    key: String,
}

const TOKEN: &str = "bench-network";

fn start_cloud(
    hosts: &Hosts,
    exe: &Path,
    store: &Path,
    a: &NetworkArgs,
    log: &Path,
) -> Result<CloudRun> {
    let key = {
        let out = Command::new(exe)
            .args(["cloud", "key", "--store"])
            .arg(store)
            .output()
            .context("running `edgeprompt cloud key`")?;
        if !out.status.success() {
            bail!(
                "edgeprompt cloud key: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let port = free_port();
    let mut cmd = hosts.command(true, exe);
    cmd.arg("cloud")
        .arg("--listen")
        .arg(hosts.listen(port).to_string())
        .arg("--store")
        .arg(store)
        .args(["--token", TOKEN, "--frame-tokens"])
        .arg(a.frame_tokens.to_string());
    model_args(&mut cmd, &a.common);
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).context("cloud log")?);
    let child = cmd.spawn().context("starting the cloud")?;
    Ok(CloudRun {
        _proc: Proc(child),
        port,
        key,
    })
}

fn model_args(cmd: &mut Command, c: &Common) {
    if let Some(m) = &c.model {
        cmd.arg("--model").arg(m);
    }
    if let Some(t) = c.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    if let Some(n) = c.ctx_size {
        cmd.arg("--ctx-size").arg(n.to_string());
    }
}

/// Registers `text` as cloud prompt `name` and waits until its KV is ready; returns its tokens.
pub(crate) async fn register(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    name: &str,
    text: &str,
) -> Result<usize> {
    let body = serde_json::json!({
        "name": name,
        "messages": [{"role": "system", "content": text}],
    });
    let r = client
        .post(format!("{base}/v1/cloud-prompts"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("registering {name}: {} {}", r.status(), r.text().await?);
    }
    let t0 = Instant::now();
    loop {
        let info: serde_json::Value = client
            .get(format!("{base}/v1/cloud-prompts/{name}"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        match info["status"].as_str() {
            Some("ready") => return Ok(info["tokens"].as_u64().unwrap_or(0) as usize),
            Some("failed") => bail!("the cloud failed to compute {name}: {}", info["error"]),
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("{name} was not computed within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Outcome {
    ttft_ms: Option<f64>,
    warm_ttft_ms: Option<f64>,
    censored: bool,
    chosen: Option<String>,
    kv_bytes: Option<u64>,
    error: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn one_edge(
    hosts: &Hosts,
    exe: &Path,
    a: &NetworkArgs,
    cloud: &CloudRun,
    strategy: &str,
    prompt: &str,
    model_id: &str,
    limit: Option<Duration>,
    log: &Path,
    users: (&str, &str),
) -> Result<Outcome> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let port = free_port();
    let mut cmd = hosts.command(false, exe);
    let (strategy, serial) = match strategy.strip_suffix("-serial") {
        Some(s) => (s, true),
        None => (strategy, false),
    };
    let codecs = if strategy == "adaptive" || strategy == "split" {
        a.adaptive_codecs.as_str()
    } else {
        "raw"
    };
    cmd.arg("edge")
        .arg("--listen")
        .arg(hosts.listen(port).to_string())
        .arg("--cloud-url")
        .arg(format!("http://{}", hosts.cloud_for_edge(cloud.port)))
        .args(["--cloud-token", TOKEN, "--cloud-key", &cloud.key])
        .args(["--allow-plain-http", "--kv-strategy", strategy])
        .args(["--kv-codecs", codecs])
        .args(["--model-id", model_id]);
    if serial {
        cmd.arg("--kv-serial");
    }
    model_args(&mut cmd, &a.common);
    cmd.env("EDGEPROMPT_LOG", "warn,ep_edge::decision=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).context("edge log")?);
    let _edge = Proc(cmd.spawn().context("starting an edge")?);
    let base = format!("http://{}", hosts.edge_ctl(port));
    wait_http(&client, &format!("{base}/health"), Duration::from_secs(120)).await?;
    if strategy == "adaptive" || strategy == "split" {
        // The edge measures its link and its prefill at start; the request comes after.
        let t0 = Instant::now();
        loop {
            let m = client
                .get(format!("{base}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            if metric(&m, "edgeprompt:kv_planner_ready") == Some(1.0) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the edge's start-up measurements did not finish within 120 s; its log ends:\n{}",
                    tail(log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The same warm-up for every edge: one short request without a cloud prompt (the weights
    // paged in, the threads started), after the adaptive edge's own measurements so as not to
    // disturb them.
    let warm = serde_json::json!({
        "model": model_id,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 2,
        "temperature": 0,
    });
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("bench-warmup")
        .json(&warm)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "the warm-up request got {}: {}",
            r.status(),
            r.text().await?
        );
    }
    let body = |user: &str| {
        serde_json::json!({
            "model": format!("{model_id}:{prompt}"),
            "messages": [{"role": "user", "content": user}],
            "max_tokens": 2,
            "temperature": 0,
            "stream": true,
        })
    };
    let timed = |body: serde_json::Value| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let t0 = Instant::now();
            first_token(&client, &base, &body)
                .await
                .map(|()| t0.elapsed())
        }
    };
    let req = timed(body(users.0));
    let (ttft, censored, error) = match limit {
        Some(l) => match tokio::time::timeout(l, req).await {
            Ok(Ok(t)) => (Some(t), false, None),
            Ok(Err(e)) => (None, false, Some(e.to_string())),
            Err(_) => (None, true, None),
        },
        None => match req.await {
            Ok(t) => (Some(t), false, None),
            Err(e) => (None, false, Some(e.to_string())),
        },
    };
    let warm_ttft_ms = if ttft_ok(&error, censored) {
        timed(body(users.1))
            .await
            .ok()
            .map(|t| t.as_secs_f64() * 1000.0)
    } else {
        None
    };
    let m = match client.get(format!("{base}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    Ok(Outcome {
        ttft_ms: ttft.map(|t| t.as_secs_f64() * 1000.0),
        warm_ttft_ms,
        censored,
        chosen: chosen_strategy(&m),
        kv_bytes: metric(&m, "edgeprompt:cloud_bytes_received_total").map(|b| b as u64),
        error,
    })
}

fn ttft_ok(error: &Option<String>, censored: bool) -> bool {
    error.is_none() && !censored
}

/// Sends a streaming chat request and returns when its first token's chunk arrives.
async fn first_token(client: &reqwest::Client, base: &str, body: &serde_json::Value) -> Result<()> {
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("bench-tenant")
        .json(body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("the edge answered {}: {}", r.status(), r.text().await?);
    }
    let mut s = r.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = s.next().await {
        buf.extend_from_slice(&chunk?);
        let text = String::from_utf8_lossy(&buf);
        // The first chunk with content (or the first token's chunk, whatever its text).
        if text.contains("\"content\"") || text.contains("\"finish_reason\":\"") {
            return Ok(());
        }
    }
    bail!("the stream ended before a token")
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub(crate) fn run(a: NetworkArgs) -> Result<()> {
    if let Some(f) = &a.replot {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let mut all = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let r: Record = serde_json::from_str(line).with_context(|| {
                format!("{} line {}: not a bench network record", f.display(), i + 1)
            })?;
            all.push(r);
        }
        let mut strategies: Vec<String> = Vec::new();
        for r in &all {
            if !strategies.contains(&r.strategy) {
                strategies.push(r.strategy.clone());
            }
        }
        print_table(&all, &strategies);
        if let Some(p) = &a.plot {
            plot_svg(&all, &strategies, p)?;
        }
        return Ok(());
    }
    for s in &a.strategies {
        ep_edge::plan::Policy::parse(s.strip_suffix("-serial").unwrap_or(s))
            .map_err(|e| anyhow::anyhow!("--strategies: {e}"))?;
    }
    let mut profiles: Vec<ep_netlab::Profile> = Vec::new();
    if a.loopback {
        profiles.push(ep_netlab::Profile {
            name: "loopback".into(),
            mbit: 0.0,
            rtt_ms: 0.0,
            loss_pct: 0.0,
            jitter_ms: 0.0,
        });
    } else {
        for p in &a.profiles {
            profiles.push(
                ep_netlab::Profile::named(p).map_err(|e| anyhow::anyhow!("--profiles: {e}"))?,
            );
        }
        for l in &a.link {
            profiles.push(
                ep_netlab::Profile::parse_custom(l).map_err(|e| anyhow::anyhow!("--link: {e}"))?,
            );
        }
    }
    let datasets = ep_bench::batch::datasets_dir(a.datasets.clone()).context(
        "bench network needs documents/rfc9000.txt: pass --datasets DIR or set $EDGEPROMPT_DATASETS",
    )?;
    let doc_path = datasets.join("documents").join("rfc9000.txt");
    let doc = std::fs::read_to_string(&doc_path)
        .with_context(|| format!("reading {}", doc_path.display()))?;
    let l = load(&a.common)?;
    let model_path = a
        .common
        .model
        .clone()
        .unwrap_or_else(ep_model::paths::default_model_path);
    let model_id = "bench".to_string();
    let model_name = model_path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let texts: Vec<(usize, String)> = a
        .prompt_tokens
        .iter()
        .map(|&n| Ok((n, prompt_text(&l.tok, &doc, n)?)))
        .collect::<Result<_>>()?;
    // Two user turns of the same length from further on in the document.
    let users = {
        let ids = l.tok.encode(&doc, false)?;
        let start = a.prompt_tokens.iter().max().copied().unwrap_or(0) + 64;
        let n = a.user_tokens.max(1);
        if ids.len() < start + 2 * n {
            bail!("the document is too short for two {n}-token user turns");
        }
        (
            l.tok.decode(&ids[start..start + n]),
            l.tok.decode(&ids[start + n..start + 2 * n]),
        )
    };
    drop(l);
    let exe = std::env::current_exe().context("locating this executable")?;
    let work = tempfile::tempdir().context("a scratch directory")?;
    let store = work.path().join("cloud-store");
    let logs = match &a.logs {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => work.path().to_path_buf(),
    };
    let mut out = match &a.json {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut all: Vec<Record> = Vec::new();
    for prof in &profiles {
        let (hosts, achieved) = if a.loopback {
            (Hosts::Loopback, None)
        } else {
            let link = ep_netlab::Link::up(&a.prefix, prof)
                .with_context(|| format!("building the {} link", prof.name))?;
            let ach = link
                .measure()
                .with_context(|| format!("measuring the {} link", prof.name))?;
            eprintln!(
                "bench network: {} achieved RTT {:.1} ms, {:.1} Mbit/s down, {:.1} Mbit/s up",
                prof.name, ach.rtt_ms, ach.down_mbit, ach.up_mbit
            );
            (Hosts::Netns(Box::new(link)), Some(ach))
        };
        let cloud_log = logs.join(format!("cloud-{}.log", prof.name));
        let cloud = start_cloud(&hosts, &exe, &store, &a, &cloud_log)?;
        let ctl = format!("http://{}", hosts.cloud_ctl(cloud.port));
        let client = reqwest::Client::builder().no_proxy().build()?;
        let prompts: Vec<(usize, usize, String)> = rt.block_on(async {
            wait_http(&client, &format!("{ctl}/health"), Duration::from_secs(120)).await?;
            let mut v = Vec::new();
            for (n, text) in &texts {
                let name = format!("doc-{n}");
                let tokens = register(&client, &ctl, TOKEN, &name, text).await?;
                v.push((*n, tokens, name));
            }
            Ok::<_, anyhow::Error>(v)
        })?;
        for (asked, tokens, name) in &prompts {
            let mut best: Option<f64> = None;
            let mut cell: Vec<Record> = Vec::new();
            for rep in 0..a.reps {
                let k = a.strategies.len();
                for i in 0..k {
                    // Rotated per rep, so no strategy always runs first.
                    let strategy = &a.strategies[(i + rep) % k];
                    let censored_before =
                        cell.iter().any(|r| r.strategy == *strategy && r.censored);
                    let log = logs.join(format!("edge-{}-{asked}-{strategy}-{rep}.log", prof.name));
                    let rec_base = Record {
                        profile: prof.name.clone(),
                        link_mbit: prof.mbit,
                        link_rtt_ms: prof.rtt_ms,
                        link_loss_pct: prof.loss_pct,
                        achieved_rtt_ms: achieved.as_ref().map(|x| x.rtt_ms),
                        achieved_down_mbit: achieved.as_ref().map(|x| x.down_mbit),
                        achieved_up_mbit: achieved.as_ref().map(|x| x.up_mbit),
                        model: model_name.clone(),
                        prompt_tokens: *tokens,
                        strategy: strategy.clone(),
                        rep,
                        ttft_ms: None,
                        warm_ttft_ms: None,
                        user_tokens: a.user_tokens,
                        censored: true,
                        chosen: None,
                        kv_bytes: None,
                        limit_ms: None,
                        error: None,
                    };
                    if censored_before {
                        // Stopped once: not run again in this cell.
                        cell.push(rec_base);
                        continue;
                    }
                    let cap = a.max_ttft_s;
                    let limit = Some(Duration::from_secs_f64(
                        best.map_or(cap, |b| (b * a.censor / 1000.0).min(cap)),
                    ));
                    let limit_ms = limit.map(|l| l.as_secs_f64() * 1000.0);
                    let o = rt.block_on(one_edge(
                        &hosts,
                        &exe,
                        &a,
                        &cloud,
                        strategy,
                        name,
                        &model_id,
                        limit,
                        &log,
                        (&users.0, &users.1),
                    ));
                    let rec = match o {
                        Ok(o) => Record {
                            limit_ms: o.censored.then_some(limit_ms).flatten(),
                            ttft_ms: o.ttft_ms,
                            warm_ttft_ms: o.warm_ttft_ms,
                            censored: o.censored,
                            chosen: o.chosen,
                            kv_bytes: o.kv_bytes,
                            error: o.error,
                            ..rec_base
                        },
                        Err(e) => Record {
                            censored: false,
                            error: Some(format!("{e:#}")),
                            ..rec_base
                        },
                    };
                    if let Some(t) = rec.ttft_ms {
                        best = Some(best.map_or(t, |b: f64| b.min(t)));
                    }
                    eprintln!(
                        "bench network: {} {} tokens {strategy} rep {rep}: {}{}{}",
                        prof.name,
                        tokens,
                        rec.ttft_ms
                            .map_or("-".to_string(), |t| format!("{t:.0} ms")),
                        if rec.censored { " (censored)" } else { "" },
                        rec.chosen
                            .as_ref()
                            .filter(|_| strategy == "adaptive")
                            .map_or(String::new(), |c| format!(" chose {c}"))
                    );
                    if let Some(e) = &rec.error {
                        eprintln!("  error: {e} (log: {})", log.display());
                    }
                    if let Some(f) = out.as_mut() {
                        writeln!(f, "{}", serde_json::to_string(&rec)?)?;
                    }
                    cell.push(rec);
                }
            }
            all.extend(cell);
        }
        drop(cloud);
        if let Hosts::Netns(link) = hosts {
            link.down().context("tearing the link down")?;
        }
    }
    print_table(&all, &a.strategies);
    if let Some(p) = &a.plot {
        plot_svg(&all, &a.strategies, p)?;
    }
    Ok(())
}

/// The cells (profile, tokens) in order of appearance.
fn cells_of(all: &[Record]) -> Vec<(String, usize)> {
    let mut cells: Vec<(String, usize)> = Vec::new();
    for r in all {
        if !cells.contains(&(r.profile.clone(), r.prompt_tokens)) {
            cells.push((r.profile.clone(), r.prompt_tokens));
        }
    }
    cells
}

/// Median TTFT of a cell's strategy, and whether it is a censoring limit instead (every run
/// censored).
fn cell_value(all: &[Record], cell: &(String, usize), s: &str) -> Option<(f64, bool)> {
    let rs: Vec<&Record> = all
        .iter()
        .filter(|r| r.profile == cell.0 && r.prompt_tokens == cell.1 && r.strategy == s)
        .collect();
    let mut t: Vec<f64> = rs.iter().filter_map(|r| r.ttft_ms).collect();
    if let Some(m) = median(&mut t) {
        return Some((m, false));
    }
    let mut l: Vec<f64> = rs.iter().filter_map(|r| r.limit_ms).collect();
    median(&mut l).map(|m| (m, true))
}

/// Grouped bars: one group per cell, one bar per strategy, TTFT on a log axis.
fn plot_svg(all: &[Record], strategies: &[String], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let cells = cells_of(all);
    if cells.is_empty() {
        bail!("no records to plot");
    }
    let vals: Vec<f64> = cells
        .iter()
        .flat_map(|c| strategies.iter().filter_map(|s| cell_value(all, c, s)))
        .map(|(v, _)| v)
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min).max(1.0) / 2.0;
    // Room above the bars for the legend.
    let hi = vals.iter().copied().fold(0.0, f64::max) * 12.0;
    let width = (160 * cells.len() as u32).max(640) + 160;
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Time to first token of a fresh edge, per way of getting the cloud prompt's KV",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..cells.len() as f64, (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    let names: Vec<String> = cells.iter().map(|c| format!("{} {}", c.0, c.1)).collect();
    let label = |x: &f64| -> String {
        let i = x.floor();
        if (x - i - 0.5).abs() < 1e-6 && (i as usize) < names.len() {
            names[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * cells.len() + 1)
        .x_label_formatter(&label)
        .y_desc("TTFT, ms (log)")
        .draw()
        .map_err(|e| err(&e))?;
    let k = strategies.len().max(1) as f64;
    let w = 0.8 / k;
    for (si, s) in strategies.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = cells
            .iter()
            .enumerate()
            .filter_map(|(ci, c)| {
                let (v, censored) = cell_value(all, c, s)?;
                let x0 = ci as f64 + 0.1 + si as f64 * w;
                let style = if censored {
                    color.mix(0.25).filled()
                } else {
                    color.filled()
                };
                Some(Rectangle::new([(x0, lo), (x0 + w * 0.9, v)], style))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| err(&e))?
            .label(s.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Medians per (profile, prompt tokens) and strategy, as a Markdown table.
fn print_table(all: &[Record], strategies: &[String]) {
    let cells = cells_of(all);
    let mut head = "| profile | tokens |".to_string();
    for s in strategies {
        head.push_str(&format!(" {s} |"));
    }
    head.push_str(" adaptive chose |");
    println!("{head}");
    println!("|{}", "---|".repeat(strategies.len() + 3));
    for (p, n) in cells {
        let mut line = format!("| {p} | {n} |");
        for s in strategies {
            let rs: Vec<&Record> = all
                .iter()
                .filter(|r| r.profile == p && r.prompt_tokens == n && &r.strategy == s)
                .collect();
            let mut t: Vec<f64> = rs.iter().filter_map(|r| r.ttft_ms).collect();
            let cens = rs.iter().filter(|r| r.censored).count();
            let cellv = match median(&mut t) {
                Some(m) if cens == 0 => format!("{m:.0}"),
                Some(m) => format!("{m:.0} ({cens} censored)"),
                None if cens > 0 => "censored".into(),
                None => "error".into(),
            };
            line.push_str(&format!(" {cellv} |"));
        }
        let chose: Vec<String> = all
            .iter()
            .filter(|r| r.profile == p && r.prompt_tokens == n && r.strategy == "adaptive")
            .filter_map(|r| r.chosen.clone())
            .collect();
        line.push_str(&format!(" {} |", chose.join(", ")));
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_metrics_and_the_chosen_strategy() {
        let text = "# HELP x\nedgeprompt:kv_planner_ready 1\n\
            edgeprompt:kv_strategy_decisions_total{strategy=\"fetch-f16\"} 0\n\
            edgeprompt:kv_strategy_decisions_total{strategy=\"split\"} 1\n\
            edgeprompt:cloud_bytes_received_total 12345\n";
        assert_eq!(metric(text, "edgeprompt:kv_planner_ready"), Some(1.0));
        assert_eq!(
            metric(text, "edgeprompt:cloud_bytes_received_total"),
            Some(12345.0)
        );
        assert_eq!(metric(text, "edgeprompt:absent"), None);
        assert_eq!(chosen_strategy(text).as_deref(), Some("split"));
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}
