//! The load generator of `bench serve` against a real edge (the tiny random model, in process) and
//! against servers that fail: counts, token totals and latencies are consistent; a point where
//! nothing completes is reported with its failures, never a panic or a hang. No timing is asserted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ep_bench::serve::{poisson_arrivals, run_point, Job, Slo, Target};
use ep_edge::EdgeConfig;
use ep_engine::{AttnMode, Engine, EngineConfig};
use ep_kv::KvDtype;
use ep_model::chat::ChatTemplate;

async fn tiny_edge() -> (String, tokio::sync::oneshot::Sender<()>, tempfile::TempDir) {
    tiny_edge_queue(64).await
}

/// The tiny edge holding `max_seqs` (8) + `max_queue` requests at once.
async fn tiny_edge_queue(
    max_queue: usize,
) -> (String, tokio::sync::oneshot::Sender<()>, tempfile::TempDir) {
    let (model, tok, dir) = ep_testutil::load_tiny(3);
    let template = ChatTemplate::from_gguf(model.gguf().unwrap(), &tok).unwrap();
    let tok = Arc::new(tok);
    let engine = Arc::new(
        Engine::start(
            Arc::new(model),
            tok.clone(),
            EngineConfig {
                kv_dtype: KvDtype::F16,
                block_tokens: 16,
                kv_budget_bytes: 32 << 20,
                max_seq_len: 512,
                max_step_tokens: 256,
                max_seqs: 8,
                attn_mode: AttnMode::Splice,
                ..EngineConfig::default()
            },
            None,
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(ep_edge::serve_on(
        listener,
        EdgeConfig {
            model_id: "tiny".into(),
            max_queue,
            ..EdgeConfig::default()
        },
        engine,
        tok,
        template,
        None,
        async move {
            let _ = rx.await;
        },
    ));
    (format!("http://{addr}"), tx, dir)
}

fn jobs(n: usize, max_tokens: usize) -> Vec<Job> {
    (0..n)
        .map(|i| Job {
            model: "tiny".into(),
            messages: vec![
                ("system".into(), "You answer briefly about the sea.".into()),
                (
                    "user".into(),
                    format!("Question {i}: where do the waves go?"),
                ),
            ],
            max_tokens,
            ..Job::default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_edge_under_poisson_load() {
    let (base, stop, _dir) = tiny_edge().await;
    let client = reqwest::Client::new();
    let target = Target {
        base_url: base,
        api_key: Some("t".into()),
    };
    let n = 12;
    let arr = poisson_arrivals(20.0, n, 1);
    let (out, s) = run_point(
        &client,
        &target,
        &jobs(n, 8),
        &arr,
        Duration::from_secs(60),
        Duration::from_secs(60),
        Slo::default(),
    )
    .await;
    assert_eq!(out.len(), n);
    assert!(out.iter().all(|o| o.ok), "{out:?}");
    // ignore_eos: every request generated exactly its max_tokens (the server's usage says so).
    assert!(out.iter().all(|o| o.output_tokens == 8), "{out:?}");
    assert_eq!((s.requests, s.completed, s.failed), (n, n, 0));
    assert!(s.failure.is_none());
    for o in &out {
        let (ttft, tpot) = (o.ttft_s.unwrap(), o.tpot_s.unwrap());
        assert!(ttft > 0.0 && ttft <= o.e2e_s, "{o:?}");
        // The last token came no later than the end of the request.
        assert!(ttft + tpot * 7.0 <= o.e2e_s + 1e-9, "{o:?}");
    }
    // Sent at their arrival times (never early).
    for (o, a) in out.iter().zip(&arr) {
        assert!(o.sent_s + 1e-3 >= *a, "sent at {} before {}", o.sent_s, a);
    }
    assert!(s.duration_s >= arr[n - 1] - arr[0]);
    assert!((s.throughput_tok_s - 8.0 * s.throughput_req_s).abs() < 1e-9);
    let norm = out.iter().map(|o| o.e2e_s / 8.0).sum::<f64>() / n as f64;
    assert!((s.normalized_latency_s_per_token.unwrap() - norm).abs() < 1e-12);
    assert!(s.ttft_p50_ms.unwrap() <= s.ttft_p90_ms.unwrap());
    assert!(s.ttft_p90_ms.unwrap() <= s.ttft_p99_ms.unwrap());
    assert!(s.loadgen_cpu_pct.is_some());
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_where_nothing_completes_are_reported() {
    let client = reqwest::Client::new();
    // Nobody listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let closed = Target {
        base_url: format!("http://127.0.0.1:{port}"),
        api_key: None,
    };
    let (out, s) = run_point(
        &client,
        &closed,
        &jobs(5, 4),
        &poisson_arrivals(50.0, 5, 2),
        Duration::from_secs(5),
        Duration::from_secs(5),
        Slo::default(),
    )
    .await;
    assert_eq!(out.len(), 5);
    assert_eq!((s.completed, s.failed), (0, 5));
    assert!(
        s.failure.as_deref().unwrap().starts_with("connect"),
        "{s:?}"
    );
    assert!(s.ttft_p90_ms.is_none() && s.tpot_p90_ms.is_none());
    assert!(!s.slo_met);
    assert_eq!(s.throughput_tok_s, 0.0);
    // A server that takes connections and never answers: given up at the end of the drain time.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let t0 = Instant::now();
    let (out, s) = run_point(
        &client,
        &Target {
            base_url: format!("http://{addr}"),
            api_key: None,
        },
        &jobs(3, 4),
        &[0.0, 0.05, 0.1],
        Duration::from_secs(30),
        Duration::from_millis(500),
        Slo::default(),
    )
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the drain time was not kept"
    );
    assert_eq!(s.completed, 0);
    assert!(out
        .iter()
        .all(|o| o.error.as_deref() == Some("unfinished at the end of the drain time")));
    // A server that refuses: its status is the failure.
    let (base, stop, _dir) = tiny_edge().await;
    let bad = Job {
        model: "no-such-model".into(),
        ..jobs(1, 4).remove(0)
    };
    let (bad_out, s) = run_point(
        &client,
        &Target {
            base_url: base,
            api_key: None,
        },
        &[bad],
        &[0.0],
        Duration::from_secs(30),
        Duration::from_secs(30),
        Slo::default(),
    )
    .await;
    assert_eq!(s.failure.as_deref(), Some("HTTP 404 (×1)"));
    assert_eq!((bad_out[0].status, bad_out[0].finished), (404, false));
    let _ = stop.send(());
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_its_queue_the_edge_answers_429_with_retry_after_and_completes_the_rest() {
    // 8 sequences and no queue: of 200 requests sent at once, those beyond the 8 in flight are
    // refused at once, and every accepted one runs to its end.
    let (base, stop, _dir) = tiny_edge_queue(0).await;
    let client = reqwest::Client::new();
    let target = Target {
        base_url: base.clone(),
        api_key: None,
    };
    let n = 200;
    let (out, _) = run_point(
        &client,
        &target,
        &jobs(n, 48),
        &vec![0.0; n],
        Duration::from_secs(120),
        Duration::from_secs(120),
        Slo::default(),
    )
    .await;
    let accepted: Vec<_> = out.iter().filter(|o| o.status == 200).collect();
    let refused: Vec<_> = out.iter().filter(|o| o.status == 429).collect();
    assert_eq!(accepted.len() + refused.len(), n, "{out:?}");
    assert!(
        accepted.len() >= 8 && !refused.is_empty(),
        "{} accepted, {} refused",
        accepted.len(),
        refused.len()
    );
    assert!(
        accepted
            .iter()
            .all(|o| o.ok && o.finished && o.output_tokens == 48),
        "{accepted:?}"
    );
    assert!(
        refused
            .iter()
            .all(|o| o.retry_after.as_deref() == Some("1")),
        "{refused:?}"
    );
    // The edge counted exactly the refusals the clients saw, and serves on.
    let m = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rejected: f64 = m
        .lines()
        .find(|l| l.starts_with("edgeprompt:request_rejected_queue_full_total "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(rejected as usize, refused.len());
    let (again, _) = run_point(
        &client,
        &target,
        &jobs(1, 4),
        &[0.0],
        Duration::from_secs(30),
        Duration::from_secs(30),
        Slo::default(),
    )
    .await;
    assert!(again[0].ok && again[0].finished, "{again:?}");
    let _ = stop.send(());
}
