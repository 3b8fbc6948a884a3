//! The engine end to end: batch invariance through the scheduler (every request gives exactly the tokens
//! it gives alone), preemption by recompute, the memory budget, prefix sharing with pins and tenant
//! salts, cancellation and layer gates. On the tiny random model always, on SmolLM2 when present.

use std::sync::Arc;
use std::time::Duration;

use ep_engine::{AttnMode, Engine, EngineConfig, Event, LayerGate, Output, Request};
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
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, testutil::tiny_model_bytes(7, "llama")).unwrap();
    let model = Model::load(&path, |_, _| {}).unwrap();
    let tok = Tokenizer::from_gguf(model.gguf().unwrap()).unwrap();
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
    assert_eq!(e.stats().kv_budget_bytes, budget);
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
    assert_eq!(e.pin_prefix(cloud.clone()).unwrap(), 4);
    flood(&e);
    assert!(e.stats().evictions > 0);
    assert_eq!(ask(&e), 64, "the pinned prefix was evicted");
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
fn gated_prefill_waits_for_its_layers_without_blocking_others() {
    let l = tiny();
    let gp = params(5, SamplingParams::greedy());
    let p1: Vec<u32> = (10..60).collect();
    let p2: Vec<u32> = (100..130).collect();
    let want1 = alone_session(&l, &p1, &gp);
    let want2 = alone_session(&l, &p2, &gp);
    let e = engine(&l, small_cfg(KvDtype::F16));
    let gate = LayerGate::new();
    let mut gated = e
        .submit(Request {
            gate: Some(gate.clone()),
            ..Request::new(p1, gp.clone())
        })
        .unwrap();
    // The ungated request completes while the gated one has no layer yet.
    let other = run_all(&e, vec![Request::new(p2, gp.clone())]);
    assert_eq!(other[0].tokens, want2);
    assert!(
        gated.try_next().is_none(),
        "the gated request produced output before its KV was present"
    );
    gate.set_ready(1);
    std::thread::sleep(Duration::from_millis(20));
    assert!(gated.try_next().is_none(), "held at layer 1 of 2");
    std::thread::sleep(Duration::from_millis(20));
    gate.set_ready(l.model.cfg.n_layer);
    let out = gated.collect_blocking().unwrap();
    assert_eq!(out.tokens, want1);
}

#[test]
fn bad_requests_are_errors() {
    let l = tiny();
    let e = engine(&l, small_cfg(KvDtype::F16));
    let gp = params(4, SamplingParams::greedy());
    assert!(e.submit(Request::new(vec![], gp.clone())).is_err());
    let v = l.model.cfg.n_vocab as u32;
    let err = e.submit(Request::new(vec![v], gp.clone())).err().unwrap();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let err = e
        .submit(Request::new(vec![1; 5000], gp.clone()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("context"), "{err}");
    let bad = GenerateParams {
        sampling: SamplingParams {
            top_p: 2.0,
            ..SamplingParams::default()
        },
        ..gp
    };
    assert!(e.submit(Request::new(vec![1], bad)).is_err());
    // A budget too small for one block is a configuration error.
    let cfg = EngineConfig {
        kv_budget_bytes: 10,
        ..small_cfg(KvDtype::F16)
    };
    assert!(Engine::start(l.model.clone(), l.tok.clone(), cfg, None).is_err());
}

#[test]
fn model_fingerprint_is_stable_and_distinguishes_models() {
    let a = tiny();
    let b = tiny();
    assert_eq!(a.model.fingerprint(), b.model.fingerprint());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.gguf");
    std::fs::write(&path, testutil::tiny_model_bytes(8, "llama")).unwrap();
    let other = Model::load(&path, |_, _| {}).unwrap();
    assert_ne!(a.model.fingerprint(), other.fingerprint());
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
