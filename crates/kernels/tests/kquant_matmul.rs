//! K-quant weights (Q4_K, Q5_K, Q6_K) through the generic entry points: `GgmlType`,
//! `dequantize_row` (checked against the PyPI `gguf` package's dequantisers), `get_row` and
//! `matmul` (every output equal, bit for bit, to the per-element `vec_dot_k` of the weight row with
//! the activation row quantised to Q8_K, on both kernel paths, whatever the batch, the threads and
//! the row chunking).

mod common;

use common::{random_activations, random_weights};
use ep_kernels::kquant::{self, KType, Q8K_BYTES, QK_K};
use ep_kernels::matmul::{get_row, matmul_with, KernelError, WeightRef};
use ep_kernels::quant::{self, GgmlType};
use ep_kernels::simd::Path;
use half::f16;
use proptest::prelude::*;

const K_TYPES: [GgmlType; 3] = [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

fn paths() -> Vec<Path> {
    [Path::Scalar, Path::Avx2]
        .into_iter()
        .filter(|p| p.is_available())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn ktype(ty: GgmlType) -> KType {
    ty.ktype().expect("a K-quant weight type")
}

fn run(path: Path, w: &WeightRef, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * w.rows];
    matmul_with(path, w, x, n, &mut out).unwrap();
    out
}

/// The activation row quantised to Q8_K by the scalar quantiser.
fn q8k(x: &[f32]) -> Vec<u8> {
    let mut a = vec![0u8; x.len() / QK_K * Q8K_BYTES];
    kquant::quantize_row_q8_k_with(Path::Scalar, x, &mut a);
    a
}

/// Reference: the activation rows quantised to Q8_K, then one scalar `vec_dot_k` per output element.
fn reference(w: &WeightRef, x: &[f32], n: usize) -> Vec<f32> {
    let (k, kt) = (w.cols, ktype(w.ty));
    let rb = kt.row_bytes(k).unwrap();
    let mut out = vec![0f32; n * w.rows];
    for i in 0..n {
        let a = q8k(&x[i * k..(i + 1) * k]);
        for j in 0..w.rows {
            out[i * w.rows + j] =
                kquant::vec_dot_k_with(Path::Scalar, kt, k, &w.data[j * rb..(j + 1) * rb], &a);
        }
    }
    out
}

/// The f64 dot product of a dequantised weight row with a dequantised Q8_K row, and a bound on the
/// rounding of the f32 kernel: `Σ (|d·sc·q| + |dmin·m|) · |a|` (Q4_K, Q5_K) or
/// `Σ (|w| + 32·|d·sc|) · |a|` (Q6_K, whose kernel sums unsigned quants and subtracts `32·Σ`).
fn f64_dot(ty: GgmlType, k: usize, w: &[u8], a: &[u8]) -> (f64, f64) {
    let mut y = vec![0f32; k];
    quant::dequantize_row(ty, w, &mut y);
    let mut xa = vec![0f32; k];
    quant::dequantize_row(GgmlType::Q8_K, a, &mut xa);
    // The magnitude of each weight's parts.
    let part: Vec<f64> = match ty {
        GgmlType::Q6_K => w
            .chunks_exact(ty.type_size())
            .flat_map(|b| {
                let d = f16::from_le_bytes([b[208], b[209]]).to_f64();
                (0..QK_K).map(move |e| 32.0 * (d * b[192 + e / 16] as i8 as f64).abs())
            })
            .zip(&y)
            .map(|(p, &v)| p + (v as f64).abs())
            .collect(),
        _ => {
            // The `d·sc·q` parts: the same blocks with `dmin = 0`.
            let mut w0 = w.to_vec();
            for b in w0.chunks_exact_mut(ty.type_size()) {
                b[2..4].fill(0);
            }
            let mut y0 = vec![0f32; k];
            quant::dequantize_row(ty, &w0, &mut y0);
            y0.iter()
                .zip(&y)
                .map(|(&p, &v)| (p as f64).abs() + (p as f64 - v as f64).abs())
                .collect()
        }
    };
    let mut sum = 0f64;
    let mut mag = 0f64;
    for e in 0..k {
        sum += y[e] as f64 * xa[e] as f64;
        mag += part[e] * (xa[e] as f64).abs();
    }
    (sum, mag)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn kquant_matmul_equals_per_element_vec_dot(
        nb in 1usize..5,
        m in 1usize..80,
        n in 1usize..14,
        pick in 0usize..3,
        seed in any::<u64>(),
    ) {
        let ty = K_TYPES[pick];
        let k = nb * QK_K;
        let data = random_weights(ty, m, k, seed);
        let w = WeightRef { ty, rows: m, cols: k, data: &data };
        let x = random_activations(n, k, seed ^ 0x5555);
        let want = reference(&w, &x, n);
        let want_bits = bits(&want);

        for path in paths() {
            for threads in [1, 2, 3] {
                let got = pool(threads).install(|| run(path, &w, &x, n));
                prop_assert_eq!(&bits(&got), &want_bits, "{:?} {:?} threads {}", ty, path, threads);
            }
            // Each row alone (the decode path), and row 0 inside a batch of 7.
            for i in 0..n {
                let one = pool(2).install(|| run(path, &w, &x[i * k..(i + 1) * k], 1));
                prop_assert_eq!(&bits(&one)[..], &want_bits[i * m..(i + 1) * m], "{:?} {:?} row {}", ty, path, i);
            }
            let mut x7 = random_activations(7, k, seed ^ 0xAAAA);
            x7[3 * k..4 * k].copy_from_slice(&x[..k]);
            let got7 = pool(2).install(|| run(path, &w, &x7, 7));
            prop_assert_eq!(&bits(&got7)[3 * m..4 * m], &want_bits[..m], "{:?} {:?} n=7", ty, path);
        }

        // And the reference itself is the dot product of the dequantised rows, up to f32 rounding.
        let rb = ty.row_bytes(k).unwrap();
        for i in 0..n {
            let a = q8k(&x[i * k..(i + 1) * k]);
            for j in 0..m {
                let (exact, mag) = f64_dot(ty, k, &data[j * rb..(j + 1) * rb], &a);
                let got = want[i * m + j] as f64;
                prop_assert!(
                    (got - exact).abs() <= 1e-5 * mag + 1e-30,
                    "{:?} ({}, {}): {} vs {} (mag {})", ty, i, j, got, exact, mag
                );
            }
        }
    }
}

#[test]
fn large_kquant_matmul_parallel_equals_serial() {
    // Large enough for the parallel activation quantisation and chunked weight rows.
    let (m, k) = (300, 1024);
    for ty in K_TYPES {
        let data = random_weights(ty, m, k, 42);
        let w = WeightRef {
            ty,
            rows: m,
            cols: k,
            data: &data,
        };
        for n in [1, 12] {
            let x = random_activations(n, k, 7 + n as u64);
            let want = bits(&reference(&w, &x, n));
            for path in paths() {
                for threads in [1, 2, 4] {
                    let got = pool(threads).install(|| run(path, &w, &x, n));
                    assert_eq!(bits(&got), want, "{ty:?} n {n} {path:?} threads {threads}");
                }
            }
            let got = pool(2).install(|| {
                let mut out = vec![0f32; n * m];
                matmul_with(Path::detect(), &w, &x, n, &mut out).unwrap();
                out
            });
            assert_eq!(bits(&got), want, "{ty:?} n {n} default path");
        }
    }
}

/// Bits with every NaN made the same: which NaN (sign, payload) an inf - inf or NaN + NaN sum
/// returns depends on operand order, which the compiler may commute in the scalar kernels.
fn bits_nan_eq(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|f| if f.is_nan() { 0x7fc0_0000 } else { f.to_bits() })
        .collect()
}

/// Batch-1 matmuls with extreme super-block scales (subnormal, huge, infinite, NaN) in some rows:
/// every output equals its scalar dot product (NaNs as NaNs), whatever the rows around it hold.
#[test]
fn kquant_decode_with_extreme_scales_matches_scalar() {
    let scales: [u16; 8] = [
        0x0001, 0x03ff, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00, 0x8000,
    ];
    for ty in K_TYPES {
        let offsets: &[usize] = if ty == GgmlType::Q6_K {
            &[208]
        } else {
            &[0, 2]
        };
        for (m, k) in [(203, 768), (37, 2048)] {
            let mut data = random_weights(ty, m, k, (m * k) as u64);
            let rb = ty.row_bytes(k).unwrap();
            for j in (0..m).step_by(3) {
                for (b, blk) in data[j * rb..(j + 1) * rb]
                    .chunks_exact_mut(ty.type_size())
                    .enumerate()
                {
                    for (s, &o) in offsets.iter().enumerate() {
                        if (b + j + s) % 3 == 0 {
                            let v = scales[(b + j + 3 * s) % scales.len()];
                            blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
            }
            let w = WeightRef {
                ty,
                rows: m,
                cols: k,
                data: &data,
            };
            let x = random_activations(1, k, 99);
            let want = reference(&w, &x, 1);
            assert!(want.iter().any(|v| v.is_nan()) && want.iter().any(|v| v.is_finite()));
            let want = bits_nan_eq(&want);
            for path in paths() {
                for threads in [1, 2] {
                    let got = pool(threads).install(|| run(path, &w, &x, 1));
                    assert_eq!(
                        bits_nan_eq(&got),
                        want,
                        "{ty:?} {m}x{k} {path:?} threads {threads}"
                    );
                }
            }
        }
    }
}

#[test]
fn kquant_get_row_dequantises() {
    for ty in K_TYPES {
        let (m, k) = (5, 512);
        let data = random_weights(ty, m, k, 3);
        let w = WeightRef {
            ty,
            rows: m,
            cols: k,
            data: &data,
        };
        let rb = ty.row_bytes(k).unwrap();
        let mut got = vec![0f32; k];
        let mut want = vec![0f32; k];
        get_row(&w, 4, &mut got).unwrap();
        kquant::dequantize_row_k(ktype(ty), &data[4 * rb..5 * rb], &mut want);
        assert_eq!(bits(&got), bits(&want), "{ty:?}");
        assert!(got.iter().any(|&v| v != 0.0));
        assert_eq!(
            get_row(&w, 5, &mut got),
            Err(KernelError::RowOutOfRange { row: 5, rows: 5 })
        );
    }
}

#[test]
fn kquant_shape_errors_are_reported() {
    for ty in K_TYPES {
        // 288 columns: a whole number of 32-blocks, not of 256-element super-blocks.
        let data = vec![0u8; 4 * ty.type_size()];
        let w = WeightRef {
            ty,
            rows: 4,
            cols: 288,
            data: &data,
        };
        let x = vec![0.5f32; 288];
        let mut out = vec![0f32; 4];
        assert_eq!(
            matmul_with(Path::detect(), &w, &x, 1, &mut out),
            Err(KernelError::NotBlockAligned {
                ty: ty.name(),
                cols: 288,
                block: 256
            })
        );
        let mut row = vec![0f32; 288];
        assert!(get_row(&w, 0, &mut row).is_err());
        let w = WeightRef { cols: 256, ..w };
        assert!(matmul_with(Path::detect(), &w, &x[..256], 1, &mut out).is_ok());
        let short = WeightRef {
            data: &data[..data.len() - 1],
            ..w
        };
        assert!(matches!(
            matmul_with(Path::detect(), &short, &x[..256], 1, &mut out),
            Err(KernelError::WeightBytes { .. })
        ));
    }
    // Q8_K is an activation type only.
    let data = vec![0u8; 2 * Q8K_BYTES];
    let w = WeightRef {
        ty: GgmlType::Q8_K,
        rows: 2,
        cols: 256,
        data: &data,
    };
    let mut out = vec![0f32; 2];
    assert_eq!(
        matmul_with(Path::detect(), &w, &[0.0; 256], 1, &mut out),
        Err(KernelError::UnsupportedWeightType("q8_K"))
    );
}

/// One fixture file of `scripts/reference/make_kquant_fixture.py`: the raw blocks, then gguf-py's
/// dequantised values (f32 LE).
fn gguf_py_fixture(ty: GgmlType) -> &'static [u8] {
    match ty {
        GgmlType::Q4_K => include_bytes!("../../../fixtures/kquant/q4_K.bin"),
        GgmlType::Q5_K => include_bytes!("../../../fixtures/kquant/q5_K.bin"),
        GgmlType::Q6_K => include_bytes!("../../../fixtures/kquant/q6_K.bin"),
        _ => unreachable!(),
    }
}

#[test]
fn dequantize_matches_gguf_py() {
    for ty in K_TYPES {
        let file = gguf_py_fixture(ty);
        let per_block = ty.type_size() + 4 * QK_K;
        assert_eq!(file.len() % per_block, 0, "{ty:?} fixture size");
        let nb = file.len() / per_block;
        assert!(nb >= 16);
        let (raw, want) = file.split_at(nb * ty.type_size());
        let want: Vec<f32> = want
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut got = vec![0f32; nb * QK_K];
        quant::dequantize_row(ty, raw, &mut got);
        let (mut nans, mut infs) = (0, 0);
        for (e, (g, w)) in got.iter().zip(&want).enumerate() {
            if w.is_nan() {
                nans += 1;
                assert!(g.is_nan(), "{ty:?} element {e}: {g} vs NaN");
            } else {
                infs += w.is_infinite() as usize;
                assert_eq!(g.to_bits(), w.to_bits(), "{ty:?} element {e}: {g} vs {w}");
            }
        }
        // The crafted blocks are there: NaN and infinite scales, and ordinary values.
        assert!(nans > 0 && infs > 0, "{ty:?}: {nans} NaN, {infs} inf");
        assert!(want.iter().filter(|v| v.is_finite() && **v != 0.0).count() > nb * QK_K / 2);
    }
}
