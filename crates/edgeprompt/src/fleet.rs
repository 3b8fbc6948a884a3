//! `edgeprompt fleet test`: the loopback fleet. Builds the multi-box topology of
//! `docs/deployment.md` in the netlab's two network namespaces joined by a shaped link — the cloud
//! host (a Redis Cluster of 3 masters with a replica each, 2 cloud replicas on it) and the site host
//! (the site cache, nginx with the shipped `deploy/nginx/site-cache.conf.template`; the router,
//! HAProxy with the shipped `deploy/haproxy/edges.cfg`; 3 edges behind it; a reference edge that
//! fetches from a replica directly) — then tests it and tears it down:
//!
//! 1. **compute once**: a prompt registered at the same moment through both replicas is computed by
//!    one (the replicas' `prompts_computed` summed);
//! 2. **takeover**: a second prompt registered on one replica; the replica holding its job lease (read
//!    from Redis) is SIGKILLed mid-computation and the other finishes it;
//! 3. **site cache**: the 3 edges, cold, ask for the first prompt at once through the cache: the
//!    cloud's `kv_frames_served` grows by the manifest's frame count (each frame served once) and
//!    their answers equal the reference edge's; then a slice of the second prompt's stream is
//!    corrupted in the cache's files, and an edge fetching it through the cache refetches the bad
//!    frames (its digests) and still answers as the reference does;
//! 4. **faults under load**: tenants' scripted conversations through the router at Poisson arrivals
//!    (the project's load generator, `ep_bench::serve::send`, a request retried on a retryable error:
//!    no response, 429/502/503/504, a stream cut before `[DONE]`), while the Redis master holding
//!    the registry's slot, a cloud replica and the edge serving a tenant are SIGKILLed; every answer
//!    compared with the reference edge's for the same messages.
//!
//! Progress goes to stderr; the last line on stdout is one JSON object with the figures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ep_bench::serve::{self, Job, Outcome, Target};
use serde_json::{json, Value};

use crate::netbench::{metric, tail, wait_http, Proc};
use crate::servebench::{exe, http_client, spawn};

/// The shipped configurations, as operators get them.
const NGINX_TEMPLATE: &str = include_str!("../../../deploy/nginx/site-cache.conf.template");
const HAPROXY_CFG: &str = include_str!("../../../deploy/haproxy/edges.cfg");

const CLOUD_TOKEN: &str = "fleet-cloud-token";
const SITE_TOKEN: &str = "fleet-site-token";
const MODEL_ID: &str = "smol";
const REDIS_PORTS: [u16; 6] = [7101, 7102, 7103, 7104, 7105, 7106];
const CLOUD_PORTS: [u16; 2] = [8401, 8402];
const CACHE_PORT: u16 = 8480;
const ROUTER_PORT: u16 = 8000;
const EDGE_PORTS: [u16; 3] = [8001, 8002, 8003];
const REFERENCE_PORT: u16 = 8009;
/// The two cloud prompts: the `up` demo's care-desk prompt, and a night-shift variant of it.
const P1: &str = "care-desk";
const P2: &str = "care-desk-night";

#[derive(Subcommand)]
pub(crate) enum FleetCommand {
    /// Build the loopback fleet in network namespaces (root), test compute-once, takeover, the site
    /// cache and faults under load, and tear it down; the last stdout line is one JSON object.
    Test(FleetTestArgs),
}

#[derive(Args)]
pub(crate) struct FleetTestArgs {
    #[command(flatten)]
    common: crate::Common,
    /// The site–cloud link: a netlab profile (fiber, ideal_6g, 5g_urban, cell_edge, congested) or
    /// MBIT,RTT_MS,LOSS_PCT.
    #[arg(long, default_value = "5g_urban")]
    link: String,
    /// Prefix of the namespaces and devices (`{prefix}-cloud`, `{prefix}-edge`).
    #[arg(long, default_value = "epf")]
    prefix: String,
    /// Keep the configurations, logs and caches in this directory (default: a temporary one,
    /// removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Requests of the load phase.
    #[arg(long, default_value_t = 60)]
    requests: usize,
    /// Their arrival rate (requests per second, Poisson).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Tenants (each its bearer token and its conversation).
    #[arg(long, default_value_t = 6)]
    tenants: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 12)]
    max_tokens: usize,
    /// Also write the JSON record to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub(crate) fn run(a: FleetCommand) -> Result<()> {
    let FleetCommand::Test(a) = a;
    if a.tenants == 0 || a.requests == 0 || a.rate <= 0.0 || a.max_tokens == 0 {
        bail!("--tenants, --requests, --rate and --max-tokens must be positive");
    }
    ep_netlab::ensure_root().context("the fleet runs in network namespaces")?;
    for (prog, pkg) in [
        ("redis-server", "redis-server"),
        ("redis-cli", "redis-tools"),
        ("nginx", "nginx"),
        ("haproxy", "haproxy"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {prog}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!(
                "`{prog}` is missing: install Debian's {pkg} package (scripts/fleet/test.sh does)"
            );
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(test(a))
}

fn say(msg: impl AsRef<str>) {
    eprintln!("fleet: {}", msg.as_ref());
}

/// The topology while it runs; dropping it stops every process (nginx gracefully) and removes the
/// namespaces.
struct Fleet {
    link: ep_netlab::Link,
    work: PathBuf,
    exe: PathBuf,
    model: PathBuf,
    client: reqwest::Client,
    redis: Vec<Option<Proc>>,
    clouds: Vec<Option<Proc>>,
    /// Starts of each cloud replica (for its log's name).
    cloud_starts: Vec<usize>,
    edges: Vec<Option<Proc>>,
    reference: Option<Proc>,
    nginx: Option<Proc>,
    haproxy: Option<Proc>,
    key: String,
    /// Counters of cloud replicas that were killed (their `/metrics` went with them).
    dead_counts: BTreeMap<String, f64>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // nginx's master forwards a SIGQUIT to its workers; a SIGKILL would orphan them.
        if let Some(p) = &mut self.nginx {
            let _ = Command::new("kill")
                .args(["-QUIT", &p.0.id().to_string()])
                .status();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = p.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn substitute(template: &str, vars: &[(&str, String)]) -> String {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("${{{k}}}"), v);
    }
    s
}

impl Fleet {
    fn in_cloud(&self, prog: impl AsRef<Path>) -> Command {
        self.link.command_in(self.link.cloud_ns(), prog.as_ref())
    }
    fn in_site(&self, prog: impl AsRef<Path>) -> Command {
        self.link.command_in(self.link.edge_ns(), prog.as_ref())
    }
    /// A cloud replica as the driver reaches it (control link).
    fn cloud_url(&self, i: usize) -> String {
        format!("http://{}:{}", self.link.cloud_ctl_ip(), CLOUD_PORTS[i])
    }
    fn site_url(&self, port: u16) -> String {
        format!("http://{}:{port}", self.link.edge_ctl_ip())
    }
    fn store_spec() -> String {
        let nodes: Vec<String> = REDIS_PORTS[..3]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis-cluster://{}", nodes.join(","))
    }

    fn redis_cli(&self, port: u16, args: &[&str]) -> Result<String> {
        let out = self
            .in_cloud("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .context("running redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn start_redis(&mut self) -> Result<()> {
        let dir = self.work.join("redis");
        std::fs::create_dir_all(&dir)?;
        for &p in &REDIS_PORTS {
            let mut cmd = self.in_cloud("redis-server");
            cmd.args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                .args(["--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir);
            self.redis
                .push(Some(spawn(cmd, &dir.join(format!("redis-{p}.log")))?));
        }
        let t0 = Instant::now();
        for &p in &REDIS_PORTS {
            while !self.redis_cli(p, &["ping"])?.contains("PONG") {
                if t0.elapsed() > Duration::from_secs(20) {
                    bail!("redis-server on port {p} did not start");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let nodes: Vec<String> = REDIS_PORTS
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = self
            .in_cloud("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        self.wait_cluster_ok(&REDIS_PORTS, Duration::from_secs(30))
            .await?;
        say("Redis Cluster: 3 masters, 3 replicas");
        Ok(())
    }

    /// Waits until every node of `ports` reports `cluster_state:ok`.
    async fn wait_cluster_ok(&self, ports: &[u16], limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let mut ok = true;
            for &p in ports {
                ok &= self
                    .redis_cli(p, &["cluster", "info"])?
                    .contains("cluster_state:ok");
            }
            if ok {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > limit {
                bail!("the Redis Cluster is not ok after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The port of the master serving `key`'s slot, asked of node `via`.
    fn master_of(&self, via: u16, key: &str) -> Result<u16> {
        let slot: u32 = self
            .redis_cli(via, &["cluster", "keyslot", key])?
            .trim()
            .parse()
            .context("CLUSTER KEYSLOT")?;
        let nodes = self.redis_cli(via, &["cluster", "nodes"])?;
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port: u16 = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .context("CLUSTER NODES address")?;
            for r in &f[8..] {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    if (a..=b).contains(&slot) {
                        return Ok(port);
                    }
                }
            }
        }
        bail!("no master serves slot {slot}")
    }

    async fn start_cloud(&mut self, i: usize) -> Result<()> {
        self.cloud_starts[i] += 1;
        let log = self
            .work
            .join(format!("cloud{}-{}.log", i + 1, self.cloud_starts[i]));
        let mut cmd = self.in_cloud(&self.exe);
        cmd.args(["cloud", "--listen", &format!("0.0.0.0:{}", CLOUD_PORTS[i])])
            .args(["--store", &Self::store_spec(), "--token", CLOUD_TOKEN])
            .arg("--model")
            .arg(&self.model)
            .args([
                "--threads",
                "1",
                "--kv-codecs",
                "raw",
                "--kv-mem-mib",
                "256",
            ])
            .args(["--job-lease-secs", "6", "--takeover-secs", "1"]);
        self.clouds[i] = Some(spawn(cmd, &log)?);
        wait_http(
            &self.client,
            &format!("{}/health", self.cloud_url(i)),
            Duration::from_secs(120),
        )
        .await
        .with_context(|| format!("cloud replica {} did not start:\n{}", i + 1, tail(&log)))
    }

    fn edge_command(&self, port: u16, cloud_url: &str, token: &str) -> Command {
        let mut cmd = self.in_site(&self.exe);
        cmd.args(["edge", "--listen", &format!("0.0.0.0:{port}")])
            .arg("--model")
            .arg(&self.model)
            .args(["--threads", "1", "--model-id", MODEL_ID])
            .args(["--cloud-url", cloud_url, "--cloud-token", token])
            .args(["--cloud-key", &self.key, "--kv-strategy", "fetch-f16"])
            .args(["--kv-mem-mib", "256", "--max-seqs", "16"]);
        cmd
    }

    async fn start_edge(&mut self, i: usize) -> Result<()> {
        let log = self.work.join(format!("edge{}.log", i + 1));
        let cmd = self.edge_command(
            EDGE_PORTS[i],
            &format!("http://127.0.0.1:{CACHE_PORT}"),
            SITE_TOKEN,
        );
        self.edges[i] = Some(spawn(cmd, &log)?);
        let url = format!("{}/health", self.site_url(EDGE_PORTS[i]));
        wait_http(&self.client, &url, Duration::from_secs(120))
            .await
            .with_context(|| format!("edge {} did not start:\n{}", i + 1, tail(&log)))
    }

    async fn start_reference(&mut self) -> Result<()> {
        let log = self.work.join("edge-reference.log");
        let mut cmd = self.edge_command(
            REFERENCE_PORT,
            &format!("http://{}:{}", self.link.cloud_link_ip(), CLOUD_PORTS[0]),
            CLOUD_TOKEN,
        );
        cmd.arg("--allow-plain-http");
        self.reference = Some(spawn(cmd, &log)?);
        let url = format!("{}/health", self.site_url(REFERENCE_PORT));
        wait_http(&self.client, &url, Duration::from_secs(120))
            .await
            .with_context(|| format!("the reference edge did not start:\n{}", tail(&log)))
    }

    async fn start_cache(&mut self) -> Result<()> {
        let run = self.work.join("nginx");
        let cache = self.work.join("site-cache");
        std::fs::create_dir_all(&run)?;
        std::fs::create_dir_all(&cache)?;
        let servers: String = CLOUD_PORTS
            .iter()
            .map(|p| format!("server {}:{p};", self.link.cloud_link_ip()))
            .collect::<Vec<_>>()
            .join(" ");
        let conf = substitute(
            NGINX_TEMPLATE,
            &[
                ("EP_SITE_LISTEN", format!("0.0.0.0:{CACHE_PORT}")),
                ("EP_CLOUD_SERVERS", servers),
                ("EP_SITE_TOKEN", SITE_TOKEN.into()),
                ("EP_CLOUD_TOKEN", CLOUD_TOKEN.into()),
                ("EP_CACHE_DIR", cache.display().to_string()),
                ("EP_CACHE_MAX", "2g".into()),
                ("EP_RUN_DIR", run.display().to_string()),
            ],
        );
        if conf.contains("${EP_") {
            bail!("the nginx template names a variable the fleet does not set");
        }
        let path = self.work.join("site-cache.conf");
        std::fs::write(&path, conf)?;
        let mut cmd = self.in_site("nginx");
        cmd.arg("-c").arg(&path).args(["-g", "daemon off;"]);
        self.nginx = Some(spawn(cmd, &self.work.join("nginx.out"))?);
        wait_http(
            &self.client,
            &format!("{}/health", self.site_url(CACHE_PORT)),
            Duration::from_secs(20),
        )
        .await
        .with_context(|| {
            format!(
                "the site cache did not start:\n{}",
                tail(&run.join("nginx-error.log"))
            )
        })
    }

    async fn start_router(&mut self) -> Result<()> {
        let path = self.work.join("haproxy.cfg");
        std::fs::write(&path, HAPROXY_CFG)?;
        let mut cmd = self.in_site("haproxy");
        cmd.arg("-f").arg(&path).arg("-db");
        cmd.env("EP_ROUTER_LISTEN", format!("0.0.0.0:{ROUTER_PORT}"));
        for (i, p) in EDGE_PORTS.iter().enumerate() {
            cmd.env(format!("EP_EDGE{}", i + 1), format!("127.0.0.1:{p}"));
        }
        self.haproxy = Some(spawn(cmd, &self.work.join("haproxy.log"))?);
        // Up once it routes a health check to an edge.
        wait_http(
            &self.client,
            &format!("{}/health", self.site_url(ROUTER_PORT)),
            Duration::from_secs(20),
        )
        .await
        .with_context(|| {
            format!(
                "the router did not start:\n{}",
                tail(&self.work.join("haproxy.log"))
            )
        })
    }

    async fn cloud_metrics(&self, i: usize) -> String {
        let url = format!("{}/metrics", self.cloud_url(i));
        match self.client.get(url).bearer_auth(CLOUD_TOKEN).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// `edgeprompt_cloud_{name}_total` summed over the replicas, the killed ones' last readings
    /// included.
    async fn cloud_counter(&self, name: &str) -> f64 {
        let full = format!("edgeprompt_cloud_{name}_total");
        let mut sum = self.dead_counts.get(&full).copied().unwrap_or(0.0);
        for i in 0..CLOUD_PORTS.len() {
            if self.clouds[i].is_some() {
                sum += metric(&self.cloud_metrics(i).await, &full).unwrap_or(0.0);
            }
        }
        sum
    }

    /// SIGKILLs cloud replica `i`, keeping its counters first.
    async fn kill_cloud(&mut self, i: usize) {
        let m = self.cloud_metrics(i).await;
        for name in [
            "prompts_registered",
            "prompts_computed",
            "kv_frames_served",
            "prompt_jobs_taken_over",
        ] {
            let full = format!("edgeprompt_cloud_{name}_total");
            *self.dead_counts.entry(full.clone()).or_default() += metric(&m, &full).unwrap_or(0.0);
        }
        self.clouds[i] = None;
    }

    async fn register(&self, i: usize, name: &str, text: &str) -> Result<Value> {
        let r = self
            .client
            .post(format!("{}/v1/cloud-prompts", self.cloud_url(i)))
            .bearer_auth(CLOUD_TOKEN)
            .json(&json!({"name": name, "messages": [{"role": "system", "content": text}]}))
            .send()
            .await?;
        let st = r.status();
        let body: Value = r.json().await?;
        if !st.is_success() {
            bail!("registering {name} on replica {}: {st} {body}", i + 1);
        }
        Ok(body)
    }

    async fn info(&self, i: usize, name: &str) -> Result<Value> {
        Ok(self
            .client
            .get(format!("{}/v1/cloud-prompts/{name}", self.cloud_url(i)))
            .bearer_auth(CLOUD_TOKEN)
            .send()
            .await?
            .json()
            .await?)
    }

    async fn wait_ready(&self, i: usize, name: &str, limit: Duration) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            let v = self.info(i, name).await?;
            match v["status"].as_str() {
                Some("ready") => return Ok(v),
                Some("failed") => bail!("{name} failed: {}", v["error"]),
                _ if t0.elapsed() > limit => bail!("{name} not ready after {limit:?}: {v}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The signed manifest of `id` from replica `i`.
    async fn manifest(&self, i: usize, id: &str) -> Result<Value> {
        Ok(self
            .client
            .get(format!("{}/v1/kv/{id}/manifest", self.cloud_url(i)))
            .bearer_auth(CLOUD_TOKEN)
            .send()
            .await?
            .json()
            .await?)
    }
}

/// The request every edge is asked in the site-cache phase, for prompt `p`.
fn probe_job(p: &str, max_tokens: usize) -> Job {
    Job {
        model: format!("{MODEL_ID}:{p}"),
        messages: vec![(
            "user".into(),
            "Hello, my parcel has not arrived. What can you do?".into(),
        )],
        max_tokens,
        api_key: Some("tenant-probe".into()),
        edge_prompt: None,
    }
}

const QUESTIONS: [&str; 6] = [
    "Hi, I ordered a kettle last week and it still has not shipped.",
    "Can you tell me what your return policy says about opened items?",
    "The courier left the parcel at the wrong address. What now?",
    "I was charged twice for the same order. How do I get a refund?",
    "Can I change the delivery address of an order already dispatched?",
    "Thanks. Is there anything else I should do?",
];
const REPLIES: [&str; 6] = [
    "I am sorry about the delay. Let me look into your order.",
    "Opened items can be returned within 30 days if they are undamaged.",
    "I will open a claim with the courier and keep you informed.",
    "I can see the double charge; the duplicate will be refunded.",
    "Once dispatched, the address can be changed with the courier only.",
    "Nothing else for now; we will email you the updates.",
];

/// Turn `turn` of tenant `t`'s conversation: the scripted history, then the next question.
fn conversation_job(t: usize, turn: usize, max_tokens: usize) -> Job {
    let mut messages = Vec::new();
    let n = QUESTIONS.len();
    for k in 0..turn {
        messages.push(("user".to_string(), QUESTIONS[(t + k) % n].to_string()));
        messages.push(("assistant".to_string(), REPLIES[(t + k) % n].to_string()));
    }
    messages.push(("user".to_string(), QUESTIONS[(t + turn) % n].to_string()));
    Job {
        model: format!("{MODEL_ID}:{}", if t.is_multiple_of(2) { P1 } else { P2 }),
        messages,
        max_tokens,
        api_key: Some(format!("tenant-{t}")),
        edge_prompt: None,
    }
}

/// What became of one request of the load, over its attempts.
#[derive(Clone, Debug, Default)]
struct Done {
    tenant: usize,
    sent_s: f64,
    attempts: usize,
    last: Outcome,
    /// `(seconds after the start, edge)` of every attempt that got an answer from an edge.
    served: Vec<(f64, String)>,
    errors: Vec<String>,
}

fn retryable(o: &Outcome) -> bool {
    matches!(o.status, 0 | 429 | 502 | 503 | 504) || (o.status == 200 && !o.finished)
}

/// Sends `job` through `target` until it finishes or fails for good (at most 5 attempts; the wait
/// between them is the `Retry-After` given, else 1 s).
async fn send_with_retries(
    client: &reqwest::Client,
    target: &Target,
    job: &Job,
    start: Instant,
) -> (usize, Outcome, Vec<(f64, String)>, Vec<String>) {
    let (mut served, mut errors) = (Vec::new(), Vec::new());
    for attempt in 1..=5 {
        let o = serve::send(client, target, job, Duration::from_secs(120)).await;
        if let Some(s) = &o.served_by {
            served.push((start.elapsed().as_secs_f64(), s.clone()));
        }
        if o.ok && o.finished {
            return (attempt, o, served, errors);
        }
        errors.push(format!(
            "{} {}",
            o.status,
            o.error
                .clone()
                .unwrap_or_else(|| "unfinished stream".into())
        ));
        if !retryable(&o) || attempt == 5 {
            return (attempt, o, served, errors);
        }
        let wait = o
            .retry_after
            .as_deref()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(1.0)
            .clamp(0.2, 10.0);
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
    unreachable!("the loop returns on its last attempt")
}

async fn test(a: FleetTestArgs) -> Result<()> {
    let profile = ep_netlab::Profile::named(&a.link)
        .or_else(|_| ep_netlab::Profile::parse_custom(&a.link))
        .with_context(|| format!("--link {}", a.link))?;
    let model = a
        .common
        .model
        .clone()
        .unwrap_or_else(ep_model::paths::default_model_path);
    if !model.exists() {
        bail!(
            "the model {} does not exist (scripts/fetch-model.sh fetches the default)",
            model.display()
        );
    }
    let tmp;
    let work = match &a.work {
        Some(w) => {
            std::fs::create_dir_all(w).with_context(|| format!("creating {}", w.display()))?;
            w.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    // nginx's workers run as an unprivileged user: they must reach the cache under it.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} readable", work.display()))?;
    }
    say(format!(
        "building the {} link between the site and the cloud",
        profile.name
    ));
    let link = ep_netlab::Link::up(&a.prefix, &profile).context("building the link")?;
    let mut f = Fleet {
        link,
        work: work.clone(),
        exe: exe()?,
        model,
        client: http_client()?,
        redis: Vec::new(),
        clouds: vec![None, None],
        cloud_starts: vec![0, 0],
        edges: vec![None, None, None],
        reference: None,
        nginx: None,
        haproxy: None,
        key: String::new(),
        dead_counts: BTreeMap::new(),
    };
    f.start_redis().await?;
    let key = f
        .in_cloud(&f.exe)
        .args(["cloud", "key", "--store", &Fleet::store_spec()])
        .output()
        .context("edgeprompt cloud key")?;
    f.key = String::from_utf8_lossy(&key.stdout).trim().to_string();
    if f.key.len() != 64 {
        bail!(
            "edgeprompt cloud key printed no key: {}",
            String::from_utf8_lossy(&key.stderr)
        );
    }
    for i in 0..2 {
        f.start_cloud(i).await?;
    }
    say("2 cloud replicas on the cluster");
    f.start_cache().await?;
    for i in 0..3 {
        f.start_edge(i).await?;
    }
    f.start_router().await?;
    f.start_reference().await?;
    say("site: cache, router, 3 edges and a reference edge");
    let mut checks: BTreeMap<&str, bool> = BTreeMap::new();
    let mut faults = 0usize;
    let mut record = serde_json::Map::new();

    // 1. Compute once: the same prompt through both replicas at the same moment.
    let p1_text = crate::up_cmd::UP_CLOUD_PROMPT;
    let (r1, r2) = tokio::join!(f.register(0, P1, p1_text), f.register(1, P1, p1_text));
    let (r1, r2) = (r1?, r2?);
    let (i1, i2) = tokio::join!(
        f.wait_ready(0, P1, Duration::from_secs(300)),
        f.wait_ready(1, P1, Duration::from_secs(300))
    );
    let (i1, i2) = (i1?, i2?);
    let p1_id = i1["id"].as_str().unwrap_or_default().to_string();
    let once = r1["id"] == r2["id"] && i1["id"] == i2["id"];
    let computed = f.cloud_counter("prompts_computed").await;
    checks.insert("computed_once", once && computed == 1.0);
    say(format!(
        "{P1}: registered through both replicas, computed {computed} time(s)"
    ));

    // 2. Takeover: kill the replica holding the second prompt's job while it computes.
    let p2_text = format!(
        "{p1_text}\n\nThis is the night-shift desk: between 22:00 and 06:00 only urgent cases are \
         handled; everything else is answered the next morning."
    );
    let r = f.register(0, P2, &p2_text).await?;
    let p2_id = r["id"].as_str().unwrap_or_default().to_string();
    let job_key = format!("ep:{{kv:{p2_id}}}:job");
    let t0 = Instant::now();
    let mut killed = None;
    while t0.elapsed() < Duration::from_secs(60) {
        let holder = f.redis_cli(REDIS_PORTS[0], &["-c", "get", &job_key])?;
        let pid: Option<u32> = holder.trim().split('-').next().and_then(|p| p.parse().ok());
        let info = f.info(0, P2).await?;
        let status = info["status"].as_str().map(str::to_string);
        if status.as_deref() == Some("ready") {
            break;
        }
        let early = info["progress"].as_f64().unwrap_or(0.0) < 0.5;
        if let (Some(pid), Some("computing"), true) = (pid, status.as_deref(), early) {
            if let Some(i) = (0..2).find(|&i| f.clouds[i].as_ref().is_some_and(|p| p.0.id() == pid))
            {
                f.kill_cloud(i).await;
                killed = Some((i, Instant::now()));
                faults += 1;
                say(format!(
                    "{P2}: SIGKILLed replica {} while it computed",
                    i + 1
                ));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some((dead, at)) = killed else {
        bail!("{P2} was never seen computing with a lease holder (too fast to kill?)");
    };
    let other = 1 - dead;
    // When the survivor holds the job's lease: the takeover proper (then it computes).
    let survivor = f.clouds[other].as_ref().map(|p| p.0.id().to_string());
    let mut claimed_s = None;
    while at.elapsed() < Duration::from_secs(60) {
        let holder = f.redis_cli(REDIS_PORTS[0], &["-c", "get", &job_key])?;
        if survivor.as_deref() == holder.trim().split('-').next() {
            claimed_s = Some(at.elapsed().as_secs_f64());
            break;
        }
        if f.info(other, P2).await?["status"] == "ready" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    record.insert("takeover_claimed_s".into(), json!(claimed_s));
    let info = f.wait_ready(other, P2, Duration::from_secs(120)).await?;
    let takeover_s = at.elapsed().as_secs_f64();
    let taken = metric(
        &f.cloud_metrics(other).await,
        "edgeprompt_cloud_prompt_jobs_taken_over_total",
    )
    .unwrap_or(0.0);
    checks.insert("taken_over", info["id"] == p2_id.as_str() && taken >= 1.0);
    say(format!(
        "{P2}: claimed by replica {} {claimed_s:?} s after the kill, ready after {takeover_s:.1} s",
        other + 1
    ));
    f.start_cloud(dead).await?;
    record.insert("takeover_s".into(), json!(takeover_s));

    // 3. The site cache: 3 cold edges at once on the first prompt.
    let frames0 = f.cloud_counter("kv_frames_served").await;
    let manifest = f.manifest(0, &p1_id).await?;
    let frames_total = manifest["manifest"]["frames"]
        .as_array()
        .map_or(0, Vec::len);
    let job = probe_job(P1, a.max_tokens);
    let outs = futures_util::future::join_all((0..3).map(|i| {
        let t = Target {
            base_url: f.site_url(EDGE_PORTS[i]),
            api_key: None,
        };
        let (c, job) = (f.client.clone(), job.clone());
        async move { serve::send(&c, &t, &job, Duration::from_secs(300)).await }
    }))
    .await;
    let frames_served = f.cloud_counter("kv_frames_served").await - frames0;
    let reference = Target {
        base_url: f.site_url(REFERENCE_PORT),
        api_key: None,
    };
    let want = serve::send(&f.client, &reference, &job, Duration::from_secs(300)).await;
    let equal = want.finished && outs.iter().all(|o| o.finished && o.text == want.text);
    checks.insert(
        "site_cache_frames_once",
        frames_served == frames_total as f64,
    );
    checks.insert("site_cache_answers_equal", equal);
    say(format!(
        "site cache: 3 cold edges, {frames_total} frames, the cloud served {frames_served}; answers equal the reference: {equal}"
    ));
    // A corrupted slice of the second prompt in the cache's files.
    let stream_url = format!("{}/v1/kv/{p2_id}/stream", f.site_url(CACHE_PORT));
    let body = f
        .client
        .get(&stream_url)
        .bearer_auth(SITE_TOKEN)
        .send()
        .await?
        .bytes()
        .await?;
    let corrupted = corrupt_cached_slice(&work.join("site-cache"), &p2_id)?;
    let edge_metrics = |i: usize| {
        let url = format!("{}/metrics", f.site_url(EDGE_PORTS[i]));
        let c = f.client.clone();
        async move {
            let text = match c.get(url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            metric(&text, "edgeprompt:kv_frames_refetched_total").unwrap_or(0.0)
        }
    };
    let job2 = probe_job(P2, a.max_tokens);
    let got = serve::send(
        &f.client,
        &Target {
            base_url: f.site_url(EDGE_PORTS[0]),
            api_key: None,
        },
        &job2,
        Duration::from_secs(300),
    )
    .await;
    let refetched = edge_metrics(0).await;
    let want2 = serve::send(&f.client, &reference, &job2, Duration::from_secs(300)).await;
    let caught = corrupted && refetched >= 1.0 && got.finished && got.text == want2.text;
    checks.insert("corrupt_cache_caught", caught);
    say(format!(
        "site cache: a corrupted slice ({} stream bytes cached): the edge refetched {refetched} frame(s), answer equal: {}",
        body.len(),
        got.text == want2.text
    ));

    // 4. Faults under load through the router.
    let arrivals = serve::poisson_arrivals(a.rate, a.requests, 7);
    let duration = arrivals.last().copied().unwrap_or(0.0);
    let mut turns = vec![0usize; a.tenants];
    let jobs: Vec<(usize, Job)> = (0..a.requests)
        .map(|k| {
            let t = k % a.tenants;
            let j = conversation_job(t, turns[t] % QUESTIONS.len(), a.max_tokens);
            turns[t] += 1;
            (t, j)
        })
        .collect();
    let router = Target {
        base_url: f.site_url(ROUTER_PORT),
        api_key: None,
    };
    let start = Instant::now();
    let last_edge: Arc<Mutex<BTreeMap<usize, String>>> = Arc::default();
    let mut tasks = Vec::new();
    for ((t, job), &at) in jobs.iter().cloned().zip(&arrivals) {
        let (c, router, last_edge) = (f.client.clone(), router.clone(), last_edge.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
            let (attempts, last, served, errors) =
                send_with_retries(&c, &router, &job, start).await;
            if let Some((_, e)) = served.last() {
                last_edge.lock().expect("edges").insert(t, e.clone());
            }
            Done {
                tenant: t,
                sent_s: at,
                attempts,
                last,
                served,
                errors,
            }
        }));
    }
    say(format!(
        "load: {} requests of {} tenants over {duration:.0} s through the router",
        a.requests, a.tenants
    ));
    // The faults, at fixed fractions of the load.
    let reg_master = f.master_of(REDIS_PORTS[0], "ep:{reg}:names")?;
    tokio::time::sleep_until((start + Duration::from_secs_f64(duration * 0.2)).into()).await;
    let ri = REDIS_PORTS
        .iter()
        .position(|&p| p == reg_master)
        .context("the registry's master")?;
    f.redis[ri] = None;
    faults += 1;
    let t_kill = Instant::now();
    say(format!(
        "fault: SIGKILLed the Redis master on port {reg_master} (the registry's slot)"
    ));
    let survivors: Vec<u16> = REDIS_PORTS
        .iter()
        .copied()
        .filter(|&p| p != reg_master)
        .collect();
    // Failed over: a replica is the slot's master and the survivors agree the cluster is ok.
    let mut new_master = None;
    while t_kill.elapsed() < Duration::from_secs(30) {
        if let Ok(m) = f.master_of(survivors[0], "ep:{reg}:names") {
            if m != reg_master && f.wait_cluster_ok(&survivors, Duration::ZERO).await.is_ok() {
                new_master = Some(m);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failover_s = new_master.map(|_| t_kill.elapsed().as_secs_f64());
    checks.insert("redis_failed_over", new_master.is_some());
    say(format!(
        "the cluster failed over in {failover_s:?} s to {new_master:?}"
    ));
    tokio::time::sleep_until((start + Duration::from_secs_f64(duration * 0.45)).into()).await;
    f.kill_cloud(1).await;
    faults += 1;
    say("fault: SIGKILLed cloud replica 2");
    tokio::time::sleep_until((start + Duration::from_secs_f64(duration * 0.7)).into()).await;
    let victim_name = last_edge
        .lock()
        .expect("edges")
        .get(&0)
        .cloned()
        .unwrap_or_else(|| "edge2".into());
    let victim: usize = victim_name
        .trim_start_matches("edge")
        .parse::<usize>()
        .unwrap_or(2)
        .clamp(1, 3)
        - 1;
    // Killed with a request in flight when one comes within 10 s (its stream is cut: retried).
    let victim_metrics = format!("{}/metrics", f.site_url(EDGE_PORTS[victim]));
    let t_wait = Instant::now();
    let mut in_flight = 0.0;
    while t_wait.elapsed() < Duration::from_secs(10) {
        if let Ok(r) = f.client.get(&victim_metrics).send().await {
            in_flight = metric(
                &r.text().await.unwrap_or_default(),
                "edgeprompt:num_requests_running",
            )
            .unwrap_or(0.0);
            if in_flight >= 1.0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.edges[victim] = None;
    faults += 1;
    record.insert("edge_killed_with_running".into(), json!(in_flight));
    let t_edge = start.elapsed().as_secs_f64();
    say(format!(
        "fault: SIGKILLed {victim_name} (serving tenant 0) with {in_flight} request(s) running"
    ));
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.context("a load task")?);
    }
    let load_s = start.elapsed().as_secs_f64();

    // Every answer against the reference edge's for the same messages.
    let mut ok = 0usize;
    let mut wrong = 0usize;
    let mut failed = 0usize;
    let mut attempts_total = 0usize;
    for (d, (_, job)) in done.iter().zip(&jobs) {
        attempts_total += d.attempts;
        if !(d.last.ok && d.last.finished) {
            failed += 1;
            say(format!(
                "request of tenant {} at {:.1} s failed after {} attempt(s): {:?}",
                d.tenant, d.sent_s, d.attempts, d.errors
            ));
            continue;
        }
        let r = serve::send(&f.client, &reference, job, Duration::from_secs(300)).await;
        if r.finished && r.text == d.last.text {
            ok += 1;
        } else {
            wrong += 1;
            failed += 1;
            say(format!(
                "request of tenant {} at {:.1} s: the answer differs from the reference",
                d.tenant, d.sent_s
            ));
        }
    }
    // Tenants of the killed edge: served by it before, by another after, and going on.
    let victim_label = format!("edge{}", victim + 1);
    let mut moved = BTreeSet::new();
    let mut stranded = BTreeSet::new();
    for t in 0..a.tenants {
        let mine: Vec<&Done> = done.iter().filter(|d| d.tenant == t).collect();
        let before = mine
            .iter()
            .flat_map(|d| &d.served)
            .any(|(s, e)| *s < t_edge && *e == victim_label);
        if !before {
            continue;
        }
        let after: Vec<&&Done> = mine.iter().filter(|d| d.sent_s > t_edge + 2.0).collect();
        let went_on = after.iter().all(|d| {
            d.last.ok && d.last.finished && d.served.last().is_some_and(|(_, e)| *e != victim_label)
        });
        if went_on && !after.is_empty() {
            moved.insert(t);
        } else {
            stranded.insert(t);
        }
    }
    checks.insert("answers_right", wrong == 0);
    checks.insert("no_request_failed", failed == 0);
    checks.insert("tenants_moved", !moved.is_empty() && stranded.is_empty());
    let registered = f.cloud_counter("prompts_registered").await;
    let computed = f.cloud_counter("prompts_computed").await;
    let all_ok = checks.values().all(|&v| v);
    for (k, v) in [
        ("prompts_registered", json!(registered as u64)),
        ("prompts_computed", json!(computed as u64)),
        ("frames_total", json!(frames_total)),
        ("frames_served_by_cloud", json!(frames_served as u64)),
        ("requests_ok", json!(ok)),
        ("requests_failed", json!(failed)),
        ("requests_wrong", json!(wrong)),
        ("attempts", json!(attempts_total)),
        ("retries", json!(attempts_total - done.len())),
        ("faults_injected", json!(faults)),
        ("redis_failover_s", json!(failover_s)),
        ("tenants_moved", json!(moved.len())),
        ("tenants_stranded", json!(stranded.len())),
        ("load_s", json!(load_s)),
        ("link", json!(profile.name)),
        ("checks", json!(checks)),
        ("ok", json!(all_ok)),
    ] {
        record.insert(k.into(), v);
    }
    let line = Value::Object(record).to_string();
    if let Some(p) = &a.json {
        std::fs::write(p, format!("{line}\n"))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    drop(f);
    println!("{line}");
    if !all_ok {
        bail!("the fleet test failed: {checks:?}");
    }
    Ok(())
}

/// Flips bytes in the middle of the cached second 1 MiB slice of `id`'s stream (nginx's cache files:
/// a header naming the key, then the body); returns whether one was found.
fn corrupt_cached_slice(cache: &Path, id: &str) -> Result<bool> {
    let want = format!("KEY: /v1/kv/{id}/stream|bytes=1048576-2097151");
    let mut stack = vec![cache.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let mut bytes = std::fs::read(&p)?;
            let head = String::from_utf8_lossy(&bytes[..bytes.len().min(2048)]).into_owned();
            if !head.contains(&want) || bytes.len() < (1 << 20) {
                continue;
            }
            let at = bytes.len() - (1 << 19);
            for b in &mut bytes[at..at + 64] {
                *b ^= 0x5a;
            }
            std::fs::write(&p, bytes)?;
            return Ok(true);
        }
    }
    Ok(false)
}
