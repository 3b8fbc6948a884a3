//! Chaos between cloud and edge, as the real binaries on loopback: the cloud SIGKILLed mid-transfer
//! and restarted, the link cut and flapped at random (seeded) points, Redis killed under a cloud
//! replica, the edge's disk cache at its budget and on a full disk, the edge SIGKILLed while it
//! receives a prompt's KV and its cache files truncated or corrupted while it is down. Every request
//! either completes with the reference tokens (`edgeprompt generate` at temperature 0) or gets a
//! clear error (an HTTP error status with an OpenAI-style JSON body, or an SSE error event); none
//! hangs (every wait is bounded) and none is lost.
//!
//! A throttling TCP proxy between edge and cloud makes a transfer last long enough on loopback to
//! kill things in the middle of it.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{dir_str, free_port, model, Proc, Redis};
use serde_json::{json, Value};

const TOKEN: &str = "chaos-cloud-token";
/// Tokens each answer has: small, the transfers are what is under test.
const MAX_TOKENS: usize = 6;
/// The longest any one client request may take before it counts as hung.
const REQUEST_LIMIT_S: u64 = 90;

/// `curl` bounded by `max_s` seconds: (HTTP status, 0 when none; body; curl's exit code — 28 is
/// its timeout).
fn curl(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
    max_s: u64,
) -> (u16, String, i32) {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-N",
        "-X",
        method,
        "--max-time",
        &max_s.to_string(),
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &b.to_string(),
        ]);
    }
    let o = c.output().expect("curl runs");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        body.to_string(),
        o.status.code().unwrap_or(-1),
    )
}

fn wait_for(url: &str, what: &str, p: &Proc) {
    let t0 = Instant::now();
    loop {
        if curl("GET", url, None, None, 5).0 == 200 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} did not come up: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `edgeprompt cloud` on `port` over `store`, up and answering.
fn spawn_cloud_at(dir: &Path, port: u16, store: &str, log: &str) -> Proc {
    let cloud = Proc::start(
        &[
            "cloud",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--store",
            store,
            "--model",
            &model(),
            "--threads",
            "2",
            "--token",
            TOKEN,
        ],
        dir.join(log),
    );
    wait_for(
        &format!("http://127.0.0.1:{port}/health"),
        "the cloud",
        &cloud,
    );
    cloud
}

/// Registers the cloud prompt `name` (one system message) through the cloud at `port`.
fn register(port: u16, name: &str, system: &str) {
    let (code, body, _) = curl(
        "POST",
        &format!("http://127.0.0.1:{port}/v1/cloud-prompts"),
        Some(TOKEN),
        Some(&json!({"name": name, "messages": [{"role": "system", "content": system}]})),
        30,
    );
    assert!(code == 200 || code == 202, "{code}: {body}");
}

/// Waits until the cloud at `port` reports `name` ready; its info.
fn wait_ready(port: u16, name: &str) -> Value {
    common::wait_ready(port, TOKEN, name)
}

/// Bytes of the raw KV stream of a ready prompt's info.
fn raw_bytes(info: &Value) -> u64 {
    info["kv"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["codec"] == "raw")
        .unwrap()["bytes"]
        .as_u64()
        .unwrap()
}

/// `edgeprompt edge` on `port`, fetching raw KV (a fixed strategy: the adaptive one could choose to
/// recompute on a throttled link) from `cloud_port`, with a disk cache when given.
fn spawn_edge_at(
    dir: &Path,
    log: &str,
    port: u16,
    cloud_port: u16,
    cache: Option<&Path>,
    extra: &[&str],
) -> Proc {
    let mut all = vec!["--kv-strategy", "fetch-f16"];
    all.extend(extra);
    let args = common::edge_args(port, cloud_port, TOKEN, cache, &all);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let edge = Proc::start(&args, dir.join(log));
    wait_for(
        &format!("http://127.0.0.1:{port}/health"),
        "the edge",
        &edge,
    );
    edge
}

fn spawn_edge(dir: &Path, log: &str, cloud_port: u16, cache: Option<&Path>) -> (Proc, u16) {
    let port = free_port();
    (spawn_edge_at(dir, log, port, cloud_port, cache, &[]), port)
}

/// The reference: `edgeprompt generate`'s greedy text.
fn generate(system: &str, user: &str) -> String {
    let v = common::generate_json(system, user, MAX_TOKENS);
    v["text"].as_str().unwrap().to_string()
}

/// A fixed-seed xorshift64*: the random points repeat run to run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// A TCP proxy between edge and cloud: the cloud → edge direction paced to `rate` bytes per second
/// (0: unpaced); it can cut every open connection and refuse new ones (accepted and closed at once).
struct Link {
    port: u16,
    s: Arc<LinkState>,
}

struct LinkState {
    target: u16,
    rate: AtomicU64,
    refuse: AtomicBool,
    /// Bytes that went down (cloud → edge), all connections.
    down: AtomicU64,
    next_id: AtomicU64,
    /// Open connections: (id, the edge's side, the cloud's side).
    conns: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    cuts: AtomicU64,
    refused: AtomicU64,
}

impl Link {
    fn start(target: u16, rate: u64) -> Link {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = Arc::new(LinkState {
            target,
            rate: AtomicU64::new(rate),
            refuse: AtomicBool::new(false),
            down: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            conns: Mutex::default(),
            cuts: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let st = s.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { return };
                if st.refuse.load(Ordering::SeqCst) {
                    st.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", st.target)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let id = st.next_id.fetch_add(1, Ordering::Relaxed);
                st.conns.lock().unwrap().push((
                    id,
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                ));
                let ends = Arc::new(AtomicU8::new(0));
                let pipe = |mut from: TcpStream, mut to: TcpStream, paced: bool| {
                    let (st, ends) = (st.clone(), ends.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 8 << 10];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                    if paced {
                                        st.down.fetch_add(n as u64, Ordering::SeqCst);
                                        let rate = st.rate.load(Ordering::Relaxed);
                                        if let Some(us) = (n as u64 * 1_000_000).checked_div(rate) {
                                            std::thread::sleep(Duration::from_micros(us));
                                        }
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                        if ends.fetch_add(1, Ordering::SeqCst) == 1 {
                            st.conns.lock().unwrap().retain(|c| c.0 != id);
                        }
                    });
                };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    false,
                );
                pipe(server, client, true);
            }
        });
        Link { port, s }
    }

    fn down(&self) -> u64 {
        self.s.down.load(Ordering::SeqCst)
    }

    /// Cuts every open connection (both ways, at once).
    fn cut(&self) {
        self.s.cuts.fetch_add(1, Ordering::Relaxed);
        for (_, a, b) in self.s.conns.lock().unwrap().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    fn refuse(&self, on: bool) {
        self.s.refuse.store(on, Ordering::SeqCst);
    }

    /// Waits until `n` more bytes than `mark` went down: `false` when nothing moved for 10 s (the
    /// transfer stopped, say given up after a fault).
    fn try_wait_down(&self, mark: u64, n: u64) -> bool {
        let (mut last, mut moved) = (self.down(), Instant::now());
        while self.down() < mark + n {
            if self.down() != last {
                (last, moved) = (self.down(), Instant::now());
            }
            if moved.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// As `try_wait_down`, failing the test when the transfer stops.
    fn wait_down(&self, mark: u64, n: u64, what: &str) {
        assert!(
            self.try_wait_down(mark, n),
            "{what}: only {} of {n} bytes went down",
            self.down() - mark
        );
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Completed with the reference tokens.
    Right,
    /// An HTTP error status with an OpenAI-style JSON body, or an SSE error event.
    ClearError(String),
    /// Completed with other tokens: corrupt KV used.
    Wrong(String),
    /// No answer within the limit.
    Hung,
    /// Anything else: a dropped connection, a body that is neither an answer nor an error.
    Lost(String),
}

fn openai_error(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    v["error"]["message"].as_str().map(str::to_string)
}

/// One chat request on `smol:{prompt}` (streamed or not), judged against `want`.
fn ask(port: u16, prompt: &str, user: &str, stream: bool, want: &str) -> Outcome {
    let body = json!({"model": format!("smol:{prompt}"),
        "messages": [{"role": "user", "content": user}],
        "temperature": 0, "max_tokens": MAX_TOKENS, "stream": stream});
    let (code, b, exit) = curl(
        "POST",
        &format!("http://127.0.0.1:{port}/v1/chat/completions"),
        Some("chaos-tenant"),
        Some(&body),
        REQUEST_LIMIT_S,
    );
    if exit == 28 {
        return Outcome::Hung;
    }
    if code >= 400 {
        return match openai_error(&b) {
            Some(m) => Outcome::ClearError(format!("{code} {m}")),
            None => Outcome::Lost(format!("{code} without an OpenAI error body: {b}")),
        };
    }
    if code != 200 {
        return Outcome::Lost(format!("curl exit {exit}, status {code}: {b}"));
    }
    let text = if stream {
        let mut text = String::new();
        let mut done = false;
        for l in b.lines() {
            let Some(d) = l.strip_prefix("data: ") else {
                continue;
            };
            if d.trim() == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(d) else {
                return Outcome::Lost(format!("a bad SSE event: {d}"));
            };
            if let Some(m) = v["error"]["message"].as_str() {
                return Outcome::ClearError(format!("SSE error event: {m}"));
            }
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
        }
        if !done {
            return Outcome::Lost(format!(
                "the stream ended without [DONE] (curl exit {exit})"
            ));
        }
        text
    } else {
        let Ok(v) = serde_json::from_str::<Value>(&b) else {
            return Outcome::Lost(format!("a 200 that is not JSON (curl exit {exit}): {b}"));
        };
        match v["choices"][0]["message"]["content"].as_str() {
            Some(t) => t.to_string(),
            None => return Outcome::Lost(format!("a 200 without content: {b}")),
        }
    };
    if text == want {
        Outcome::Right
    } else {
        Outcome::Wrong(format!("{text:?} (want {want:?})"))
    }
}

/// Outcomes counted.
#[derive(Default, Debug)]
struct Tally {
    right: usize,
    errors: Vec<String>,
    wrong: Vec<String>,
    hung: usize,
    lost: Vec<String>,
}

impl Tally {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Right => self.right += 1,
            Outcome::ClearError(e) => self.errors.push(e),
            Outcome::Wrong(w) => self.wrong.push(w),
            Outcome::Hung => self.hung += 1,
            Outcome::Lost(l) => self.lost.push(l),
        }
    }
    /// Nothing wrong, hung or lost; prints the counts.
    fn check(&self, case: &str, logs: &str) {
        eprintln!(
            "CHAOS {case}: {} right, {} clear errors, {} wrong, {} hung, {} lost; errors: {:?}",
            self.right,
            self.errors.len(),
            self.wrong.len(),
            self.hung,
            self.lost.len(),
            self.errors
        );
        assert!(
            self.wrong.is_empty() && self.hung == 0 && self.lost.is_empty(),
            "{case}: {self:?}\n{logs}"
        );
    }
}

/// Requests run on threads (each bounded by `REQUEST_LIMIT_S`).
fn spawn_asks(
    port: u16,
    prompt: &str,
    user: &str,
    want: &str,
    n: usize,
) -> Vec<std::thread::JoinHandle<Outcome>> {
    (0..n)
        .map(|i| {
            let (p, u, w) = (prompt.to_string(), user.to_string(), want.to_string());
            std::thread::spawn(move || ask(port, &p, &u, i % 2 == 0, &w))
        })
        .collect()
}

fn join_all(hs: Vec<std::thread::JoinHandle<Outcome>>, t: &mut Tally) {
    for h in hs {
        t.add(h.join().unwrap());
    }
}

/// Every file under `dir`: (path, bytes).
fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.metadata() {
            Ok(m) if m.is_dir() => out.extend(files(&p)),
            Ok(m) => out.push((p, m.len())),
            Err(_) => {}
        }
    }
    out
}

fn dir_bytes(dir: &Path) -> u64 {
    files(dir).iter().map(|f| f.1).sum()
}

fn count(log: &str, what: &str) -> usize {
    log.matches(what).count()
}

const BAKERY: &str = "You are the assistant of a small bakery called Korn & Kruste. Answer in \
one friendly sentence. The bakery opens from 8 to 18 on weekdays and from 9 to 13 on Saturdays; it \
is closed on Sundays. Rye bread costs 4.20 euros, a baguette 2.10 euros, a cinnamon roll 2.80 \
euros. Orders for cakes need two days' notice. Never repeat a customer's phone number.";

/// Shorter cloud prompts (about 60 tokens of KV each, some 1.4 MB raw).
const SHOPS: [(&str, &str); 4] = [
    (
        "florist",
        "You are the assistant of Blumen Berg, a florist. Answer in one sentence. Tulips cost 1.50 \
euros each, roses 2.40 euros. The shop opens from 9 to 18, Monday to Saturday. Deliveries in town \
are free above 30 euros.",
    ),
    (
        "cycles",
        "You are the assistant of Rad und Tat, a bicycle repair shop. Answer in one sentence. A \
puncture repair costs 12 euros, a full service 49 euros. We open from 10 to 19 on weekdays. Bring \
your bicycle before noon for same-day repairs.",
    ),
    (
        "library",
        "You are the assistant of the Lindenweg public library. Answer in one sentence. Books are \
lent for three weeks and can be renewed twice online. The reading room opens from 8 to 20. A \
yearly card costs 15 euros, free for students.",
    ),
    (
        "pool",
        "You are the assistant of the Seeblick swimming pool. Answer in one sentence. A day ticket \
costs 5 euros, children pay 3 euros. The pool opens from 7 to 21 every day. Swimming lessons for \
beginners start every Monday at 17.",
    ),
];

const USER: &str = "When are you open?";

/// 1. The cloud SIGKILLed while the edge's first requests on a cloud prompt stream its KV, restarted
///    on the same port and store.
#[test]
fn cloud_killed_mid_transfer_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir_str(&dir.path().join("store"));
    let cport = free_port();
    let cloud = spawn_cloud_at(dir.path(), cport, &store, "cloud-1.log");
    register(cport, "bakery", BAKERY);
    let kv = raw_bytes(&wait_ready(cport, "bakery"));
    let want = generate(BAKERY, USER);
    let link = Link::start(cport, 400 << 10);
    let (edge, eport) = spawn_edge(
        dir.path(),
        "edge.log",
        link.port,
        Some(&dir.path().join("cache")),
    );
    let mut t = Tally::default();
    let mark = link.down();
    let running = spawn_asks(eport, "bakery", USER, &want, 3);
    // A third of the KV is through: the cloud dies. What it had written into its socket's buffers
    // (megabytes on loopback) is lost with the connection, as on a real link.
    link.wait_down(mark, kv / 3, "before the kill");
    drop(cloud);
    link.cut();
    let killed_at = link.down() - mark;
    std::thread::sleep(Duration::from_millis(300));
    let cloud = spawn_cloud_at(dir.path(), cport, &store, "cloud-2.log");
    join_all(running, &mut t);
    // After the restart: the next requests complete with the reference tokens.
    let mut after = Tally::default();
    for i in 0..2 {
        after.add(ask(eport, "bakery", USER, i == 1, &want));
    }
    let logs = format!("{}\n--- cloud\n{}", edge.log(), cloud.log());
    eprintln!(
        "CHAOS cloud-kill: killed at {killed_at} of {kv} KV bytes; stream interruptions logged: {}",
        count(&edge.log(), "stream interrupted")
    );
    t.check("cloud-kill: requests running at the kill", &logs);
    after.check("cloud-kill: requests after the restart", &logs);
    assert_eq!(after.right, 2, "{after:?}\n{logs}");
}

/// 2. The link cut and flapped at random (seeded) points during transfers and requests.
#[test]
fn link_cut_and_flapped_at_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir_str(&dir.path().join("store"));
    let cport = free_port();
    let _cloud = spawn_cloud_at(dir.path(), cport, &store, "cloud.log");
    let shops = &SHOPS[..3];
    for (name, system) in shops {
        register(cport, name, system);
    }
    let mut kv = HashMap::new();
    for (name, _) in shops {
        kv.insert(*name, raw_bytes(&wait_ready(cport, name)));
    }
    let wants: Vec<String> = shops.iter().map(|(_, s)| generate(s, USER)).collect();
    let link = Link::start(cport, 500 << 10);
    let (edge, eport) = spawn_edge(
        dir.path(),
        "edge.log",
        link.port,
        Some(&dir.path().join("cache")),
    );
    let mut rng = Rng(0x00c4_a05e_ed5e_ed01);
    let mut t = Tally::default();
    let mut after = Tally::default();
    let mut events = Vec::new();
    for (i, (name, _)) in shops.iter().enumerate() {
        let total = kv[name];
        let mark = link.down();
        let running = spawn_asks(eport, name, USER, &wants[i], 3);
        // Two faults per transfer, at random points of it: a cut, or a flap (new connections
        // refused for a random while, the open ones cut).
        let mut at = 0;
        for _ in 0..2 {
            at = rng
                .range(at + total / 10, at + total / 2)
                .min(total * 9 / 10);
            if !link.try_wait_down(mark, at) {
                events.push(format!("{name}: the transfer stopped before {at}"));
                break;
            }
            if rng.next().is_multiple_of(2) {
                link.cut();
                events.push(format!("{name}: cut at {at}"));
            } else {
                let ms = rng.range(200, 2500);
                link.refuse(true);
                link.cut();
                std::thread::sleep(Duration::from_millis(ms));
                link.refuse(false);
                events.push(format!("{name}: flap of {ms} ms at {at}"));
            }
        }
        join_all(running, &mut t);
        after.add(ask(eport, name, USER, false, &wants[i]));
    }
    // The link down while requests come for prompts the edge holds: served without the cloud.
    link.refuse(true);
    link.cut();
    std::thread::sleep(Duration::from_millis(2200));
    for (i, (name, _)) in shops.iter().enumerate() {
        after.add(ask(eport, name, USER, i % 2 == 1, &wants[i]));
    }
    link.refuse(false);
    let log = edge.log();
    eprintln!(
        "CHAOS flap: {} faults ({:?}); {} connections refused; interruptions logged {}, failed fetches {}",
        events.len(),
        events,
        link.s.refused.load(Ordering::Relaxed),
        count(&log, "stream interrupted"),
        count(&log, "fetching the KV failed")
    );
    t.check("flap: requests during the faults", &log);
    after.check(
        "flap: requests after each round and with the link down",
        &log,
    );
    assert_eq!(after.right, shops.len() * 2, "{after:?}\n{log}");
}

/// 3. Redis SIGKILLed under a cloud replica, then restarted with its data.
#[test]
fn redis_killed_under_a_replica() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("redis");
    std::fs::create_dir_all(&rdir).unwrap();
    let rport = free_port();
    let redis = Redis::start_at(&rdir, rport, true);
    let store = format!("redis://127.0.0.1:{rport}");
    let cport = free_port();
    let cloud = spawn_cloud_at(dir.path(), cport, &store, "cloud.log");
    let (name, system) = SHOPS[3];
    register(cport, name, system);
    let info = wait_ready(cport, name);
    let id = info["id"].as_str().unwrap().to_string();
    let want = generate(system, USER);
    // An edge that holds the prompt (and has it on disk).
    let (edge, eport) = spawn_edge(
        dir.path(),
        "edge-a.log",
        cport,
        Some(&dir.path().join("cache-a")),
    );
    let mut t = Tally::default();
    t.add(ask(eport, name, USER, false, &want));
    assert_eq!(t.right, 1, "{t:?}\n{}", edge.log());
    drop(redis);
    // The cloud's store is gone: its answers are clear errors (or what it still holds), promptly;
    // the process stays up.
    let mut cloud_t = Tally::default();
    let base = format!("http://127.0.0.1:{cport}");
    let calls: [(&str, String, Option<Value>); 5] = [
        ("GET", format!("{base}/v1/cloud-prompts/{name}"), None),
        ("GET", format!("{base}/v1/cloud-prompts"), None),
        ("GET", format!("{base}/v1/kv/{id}/manifest"), None),
        ("GET", format!("{base}/v1/kv/{id}/stream"), None),
        (
            "POST",
            format!("{base}/v1/cloud-prompts"),
            Some(json!({"name": "late", "messages": [{"role": "system", "content": "Hello."}]})),
        ),
    ];
    let mut statuses = Vec::new();
    for (m, url, body) in &calls {
        let (code, b, exit) = curl(m, url, Some(TOKEN), body.as_ref(), 20);
        statuses.push(code);
        cloud_t.add(match (code, exit) {
            (_, 28) => Outcome::Hung,
            (200..=299, _) => Outcome::Right,
            (500..=599, _) => match openai_error(&b) {
                Some(e) => Outcome::ClearError(format!("{code} {e}")),
                None => Outcome::Lost(format!("{code} {b}")),
            },
            _ => Outcome::Lost(format!("{m} {url}: {code} (exit {exit}) {b}")),
        });
    }
    // A store out of reach is "unavailable, retry" (503), not an internal error.
    assert!(
        statuses.iter().all(|&c| c == 503),
        "{statuses:?}\n{}",
        cloud.log()
    );
    assert_eq!(
        curl("GET", &format!("{base}/health"), None, None, 10).0,
        200,
        "the cloud died with its store: {}",
        cloud.log()
    );
    // The edge holding the prompt keeps answering right; a fresh edge without it gets a clear error.
    t.add(ask(eport, name, USER, true, &want));
    t.add(ask(eport, name, USER, false, &want));
    let (edge_b, eport_b) = spawn_edge(
        dir.path(),
        "edge-b.log",
        cport,
        Some(&dir.path().join("cache-b")),
    );
    let fresh = ask(eport_b, name, USER, false, &want);
    let mut fresh_t = Tally::default();
    fresh_t.add(fresh);
    // Redis back with its data: the cloud serves again, and the fresh edge gets the prompt.
    let _redis = Redis::start_at(&rdir, rport, true);
    let t0 = Instant::now();
    loop {
        let (code, _, _) = curl(
            "GET",
            &format!("{base}/v1/kv/{id}/manifest"),
            Some(TOKEN),
            None,
            10,
        );
        if code == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the cloud does not serve after Redis came back: {code}\n{}",
            cloud.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_ready(cport, name);
    let mut back = Tally::default();
    back.add(ask(eport_b, name, USER, false, &want));
    back.add(ask(eport, name, USER, true, &want));
    let logs = format!(
        "{}\n--- edge b\n{}\n--- cloud\n{}",
        edge.log(),
        edge_b.log(),
        cloud.log()
    );
    eprintln!("CHAOS redis: the cloud's statuses with Redis down: {statuses:?}");
    cloud_t.check("redis: the cloud with Redis down", &logs);
    t.check("redis: the edge holding the prompt", &logs);
    fresh_t.check("redis: a fresh edge with Redis down", &logs);
    back.check("redis: after Redis restarted", &logs);
    assert_eq!(t.right, 3, "{t:?}\n{logs}");
    assert_eq!(back.right, 2, "{back:?}\n{logs}");
}

/// Samples a directory's total size every few milliseconds; the largest seen.
struct SizeWatch {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    h: Option<std::thread::JoinHandle<()>>,
}

impl SizeWatch {
    fn start(dir: &Path) -> SizeWatch {
        let (max, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (m, s, d) = (max.clone(), stop.clone(), dir.to_path_buf());
        let h = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(dir_bytes(&d), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        SizeWatch {
            max,
            stop,
            h: Some(h),
        }
    }
    fn max(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.h.take() {
            h.join().unwrap();
        }
        self.max.load(Ordering::Relaxed)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// 4. The edge's disk cache at its budget and beyond: prompts whose KV together exceed it; then a
///    cache directory on a tiny tmpfs that fills up.
#[test]
fn disk_cache_at_its_budget_and_on_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir_str(&dir.path().join("store"));
    let cport = free_port();
    let _cloud = spawn_cloud_at(dir.path(), cport, &store, "cloud.log");
    for (name, system) in SHOPS {
        register(cport, name, system);
    }
    let sizes: Vec<u64> = SHOPS
        .iter()
        .map(|(n, _)| raw_bytes(&wait_ready(cport, n)))
        .collect();
    let wants: Vec<String> = SHOPS.iter().map(|(_, s)| generate(s, USER)).collect();
    // Two prompts fit, not three.
    let largest = *sizes.iter().max().unwrap();
    let budget_mib = (2 * largest + (64 << 10)).div_ceil(1 << 20);
    let budget = budget_mib << 20;
    let mut sorted = sizes.clone();
    sorted.sort();
    assert!(
        sorted[..3].iter().sum::<u64>() > budget,
        "{sizes:?} {budget}"
    );
    let cache = dir.path().join("cache");
    let mib = budget_mib.to_string();
    let mut watch = SizeWatch::start(&cache);
    let eport = free_port();
    let edge = spawn_edge_at(
        dir.path(),
        "edge-1.log",
        eport,
        cport,
        Some(&cache),
        &["--cache-mib", &mib],
    );
    let mut t = Tally::default();
    for (i, (name, _)) in SHOPS.iter().enumerate() {
        t.add(ask(eport, name, USER, i % 2 == 0, &wants[i]));
    }
    drop(edge);
    // A restarted edge on that cache: the evicted prompts are fetched again, the kept ones loaded.
    let edge = spawn_edge_at(
        dir.path(),
        "edge-2.log",
        eport,
        cport,
        Some(&cache),
        &["--cache-mib", &mib],
    );
    // Most recently used first: those the cache kept load, the evicted ones are fetched (and evict
    // in turn the least recently used).
    for (i, (name, _)) in SHOPS.iter().enumerate().rev() {
        t.add(ask(eport, name, USER, i % 2 == 1, &wants[i]));
    }
    let log = edge.log();
    drop(edge);
    let max = watch.max();
    let end = dir_bytes(&cache);
    let fetched = count(&log, "fetching cloud prompt KV");
    let loaded = count(&log, "cloud prompt loaded from the disk cache");
    let evicted = count(&log, "evicted from the KV disk cache");
    eprintln!(
        "CHAOS cache: KV sizes {sizes:?}, budget {budget}; directory at most {max} bytes, {end} at \
         the end; after the restart {fetched} fetched again, {loaded} loaded from disk, {evicted} \
         evicted"
    );
    t.check("cache: requests over a cache at its budget", &log);
    assert!(
        max <= budget,
        "the cache directory reached {max} > {budget}"
    );
    assert!(fetched >= 1 && loaded >= 1, "{log}");
    assert_eq!(fetched + loaded, SHOPS.len(), "{log}");

    // A cache directory on a full disk.
    if !is_root() {
        eprintln!("SKIPPED disk_cache_at_its_budget_and_on_a_full_disk (full disk): not root");
        return;
    }
    let small = dir.path().join("tmpfs-cache");
    std::fs::create_dir_all(&small).unwrap();
    let size = sizes[0] + sizes[0] / 2;
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED disk_cache_at_its_budget_and_on_a_full_disk (full disk): mount failed");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let (edge, eport) = spawn_edge(dir.path(), "edge-full.log", cport, Some(&small));
    let mut full = Tally::default();
    for round in 0..2 {
        for (i, (name, _)) in SHOPS.iter().enumerate() {
            full.add(ask(eport, name, USER, (i + round) % 2 == 0, &wants[i]));
        }
    }
    let log = edge.log();
    drop(edge);
    let used = dir_bytes(&small);
    let enospc = log
        .lines()
        .filter(|l| l.contains("writing the KV disk cache"))
        .count();
    eprintln!(
        "CHAOS full disk: tmpfs of {size} bytes, {used} used at the end; {enospc} 'writing the KV \
         disk cache' log lines"
    );
    full.check("full disk: requests over a cache on a full tmpfs", &log);
    assert_eq!(full.right, SHOPS.len() * 2, "{full:?}");
    assert!(enospc >= 1, "no clear log line for the full disk: {log}");
    assert!(
        log.lines()
            .filter(|l| l.contains("writing the KV disk cache"))
            .all(|l| l.contains("No space left") || l.contains("os error 28")),
        "{log}"
    );
}

/// The cache's KV files of `id`: (stream, manifest).
fn cache_files(cache: &Path, id: &str) -> (PathBuf, PathBuf) {
    (
        cache.join("kv").join(format!("{id}.stream")),
        cache.join("kv").join(format!("{id}.manifest.json")),
    )
}

/// Files in the cache's `kv/` that are not a complete entry's (`ID.stream` / `ID.manifest.json`).
fn stray_files(cache: &Path) -> Vec<String> {
    files(&cache.join("kv"))
        .into_iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| !(n.ends_with(".stream") || n.ends_with(".manifest.json")))
        .collect()
}

/// 5. The edge SIGKILLed while it receives a prompt's KV (and while writing a cache file: the
///    temporary file such a kill leaves), restarted on the same cache directory; then its complete
///    cache file truncated, and corrupted, while it is down.
#[test]
fn edge_killed_mid_cache_write_and_cache_files_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir_str(&dir.path().join("store"));
    let cport = free_port();
    let _cloud = spawn_cloud_at(dir.path(), cport, &store, "cloud.log");
    register(cport, "bakery", BAKERY);
    let info = wait_ready(cport, "bakery");
    let (kv, id) = (raw_bytes(&info), info["id"].as_str().unwrap().to_string());
    let want = generate(BAKERY, USER);
    // The stream as the cloud serves it, to compare the cache file with.
    let reference = {
        let o = Command::new("curl")
            .args(["-s", "--max-time", "30", "-H"])
            .arg(format!("Authorization: Bearer {TOKEN}"))
            .arg(format!("http://127.0.0.1:{cport}/v1/kv/{id}/stream"))
            .output()
            .unwrap();
        o.stdout
    };
    assert_eq!(reference.len() as u64, kv);
    let link = Link::start(cport, 400 << 10);
    let cache = dir.path().join("cache");
    let eport = free_port();
    let start_edge =
        |log: &str| spawn_edge_at(dir.path(), log, eport, link.port, Some(&cache), &[]);
    let (stream, manifest) = cache_files(&cache, &id);
    let mut t = Tally::default();
    // Killed half-way through the transfer.
    let edge = start_edge("edge-1.log");
    let mark = link.down();
    let running = spawn_asks(eport, "bakery", USER, &want, 2);
    link.wait_down(mark, kv / 2, "before the edge's kill");
    drop(edge);
    let mut killed = Tally::default();
    join_all(running, &mut killed);
    // The client's requests died with the edge (nothing to judge there), and nothing of the KV is
    // in the cache as if complete.
    assert!(!stream.exists(), "a stream file after a kill mid-transfer");
    // A kill while writing the cache file leaves its temporary file, half written; and a stream
    // file written in place would be short. Neither may be used.
    let tmp = cache.join("kv").join(".tmpK1LLed");
    std::fs::write(&tmp, &reference[..reference.len() / 2]).unwrap();
    std::fs::write(&stream, &reference[..reference.len() / 2]).unwrap();
    let mut states = Vec::new();
    for (round, damage) in ["partial", "truncated", "corrupted"].iter().enumerate() {
        match *damage {
            "partial" => {}
            "truncated" => {
                let b = std::fs::read(&stream).unwrap();
                std::fs::write(&stream, &b[..b.len() - 1000]).unwrap();
            }
            _ => {
                let mut b = std::fs::read(&stream).unwrap();
                let at = b.len() * 2 / 3;
                b[at] ^= 0x5a;
                std::fs::write(&stream, &b).unwrap();
            }
        }
        let edge = start_edge(&format!("edge-{}.log", round + 2));
        let mark = link.down();
        t.add(ask(eport, "bakery", USER, round % 2 == 0, &want));
        t.add(ask(eport, "bakery", USER, round % 2 == 1, &want));
        let log = edge.log();
        drop(edge);
        let fetched = link.down() - mark;
        states.push(format!(
            "{damage}: {fetched} bytes fetched again, 'dropping a bad disk-cache entry' {}",
            count(&log, "dropping a bad disk-cache entry")
        ));
        if round > 0 {
            assert!(
                log.contains("dropping a bad disk-cache entry"),
                "{damage}: {log}"
            );
        }
        assert!(
            fetched >= kv,
            "{damage}: the KV was not fetched again: {log}"
        );
        // The cache is consistent: the complete stream as the cloud serves it, its manifest, no
        // stray files.
        assert_eq!(
            std::fs::read(&stream).unwrap(),
            reference,
            "{damage}: the cached stream differs from the cloud's"
        );
        assert!(manifest.exists());
        assert_eq!(stray_files(&cache), Vec::<String>::new(), "{damage}");
        t.check(&format!("edge-kill: after the {damage} cache file"), &log);
    }
    // A last restart on the repaired cache: loaded from disk, nothing fetched.
    let edge = start_edge("edge-5.log");
    let mark = link.down();
    t.add(ask(eport, "bakery", USER, false, &want));
    let log = edge.log();
    assert!(
        log.contains("cloud prompt loaded from the disk cache"),
        "{log}"
    );
    assert!(link.down() - mark < kv / 10, "{log}");
    eprintln!(
        "CHAOS edge-kill: killed at {} of {kv} KV bytes (the clients' requests: {killed:?}); {states:?}",
        kv / 2
    );
    t.check("edge-kill: every request after a restart", &log);
    assert_eq!(t.right, 7, "{t:?}");
}
