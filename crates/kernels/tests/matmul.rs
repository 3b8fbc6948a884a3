//! Matmul: every output is exactly one dot product, independent of batch size, threads, chunking and
//! kernel path.

mod common;

use common::{random_activations, random_weights};
use ep_kernels::matmul::{self, get_row, matmul_with, KernelError, WeightRef};
use ep_kernels::quant::{self, GgmlType};
use ep_kernels::simd::{self, Path};
use proptest::prelude::*;

const WEIGHT_TYPES: [GgmlType; 8] = [
    GgmlType::Q4_1,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F32,
];

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

fn run(path: Path, w: &WeightRef, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * w.rows];
    matmul_with(path, w, x, n, &mut out).unwrap();
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Reference: one `vec_dot` per output element, on the scalar path.
fn reference(w: &WeightRef, x: &[f32], n: usize) -> Vec<f32> {
    let at = w.ty.vec_dot_type().unwrap();
    let k = w.cols;
    let rb = w.ty.row_bytes(k).unwrap();
    let mut out = vec![0f32; n * w.rows];
    for i in 0..n {
        let mut a = vec![0u8; at.row_bytes(k).unwrap()];
        quant::quantize_activation_row_with(Path::Scalar, at, &x[i * k..(i + 1) * k], &mut a);
        for j in 0..w.rows {
            out[i * w.rows + j] =
                quant::vec_dot_with(Path::Scalar, w.ty, k, &w.data[j * rb..(j + 1) * rb], &a);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn matmul_is_batch_thread_and_path_invariant(
        nb in 1usize..20,
        m in 1usize..150,
        n in 2usize..21,
        pick in 0usize..WEIGHT_TYPES.len(),
        seed in any::<u64>(),
    ) {
        let ty = WEIGHT_TYPES[pick];
        let k = nb * 32;
        let data = random_weights(ty, m, k, seed);
        let w = WeightRef { ty, rows: m, cols: k, data: &data };
        let x = random_activations(n, k, seed ^ 0x5555);
        let want = bits(&reference(&w, &x, n));

        for path in paths() {
            for threads in [1, 2, 3] {
                let got = pool(threads).install(|| run(path, &w, &x, n));
                prop_assert_eq!(&bits(&got), &want, "{:?} {:?} threads {}", ty, path, threads);
            }
            // n = 1 on each row alone, and row 3 inside a batch of 7 (n = 7).
            for i in 0..n {
                let one = pool(2).install(|| run(path, &w, &x[i * k..(i + 1) * k], 1));
                prop_assert_eq!(&bits(&one)[..], &want[i * m..(i + 1) * m], "{:?} {:?} row {}", ty, path, i);
            }
            let mut x7 = random_activations(7, k, seed ^ 0xAAAA);
            x7[3 * k..4 * k].copy_from_slice(&x[..k]);
            let got7 = pool(2).install(|| run(path, &w, &x7, 7));
            prop_assert_eq!(&bits(&got7)[3 * m..4 * m], &want[..m], "{:?} {:?} n=7", ty, path);
        }
    }
}

#[test]
fn large_matmul_parallel_equals_serial() {
    // Large enough to take the parallel paths (activation quantisation and chunked rows).
    let (m, k, n) = (300, 1024, 12);
    for ty in WEIGHT_TYPES {
        let data = random_weights(ty, m, k, 42);
        let w = WeightRef {
            ty,
            rows: m,
            cols: k,
            data: &data,
        };
        let x = random_activations(n, k, 7);
        let want = bits(&reference(&w, &x, n));
        for path in paths() {
            for threads in [1, 2, 4] {
                let got = pool(threads).install(|| run(path, &w, &x, n));
                assert_eq!(bits(&got), want, "{ty:?} {path:?} threads {threads}");
            }
        }
        let got = pool(2).install(|| {
            let mut out = vec![0f32; n * m];
            matmul_with(Path::detect(), &w, &x, n, &mut out).unwrap();
            out
        });
        assert_eq!(bits(&got), want, "{ty:?} default path");
    }
}

#[test]
fn get_row_dequantises() {
    for ty in WEIGHT_TYPES {
        let (m, k) = (5, 96);
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
        quant::dequantize_row(ty, &data[4 * rb..5 * rb], &mut want);
        assert_eq!(bits(&got), bits(&want));
        assert_eq!(
            get_row(&w, 5, &mut got),
            Err(KernelError::RowOutOfRange { row: 5, rows: 5 })
        );
        assert!(get_row(&w, 0, &mut got[..10]).is_err());
    }
}

#[test]
fn shape_errors_are_reported() {
    let data = random_weights(GgmlType::Q4_1, 4, 64, 1);
    let w = WeightRef {
        ty: GgmlType::Q4_1,
        rows: 4,
        cols: 64,
        data: &data,
    };
    let x = vec![0.5f32; 2 * 64];
    let mut out = vec![0f32; 2 * 4];
    assert!(matmul_with(Path::detect(), &w, &x, 2, &mut out).is_ok());
    assert!(matches!(
        matmul_with(Path::detect(), &w, &x[..100], 2, &mut out),
        Err(KernelError::Length { .. })
    ));
    assert!(matches!(
        matmul_with(Path::detect(), &w, &x, 2, &mut out[..7]),
        Err(KernelError::Length { .. })
    ));
    let short = WeightRef {
        data: &data[..data.len() - 1],
        ..w
    };
    assert!(matches!(
        matmul_with(Path::detect(), &short, &x, 2, &mut out),
        Err(KernelError::WeightBytes { .. })
    ));
    let unaligned = WeightRef { cols: 48, ..w };
    assert!(matches!(
        matmul_with(Path::detect(), &unaligned, &x[..96], 2, &mut out),
        Err(KernelError::NotBlockAligned { .. })
    ));
    let q81_data = vec![0u8; 4 * 72];
    let q81 = WeightRef {
        ty: GgmlType::Q8_1,
        data: &q81_data,
        ..w
    };
    assert_eq!(
        matmul_with(Path::detect(), &q81, &x, 2, &mut out),
        Err(KernelError::UnsupportedWeightType("q8_1"))
    );
    if !simd::avx2_available() {
        assert!(matches!(
            matmul_with(Path::Avx2, &w, &x, 2, &mut out),
            Err(KernelError::PathUnavailable(_))
        ));
    }
    // n = 0 is a no-op; k = 0 gives zeros.
    assert!(matmul_with(Path::detect(), &w, &[], 0, &mut []).is_ok());
    let empty = WeightRef {
        cols: 0,
        data: &[],
        ..w
    };
    let mut out4 = vec![f32::NAN; 2 * 4];
    assert!(matmul_with(Path::detect(), &empty, &[], 2, &mut out4).is_ok());
    assert!(out4.iter().all(|&v| v == 0.0));
}

#[test]
fn unaligned_weight_data_is_fine() {
    let (m, k) = (9, 128);
    let data = random_weights(GgmlType::Q4_1, m, k, 11);
    let mut shifted = vec![0u8; data.len() + 1];
    shifted[1..].copy_from_slice(&data);
    let w = WeightRef {
        ty: GgmlType::Q4_1,
        rows: m,
        cols: k,
        data: &data,
    };
    let ws = WeightRef {
        data: &shifted[1..],
        ..w
    };
    let x = random_activations(3, k, 5);
    for path in paths() {
        assert_eq!(bits(&run(path, &w, &x, 3)), bits(&run(path, &ws, &x, 3)));
    }
    let _ = matmul::WeightRef::validate(&ws);
}

/// Batch-1 matmuls (the decode path: rows streamed four at a time with prefetching) on model-sized
/// shapes, with weight scales that are extreme (subnormal, huge, infinite, NaN) in some rows: every
/// output equals its scalar dot product, whatever the other rows of its group hold.
#[test]
fn decode_matmul_with_extreme_scales_matches_scalar() {
    let scales: [u16; 8] = [
        0x0001, 0x03ff, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00, 0x8000,
    ];
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        for (m, k) in [(203, 576), (576, 1536), (7, 64)] {
            let mut data = random_weights(ty, m, k, (m * k) as u64);
            let rb = ty.row_bytes(k).unwrap();
            let bs = ty.type_size();
            // Every third row gets an extreme scale (and for Q4_1 an extreme `m`) in some blocks.
            for j in (0..m).step_by(3) {
                for (b, blk) in data[j * rb..(j + 1) * rb].chunks_exact_mut(bs).enumerate() {
                    if (b + j) % 4 == 0 {
                        let v = scales[(b + j) % scales.len()];
                        blk[0..2].copy_from_slice(&v.to_le_bytes());
                        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                            let v = scales[(b + j + 3) % scales.len()];
                            blk[2..4].copy_from_slice(&v.to_le_bytes());
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
            let want = bits(&reference(&w, &x, 1));
            for path in paths() {
                for threads in [1, 2] {
                    let got = pool(threads).install(|| run(path, &w, &x, 1));
                    assert_eq!(
                        bits(&got),
                        want,
                        "{ty:?} {m}x{k} {path:?} threads {threads}"
                    );
                }
            }
        }
    }
}
