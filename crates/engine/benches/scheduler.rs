//! The scheduler at scale: the prefix cache full of cached (unreferenced, evictable) blocks, then a
//! queue of requests with distinct prompts whose admissions must evict them. Reports the scheduler's
//! own time per step (`StepStat::sched_secs`: the step minus its forward passes), median and p90, on
//! the tiny random model (2 layers, 64 wide: the forward pass is cheap, so the scheduling shows).
//!
//! Fill: `--blocks` cached blocks, from requests of `--fill-prompt` distinct tokens and one generated
//! token each; the KV budget holds exactly `--blocks` blocks (f16, `--block-tokens` positions), so the
//! pool ends about full of cached blocks. Measure: `--waiting` requests of `--prompt` distinct tokens
//! generating `--gen` tokens each, at most `--max-seqs` running, `--step-tokens` per step.
//!
//! `cargo bench -p ep-engine --bench scheduler [-- --blocks 100000 --waiting 1000]`

use std::hint::black_box;
use std::time::Instant;

use ep_engine::{Core, EngineConfig, Event, Events, Request, StepStat};
use ep_kv::KvDtype;
use ep_model::generate::GenerateParams;
use ep_model::tokenizer::Tokenizer;
use ep_model::Model;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

struct Args {
    blocks: usize,
    waiting: usize,
    fill_prompt: usize,
    prompt: usize,
    gen: usize,
    max_seqs: usize,
    step_tokens: usize,
    block_tokens: usize,
}

impl Args {
    fn parse() -> Self {
        let mut a = Self {
            blocks: 100_000,
            waiting: 1_000,
            fill_prompt: 256,
            prompt: 64,
            gen: 4,
            max_seqs: 64,
            step_tokens: 512,
            block_tokens: 8,
        };
        let mut it = std::env::args().skip(1);
        while let Some(k) = it.next() {
            let slot = match k.as_str() {
                "--blocks" => &mut a.blocks,
                "--waiting" => &mut a.waiting,
                "--fill-prompt" => &mut a.fill_prompt,
                "--prompt" => &mut a.prompt,
                "--gen" => &mut a.gen,
                "--max-seqs" => &mut a.max_seqs,
                "--step-tokens" => &mut a.step_tokens,
                "--block-tokens" => &mut a.block_tokens,
                // `cargo bench` passes `--bench`; other harness flags are ignored too.
                _ => continue,
            };
            *slot = it
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{k} takes a number"));
        }
        a
    }
}

/// Distinct prompts: a running counter in the first two tokens (base 256), then xorshift bytes.
struct Prompts {
    n: u64,
    x: u64,
}

impl Prompts {
    fn next(&mut self, len: usize) -> Vec<u32> {
        self.n += 1;
        let mut p = vec![(self.n % 256) as u32, ((self.n / 256) % 256) as u32];
        p.extend((2..len).map(|_| {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            (self.x >> 56) as u32
        }));
        p.truncate(len);
        p
    }
}

fn params(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ignore_eos: true,
        ..GenerateParams::default()
    }
}

/// Steps until no work is left; returns the step stats and how many requests finished.
fn drain(core: &mut Core<'_>, rx: &mut UnboundedReceiver<Event>) -> (Vec<StepStat>, usize) {
    let (mut stats, mut done) = (Vec::new(), 0);
    while core.has_work() {
        if let Some(st) = core.step() {
            stats.push(black_box(st));
        }
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Done(_) => done += 1,
                Event::Error(e) => panic!("request failed: {e}"),
                Event::Token { .. } | Event::Kv(_) => {}
            }
        }
    }
    (stats, done)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let a = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, ep_testutil::tiny_model_bytes(7, "llama")).unwrap();
    let model = Model::load(&path, |_, _| {}).unwrap();
    let tok = Tokenizer::from_gguf(model.gguf().unwrap()).unwrap();
    let sh = model.attn_shape();
    let layout = ep_kv::KvLayout {
        n_layer: sh.n_layer,
        n_head_kv: sh.n_head_kv,
        head_dim: sh.head_dim,
        block_tokens: a.block_tokens,
        dtype: KvDtype::F16,
    };
    let cfg = EngineConfig {
        kv_dtype: KvDtype::F16,
        block_tokens: a.block_tokens,
        kv_budget_bytes: a.blocks * layout.block_bytes(),
        max_seq_len: a.fill_prompt.max(a.prompt + a.gen) + 1,
        max_step_tokens: a.step_tokens,
        max_seqs: a.max_seqs,
        ..EngineConfig::default()
    };
    let identity = ep_kv::identity::ContentIdentity::of(&model, &tok).digest();
    let mut core = Core::new(&model, &tok, cfg, identity).unwrap();
    println!(
        "scheduler bench: {} blocks of {} B ({} MiB budget, {} positions per block), fill prompts of \
         {} tokens, then {} requests of {} prompt tokens + {} generated, max_seqs {}, {} tokens per step",
        core.pool().n_blocks(),
        layout.block_bytes(),
        core.pool().budget_bytes() >> 20,
        a.block_tokens,
        a.fill_prompt,
        a.waiting,
        a.prompt,
        a.gen,
        a.max_seqs,
        a.step_tokens,
    );
    let (tx, mut rx) = unbounded_channel();
    let mut prompts = Prompts {
        n: 0,
        x: 0x9e37_79b9_7f4a_7c15,
    };
    let mut id = 0;

    // Fill: distinct prompts whose full blocks stay cached when they finish.
    let fill_reqs = a.blocks / (a.fill_prompt / a.block_tokens).max(1);
    let t = Instant::now();
    for _ in 0..fill_reqs {
        id += 1;
        let req = Request::new(prompts.next(a.fill_prompt), params(1));
        core.add(id, req, Events::uncounted(tx.clone()), Instant::now())
            .unwrap();
    }
    let (fill_stats, fill_done) = drain(&mut core, &mut rx);
    let fill_secs = t.elapsed().as_secs_f64();
    assert_eq!(fill_done, fill_reqs);
    let fill_sched: f64 = fill_stats.iter().map(|s| s.sched_secs).sum();
    println!(
        "fill: {fill_reqs} requests, {} steps, {:.2} s ({:.2} s scheduling); cache holds {} blocks, {} free",
        fill_stats.len(),
        fill_secs,
        fill_sched,
        core.cache().len(),
        core.pool().n_free(),
    );

    // Measure: admissions must evict cached blocks.
    let evictions0 = core.cache().evictions();
    let t = Instant::now();
    for _ in 0..a.waiting {
        id += 1;
        let req = Request::new(prompts.next(a.prompt), params(a.gen));
        core.add(id, req, Events::uncounted(tx.clone()), Instant::now())
            .unwrap();
    }
    let (stats, done) = drain(&mut core, &mut rx);
    let total = t.elapsed().as_secs_f64();
    assert_eq!(done, a.waiting);
    let mut sched: Vec<f64> = stats.iter().map(|s| s.sched_secs).collect();
    sched.sort_by(f64::total_cmp);
    let sched_sum: f64 = sched.iter().sum();
    let step_sum: f64 = stats.iter().map(|s| s.secs).sum();
    println!(
        "measure: {} steps, {:.3} s total ({:.3} s in steps, {:.3} s scheduling), {} evictions",
        stats.len(),
        total,
        step_sum,
        sched_sum,
        core.cache().evictions() - evictions0,
    );
    println!(
        "sched per step: median {:.3} ms, p90 {:.3} ms, max {:.3} ms",
        quantile(&sched, 0.5) * 1e3,
        quantile(&sched, 0.9) * 1e3,
        sched.last().copied().unwrap_or(0.0) * 1e3,
    );
}
