//! Matmul throughput: `cargo bench -p ep-kernels --bench matmul [-- FILTER]`.
//!
//! Prints, per weight type, shape, batch size, path and thread count, the median time of one matmul and
//! the weight bytes streamed per second (the decode-time bound).
//!
//! `-- decode` runs only the decode model: the matmuls of one SmolLM2-135M token at batch 1 (30 layers
//! of Q4_1 q/k/v/o/gate/up/down, then the 49152x576 Q8_0 output projection), one after another as the
//! model runs them, and prints the time per token (the weights do not fit in the cache).
//!
//! `-- prefill [TYPE ...]` runs the layer matmuls of one 512-token SmolLM2-135M prefill (30 layers of
//! q/k/v/o/gate/up/down, each at n = 512) with every weight of TYPE (default: q4_1 q4_0 q5_0 q8_0), on
//! 1 and 2 threads, and prints ms per prefill and multiply-adds per second.

use std::time::{Duration, Instant};

use ep_kernels::matmul::{matmul_with, WeightRef};
use ep_kernels::quant::GgmlType;
use ep_kernels::simd::Path;

fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let mut s = 0x1234_5678_9abc_def0u64;
    let bytes = ty.row_bytes(cols).unwrap() * rows;
    let mut w: Vec<u8> = (0..bytes)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    // Keep the scales finite and spread like a real model's: f16 magnitudes in [2^-10, 2^-5) with
    // random mantissas (Q4_1's `m` negative), so that scale conversions see varied values.
    if ty.block_size() == 32 {
        let nscales = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            2
        } else {
            1
        };
        for b in w.chunks_exact_mut(ty.type_size()) {
            for i in 0..nscales {
                let r = u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
                let exp = 5 + (r >> 10) % 5;
                let sign = if i == 1 { 0x8000 } else { 0 };
                let h = sign | exp << 10 | (r & 0x3ff);
                b[2 * i..2 * i + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
    } else if let Some(kt) = ty.ktype() {
        // K-quants: the f16 super-block scales (`d`, `dmin` or Q6_K's `d`) as above, positive.
        let offsets: &[usize] = if kt == ep_kernels::kquant::KType::Q6K {
            &[208]
        } else {
            &[0, 2]
        };
        for b in w.chunks_exact_mut(ty.type_size()) {
            for &o in offsets {
                let r = u16::from_le_bytes([b[o], b[o + 1]]);
                let h = (5 + (r >> 10) % 5) << 10 | (r & 0x3ff);
                b[o..o + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
    } else if ty != GgmlType::F32 {
        for v in w.chunks_exact_mut(2) {
            v[1] &= 0x3f;
        }
    } else {
        for v in w.chunks_exact_mut(4) {
            v[3] = 0x3f;
        }
    }
    w
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench(ty: GgmlType, m: usize, k: usize, n: usize, path: Path, threads: usize) {
    let data = weights(ty, m, k);
    let w = WeightRef {
        ty,
        rows: m,
        cols: k,
        data: &data,
    };
    let x: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut out = vec![0f32; n * m];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let budget = Duration::from_millis(
        std::env::var("EP_BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(400),
    );
    let mut times = Vec::new();
    let start = Instant::now();
    pool.install(|| {
        matmul_with(path, &w, &x, n, &mut out).unwrap(); // warm-up
        while start.elapsed() < budget || times.len() < 5 {
            let t = Instant::now();
            matmul_with(path, &w, &x, n, &mut out).unwrap();
            times.push(t.elapsed());
        }
    });
    let best = *times.iter().min().unwrap();
    let t = median(times);
    let secs = t.as_secs_f64();
    println!(
        "{:>5} {:>6}x{:<5} n={:<4} {:>6} t={} {:>10.1} us (best {:>10.1}) {:>7.2} GB/s {:>7.1} GFLOP/s",
        ty.name(),
        m,
        k,
        n,
        path.name(),
        threads,
        secs * 1e6,
        best.as_secs_f64() * 1e6,
        data.len() as f64 / secs / 1e9,
        2.0 * (m * k * n) as f64 / secs / 1e9,
    );
    std::hint::black_box(&out);
}

/// SmolLM2-135M's layer matmuls (output features, input features): q, k, v, o, gate, up, down.
const LAYER_SHAPES: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];

/// The matmuls of one decode step of SmolLM2-135M (Q4_1 layers, Q8_0 output), at batch 1.
fn bench_decode(threads: usize) {
    const LAYERS: usize = 30;
    let mats: Vec<(GgmlType, usize, usize, Vec<u8>)> = (0..LAYERS)
        .flat_map(|_| LAYER_SHAPES)
        .map(|(m, k)| (GgmlType::Q4_1, m, k))
        .chain([(GgmlType::Q8_0, 49152, 576)])
        .map(|(ty, m, k)| (ty, m, k, weights(ty, m, k)))
        .collect();
    let bytes: usize = mats.iter().map(|(_, _, _, d)| d.len()).sum();
    let x: Vec<f32> = (0..1536)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut out = vec![0f32; 49152];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let path = Path::detect();
    let token = |out: &mut [f32]| {
        for (ty, m, k, data) in &mats {
            let w = WeightRef {
                ty: *ty,
                rows: *m,
                cols: *k,
                data,
            };
            matmul_with(path, &w, &x[..*k], 1, &mut out[..*m]).unwrap();
        }
    };
    let budget = Duration::from_millis(
        std::env::var("EP_BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000),
    );
    let (t, best) = timed(&pool, budget, 5, || token(&mut out));
    println!(
        "decode SmolLM2-135M matmuls {:>6} t={} {:>8.3} ms/token (best {:>8.3}) {:>7.2} GB/s  {:>6.1} tok/s (best {:>6.1})",
        path.name(),
        threads,
        t.as_secs_f64() * 1e3,
        best.as_secs_f64() * 1e3,
        bytes as f64 / t.as_secs_f64() / 1e9,
        1.0 / t.as_secs_f64(),
        1.0 / best.as_secs_f64(),
    );
    std::hint::black_box(&out);
}

/// Runs `f` once to warm up, then repeatedly on `pool` for at least `budget` and `min_runs` runs:
/// the median and the best time.
fn timed(
    pool: &rayon::ThreadPool,
    budget: Duration,
    min_runs: usize,
    mut f: impl FnMut() + Send,
) -> (Duration, Duration) {
    let mut times = Vec::new();
    pool.install(|| {
        f();
        let start = Instant::now();
        while start.elapsed() < budget || times.len() < min_runs {
            let t = Instant::now();
            f();
            times.push(t.elapsed());
        }
    });
    let best = *times.iter().min().unwrap();
    (median(times), best)
}

/// The layer matmuls of one 512-token prefill of SmolLM2-135M, all weights of `ty`.
fn bench_prefill(ty: GgmlType, threads: usize) {
    const LAYERS: usize = 30;
    const N: usize = 512;
    let shapes = LAYER_SHAPES;
    let mats: Vec<(usize, usize, Vec<u8>)> = shapes
        .iter()
        .map(|&(m, k)| (m, k, weights(ty, m, k)))
        .collect();
    let macs: usize = LAYERS * N * shapes.iter().map(|(m, k)| m * k).sum::<usize>();
    let x: Vec<f32> = (0..N * 1536)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut out = vec![0f32; N * 1536];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let path = Path::detect();
    let prefill = |out: &mut [f32]| {
        for _ in 0..LAYERS {
            for (m, k, data) in &mats {
                let w = WeightRef {
                    ty,
                    rows: *m,
                    cols: *k,
                    data,
                };
                matmul_with(path, &w, &x[..N * k], N, &mut out[..N * m]).unwrap();
            }
        }
    };
    let (t, best) = timed(&pool, Duration::from_millis(3000), 3, || prefill(&mut out));
    println!(
        "prefill 512 SmolLM2-135M layer matmuls {:>5} {:>6} t={} {:>8.1} ms (best {:>8.1}) {:>6.1} G MAC/s (best {:>6.1})",
        ty.name(),
        path.name(),
        threads,
        t.as_secs_f64() * 1e3,
        best.as_secs_f64() * 1e3,
        macs as f64 / t.as_secs_f64() / 1e9,
        macs as f64 / best.as_secs_f64() / 1e9,
    );
    std::hint::black_box(&out);
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.as_deref() == Some("prefill") {
        let names: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-') && a != "prefill")
            .collect();
        let all = [
            GgmlType::Q4_1,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ];
        for ty in all {
            let default = matches!(
                ty,
                GgmlType::Q4_1 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0
            );
            if (names.is_empty() && default) || names.iter().any(|n| n == ty.name()) {
                for threads in [1, 2] {
                    bench_prefill(ty, threads);
                }
            }
        }
        return;
    }
    if filter.as_deref() == Some("decode") {
        for threads in [1, 2] {
            bench_decode(threads);
        }
        return;
    }
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let paths: Vec<Path> = [Path::Avx2, Path::Scalar]
        .into_iter()
        .filter(|p| p.is_available())
        .collect();
    let shapes = [
        (192, 576),
        (576, 576),
        (1536, 576),
        (576, 1536),
        (2048, 2048),
        (8192, 2048),
        (49152, 576),
        (65536, 3072),
    ];
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        if !want(ty.name()) {
            continue;
        }
        for &path in &paths {
            for &(m, k) in &shapes {
                if let Ok(only) = std::env::var("EP_BENCH_SHAPE") {
                    if only != format!("{m}x{k}") {
                        continue;
                    }
                }
                if ty.row_bytes(k).is_none() {
                    continue; // K-quant rows are whole 256-element super-blocks
                }
                for n in [1, 16] {
                    if n > 1 && m * k > 64 << 20 {
                        continue;
                    }
                    if path == Path::Scalar && (n > 1 || m * k > 4 << 20) {
                        continue;
                    }
                    for threads in [1, 2] {
                        bench(ty, m, k, n, path, threads);
                    }
                }
            }
        }
    }
}
