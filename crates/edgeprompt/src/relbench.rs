//! `edgeprompt bench reliability`: the edge under overload, a client that stops reading, the
//! prefix-cache timing side channel between tenants, and a long soak — a cloud and one edge as
//! processes on loopback, driven by the project's load generator (`ep_bench::serve`). The edge's RSS
//! and open files are read from `/proc` while it runs; its counters from `/metrics`.
//!
//! Phases (`--phases`, in this order):
//! - `overload`: `--clients` streaming requests at once against an edge holding `--max-seqs` +
//!   `--max-queue`: every request beyond answers 429 with `Retry-After`, every accepted one
//!   completes, the edge's peak RSS against the bound `model file + KV budget + clients ×
//!   per-connection cap + 256 MiB`.
//! - `stall`: Poisson load with and without one client that stops reading its stream (a 4 KiB
//!   receive buffer, never read), in `--stall-pairs` pairs of points that share their arrivals and
//!   the shape of their requests; the others' p90 TPOT, when the edge closed the stalled
//!   connection, and its RSS.
//! - `timing`: tenant A's private prompt cold, then warm, then tenant B's identical request (the
//!   CVE-2025-46570 check): B's latency and cached tokens must be those of a miss.
//! - `soak`: the sustained capacity of the mix (cloud prompts × tenants × edge prompts) by bisection
//!   on 60-second points, then `--soak-mins` at `--soak-fraction` of it: RSS, open files and KV use
//!   every 10 s, p99 latencies of the first and last 10 minutes.
//!
//! One JSON record per phase (`--json`), and a summary on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ep_bench::serve::{self, Job, Outcome, Slo, Target};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::netbench::{free_port, metric, prompt_text, tail, wait_http, Proc};
use crate::servebench::{exe, http_client, spawn};

const CLOUD_TOKEN: &str = "bench-cloud-token";
const MODEL_ID: &str = "bench";
/// Cloud prompts of the mix, and tenants (each its bearer token) with one edge prompt each.
const PROMPTS: usize = 4;
const TENANTS: usize = 4;

#[derive(Args)]
pub(crate) struct ReliabilityArgs {
    #[command(flatten)]
    common: crate::Common,
    /// Public datasets directory (RFC 9000 for the cloud prompts, ShareGPT for user turns); default
    /// $EDGEPROMPT_DATASETS, then ../shared/datasets.
    #[arg(long)]
    datasets: Option<PathBuf>,
    /// Phases to run: overload, stall, timing, soak.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "overload,stall,timing,soak"
    )]
    phases: Vec<String>,
    /// Write one JSON record per phase to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Concurrent streaming clients of the overload phase.
    #[arg(long, default_value_t = 2000)]
    clients: usize,
    /// The edge's batch (`--max-seqs`) and queue (`--max-queue`).
    #[arg(long, default_value_t = 64)]
    max_seqs: usize,
    #[arg(long, default_value_t = 192)]
    max_queue: usize,
    /// The edge's KV budget in MiB.
    #[arg(long, default_value_t = 1024)]
    kv_mem_mib: u64,
    /// The edge's largest request body in the run (the per-connection cap counts it).
    #[arg(long, default_value_t = 65536)]
    max_body_bytes: usize,
    /// The edge's write-stall timeout (its default is 30 s).
    #[arg(long, default_value_t = 30.0)]
    write_stall_secs: f64,
    /// Top log-probabilities the stalled client asks for (0: none): they make its events ~2 KB, so
    /// the buffers between it and the edge fill within seconds.
    #[arg(long, default_value_t = 20)]
    stall_top_logprobs: usize,
    /// Pairs of points (without and with the stalled client) of the stall phase, 60 s each point.
    #[arg(long, default_value_t = 4)]
    stall_pairs: usize,
    /// The stall phase's Poisson rate (req/s): the baseline must leave the edge headroom, or the
    /// points measure queueing rather than the stalled client.
    #[arg(long, default_value_t = 2.0)]
    stall_rate: f64,
    /// Tokens of each cloud prompt.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Output tokens per request (`ignore_eos`).
    #[arg(long, default_value_t = 32)]
    output_tokens: usize,
    /// Minutes of the soak.
    #[arg(long, default_value_t = 30.0)]
    soak_mins: f64,
    /// The soak's rate as a fraction of the measured capacity.
    #[arg(long, default_value_t = 0.7)]
    soak_fraction: f64,
    /// The soak's rate (req/s) instead of calibrating it.
    #[arg(long)]
    soak_rate: Option<f64>,
}

/// A running edge and what is known of its process.
struct Edge {
    proc: Proc,
    base: String,
    client: reqwest::Client,
    log: PathBuf,
}

impl Edge {
    fn pid(&self) -> u32 {
        self.proc.0.id()
    }
    fn target(&self) -> Target {
        Target {
            base_url: self.base.clone(),
            api_key: Some("tenant-0".into()),
        }
    }
    async fn metrics(&self) -> String {
        match self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
    async fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics().await, name).unwrap_or(f64::NAN)
    }
}

/// `VmRSS` of a process in bytes and its open file descriptors, from `/proc`.
fn proc_usage(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((kib << 10, fds))
}

/// CPU seconds (user + system) of each of a process's threads by thread name, from
/// `/proc/PID/task/*/stat` (Linux; ticks of 1/100 s).
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(a), Some(b)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[a + 1..b].to_string();
        let f: Vec<&str> = stat[b + 2..].split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += ticks / 100.0;
    }
    out
}

/// Per thread name, the CPU seconds between two [`thread_cpu`] readings, in % of one core over
/// `wall` seconds (threads that used none left out).
fn cpu_pct(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
    wall: f64,
) -> std::collections::BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v - before.get(k).unwrap_or(&0.0)) / wall * 100.0,
            )
        })
        .filter(|(_, v)| *v > 0.5)
        .map(|(k, v)| (k, (v * 10.0).round() / 10.0))
        .collect()
}

/// Samples a process's RSS and open files every `every` until stopped; keeps the maxima and, when
/// asked, the series.
struct Sampler {
    stop: Arc<AtomicBool>,
    data: Arc<Mutex<Samples>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Samples {
    max_rss: u64,
    max_fds: usize,
    /// `(seconds, rss bytes, fds)`.
    series: Vec<(f64, u64, usize)>,
}

impl Sampler {
    fn start(pid: u32, every: Duration, keep_series: bool) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let data = Arc::new(Mutex::new(Samples::default()));
        let (s, d) = (stop.clone(), data.clone());
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            while !s.load(Ordering::Relaxed) {
                if let Some((rss, fds)) = proc_usage(pid) {
                    let mut d = d.lock().expect("sampler lock");
                    d.max_rss = d.max_rss.max(rss);
                    d.max_fds = d.max_fds.max(fds);
                    if keep_series {
                        d.series.push((t0.elapsed().as_secs_f64(), rss, fds));
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
        Sampler { stop, data, task }
    }
    async fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let d = self.data.lock().expect("sampler lock");
        d.clone()
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// What every phase runs against.
struct Setup {
    dir: tempfile::TempDir,
    cloud_url: String,
    _cloud: Proc,
    turns: Vec<String>,
    /// Long texts for the timing phase (private prompts).
    private: Vec<String>,
    model: PathBuf,
    threads: usize,
}

async fn setup(a: &ReliabilityArgs, l: &crate::Loaded, datasets: &Path) -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let model = a
        .common
        .model
        .clone()
        .unwrap_or_else(ep_model::paths::default_model_path);
    let threads = a.common.threads.unwrap_or_else(rayon::current_num_threads);
    let port = free_port();
    let log = dir.path().join("cloud.log");
    let mut cmd = Command::new(exe()?);
    cmd.args(["cloud", "--listen", &format!("127.0.0.1:{port}"), "--store"])
        .arg(dir.path().join("store"))
        .arg("--model")
        .arg(&model)
        .args(["--threads", &threads.to_string(), "--token", CLOUD_TOKEN])
        .args(["--kv-codecs", "raw"]);
    let cloud = spawn(cmd, &log)?;
    let cloud_url = format!("http://127.0.0.1:{port}");
    let client = http_client()?;
    wait_http(
        &client,
        &format!("{cloud_url}/health"),
        Duration::from_secs(120),
    )
    .await
    .with_context(|| format!("the cloud did not start:\n{}", tail(&log)))?;
    let rfc_path = datasets.join("documents/rfc9000.txt");
    let rfc = std::fs::read_to_string(&rfc_path)
        .with_context(|| format!("reading {}", rfc_path.display()))?;
    // Cloud prompts: consecutive parts of the RFC, each preceded by its own instruction.
    let chunk = rfc.len() / (PROMPTS + 2);
    for p in 0..PROMPTS {
        let part = &rfc[floor_char(&rfc, p * chunk)..];
        let text = format!(
            "You are the QUIC assistant #{p}. Answer from this part of RFC 9000.\n\n{}",
            prompt_text(&l.tok, part, a.prompt_tokens)?
        );
        crate::netbench::register(&client, &cloud_url, CLOUD_TOKEN, &format!("p{p}"), &text)
            .await?;
    }
    let turns = crate::servebench::user_turns(l, datasets, 256)?;
    // Private prompts: later parts of the RFC (never a cloud prompt), ~1,000 tokens each.
    let tail_part = &rfc[floor_char(&rfc, PROMPTS * chunk)..];
    let ids = l.tok.encode(tail_part, false)?;
    let private = ids
        .chunks(1000)
        .take(6)
        .enumerate()
        .map(|(i, c)| format!("Private notes of case {i}:\n{}", l.tok.decode(c)))
        .collect();
    Ok(Setup {
        dir,
        cloud_url,
        _cloud: cloud,
        turns,
        private,
        model,
        threads,
    })
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

async fn start_edge(s: &Setup, a: &ReliabilityArgs, name: &str) -> Result<Edge> {
    let port = free_port();
    let log = s.dir.path().join(format!("edge-{name}.log"));
    let mut cmd = Command::new(exe()?);
    cmd.args(["edge", "--listen", &format!("127.0.0.1:{port}"), "--model"])
        .arg(&s.model)
        .args(["--threads", &s.threads.to_string(), "--model-id", MODEL_ID])
        .args(["--cloud-url", &s.cloud_url, "--cloud-token", CLOUD_TOKEN])
        .args(["--kv-strategy", "fetch-f16"])
        .args(["--max-seqs", &a.max_seqs.to_string()])
        .args(["--max-queue", &a.max_queue.to_string()])
        .args(["--kv-mem-mib", &a.kv_mem_mib.to_string()])
        .args(["--max-body-bytes", &a.max_body_bytes.to_string()])
        .args(["--write-stall-secs", &a.write_stall_secs.to_string()])
        .env("EDGEPROMPT_LOG", "warn");
    let proc = spawn(cmd, &log)?;
    let base = format!("http://127.0.0.1:{port}");
    let client = http_client()?;
    wait_http(&client, &format!("{base}/health"), Duration::from_secs(120))
        .await
        .with_context(|| format!("the edge did not start:\n{}", tail(&log)))?;
    let e = Edge {
        proc,
        base,
        client,
        log,
    };
    // Each tenant's edge prompt; one request per cloud prompt fetches its KV.
    for t in 0..TENANTS {
        let r = e
            .client
            .post(format!("{}/v1/edge-prompts", e.base))
            .bearer_auth(format!("tenant-{t}"))
            .json(&json!({
                "name": format!("site-{t}"),
                "text": format!("This branch is site {t}. Staff on duty: Alice {t}, Bob {t}. Opening hours 8 to {}.", 16 + t),
            }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("creating an edge prompt: {}", r.text().await?);
        }
    }
    let warm: Vec<Job> = (0..PROMPTS).map(|p| mix_job(s, a, p, 0, p, 0)).collect();
    let arrivals = vec![0.0; warm.len()];
    let (out, _) = serve::run_point(
        &e.client,
        &e.target(),
        &warm,
        &arrivals,
        Duration::from_secs(300),
        Duration::from_secs(300),
        Slo::default(),
    )
    .await;
    if let Some(o) = out.iter().find(|o| !o.ok) {
        bail!("warm-up request failed: {:?}\n{}", o.error, tail(&e.log));
    }
    Ok(e)
}

/// The `i`-th request of the mix: cloud prompt `i % PROMPTS`, tenant and edge prompt from `i`'s
/// other digits (every other request with its tenant's edge prompt), a ShareGPT user turn. `shift`
/// renumbers the tenants: the same requests in shape (cloud prompt, user turn, whether an edge
/// prompt comes with it), but none of their private blocks are in the prefix cache from the
/// unshifted ones (every block past the cloud prompt is keyed with the tenant's salt).
fn mix_job(
    s: &Setup,
    a: &ReliabilityArgs,
    i: usize,
    turn: usize,
    prompt: usize,
    shift: usize,
) -> Job {
    let tenant = (i / PROMPTS + shift) % TENANTS;
    Job {
        model: format!("{MODEL_ID}:p{prompt}"),
        messages: vec![("user".into(), s.turns[turn % s.turns.len()].clone())],
        max_tokens: a.output_tokens,
        api_key: Some(format!("tenant-{tenant}")),
        edge_prompt: (i / (PROMPTS * TENANTS))
            .is_multiple_of(2)
            .then(|| format!("site-{tenant}")),
    }
}

fn mix(s: &Setup, a: &ReliabilityArgs, n: usize, offset: usize, shift: usize) -> Vec<Job> {
    (0..n)
        .map(|i| mix_job(s, a, i + offset, i + offset, (i + offset) % PROMPTS, shift))
        .collect()
}

#[derive(Serialize)]
struct OverloadRecord {
    phase: &'static str,
    clients: usize,
    edge_capacity: usize,
    accepted: usize,
    completed: usize,
    rejected_429: usize,
    rejected_429_with_retry_after: usize,
    other_failures: usize,
    other_failure_example: Option<String>,
    wall_s: f64,
    idle_rss_mib: f64,
    peak_rss_mib: f64,
    peak_fds: usize,
    model_file_mib: f64,
    kv_budget_mib: f64,
    per_connection_cap_kib: f64,
    rss_bound_mib: f64,
    rss_per_connection_kib: f64,
    alive_after: bool,
    running_after: f64,
}

/// hyper's HTTP/1 read buffer stops growing at 8 KiB + 100 × 4 KiB (its `max_buf_size` default),
/// which bounds a connection's request head; the body is bounded by `--max-body-bytes`; hyper's
/// write queue holds at most 16 buffers of a response (small SSE events) — 64 KiB is a generous
/// ceiling for it and the request's queued events.
fn per_connection_cap(max_body: usize) -> u64 {
    (8 << 10) + 100 * (4 << 10) + max_body as u64 + (64 << 10)
}

async fn overload(s: &Setup, a: &ReliabilityArgs) -> Result<OverloadRecord> {
    let e = start_edge(s, a, "overload").await?;
    let idle = proc_usage(e.pid()).map(|u| u.0).unwrap_or(0);
    let sampler = Sampler::start(e.pid(), Duration::from_millis(50), false);
    let jobs = mix(s, a, a.clients, 1000, 0);
    let arrivals = vec![0.0; jobs.len()];
    let t0 = Instant::now();
    let (out, _) = serve::run_point(
        &e.client,
        &e.target(),
        &jobs,
        &arrivals,
        Duration::from_secs(900),
        Duration::from_secs(900),
        Slo::default(),
    )
    .await;
    let wall_s = t0.elapsed().as_secs_f64();
    let samples = sampler.finish().await;
    let accepted = out.iter().filter(|o| o.status == 200).count();
    let completed = out
        .iter()
        .filter(|o| o.status == 200 && o.finished && o.output_tokens == a.output_tokens)
        .count();
    let r429: Vec<&Outcome> = out.iter().filter(|o| o.status == 429).collect();
    let with_ra = r429.iter().filter(|o| o.retry_after.is_some()).count();
    let others: Vec<&Outcome> = out
        .iter()
        .filter(|o| o.status != 429 && !(o.status == 200 && o.finished))
        .collect();
    let alive = e
        .client
        .get(format!("{}/health", e.base))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    let running_after = e.metric("edgeprompt:num_requests_running").await;
    let model_file = std::fs::metadata(&s.model).map(|m| m.len()).unwrap_or(0);
    let kv = a.kv_mem_mib << 20;
    let cap = per_connection_cap(a.max_body_bytes);
    let bound = model_file + kv + a.clients as u64 * cap + (256 << 20);
    Ok(OverloadRecord {
        phase: "overload",
        clients: a.clients,
        edge_capacity: a.max_seqs + a.max_queue,
        accepted,
        completed,
        rejected_429: r429.len(),
        rejected_429_with_retry_after: with_ra,
        other_failures: others.len(),
        other_failure_example: others.first().and_then(|o| o.error.clone()),
        wall_s,
        idle_rss_mib: mib(idle),
        peak_rss_mib: mib(samples.max_rss),
        peak_fds: samples.max_fds,
        model_file_mib: mib(model_file),
        kv_budget_mib: mib(kv),
        per_connection_cap_kib: cap as f64 / 1024.0,
        rss_bound_mib: mib(bound),
        rss_per_connection_kib: samples.max_rss.saturating_sub(idle) as f64
            / 1024.0
            / a.clients as f64,
        alive_after: alive,
        running_after,
    })
}

#[derive(Serialize)]
struct StallPoint {
    /// The pair this point belongs to: both points of a pair have the same arrivals and requests
    /// of the same shape.
    pair: usize,
    with_stalled_client: bool,
    requests: usize,
    completed: usize,
    tpot_p90_ms: Option<f64>,
    ttft_p90_ms: Option<f64>,
    peak_rss_mib: f64,
    /// Seconds from the stalled client's request to the edge closing its connection.
    closed_after_s: Option<f64>,
    /// Bytes the stalled client had been sent when it finally read (kernel buffers).
    stalled_bytes_buffered: Option<usize>,
    /// The edge's CPU over the point by thread name, % of one core.
    edge_cpu_pct: std::collections::BTreeMap<String, f64>,
    /// This process's (the load generator's) CPU, % of one core.
    loadgen_cpu_pct: Option<f64>,
    /// Per request of the load: (seconds after the start it was sent, its TPOT in ms).
    tpot_by_sent: Vec<(f64, Option<f64>)>,
}

#[derive(Serialize)]
struct StallRecord {
    phase: &'static str,
    rate: f64,
    point_s: f64,
    write_stall_s: f64,
    points: Vec<StallPoint>,
    /// Mean p90 TPOT of the points with the stalled client over that of the points without.
    tpot_p90_ratio: Option<f64>,
    /// Each pair's p90 TPOT with over without.
    tpot_p90_ratio_by_pair: Vec<Option<f64>>,
    stalled_connections_closed: f64,
}

/// A client that sends a streaming request and then reads nothing, with a 4 KiB receive buffer.
async fn stalled_client(
    base: &str,
    prompt: usize,
    turn: &str,
    top_logprobs: usize,
) -> Result<tokio::net::TcpStream> {
    let addr: std::net::SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .context("edge address")?;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(4096)?;
    let mut s = sock.connect(addr).await?;
    let mut body = json!({
        "model": format!("{MODEL_ID}:p{prompt}"),
        "messages": [{"role": "user", "content": turn}],
        "max_tokens": 4000,
        "ignore_eos": true,
        "temperature": 0,
        "stream": true,
    });
    if top_logprobs > 0 {
        body["logprobs"] = true.into();
        body["top_logprobs"] = top_logprobs.into();
    }
    let body = body.to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer tenant-1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    Ok(s)
}

async fn stall(s: &Setup, a: &ReliabilityArgs) -> Result<StallRecord> {
    let e = start_edge(s, a, "stall").await?;
    let rate = a.stall_rate;
    let point_s = 60.0;
    let n = (rate * point_s) as usize;
    let mut points = Vec::new();
    let closed0 = e.metric("edgeprompt:connections_write_stalled_total").await;
    if a.stall_pairs * n > s.turns.len() {
        eprintln!(
            "warning: {} pairs of {n} requests need more user turns than the {} there are: later \
             pairs repeat earlier turns, and their first points may find them in the prefix cache \
             (fewer --stall-pairs or a lower --stall-rate avoid it)",
            a.stall_pairs,
            s.turns.len()
        );
    }
    // Points come in pairs, one without and one with the stalled client, that share their
    // arrivals and the shape of their requests (the same cloud prompts and user turns; the second
    // point's tenants renumbered, so nothing of the first point's private KV is a cache hit for
    // it). Arrivals differ from pair to pair, and so does which point goes first (without–with,
    // then with–without, …), so neither a burst of arrivals nor the run's drift falls on one side.
    let order: Vec<(usize, bool, usize)> = (0..a.stall_pairs)
        .flat_map(|pair| {
            let first_with = pair % 2 == 1;
            [(pair, first_with, 0), (pair, !first_with, 1)]
        })
        .collect();
    for (pair, with, shift) in order {
        let jobs = mix(s, a, n, 5000 + pair * n, shift);
        let arrivals = serve::poisson_arrivals(rate, n, 11 + pair as u64);
        let sampler = Sampler::start(e.pid(), Duration::from_millis(100), false);
        let before = e.metric("edgeprompt:connections_write_stalled_total").await;
        let cpu0 = thread_cpu(e.pid());
        let t0 = Instant::now();
        let staller = if with {
            Some(stalled_client(&e.base, 1, &s.turns[7], a.stall_top_logprobs).await?)
        } else {
            None
        };
        // Watch for the edge closing the stalled connection while the load runs.
        let watch = {
            let (c, base) = (e.client.clone(), e.base.clone());
            tokio::spawn(async move {
                while t0.elapsed() < Duration::from_secs(600) {
                    let t = match c.get(format!("{base}/metrics")).send().await {
                        Ok(r) => r.text().await.unwrap_or_default(),
                        Err(_) => String::new(),
                    };
                    if metric(&t, "edgeprompt:connections_write_stalled_total")
                        .is_some_and(|v| v > before)
                    {
                        return Some(t0.elapsed().as_secs_f64());
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                None
            })
        };
        let (out, st) = serve::run_point(
            &e.client,
            &e.target(),
            &jobs,
            &arrivals,
            Duration::from_secs(300),
            Duration::from_secs(300),
            Slo::default(),
        )
        .await;
        let tpot_by_sent = out
            .iter()
            .map(|o| (o.sent_s, o.tpot_s.map(|t| t * 1e3)))
            .collect();
        let (closed_after_s, buffered) = match staller {
            Some(mut sock) => {
                let closed = tokio::time::timeout(
                    Duration::from_secs_f64(a.write_stall_secs + 120.0),
                    watch,
                )
                .await
                .ok()
                .and_then(|r| r.ok())
                .flatten();
                // Now read what the kernel buffered, to the end the edge's close gives.
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::io::AsyncReadExt::read_to_end(&mut sock, &mut buf),
                )
                .await;
                (closed, Some(buf.len()))
            }
            None => {
                watch.abort();
                (None, None)
            }
        };
        let samples = sampler.finish().await;
        let edge_cpu_pct = cpu_pct(&cpu0, &thread_cpu(e.pid()), t0.elapsed().as_secs_f64());
        points.push(StallPoint {
            pair,
            edge_cpu_pct,
            loadgen_cpu_pct: st.loadgen_cpu_pct,
            tpot_by_sent,
            with_stalled_client: with,
            requests: st.requests,
            completed: st.completed,
            tpot_p90_ms: st.tpot_p90_ms,
            ttft_p90_ms: st.ttft_p90_ms,
            peak_rss_mib: mib(samples.max_rss),
            closed_after_s,
            stalled_bytes_buffered: buffered,
        });
    }
    let mean = |with: bool| {
        let v: Vec<f64> = points
            .iter()
            .filter(|p| p.with_stalled_client == with)
            .filter_map(|p| p.tpot_p90_ms)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    // With over without, where both were measured.
    let over = |w: Option<f64>, wo: Option<f64>| match (w, wo) {
        (Some(w), Some(wo)) if wo > 0.0 => Some(w / wo),
        _ => None,
    };
    let ratio = over(mean(true), mean(false));
    let by_pair = (0..a.stall_pairs)
        .map(|pair| {
            let p90 = |with: bool| {
                points
                    .iter()
                    .find(|p| p.pair == pair && p.with_stalled_client == with)
                    .and_then(|p| p.tpot_p90_ms)
            };
            over(p90(true), p90(false))
        })
        .collect();
    let closed = e.metric("edgeprompt:connections_write_stalled_total").await - closed0;
    Ok(StallRecord {
        phase: "stall",
        rate,
        point_s,
        write_stall_s: a.write_stall_secs,
        points,
        tpot_p90_ratio: ratio,
        tpot_p90_ratio_by_pair: by_pair,
        stalled_connections_closed: closed,
    })
}

#[derive(Serialize)]
struct TimingCase {
    prompt_tokens: u64,
    a_cold_ms: f64,
    a_warm_ms: f64,
    b_after_a_ms: f64,
    a_warm_cached: u64,
    b_cached: u64,
    public_tokens: u64,
}

#[derive(Serialize)]
struct TimingRecord {
    phase: &'static str,
    cases: Vec<TimingCase>,
    median_a_cold_ms: f64,
    median_a_warm_ms: f64,
    median_b_after_a_ms: f64,
    b_hits_private_tokens: bool,
}

/// One non-streaming request of one output token; (latency ms, prompt tokens, cached tokens).
async fn one_token(e: &Edge, tenant: &str, private: &str) -> Result<(f64, u64, u64)> {
    let body = json!({
        "model": format!("{MODEL_ID}:p0"),
        "messages": [{"role": "user", "content": private}],
        "max_tokens": 1,
        "temperature": 0,
    });
    let t0 = Instant::now();
    let r = e
        .client
        .post(format!("{}/v1/chat/completions", e.base))
        .bearer_auth(tenant)
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("timing request: {} {}", r.status(), r.text().await?);
    }
    let v: Value = r.json().await?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let u = &v["usage"];
    Ok((
        ms,
        u["prompt_tokens"].as_u64().unwrap_or(0),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

async fn timing(s: &Setup, a: &ReliabilityArgs) -> Result<TimingRecord> {
    let e = start_edge(s, a, "timing").await?;
    // The public part: what a request with a one-word user turn finds cached (the cloud prompt).
    let (_, _, public) = one_token(&e, "tenant-9", "hello").await?;
    let mut cases = Vec::new();
    for p in &s.private {
        let (cold, n, _) = one_token(&e, "tenant-a", p).await?;
        let (warm, _, warm_cached) = one_token(&e, "tenant-a", p).await?;
        let (b, _, b_cached) = one_token(&e, "tenant-b", p).await?;
        cases.push(TimingCase {
            prompt_tokens: n,
            a_cold_ms: cold,
            a_warm_ms: warm,
            b_after_a_ms: b,
            a_warm_cached: warm_cached,
            b_cached,
            public_tokens: public,
        });
    }
    Ok(TimingRecord {
        phase: "timing",
        median_a_cold_ms: median(cases.iter().map(|c| c.a_cold_ms).collect()),
        median_a_warm_ms: median(cases.iter().map(|c| c.a_warm_ms).collect()),
        median_b_after_a_ms: median(cases.iter().map(|c| c.b_after_a_ms).collect()),
        b_hits_private_tokens: cases.iter().any(|c| c.b_cached > c.public_tokens + 16),
        cases,
    })
}

#[derive(Serialize)]
struct SoakWindow {
    from_min: f64,
    to_min: f64,
    requests: usize,
    completed: usize,
    ttft_p99_ms: Option<f64>,
    e2e_p99_ms: Option<f64>,
    tpot_p99_ms: Option<f64>,
}

#[derive(Serialize)]
struct SoakRecord {
    phase: &'static str,
    calibration: Vec<(f64, bool, Option<f64>, Option<f64>)>,
    capacity_req_s: Option<f64>,
    rate: f64,
    minutes: f64,
    requests: usize,
    completed: usize,
    failed: usize,
    failure: Option<String>,
    first: SoakWindow,
    last: SoakWindow,
    e2e_p99_ratio_last_first: Option<f64>,
    rss_mib_first_10: f64,
    rss_mib_last_10: f64,
    rss_mib_max: f64,
    fds_max: usize,
    fds_first: usize,
    fds_last: usize,
    kv_usage_max: f64,
    /// `(minute, rss MiB, fds, kv usage, running, waiting)` every 10 s.
    series: Vec<(f64, f64, usize, f64, f64, f64)>,
}

fn window(out: &[Outcome], from_s: f64, to_s: f64) -> SoakWindow {
    let w: Vec<Outcome> = out
        .iter()
        .filter(|o| o.sent_s >= from_s && o.sent_s < to_s)
        .cloned()
        .collect();
    let st = serve::stats_of(&w, Slo::default());
    let ok: Vec<f64> = w.iter().filter(|o| o.ok).map(|o| o.e2e_s).collect();
    SoakWindow {
        from_min: from_s / 60.0,
        to_min: to_s / 60.0,
        requests: st.requests,
        completed: st.completed,
        ttft_p99_ms: st.ttft_p99_ms,
        e2e_p99_ms: serve::percentile(&ok, 99.0).map(|x| x * 1e3),
        tpot_p99_ms: st.tpot_p99_ms,
    }
}

async fn soak(s: &Setup, a: &ReliabilityArgs) -> Result<SoakRecord> {
    let e = start_edge(s, a, "soak").await?;
    let slo = Slo::default();
    let mut calibration = Vec::new();
    let capacity = match a.soak_rate {
        Some(_) => None,
        None => {
            // Sustained capacity: 60-second points, bisected between 0.25 and 8 req/s.
            let mut b = serve::Bisect::new(0.25, 8.0, 0.1, 6);
            let mut k = 0;
            while let Some(rate) = b.next() {
                let n = ((rate * 60.0).round() as usize).max(4);
                let jobs = mix(s, a, n, 20_000 + k * 1000, 0);
                let arr = serve::poisson_arrivals(rate, n, 100 + k as u64);
                let (_, st) = serve::run_point(
                    &e.client,
                    &e.target(),
                    &jobs,
                    &arr,
                    Duration::from_secs(300),
                    Duration::from_secs(120),
                    slo,
                )
                .await;
                eprintln!(
                    "calibration {rate:.2} req/s: p90 TTFT {:?} ms, p90 TPOT {:?} ms, met {}",
                    st.ttft_p90_ms.map(|v| v.round()),
                    st.tpot_p90_ms.map(|v| v.round()),
                    st.slo_met
                );
                calibration.push((rate, st.slo_met, st.ttft_p90_ms, st.tpot_p90_ms));
                b.record(rate, st.slo_met);
                k += 1;
            }
            b.best()
        }
    };
    let rate = match (a.soak_rate, capacity) {
        (Some(r), _) => r,
        (None, Some(c)) => c * a.soak_fraction,
        (None, None) => bail!("no rate met the objective in the calibration: {calibration:?}"),
    };
    let secs = a.soak_mins * 60.0;
    let n = (rate * secs).round() as usize;
    let jobs = mix(s, a, n, 100_000, 0);
    let arr = serve::poisson_arrivals(rate, n, 7);
    eprintln!(
        "soak: {n} requests at {rate:.2} req/s for {:.0} min",
        a.soak_mins
    );
    let sampler = Sampler::start(e.pid(), Duration::from_secs(10), true);
    let series = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (c, base, series, stop, pid) = (
            e.client.clone(),
            e.base.clone(),
            series.clone(),
            stop.clone(),
            e.pid(),
        );
        tokio::spawn(async move {
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let t = match c.get(format!("{base}/metrics")).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                let m = |n: &str| metric(&t, n).unwrap_or(f64::NAN);
                let (rss, fds) = proc_usage(pid).unwrap_or((0, 0));
                series.lock().expect("series").push((
                    t0.elapsed().as_secs_f64() / 60.0,
                    mib(rss),
                    fds,
                    m("edgeprompt:kv_cache_usage_perc"),
                    m("edgeprompt:num_requests_running"),
                    m("edgeprompt:num_requests_waiting"),
                ));
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        })
    };
    let (out, st) = serve::run_point(
        &e.client,
        &e.target(),
        &jobs,
        &arr,
        Duration::from_secs(300),
        Duration::from_secs(300),
        slo,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    let samples = sampler.finish().await;
    let series = series.lock().expect("series").clone();
    let ten = 600.0f64.min(secs / 3.0);
    let first = window(&out, 0.0, ten);
    let last = window(&out, secs - ten, secs + 1.0);
    let ratio = match (first.e2e_p99_ms, last.e2e_p99_ms) {
        (Some(f), Some(l)) if f > 0.0 => Some(l / f),
        _ => None,
    };
    let rss_in = |from: f64, to: f64| {
        let v: Vec<f64> = samples
            .series
            .iter()
            .filter(|x| x.0 >= from && x.0 < to)
            .map(|x| mib(x.1))
            .collect();
        v.iter().copied().fold(0.0, f64::max)
    };
    Ok(SoakRecord {
        phase: "soak",
        calibration,
        capacity_req_s: capacity,
        rate,
        minutes: a.soak_mins,
        requests: st.requests,
        completed: st.completed,
        failed: st.failed,
        failure: st.failure,
        rss_mib_first_10: rss_in(0.0, ten),
        rss_mib_last_10: rss_in(secs - ten, f64::INFINITY),
        rss_mib_max: mib(samples.max_rss),
        fds_max: samples.max_fds,
        fds_first: samples.series.first().map(|x| x.2).unwrap_or(0),
        fds_last: samples.series.last().map(|x| x.2).unwrap_or(0),
        kv_usage_max: series.iter().map(|x| x.3).fold(0.0, f64::max),
        e2e_p99_ratio_last_first: ratio,
        first,
        last,
        series,
    })
}

fn emit(file: &mut Option<std::fs::File>, v: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(v)?;
    println!("{line}");
    if let Some(f) = file {
        writeln!(f, "{line}")?;
        f.flush()?;
    }
    Ok(())
}

pub(crate) fn run(a: ReliabilityArgs) -> Result<()> {
    for p in &a.phases {
        if !["overload", "stall", "timing", "soak"].contains(&p.as_str()) {
            bail!("--phases: unknown phase '{p}' (overload, stall, timing, soak)");
        }
    }
    if a.phases.iter().any(|p| p == "stall") {
        if a.stall_pairs == 0 {
            bail!("--stall-pairs: the stall phase needs at least one pair");
        }
        if !(a.stall_rate.is_finite() && a.stall_rate > 0.0 && a.stall_rate <= 100.0) {
            bail!(
                "--stall-rate: {} is not a rate in (0, 100] req/s",
                a.stall_rate
            );
        }
    }
    let datasets = ep_bench::batch::datasets_dir(a.datasets.clone()).context(
        "bench reliability needs documents/rfc9000.txt and ShareGPT: pass --datasets DIR or set \
         $EDGEPROMPT_DATASETS",
    )?;
    let l = crate::load(&a.common)?;
    let mut file = match &a.json {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let s = setup(&a, &l, &datasets).await?;
        for p in &a.phases {
            eprintln!("phase {p}...");
            match p.as_str() {
                "overload" => emit(&mut file, &overload(&s, &a).await?)?,
                "stall" => emit(&mut file, &stall(&s, &a).await?)?,
                "timing" => emit(&mut file, &timing(&s, &a).await?)?,
                _ => emit(&mut file, &soak(&s, &a).await?)?,
            }
        }
        Ok(())
    })
}
