//! The fetcher against a real `ep-cloud` on loopback (in-process): imported KV gives the tokens
//! computing gives, requests run while frames arrive, concurrent resolves share one fetch, a manifest
//! signed by another key is refused, a frame corrupted in transit is refetched alone and never used, an
//! interrupted stream resumes with `Range`, a restarted edge serves from its disk cache with no KV
//! fetched, and with the cloud stopped cached prompts are served and uncached ones are unavailable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use ep_cloud::{CloudConfig, CloudModel, CloudServer, DirStore};
use ep_edge::fetch::{FetchError, Fetcher, FetcherConfig};
use ep_engine::{Engine, EngineConfig, Event, Finished};
use ep_model::generate::GenerateParams;
use ep_model::tokenizer::Tokenizer;
use ep_model::Model;
use ep_proto::{CloudPromptInfo, PromptStatus, SignedManifest};
use serde_json::json;

struct Tiny {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    _dir: tempfile::TempDir,
}

fn tiny() -> Tiny {
    let (model, tok, dir) = ep_testutil::load_tiny(7);
    Tiny {
        model: Arc::new(model),
        tok: Arc::new(tok),
        _dir: dir,
    }
}

fn engine(t: &Tiny) -> Arc<Engine> {
    let cfg = EngineConfig {
        kv_budget_bytes: 64 << 20,
        max_seq_len: 2048,
        ..EngineConfig::default()
    };
    Arc::new(Engine::start(t.model.clone(), t.tok.clone(), cfg, None).unwrap())
}

async fn cloud(t: &Tiny, dir: &std::path::Path) -> CloudServer {
    let cfg = CloudConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        frame_tokens: 48,
        ..CloudConfig::default()
    };
    let model = CloudModel {
        engine: engine(t),
        tok: t.tok.clone(),
        template: None,
    };
    ep_cloud::serve(cfg, Arc::new(DirStore::open(dir).unwrap()), model)
        .await
        .unwrap()
}

fn text(seed: usize, n: usize) -> String {
    let words = [
        "north", "south", "river", "stone", "lamp", "cloud", "edge", "orbit",
    ];
    (0..n)
        .map(|i| words[(i * 5 + seed + i / 4) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Registers a text prompt and waits until it is ready.
async fn register(base: &str, name: &str, text: &str) -> CloudPromptInfo {
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/cloud-prompts"))
        .json(&json!({"name": name, "text": text}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let t0 = Instant::now();
    loop {
        let i: CloudPromptInfo = http
            .get(format!("{base}/v1/cloud-prompts/{name}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match i.status {
            PromptStatus::Ready => return i,
            PromptStatus::Failed => panic!("{:?}", i.error),
            _ => tokio::time::sleep(Duration::from_millis(30)).await,
        }
        assert!(t0.elapsed() < Duration::from_secs(120));
    }
}

async fn manifest(base: &str, id: &str) -> SignedManifest {
    reqwest::get(format!("{base}/v1/kv/{id}/manifest"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn fetcher_cfg(url: &str, cache: Option<&std::path::Path>) -> FetcherConfig {
    FetcherConfig {
        cache_dir: cache.map(|p| p.to_path_buf()),
        name_ttl: Duration::ZERO,
        timeout: Duration::from_secs(5),
        retries: 3,
        ..FetcherConfig::new(url)
    }
}

/// Greedy tokens of `prompt` whose first `prefix` tokens are public.
async fn generate(e: &Engine, prompt: Vec<u32>, prefix: usize) -> (Vec<u32>, Finished) {
    generate_codec(e, prompt, prefix, ep_kv::codec::CODEC_RAW).await
}

fn extend(tokens: &[u32]) -> Vec<u32> {
    let mut p = tokens.to_vec();
    p.extend([40, 41, 42, 43, 44]);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_kv_gives_the_computed_tokens_and_resolves_share_one_fetch() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let c = cloud(&t, dir.path()).await;
    let info = register(&c.url(), "sys", &text(0, 80)).await;
    let sm = manifest(&c.url(), &info.id).await;

    let edge = engine(&t);
    let mut cfg = fetcher_cfg(&c.url(), None);
    cfg.cloud_key = Some(c.public_key().to_string());
    let f = Fetcher::new(cfg, edge.clone(), [0; 32]).unwrap();
    let p = f.resolve("sys").await.unwrap();
    assert_eq!(p.id, info.id);
    assert_eq!(p.tokens, sm.manifest.tokens);
    assert!(!p.from_cache);
    // Submitted at once: the request runs each layer as it arrives.
    let prompt = extend(&p.tokens);
    let (got, fin) = generate(&edge, prompt.clone(), p.tokens.len()).await;
    p.wait_complete().await.unwrap();
    assert_eq!(p.ready_layers(), ep_testutil::TINY_LAYERS);
    let (want, _) = generate(&engine(&t), prompt.clone(), p.tokens.len()).await;
    assert_eq!(got, want, "imported KV gives the computed tokens");
    assert!(fin.imported_tokens >= p.tokens.len() / 16 * 16, "{fin:?}");

    let tr = f.traffic();
    assert_eq!(tr.streams_fetched, 1);
    assert_eq!(tr.kv_bytes, sm.manifest.stream_bytes);
    assert!(tr.bytes_down > sm.manifest.stream_bytes);
    assert!(tr.bytes_up > 0 && tr.bytes_up < 2000, "{tr:?}");
    assert_eq!(tr.frames_refetched, 0);
    // Resolving again reuses what is held.
    let p2 = f.resolve("sys").await.unwrap();
    assert!(Arc::ptr_eq(&p, &p2));
    assert_eq!(f.traffic().streams_fetched, 1);

    // Concurrent resolves of one prompt share one fetch.
    register(&c.url(), "other", &text(3, 50)).await;
    let f = Arc::new(f);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move { f.resolve("other").await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    assert!(got.iter().all(|g| Arc::ptr_eq(g, &got[0])));
    assert_eq!(f.traffic().streams_fetched, 2);
    assert!(matches!(
        f.resolve("missing").await,
        Err(FetchError::NotFound(_))
    ));
    let listed = f.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_pinned_or_trusted_on_first_use_on_loopback_only() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let c = cloud(&t, dir.path()).await;
    register(&c.url(), "sys", &text(1, 30)).await;
    let edge = engine(&t);

    // Signed by another key than the pinned one: refused.
    let other = ep_cloud::public_key_of(&[9u8; 32]);
    let mut cfg = fetcher_cfg(&c.url(), None);
    cfg.cloud_key = Some(other);
    let f = Fetcher::new(cfg, edge.clone(), [0; 32]).unwrap();
    match f.resolve("sys").await {
        Err(FetchError::Refused { why, .. }) => {
            assert!(why.contains("not by the pinned key"), "{why}")
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(f.traffic().streams_fetched, 0, "no KV fetched");

    // Loopback without a key: the first key is trusted and remembered.
    let cache = tempfile::tempdir().unwrap();
    let f = Fetcher::new(
        fetcher_cfg(&c.url(), Some(cache.path())),
        edge.clone(),
        [0; 32],
    )
    .unwrap();
    f.resolve("sys").await.unwrap();
    assert_eq!(f.cloud_key().as_deref(), Some(c.public_key()));
    let remembered = std::fs::read_to_string(cache.path().join("cloud-key")).unwrap();
    assert_eq!(remembered.trim(), c.public_key());

    // Off loopback: a key is required, and plain HTTP is refused.
    let mut cfg = fetcher_cfg("https://cloud.example:8400", None);
    assert!(Fetcher::new(cfg.clone(), edge.clone(), [0; 32]).is_err());
    cfg.cloud_key = Some(c.public_key().to_string());
    assert!(Fetcher::new(cfg.clone(), edge.clone(), [0; 32]).is_ok());
    cfg.cloud_url = "http://cloud.example:8400".into();
    assert!(Fetcher::new(cfg.clone(), edge.clone(), [0; 32]).is_err());
    cfg.allow_plain_http = true;
    assert!(Fetcher::new(cfg, edge.clone(), [0; 32]).is_ok());
    c.shutdown().await.unwrap();
}

/// A proxy in front of the cloud that corrupts one byte of `/stream` bodies and cuts the first one
/// short.
#[derive(Clone)]
struct Proxy {
    http: reqwest::Client,
    upstream: String,
    /// Absolute stream offset of the byte flipped in every stream body that holds it.
    corrupt_at: Arc<AtomicU64>,
    /// Cut the next whole-stream body in half.
    truncate: Arc<AtomicBool>,
}

async fn proxy(State(p): State<Proxy>, req: Request) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut rb = p
        .http
        .request(req.method().clone(), format!("{}{path}", p.upstream));
    for h in ["range", "authorization", "if-none-match"] {
        if let Some(v) = req.headers().get(h) {
            rb = rb.header(h, v.clone());
        }
    }
    let r = rb.send().await.unwrap();
    let status = r.status();
    let mut out = Response::builder().status(status);
    let mut start = 0u64;
    for h in ["content-range", "etag", "content-type"] {
        if let Some(v) = r.headers().get(h) {
            if h == "content-range" {
                let s = v.to_str().unwrap();
                start = s["bytes ".len()..s.find('-').unwrap()].parse().unwrap_or(0);
            }
            out = out.header(h, v.clone());
        }
    }
    let mut body = r.bytes().await.unwrap().to_vec();
    if req.uri().path().ends_with("/stream") && status.is_success() {
        let at = p.corrupt_at.load(Ordering::Relaxed);
        if at >= start && at < start + body.len() as u64 {
            body[(at - start) as usize] ^= 0x5a;
        }
        if start == 0 && p.truncate.swap(false, Ordering::Relaxed) {
            body.truncate(body.len() / 2);
        }
    }
    out.body(Body::from(body)).unwrap()
}

async fn start_proxy(upstream: String) -> (String, Proxy) {
    let p = Proxy {
        http: reqwest::Client::new(),
        upstream,
        corrupt_at: Arc::new(AtomicU64::new(u64::MAX)),
        truncate: Arc::new(AtomicBool::new(false)),
    };
    let app = axum::Router::new().fallback(proxy).with_state(p.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_frame_is_refetched_and_an_interrupted_stream_resumes() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let c = cloud(&t, dir.path()).await;
    let info = register(&c.url(), "sys", &text(2, 90)).await;
    let sm = manifest(&c.url(), &info.id).await;
    let (url, px) = start_proxy(c.url()).await;
    // A byte in the payload of the third frame; the first stream response is cut short too.
    let fr = &sm.manifest.frames[2];
    px.corrupt_at.store(
        fr.offset + ep_kv::wire::FRAME_HEADER_BYTES as u64 + 7,
        Ordering::Relaxed,
    );
    px.truncate.store(true, Ordering::Relaxed);
    let edge = engine(&t);
    let mut cfg = fetcher_cfg(&url, None);
    cfg.cloud_key = Some(c.public_key().to_string());
    let f = Fetcher::new(cfg, edge.clone(), [0; 32]).unwrap();
    let p = f.resolve("sys").await.unwrap();
    let prompt = extend(&p.tokens);
    let (got, _) = generate(&edge, prompt.clone(), p.tokens.len()).await;
    p.wait_complete().await.unwrap();
    let tr = f.traffic();
    assert_eq!(tr.frames_refetched, 1, "{tr:?}");
    assert_eq!(tr.resumes, 1, "{tr:?}");
    let (want, _) = generate(&engine(&t), prompt, p.tokens.len()).await;
    assert_eq!(got, want, "the corrupted bytes were never used");
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_edge_serves_from_its_disk_cache_and_survives_the_cloud() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let c = cloud(&t, dir.path()).await;
    let info = register(&c.url(), "sys", &text(4, 70)).await;
    register(&c.url(), "never-fetched", &text(5, 20)).await;
    let key = c.public_key().to_string();
    let cfg = |url: &str| {
        let mut cfg = fetcher_cfg(url, Some(cache.path()));
        cfg.cloud_key = Some(key.clone());
        cfg
    };
    {
        let f = Fetcher::new(cfg(&c.url()), engine(&t), [0; 32]).unwrap();
        let p = f.resolve("sys").await.unwrap();
        p.wait_complete().await.unwrap();
        assert_eq!(f.traffic().streams_fetched, 1);
    }
    assert!(cache
        .path()
        .join("kv")
        .join(format!("{}.stream", info.id))
        .is_file());

    // Restarted (a new engine, the same cache): no KV fetched.
    let edge = engine(&t);
    let f = Fetcher::new(cfg(&c.url()), edge.clone(), [0; 32]).unwrap();
    let p = f.resolve("sys").await.unwrap();
    assert!(p.from_cache);
    let tr = f.traffic();
    assert_eq!(
        (tr.streams_fetched, tr.kv_bytes, tr.cache_loads),
        (0, 0, 1),
        "{tr:?}"
    );
    let prompt = extend(&p.tokens);
    let (got, fin) = generate(&edge, prompt.clone(), p.tokens.len()).await;
    let (want, _) = generate(&engine(&t), prompt.clone(), p.tokens.len()).await;
    assert_eq!(got, want);
    assert!(fin.imported_tokens > 0);
    drop((p, f));

    // The cloud stops: cached prompts are still served, uncached ones are unavailable.
    let url = c.url();
    c.shutdown().await.unwrap();
    let edge = engine(&t);
    let f = Fetcher::new(cfg(&url), edge.clone(), [0; 32]).unwrap();
    let p = f.resolve("sys").await.unwrap();
    assert!(p.from_cache);
    assert_eq!(p.id, info.id);
    let (got, _) = generate(&edge, prompt.clone(), p.tokens.len()).await;
    assert_eq!(got, want);
    for name in ["never-fetched", "unknown"] {
        match f.resolve(name).await {
            Err(FetchError::Unavailable { .. }) => {}
            r => panic!("{name}: {r:?}"),
        }
    }
    let listed = f.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, info.id);
    drop((p, f));

    // A cache entry altered on disk is checked on load and refused (and, the cloud being down,
    // the prompt is then unavailable rather than served from bad bytes).
    let sp = cache.path().join("kv").join(format!("{}.stream", info.id));
    let mut b = std::fs::read(&sp).unwrap();
    let n = b.len();
    b[n - 10] ^= 1;
    std::fs::write(&sp, b).unwrap();
    let f = Fetcher::new(cfg(&url), engine(&t), [0; 32]).unwrap();
    assert!(matches!(
        f.resolve("sys").await,
        Err(FetchError::Unavailable { .. })
    ));
    assert!(!sp.exists(), "the bad entry is dropped");
}

/// A TCP forwarder that counts the bytes each way.
async fn counting_proxy(
    upstream: std::net::SocketAddr,
) -> (String, Arc<AtomicU64>, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (u, d) = (up.clone(), down.clone());
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = l.accept().await else {
                return;
            };
            let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let (u, d) = (u.clone(), d.clone());
            tokio::spawn(async move {
                let mut b = vec![0u8; 1 << 16];
                while let Ok(n) = cr.read(&mut b).await {
                    if n == 0 || sw.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                    u.fetch_add(n as u64, Ordering::SeqCst);
                }
            });
            tokio::spawn(async move {
                let mut b = vec![0u8; 1 << 16];
                while let Ok(n) = sr.read(&mut b).await {
                    if n == 0 || cw.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                    d.fetch_add(n as u64, Ordering::SeqCst);
                }
            });
        }
    });
    (url, up, down)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_counts_are_the_bytes_on_the_wire() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let c = cloud(&t, dir.path()).await;
    register(&c.url(), "sys", &text(6, 40)).await;
    let (url, up, down) = counting_proxy(c.addr()).await;
    let mut cfg = fetcher_cfg(&url, None);
    cfg.cloud_key = Some(c.public_key().to_string());
    let f = Fetcher::new(cfg, engine(&t), [0; 32]).unwrap();
    let p = f.resolve("sys").await.unwrap();
    p.wait_complete().await.unwrap();
    assert!(matches!(
        f.resolve("nope").await,
        Err(FetchError::NotFound(_))
    ));
    let tr = f.traffic();
    // The forwarder may still be passing the last bytes on.
    let t0 = Instant::now();
    while down.load(Ordering::SeqCst) < tr.bytes_down && t0.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(tr.bytes_up, up.load(Ordering::SeqCst), "{tr:?}");
    assert_eq!(tr.bytes_down, down.load(Ordering::SeqCst), "{tr:?}");
    assert_eq!(
        tr.requests, 5,
        "the start-up round trip (/health), name, manifest, stream, unknown name"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    // A private CA and a server certificate it signs.
    let pk = |n: &str| pki.path().join(n);
    let (cert, key, ca) = (pk("cert.pem"), pk("key.pem"), pk("ca.pem"));
    std::fs::write(
        pk("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for cmd in [
        format!("req -x509 {ec} -days 1 -subj /CN=edgeprompt-test-ca -keyout ca.key -out ca.pem"),
        format!("req {ec} -subj /CN=localhost -keyout key.pem -out leaf.csr"),
        "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out cert.pem".to_string(),
    ] {
        let ok = std::process::Command::new("openssl")
            .args(cmd.split(' '))
            .current_dir(pki.path())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(ok.success(), "openssl {cmd}");
    }
    let cfg = CloudConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        frame_tokens: 48,
        token: Some("tok".into()),
        tls: Some(ep_cloud::TlsFiles { cert, key }),
        ..CloudConfig::default()
    };
    let model = CloudModel {
        engine: engine(&t),
        tok: t.tok.clone(),
        template: None,
    };
    let c = ep_cloud::serve(cfg, Arc::new(DirStore::open(dir.path()).unwrap()), model)
        .await
        .unwrap();
    assert!(c.url().starts_with("https://"));
    let pem = std::fs::read(&ca).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let r = http
        .post(format!("{}/v1/cloud-prompts", c.url()))
        .bearer_auth("tok")
        .json(&json!({"name": "sys", "text": text(7, 30)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let t0 = Instant::now();
    loop {
        let i: CloudPromptInfo = http
            .get(format!("{}/v1/cloud-prompts/sys", c.url()))
            .bearer_auth("tok")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if i.status == PromptStatus::Ready {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let edge = engine(&t);
    let mut cfg = fetcher_cfg(&c.url(), None);
    cfg.cloud_key = Some(c.public_key().to_string());
    // Without the CA the certificate is not trusted: the cloud is unreachable.
    let f = Fetcher::new(cfg.clone(), edge.clone(), [0; 32]).unwrap();
    assert!(matches!(
        f.resolve("sys").await,
        Err(FetchError::Unavailable { .. })
    ));
    // Without the token: refused.
    cfg.cloud_ca = Some(ca);
    let f = Fetcher::new(cfg.clone(), edge.clone(), [0; 32]).unwrap();
    assert!(matches!(
        f.resolve("sys").await,
        Err(FetchError::Refused { .. })
    ));
    cfg.token = Some("tok".into());
    let f = Fetcher::new(cfg, edge.clone(), [0; 32]).unwrap();
    let p = f.resolve("sys").await.unwrap();
    p.wait_complete().await.unwrap();
    let prompt = extend(&p.tokens);
    let (got, _) = generate(&edge, prompt.clone(), p.tokens.len()).await;
    let (want, _) = generate(&engine(&t), prompt, p.tokens.len()).await;
    assert_eq!(got, want);
    c.shutdown().await.unwrap();
}

/// Greedy tokens of `prompt` over KV of `codec`'s cache root.
async fn generate_codec(
    e: &Engine,
    prompt: Vec<u32>,
    prefix: usize,
    codec: u8,
) -> (Vec<u32>, Finished) {
    let mut req = ep_engine::Request::new(
        prompt,
        GenerateParams {
            max_tokens: 8,
            ignore_eos: true,
            ..GenerateParams::default()
        },
    );
    req.public_prefix = prefix;
    req.kv_codec = codec;
    let mut s = e.submit(req).unwrap();
    let mut out = Vec::new();
    while let Some(ev) = s.next().await {
        match ev {
            Event::Token { token, .. } => out.push(token),
            Event::Done(f) => return (out, f),
            Event::Error(f) => panic!("{f}"),
            Event::Kv(_) => {}
        }
    }
    panic!("the engine stopped")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_gives_the_exact_tokens_and_lossy_kv_stays_in_its_root() {
    use ep_edge::plan::Policy;
    use ep_kv::codec::{CODEC_INT4, CODEC_INT8, CODEC_RAW};
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let c = cloud(&t, dir.path()).await;
    let info = register(&c.url(), "sys", &text(0, 200)).await;
    // The cloud encoded the KV once per codec; the lossy ones are smaller.
    let size = |name: &str| info.kv.iter().find(|v| v.codec == name).unwrap().bytes;
    assert!(
        size("int8") < size("raw") && size("int4") < size("int8"),
        "{:?}",
        info.kv
    );
    let n = info.tokens;
    let probe = reqwest::get(format!("{}/v1/probe?bytes=300000", c.url()))
        .await
        .unwrap();
    assert_eq!(probe.bytes().await.unwrap().len(), 300_000);
    assert_eq!(
        reqwest::get(format!("{}/v1/probe?bytes=0", c.url()))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        reqwest::get(format!("{}/v1/kv/{}/manifest?codec=int7", c.url(), info.id))
            .await
            .unwrap()
            .status(),
        400
    );

    let p0 = {
        let f = Fetcher::new(
            FetcherConfig {
                cloud_key: Some(c.public_key().to_string()),
                ..fetcher_cfg(&c.url(), None)
            },
            engine(&t),
            [0; 32],
        )
        .unwrap();
        f.resolve("sys").await.unwrap().tokens.clone()
    };
    assert_eq!(p0.len(), n);
    let prompt = extend(&p0);
    let (want, _) = generate(&engine(&t), prompt.clone(), n).await;

    for (policy, codec) in [
        (Policy::FetchRaw, CODEC_RAW),
        (Policy::Split, CODEC_RAW),
        (Policy::Recompute, CODEC_RAW),
        (Policy::Split, CODEC_INT4),
        (Policy::FetchInt8, CODEC_INT8),
        (Policy::FetchInt4, CODEC_INT4),
    ] {
        let edge = engine(&t);
        let cfg = FetcherConfig {
            cloud_key: Some(c.public_key().to_string()),
            policy: policy.clone(),
            codecs: vec![codec],
            ..fetcher_cfg(&c.url(), None)
        };
        let f = Fetcher::new(cfg, edge.clone(), [0; 32]).unwrap();
        let p = f.resolve("sys").await.unwrap();
        assert_eq!(p.codec, codec, "{policy:?}");
        let (got, fin) = generate_codec(&edge, prompt.clone(), n, p.codec).await;
        p.wait_complete().await.unwrap();
        let (decisions, counts) = f.decisions();
        assert_eq!(decisions.len(), 1, "{policy:?}");
        assert_eq!(counts.len(), 1, "{policy:?}");
        let d = &decisions[0];
        match policy {
            Policy::Recompute => {
                assert_eq!(d.strategy, "recompute");
                assert_eq!(fin.imported_tokens, 0);
                assert_eq!(f.traffic().kv_bytes, 0, "recompute fetches no KV");
            }
            Policy::Split => {
                assert_eq!(d.strategy, "split");
                let from = d.split_from.expect("a split point") as usize;
                assert!(from > 0 && from < n && from.is_multiple_of(16), "{d:?}");
                // The tokens before the split were computed here, the rest imported.
                assert!(fin.imported_tokens > 0, "{fin:?}");
                assert!(fin.imported_tokens <= n - from, "{fin:?} {d:?}");
                assert!(fin.cached_tokens >= from, "{fin:?} {d:?}");
                let stream = if codec == CODEC_RAW {
                    size("raw")
                } else {
                    size("int4")
                };
                assert!(
                    f.traffic().kv_bytes < stream,
                    "a split fetches part of the stream"
                );
            }
            _ => {
                assert!(d.strategy.starts_with("fetch-"), "{d:?}");
                assert!(fin.imported_tokens >= n / 16 * 16, "{fin:?}");
            }
        }
        if codec == CODEC_RAW {
            assert_eq!(got, want, "{policy:?}: exact KV gives the computed tokens");
        } else {
            // Lossy KV is only under its codec's root: an exact request finds none of it.
            let (_, exact) = generate(&edge, prompt.clone(), n).await;
            assert_eq!(exact.imported_tokens, 0, "{policy:?}");
            assert!(exact.cached_tokens < 16, "{policy:?} {exact:?}");
        }
    }
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_edge_measures_its_link_and_fetches_on_loopback() {
    use ep_edge::plan::Policy;
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let c = cloud(&t, dir.path()).await;
    let info = register(&c.url(), "sys", &text(1, 300)).await;
    let edge = engine(&t);
    let cfg = FetcherConfig {
        cloud_key: Some(c.public_key().to_string()),
        policy: Policy::Adaptive,
        codecs: vec![0, 1, 2],
        ..fetcher_cfg(&c.url(), None)
    };
    let f = Fetcher::new(cfg, edge.clone(), [0; 32]).unwrap();
    let p = f.resolve("sys").await.unwrap();
    p.wait_complete().await.unwrap();
    assert!(f.planner_ready());
    let l = f.link().expect("the link was measured");
    // Loopback: well under a millisecond's round trip and above 100 MB/s on any machine.
    assert!(l.rtt_s < 0.05 && l.bytes_per_s > 1e8, "{l:?}");
    let (d, _) = f.decisions();
    assert_eq!(d[0].id, info.id);
    // The tiny model computes a prefix fast too, but loopback's transfer is faster still.
    assert!(
        d[0].strategy.starts_with("fetch-") || d[0].strategy == "split",
        "{d:?}"
    );
    assert!(!d[0].reason.is_empty());
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_fetch_refetches_a_corrupted_frame_and_resumes_a_cut_stream() {
    use ep_edge::plan::Policy;
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let c = cloud(&t, dir.path()).await;
    let info = register(&c.url(), "sys", &text(5, 200)).await;
    let (url, px) = start_proxy(c.url()).await;
    // A byte a little into the stream's first frame, whatever the split point; the first response
    // is cut in half too.
    let sm = manifest(&c.url(), &info.id).await;
    px.corrupt_at.store(
        sm.manifest.header_bytes + ep_kv::wire::FRAME_HEADER_BYTES as u64 + 5,
        Ordering::Relaxed,
    );
    px.truncate.store(true, Ordering::Relaxed);
    let edge = engine(&t);
    let cfg = FetcherConfig {
        cloud_key: Some(c.public_key().to_string()),
        policy: Policy::Split,
        ..fetcher_cfg(&url, None)
    };
    let f = Fetcher::new(cfg, edge.clone(), [0; 32]).unwrap();
    let p = f.resolve("sys").await.unwrap();
    let prompt = extend(&p.tokens);
    let (got, fin) = generate(&edge, prompt.clone(), p.tokens.len()).await;
    p.wait_complete().await.unwrap();
    let (d, _) = f.decisions();
    assert_eq!(d[0].strategy, "split", "{d:?}");
    let tr = f.traffic();
    assert_eq!(tr.frames_refetched, 1, "{tr:?}");
    assert_eq!(tr.resumes, 1, "{tr:?}");
    assert!(fin.imported_tokens > 0, "{fin:?}");
    let (want, _) = generate(&engine(&t), prompt, p.tokens.len()).await;
    assert_eq!(
        got, want,
        "exact tokens; the corrupted bytes were never used"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cloud_down_a_prompt_seen_before_is_recomputed_from_its_cached_token_ids() {
    use ep_edge::plan::Policy;
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let c = cloud(&t, dir.path()).await;
    register(&c.url(), "sys", &text(6, 90)).await;
    register(&c.url(), "never", &text(7, 40)).await;
    let key = c.public_key().to_string();
    let url = c.url();
    let cfg = || FetcherConfig {
        cloud_key: Some(key.clone()),
        policy: Policy::Recompute,
        ..fetcher_cfg(&url, Some(cache.path()))
    };
    let tokens = {
        let f = Fetcher::new(cfg(), engine(&t), [0; 32]).unwrap();
        let p = f.resolve("sys").await.unwrap();
        assert_eq!(f.traffic().kv_bytes, 0);
        p.tokens.clone()
    };
    c.shutdown().await.unwrap();
    // A restarted edge, the cloud gone: the prompt it saw is recomputed, the other is unavailable.
    let edge = engine(&t);
    let f = Fetcher::new(cfg(), edge.clone(), [0; 32]).unwrap();
    let p = f.resolve("sys").await.unwrap();
    assert_eq!(p.tokens, tokens);
    assert_eq!(p.strategy, "recompute");
    let prompt = extend(&p.tokens);
    let (got, fin) = generate(&edge, prompt.clone(), p.tokens.len()).await;
    assert_eq!(fin.imported_tokens, 0);
    let (want, _) = generate(&engine(&t), prompt, p.tokens.len()).await;
    assert_eq!(got, want);
    assert!(matches!(
        f.resolve("never").await,
        Err(FetchError::Unavailable { .. })
    ));
}
