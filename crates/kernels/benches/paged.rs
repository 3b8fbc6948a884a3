//! Paged grouped attention vs per-head attention: `cargo bench -p ep-kernels --bench paged`.
//!
//! SmolLM2-135M's shape: 3 query heads per KV head, head_dim 64, 3 KV heads (rows of 192), one KV head
//! attended. Compares, at 1024 keys:
//!
//! - `3x attend_head`: three `attention::attend_head` calls over contiguous f16 K/V (what the
//!   contiguous store does today), each streaming the KV head's rows;
//! - `attend_group`: one `paged::attend_group` call over the same keys in blocks of 16 rows (f16, and
//!   f32/bf16 for reference), streaming them once.
//!
//! Prints the median (and best) time per call on each path this CPU can run (AVX2, then scalar);
//! the ratio is `3x attend_head / attend_group`. `EP_BENCH_MS` sets the time per measurement
//! (400 ms).

use std::hint::black_box;
use std::time::{Duration, Instant};

use ep_kernels::attention::{attend_head, HeadScratch, KvView};
use ep_kernels::paged::{attend_group, GroupScratch, KvChunk, KvDtype, KvRows};
use ep_kernels::simd::Path;
use half::{bf16, f16};

const G: usize = 3;
const HD: usize = 64;
const N_KV: usize = 3;
const KVH: usize = 1;
const BLOCK: usize = 16;

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

fn main() {
    let n_keys = 1024;
    let width = N_KV * HD;
    let scale = 1.0 / (HD as f32).sqrt();
    let kf = values(n_keys * width, 1, 4.0);
    let vf = values(n_keys * width, 2, 2.0);
    let q = values(G * HD, 3, 4.0);

    let k16: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
    let v16: Vec<f16> = vf.iter().map(|&x| f16::from_f32(x)).collect();
    // Separate blocks of BLOCK rows each, as a paged store holds them.
    let blocks =
        |x: &[f32]| -> Vec<Vec<f32>> { x.chunks(BLOCK * width).map(<[f32]>::to_vec).collect() };
    let (kb32, vb32) = (blocks(&kf), blocks(&vf));
    let to16 = |b: &[Vec<f32>]| -> Vec<Vec<f16>> {
        b.iter()
            .map(|r| r.iter().map(|&x| f16::from_f32(x)).collect())
            .collect()
    };
    let tob16 = |b: &[Vec<f32>]| -> Vec<Vec<bf16>> {
        b.iter()
            .map(|r| r.iter().map(|&x| bf16::from_f32(x)).collect())
            .collect()
    };
    let (kbl16, vbl16) = (to16(&kb32), to16(&vb32));
    let (kblb, vblb) = (tob16(&kb32), tob16(&vb32));
    let chunk = |k: KvRows<'static>, v: KvRows<'static>| KvChunk {
        k,
        v,
        n_keys: BLOCK,
        stride: width,
        off: KVH * HD,
    };
    // The block vectors live until the end of `main`; leak them to get 'static views simply.
    let leak16 = |b: Vec<Vec<f16>>| -> &'static [Vec<f16>] { Box::leak(b.into_boxed_slice()) };
    let leakb = |b: Vec<Vec<bf16>>| -> &'static [Vec<bf16>] { Box::leak(b.into_boxed_slice()) };
    let leak32 = |b: Vec<Vec<f32>>| -> &'static [Vec<f32>] { Box::leak(b.into_boxed_slice()) };
    let (kbl16, vbl16) = (leak16(kbl16), leak16(vbl16));
    let (kblb, vblb) = (leakb(kblb), leakb(vblb));
    let (kb32, vb32) = (leak32(kb32), leak32(vb32));
    let chunks_of = |d: KvDtype| -> Vec<KvChunk<'static>> {
        (0..n_keys / BLOCK)
            .map(|b| match d {
                KvDtype::F16 => chunk(KvRows::F16(&kbl16[b]), KvRows::F16(&vbl16[b])),
                KvDtype::Bf16 => chunk(KvRows::Bf16(&kblb[b]), KvRows::Bf16(&vblb[b])),
                KvDtype::F32 => chunk(KvRows::F32(&kb32[b]), KvRows::F32(&vb32[b])),
            })
            .collect()
    };

    let view = KvView {
        k: &k16,
        v: &v16,
        n_keys,
        stride: width,
        off: KVH * HD,
    };
    let q16: Vec<Vec<f16>> = q
        .chunks(HD)
        .map(|h| h.iter().map(|&x| f16::from_f32(x)).collect())
        .collect();

    let paths = [Path::Avx2, Path::Scalar]
        .into_iter()
        .filter(|p| p.is_available());
    for kernels in paths {
        let path = kernels.name();
        let mut hs = HeadScratch::default();
        let mut out = vec![0f32; G * HD];
        let (heads, heads_best) = time(|| {
            for (h, qh) in q16.iter().enumerate() {
                black_box(attend_head(
                    kernels,
                    qh,
                    view,
                    scale,
                    &mut hs,
                    &mut out[h * HD..(h + 1) * HD],
                ));
            }
            black_box(&out);
        });
        println!(
            "{path:>6} g={G} hd={HD} keys={n_keys}  3x attend_head (contiguous f16)   {:>8.2} us (best {:>8.2})",
            us(heads),
            us(heads_best)
        );
        for d in [KvDtype::F16, KvDtype::F32, KvDtype::Bf16] {
            let chunks = chunks_of(d);
            let mut gs = GroupScratch::default();
            let mut lse = vec![0f32; G];
            let (grp, grp_best) = time(|| {
                attend_group(kernels, &q, HD, &chunks, scale, &mut gs, &mut out, &mut lse);
                black_box((&out, &lse));
            });
            println!(
                "{path:>6} g={G} hd={HD} keys={n_keys}  attend_group ({:>4}, blocks of {BLOCK}) {:>8.2} us (best {:>8.2})  ratio {:.2}x",
                d.name(),
                us(grp),
                us(grp_best),
                us(heads) / us(grp)
            );
        }
    }
}
