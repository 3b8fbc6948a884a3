//! The cloud and the edge as the real binaries on loopback, driven by real clients (`curl`, the
//! official `openai` Python package): the edge's answers equal `generate`'s, and — through a recording
//! proxy between edge and cloud — no byte derived from the user's data goes upstream while the cloud
//! prompt's KV really comes down.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bin, curl, dir_str, free_port, model, Proc, Redis};
use serde_json::{json, Value};

fn wait_for(url: &str, what: &str, p: &Proc) {
    let t0 = Instant::now();
    loop {
        let (code, _) = curl("GET", url, None, None);
        if code == 200 {
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

/// A TCP proxy that records every byte each way, per connection.
struct Recorder {
    port: u16,
    up: Arc<Mutex<Vec<Vec<u8>>>>,
    down: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    fn start(target: u16) -> Recorder {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let up: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let down: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let (u, d) = (up.clone(), down.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let i = {
                    let mut u = u.lock().unwrap();
                    u.push(Vec::new());
                    d.lock().unwrap().push(Vec::new());
                    u.len() - 1
                };
                let pipe =
                    |mut from: TcpStream, mut to: TcpStream, rec: Arc<Mutex<Vec<Vec<u8>>>>| {
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 1 << 16];
                            loop {
                                match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        rec.lock().unwrap()[i].extend_from_slice(&buf[..n]);
                                        if to.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                            let _ = to.shutdown(Shutdown::Write);
                        });
                    };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    u.clone(),
                );
                pipe(server, client, d.clone());
            }
        });
        Recorder { port, up, down }
    }
    fn up_bytes(&self) -> Vec<u8> {
        self.up.lock().unwrap().concat()
    }
    fn down_len(&self) -> usize {
        self.down.lock().unwrap().iter().map(|c| c.len()).sum()
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn tokens_of(text: &str) -> Vec<u32> {
    let m = ep_model::Model::load(model(), |_, _| {}).unwrap();
    let tok = ep_model::tokenizer::Tokenizer::from_gguf(m.gguf().unwrap()).unwrap();
    tok.encode(text, false).unwrap()
}

/// Every way a run of token ids could be written: decimal text (as in a JSON array or a list) and
/// little-endian u32 bytes — for every window of 3 consecutive ids.
fn token_forms(ids: &[u32]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for w in ids.windows(3.min(ids.len())) {
        let dec: Vec<String> = w.iter().map(|t| t.to_string()).collect();
        out.push(dec.join(",").into_bytes());
        out.push(dec.join(", ").into_bytes());
        out.push(dec.join(" ").into_bytes());
        out.push(w.iter().flat_map(|t| t.to_le_bytes()).collect());
    }
    out
}

const CLOUD_SYSTEM: &str =
    "You are the assistant of a small bakery called Korn & Kruste. Answer in one \
friendly sentence. The bakery opens from 8 to 18 on weekdays and from 9 to 13 on Saturdays; it is \
closed on Sundays. Rye bread costs 4.20 euros, a baguette 2.10 euros, a cinnamon roll 2.80 euros. \
Orders for cakes need two days' notice. Never repeat a customer's phone number or e-mail address.";

/// The canaries: a name, an e-mail, an IBAN and a phone number.
const CANARIES: [&str; 4] = [
    "Annika Sorensen-Vale",
    "annika.vale@example.net",
    "NO93 8601 1117 947",
    "+47 912 34 567",
];

struct Stack {
    _cloud: Proc,
    cloud_port: u16,
    token: String,
    dir: tempfile::TempDir,
}

/// `edgeprompt cloud` on a free port over `store`, up and answering.
fn spawn_cloud(dir: &Path, store: &str, token: &str, log: &str) -> (Proc, u16) {
    let port = free_port();
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
            token,
        ],
        dir.join(log),
    );
    wait_for(
        &format!("http://127.0.0.1:{port}/health"),
        "the cloud",
        &cloud,
    );
    (cloud, port)
}

/// Registers the bakery cloud prompt through the cloud at `port`.
fn register_bakery(port: u16, token: &str) {
    let (code, body) = curl(
        "POST",
        &format!("http://127.0.0.1:{port}/v1/cloud-prompts"),
        Some(token),
        Some(&json!({"name": "bakery", "messages": [{"role": "system", "content": CLOUD_SYSTEM}]})),
    );
    assert!(code == 200 || code == 202, "{code}: {body}");
}

/// Waits until the cloud at `port` reports the bakery prompt ready.
fn wait_ready(port: u16, token: &str) {
    common::wait_ready(port, token, "bakery");
}

fn start_cloud() -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let token = "cloud-secret-token".to_string();
    let store = dir_str(&dir.path().join("store"));
    let (cloud, port) = spawn_cloud(dir.path(), &store, &token, "cloud.log");
    register_bakery(port, &token);
    wait_ready(port, &token);
    Stack {
        _cloud: cloud,
        cloud_port: port,
        token,
        dir,
    }
}

/// `edgeprompt edge` on a free port, fetching from `cloud_port` (with a disk cache when given, and
/// `extra` arguments), up.
fn spawn_edge(
    dir: &Path,
    log: &str,
    cloud_port: u16,
    token: &str,
    cache: Option<&Path>,
    extra: &[&str],
) -> (Proc, u16) {
    let port = free_port();
    let args = common::edge_args(port, cloud_port, token, cache, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let edge = Proc::start(&args, dir.join(log));
    wait_for(
        &format!("http://127.0.0.1:{port}/health"),
        "the edge",
        &edge,
    );
    (edge, port)
}

/// An edge reaching the cloud through a fresh recording proxy, with its own cache directory.
fn start_edge(s: &Stack, name: &str) -> (Proc, u16, Recorder) {
    start_edge_with(s, name, &[])
}

fn start_edge_with(s: &Stack, name: &str, extra: &[&str]) -> (Proc, u16, Recorder) {
    let rec = Recorder::start(s.cloud_port);
    let cache = s.dir.path().join(format!("cache-{name}"));
    let (edge, port) = spawn_edge(
        s.dir.path(),
        &format!("edge-{name}.log"),
        rec.port,
        &s.token,
        Some(&cache),
        extra,
    );
    (edge, port, rec)
}

fn chat(port: u16, key: &str, body: Value) -> Value {
    let (code, b) = curl(
        "POST",
        &format!("http://127.0.0.1:{port}/v1/chat/completions"),
        Some(key),
        Some(&body),
    );
    assert_eq!(code, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

fn generate(system: &str, user: &str, n: usize) -> String {
    let v = common::generate_json(system, user, n);
    v["text"].as_str().unwrap().to_string()
}

/// Request lines (method and path) of everything sent up.
fn request_lines(up: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(up)
        .lines()
        .filter(|l| l.starts_with("GET ") || l.starts_with("POST "))
        .map(str::to_string)
        .collect()
}

/// A cloud and edges as the real binaries: the edge's greedy answer equals `generate`'s (through
/// `curl` and the official `openai` client, streaming and not); through a recording proxy, no canary
/// from the messages or the edge prompt — as text or as token ids — goes up, while the cloud prompt's
/// KV comes down; two fresh edges with different users send the same requests up; a restarted edge
/// serves from its disk cache without fetching KV.
#[test]
fn cloud_and_edge_keep_user_data_on_the_edge() {
    let s = start_cloud();
    let (edge, port, rec) = start_edge(&s, "a");
    let user = format!(
        "Hello, I am {} ({}, {}). Can I pay my cake order from {}? Are you open on Sunday?",
        CANARIES[0], CANARIES[1], CANARIES[3], CANARIES[2]
    );
    let notes = format!(
        "Customer file: {} orders a birthday cake every March; phone {}; IBAN {}.",
        CANARIES[0], CANARIES[3], CANARIES[2]
    );
    let key = "tenant-annika";
    let (code, b) = curl(
        "POST",
        &format!("http://127.0.0.1:{port}/v1/edge-prompts"),
        Some(key),
        Some(&json!({"name": "file", "text": notes})),
    );
    assert!(code == 200 || code == 201, "{code}: {b}");
    // Without the edge prompt: the answer equals `generate --system S --prompt U`.
    let v = chat(
        port,
        key,
        json!({"model": "smol:bakery", "messages": [{"role": "user", "content": user}],
               "temperature": 0, "max_tokens": 24}),
    );
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        answer,
        generate(CLOUD_SYSTEM, &user, 24),
        "edge vs generate"
    );
    // What one chat on a fresh edge sent up (compared with another user's below).
    let first_a = request_lines(&rec.up_bytes());
    let cloud_tokens = tokens_of_prompt(CLOUD_SYSTEM);
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= cloud_tokens as u64,
        "{v}"
    );
    // With the edge prompt.
    let v2 = chat(
        port,
        key,
        json!({"model": "smol:bakery", "edge_prompt": "file",
               "messages": [{"role": "user", "content": user}], "temperature": 0, "max_tokens": 24}),
    );
    assert!(v2["usage"]["prompt_tokens"].as_u64() > v["usage"]["prompt_tokens"].as_u64());
    // ... equal to the same message list run locally through the engine.
    assert_eq!(
        v2["choices"][0]["message"]["content"],
        local_chat(
            &[
                ("system", CLOUD_SYSTEM),
                ("system", notes.as_str()),
                ("user", user.as_str())
            ],
            24
        ),
        "edge prompt: edge vs local"
    );
    // The official openai client, streaming and not.
    let py = e2e_python();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/e2e/openai_client.py");
    let o = Command::new(&py)
        .arg(&script)
        .args([
            &format!("http://127.0.0.1:{port}/v1"),
            key,
            "smol:bakery",
            "",
            &user,
            "24",
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openai client: {}{}",
        String::from_utf8_lossy(&o.stderr),
        edge.log()
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["full"]["text"], answer, "openai client vs curl");
    assert_eq!(r["stream"]["text"], answer, "streamed vs whole");
    assert!(r["stream"]["chunks"].as_u64().unwrap() > 1);
    assert_eq!(
        r["stream"]["usage"]["completion_tokens"],
        r["full"]["completion_tokens"]
    );
    assert!(r["full"]["cached_tokens"].as_u64().unwrap() >= cloud_tokens as u64);
    assert!(r["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "smol:bakery"));
    assert_eq!(r["empty_messages_error"]["status"], 400);
    // Nothing derived from user content went up.
    let up = rec.up_bytes();
    assert!(!up.is_empty());
    for c in CANARIES
        .iter()
        .chain([user.as_str(), notes.as_str()].iter())
    {
        assert!(!contains(&up, c.as_bytes()), "{c:?} went up");
        for f in token_forms(&tokens_of(c)) {
            assert!(!contains(&up, &f), "token ids of {c:?} went up");
        }
    }
    // The KV really came down.
    assert!(
        rec.down_len() as f64 >= 0.9 * cloud_tokens as f64 * 23_040.0,
        "{} bytes down for {cloud_tokens} tokens",
        rec.down_len()
    );
    // A second fresh edge, another user: the same requests go up.
    let (_edge_b, port_b, rec_b) = start_edge(&s, "b");
    let v = chat(
        port_b,
        "tenant-other",
        json!({"model": "smol:bakery", "messages": [{"role": "user", "content": "Do you sell rye bread?"}],
               "temperature": 0, "max_tokens": 8}),
    );
    assert!(v["choices"][0]["message"]["content"].is_string());
    // Lease renewals come with time, and the link probes' sizes with the link's speed.
    let user_independent = |l: &String| !l.contains("/lease") && !l.contains("/v1/probe");
    // The recorder logs each connection's bytes as they pass, so requests on the probe's connection
    // and the pool's interleave by timing: the same requests, compared in sorted order.
    let mut lines_a: Vec<String> = first_a.into_iter().filter(user_independent).collect();
    let mut lines_b: Vec<String> = request_lines(&rec_b.up_bytes())
        .into_iter()
        .filter(user_independent)
        .collect();
    lines_a.sort();
    lines_b.sort();
    assert_eq!(lines_a, lines_b, "upstream requests depend on the user");
    // The edge's log (at info, with the audit lines) holds no canary.
    let log = edge.log();
    assert!(log.contains("audit") || log.contains("request"), "{log}");
    for c in CANARIES {
        assert!(!log.contains(c), "{c:?} in the edge's log");
    }
    // A restarted edge serves from its disk cache: no KV stream fetched.
    drop(edge);
    let (_edge_c, port_c, rec_c) = start_edge(&s, "a");
    let v = chat(
        port_c,
        key,
        json!({"model": "smol:bakery", "messages": [{"role": "user", "content": user}],
               "temperature": 0, "max_tokens": 24}),
    );
    assert_eq!(v["choices"][0]["message"]["content"], answer);
    assert!(
        !request_lines(&rec_c.up_bytes())
            .iter()
            .any(|l| l.contains("/stream") || l.contains("/frames")),
        "the restarted edge fetched KV: {:?}",
        request_lines(&rec_c.up_bytes())
    );
}

/// Tokens of the cloud prompt as the cloud renders it (the system message alone).
fn tokens_of_prompt(system: &str) -> usize {
    let (m, tok, t) = {
        let b = ep_model::load_model_dir_or_gguf(model(), |_, _| {}).unwrap();
        (b.model, b.tokenizer, b.template.unwrap())
    };
    drop(m);
    let msgs = [ep_model::chat::ChatMessage::new("system", system)];
    ep_model::chat::render_prompt(&tok, &t, &msgs, false)
        .unwrap()
        .tokens
        .len()
}

/// The README's main command runs the whole demo and says nothing private went up.
#[test]
fn up_runs_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args([
            "up",
            "--once",
            "--listen",
            "127.0.0.1:0",
            "--model",
            &model(),
            "--max-tokens",
            "16",
            "--store",
            &dir_str(&dir.path().join("store")),
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("privacy: none of the 5 private values"),
        "{out}"
    );
    assert!(
        out.contains("sent up:") && out.contains("received down:"),
        "{out}"
    );
    assert!(out.contains("assistant: "), "{out}");
}

/// Two cloud replicas on one real Redis: a prompt registered through one is served by the other, and
/// edges fetching from either give the same answer as `generate`.
#[test]
fn two_cloud_replicas_on_one_redis_serve_either_edge() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let store = format!("redis://127.0.0.1:{}", redis.port);
    let token = "replica-token";
    let replicas: Vec<(Proc, u16)> = (0..2)
        .map(|i| spawn_cloud(dir.path(), &store, token, &format!("cloud-{i}.log")))
        .collect();
    register_bakery(replicas[0].1, token);
    // Ready as seen by the other replica.
    wait_ready(replicas[1].1, token);
    // Both replicas serve the same manifest, signed with the one key in the store.
    let (_, info) = curl(
        "GET",
        &format!("http://127.0.0.1:{}/v1/cloud-prompts/bakery", replicas[0].1),
        Some(token),
        None,
    );
    let id = serde_json::from_str::<Value>(&info).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = |port: u16| -> Value {
        let (code, b) = curl(
            "GET",
            &format!("http://127.0.0.1:{port}/v1/kv/{id}/manifest"),
            Some(token),
            None,
        );
        assert_eq!(code, 200, "{b}");
        serde_json::from_str(&b).unwrap()
    };
    let (m0, m1) = (manifest(replicas[0].1), manifest(replicas[1].1));
    assert_eq!(m0, m1);
    assert_eq!(m0["key"].as_str().unwrap().len(), 64);
    let user = "Are you open on Saturday at noon?";
    let want = generate(CLOUD_SYSTEM, user, 16);
    for (i, (_, cloud_port)) in replicas.iter().enumerate().rev() {
        let (_edge, port) = spawn_edge(
            dir.path(),
            &format!("edge-{i}.log"),
            *cloud_port,
            token,
            None,
            &[],
        );
        let v = chat(
            port,
            "t",
            json!({"model": "smol:bakery", "messages": [{"role": "user", "content": user}],
                   "temperature": 0, "max_tokens": 16}),
        );
        assert_eq!(
            v["choices"][0]["message"]["content"], want,
            "edge on replica {i}"
        );
        assert!(
            v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
                > 0,
            "edge on replica {i} did not use the cloud KV: {v}"
        );
    }
}

/// Greedy text of a message list rendered and run locally (the engine, the same render function).
fn local_chat(msgs: &[(&str, &str)], max_tokens: usize) -> String {
    let b = ep_model::load_model_dir_or_gguf(model(), |_, _| {}).unwrap();
    let t = b.template.unwrap();
    let msgs: Vec<ep_model::chat::ChatMessage> = msgs
        .iter()
        .map(|(r, c)| ep_model::chat::ChatMessage::new(*r, *c))
        .collect();
    let prompt = ep_model::chat::render_prompt(&b.tokenizer, &t, &msgs, true)
        .unwrap()
        .tokens;
    let e = ep_engine::Engine::start(
        std::sync::Arc::new(b.model),
        std::sync::Arc::new(b.tokenizer),
        ep_engine::EngineConfig::default(),
        None,
    )
    .unwrap();
    let params = ep_model::generate::GenerateParams {
        max_tokens,
        sampling: ep_model::sampling::SamplingParams::greedy(),
        ..Default::default()
    };
    e.submit(ep_engine::Request::new(prompt, params))
        .unwrap()
        .collect_blocking()
        .unwrap()
        .text
}

/// The Python of the end-to-end venv (`scripts/setup-test-env.sh` makes it).
fn e2e_python() -> String {
    let py = std::env::var("EDGEPROMPT_E2E_PYTHON").unwrap_or_else(|_| {
        ep_model::paths::edgeprompt_home()
            .join("venv-e2e/bin/python")
            .to_string_lossy()
            .into_owned()
    });
    assert!(
        Path::new(&py).exists(),
        "no end-to-end Python at {py}: run scripts/test.sh (it sets one up)"
    );
    py
}

/// The operator page in headless Chromium, by keyboard only: the key, the cloud prompt, sampling
/// settings and a message carrying a canary; the streamed answer equals `generate`'s; the audit row
/// of that response says 0 bytes of the user's text went up — and the recording proxy agrees; the
/// audit (JSON) holds no text, shows only the caller's tenant and needs a key; readable at 360 px, no
/// console errors; screenshots saved.
#[test]
fn operator_page_in_a_browser() {
    let chromium = std::env::var("EDGEPROMPT_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    let driver = std::env::var("EDGEPROMPT_CHROMEDRIVER").unwrap_or("/usr/bin/chromedriver".into());
    if !Path::new(&chromium).exists() || !Path::new(&driver).exists() {
        eprintln!(
            "SKIPPED operator_page_in_a_browser: no {chromium} / {driver} (scripts/setup-test-env.sh \
             installs Debian's chromium and chromium-driver as root)"
        );
        return;
    }
    let s = start_cloud();
    let keys = s.dir.path().join("keys.txt");
    std::fs::write(&keys, "page-key tenant-page\nother-key tenant-other\n").unwrap();
    let keys_arg = dir_str(&keys);
    let (edge, port, rec) = start_edge_with(&s, "page", &["--api-keys", &keys_arg]);
    let canary = "CANARY-Q7R2-5513";
    let message =
        format!("Hi, I am Lene Thorsrud, member {canary}. When are you open on Saturday?");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("operator-page");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/e2e/operator_page.py");
    let o = Command::new(e2e_python())
        .arg(&script)
        .args([
            &format!("http://127.0.0.1:{port}"),
            "page-key",
            "bakery",
            &message,
            "24",
            &dir_str(&out),
        ])
        .env("EDGEPROMPT_CHROMIUM", &chromium)
        .env("EDGEPROMPT_CHROMEDRIVER", &driver)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "operator_page.py failed:\n{}\n{}\nedge log: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        edge.log()
    );
    let v: Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    // Every control is reached by Tab.
    let order: Vec<&str> = v["tab_order"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for id in [
        "apikey",
        "usekey",
        "cloud",
        "edge",
        "sampling-summary",
        "message",
        "sendbtn",
        "clear",
        "recent-summary",
    ] {
        assert!(order.contains(&id), "#{id} not in the Tab order {order:?}");
    }
    assert_eq!(v["cloud_selected"], "bakery", "{v}");
    // The streamed answer, as the page shows it, equals the CLI's greedy answer.
    assert_eq!(v["answer_class"], "assistant", "{v}");
    assert_eq!(
        v["answer"].as_str().unwrap().trim_end(),
        generate(CLOUD_SYSTEM, &message, 24).trim_end(),
        "page vs generate"
    );
    let cloud_tokens = tokens_of_prompt(CLOUD_SYSTEM) as u64;
    assert!(
        v["cached_tokens"].as_str().unwrap().parse::<u64>().unwrap() >= cloud_tokens,
        "{v}"
    );
    // The audit row in the page: 0 bytes of the message went up.
    assert_eq!(v["audit_text_up"], "0 B", "{v}");
    let cells = v["audit_cells"].to_string();
    assert!(cells.contains("GET /v1/cloud-prompts/bakery"), "{cells}");
    assert!(!cells.contains(canary), "{cells}");
    // ... and the proxy between edge and cloud saw no byte of it either.
    assert!(!contains(&rec.up_bytes(), canary.as_bytes()));
    assert!(!contains(&rec.up_bytes(), b"Thorsrud"));
    // The same audit as JSON: the row, no text anywhere, the upstream lines the proxy recorded.
    let audit = |key: Option<&str>| {
        curl(
            "GET",
            &format!("http://127.0.0.1:{port}/v1/audit"),
            key,
            None,
        )
    };
    let (code, body) = audit(Some("page-key"));
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.contains(canary) && !body.contains("Thorsrud"),
        "{body}"
    );
    let a: Value = serde_json::from_str(&body).unwrap();
    let id = v["response_id"].as_str().unwrap();
    let row = a["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no audit row {id}: {body}"));
    assert_eq!(row["text_bytes_up"], 0, "{row}");
    assert_eq!(row["status"], 200, "{row}");
    assert!(
        row["cached_tokens"].as_u64().unwrap() >= cloud_tokens,
        "{row}"
    );
    assert!(row["ttft_ms"].as_f64().unwrap() > 0.0, "{row}");
    let mut seen: Vec<String> = a["upstream"]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| format!("{} HTTP/1.1", u["line"].as_str().unwrap()))
        .collect();
    let mut recorded = request_lines(&rec.up_bytes());
    seen.sort();
    recorded.sort();
    assert_eq!(seen, recorded, "the audit's upstream lines vs the proxy's");
    assert_eq!(
        a["upstream"]["bytes_up"].as_u64().unwrap() as usize,
        rec.up_bytes().len(),
        "bytes up: audit vs proxy"
    );
    let held = &a["cloud_prompts"][0];
    assert_eq!(held["name"], "bakery", "{a}");
    assert_eq!(held["tokens"].as_u64().unwrap(), cloud_tokens, "{held}");
    // Another tenant does not see the row; no key, no audit.
    let (code, other) = audit(Some("other-key"));
    assert_eq!(code, 200, "{other}");
    assert!(!other.contains(id), "{other}");
    assert_eq!(audit(None).0, 401);
    assert_eq!(audit(Some("wrong")).0, 401);
    // Readable at 360 px: nothing wider than the viewport.
    assert_eq!(v["narrow"]["inner"], 360, "{v}");
    assert!(
        v["narrow"]["scroll"].as_u64().unwrap() <= 360,
        "horizontal overflow at 360 px: {v}"
    );
    // No console errors (nor warnings).
    let bad: Vec<&Value> = v["console"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
        .collect();
    assert!(bad.is_empty(), "console: {bad:?}");
    for f in ["operator-page.png", "operator-page-360.png"] {
        let png = std::fs::read(out.join(f)).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{f} is not a PNG");
        eprintln!("screenshot: {}", out.join(f).display());
    }
}
