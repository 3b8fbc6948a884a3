//! The cloud over real HTTP on loopback: registration → ready → signed manifest → stream (decoded and
//! checked against the manifest, `Range` resume, frames, `ETag`/304), the token guard, bad input,
//! versions kept servable for their lease and then collected, a restart on the same store, two
//! replicas sharing one Redis, and a SmolLM2 messages prompt.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ep_cloud::{CloudConfig, CloudModel, CloudServer, DirStore, RedisStore, Store};
use ep_engine::{Engine, EngineConfig};
use ep_kv::wire::{Item, StreamReader};
use ep_model::chat::ChatTemplate;
use ep_model::tokenizer::Tokenizer;
use ep_model::Model;
use ep_proto::{CloudPromptInfo, ErrorBody, PromptContent, PromptStatus, SignedManifest};
use reqwest::StatusCode;
use serde_json::json;

struct Loaded {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    template: Option<Arc<ChatTemplate>>,
    _dir: Option<tempfile::TempDir>,
}

fn tiny() -> Loaded {
    let (model, tok, dir) = ep_testutil::load_tiny(7);
    Loaded {
        model: Arc::new(model),
        tok: Arc::new(tok),
        template: None,
        _dir: Some(dir),
    }
}

fn smollm2() -> Loaded {
    let model = Model::load(ep_testutil::require_test_model(), |_, _| {}).unwrap();
    let tok = Tokenizer::from_gguf(model.gguf().unwrap()).unwrap();
    let template = ChatTemplate::from_gguf(model.gguf().unwrap(), &tok)
        .unwrap()
        .map(Arc::new);
    Loaded {
        model: Arc::new(model),
        tok: Arc::new(tok),
        template,
        _dir: None,
    }
}

fn cloud_model(l: &Loaded) -> CloudModel {
    let cfg = EngineConfig {
        kv_budget_bytes: 64 << 20,
        max_seq_len: 2048,
        ..EngineConfig::default()
    };
    CloudModel {
        engine: Arc::new(Engine::start(l.model.clone(), l.tok.clone(), cfg, None).unwrap()),
        tok: l.tok.clone(),
        template: l.template.clone(),
    }
}

fn config(token: Option<&str>) -> CloudConfig {
    CloudConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: token.map(str::to_string),
        frame_tokens: 64,
        gc_interval: Duration::from_millis(200),
        ..CloudConfig::default()
    }
}

async fn start(l: &Loaded, store: Arc<dyn Store>, token: Option<&str>) -> CloudServer {
    ep_cloud::serve(config(token), store, cloud_model(l))
        .await
        .unwrap()
}

/// A client of one cloud.
struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    fn new(s: &CloudServer, token: Option<&str>) -> Self {
        Api {
            http: reqwest::Client::new(),
            base: s.url(),
            token: token.map(str::to_string),
        }
    }
    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.req(reqwest::Method::GET, path)
    }
    async fn register(&self, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
        let r = self
            .req(reqwest::Method::POST, "/v1/cloud-prompts")
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }
    async fn info(&self, name: &str) -> CloudPromptInfo {
        let r = self
            .get(&format!("/v1/cloud-prompts/{name}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
    async fn wait_ready(&self, name: &str) -> CloudPromptInfo {
        let t0 = Instant::now();
        loop {
            let i = self.info(name).await;
            match i.status {
                PromptStatus::Ready => {
                    assert_eq!(i.progress, 1.0);
                    return i;
                }
                PromptStatus::Failed => panic!("computing {name} failed: {:?}", i.error),
                _ => {}
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "{name} never got ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    /// The Prometheus text of `/metrics`.
    async fn metrics(&self) -> String {
        self.get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
    async fn manifest(&self, id: &str) -> reqwest::Response {
        self.get(&format!("/v1/kv/{id}/manifest"))
            .send()
            .await
            .unwrap()
    }
    async fn stream(&self, id: &str) -> Vec<u8> {
        let r = self
            .get(&format!("/v1/kv/{id}/stream"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap().to_vec()
    }
}

fn text_prompt(n: usize) -> String {
    let words = [
        "cloud", "edge", "prompt", "kv", "cache", "layer", "frame", "token",
    ];
    (0..n)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Decodes a stream and checks it against the manifest: header digest and tokens, every frame's
/// offset, length and digest.
fn check_stream(m: &ep_proto::Manifest, bytes: &[u8]) {
    assert_eq!(bytes.len() as u64, m.stream_bytes);
    let hb = m.header_bytes as usize;
    assert_eq!(
        ep_proto::hex(blake3::hash(&bytes[..hb]).as_bytes()),
        m.header_digest
    );
    let mut r = StreamReader::new();
    // Fed in odd-sized pieces, as a network delivers it.
    let mut items = Vec::new();
    for chunk in bytes.chunks(777) {
        r.push(chunk);
        while let Some(it) = r.next_item().unwrap() {
            items.push(it);
        }
    }
    assert_eq!(r.pending_bytes(), 0);
    let Item::Header(h) = &items[0] else {
        panic!("the stream starts with its header")
    };
    assert_eq!(h.tokens, m.tokens);
    assert_eq!(
        h.block_hashes
            .iter()
            .map(|b| b.to_hex())
            .collect::<Vec<_>>(),
        m.block_hashes
    );
    assert_eq!(items.len(), 1 + m.frames.len());
    for (it, fr) in items[1..].iter().zip(&m.frames) {
        let Item::Frame(f) = it else { panic!() };
        assert_eq!((f.layer, f.start, f.end), (fr.layer, fr.start, fr.end));
        assert_eq!(ep_proto::hex(&f.digest), fr.digest);
        let mut enc = Vec::new();
        f.encode_into(&mut enc);
        assert_eq!(
            &bytes[fr.offset as usize..(fr.offset + fr.bytes) as usize],
            &enc[..]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_compute_and_serve_kv_over_http() {
    let l = tiny();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DirStore::open(dir.path()).unwrap());
    let s = start(&l, store.clone(), Some("s3cret")).await;
    let api = Api::new(&s, Some("s3cret"));
    let anon = Api::new(&s, None);

    // The token guards everything but /health and /openapi.json.
    let r = anon.get("/health").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h: ep_proto::Health = r.json().await.unwrap();
    assert_eq!(h.role, "cloud");
    let (st, body) = anon.register(json!({"name": "sys", "text": "hello"})).await;
    assert_eq!(st, 401);
    let e: ErrorBody = serde_json::from_value(body).unwrap();
    assert_eq!(e.error.kind, "authentication_error");
    for path in ["/v1/cloud-prompts", "/v1/prefetch", "/metrics"] {
        assert_eq!(anon.get(path).send().await.unwrap().status(), 401, "{path}");
    }
    let bad = Api::new(&s, Some("s3cres"));
    assert_eq!(
        bad.get("/v1/cloud-prompts").send().await.unwrap().status(),
        401
    );
    let doc = anon.get("/openapi.json").send().await.unwrap();
    assert_eq!(doc.status(), 200);
    assert!(doc.text().await.unwrap().contains("/v1/kv/{id}/stream"));

    // Register: queued at once, ready after computing.
    let text = text_prompt(60);
    let (st, body) = api.register(json!({"name": "sys", "text": text})).await;
    assert_eq!(st, 202, "{body}");
    let info: CloudPromptInfo = serde_json::from_value(body).unwrap();
    assert_eq!(info.version, 1);
    assert!(matches!(
        info.status,
        PromptStatus::Queued | PromptStatus::Computing | PromptStatus::Ready
    ));
    let ready = api.wait_ready("sys").await;
    assert_eq!(ready.id, info.id);
    let tokens =
        ep_cloud::render_cloud_prompt(&l.tok, None, &PromptContent::Text(text.clone())).unwrap();
    assert_eq!(ready.tokens, tokens.len());
    assert!(tokens.len() > 128, "several frames per layer");

    // The manifest verifies under the cloud's key and names this model.
    let r = api.manifest(&ready.id).await;
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", ready.id));
    assert_eq!(
        r.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    let sm: SignedManifest = r.json().await.unwrap();
    ep_proto::verify(s.public_key(), &sm).unwrap();
    let m = &sm.manifest;
    assert_eq!(m.id, ready.id);
    assert_eq!(m.tokens, tokens);
    assert_eq!(m.content, PromptContent::Text(text.clone()));
    assert_eq!(m.template_digest, "");
    let eng = cloud_model(&l).engine;
    assert_eq!(m.identity_digest, ep_proto::hex(&eng.identity().digest()));
    assert_eq!(m.id, ep_proto::prompt_id(&eng.identity().digest(), &tokens));
    assert_eq!(m.layout.n_layer as usize, ep_testutil::TINY_LAYERS);
    assert_eq!(m.frames.len(), 2 * tokens.len().div_ceil(64));
    assert_eq!(
        ep_cloud::stored_public_key(store.as_ref())
            .await
            .unwrap()
            .as_deref(),
        Some(s.public_key())
    );

    // The stream decodes and matches every digest of the manifest.
    let full = api.stream(&m.id).await;
    check_stream(m, &full);

    // Range: resume from the middle, a closed range, a suffix, and one past the end.
    let path = format!("/v1/kv/{}/stream", m.id);
    let cut = full.len() / 3;
    let r = api
        .get(&path)
        .header("range", format!("bytes={cut}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes {cut}-{}/{}", full.len() - 1, full.len()).as_str()
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &full[cut..]);
    let r = api
        .get(&path)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &full[10..20]);
    let r = api
        .get(&path)
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(&r.bytes().await.unwrap()[..], &full[full.len() - 5..]);
    let r = api
        .get(&path)
        .header("range", format!("bytes={}-", full.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", full.len()).as_str()
    );

    // If-None-Match → 304 on the manifest, the stream and a frame.
    for p in [format!("/v1/kv/{}/manifest", m.id), path.clone()] {
        let r = api
            .get(&p)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{p}");
        assert!(r.bytes().await.unwrap().is_empty());
    }

    // Frames: each one alone, the bytes the manifest lists.
    for fr in [&m.frames[0], &m.frames[3], m.frames.last().unwrap()] {
        let p = format!("/v1/kv/{}/frames/{}/{}", m.id, fr.layer, fr.start);
        let r = api.get(&p).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let fe = r.headers()["etag"].to_str().unwrap().to_string();
        assert_eq!(fe, format!("\"{}\"", fr.digest));
        let b = r.bytes().await.unwrap();
        assert_eq!(
            &b[..],
            &full[fr.offset as usize..(fr.offset + fr.bytes) as usize]
        );
        let r = api
            .get(&p)
            .header("if-none-match", &fe)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304);
    }
    for p in [
        format!("/v1/kv/{}/frames/9/0", m.id),
        format!("/v1/kv/{}/frames/0/1", m.id),
        format!("/v1/kv/{}/frames/x/y", m.id),
    ] {
        assert_eq!(api.get(&p).send().await.unwrap().status(), 404, "{p}");
    }

    // The same content again: the same version, nothing recomputed.
    let (st, body) = api.register(json!({"name": "sys", "text": text})).await;
    assert_eq!(st, 200);
    assert_eq!(body["id"], m.id.as_str());
    assert_eq!(body["version"], 1);
    // The same content under another name: ready without computing.
    let (st, _) = api
        .register(json!({"name": "sys-copy", "text": text}))
        .await;
    assert_eq!(st, 202);
    assert_eq!(api.wait_ready("sys-copy").await.id, m.id);

    let list: ep_proto::CloudPromptList = api
        .get("/v1/cloud-prompts")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.data.len(), 2);
    let hints: ep_proto::PrefetchHints = api
        .get("/v1/prefetch")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(hints
        .ids
        .iter()
        .any(|h| h.id == m.id && h.stream_bytes == m.stream_bytes));

    let metrics = api.metrics().await;
    assert!(
        metrics.contains("edgeprompt_cloud_prompts_registered_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgeprompt_cloud_prompts_computed_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("edgeprompt_cloud_kv_bytes_served_total"));
    assert!(
        metrics.contains("route=\"/v1/kv/{id}/stream\""),
        "{metrics}"
    );
    assert!(metrics.contains("status=\"401\""));

    let key = s.public_key().to_string();
    s.shutdown().await.unwrap();

    // A restart on the same store: the same key, the prompts still served, nothing recomputed.
    let s2 = start(&l, store.clone(), Some("s3cret")).await;
    let api2 = Api::new(&s2, Some("s3cret"));
    assert_eq!(api2.wait_ready("sys").await.id, m.id);
    let sm2: SignedManifest = api2.manifest(&m.id).await.json().await.unwrap();
    assert_eq!(s2.public_key(), key);
    ep_proto::verify(&key, &sm2).unwrap();
    assert_eq!(api2.stream(&m.id).await, full);
    let metrics = api2.metrics().await;
    assert!(metrics.contains("edgeprompt_cloud_prompts_computed_total 0"));
    s2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_4xx() {
    let l = tiny();
    let dir = tempfile::tempdir().unwrap();
    let s = start(&l, Arc::new(DirStore::open(dir.path()).unwrap()), None).await;
    let api = Api::new(&s, None);
    let post = |body: &'static str| {
        api.req(reqwest::Method::POST, "/v1/cloud-prompts")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, code) in [
        ("{not json", "invalid_json"),
        (r#"{"name": "a"}"#, "invalid_content"),
        (
            r#"{"name": "a", "text": "x", "messages": [{"role": "system", "content": "y"}]}"#,
            "invalid_content",
        ),
        (r#"{"name": "a", "text": ""}"#, "invalid_content"),
        (r#"{"name": "a", "messages": []}"#, "invalid_content"),
        (r#"{"name": "a", "text": "x", "extra": 1}"#, "invalid_json"),
        (r#"{"name": "a/b", "text": "x"}"#, "invalid_name"),
        (r#"{"name": "", "text": "x"}"#, "invalid_name"),
        (r#"{"name": "..", "text": "x"}"#, "invalid_name"),
        (
            r#"{"name": "a", "text": "x", "lease_secs": 0}"#,
            "invalid_lease",
        ),
        // The tiny model has no chat template.
        (
            r#"{"name": "a", "messages": [{"role": "system", "content": "y"}]}"#,
            "render_failed",
        ),
    ] {
        let r = post(body).await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: ErrorBody = r.json().await.unwrap();
        assert_eq!(e.error.code.as_deref(), Some(code), "{body}");
        assert_eq!(e.error.kind, "invalid_request_error");
    }
    let long = format!(r#"{{"name": "{}", "text": "x"}}"#, "n".repeat(65));
    let r = api
        .req(reqwest::Method::POST, "/v1/cloud-prompts")
        .body(long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Too long for the engine (max_seq_len 2048).
    let (st, body) = api
        .register(json!({"name": "big", "text": "y ".repeat(3000)}))
        .await;
    assert_eq!(st, 400);
    assert_eq!(body["error"]["code"], "prompt_too_long");
    // Over the body limit.
    let r = api
        .req(reqwest::Method::POST, "/v1/cloud-prompts")
        .body(vec![b' '; 5 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // The rest of the body was not read: the connection is not reused (the next request below goes
    // through the same pooled client).
    assert_eq!(
        r.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let e: ErrorBody = r.json().await.unwrap();
    assert_eq!(e.error.code.as_deref(), Some("body_too_large"));

    // Unknown prompts and KV.
    let zero = "0".repeat(64);
    for p in [
        "/v1/cloud-prompts/nope".to_string(),
        "/v1/cloud-prompts/a%2Fb".to_string(),
        format!("/v1/kv/{zero}/manifest"),
        format!("/v1/kv/{zero}/stream"),
        format!("/v1/kv/{zero}/frames/0/0"),
        "/v1/kv/..%2Fkey/manifest".to_string(),
        "/v1/nothing".to_string(),
    ] {
        let r = api.get(&p).send().await.unwrap();
        assert_eq!(r.status(), 404, "{p}");
        let _: ErrorBody = r.json().await.unwrap();
    }
    let r = api
        .req(reqwest::Method::DELETE, "/v1/cloud-prompts/nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = api
        .req(reqwest::Method::POST, &format!("/v1/kv/{zero}/lease"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_keeps_the_old_one_servable_until_its_lease_ends() {
    let l = tiny();
    let dir = tempfile::tempdir().unwrap();
    let s = start(&l, Arc::new(DirStore::open(dir.path()).unwrap()), None).await;
    let api = Api::new(&s, None);
    let (st, _) = api
        .register(json!({"name": "p", "text": "first version of the prompt", "lease_secs": 2}))
        .await;
    assert_eq!(st, 202);
    let v1 = api.wait_ready("p").await;
    let (st, body) = api
        .register(json!({"name": "p", "text": "second version of the prompt"}))
        .await;
    assert_eq!(st, 202);
    assert_eq!(body["version"], 2);
    let v2 = api.wait_ready("p").await;
    assert_ne!(v1.id, v2.id);
    assert_eq!(v2.version, 2);
    // The old version is still served, and its lease can be renewed.
    assert_eq!(api.manifest(&v1.id).await.status(), 200);
    let r = api
        .req(reqwest::Method::POST, &format!("/v1/kv/{}/lease", v1.id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lease: ep_proto::Lease = r.json().await.unwrap();
    assert!(lease.lease_until > ep_cloud::now_secs());
    // After the lease, it is collected; the current version stays.
    let t0 = Instant::now();
    while api.manifest(&v1.id).await.status() != 404 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the old version was never collected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "not before its lease"
    );
    assert_eq!(api.manifest(&v2.id).await.status(), 200);
    assert_eq!(api.info("p").await.id, v2.id);
    // Delete: the name and its KV go.
    let r = api
        .req(reqwest::Method::DELETE, "/v1/cloud-prompts/p")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(api.manifest(&v2.id).await.status(), 404);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_messages_prompt_is_rendered_with_its_template() {
    let l = smollm2();
    let template = l.template.clone().expect("SmolLM2 has a chat template");
    let dir = tempfile::tempdir().unwrap();
    let s = start(&l, Arc::new(DirStore::open(dir.path()).unwrap()), None).await;
    let api = Api::new(&s, None);
    let msgs = json!([{"role": "system", "content": "You are a terse assistant for a logistics company. Answer in one sentence."}]);
    let (st, _) = api
        .register(json!({"name": "logistics", "messages": msgs}))
        .await;
    assert_eq!(st, 202);
    let info = api.wait_ready("logistics").await;
    let sm: SignedManifest = api.manifest(&info.id).await.json().await.unwrap();
    ep_proto::verify(s.public_key(), &sm).unwrap();
    let m = &sm.manifest;
    let content: PromptContent = PromptContent::Messages(serde_json::from_value(msgs).unwrap());
    assert_eq!(m.content, content);
    assert_eq!(
        m.template_digest,
        ep_proto::hex(&ep_cloud::template_digest(&template))
    );
    let want = ep_cloud::render_cloud_prompt(&l.tok, Some(&template), &content).unwrap();
    assert_eq!(m.tokens, want);
    let text = l.tok.detokenize(&m.tokens, true);
    assert!(
        text.starts_with("<|im_start|>system\nYou are a terse"),
        "{text}"
    );
    assert!(
        !text.contains("assistant\n"),
        "no generation prompt: {text}"
    );
    check_stream(m, &api.stream(&m.id).await);
    s.shutdown().await.unwrap();
}

/// Waits (at most 10 s) until a `redis-server` accepts connections on loopback `port`.
fn wait_port(port: u16) {
    assert!(
        port_opens(port, Instant::now() + Duration::from_secs(10)),
        "redis-server did not start on port {port}"
    );
}

/// Whether loopback `port` accepts a connection before `deadline`.
fn port_opens(port: u16, deadline: Instant) -> bool {
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A `redis-server` on a free loopback port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        wait_port(port);
        Redis { child, port }
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replica `b` serves `id`'s manifest signed with `key` and a stream that checks against it, the
/// same bytes as replica `a`'s, and a range of it; returns the manifest and the stream.
async fn served_alike(key: &str, a: &Api, b: &Api, id: &str) -> (SignedManifest, Vec<u8>) {
    let sm: SignedManifest = b.manifest(id).await.json().await.unwrap();
    ep_proto::verify(key, &sm).unwrap();
    let full = b.stream(id).await;
    check_stream(&sm.manifest, &full);
    assert_eq!(full, a.stream(id).await);
    let r = b
        .get(&format!("/v1/kv/{id}/stream"))
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &full[100..]);
    (sm, full)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_redis_store() {
    let redis = Redis::start();
    let l = tiny();
    let a_store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let b_store = ep_cloud::open_store(&redis.url()).await.unwrap();
    let (a, b) = tokio::join!(start(&l, a_store, None), start(&l, b_store, None));
    assert_eq!(a.public_key(), b.public_key(), "replicas agree on one key");
    let (api_a, api_b) = (Api::new(&a, None), Api::new(&b, None));
    let (st, _) = api_a
        .register(json!({"name": "shared", "text": text_prompt(40)}))
        .await;
    assert_eq!(st, 202);
    let ia = api_a.wait_ready("shared").await;
    // Served by the other replica: record, manifest, stream, ranges, frames.
    let ib = api_b.wait_ready("shared").await;
    assert_eq!(ia.id, ib.id);
    let (sm, full) = served_alike(a.public_key(), &api_a, &api_b, &ib.id).await;
    let fr = &sm.manifest.frames[1];
    let r = api_b
        .get(&format!(
            "/v1/kv/{}/frames/{}/{}",
            ib.id, fr.layer, fr.start
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        &r.bytes().await.unwrap()[..],
        &full[fr.offset as usize..(fr.offset + fr.bytes) as usize]
    );
    let listed: ep_proto::CloudPromptList = api_b
        .get("/v1/cloud-prompts")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.data.len(), 1);
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    assert_eq!(
        ep_cloud::stored_public_key(&store)
            .await
            .unwrap()
            .as_deref(),
        Some(a.public_key())
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A Redis Cluster of three masters, each with a replica, on free loopback ports (`redis-server
/// --cluster-enabled` nodes joined by `redis-cli --cluster create`); killed on drop.
struct RedisCluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts the cluster, trying again (on fresh ports) when a node could not start or the
    /// cluster would not form: another test's process can take a reserved port between the check
    /// and the node's bind.
    fn start() -> RedisCluster {
        let mut errors = Vec::new();
        for _ in 0..3 {
            match RedisCluster::try_start() {
                Ok(c) => return c,
                Err(e) => errors.push(e),
            }
        }
        panic!("no Redis Cluster in three tries: {errors:#?}");
    }

    fn try_start() -> Result<RedisCluster, String> {
        let dir = tempfile::tempdir().unwrap();
        // Each node takes a client port and a cluster-bus port (`--cluster-port`; by default it
        // would be port + 10000, which nothing reserved and another process may hold).
        let listeners: Vec<_> = (0..12)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let all: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(listeners);
        let (ports, bus) = all.split_at(6);
        let mut c = RedisCluster {
            nodes: Vec::new(),
            ports: ports.to_vec(),
            _dir: dir,
        };
        for (p, b) in ports.iter().zip(bus) {
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-port", &b.to_string()])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                .args(["--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(c._dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (scripts/test.sh installs it)");
            c.nodes.push(child);
        }
        let t0 = Instant::now();
        for &p in &c.ports {
            if !port_opens(p, t0 + Duration::from_secs(10)) {
                return Err(format!("no redis-server on port {p}"));
            }
        }
        // A node binds its bus port after its client port, and exits if it cannot.
        std::thread::sleep(Duration::from_millis(100));
        for (n, p) in c.nodes.iter_mut().zip(&c.ports) {
            if let Ok(Some(status)) = n.try_wait() {
                return Err(format!("redis-server on port {p} exited: {status}"));
            }
        }
        let addrs: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        while !c.ports.iter().all(|&p| {
            Command::new("redis-cli")
                .args(["-p", &p.to_string(), "cluster", "info"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        }) {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err("the cluster did not form in 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(c)
    }
    /// The store spec naming two of its nodes.
    fn spec(&self) -> String {
        format!(
            "redis-cluster://127.0.0.1:{},127.0.0.1:{}",
            self.ports[0], self.ports[3]
        )
    }
    /// How many keys each master holds.
    fn keys_per_master(&self) -> Vec<u64> {
        self.ports
            .iter()
            .filter_map(|p| {
                let role = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "role"])
                    .output()
                    .unwrap();
                if !String::from_utf8_lossy(&role.stdout).starts_with("master") {
                    return None;
                }
                let n = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "dbsize"])
                    .output()
                    .unwrap();
                Some(String::from_utf8_lossy(&n.stdout).trim().parse().unwrap())
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `edgeprompt_cloud_NAME_total` in a replica's `/metrics`.
async fn counter(api: &Api, name: &str) -> u64 {
    let text = api.metrics().await;
    let key = format!("edgeprompt_cloud_{name}_total ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

fn replica_config() -> CloudConfig {
    CloudConfig {
        job_lease: Duration::from_secs(3),
        takeover_interval: Duration::from_millis(200),
        ..config(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_a_redis_cluster_compute_each_prompt_once() {
    let cluster = RedisCluster::start();
    let l = tiny();
    let (sa, sb) = (
        ep_cloud::open_store(&cluster.spec()).await.unwrap(),
        ep_cloud::open_store(&cluster.spec()).await.unwrap(),
    );
    let (a, b) = tokio::join!(
        ep_cloud::serve(replica_config(), sa, cloud_model(&l)),
        ep_cloud::serve(replica_config(), sb, cloud_model(&l))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.public_key(), b.public_key(), "replicas agree on one key");
    let (api_a, api_b) = (Api::new(&a, None), Api::new(&b, None));
    // Each prompt registered at the same moment through both replicas.
    let names = ["p0", "p1", "p2", "p3"];
    for (i, name) in names.iter().enumerate() {
        let body = json!({"name": name, "text": text_prompt(60 + 10 * i)});
        let ((st_a, ja), (st_b, jb)) =
            tokio::join!(api_a.register(body.clone()), api_b.register(body));
        assert!(st_a.is_success() && st_b.is_success(), "{ja} {jb}");
        assert_eq!(ja["id"], jb["id"]);
    }
    for name in names {
        let (ia, ib) = (api_a.wait_ready(name).await, api_b.wait_ready(name).await);
        assert_eq!((ia.id.clone(), ia.version), (ib.id.clone(), ib.version));
        // Served whole and by range from either replica, from whichever master holds its slot.
        served_alike(a.public_key(), &api_a, &api_b, &ib.id).await;
    }
    let sum = |n: &'static str| {
        let (api_a, api_b) = (&api_a, &api_b);
        async move { counter(api_a, n).await + counter(api_b, n).await }
    };
    assert_eq!(sum("prompts_registered").await, 4, "one version per name");
    assert_eq!(
        sum("prompts_computed").await,
        4,
        "each prompt computed once"
    );
    // Both replicas list the same registry.
    let list = |api: &Api| api.get("/v1/cloud-prompts").send();
    let la: ep_proto::CloudPromptList = list(&api_a).await.unwrap().json().await.unwrap();
    let lb: ep_proto::CloudPromptList = list(&api_b).await.unwrap().json().await.unwrap();
    assert_eq!(la.data.len(), 4);
    assert_eq!(
        la.data.iter().map(|i| (&i.name, &i.id)).collect::<Vec<_>>(),
        lb.data.iter().map(|i| (&i.name, &i.id)).collect::<Vec<_>>()
    );
    // The KV of different prompts spreads over the masters (12 hash tags: 4 prompts × 3 codecs).
    let per_master = cluster.keys_per_master();
    assert_eq!(per_master.len(), 3, "{per_master:?}");
    assert!(
        per_master.iter().filter(|&&n| n > 0).count() >= 2,
        "{per_master:?}"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_computation_whose_replica_died_is_taken_over() {
    let cluster = RedisCluster::start();
    let l = tiny();
    let text = text_prompt(90);
    let tokens =
        ep_cloud::render_cloud_prompt(&l.tok, None, &PromptContent::Text(text.clone())).unwrap();
    let digest = ep_kv::identity::ContentIdentity::of(&l.model, &l.tok).digest();
    let id = ep_proto::prompt_id(&digest, &tokens);
    // A replica that took the job and died: its lease runs out after 1.5 s, never renewed.
    let store = ep_cloud::open_store(&cluster.spec()).await.unwrap();
    let job = ep_cloud::Lease::Job(id.clone());
    assert!(store
        .try_lease(&job, "dead-replica", Duration::from_millis(1500))
        .await
        .unwrap());
    assert!(!store
        .try_lease(&job, "other", Duration::from_secs(1))
        .await
        .unwrap());
    let (a, b) = tokio::join!(
        ep_cloud::serve(replica_config(), store, cloud_model(&l)),
        ep_cloud::serve(
            replica_config(),
            ep_cloud::open_store(&cluster.spec()).await.unwrap(),
            cloud_model(&l)
        )
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (api_a, api_b) = (Api::new(&a, None), Api::new(&b, None));
    let t0 = Instant::now();
    let (st, j) = api_a
        .register(json!({"name": "orphan", "text": text}))
        .await;
    assert_eq!(st, 202, "{j}");
    assert_eq!(j["id"], id.as_str());
    // While the dead replica's lease lasts nobody computes it, and both replicas say so.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ia, ib) = (api_a.info("orphan").await, api_b.info("orphan").await);
    assert_eq!(ia.status, PromptStatus::Queued);
    assert_eq!((ia.status, ia.progress), (ib.status, ib.progress));
    assert_eq!(counter(&api_a, "prompt_jobs_elsewhere").await, 1);
    // Then one of them takes it over and finishes it.
    let ready = api_b.wait_ready("orphan").await;
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(ready.id, id);
    assert_eq!(api_a.info("orphan").await.status, PromptStatus::Ready);
    let taken = counter(&api_a, "prompt_jobs_taken_over").await
        + counter(&api_b, "prompt_jobs_taken_over").await;
    let computed =
        counter(&api_a, "prompts_computed").await + counter(&api_b, "prompts_computed").await;
    assert_eq!((taken, computed), (1, 1));
    let sm: SignedManifest = api_a.manifest(&id).await.json().await.unwrap();
    check_stream(&sm.manifest, &api_b.stream(&id).await);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn leases_are_held_by_one_owner_until_released_or_expired() {
    // The same rules in every store: one server, a cluster, a directory.
    let redis = Redis::start();
    let cluster = RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<Arc<dyn Store>> = vec![
        ep_cloud::open_store(&redis.url()).await.unwrap(),
        ep_cloud::open_store(&cluster.spec()).await.unwrap(),
        Arc::new(DirStore::open(dir.path()).unwrap()),
    ];
    for s in stores {
        let l = ep_cloud::Lease::Job("ab".repeat(32));
        let ttl = Duration::from_millis(400);
        assert_eq!(s.lease_holder(&l).await.unwrap(), None);
        assert!(
            !s.renew_lease(&l, "a", ttl).await.unwrap(),
            "nothing to renew"
        );
        assert!(s.try_lease(&l, "a", ttl).await.unwrap());
        assert!(!s.try_lease(&l, "b", ttl).await.unwrap());
        assert!(!s.renew_lease(&l, "b", ttl).await.unwrap());
        assert_eq!(s.lease_holder(&l).await.unwrap().as_deref(), Some("a"));
        s.release_lease(&l, "b").await.unwrap();
        assert_eq!(
            s.lease_holder(&l).await.unwrap().as_deref(),
            Some("a"),
            "only its owner releases it"
        );
        assert!(s.renew_lease(&l, "a", ttl).await.unwrap());
        s.release_lease(&l, "a").await.unwrap();
        assert!(s.try_lease(&l, "b", ttl).await.unwrap(), "released: free");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(s.lease_holder(&l).await.unwrap(), None, "expired");
        assert!(s.try_lease(&l, "a", ttl).await.unwrap(), "expired: free");
        assert!(
            s.try_lease(&ep_cloud::Lease::Registry, "b", ttl)
                .await
                .unwrap(),
            "leases are separate"
        );
    }
}
