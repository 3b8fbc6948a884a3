//! The engine end to end: batch invariance through the scheduler (every request gives exactly the tokens
//! it gives alone), preemption by recompute, the memory budget, prefix sharing with pins and tenant
//! salts, pin handles and their cap, typed failures (cancelled, out of KV memory, invalid requests), KV
//! export and import (streamed layer by layer into the batched forward). On the tiny random model
//! always, on SmolLM2 when present.

use std::sync::Arc;
use std::time::Duration;

use ep_engine::{
    AttnMode, Engine, EngineConfig, EngineError, Event, Failure, ImportStatus, InvalidKind,
    InvalidRequest, LayerEvent, Output, Request,
};
use ep_kv::KvDtype;
use ep_model::generate::{GenerateParams, Session};
use ep_model::sampling::SamplingParams;
use ep_model::tokenizer::Tokenizer;
use ep_model::Model;
use ep_testutil as testutil;

struct Loaded {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    _dir: Option<tempfile::TempDir>,
}

fn tiny() -> Loaded {
    let (model, tok, dir) = ep_testutil::load_tiny(7);
    Loaded {
        model: Arc::new(model),
        tok: Arc::new(tok),
        _dir: Some(dir),
    }
}

fn smollm2() -> Loaded {
    let model = Model::load(testutil::require_test_model(), |_, _| {}).unwrap();
    let tok = Tokenizer::from_gguf(model.gguf().unwrap()).unwrap();
    Loaded {
        model: Arc::new(model),
        tok: Arc::new(tok),
        _dir: None,
    }
}

fn params(max_tokens: usize, sampling: SamplingParams) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling,
        ignore_eos: true,
        ..GenerateParams::default()
    }
}

/// Deterministic pseudo-random prompts: `n` prompts, some sharing a common head.
fn prompts(n: usize, vocab: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut s = seed;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let head: Vec<u32> = (0..40).map(|_| (next() % vocab as u64) as u32).collect();
    (0..n)
        .map(|i| {
            let len = 1 + (next() % 70) as usize;
            let mut p = if i % 3 == 0 {
                head[..(next() % 40) as usize].to_vec()
            } else {
                Vec::new()
            };
            p.extend((0..len).map(|_| (next() % vocab as u64) as u32));
            p
        })
        .collect()
}

fn alone_session(l: &Loaded, prompt: &[u32], p: &GenerateParams) -> Vec<u32> {
    let mut s = Session::new(&l.model, 4096);
    s.generate(&l.tok, prompt, p, &mut |_| {}).unwrap().tokens
}

fn engine(l: &Loaded, cfg: EngineConfig) -> Engine {
    Engine::start(l.model.clone(), l.tok.clone(), cfg, None).unwrap()
}

fn run_all(e: &Engine, reqs: Vec<Request>) -> Vec<Output> {
    let streams: Vec<_> = reqs.into_iter().map(|r| e.submit(r).unwrap()).collect();
    streams
        .into_iter()
        .map(|s| s.collect_blocking().unwrap())
        .collect()
}

fn small_cfg(dtype: KvDtype) -> EngineConfig {
    EngineConfig {
        kv_dtype: dtype,
        block_tokens: 16,
        kv_budget_bytes: 64 << 20,
        max_seq_len: 4096,
        max_step_tokens: 48,
        max_seqs: 64,
        prefill_first: false,
        attn_mode: AttnMode::Splice,
        ..EngineConfig::default()
    }
}

#[test]
fn concurrent_requests_equal_each_alone_tiny() {
    let l = tiny();
    let ps = prompts(16, l.model.cfg.n_vocab as u32, 0x9e37);
    let gp = params(12, SamplingParams::greedy());
    // f16 KV: the engine's paged attention must reproduce the contiguous reference bit for bit.
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone_session(&l, p, &gp)).collect();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let got = run_all(
        &e,
        ps.iter()
            .map(|p| Request::new(p.clone(), gp.clone()))
            .collect(),
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g.tokens, w, "request {i}: batched engine vs alone");
        assert_eq!(g.finished.as_ref().unwrap().generated, 12);
    }
    // Every KV dtype: 16 at once through the engine equal each alone through a fresh engine.
    for dtype in [KvDtype::F32, KvDtype::Bf16] {
        let e = engine(&l, small_cfg(dtype));
        let batched = run_all(
            &e,
            ps.iter()
                .map(|p| Request::new(p.clone(), gp.clone()))
                .collect(),
        );
        for (i, p) in ps.iter().enumerate() {
            let e1 = engine(&l, small_cfg(dtype));
            let one = run_all(&e1, vec![Request::new(p.clone(), gp.clone())]);
            assert_eq!(
                batched[i].tokens, one[0].tokens,
                "{dtype:?}: request {i} batched vs alone"
            );
        }
    }
}

#[test]
fn concurrent_requests_equal_each_alone_smollm2() {
    let l = smollm2();
    let texts = [
        "Name three primary colors.",
        "Write a haiku about the sea.",
        "What is 17 times 23?",
        "Explain photosynthesis in two sentences.",
        "List the planets of the solar system.",
        "Translate 'good morning' into French.",
        "Why is the sky blue?",
        "Give me a short recipe for pancakes.",
    ];
    let mut reqs = Vec::new();
    let mut want = Vec::new();
    for i in 0..16 {
        let text = texts[i % texts.len()];
        let prompt = l.tok.encode(text, true).unwrap();
        // Half greedy, half sampled with a per-request seed (the sampler's state is per request).
        let sampling = if i % 2 == 0 {
            SamplingParams::greedy()
        } else {
            SamplingParams {
                seed: i as u64,
                ..SamplingParams::default()
            }
        };
        let gp = params(8 + i % 5, sampling);
        want.push(alone_session(&l, &prompt, &gp));
        reqs.push(Request::new(prompt, gp));
    }
    let e = engine(
        &l,
        EngineConfig {
            max_step_tokens: 40,
            ..small_cfg(KvDtype::F16)
        },
    );
    let got = run_all(&e, reqs);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g.tokens, w, "request {i}");
    }
}

#[test]
fn preemption_recomputes_to_identical_output_inside_the_budget() {
    let l = tiny();
    let ps = prompts(10, l.model.cfg.n_vocab as u32, 0x51ed);
    let gp = params(60, SamplingParams::greedy());
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone_session(&l, p, &gp)).collect();
    let probe = engine(&l, small_cfg(KvDtype::F16));
    drop(probe);
    // Room for about 3 sequences of ~130 tokens: 10 at once must preempt.
    let block_bytes = 2 * 2 * 16 * 32 * 2; // layers × (K,V) × tokens × kv_width × f16
    let budget = 26 * block_bytes;
    let e = engine(
        &l,
        EngineConfig {
            kv_budget_bytes: budget,
            ..small_cfg(KvDtype::F16)
        },
    );
    let got = run_all(
        &e,
        ps.iter()
            .map(|p| Request::new(p.clone(), gp.clone()))
            .collect(),
    );
    let preempted: usize = got
        .iter()
        .map(|o| o.finished.as_ref().unwrap().preemptions)
        .sum();
    assert!(
        preempted > 0,
        "the budget was meant to force preemption; none happened"
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g.tokens, w, "request {i} after preemption");
    }
    let steps = e.take_step_stats();
    assert!(!steps.is_empty());
    let max_used = steps.iter().map(|s| s.kv_used_bytes).max().unwrap();
    assert!(max_used <= budget, "KV used {max_used} > budget {budget}");
    let stats = e.stats();
    assert_eq!(stats.kv_budget_bytes, budget);
    // The step profile sums the same steps, split by whether they carried prompt rows.
    let ran: Vec<_> = steps.iter().filter(|s| s.layer_calls > 0).collect();
    let (pre, dec) = (&stats.prefill_steps, &stats.decode_steps);
    assert_eq!(pre.steps + dec.steps, ran.len() as u64);
    assert_eq!(
        pre.steps,
        ran.iter().filter(|s| s.prefill_tokens > 0).count() as u64
    );
    assert_eq!(
        pre.prefill_tokens + dec.prefill_tokens,
        ran.iter().map(|s| s.prefill_tokens as u64).sum::<u64>()
    );
    assert_eq!(dec.prefill_tokens, 0);
    for t in [pre, dec] {
        assert!(t.weights_secs > 0.0, "{t:?}");
        assert!(
            t.weights_secs + t.attention_secs + t.sched_secs <= t.secs,
            "the phases are parts of the step: {t:?}"
        );
    }
    // Without the step log (servers), the same run keeps no per-step records but its totals.
    let quiet = engine(
        &l,
        EngineConfig {
            kv_budget_bytes: budget,
            step_log: false,
            ..small_cfg(KvDtype::F16)
        },
    );
    let again = run_all(
        &quiet,
        ps.iter()
            .map(|p| Request::new(p.clone(), gp.clone()))
            .collect(),
    );
    assert_eq!(
        again.iter().map(|o| &o.tokens).collect::<Vec<_>>(),
        got.iter().map(|o| &o.tokens).collect::<Vec<_>>()
    );
    assert!(quiet.take_step_stats().is_empty());
    let q = quiet.stats();
    assert!(
        q.prefill_steps.steps > 0 && q.decode_steps.steps > 0,
        "{q:?}"
    );
}

#[test]
fn shared_prefix_is_reused_and_salts_separate_tenants() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let prefix: Vec<u32> = (0..64).map(|i| (i * 7 + 3) % v).collect();
    let with = |tail: &[u32]| -> Vec<u32> { prefix.iter().chain(tail).copied().collect() };
    let gp = params(6, SamplingParams::greedy());
    let e = engine(&l, small_cfg(KvDtype::F16));
    let req = |p: Vec<u32>, salt: Option<&str>, public: usize| Request {
        salt: salt.map(|s| s.as_bytes().to_vec()),
        public_prefix: public,
        ..Request::new(p, gp.clone())
    };
    let first = run_all(&e, vec![req(with(&[1, 2, 3]), None, 0)]);
    assert_eq!(first[0].finished.as_ref().unwrap().cached_tokens, 0);
    // Same prefix, no salt: the 4 full prefix blocks are shared, and the output is unchanged.
    let second = run_all(&e, vec![req(with(&[1, 2, 3]), None, 0)]);
    assert_eq!(second[0].finished.as_ref().unwrap().cached_tokens, 64);
    assert_eq!(second[0].tokens, first[0].tokens);
    // Tenant A computes its (fully salted) prompt; tenant B with the same tokens must not match it.
    let a = run_all(&e, vec![req(with(&[9, 9]), Some("tenant-a"), 0)]);
    assert_eq!(a[0].finished.as_ref().unwrap().cached_tokens, 0);
    let b = run_all(&e, vec![req(with(&[9, 9]), Some("tenant-b"), 0)]);
    assert_eq!(
        b[0].finished.as_ref().unwrap().cached_tokens,
        0,
        "tenant B matched tenant A's salted blocks"
    );
    let a2 = run_all(&e, vec![req(with(&[9, 9]), Some("tenant-a"), 0)]);
    assert_eq!(a2[0].finished.as_ref().unwrap().cached_tokens, 64);
    // A public (cloud) prefix is shared across tenants; what follows stays per tenant.
    let long = with(&prefix); // 128 tokens: 64 public + 64 private
    let c = run_all(&e, vec![req(long.clone(), Some("tenant-c"), 64)]);
    assert_eq!(c[0].finished.as_ref().unwrap().cached_tokens, 64);
    let d = run_all(&e, vec![req(long.clone(), Some("tenant-d"), 64)]);
    assert_eq!(d[0].finished.as_ref().unwrap().cached_tokens, 64);
    let c2 = run_all(&e, vec![req(long, Some("tenant-c"), 64)]);
    assert_eq!(c2[0].finished.as_ref().unwrap().cached_tokens, 112);
    assert_eq!(c2[0].tokens, c[0].tokens);
    assert_eq!(d[0].tokens, c[0].tokens);
}

#[test]
fn pinned_prefix_survives_eviction() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let gp = params(4, SamplingParams::greedy());
    let block_bytes = 2 * 2 * 16 * 32 * 2;
    let cfg = EngineConfig {
        kv_budget_bytes: 20 * block_bytes,
        ..small_cfg(KvDtype::F16)
    };
    let cloud: Vec<u32> = (0..64).map(|i| (i * 5 + 1) % v).collect();
    let flood = |e: &Engine| {
        // Distinct prompts filling the pool many times over.
        for k in 0..12u32 {
            let p: Vec<u32> = (0..100).map(|i| (i * 11 + k * 31 + 2) % v).collect();
            run_all(e, vec![Request::new(p, gp.clone())]);
        }
    };
    let ask = |e: &Engine| {
        let mut p = cloud.clone();
        p.push(3);
        run_all(e, vec![Request::new(p, gp.clone())])[0]
            .finished
            .clone()
            .unwrap()
            .cached_tokens
    };
    // Unpinned: the flood evicts the cloud prompt.
    let e = engine(&l, cfg.clone());
    assert_eq!(ask(&e), 0);
    flood(&e);
    assert!(e.stats().evictions > 0);
    assert_eq!(ask(&e), 0, "expected the unpinned prefix to be evicted");
    // Pinned: it stays.
    let e = engine(&l, cfg);
    assert_eq!(ask(&e), 0);
    let pin = e.pin_prefix_blocking(cloud.clone()).unwrap();
    assert_eq!(pin.blocks(), 4);
    flood(&e);
    assert!(e.stats().evictions > 0);
    assert_eq!(ask(&e), 64, "the pinned prefix was evicted");
    // Dropping the handle unpins: the next flood evicts it.
    drop(pin);
    flood(&e);
    assert_eq!(
        ask(&e),
        0,
        "the prefix stayed pinned after its handle was dropped"
    );
}

#[test]
fn pins_have_a_cap_of_their_own() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let gp = params(1, SamplingParams::greedy());
    let block_bytes = 2 * 2 * 16 * 32 * 2;
    // 20 blocks; pins may hold a quarter of them (5).
    let e = engine(
        &l,
        EngineConfig {
            kv_budget_bytes: 20 * block_bytes,
            max_pinned_share: 0.25,
            ..small_cfg(KvDtype::F16)
        },
    );
    let a: Vec<u32> = (0..64).map(|i| (i * 5 + 1) % v).collect();
    let b: Vec<u32> = (0..48).map(|i| (i * 7 + 3) % v).collect();
    for p in [&a, &b] {
        let mut q = p.clone();
        q.push(1);
        run_all(&e, vec![Request::new(q, gp.clone())]);
    }
    let pa = e.pin_prefix_blocking(a.clone()).unwrap();
    assert_eq!(pa.blocks(), 4);
    // 4 + 3 > 5: refused, and nothing of b is pinned.
    let err = e.pin_prefix_blocking(b.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Import(ep_engine::ImportError::PinCap { .. })
        ),
        "{err}"
    );
    // Pinning a again adds no new pinned block.
    let pa2 = e.pin_prefix_blocking(a.clone()).unwrap();
    drop((pa, pa2));
    let pb = e.pin_prefix_blocking(b).unwrap();
    assert_eq!(pb.blocks(), 3);
}

/// A request that cannot fit beside pinned KV while nothing runs fails with a typed error instead of
/// blocking every request behind it.
#[test]
fn a_request_that_cannot_fit_beside_pins_fails_and_others_go_on() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let gp = params(1, SamplingParams::greedy());
    let block_bytes = 2 * 2 * 16 * 32 * 2;
    let e = engine(
        &l,
        EngineConfig {
            kv_budget_bytes: 8 * block_bytes,
            ..small_cfg(KvDtype::F16)
        },
    );
    let a: Vec<u32> = (0..60).map(|i| (i * 5 + 1) % v).collect();
    run_all(&e, vec![Request::new(a.clone(), gp.clone())]);
    let pin = e.pin_prefix_blocking(a[..48].to_vec()).unwrap();
    assert_eq!(pin.blocks(), 3);
    // 91 positions need 6 blocks; 5 are outside the pin.
    let big: Vec<u32> = (0..90).map(|i| (i * 7 + 3) % v).collect();
    let s_big = e.submit(Request::new(big, gp.clone())).unwrap();
    let s_small = e.submit(Request::new(vec![1, 2, 3], gp.clone())).unwrap();
    match s_big.collect_blocking() {
        Err(EngineError::Failed(Failure::OutOfKvMemory { .. })) => {}
        other => panic!("expected out of KV memory, got {other:?}"),
    }
    assert_eq!(s_small.collect_blocking().unwrap().tokens.len(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn pins_work_from_async_code() {
    let l = tiny();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let p: Vec<u32> = (0..33).collect();
    let mut st = e
        .submit(Request::new(p.clone(), params(1, SamplingParams::greedy())))
        .unwrap();
    while let Some(ev) = st.next().await {
        if matches!(ev, Event::Done(_)) {
            break;
        }
    }
    let pin = e.pin_prefix(p[..32].to_vec()).await.unwrap();
    assert_eq!(pin.blocks(), 2);
}

#[test]
fn cancellation_frees_the_sequence_at_once() {
    let l = tiny();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let prompt: Vec<u32> = (0..40).collect();
    let mut s = e
        .submit(Request::new(
            prompt,
            params(100_000, SamplingParams::greedy()),
        ))
        .unwrap();
    // Wait for a few tokens, then drop the stream.
    for _ in 0..3 {
        assert!(matches!(s.blocking_next(), Some(Event::Token { .. })));
    }
    drop(s);
    // After the next step boundary only prefix-cache blocks remain referenced.
    let block_bytes = 2 * 2 * 16 * 32 * 2;
    let mut ok = false;
    for _ in 0..500 {
        // A new tiny request forces steps to run.
        run_all(
            &e,
            vec![Request::new(
                vec![1, 2],
                params(1, SamplingParams::greedy()),
            )],
        );
        let st = e.stats();
        if st.kv_used_bytes == st.cached_blocks * block_bytes {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(ok, "cancelled sequence still holds blocks: {:?}", e.stats());
}

#[test]
fn cancel_is_a_typed_failure() {
    let l = tiny();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let mut s = e
        .submit(Request::new(
            (0..20).collect(),
            params(100_000, SamplingParams::greedy()),
        ))
        .unwrap();
    assert!(matches!(s.blocking_next(), Some(Event::Token { .. })));
    e.cancel(s.id());
    loop {
        match s.blocking_next() {
            Some(Event::Token { .. }) => continue,
            Some(Event::Error(f)) => {
                assert_eq!(f, Failure::Cancelled);
                break;
            }
            other => panic!("expected a cancellation, got {other:?}"),
        }
    }
}

#[test]
fn out_of_kv_memory_is_a_typed_failure_not_length() {
    let l = tiny();
    let block_bytes = 2 * 2 * 16 * 32 * 2;
    let e = engine(
        &l,
        EngineConfig {
            kv_budget_bytes: 4 * block_bytes,
            ..small_cfg(KvDtype::F16)
        },
    );
    let err = e
        .submit(Request::new(
            (0..10).collect(),
            params(1000, SamplingParams::greedy()),
        ))
        .unwrap()
        .collect_blocking()
        .unwrap_err();
    match err {
        EngineError::Failed(Failure::OutOfKvMemory { tokens, capacity }) => {
            assert_eq!(capacity, 64);
            assert_eq!(tokens, 65, "stopped when position 64 needed a fifth block");
        }
        other => panic!("expected out of KV memory, got {other}"),
    }
}

/// Prompts sharing `prefix`, each with its own question.
fn extend_prefix(prefix: &[u32], n: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let mut p = prefix.to_vec();
            p.extend((0..3 + i % 7).map(|j| ((i * 37 + j * 11 + 1) as u32) % vocab));
            p
        })
        .collect()
}

#[test]
fn imported_kv_gives_the_computed_tokens() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let gp = params(8, SamplingParams::greedy());
    // 6 full blocks and a partial one.
    let prefix: Vec<u32> = (0..100).map(|i| (i * 7 + 2) % v).collect();
    let kv = engine(&l, small_cfg(KvDtype::F16))
        .export_blocking(prefix.clone())
        .unwrap();
    assert_eq!(kv.layers.len(), l.model.cfg.n_layer);
    assert_eq!(kv.block_hashes.len(), 6);
    let row = kv.layout.kv_width() * 2;
    assert!(kv
        .layers
        .iter()
        .all(|(k, v)| k.len() == 100 * row && v.len() == 100 * row));
    let ps = extend_prefix(&prefix, 4, v);
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone_session(&l, p, &gp)).collect();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let imp = e.import_blocking(prefix.clone()).unwrap();
    for (layer, (k, vv)) in kv.layers.iter().enumerate() {
        imp.write_rows(layer, 0, 100, k.clone(), vv.clone())
            .unwrap();
    }
    let got = run_all(
        &e,
        ps.iter()
            .map(|p| Request {
                public_prefix: prefix.len(),
                ..Request::new(p.clone(), gp.clone())
            })
            .collect(),
    );
    assert_eq!(imp.status(), ImportStatus::Complete);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g.tokens, w, "request {i}");
        let f = g.finished.as_ref().unwrap();
        assert_eq!(
            f.imported_tokens, 100,
            "request {i}: the partial block is imported too"
        );
        assert_eq!(f.cached_tokens, 100);
    }
    // The import really is used: other V bytes change the tokens.
    let e = engine(&l, small_cfg(KvDtype::F16));
    let imp = e.import_blocking(prefix.clone()).unwrap();
    for (layer, (k, vv)) in kv.layers.iter().enumerate() {
        let bent: Vec<u8> = vv.iter().map(|b| b ^ 0x40).collect();
        imp.write_rows(layer, 0, 100, k.clone(), bent).unwrap();
    }
    let got = run_all(
        &e,
        ps.iter()
            .map(|p| Request {
                public_prefix: prefix.len(),
                ..Request::new(p.clone(), gp.clone())
            })
            .collect(),
    );
    assert!(
        got.iter().zip(&want).any(|(g, w)| &g.tokens != w),
        "altered imported V bytes did not change any output"
    );
}

#[test]
fn an_import_over_a_cached_prefix_takes_the_whole_stream() {
    // Two cloud prompts, the second extending the first (a variant of it): the edge holds the
    // first's blocks when the second's stream arrives with every token's rows.
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let gp = params(8, SamplingParams::greedy());
    let a: Vec<u32> = (0..100).map(|i| (i * 7 + 2) % v).collect();
    let mut b = a[..96].to_vec();
    b.extend((0..54).map(|i| (i * 5 + 3) % v));
    let cloud = engine(&l, small_cfg(KvDtype::F16));
    let (ka, kb) = (
        cloud.export_blocking(a.clone()).unwrap(),
        cloud.export_blocking(b.clone()).unwrap(),
    );
    let e = engine(&l, small_cfg(KvDtype::F16));
    let write_all = |tokens: &[u32], kv: &ep_engine::PromptKv| {
        let imp = e.import_blocking(tokens.to_vec()).unwrap();
        // In frames of 32 tokens, as a stream carries them.
        for (layer, (k, vv)) in kv.layers.iter().enumerate() {
            let row = k.len() / tokens.len();
            for s in (0..tokens.len()).step_by(32) {
                let t = (s + 32).min(tokens.len());
                imp.write_rows(
                    layer,
                    s,
                    t,
                    k[s * row..t * row].to_vec(),
                    vv[s * row..t * row].to_vec(),
                )
                .unwrap();
            }
        }
        for _ in 0..2000 {
            if imp.status() != ImportStatus::Filling || imp.error().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(imp.error().is_none(), "{:?}", imp.error());
        assert_eq!(imp.status(), ImportStatus::Complete);
        imp
    };
    let _ia = write_all(&a, &ka);
    let _ib = write_all(&b, &kb);
    let ps = extend_prefix(&b, 3, v);
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone_session(&l, p, &gp)).collect();
    let got = run_all(
        &e,
        ps.iter()
            .map(|p| Request {
                public_prefix: b.len(),
                ..Request::new(p.clone(), gp.clone())
            })
            .collect(),
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g.tokens, w, "request {i}");
        assert_eq!(
            g.finished.as_ref().unwrap().cached_tokens,
            150,
            "request {i}"
        );
    }
}

#[test]
fn lossy_imports_never_satisfy_exact_lookups() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let gp = params(4, SamplingParams::greedy());
    let prefix: Vec<u32> = (0..64).map(|i| (i * 7 + 2) % v).collect();
    let kv = engine(&l, small_cfg(KvDtype::F16))
        .export_blocking(prefix.clone())
        .unwrap();
    let e = engine(&l, small_cfg(KvDtype::F16));
    // Imported as if it went through codec 2: kept under that codec's root.
    let imp = e.import_codec_blocking(prefix.clone(), 2).unwrap();
    for (layer, (k, vv)) in kv.layers.iter().enumerate() {
        imp.write_rows(layer, 0, 64, k.clone(), vv.clone()).unwrap();
    }
    let mut p = prefix.clone();
    p.extend([5, 6, 7]);
    let exact = run_all(&e, vec![Request::new(p.clone(), gp.clone())]);
    assert_eq!(exact[0].finished.as_ref().unwrap().imported_tokens, 0);
    assert_eq!(exact[0].finished.as_ref().unwrap().cached_tokens, 0);
    let lossy = run_all(
        &e,
        vec![Request {
            kv_codec: 2,
            ..Request::new(p.clone(), gp.clone())
        }],
    );
    assert_eq!(lossy[0].finished.as_ref().unwrap().imported_tokens, 64);
    // And the exact blocks the first request computed are not reused under the lossy root either.
    let again = run_all(
        &e,
        vec![Request {
            kv_codec: 1,
            ..Request::new(p, gp)
        }],
    );
    assert_eq!(again[0].finished.as_ref().unwrap().cached_tokens, 0);
}

#[test]
fn bad_import_rows_are_refused() {
    let l = tiny();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let prefix: Vec<u32> = (0..40).collect();
    let imp = e.import_blocking(prefix).unwrap();
    let row = e.layout().kv_width() * 2;
    // Wrong sizes, layers and ranges are refused before they reach the engine.
    assert!(imp
        .write_rows(0, 0, 40, vec![0; 39 * row], vec![0; 39 * row])
        .is_err());
    assert!(imp
        .write_rows(9, 0, 40, vec![0; 40 * row], vec![0; 40 * row])
        .is_err());
    assert!(imp
        .write_rows(0, 30, 50, vec![0; 20 * row], vec![0; 20 * row])
        .is_err());
    // Rows written twice: the engine refuses them and abandons the import.
    imp.write_rows(0, 0, 20, vec![0; 20 * row], vec![0; 20 * row])
        .unwrap();
    imp.write_rows(0, 10, 30, vec![0; 20 * row], vec![0; 20 * row])
        .unwrap();
    for _ in 0..500 {
        if imp.error().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(imp.error().is_some());
    assert_eq!(imp.status(), ImportStatus::Aborted);
    assert!(e.import_blocking(vec![]).is_err());
}

#[test]
fn streamed_import_runs_layers_in_the_batch_as_they_arrive_tiny() {
    streamed_import(&tiny(), 40);
}

#[test]
fn streamed_import_runs_layers_in_the_batch_as_they_arrive_smollm2() {
    streamed_import(&smollm2(), 15);
}

/// 16 requests over a prefix whose layers arrive one by one with delays (two frames each): they run in
/// one batched call per layer, layer l before layer l + 1 has arrived, their first token at most 2
/// steps after the last layer, the tokens they get with the KV computed; another request decodes
/// meanwhile.
fn streamed_import(l: &Loaded, delay_ms: u64) {
    let n_layer = l.model.cfg.n_layer;
    let v = l.model.cfg.n_vocab as u32;
    let gp = params(6, SamplingParams::greedy());
    let prefix: Vec<u32> = (0..100).map(|i| (i * 5 + 9) % v).collect();
    let kv = engine(l, small_cfg(KvDtype::F16))
        .export_blocking(prefix.clone())
        .unwrap();
    let ps = extend_prefix(&prefix, 16, v);
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone_session(l, p, &gp)).collect();
    let other_prompt: Vec<u32> = (0..30).map(|i| (i * 3 + 1) % v).collect();
    let e = engine(
        l,
        EngineConfig {
            layer_log: true,
            max_step_tokens: 512,
            // The other request is read only at the end: it must not pause for its reader.
            max_unread_events: 0,
            ..small_cfg(KvDtype::F16)
        },
    );
    let mut other = e
        .submit(Request::new(
            other_prompt,
            params(3000, SamplingParams::greedy()),
        ))
        .unwrap();
    let imp = e.import_blocking(prefix.clone()).unwrap();
    let streams: Vec<_> = ps
        .iter()
        .map(|p| {
            e.submit(Request {
                public_prefix: prefix.len(),
                ..Request::new(p.clone(), gp.clone())
            })
            .unwrap()
        })
        .collect();
    let ids: Vec<u64> = streams.iter().map(|s| s.id()).collect();
    let row = kv.layout.kv_width() * 2;
    // Layer l + 1 is sent only once the engine ran layer l for the 16 (within 20 s): it must run a
    // layer with the later ones absent.
    let mut log: Vec<LayerEvent> = Vec::new();
    let ran_for_all = |log: &[LayerEvent], layer: usize| {
        log.iter().any(|ev| {
            matches!(ev, LayerEvent::Ran { layer: x, requests, .. }
                if *x == layer && ids.iter().all(|id| requests.contains(id)))
        })
    };
    for (layer, (k, vv)) in kv.layers.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(delay_ms));
        // Two frames per layer, by token range.
        imp.write_rows(
            layer,
            0,
            64,
            k[..64 * row].to_vec(),
            vv[..64 * row].to_vec(),
        )
        .unwrap();
        imp.write_rows(
            layer,
            64,
            100,
            k[64 * row..].to_vec(),
            vv[64 * row..].to_vec(),
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        while !ran_for_all(&log, layer) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "layer {layer} did not run for the 16 while later layers were missing"
            );
            std::thread::sleep(Duration::from_millis(1));
            log.extend(e.take_layer_log_blocking());
        }
    }
    let got: Vec<Output> = streams
        .into_iter()
        .map(|s| s.collect_blocking().unwrap())
        .collect();
    e.cancel(other.id());
    while other.blocking_next().is_some() {}
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            &g.tokens, w,
            "request {i}: streamed import vs computed alone"
        );
    }
    log.extend(e.take_layer_log_blocking());
    let arrived = |layer: usize| {
        log.iter()
            .position(|ev| matches!(ev, LayerEvent::Arrived { layer: x, .. } if *x == layer))
            .unwrap_or_else(|| panic!("layer {layer} never arrived"))
    };
    let mut steps_of_layer = vec![Vec::new(); n_layer];
    for (at, ev) in log.iter().enumerate() {
        if let LayerEvent::Ran {
            step,
            layer,
            requests,
        } = ev
        {
            let n = ids.iter().filter(|id| requests.contains(id)).count();
            // The 16 run together: one batched call per layer per step, never split.
            assert!(
                n == 0 || n == ids.len(),
                "layer {layer} of step {step} ran {n} of 16"
            );
            if n > 0 {
                steps_of_layer[*layer].push((at, *step));
            }
        }
    }
    for (l, ran) in steps_of_layer.iter().enumerate() {
        // The first time is the prefill over the imported prefix (later ones are decode steps).
        let (at, _) = ran[0];
        assert!(at > arrived(l), "layer {l} ran before it arrived");
        if l + 1 < n_layer {
            assert!(at < arrived(l + 1), "layer {l} waited for layer {}", l + 1);
        }
    }
    // The first token comes at most 2 steps after the last layer arrived.
    let last_arrival_step = match &log[arrived(n_layer - 1)] {
        LayerEvent::Arrived { step, .. } => *step,
        _ => unreachable!(),
    };
    let (_, last_ran) = steps_of_layer[n_layer - 1][0];
    assert!(
        last_ran <= last_arrival_step + 2,
        "{last_ran} vs {last_arrival_step}"
    );
    // Each step calls each layer at most once.
    let mut per_step: std::collections::HashMap<(u64, usize), usize> = Default::default();
    for ev in &log {
        if let LayerEvent::Ran { step, layer, .. } = ev {
            *per_step.entry((*step, *layer)).or_default() += 1;
        }
    }
    assert!(per_step.values().all(|&c| c == 1));
    // The other request kept decoding while the layers arrived.
    let other_id = other.id();
    let first = match &log[arrived(0)] {
        LayerEvent::Arrived { step, .. } => *step,
        _ => unreachable!(),
    };
    let ran_other = log
        .iter()
        .filter(|ev| matches!(ev, LayerEvent::Ran { step, requests, layer: 0 } if *step > first && *step <= last_arrival_step && requests.contains(&other_id)))
        .count();
    assert!(
        ran_other >= 2,
        "the other request was held back ({ran_other} steps)"
    );
    for g in &got {
        assert_eq!(g.finished.as_ref().unwrap().imported_tokens, 100);
    }
}

#[test]
fn abandoned_import_makes_its_requests_recompute() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let gp = params(5, SamplingParams::greedy());
    let prefix: Vec<u32> = (0..70).map(|i| (i * 3 + 4) % v).collect();
    let kv = engine(&l, small_cfg(KvDtype::F16))
        .export_blocking(prefix.clone())
        .unwrap();
    let ps = extend_prefix(&prefix, 3, v);
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone_session(&l, p, &gp)).collect();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let imp = e.import_blocking(prefix.clone()).unwrap();
    imp.write_rows(0, 0, 70, kv.layers[0].0.clone(), kv.layers[0].1.clone())
        .unwrap();
    let streams: Vec<_> = ps
        .iter()
        .map(|p| {
            e.submit(Request {
                public_prefix: prefix.len(),
                ..Request::new(p.clone(), gp.clone())
            })
            .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    drop(imp);
    for (i, (s, w)) in streams.into_iter().zip(&want).enumerate() {
        let out = s.collect_blocking().unwrap();
        assert_eq!(&out.tokens, w, "request {i}");
        assert_eq!(out.finished.unwrap().imported_tokens, 0);
    }
}

#[test]
fn bad_requests_are_errors() {
    let l = tiny();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let gp = params(4, SamplingParams::greedy());
    let kind = |r: Request| match e.submit(r).err().unwrap() {
        EngineError::Invalid(InvalidRequest { kind, message }) => {
            assert!(!message.is_empty());
            kind
        }
        other => panic!("expected an invalid request, got {other}"),
    };
    assert_eq!(
        kind(Request::new(vec![], gp.clone())),
        InvalidKind::EmptyPrompt
    );
    let v = l.model.cfg.n_vocab as u32;
    assert_eq!(
        kind(Request::new(vec![v], gp.clone())),
        InvalidKind::TokenOutOfVocabulary
    );
    assert_eq!(
        kind(Request::new(vec![1; 5000], gp.clone())),
        InvalidKind::PromptTooLong
    );
    assert_eq!(
        kind(Request::new(vec![1], params(0, SamplingParams::greedy()))),
        InvalidKind::MaxTokens
    );
    assert_eq!(
        kind(Request {
            public_prefix: 3,
            ..Request::new(vec![1], gp.clone())
        }),
        InvalidKind::PublicPrefix
    );
    let bad = GenerateParams {
        sampling: SamplingParams {
            top_p: 2.0,
            ..SamplingParams::default()
        },
        ..gp
    };
    assert_eq!(kind(Request::new(vec![1], bad)), InvalidKind::Sampling);
    // A budget too small for one block is a configuration error.
    let cfg = EngineConfig {
        kv_budget_bytes: 10,
        ..small_cfg(KvDtype::F16)
    };
    assert!(Engine::start(l.model.clone(), l.tok.clone(), cfg, None).is_err());
}

#[test]
fn cache_roots_come_from_the_content_identity() {
    let a = tiny();
    let b = tiny();
    let cfg = small_cfg(KvDtype::F16);
    let (ea, eb) = (engine(&a, cfg.clone()), engine(&b, cfg.clone()));
    assert_eq!(ea.identity(), eb.identity());
    assert_eq!(ea.cache_root(), eb.cache_root());
    assert_eq!(
        ea.cache_root(),
        ea.identity()
            .cache_root(KvDtype::F16, 16, ep_kv::identity::CODEC_RAW)
    );
    // Another dtype or block size never shares a root.
    let bf = engine(&a, small_cfg(KvDtype::Bf16));
    let b32 = engine(
        &a,
        EngineConfig {
            block_tokens: 32,
            ..cfg.clone()
        },
    );
    assert_ne!(bf.cache_root(), ea.cache_root());
    assert_ne!(b32.cache_root(), ea.cache_root());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.gguf");
    std::fs::write(&path, testutil::tiny_model_bytes(8, "llama")).unwrap();
    let other = Model::load(&path, |_, _| {}).unwrap();
    let tok = Tokenizer::from_gguf(other.gguf().unwrap()).unwrap();
    let eo = Engine::start(Arc::new(other), Arc::new(tok), cfg, None).unwrap();
    assert_ne!(eo.identity(), ea.identity());
    assert_ne!(eo.cache_root(), ea.cache_root());
}

/// Requests over three cloud prompts (public prefixes of different lengths) with their own questions:
/// prompt `i` uses cloud prompt `i % 3`.
fn cloud_requests(clouds: &[Vec<u32>], n: usize, vocab: u32, gp: &GenerateParams) -> Vec<Request> {
    (0..n)
        .map(|i| {
            let c = &clouds[i % clouds.len()];
            let mut p = c.clone();
            p.extend((0..5 + (i * 7) % 23).map(|j| ((i * 131 + j * 17 + 5) as u32) % vocab));
            Request {
                public_prefix: c.len(),
                salt: Some(format!("tenant-{}", i % 4).into_bytes()),
                ..Request::new(p, gp.clone())
            }
        })
        .collect()
}

/// The three attention modes give the same tokens as each request alone, bit for bit (splice and relay
/// only regroup the per-key operations of paged attention), and splice/relay really attend shared
/// nodes jointly.
fn modes_agree(l: &Loaded, clouds: &[Vec<u32>], gen: usize) {
    let vocab = l.model.cfg.n_vocab as u32;
    let gp = params(gen, SamplingParams::greedy());
    let reqs = cloud_requests(clouds, 16, vocab, &gp);
    let want: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| alone_session(l, &r.prompt, &gp))
        .collect();
    for mode in [AttnMode::Paged, AttnMode::Relay, AttnMode::Splice] {
        let e = engine(
            l,
            EngineConfig {
                attn_mode: mode,
                prefill_first: true,
                max_step_tokens: 256,
                ..small_cfg(KvDtype::F16)
            },
        );
        let got = run_all(&e, reqs.clone());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(&g.tokens, w, "{mode:?}: request {i}");
        }
        let steps = e.take_step_stats();
        let joint = steps.iter().map(|s| s.shared_nodes).max().unwrap_or(0);
        match mode {
            AttnMode::Paged => assert_eq!(joint, 0),
            // One system prefix at most.
            AttnMode::Relay => assert_eq!(joint, 1, "relay attends one shared prefix"),
            // The three cloud prompts at least.
            AttnMode::Splice => assert!(joint >= 3, "splice attended {joint} nodes jointly"),
        }
    }
}

#[test]
fn attention_modes_agree_over_three_cloud_prompts_tiny() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let clouds: Vec<Vec<u32>> = [96usize, 160, 128]
        .iter()
        .enumerate()
        .map(|(c, &n)| {
            (0..n)
                .map(|i| ((i * 13 + c * 101 + 7) as u32) % v)
                .collect()
        })
        .collect();
    modes_agree(&l, &clouds, 10);
}

#[test]
fn attention_modes_agree_over_three_cloud_prompts_smollm2() {
    let l = smollm2();
    let texts = [
        "You are a support assistant for a telecom operator. Answer briefly and politely. ",
        "You are a travel planner. Suggest one destination and one activity for each request. ",
        "You are a careful math tutor. Show the key step, then the answer. ",
    ];
    let clouds: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            let unit = l.tok.encode(t, false).unwrap();
            unit.iter().copied().cycle().take(200).collect()
        })
        .collect();
    modes_agree(&l, &clouds, 8);
}

#[test]
fn purging_a_salt_drops_that_tenants_private_kv_only() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let public: Vec<u32> = (0..32).map(|i| (i * 7 + 3) % v).collect();
    let private: Vec<u32> = (0..48).map(|i| (i * 5 + 1) % v).collect();
    let prompt: Vec<u32> = public.iter().chain(&private).copied().collect();
    let gp = params(4, SamplingParams::greedy());
    let e = engine(&l, small_cfg(KvDtype::F16));
    let req = |salt: &str| Request {
        salt: Some(salt.as_bytes().to_vec()),
        public_prefix: 32,
        ..Request::new(prompt.clone(), gp.clone())
    };
    let cached = |o: &[Output]| o[0].finished.as_ref().unwrap().cached_tokens;
    let a = run_all(&e, vec![req("a")]);
    assert_eq!(cached(&a), 0);
    run_all(&e, vec![req("b")]);
    assert_eq!(cached(&run_all(&e, vec![req("a")])), 64);
    // A's private blocks go (three full ones past the public prefix, plus generated ones); the
    // public prefix and B's blocks stay.
    let freed = e.purge_salt_blocking(b"a".to_vec()).unwrap();
    assert!(freed >= 3, "freed {freed}");
    assert_eq!(e.purge_salt_blocking(b"a".to_vec()).unwrap(), 0);
    assert_eq!(e.purge_salt_blocking(b"nobody".to_vec()).unwrap(), 0);
    let a2 = run_all(&e, vec![req("a")]);
    assert_eq!(
        cached(&a2),
        32,
        "only the public prefix is still cached for A"
    );
    assert_eq!(a2[0].tokens, a[0].tokens);
    assert_eq!(cached(&run_all(&e, vec![req("b")])), 64, "B's KV stays");
}

#[test]
fn logprobs_are_the_log_softmax_of_the_logits() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let prompt: Vec<u32> = (0..20).map(|i| (i * 3 + 1) % v).collect();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let gp = GenerateParams {
        logprobs: Some(5),
        ..params(4, SamplingParams::greedy())
    };
    let mut st = e.submit(Request::new(prompt.clone(), gp)).unwrap();
    let mut n = 0;
    while let Some(ev) = st.blocking_next() {
        match ev {
            Event::Token {
                token, logprobs, ..
            } => {
                let lp = logprobs.expect("logprobs asked for");
                assert_eq!(lp.top.len(), 5);
                // Greedy: the sampled token is the most likely one.
                assert_eq!(lp.top[0].0, token);
                assert_eq!(lp.top[0].1, lp.logprob);
                assert!(lp.logprob <= 0.0);
                assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
                n += 1;
            }
            Event::Done(_) => break,
            Event::Error(f) => panic!("{f}"),
            Event::Kv(_) => {}
        }
    }
    assert_eq!(n, 4);
    let lp = ep_engine::core::token_logprobs(&[0.0, 0.0, f32::NAN, 2f32.ln()], 3, 2);
    assert!((lp.logprob - 0.5f32.ln()).abs() < 1e-6);
    assert_eq!(lp.top[0].0, 3);
    assert_eq!(lp.top[1].0, 0, "ties go to the lower id");
    let too_many = GenerateParams {
        logprobs: Some(21),
        ..params(4, SamplingParams::greedy())
    };
    let r = e.submit(Request::new(prompt, too_many));
    assert!(matches!(
        r,
        Err(EngineError::Invalid(InvalidRequest {
            kind: InvalidKind::Sampling,
            ..
        }))
    ));
}

/// A reader that takes nothing pauses its request at `max_unread_events` (no compute, a bounded
/// backlog); reading resumes it, and the tokens are those of a run never paused. The other request
/// runs on meanwhile.
#[test]
fn a_request_whose_reader_stops_pauses_and_resumes_to_the_same_tokens() {
    let l = tiny();
    let v = l.model.cfg.n_vocab as u32;
    let ps = prompts(2, v, 0x51);
    let gp = params(60, SamplingParams::greedy());
    let want = alone_session(&l, &ps[0], &gp);
    let e = engine(
        &l,
        EngineConfig {
            max_unread_events: 8,
            ..small_cfg(KvDtype::F16)
        },
    );
    let mut idle = e.submit(Request::new(ps[0].clone(), gp.clone())).unwrap();
    // The other request, read as it goes, finishes while the first waits for its reader.
    let other = e
        .submit(Request::new(ps[1].clone(), gp.clone()))
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert_eq!(other.tokens.len(), 60);
    // Exactly 8 events were produced for the reader that took none, and no more come.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut first = Vec::new();
    while let Some(ev) = idle.try_next() {
        first.push(ev);
    }
    assert_eq!(
        first.len(),
        8,
        "events produced for a reader that read nothing"
    );
    // Reading resumes it to the end, with the tokens of an uninterrupted run.
    let mut tokens: Vec<u32> = first
        .iter()
        .filter_map(|ev| match ev {
            Event::Token { token, .. } => Some(*token),
            _ => None,
        })
        .collect();
    let rest = idle.collect_blocking().unwrap();
    tokens.extend(rest.tokens);
    assert_eq!(tokens, want);
}
