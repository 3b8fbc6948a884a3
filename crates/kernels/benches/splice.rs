//! Splice phases vs per-sequence paged attention: `cargo bench -p ep-kernels --bench splice`.
//!
//! A decode step of 32 sequences that share a 2048-key prefix (one node, f16 K/V in blocks of 16 rows)
//! and each have a private tail of 64 keys; SmolLM2-135M's attention shape (3 query heads per KV head,
//! head_dim 64, rows of 3 KV heads), one KV head, one thread. Compares:
//!
//! - (i) `32x attend_group`: per sequence, its 3 query heads over its whole path (shared + tail), so
//!   the shared node's K/V (512 KB) is read 32 times;
//! - (ii) `splice`: the queries rounded, scores over the shared node for all 96 vectors at once, the
//!   tails per sequence, softmax per vector, `P·V` over the shared node for all 96 vectors, the tails,
//!   finish.
//!
//! The two give bit-identical results (checked before timing). Prints the median (and best) time
//! per step on each path this CPU can run (AVX2, then scalar), the ratio (ii)/(i), and the phases
//! of (ii). `EP_BENCH_MS` sets the time per measurement (400 ms).

use std::hint::black_box;
use std::time::{Duration, Instant};

use ep_kernels::paged::{attend_group, GroupScratch, KvChunk, KvDtype, KvRows};
use ep_kernels::simd::Path;
use ep_kernels::splice::{
    splice_finish, splice_pv, splice_scores, splice_softmax, Rows, SpliceNode, Vectors,
};
use half::f16;

const N_SEQ: usize = 32;
const G: usize = 3;
const HD: usize = 64;
const N_KV: usize = 3;
const KVH: usize = 1;
const BLOCK: usize = 16;
const SHARED: usize = 2048;
const TAIL: usize = 64;

fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * amp
        })
        .collect()
}

/// Median and best of repeated runs of `f` over the time budget.
fn time(mut f: impl FnMut()) -> (Duration, Duration) {
    let budget = Duration::from_millis(
        std::env::var("EP_BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(400),
    );
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || times.len() < 10 {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    (times[times.len() / 2], times[0])
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `n_keys` keys in blocks of `BLOCK` rows of `N_KV * HD` f16 (one allocation per block).
fn blocks(n_keys: usize, seed: u64) -> Vec<(Vec<f16>, Vec<f16>)> {
    let width = N_KV * HD;
    (0..n_keys / BLOCK)
        .map(|b| {
            let s = seed.wrapping_mul(1000).wrapping_add(b as u64);
            let k = values(BLOCK * width, s, 6.0);
            let v = values(BLOCK * width, s ^ 0x5555, 2.0);
            (
                k.iter().map(|&x| f16::from_f32(x)).collect(),
                v.iter().map(|&x| f16::from_f32(x)).collect(),
            )
        })
        .collect()
}

fn chunks(b: &[(Vec<f16>, Vec<f16>)]) -> Vec<KvChunk<'_>> {
    b.iter()
        .map(|(k, v)| KvChunk {
            k: KvRows::F16(k),
            v: KvRows::F16(v),
            n_keys: BLOCK,
            stride: N_KV * HD,
            off: KVH * HD,
        })
        .collect()
}

/// Scratch of the splice step, and the kernel path it runs on.
struct Splice {
    kernels: Path,
    qr: Vec<f32>,
    scores: Vec<f32>,
    lanes: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// A named phase of the splice step.
type Phase<'a> = (&'a str, &'a dyn Fn(&mut Splice));

const ROW: usize = SHARED + TAIL;
const M: usize = N_SEQ * G;

fn main() {
    let scale = 1.0 / (HD as f32).sqrt();
    let shared_b = blocks(SHARED, 1);
    let tail_b: Vec<_> = (0..N_SEQ).map(|s| blocks(TAIL, 100 + s as u64)).collect();
    let shared = chunks(&shared_b);
    let tails: Vec<Vec<KvChunk<'_>>> = tail_b.iter().map(|b| chunks(b)).collect();
    let paths: Vec<Vec<KvChunk<'_>>> = tails
        .iter()
        .map(|t| shared.iter().chain(t).copied().collect())
        .collect();
    let q = values(M * HD, 3, 4.0);
    let dtype = KvDtype::F16;

    let per_seq = |kernels: Path, gs: &mut GroupScratch, out: &mut [f32], lse: &mut [f32]| {
        for (s, path) in paths.iter().enumerate() {
            attend_group(
                kernels,
                &q[s * G * HD..][..G * HD],
                HD,
                path,
                scale,
                gs,
                &mut out[s * G * HD..][..G * HD],
                &mut lse[s * G..][..G],
            );
        }
    };
    let all = vec![SHARED; M];
    let tail_lims = vec![TAIL; G];
    let shared_scores = |st: &mut Splice| {
        st.qr.clear();
        st.qr.extend(q.iter().map(|&x| dtype.round(x)));
        splice_scores(
            st.kernels,
            SpliceNode {
                chunks: &shared,
                key_base: 0,
                lims: &all,
            },
            Vectors {
                data: &st.qr,
                head_dim: HD,
            },
            scale,
            Rows {
                data: &mut st.scores,
                row_len: ROW,
            },
        );
    };
    let tail_scores = |st: &mut Splice| {
        for (s, t) in tails.iter().enumerate() {
            splice_scores(
                st.kernels,
                SpliceNode {
                    chunks: t,
                    key_base: SHARED,
                    lims: &tail_lims,
                },
                Vectors {
                    data: &st.qr[s * G * HD..][..G * HD],
                    head_dim: HD,
                },
                scale,
                Rows {
                    data: &mut st.scores[s * G * ROW..][..G * ROW],
                    row_len: ROW,
                },
            );
        }
    };
    let softmax = |st: &mut Splice| {
        for (row, l) in st.scores.chunks_exact_mut(ROW).zip(st.lse.iter_mut()) {
            *l = splice_softmax(st.kernels, dtype, row);
        }
    };
    let shared_pv = |st: &mut Splice| {
        st.lanes.fill(0.0);
        splice_pv(
            st.kernels,
            SpliceNode {
                chunks: &shared,
                key_base: 0,
                lims: &all,
            },
            Rows {
                data: &st.scores,
                row_len: ROW,
            },
            HD,
            &mut st.lanes,
        );
    };
    let tail_pv_finish = |st: &mut Splice| {
        for (s, t) in tails.iter().enumerate() {
            splice_pv(
                st.kernels,
                SpliceNode {
                    chunks: t,
                    key_base: SHARED,
                    lims: &tail_lims,
                },
                Rows {
                    data: &st.scores[s * G * ROW..][..G * ROW],
                    row_len: ROW,
                },
                HD,
                &mut st.lanes[s * G * 8 * HD..][..G * 8 * HD],
            );
        }
        splice_finish(HD, &st.lanes, &mut st.out);
    };
    let step = |st: &mut Splice| {
        shared_scores(st);
        tail_scores(st);
        softmax(st);
        shared_pv(st);
        tail_pv_finish(st);
    };

    let modes = [Path::Avx2, Path::Scalar]
        .into_iter()
        .filter(|p| p.is_available());
    for kernels in modes {
        let path = kernels.name();
        let mut gs = GroupScratch::default();
        let (mut out, mut lse) = (vec![0f32; M * HD], vec![0f32; M]);
        let mut st = Splice {
            kernels,
            qr: Vec::new(),
            scores: vec![0f32; M * ROW],
            lanes: vec![0f32; M * 8 * HD],
            out: vec![0f32; M * HD],
            lse: vec![0f32; M],
        };
        per_seq(kernels, &mut gs, &mut out, &mut lse);
        step(&mut st);
        let same = out
            .iter()
            .zip(&st.out)
            .all(|(a, b)| a.to_bits() == b.to_bits())
            && lse
                .iter()
                .zip(&st.lse)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "splice differs from per-sequence attend_group");

        let (base, base_best) = time(|| {
            per_seq(kernels, &mut gs, &mut out, &mut lse);
            black_box((&out, &lse));
        });
        let (spl, spl_best) = time(|| {
            step(&mut st);
            black_box((&st.out, &st.lse));
        });
        let head =
            format!("{path:>6} {N_SEQ} seqs x g={G} hd={HD} f16 shared={SHARED} tail={TAIL}");
        println!(
            "{head}  (i)  {N_SEQ}x attend_group  {:>9.1} us (best {:>9.1})",
            us(base),
            us(base_best)
        );
        println!(
            "{head}  (ii) splice            {:>9.1} us (best {:>9.1})  (ii)/(i) {:.3}  [bit-identical]",
            us(spl),
            us(spl_best),
            us(spl) / us(base)
        );
        let phases: [Phase<'_>; 5] = [
            ("shared scores", &shared_scores),
            ("tail scores", &tail_scores),
            ("softmax", &softmax),
            ("shared pv", &shared_pv),
            ("tail pv + finish", &tail_pv_finish),
        ];
        for (name, f) in phases {
            let (t, _) = time(|| {
                f(&mut st);
                black_box(&st.scores);
            });
            println!("{head}       phase {name:<17} {:>9.1} us", us(t));
        }
    }
}
