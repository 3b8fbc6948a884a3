//! One decode step's attention (one layer) under each mode: `n_seqs` sequences sharing a prefix of
//! `prefix` keys (in `groups` distinct prompts), each with a private tail, SmolLM2's shape (9 query
//! heads, 3 KV heads, head_dim 64), f16 KV. Medians of interleaved runs; checks the modes agree.
//!
//! `cargo bench -p ep-engine --bench attn_modes` (env: EP_PREFIX=1024,2048 EP_SEQS=32 EP_GROUPS=1
//! EP_ITERS=50 EP_THREADS=2).

use std::time::Instant;

use ep_engine::attn::PagedAttention;
use ep_engine::splice::{plan_step, AttnMode, SpliceArena, SpliceAttention};
use ep_kernels::paged::KvDtype;
use ep_kernels::simd::Path;
use ep_kv::{BlockId, BlockPool, KvLayout};
use ep_model::kv::{Attention, AttnShape, SeqSlice};

const BT: usize = 16;

fn env(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().parse().expect("a number"))
        .collect()
}

struct Setup {
    pool: BlockPool,
    tables: Vec<Vec<BlockId>>,
    slices: Vec<SeqSlice>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn setup(shape: AttnShape, prefix: usize, seqs: usize, groups: usize, tail: usize) -> Setup {
    let kw = shape.kv_width();
    let layout = KvLayout {
        n_layer: 1,
        n_head_kv: shape.n_head_kv,
        head_dim: shape.head_dim,
        block_tokens: BT,
        dtype: KvDtype::F16,
    };
    let blocks_needed = groups * prefix / BT + seqs * ((tail + 1).div_ceil(BT) + 1);
    let mut pool = BlockPool::new(layout, (blocks_needed + 4) * layout.block_bytes()).unwrap();
    let mut x = 0x1234_5678u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let mut fill = |pool: &mut BlockPool, b: BlockId, n: usize| {
        let kk: Vec<f32> = (0..n * kw).map(|_| next()).collect();
        let vv: Vec<f32> = (0..n * kw).map(|_| next()).collect();
        pool.write(0, b, 0, &kk, &vv);
    };
    let shared: Vec<Vec<BlockId>> = (0..groups)
        .map(|_| {
            (0..prefix / BT)
                .map(|_| {
                    let b = pool.alloc().unwrap();
                    fill(&mut pool, b, BT);
                    b
                })
                .collect()
        })
        .collect();
    let mut tables = Vec::new();
    let mut slices = Vec::new();
    for s in 0..seqs {
        let mut t = shared[s * groups / seqs].clone();
        for _ in 0..(tail + 1).div_ceil(BT) {
            let b = pool.alloc().unwrap();
            fill(&mut pool, b, BT);
            t.push(b);
        }
        tables.push(t);
        slices.push(SeqSlice {
            seq: s,
            rows: s..s + 1,
            pos: prefix + tail,
        });
    }
    let mut next2 = {
        let mut y = 99u64;
        move || {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            ((y >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    };
    let q = (0..seqs * shape.q_width()).map(|_| next2()).collect();
    let k = (0..seqs * kw).map(|_| next2()).collect();
    let v = (0..seqs * kw).map(|_| next2()).collect();
    Setup {
        pool,
        tables,
        slices,
        q,
        k,
        v,
    }
}

fn step(s: &mut Setup, shape: AttnShape, mode: AttnMode, arena: &mut SpliceArena) -> Vec<f32> {
    let mut out = vec![0f32; s.q.len()];
    match mode {
        AttnMode::Paged => PagedAttention {
            shape,
            pool: &mut s.pool,
            tables: &s.tables,
        }
        .attend(Path::detect(), 0, &s.slices, &s.q, &s.k, &s.v, &mut out)
        .unwrap(),
        m => {
            let layout = *s.pool.layout();
            let plan = plan_step(
                m,
                shape,
                layout.dtype,
                layout.block_tokens,
                &s.slices,
                &s.tables,
            );
            SpliceAttention {
                mode: m,
                shape,
                pool: &mut s.pool,
                tables: &s.tables,
                arena,
                plan: &plan,
            }
            .attend(Path::detect(), 0, &s.slices, &s.q, &s.k, &s.v, &mut out)
            .unwrap()
        }
    }
    out
}

fn main() {
    let threads = env("EP_THREADS", "2")[0];
    let iters = env("EP_ITERS", "50")[0];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let shape = AttnShape {
        n_layer: 1,
        n_head: 9,
        n_head_kv: 3,
        head_dim: 64,
    };
    println!("threads {threads}; µs per layer (median of {iters}); ratio = paged / mode");
    for &groups in &env("EP_GROUPS", "1,8") {
        for &seqs in &env("EP_SEQS", "32") {
            for &prefix in &env("EP_PREFIX", "1024,2048,4096") {
                let mut s = setup(shape, prefix, seqs, groups, 40);
                let mut arena = SpliceArena::default();
                let modes = [AttnMode::Paged, AttnMode::Relay, AttnMode::Splice];
                let outs: Vec<Vec<f32>> = modes
                    .iter()
                    .map(|&m| pool.install(|| step(&mut s, shape, m, &mut arena)))
                    .collect();
                assert!(outs.iter().all(|o| o == &outs[0]), "modes disagree");
                let mut times = vec![Vec::new(); 3];
                for _ in 0..iters {
                    for (i, &m) in modes.iter().enumerate() {
                        let t = Instant::now();
                        pool.install(|| step(&mut s, shape, m, &mut arena));
                        times[i].push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                let med: Vec<f64> = times
                    .into_iter()
                    .map(|mut t| {
                        t.sort_by(f64::total_cmp);
                        t[t.len() / 2]
                    })
                    .collect();
                println!(
                    "prefix {prefix:5} seqs {seqs:3} groups {groups}: paged {:8.0}  relay {:8.0} ({:.2}x)  splice {:8.0} ({:.2}x)",
                    med[0],
                    med[1],
                    med[0] / med[1],
                    med[2],
                    med[0] / med[2]
                );
            }
        }
    }
}
