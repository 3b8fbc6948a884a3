//! Matmul throughput: `cargo bench -p ep-kernels --bench matmul [-- FILTER]`.
//!
//! Prints, per weight type, shape, batch size, path and thread count, the median time of one matmul and
//! the weight bytes streamed per second (the decode-time bound).

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
    // Keep the scales finite: a small f16 (0x2c00 = 1/16) at the start of every block.
    if ty.block_size() == 32 {
        let nscales = if ty == GgmlType::Q4_1 { 2 } else { 1 };
        for b in w.chunks_exact_mut(ty.type_size()) {
            for i in 0..nscales {
                b[2 * i..2 * i + 2].copy_from_slice(&0x2c00u16.to_le_bytes());
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

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let paths: Vec<Path> = [Path::Avx2, Path::Scalar]
        .into_iter()
        .filter(|p| p.is_available())
        .collect();
    let shapes = [
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
