//! `edgeprompt bench serve`: the paper's two scenarios against real servers, in one run.
//!
//! **Interactive**: a cloud (this binary, on loopback) holds the shared prompts; for each attention
//! mode an edge (`--attn-mode paged|relay|splice`, prefix caching on in all, KV fetched exactly) is
//! started, warmed up with one request per shared prompt and driven by the load generator
//! (`ep_bench::serve`) at each rate; then llama.cpp's `llama-server` on the same GGUF (the shared
//! prompt sent as the system message of every request, its prompt cache on), after a small sweep for
//! its best settings, with the same warm-up and load. Only one server runs at a time.
//!
//! **Non-interactive**: `bench batch` (the engine, every mode) and `llama-batched-bench -pps` on the
//! same MMLU prompts.
//!
//! Writes JSON lines (one record per point), a Markdown report and plots (SVG, and PNG where a
//! TrueType font is found).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ep_bench::serve::{self, Job, PointStats, Slo, Target};
use ep_model::chat::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::netbench::{free_port, tail, wait_http, Proc};

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    common: crate::Common,
    /// `quick` (the grid 0.5–8 req/s, 40 requests a rate; 37 min on 2 cores) or `full` (bisection
    /// of the SLO rate to 10%, output lengths from the Azure trace, a 7,680-token prefix point,
    /// Azure arrivals).
    #[arg(long, default_value = "quick")]
    size: String,
    /// Public datasets directory (MMLU, ShareGPT, length traces); default $EDGEPROMPT_DATASETS, then
    /// ../shared/datasets.
    #[arg(long)]
    datasets: Option<PathBuf>,
    /// Write the records as JSON lines to this file (also the report's directory unless --out-dir).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the report and plots go (default: next to --json, else ./bench-serve).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Systems to measure: paged, relay, splice (the edge's attention modes) and llama.cpp.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "paged,relay,splice,llama.cpp"
    )]
    systems: Vec<String>,
    /// Cases: `single` (one shared prompt of --shared-tokens) and `multi` (--groups MMLU subjects,
    /// each its own 5-shot prompt, requests spread over them).
    #[arg(long, value_delimiter = ',', default_value = "single,multi")]
    cases: Vec<String>,
    /// The rate grid (requests per second), instead of the size's.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Requests per rate, instead of the size's.
    #[arg(long)]
    requests: Option<usize>,
    /// Tokens of the single case's shared prompt (as rendered by the chat template).
    #[arg(long, default_value_t = 2048)]
    shared_tokens: usize,
    /// Shared prompts in the multi case.
    #[arg(long, default_value_t = 8)]
    groups: usize,
    /// Longest user turn (tokens); ShareGPT prompts longer are skipped.
    #[arg(long, default_value_t = 256)]
    max_user_tokens: usize,
    /// Output tokens per request (`ignore_eos`), quick size.
    #[arg(long, default_value_t = 64)]
    output_tokens: usize,
    /// The llama-server binary (default $EDGEPROMPT_HOME/peer/bin/llama-server, built by
    /// scripts/peer/build-llama-cpp.sh).
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// The llama-batched-bench binary (default next to llama-server).
    #[arg(long)]
    llama_batched_bench: Option<PathBuf>,
    /// llama-server settings instead of the sweep, e.g. "-np 4 -kvu".
    #[arg(long, allow_hyphen_values = true)]
    llama_args: Option<String>,
    /// Repetitions of the non-interactive (batch) part, the modes' order rotated each time; the
    /// report gives the median. Default: 1 at the quick size (its 40-minute budget), 3 at full.
    #[arg(long)]
    batch_reps: Option<usize>,
    /// Skip the non-interactive (batch) part.
    #[arg(long)]
    no_batch: bool,
    /// Skip the answer-quality part (MMLU through the fetched KV, recomputed KV and the peer).
    #[arg(long)]
    no_quality: bool,
    /// MMLU test questions per subject (4 subjects) in the answer-quality part.
    #[arg(long, default_value_t = 25)]
    quality_questions: usize,
    /// Draw the plots and report from an earlier --json file only.
    #[arg(long)]
    replot: Option<PathBuf>,
}

/// One measured point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    pub scenario: String,
    pub system: String,
    pub case: String,
    pub shared_tokens: usize,
    pub groups: usize,
    pub rate: f64,
    pub arrivals: String,
    pub output_tokens: usize,
    /// The server's settings (llama-server's flags; the edge's mode).
    pub config: String,
    #[serde(flatten)]
    pub stats: PointStats,
    /// The edge's engine steps during the point (from its `/metrics`); absent for llama-server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_profile: Option<StepProfile>,
}

/// Where an edge's engine steps spent their time during one point, per kind of step: means per step.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct StepProfile {
    /// Steps of decode rows only.
    pub decode: StepPhases,
    /// Steps with prompt rows (the user turns' prefill chunks), usually with decode rows beside them.
    pub prefill: StepPhases,
}

/// Means per step of one kind.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct StepPhases {
    pub steps: u64,
    pub prefill_tokens: f64,
    pub decode_tokens: f64,
    pub step_ms: f64,
    /// Weight products (the layers' and the logits').
    pub weights_ms: f64,
    pub attention_ms: f64,
    /// Norms, RoPE, SwiGLU, embedding.
    pub other_ms: f64,
    pub scheduler_ms: f64,
}

/// The `edgeprompt:engine_step*` samples of a `/metrics` text, by name and labels.
fn step_counters(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("edgeprompt:engine_step"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The profile of the steps between two scrapes of an edge's `/metrics`.
fn step_profile(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> StepProfile {
    let d =
        |k: String| after.get(&k).copied().unwrap_or(0.0) - before.get(&k).copied().unwrap_or(0.0);
    let phases = |step: &str| {
        let n = d(format!("edgeprompt:engine_steps_total{{step=\"{step}\"}}"));
        let per = |v: f64| if n > 0.0 { v / n } else { 0.0 };
        let tok = |kind: &str| {
            per(d(format!(
                "edgeprompt:engine_step_tokens_total{{step=\"{step}\",kind=\"{kind}\"}}"
            )))
        };
        let ms = |phase: &str| {
            per(d(format!(
                "edgeprompt:engine_step_seconds_total{{step=\"{step}\",phase=\"{phase}\"}}"
            ))) * 1e3
        };
        let (weights_ms, attention_ms, other_ms, scheduler_ms) =
            (ms("weights"), ms("attention"), ms("other"), ms("scheduler"));
        StepPhases {
            steps: n.max(0.0).round() as u64,
            prefill_tokens: tok("prefill"),
            decode_tokens: tok("decode"),
            step_ms: weights_ms + attention_ms + other_ms + scheduler_ms,
            weights_ms,
            attention_ms,
            other_ms,
            scheduler_ms,
        }
    };
    StepProfile {
        decode: phases("decode"),
        prefill: phases("prefill"),
    }
}

/// An edge's step counters once its engine runs no request (the engine publishes a step's counters
/// together with its running count, just after the step's last tokens went out; waited for at most
/// 2 s). `None` for a server without them, or when `/metrics` fails.
async fn scrape_steps(s: &Server) -> Option<BTreeMap<String, f64>> {
    let url = format!("{}/metrics", s.target.base_url);
    let mut text = String::new();
    for _ in 0..40 {
        text = s.client.get(&url).send().await.ok()?.text().await.ok()?;
        let idle = text
            .lines()
            .any(|l| l == "edgeprompt:num_requests_running 0");
        if idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = step_counters(&text);
    (!c.is_empty()).then_some(c)
}

/// A batch-scenario record (the engine's `bench batch` or llama-batched-bench).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct BatchRecord {
    pub scenario: String,
    pub system: String,
    pub shared_tokens: usize,
    pub batch: usize,
    pub groups: usize,
    pub gen_tokens: usize,
    pub decode_tok_s: f64,
    pub config: String,
}

const CLOUD_TOKEN: &str = "bench-serve";
const MODEL_ID: &str = "bench";

/// A shared prompt: its cloud name, its system text and its rendered token count.
struct Shared {
    name: String,
    text: String,
    tokens: usize,
}

struct Case {
    name: String,
    prompts: Vec<Shared>,
}

/// Sizes' grids.
struct Plan {
    rates: Vec<f64>,
    requests: usize,
    bisect: bool,
    azure: bool,
    trace_outputs: bool,
}

fn plan(a: &ServeArgs) -> Result<Plan> {
    let mut p = match a.size.as_str() {
        "quick" => Plan {
            rates: vec![0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
            requests: 40,
            bisect: false,
            azure: false,
            trace_outputs: false,
        },
        "full" => Plan {
            rates: vec![0.25, 16.0],
            requests: 100,
            bisect: true,
            azure: true,
            trace_outputs: true,
        },
        s => bail!("--size {s}: use quick or full"),
    };
    if !a.rates.is_empty() {
        if a.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            bail!("--rates: every rate must be a positive number");
        }
        p.rates = a.rates.clone();
    }
    if let Some(n) = a.requests {
        if n == 0 {
            bail!("--requests must be at least 1");
        }
        p.requests = n;
    }
    Ok(p)
}

/// The rendered token count of a system message `text` (what both servers prefill as the prefix).
fn rendered_tokens(l: &crate::Loaded, text: &str) -> Result<usize> {
    let msgs = [ChatMessage::new("system", text.to_string())];
    let ids = match &l.template {
        Some(t) => ep_model::chat::render_prompt(&l.tok, t, &msgs, false)?.tokens,
        None => l.tok.encode(text, false)?,
    };
    Ok(ids.len())
}

/// Text whose system message renders to exactly `n` tokens: a prefix of `source`'s tokens, adjusted
/// until the count is exact.
fn exact_system_text(l: &crate::Loaded, source: &str, n: usize) -> Result<String> {
    let ids = l.tok.encode(source, false)?;
    let overhead = rendered_tokens(l, "x")?.saturating_sub(1);
    let mut k = n.saturating_sub(overhead);
    for _ in 0..64 {
        if k == 0 || k > ids.len() {
            break;
        }
        let text = l.tok.decode(&ids[..k]);
        let got = rendered_tokens(l, &text)?;
        match got.cmp(&n) {
            std::cmp::Ordering::Equal => return Ok(text),
            std::cmp::Ordering::Less => k += 1,
            std::cmp::Ordering::Greater => k -= 1,
        }
    }
    bail!(
        "cannot cut the MMLU text to a system prompt of exactly {n} tokens (it has {} tokens)",
        ids.len()
    )
}

/// ShareGPT first-turn prompts of at most `max` tokens, in file order.
pub(crate) fn user_turns(l: &crate::Loaded, dir: &Path, max: usize) -> Result<Vec<String>> {
    let path = dir.join("sharegpt/ShareGPT_V3_filtered_500.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (ShareGPT)", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        let turn = v["conversations"]
            .as_array()
            .and_then(|c| c.iter().find(|m| m["from"] == "human"))
            .and_then(|m| m["value"].as_str());
        let Some(t) = turn.filter(|t| !t.trim().is_empty()) else {
            continue;
        };
        if l.tok.encode(t, false)?.len() <= max {
            out.push(t.to_string());
        }
    }
    if out.is_empty() {
        bail!("{}: no user turn of at most {max} tokens", path.display());
    }
    Ok(out)
}

fn cases(a: &ServeArgs, l: &crate::Loaded, dir: &Path, shared_tokens: usize) -> Result<Vec<Case>> {
    // MMLU 5-shot prompts, one per subject in name order (as `bench batch` builds them).
    let available = std::fs::read_dir(dir.join("mmlu/dev"))
        .with_context(|| format!("reading {}", dir.join("mmlu/dev").display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with("_dev.csv"))
        .count();
    let want = available.min(8).max(a.groups).max(1);
    let work = ep_bench::batch::Workload::mmlu(dir, want)?;
    let mut out = Vec::new();
    for c in &a.cases {
        match c.as_str() {
            "single" => {
                // The subjects' prompts one after another, cut to the exact length.
                let mut src = String::new();
                for t in &work.cloud_texts {
                    src.push_str(t);
                    if l.tok.encode(&src, false)?.len() > shared_tokens + 64 {
                        break;
                    }
                }
                let text = exact_system_text(l, &src, shared_tokens)?;
                out.push(Case {
                    name: "single".into(),
                    prompts: vec![Shared {
                        name: format!("mmlu-{shared_tokens}"),
                        tokens: rendered_tokens(l, &text)?,
                        text,
                    }],
                });
            }
            "multi" => {
                if a.groups == 0 || a.groups > work.cloud_texts.len() {
                    bail!(
                        "--groups {}: between 1 and {}",
                        a.groups,
                        work.cloud_texts.len()
                    );
                }
                let mut prompts = Vec::new();
                for (i, text) in work.cloud_texts.iter().take(a.groups).enumerate() {
                    prompts.push(Shared {
                        name: format!("mmlu-subject-{i}"),
                        tokens: rendered_tokens(l, text)?,
                        text: text.clone(),
                    });
                }
                out.push(Case {
                    name: "multi".into(),
                    prompts,
                });
            }
            x => bail!("--cases: unknown case '{x}' (single, multi)"),
        }
    }
    Ok(out)
}

/// The jobs of one point: user turns in order from `offset`, shared prompts picked at random
/// (seeded), outputs from `outputs` (cycled) or the fixed count.
fn jobs(
    case: &Case,
    system: &str,
    turns: &[String],
    n: usize,
    offset: usize,
    outputs: &[usize],
    seed: u64,
) -> Vec<Job> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = &case.prompts[(x % case.prompts.len() as u64) as usize];
            let user = turns[(offset + i) % turns.len()].clone();
            job(p, system, user, outputs[i % outputs.len()])
        })
        .collect()
}

/// A request after shared prompt `p`: the edge names the cloud prompt in the model id; llama-server
/// gets its text as the system message.
fn job(p: &Shared, system: &str, user: String, max_tokens: usize) -> Job {
    if system == "llama.cpp" {
        Job {
            model: MODEL_ID.into(),
            messages: vec![("system".into(), p.text.clone()), ("user".into(), user)],
            max_tokens,
            ..Job::default()
        }
    } else {
        Job {
            model: format!("{MODEL_ID}:{}", p.name),
            messages: vec![("user".into(), user)],
            max_tokens,
            ..Job::default()
        }
    }
}

pub(crate) fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating this binary")
}

pub(crate) fn spawn(mut cmd: Command, log: &Path) -> Result<Proc> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let f2 = f.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    Ok(Proc(child))
}

struct Cloud {
    _p: Proc,
    url: String,
}

/// A client that opens a connection per request: a kept-alive connection that the server closes
/// (cpp-httplib, under llama-server, times idle ones out and caps requests per connection) races with
/// its reuse and fails a request the server never saw; on loopback a connect costs microseconds.
pub(crate) fn http_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?)
}

/// What starting and driving a server needs.
struct Env<'a> {
    a: &'a ServeArgs,
    model: &'a Path,
    llama_server: &'a Path,
    threads: usize,
    /// Context per sequence (per slot for llama-server).
    ctx: usize,
    work: &'a Path,
    datasets: &'a Path,
}

/// The records of a run: kept for the report, and written as JSON lines as they come (an
/// interrupted run keeps what it measured).
#[derive(Default)]
struct Sink {
    points: Vec<Record>,
    batch: Vec<BatchRecord>,
    quality: Vec<QualityRecord>,
    file: Option<std::fs::File>,
}

impl Sink {
    fn write(&mut self, v: &impl Serialize) -> Result<()> {
        if let Some(f) = &mut self.file {
            serde_json::to_writer(&mut *f, v)?;
            f.write_all(b"\n")?;
            f.flush()?;
        }
        Ok(())
    }
    fn point(&mut self, r: Record) -> Result<()> {
        self.write(&r)?;
        self.points.push(r);
        Ok(())
    }
    fn batch(&mut self, r: BatchRecord) -> Result<()> {
        self.write(&r)?;
        self.batch.push(r);
        Ok(())
    }
    fn quality(&mut self, r: QualityRecord) -> Result<()> {
        self.write(&r)?;
        self.quality.push(r);
        Ok(())
    }
}

/// The requests' parts common to every point: user turns, output lengths, trace arrivals.
struct Inputs<'a> {
    turns: &'a [String],
    outputs: &'a [usize],
    azure: Option<&'a [f64]>,
    max_out: usize,
}

async fn start_cloud(env: &Env<'_>, cases: &[Case]) -> Result<Cloud> {
    let (model, threads, ctx, work) = (env.model, env.threads, env.ctx, env.work);
    let client = &http_client()?;
    let port = free_port();
    let log = work.join("cloud.log");
    let mut cmd = Command::new(exe()?);
    cmd.args(["cloud", "--listen", &format!("127.0.0.1:{port}"), "--store"])
        .arg(work.join("store"))
        .arg("--model")
        .arg(model)
        .args([
            "--threads",
            &threads.to_string(),
            "--ctx-size",
            &ctx.to_string(),
            "--token",
            CLOUD_TOKEN,
            "--kv-codecs",
            "raw",
        ]);
    let p = spawn(cmd, &log)?;
    let url = format!("http://127.0.0.1:{port}");
    wait_http(client, &format!("{url}/health"), Duration::from_secs(120))
        .await
        .with_context(|| format!("the cloud did not start:\n{}", tail(&log)))?;
    for c in cases {
        for s in &c.prompts {
            let r = client
                .post(format!("{url}/v1/cloud-prompts"))
                .bearer_auth(CLOUD_TOKEN)
                .json(&json!({"name": s.name, "messages": [{"role": "system", "content": s.text}]}))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!(
                    "registering {}: {}",
                    s.name,
                    r.text().await.unwrap_or_default()
                );
            }
        }
    }
    let t0 = Instant::now();
    for c in cases {
        for s in &c.prompts {
            loop {
                let v: Value = client
                    .get(format!("{url}/v1/cloud-prompts/{}", s.name))
                    .bearer_auth(CLOUD_TOKEN)
                    .send()
                    .await?
                    .json()
                    .await?;
                match v["status"].as_str() {
                    Some("ready") => break,
                    Some("failed") => bail!("the cloud failed to compute {}: {v}", s.name),
                    _ if t0.elapsed() > Duration::from_secs(900) => {
                        bail!("{} not ready after 15 minutes", s.name)
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    }
    Ok(Cloud { _p: p, url })
}

/// A server under test, running.
struct Server {
    _p: Proc,
    /// A client of this server alone ([`http_client`]: a connection per request).
    client: reqwest::Client,
    target: Target,
    config: String,
    log: PathBuf,
}

async fn start_edge(env: &Env<'_>, mode: &str, strategy: &str, cloud: &Cloud) -> Result<Server> {
    let (model, work, ctx, threads) = (env.model, env.work, env.ctx, env.threads);
    let port = free_port();
    let log = work.join(format!("edge-{mode}-{strategy}.log"));
    let mut cmd = Command::new(exe()?);
    cmd.args(["edge", "--listen", &format!("127.0.0.1:{port}"), "--model"])
        .arg(model)
        .args([
            "--threads",
            &threads.to_string(),
            "--ctx-size",
            &ctx.to_string(),
            "--attn-mode",
            mode,
            "--model-id",
            MODEL_ID,
            "--cloud-url",
            &cloud.url,
            "--cloud-token",
            CLOUD_TOKEN,
            "--kv-strategy",
            strategy,
            "--max-queue",
            "4096",
            "--max-seqs",
            "64",
            "--kv-mem-mib",
            "1536",
        ])
        .env("RUST_LOG", "warn");
    launch(
        cmd,
        port,
        log,
        Some("bench"),
        format!("edgeprompt edge --attn-mode {mode} --kv-strategy {strategy} --threads {threads}"),
    )
    .await
}

/// Starts a server on `port` (its output to `log`) and waits until its `/health` answers.
async fn launch(
    cmd: Command,
    port: u16,
    log: PathBuf,
    api_key: Option<&str>,
    config: String,
) -> Result<Server> {
    let client = http_client()?;
    let p = spawn(cmd, &log)?;
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&client, &format!("{base}/health"), Duration::from_secs(120))
        .await
        .with_context(|| format!("`{config}` did not start:\n{}", tail(&log)))?;
    Ok(Server {
        _p: p,
        client,
        target: Target {
            base_url: base,
            api_key: api_key.map(str::to_string),
        },
        config,
        log,
    })
}

async fn start_llama(env: &Env<'_>, flags: &str, slots: usize) -> Result<Server> {
    let (bin, model, threads, ctx_per_slot, work) =
        (env.llama_server, env.model, env.threads, env.ctx, env.work);
    let port = free_port();
    let log = work.join(format!("llama-server{}.log", flags.replace([' ', '-'], "")));
    let ctx = ctx_per_slot * slots;
    let mut cmd = Command::new(bin);
    cmd.arg("-m")
        .arg(model)
        .args([
            "-t",
            &threads.to_string(),
            "-tb",
            &threads.to_string(),
            "-c",
            &ctx.to_string(),
            "-np",
            &slots.to_string(),
            "--cont-batching",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--jinja",
            // Enough HTTP threads for every client held open (its default is n_parallel + 2, and
            // streams beyond it wait in a backlog of 5 and are refused under load).
            "--threads-http",
            "128",
            "--no-webui",
            "-ngl",
            "0",
        ])
        .args(flags.split_whitespace());
    let config = format!(
        "llama-server -t {threads} -c {ctx} -np {slots} --cont-batching --threads-http 128 {flags}"
    );
    launch(cmd, port, log, None, config.trim().to_string()).await
}

/// One request per shared prompt, one at a time (both kinds of server get the same).
async fn warm_up(s: &Server, case: &Case, system: &str, turns: &[String]) -> Result<()> {
    for (i, p) in case.prompts.iter().enumerate() {
        // User turns from the end of the list (the points take theirs from the start).
        let user = turns[turns.len() - 1 - i % turns.len()].clone();
        let (_, st) = serve::run_point(
            &s.client,
            &s.target,
            &[job(p, system, user, 4)],
            &[0.0],
            Duration::from_secs(300),
            Duration::from_secs(300),
            Slo::default(),
        )
        .await;
        if st.completed != 1 {
            bail!(
                "the warm-up request to {} ({}) failed: {:?}\n{}",
                s.target.base_url,
                s.config,
                st.failure,
                tail(&s.log)
            );
        }
    }
    Ok(())
}

/// Output lengths from the Azure conversation trace (capped to keep points bounded), or fixed.
fn output_lengths(dir: &Path, p: &Plan, fixed: usize) -> Result<(Vec<usize>, Option<Vec<f64>>)> {
    if !p.trace_outputs && !p.azure {
        return Ok((vec![fixed], None));
    }
    let path = dir.join("length_traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv");
    let rows = serve::read_azure_trace(&path).map_err(anyhow::Error::msg)?;
    let outs: Vec<usize> = if p.trace_outputs {
        rows.iter().map(|r| r.2.clamp(1, 512)).collect()
    } else {
        vec![fixed]
    };
    let ts = p.azure.then(|| rows.iter().map(|r| r.0).collect());
    Ok((outs, ts))
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.0} ms"))
}

fn mean_tokens(c: &Case) -> usize {
    c.prompts.iter().map(|p| p.tokens).sum::<usize>() / c.prompts.len().max(1)
}

/// The jobs and arrival times of point `k` at `rate`.
fn point_jobs(
    case: &Case,
    system: &str,
    inp: &Inputs<'_>,
    p: &Plan,
    rate: f64,
    k: usize,
) -> (Vec<Job>, Vec<f64>) {
    let (turns, outputs, azure) = (inp.turns, inp.outputs, inp.azure);
    // The same requests at the same rate for every system (seeded by the point's index).
    let seed = 0x5eed_0000 + k as u64;
    let arr = match azure {
        Some(ts) => serve::trace_arrivals(ts, k * p.requests, p.requests, Some(rate)),
        None => serve::poisson_arrivals(rate, p.requests, seed),
    };
    let out_off = (k * p.requests) % outputs.len();
    let outs: Vec<usize> = outputs
        .iter()
        .cycle()
        .skip(out_off)
        .take(p.requests)
        .copied()
        .collect();
    let j = jobs(case, system, turns, arr.len(), k * p.requests, &outs, seed);
    (j, arr)
}

/// llama-server's settings given as flags: its `-np` and the rest.
fn parse_llama_args(f: &str) -> Result<(usize, String)> {
    let mut np = 1;
    let mut rest = Vec::new();
    let mut it = f.split_whitespace();
    while let Some(x) = it.next() {
        if x == "-np" || x == "--parallel" {
            np = it
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n > 0)
                .context("--llama-args: -np needs a positive count")?;
        } else {
            rest.push(x);
        }
    }
    Ok((np, rest.join(" ")))
}

/// The settings llama-server is swept over: slots, unified KV, cache reuse.
const LLAMA_SWEEP: &[(usize, &str)] = &[
    (1, ""),
    (4, ""),
    (4, "-kvu"),
    (8, "-kvu"),
    (4, "-kvu --cache-reuse 256"),
];

/// Runs each of [`LLAMA_SWEEP`] at the grid's third rate with half the requests and picks the
/// best: every request completed, then the objective met, then the lowest p90 end-to-end latency.
async fn sweep_llama(
    env: &Env<'_>,
    case: &Case,
    turns: &[String],
    p: &Plan,
    sink: &mut Sink,
) -> Result<(usize, String)> {
    let outputs = env.a.output_tokens;
    let rate = p.rates[p.rates.len().min(3) - 1].min(4.0);
    let q = Plan {
        requests: (p.requests / 2).max(8),
        rates: p.rates.clone(),
        ..*p
    };
    let inp = Inputs {
        turns,
        outputs: &[outputs],
        azure: None,
        max_out: outputs,
    };
    let mut best: Option<((usize, String), f64)> = None;
    for &(np, flags) in LLAMA_SWEEP {
        let s = start_llama(env, flags, np).await?;
        warm_up(&s, case, "llama.cpp", turns).await?;
        let (jobs, arr) = point_jobs(case, "llama.cpp", &inp, &q, rate, 99);
        let (_, st) = serve::run_point(
            &s.client,
            &s.target,
            &jobs,
            &arr,
            Duration::from_secs(300),
            Duration::from_secs(60),
            Slo::default(),
        )
        .await;
        let score = match (st.failed, st.e2e_p90_ms) {
            (0, Some(e)) if st.slo_met => e,
            (0, Some(e)) => 1e9 + e,
            _ => f64::INFINITY,
        };
        eprintln!(
            "  llama-server sweep ({}, rate {rate}/s): -np {np} {flags}: {}/{} done, TTFT p90 {}, TPOT p90 {}",
            case.name,
            st.completed,
            st.requests,
            fmt_ms(st.ttft_p90_ms),
            fmt_ms(st.tpot_p90_ms)
        );
        let r = Record {
            scenario: "sweep".into(),
            system: "llama.cpp".into(),
            case: case.name.clone(),
            shared_tokens: mean_tokens(case),
            groups: case.prompts.len(),
            rate,
            arrivals: "poisson".into(),
            output_tokens: outputs,
            config: s.config.clone(),
            stats: st,
            step_profile: None,
        };
        sink.point(r)?;
        if best.as_ref().is_none_or(|b| score < b.1) {
            best = Some(((np, flags.to_string()), score));
        }
    }
    let (chosen, _) = best.context("the llama-server sweep measured nothing")?;
    eprintln!("  llama-server: chose -np {} {}", chosen.0, chosen.1);
    Ok(chosen)
}

/// The non-interactive scenario: `bench batch` over the modes, and llama-batched-bench `-pps`.
fn batch_part(env: &Env<'_>, l: crate::Loaded, shared: &[usize], sink: &mut Sink) -> Result<()> {
    let (a, dir, threads) = (env.a, env.datasets, env.threads);
    let modes: Vec<String> = a
        .systems
        .iter()
        .filter(|s| s.as_str() != "llama.cpp")
        .cloned()
        .collect();
    let mut prefix: Vec<usize> = vec![512, 1024];
    prefix.extend(shared.iter().copied());
    prefix.sort();
    prefix.dedup();
    let (batch, gen, groups) = (16usize, 32usize, vec![1usize, 4]);
    if !modes.is_empty() {
        eprintln!("bench serve: the batch scenario (bench batch: {modes:?}, prefixes {prefix:?}, batch {batch}, gen {gen})");
        let cfg = ep_bench::batch::BatchConfig {
            modes,
            prefix_tokens: prefix.clone(),
            batches: vec![batch],
            groups: groups.clone(),
            gen,
            reps: a
                .batch_reps
                .unwrap_or(if a.size == "full" { 3 } else { 1 })
                .max(1),
            datasets: Some(dir.to_path_buf()),
            engine: ep_engine::EngineConfig {
                max_seq_len: (prefix.iter().max().copied().unwrap_or(0) + 512)
                    .min(l.n_ctx.max(1024)),
                max_seqs: batch,
                kv_budget_bytes: 1536 << 20,
                ..ep_engine::EngineConfig::default()
            },
            threads,
        };
        let pool = Arc::new(crate::thread_pool(Some(threads))?);
        let model = Arc::new(l.model);
        let tok = Arc::new(l.tok);
        let recs = ep_bench::batch::run(&model, &tok, &cfg, Some(pool), |_, _| {})?;
        for r in recs {
            let b = BatchRecord {
                scenario: "batch".into(),
                system: r.mode.clone(),
                shared_tokens: r.prefix_tokens,
                batch: r.batch,
                groups: r.groups,
                gen_tokens: r.gen_tokens,
                decode_tok_s: r.decode_tok_s,
                config: format!("bench batch --modes {} --reps {}", r.mode, cfg.reps),
            };
            sink.batch(b)?;
        }
    }
    let bb = a
        .llama_batched_bench
        .clone()
        .unwrap_or_else(|| env.llama_server.with_file_name("llama-batched-bench"));
    if a.systems.iter().any(|s| s == "llama.cpp") && bb.exists() {
        for &pp in &prefix {
            let ctx = (pp + gen) * batch + 512;
            let o = Command::new(&bb)
                .arg("-m")
                .arg(env.model)
                .args([
                    "-t",
                    &threads.to_string(),
                    "-c",
                    &ctx.to_string(),
                    "-b",
                    "2048",
                    "-ub",
                    "512",
                    "-npp",
                    &pp.to_string(),
                    "-ntg",
                    &gen.to_string(),
                    "-npl",
                    &batch.to_string(),
                    "-pps",
                    "-kvu",
                    "-fa",
                    "off",
                    "--output-format",
                    "jsonl",
                ])
                .output()
                .with_context(|| format!("running {}", bb.display()))?;
            if !o.status.success() {
                bail!(
                    "{} failed: {}",
                    bb.display(),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                let Some(tg) = v["speed_tg"].as_f64() else {
                    continue;
                };
                let b = BatchRecord {
                    scenario: "batch".into(),
                    system: "llama.cpp".into(),
                    shared_tokens: pp,
                    batch,
                    groups: 1,
                    gen_tokens: gen,
                    decode_tok_s: tg,
                    config: format!(
                        "llama-batched-bench -npp {pp} -ntg {gen} -npl {batch} -pps -kvu"
                    ),
                };
                sink.batch(b)?;
            }
        }
    }
    Ok(())
}

type AllRecords = (Vec<Record>, Vec<BatchRecord>, Vec<QualityRecord>);

fn read_records(path: &Path) -> Result<AllRecords> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut recs, mut batch, mut quality) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}: line {}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(at)?;
        match v["scenario"].as_str() {
            Some("quality") => quality.push(serde_json::from_value(v).with_context(at)?),
            Some("batch") => batch.push(serde_json::from_value(v).with_context(at)?),
            _ => recs.push(serde_json::from_value(v).with_context(at)?),
        }
    }
    Ok((recs, batch, quality))
}

pub(crate) fn run(a: ServeArgs) -> Result<()> {
    let out_dir = a
        .out_dir
        .clone()
        .or_else(|| {
            a.json
                .as_ref()
                .and_then(|j| j.parent().map(Path::to_path_buf))
        })
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("bench-serve"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    if let Some(j) = &a.replot {
        let (recs, batch, quality) = read_records(j)?;
        return report(&recs, &batch, &quality, &out_dir);
    }
    let p = plan(&a)?;
    for s in &a.systems {
        if !["paged", "relay", "splice", "llama.cpp"].contains(&s.as_str()) {
            bail!("--systems: unknown system '{s}' (paged, relay, splice, llama.cpp)");
        }
    }
    let dir = ep_bench::batch::datasets_dir(a.datasets.clone()).context(
        "no datasets directory: pass --datasets DIR (MMLU, ShareGPT and the length traces), or set \
         $EDGEPROMPT_DATASETS",
    )?;
    let model_path = a
        .common
        .model
        .clone()
        .unwrap_or_else(ep_model::paths::default_model_path);
    let l = crate::load(&a.common)?;
    let threads = a.common.threads.unwrap_or(2);
    let shared_tokens = if a.size == "full" && a.shared_tokens == 2048 {
        vec![2048, 7680]
    } else {
        vec![a.shared_tokens]
    };
    let turns = user_turns(&l, &dir, a.max_user_tokens)?;
    let (outputs, azure_ts) = output_lengths(&dir, &p, a.output_tokens)?;
    let max_out = outputs.iter().copied().max().unwrap_or(a.output_tokens);
    let llama_server = a
        .llama_server
        .clone()
        .unwrap_or_else(|| ep_model::paths::edgeprompt_home().join("peer/bin/llama-server"));
    if a.systems.iter().any(|s| s == "llama.cpp") && !llama_server.exists() {
        bail!(
            "{} does not exist: build it with scripts/peer/build-llama-cpp.sh, pass --llama-server, \
             or leave llama.cpp out of --systems",
            llama_server.display()
        );
    }
    let work = tempfile::Builder::new()
        .prefix("ep-bench-serve-")
        .tempdir()?;
    let mut sink = Sink {
        file: match &a.json {
            Some(j) => Some(
                std::fs::File::create(j).with_context(|| format!("creating {}", j.display()))?,
            ),
            None => None,
        },
        ..Sink::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let t0 = Instant::now();
    let inp = Inputs {
        turns: &turns,
        outputs: &outputs,
        azure: azure_ts.as_deref(),
        max_out,
    };
    let mut env = Env {
        a: &a,
        model: &model_path,
        llama_server: &llama_server,
        threads,
        ctx: 0,
        work: work.path(),
        datasets: &dir,
    };
    for &st in &shared_tokens {
        let cs = cases(&a, &l, &dir, st)?;
        rt.block_on(interactive(&mut env, &p, &cs, &inp, l.n_ctx, &mut sink))?;
    }
    if !a.no_batch {
        batch_part(&env, l, &shared_tokens, &mut sink)?;
    }
    eprintln!(
        "bench serve: done in {:.1} min",
        t0.elapsed().as_secs_f64() / 60.0
    );
    report(&sink.points, &sink.batch, &sink.quality, &out_dir)
}

async fn interactive(
    env: &mut Env<'_>,
    p: &Plan,
    cs: &[Case],
    inp: &Inputs<'_>,
    n_ctx: usize,
    sink: &mut Sink,
) -> Result<()> {
    let (a, turns, outputs, azure, max_out) =
        (env.a, inp.turns, inp.outputs, inp.azure, inp.max_out);
    let slo = Slo::default();
    let mut chosen: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let longest = cs
        .iter()
        .flat_map(|c| c.prompts.iter().map(|p| p.tokens))
        .max()
        .unwrap_or(0);
    let ctx = (longest + a.max_user_tokens + max_out + 64).next_multiple_of(256);
    if ctx > n_ctx {
        bail!(
            "a request needs up to {ctx} tokens of context; the model runs with {n_ctx} (--ctx-size)"
        );
    }
    env.ctx = ctx;
    let env = &*env;
    eprintln!(
        "bench serve: shared prompts of {} tokens; starting the cloud…",
        cs.iter()
            .map(|c| format!(
                "{}: {}",
                c.name,
                c.prompts
                    .iter()
                    .map(|p| p.tokens.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cloud = start_cloud(env, cs).await?;
    for system in &a.systems {
        for case in cs {
            let server = if system == "llama.cpp" {
                let (np, flags) = match &a.llama_args {
                    Some(f) => parse_llama_args(f)?,
                    None if chosen.contains_key(&case.name) => chosen[&case.name].clone(),
                    None => sweep_llama(env, case, turns, p, sink).await?,
                };
                chosen.insert(case.name.clone(), (np, flags.clone()));
                start_llama(env, &flags, np).await?
            } else {
                start_edge(env, system, "fetch-f16", &cloud).await?
            };
            warm_up(&server, case, system, turns).await?;
            let mut k = 0usize;
            let mut bis = p
                .bisect
                .then(|| serve::Bisect::new(p.rates[0], *p.rates.last().unwrap_or(&16.0), 0.1, 12));
            let mut grid = p.rates.iter().copied();
            loop {
                let rate = match &bis {
                    Some(b) => b.next(),
                    None => grid.next(),
                };
                let Some(rate) = rate else { break };
                let (jobs, arr) = point_jobs(case, system, inp, p, rate, k);
                k += 1;
                let before = scrape_steps(&server).await;
                let (_, s) = serve::run_point(
                    &server.client,
                    &server.target,
                    &jobs,
                    &arr,
                    Duration::from_secs(300),
                    Duration::from_secs(90),
                    slo,
                )
                .await;
                eprintln!(
                    "  {system:>9} {:>6} {rate:>5.2}/s: {}/{} done, {:.1} tok/s, TTFT p90 {}, TPOT p90 {}{}{}",
                    case.name,
                    s.completed,
                    s.requests,
                    s.throughput_tok_s,
                    fmt_ms(s.ttft_p90_ms),
                    fmt_ms(s.tpot_p90_ms),
                    if s.slo_met { "  SLO met" } else { "" },
                    s.failure.as_ref().map_or(String::new(), |f| format!("  failed: {f}"))
                );
                // Far past saturation on a grid (nothing completed, or p90 TTFT 4× the objective):
                // higher rates only queue longer, so the grid stops there.
                let saturated = s.completed == 0
                    || s.ttft_p90_ms
                        .is_some_and(|t| t > 4.0 * slo.ttft_p90_s * 1e3);
                let step_profile = match (before, scrape_steps(&server).await) {
                    (Some(b), Some(a)) => Some(step_profile(&b, &a)),
                    _ => None,
                };
                let met = s.slo_met;
                if let Some(b) = &mut bis {
                    b.record(rate, met);
                }
                let r = Record {
                    scenario: "interactive".into(),
                    system: system.clone(),
                    case: case.name.clone(),
                    shared_tokens: mean_tokens(case),
                    groups: case.prompts.len(),
                    rate,
                    arrivals: if azure.is_some() {
                        "azure".into()
                    } else {
                        "poisson".into()
                    },
                    output_tokens: if outputs.len() == 1 { outputs[0] } else { 0 },
                    config: server.config.clone(),
                    stats: s,
                    step_profile,
                };
                sink.point(r)?;
                if saturated && bis.is_none() {
                    eprintln!(
                        "  {system:>9} {:>6}: saturated; higher rates skipped",
                        case.name
                    );
                    break;
                }
            }
            drop(server);
        }
    }
    if !a.no_quality {
        if let Some(multi) = cs.iter().find(|c| c.name == "multi") {
            quality(env, multi, &chosen, &cloud, sink).await?;
        } else {
            eprintln!(
                "bench serve: answer quality needs the multi case (its MMLU subjects); skipped"
            );
        }
    }
    drop(cloud);
    Ok(())
}

/// MMLU answer quality through each way of serving the subject's 5-shot prompt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct QualityRecord {
    pub scenario: String,
    pub system: String,
    pub subjects: usize,
    pub questions: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Answers equal to those of the edge with the KV fetched from the cloud.
    pub agree_with_fetched: f64,
    pub config: String,
}

/// The first letter A–D of a greedy one-token answer to each question, through `s`.
async fn answers(
    s: &Server,
    qs: &[(String, String)],
    system_text: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<char>> {
    let mut out = Vec::with_capacity(qs.len());
    for (model, q) in qs {
        // With the shared prompt as text (llama-server) the model id is the plain one.
        let (model, mut msgs) = match system_text(model) {
            Some(t) => (MODEL_ID, vec![json!({"role": "system", "content": t})]),
            None => (model.as_str(), Vec::new()),
        };
        msgs.push(json!({"role": "user", "content": q}));
        let mut req = s
            .client
            .post(format!("{}/v1/chat/completions", s.target.base_url))
            .json(&json!({"model": model, "messages": msgs, "max_tokens": 1, "temperature": 0}));
        if let Some(k) = &s.target.api_key {
            req = req.bearer_auth(k);
        }
        let v: Value = req.send().await?.json().await?;
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .with_context(|| format!("no answer from {}: {v}", s.target.base_url))?;
        out.push(
            text.trim_start()
                .chars()
                .next()
                .filter(|c| ('A'..='D').contains(c))
                .unwrap_or('?'),
        );
    }
    Ok(out)
}

async fn quality(
    env: &Env<'_>,
    multi: &Case,
    chosen: &BTreeMap<String, (usize, String)>,
    cloud: &Cloud,
    sink: &mut Sink,
) -> Result<()> {
    let a = env.a;
    let subjects = multi.prompts.len().min(4);
    let w = ep_bench::batch::Workload::mmlu(env.datasets, subjects)?;
    let mut qs = Vec::new();
    let mut truth = Vec::new();
    for g in 0..subjects {
        for (q, ans) in w.questions[g]
            .iter()
            .zip(&w.answers[g])
            .take(a.quality_questions)
        {
            qs.push((format!("{MODEL_ID}:{}", multi.prompts[g].name), q.clone()));
            truth.push(ans.chars().next().unwrap_or('?'));
        }
    }
    eprintln!(
        "bench serve: answer quality on {} MMLU questions ({subjects} subjects)",
        qs.len()
    );
    let texts: BTreeMap<String, String> = multi
        .prompts
        .iter()
        .map(|p| (format!("{MODEL_ID}:{}", p.name), p.text.clone()))
        .collect();
    let mut runs: Vec<(String, String, Vec<char>)> = Vec::new();
    for strategy in ["fetch-f16", "recompute"] {
        let s = start_edge(env, "splice", strategy, cloud).await?;
        let got = answers(&s, &qs, &|_| None).await?;
        runs.push((format!("edge {strategy}"), s.config.clone(), got));
    }
    if a.systems.iter().any(|s| s == "llama.cpp") {
        let (np, flags) = chosen.get("multi").cloned().unwrap_or((1, String::new()));
        let s = start_llama(env, &flags, np).await?;
        let got = answers(&s, &qs, &|m| texts.get(m).cloned()).await?;
        runs.push(("llama.cpp".into(), s.config.clone(), got));
    }
    let fetched = runs[0].2.clone();
    for (system, config, got) in runs {
        let correct = got.iter().zip(&truth).filter(|(a, b)| a == b).count();
        let agree = got.iter().zip(&fetched).filter(|(a, b)| a == b).count();
        let r = QualityRecord {
            scenario: "quality".into(),
            system,
            subjects,
            questions: got.len(),
            correct,
            accuracy: correct as f64 / got.len().max(1) as f64,
            agree_with_fetched: agree as f64 / got.len().max(1) as f64,
            config,
        };
        eprintln!(
            "  {}: {}/{} correct, {:.1}% equal to the fetched KV's answers",
            r.system,
            r.correct,
            r.questions,
            r.agree_with_fetched * 100.0
        );
        sink.quality(r)?;
    }
    Ok(())
}

/// Per system and case: the highest grid rate meeting the objective and the best throughput seen.
#[derive(Clone, Debug, Serialize)]
struct Summary {
    system: String,
    case: String,
    shared_tokens: usize,
    groups: usize,
    slo_rate: Option<f64>,
    /// The lowest rate measured (an unmet objective there bounds the SLO rate below it).
    lowest_rate: f64,
    saturation_tok_s: f64,
    saturation_req_s: f64,
    config: String,
    loadgen_cpu_pct_max: Option<f64>,
}

fn summaries(recs: &[Record]) -> Vec<Summary> {
    let mut by: BTreeMap<(String, String, usize), Vec<&Record>> = BTreeMap::new();
    for r in recs.iter().filter(|r| r.scenario == "interactive") {
        by.entry((r.case.clone(), r.system.clone(), r.shared_tokens))
            .or_default()
            .push(r);
    }
    by.into_iter()
        .map(|((case, system, shared), rs)| {
            let pts: Vec<(f64, bool)> = rs.iter().map(|r| (r.rate, r.stats.slo_met)).collect();
            Summary {
                system,
                case,
                shared_tokens: shared,
                groups: rs[0].groups,
                slo_rate: serve::slo_rate(&pts),
                lowest_rate: pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min),
                saturation_tok_s: rs
                    .iter()
                    .map(|r| r.stats.throughput_tok_s)
                    .fold(0.0, f64::max),
                saturation_req_s: rs
                    .iter()
                    .map(|r| r.stats.throughput_req_s)
                    .fold(0.0, f64::max),
                config: rs[0].config.clone(),
                loadgen_cpu_pct_max: rs
                    .iter()
                    .filter_map(|r| r.stats.loadgen_cpu_pct)
                    .reduce(f64::max),
            }
        })
        .collect()
}

const SYSTEM_ORDER: &[&str] = &["splice", "relay", "paged", "llama.cpp"];

fn system_rank(s: &str) -> usize {
    SYSTEM_ORDER.iter().position(|x| *x == s).unwrap_or(9)
}

/// The distinct systems among `names`, in report order.
fn systems_in<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut v: Vec<String> = names.map(str::to_string).collect();
    v.sort_by(|a, b| (system_rank(a), a).cmp(&(system_rank(b), b)));
    v.dedup();
    v
}

fn colour(system: &str) -> plotters::style::RGBColor {
    use plotters::style::RGBColor;
    match system {
        "splice" => RGBColor(0x0b, 0x5c, 0xad),
        "relay" => RGBColor(0x2e, 0x9e, 0x44),
        "paged" => RGBColor(0xe0, 0x8a, 0x00),
        _ => RGBColor(0xa4, 0x16, 0x1a),
    }
}

struct Chart<'a> {
    title: String,
    x: &'a str,
    y: &'a str,
    log_y: bool,
    series: Vec<(String, Vec<(f64, f64)>)>,
    /// A dashed horizontal line (an objective).
    limit: Option<f64>,
}

/// Draws `charts` side by side into an SVG, and a PNG of it.
fn plot(charts: &[Chart], svg: &Path) -> Result<()> {
    use plotters::prelude::*;
    let w = 560 * charts.len() as u32;
    {
        let root = SVGBackend::new(svg, (w, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((1, charts.len()));
        for (c, area) in charts.iter().zip(areas) {
            let pts: Vec<(f64, f64)> = c.series.iter().flat_map(|s| s.1.iter().copied()).collect();
            let xmax = pts.iter().map(|p| p.0).fold(0.0, f64::max).max(1e-3) * 1.08;
            let mut ymax = pts
                .iter()
                .map(|p| p.1)
                .fold(0.0, f64::max)
                .max(c.limit.unwrap_or(0.0));
            let ymin = pts
                .iter()
                .map(|p| p.1)
                .filter(|v| *v > 0.0)
                .fold(f64::INFINITY, f64::min);
            ymax = ymax.max(1e-3) * if c.log_y { 2.0 } else { 1.1 };
            let mut b = ChartBuilder::on(&area);
            b.caption(&c.title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60);
            if c.log_y {
                let lo = if ymin.is_finite() { ymin / 2.0 } else { 1.0 };
                let mut chart = b.build_cartesian_2d(0.0..xmax, (lo..ymax).log_scale())?;
                chart
                    .configure_mesh()
                    .x_desc(c.x)
                    .y_desc(c.y)
                    .max_light_lines(1)
                    .y_label_formatter(&|v| format!("{v:.0}"))
                    .draw()?;
                draw_series(&mut chart, c, xmax)?;
            } else {
                let mut chart = b.build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
                chart.configure_mesh().x_desc(c.x).y_desc(c.y).draw()?;
                draw_series(&mut chart, c, xmax)?;
            }
        }
        root.present()?;
    }
    png_of(svg)
}

fn draw_series<'a, DB, X, Y>(
    chart: &mut plotters::chart::ChartContext<
        'a,
        DB,
        plotters::coord::cartesian::Cartesian2d<X, Y>,
    >,
    c: &Chart,
    xmax: f64,
) -> Result<()>
where
    DB: plotters::prelude::DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    use plotters::prelude::*;
    for (name, pts) in &c.series {
        let col = colour(name);
        // A line needs two points; a lone point is still drawn (and labelled) as a dot.
        let line: Vec<(f64, f64)> = if pts.len() >= 2 {
            pts.clone()
        } else {
            Vec::new()
        };
        chart
            .draw_series(LineSeries::new(line, col.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Some(l) = c.limit {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, l), (xmax, l)],
                6,
                4,
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// A PNG of an SVG file next to it (`.png`), text drawn with the system's fonts.
fn png_of(svg: &Path) -> Result<()> {
    let data = std::fs::read(svg)?;
    let mut opt = resvg::usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    // plotters writes `sans-serif`; map it to a sans face this machine has.
    let families: Vec<String> = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(n, _)| n.clone()))
        .collect();
    let pick = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "FreeSans"]
        .iter()
        .map(|s| s.to_string())
        .find(|want| families.contains(want))
        .or_else(|| families.first().cloned());
    match pick {
        Some(f) => db.set_sans_serif_family(f),
        None => eprintln!(
            "bench serve: no system fonts; {} has no text",
            svg.display()
        ),
    }
    let tree = resvg::usvg::Tree::from_data(&data, &opt)
        .with_context(|| format!("parsing {}", svg.display()))?;
    let size = tree.size().to_int_size();
    let mut pix =
        resvg::tiny_skia::Pixmap::new(size.width(), size.height()).context("an empty plot")?;
    pix.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pix.as_mut(),
    );
    let png = svg.with_extension("png");
    pix.save_png(&png)
        .with_context(|| format!("writing {}", png.display()))?;
    Ok(())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn report(
    recs: &[Record],
    batch: &[BatchRecord],
    quality: &[QualityRecord],
    dir: &Path,
) -> Result<()> {
    let mut sums = summaries(recs);
    sums.sort_by_key(|s| (s.case.clone(), s.shared_tokens, system_rank(&s.system)));
    let mut md = String::from("# bench serve\n\n");
    md.push_str("Objective: p90 TTFT ≤ 2 s and p90 TPOT ≤ 150 ms, every request completed.\n\n");
    md.push_str("## Interactive: the highest rate meeting the objective\n\n");
    md.push_str("| case | shared tokens | system | SLO rate (req/s) | × llama.cpp | × paged | saturation tok/s | load generator CPU (max % of a core) | settings |\n|---|---:|---|---:|---:|---:|---:|---:|---|\n");
    for s in &sums {
        let peer = |sys: &str| {
            sums.iter()
                .find(|o| o.case == s.case && o.shared_tokens == s.shared_tokens && o.system == sys)
        };
        let ratio = |b: Option<&Summary>| match (s.slo_rate, b.map(|b| (b.slo_rate, b.lowest_rate)))
        {
            (Some(a), Some((Some(b), _))) if b > 0.0 => format!("{:.2}", a / b),
            // The peer missed the objective at every rate, down to its lowest.
            (Some(a), Some((None, lo))) if lo.is_finite() => {
                format!("> {:.1} (it meets none, from {lo} req/s)", a / lo)
            }
            _ => "–".into(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | `{}` |\n",
            s.case,
            s.shared_tokens,
            s.system,
            opt(s.slo_rate, 2),
            if s.system == "llama.cpp" {
                "1".into()
            } else {
                ratio(peer("llama.cpp"))
            },
            if s.system == "paged" {
                "1".into()
            } else {
                ratio(peer("paged"))
            },
            s.saturation_tok_s,
            opt(s.loadgen_cpu_pct_max, 1),
            s.config
        ));
    }
    md.push_str("\n## Interactive: every point\n\n| case | system | rate | done | req/s | tok/s | s/token | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | SLO | failures |\n|---|---|---:|---:|---:|---:|---:|---|---|---|---|\n");
    let mut pts: Vec<&Record> = recs
        .iter()
        .filter(|r| r.scenario == "interactive")
        .collect();
    pts.sort_by(|a, b| {
        (a.case.clone(), system_rank(&a.system), a.shared_tokens)
            .cmp(&(b.case.clone(), system_rank(&b.system), b.shared_tokens))
            .then(a.rate.total_cmp(&b.rate))
    });
    for r in &pts {
        let s = &r.stats;
        md.push_str(&format!(
            "| {} ({}) | {} | {:.2} | {}/{} | {:.2} | {:.1} | {} | {} / {} / {} | {} / {} / {} | {} | {} |\n",
            r.case,
            r.shared_tokens,
            r.system,
            r.rate,
            s.completed,
            s.requests,
            s.throughput_req_s,
            s.throughput_tok_s,
            opt(s.normalized_latency_s_per_token, 3),
            opt(s.ttft_p50_ms, 0),
            opt(s.ttft_p90_ms, 0),
            opt(s.ttft_p99_ms, 0),
            opt(s.tpot_p50_ms, 0),
            opt(s.tpot_p90_ms, 0),
            opt(s.tpot_p99_ms, 0),
            if s.slo_met { "met" } else { "" },
            s.failure.clone().unwrap_or_default()
        ));
    }
    let profiled: Vec<(&Record, &StepProfile)> = pts
        .iter()
        .filter_map(|r| Some((*r, r.step_profile.as_ref()?)))
        .collect();
    if !profiled.is_empty() {
        md.push_str("\n## Interactive: where an edge's step time goes\n\nMeans per engine step during each point, from the edge's `edgeprompt:engine_step*` counters. *Decode* steps carry only decode rows; *prefill* steps carry a user turn's prompt rows (up to the step's token budget), usually beside decode rows — every decoding sequence waits for them. Weights: the weight products (logits included); attention: KV writes and attention kernels; other: norms, RoPE, SwiGLU, embedding; sched: the scheduler.\n\n| case | system | rate | decode steps: n, rows, ms (weights / attention / other / sched) | prefill steps: n, prompt + decode rows, ms (weights / attention / other / sched) | share of time in prefill steps |\n|---|---|---:|---|---|---:|\n");
        for (r, p) in profiled {
            let (d, f) = (&p.decode, &p.prefill);
            let (td, tf) = (d.steps as f64 * d.step_ms, f.steps as f64 * f.step_ms);
            md.push_str(&format!(
                "| {} ({}) | {} | {:.2} | {}, {:.1}, {:.1} ({:.1} / {:.1} / {:.1} / {:.1}) | {}, {:.0} + {:.1}, {:.1} ({:.1} / {:.1} / {:.1} / {:.1}) | {} |\n",
                r.case,
                r.shared_tokens,
                r.system,
                r.rate,
                d.steps,
                d.decode_tokens,
                d.step_ms,
                d.weights_ms,
                d.attention_ms,
                d.other_ms,
                d.scheduler_ms,
                f.steps,
                f.prefill_tokens,
                f.decode_tokens,
                f.step_ms,
                f.weights_ms,
                f.attention_ms,
                f.other_ms,
                f.scheduler_ms,
                if td + tf > 0.0 {
                    format!("{:.0}%", 100.0 * tf / (td + tf))
                } else {
                    "–".into()
                }
            ));
        }
    }
    let sweep: Vec<&Record> = recs.iter().filter(|r| r.scenario == "sweep").collect();
    if !sweep.is_empty() {
        md.push_str("\n## llama-server's settings sweep\n\n| case | settings | rate | done | TTFT p90 ms | TPOT p90 ms |\n|---|---|---:|---:|---:|---:|\n");
        for r in sweep {
            md.push_str(&format!(
                "| {} | `{}` | {:.2} | {}/{} | {} | {} |\n",
                r.case,
                r.config,
                r.rate,
                r.stats.completed,
                r.stats.requests,
                opt(r.stats.ttft_p90_ms, 0),
                opt(r.stats.tpot_p90_ms, 0)
            ));
        }
    }
    if !batch.is_empty() {
        md.push_str("\n## Non-interactive (batch): decode tokens per second\n\n| shared tokens | groups | batch | system | decode tok/s | × paged | settings |\n|---:|---:|---:|---|---:|---:|---|\n");
        let mut b: Vec<&BatchRecord> = batch.iter().collect();
        b.sort_by_key(|r| (r.shared_tokens, r.groups, system_rank(&r.system)));
        for r in &b {
            let paged = batch
                .iter()
                .find(|o| {
                    o.system == "paged"
                        && o.shared_tokens == r.shared_tokens
                        && o.groups == r.groups
                })
                .map(|o| o.decode_tok_s);
            md.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} | {} | `{}` |\n",
                r.shared_tokens,
                r.groups,
                r.batch,
                r.system,
                r.decode_tok_s,
                paged.map_or("–".into(), |p| format!("{:.2}", r.decode_tok_s / p)),
                r.config
            ));
        }
    }
    if !quality.is_empty() {
        md.push_str("\n## Answer quality (MMLU, greedy first token after the subject's 5-shot prompt)\n\n| system | questions | correct | accuracy | answers equal to the fetched KV's | settings |\n|---|---:|---:|---:|---:|---|\n");
        for q in quality {
            md.push_str(&format!(
                "| {} | {} | {} | {:.1}% | {:.1}% | `{}` |\n",
                q.system,
                q.questions,
                q.correct,
                q.accuracy * 100.0,
                q.agree_with_fetched * 100.0,
                q.config
            ));
        }
    }
    // Plots.
    let mut cases: Vec<(String, usize)> = pts
        .iter()
        .map(|r| (r.case.clone(), r.shared_tokens))
        .collect();
    cases.sort();
    cases.dedup();
    let mut plots = Vec::new();
    for (case, shared) in &cases {
        let of = |f: &dyn Fn(&PointStats) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
            systems_in(
                pts.iter()
                    .filter(|r| &r.case == case && r.shared_tokens == *shared)
                    .map(|r| r.system.as_str()),
            )
            .into_iter()
            .map(|sys| {
                let v: Vec<(f64, f64)> = pts
                    .iter()
                    .filter(|r| &r.case == case && r.shared_tokens == *shared && r.system == sys)
                    .filter_map(|r| f(&r.stats).map(|y| (r.rate, y)))
                    .collect();
                (sys, v)
            })
            .collect()
        };
        let name = format!("serve-{case}-{shared}");
        let svg = dir.join(format!("{name}.svg"));
        plot(
            &[
                Chart {
                    title: format!("p90 TTFT ({case}, {shared} shared tokens)"),
                    x: "request rate (req/s)",
                    y: "ms",
                    log_y: true,
                    series: of(&|s| s.ttft_p90_ms),
                    limit: Some(2000.0),
                },
                Chart {
                    title: "p90 time per output token".into(),
                    x: "request rate (req/s)",
                    y: "ms",
                    log_y: true,
                    series: of(&|s| s.tpot_p90_ms),
                    limit: Some(150.0),
                },
                Chart {
                    title: "throughput".into(),
                    x: "request rate (req/s)",
                    y: "output tokens / s",
                    log_y: false,
                    series: of(&|s| Some(s.throughput_tok_s)),
                    limit: None,
                },
            ],
            &svg,
        )?;
        plots.push(name);
    }
    if !batch.is_empty() {
        let mut charts = Vec::new();
        let mut groups: Vec<usize> = batch.iter().map(|r| r.groups).collect();
        groups.sort();
        groups.dedup();
        for g in groups {
            let systems = systems_in(
                batch
                    .iter()
                    .filter(|r| r.groups == g)
                    .map(|r| r.system.as_str()),
            );
            charts.push(Chart {
                title: format!(
                    "batch decode, {} shared prompt{}",
                    g,
                    if g == 1 { "" } else { "s" }
                ),
                x: "shared prompt tokens",
                y: "decode tokens / s",
                log_y: false,
                series: systems
                    .into_iter()
                    .map(|sys| {
                        let mut v: Vec<(f64, f64)> = batch
                            .iter()
                            .filter(|r| r.groups == g && r.system == sys)
                            .map(|r| (r.shared_tokens as f64, r.decode_tok_s))
                            .collect();
                        v.sort_by(|a, b| a.0.total_cmp(&b.0));
                        (sys, v)
                    })
                    .collect(),
                limit: None,
            });
        }
        plot(&charts, &dir.join("batch-throughput.svg"))?;
        plots.push("batch-throughput".into());
    }
    md.push_str("\n## Plots\n\n");
    for p in &plots {
        md.push_str(&format!("![{p}]({p}.png)\n\n"));
    }
    let mdp = dir.join("serve.md");
    std::fs::write(&mdp, &md).with_context(|| format!("writing {}", mdp.display()))?;
    std::fs::write(
        dir.join("serve-summary.json"),
        serde_json::to_vec_pretty(&sums)?,
    )?;
    print!("{md}");
    eprintln!(
        "bench serve: report {} and plots {} (.svg, .png)",
        mdp.display(),
        plots.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(system: &str, rate: f64, ttft: f64, tpot: f64, tok_s: f64) -> Record {
        let slo = Slo::default();
        Record {
            scenario: "interactive".into(),
            system: system.into(),
            case: "single".into(),
            shared_tokens: 2048,
            groups: 1,
            rate,
            arrivals: "poisson".into(),
            output_tokens: 64,
            config: format!("{system} settings"),
            stats: PointStats {
                requests: 40,
                completed: 40,
                throughput_tok_s: tok_s,
                throughput_req_s: tok_s / 64.0,
                ttft_p90_ms: Some(ttft),
                tpot_p90_ms: Some(tpot),
                slo_met: ttft <= slo.ttft_p90_s * 1e3 && tpot <= slo.tpot_p90_s * 1e3,
                loadgen_cpu_pct: Some(3.0),
                ..PointStats::default()
            },
            step_profile: (system != "llama.cpp").then(|| StepProfile {
                decode: StepPhases {
                    steps: 100,
                    decode_tokens: 4.0,
                    step_ms: 30.0,
                    weights_ms: 20.0,
                    attention_ms: 6.0,
                    other_ms: 3.0,
                    scheduler_ms: 1.0,
                    ..StepPhases::default()
                },
                prefill: StepPhases {
                    steps: 40,
                    prefill_tokens: 120.0,
                    decode_tokens: 3.0,
                    step_ms: 150.0,
                    weights_ms: 120.0,
                    attention_ms: 20.0,
                    other_ms: 8.0,
                    scheduler_ms: 2.0,
                },
            }),
        }
    }

    #[test]
    fn the_step_profile_is_read_from_the_edges_metrics() {
        use ep_engine::{EngineStats, StepTotals};
        let m = ep_edge::metrics::Metrics::new();
        let mut st = EngineStats {
            decode_steps: StepTotals {
                steps: 10,
                decode_tokens: 40,
                secs: 0.5,
                sched_secs: 0.05,
                weights_secs: 0.25,
                attention_secs: 0.125,
                ..StepTotals::default()
            },
            ..EngineStats::default()
        };
        let before = step_counters(&m.render(&st, None));
        st.decode_steps.steps = 30;
        st.decode_steps.decode_tokens = 100;
        st.decode_steps.secs = 1.5;
        st.decode_steps.weights_secs = 1.0;
        st.prefill_steps = StepTotals {
            steps: 4,
            prefill_tokens: 1000,
            decode_tokens: 8,
            secs: 2.0,
            sched_secs: 0.5,
            weights_secs: 1.0,
            attention_secs: 0.25,
        };
        let after = step_counters(&m.render(&st, None));
        let p = step_profile(&before, &after);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let d = &p.decode;
        assert_eq!(d.steps, 20);
        assert!(
            close(d.decode_tokens, 3.0) && close(d.prefill_tokens, 0.0),
            "{d:?}"
        );
        // 1 s over 20 steps, of which weights 0.75 s; attention unchanged; other 0.25 s.
        assert!(close(d.step_ms, 50.0) && close(d.weights_ms, 37.5), "{d:?}");
        assert!(
            close(d.attention_ms, 0.0) && close(d.other_ms, 12.5),
            "{d:?}"
        );
        let f = &p.prefill;
        assert_eq!(f.steps, 4);
        assert!(
            close(f.prefill_tokens, 250.0) && close(f.decode_tokens, 2.0),
            "{f:?}"
        );
        assert!(
            close(f.step_ms, 500.0) && close(f.scheduler_ms, 125.0),
            "{f:?}"
        );
        assert!(close(f.other_ms, 62.5), "{f:?}");
    }

    #[test]
    fn the_report_names_slo_rates_ratios_and_writes_plots() {
        let recs = vec![
            rec("splice", 1.0, 300.0, 40.0, 64.0),
            rec("splice", 2.0, 500.0, 60.0, 128.0),
            rec("splice", 4.0, 5000.0, 90.0, 150.0),
            rec("paged", 1.0, 400.0, 50.0, 64.0),
            rec("paged", 2.0, 3000.0, 80.0, 110.0),
            rec("llama.cpp", 1.0, 900.0, 160.0, 60.0),
            rec("llama.cpp", 2.0, 4000.0, 200.0, 70.0),
            // Nothing completed at this rate: reported, no latencies.
            Record {
                stats: PointStats {
                    requests: 40,
                    failed: 40,
                    failure: Some("timeout (×40)".into()),
                    ..PointStats::default()
                },
                ..rec("llama.cpp", 4.0, 0.0, 0.0, 0.0)
            },
        ];
        let batch = vec![
            BatchRecord {
                scenario: "batch".into(),
                system: "splice".into(),
                shared_tokens: 2048,
                batch: 16,
                groups: 1,
                gen_tokens: 32,
                decode_tok_s: 200.0,
                config: "bench batch".into(),
            },
            BatchRecord {
                scenario: "batch".into(),
                system: "paged".into(),
                shared_tokens: 2048,
                batch: 16,
                groups: 1,
                gen_tokens: 32,
                decode_tok_s: 160.0,
                config: "bench batch".into(),
            },
        ];
        let s = summaries(&recs);
        let get = |sys: &str| s.iter().find(|x| x.system == sys).unwrap();
        assert_eq!(get("splice").slo_rate, Some(2.0));
        assert_eq!(get("paged").slo_rate, Some(1.0));
        assert_eq!(get("llama.cpp").slo_rate, None);
        assert_eq!(get("splice").saturation_tok_s, 150.0);
        let dir = tempfile::tempdir().unwrap();
        report(&recs, &batch, &[], dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("serve.md")).unwrap();
        // splice: SLO rate 2, more than 2 / 1 over a peer that meets none from 1 req/s, 2.00 × paged.
        assert!(
            md.contains(
                "| single | 2048 | splice | 2.00 | > 2.0 (it meets none, from 1 req/s) | 2.00 | 150.0 |"
            ),
            "{md}"
        );
        assert!(md.contains("timeout (×40)"), "{md}");
        // 40 prefill steps of 150 ms against 100 decode steps of 30 ms: 6 of 9 s.
        assert!(
            md.contains("| single (2048) | splice | 1.00 | 100, 4.0, 30.0 (20.0 / 6.0 / 3.0 / 1.0) | 40, 120 + 3.0, 150.0 (120.0 / 20.0 / 8.0 / 2.0) | 67% |"),
            "{md}"
        );
        assert!(
            md.contains("| 2048 | 1 | 16 | splice | 200.0 | 1.25 |"),
            "{md}"
        );
        for f in ["serve-single-2048", "batch-throughput"] {
            let svg = std::fs::read_to_string(dir.path().join(format!("{f}.svg"))).unwrap();
            assert!(svg.contains("<svg") && svg.contains("splice"), "{f}");
            let png = std::fs::read(dir.path().join(format!("{f}.png"))).unwrap();
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{f}.png");
            assert!(md.contains(&format!("![{f}]({f}.png)")));
        }
        // --replot reads what a run writes.
        let j = dir.path().join("r.jsonl");
        let mut text = String::new();
        for r in &recs {
            text.push_str(&serde_json::to_string(r).unwrap());
            text.push('\n');
        }
        for b in &batch {
            text.push_str(&serde_json::to_string(b).unwrap());
            text.push('\n');
        }
        std::fs::write(&j, text).unwrap();
        let (r2, b2, _) = read_records(&j).unwrap();
        assert_eq!((r2.len(), b2.len()), (recs.len(), batch.len()));
        assert_eq!(r2[1].stats.ttft_p90_ms, Some(500.0));
        std::fs::write(&j, "{\"scenario\": \"interactive\"}\n").unwrap();
        assert!(read_records(&j).unwrap_err().to_string().contains("line 1"));
    }

    #[test]
    fn llama_args_parse() {
        assert_eq!(parse_llama_args("-np 4 -kvu").unwrap(), (4, "-kvu".into()));
        assert_eq!(parse_llama_args("").unwrap(), (1, String::new()));
        assert!(parse_llama_args("-np 0").is_err());
        assert!(parse_llama_args("-np").is_err());
    }
}
