//! The kernel path is a value, not process-wide state: `Path::detect` honours
//! `EDGEPROMPT_FORCE_SCALAR`, and the scalar and AVX2 paths, run side by side in one process, give
//! the same bits.

// `std::env::set_var` is `unsafe` (edition 2024): it sets process-wide state.
#![allow(unsafe_code)]

mod common;

use std::sync::Mutex;

use common::{random_activations, random_weights};
use ep_kernels::matmul::{matmul_with, WeightRef};
use ep_kernels::quant::{self, GgmlType};
use ep_kernels::simd::{self, Path};

/// Held by every test of this binary while it runs, so the one that changes the environment never
/// runs beside another.
static SERIAL: Mutex<()> = Mutex::new(());

fn matmul_bits(path: Path, w: &WeightRef, x: &[f32], n: usize) -> Vec<u32> {
    let mut out = vec![0f32; n * w.rows];
    matmul_with(path, w, x, n, &mut out).unwrap();
    out.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn detect_honours_the_environment_variable() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let best = if simd::avx2_available() {
        Path::Avx2
    } else {
        Path::Scalar
    };
    let set = |v: Option<&str>| match v {
        // SAFETY: every test of this binary holds `SERIAL`, so no other thread reads or writes the
        // environment meanwhile.
        Some(v) => unsafe { std::env::set_var(simd::FORCE_SCALAR_ENV, v) },
        // SAFETY: as above.
        None => unsafe { std::env::remove_var(simd::FORCE_SCALAR_ENV) },
    };
    for (v, want) in [
        (None, best),
        (Some("1"), Path::Scalar),
        (Some("true"), Path::Scalar),
        (Some(" YES "), Path::Scalar),
        (Some("On"), Path::Scalar),
        (Some("0"), best),
        (Some("no"), best),
        (Some(""), best),
    ] {
        set(v);
        assert_eq!(Path::detect(), want, "{} = {v:?}", simd::FORCE_SCALAR_ENV);
        assert!(Path::detect().is_available());
    }
    // Read at each call: the latest value counts.
    set(Some("1"));
    assert_eq!(Path::detect(), Path::Scalar);
    set(None);
    assert_eq!(Path::detect(), best);
    assert!(Path::Scalar.is_available());
    assert_eq!(Path::Scalar.name(), "scalar");
    assert_eq!(Path::Avx2.name(), "avx2");
}

#[test]
fn scalar_and_avx2_give_the_same_bits_in_one_process() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !Path::Avx2.is_available() {
        eprintln!("AVX2 + FMA + F16C not available: only the scalar path is checked");
    }
    let (m, n) = (70, 3);
    let mut checked = 0;
    for (ty, k) in [
        (GgmlType::Q4_1, 320),
        (GgmlType::Q4_0, 320),
        (GgmlType::Q5_0, 320),
        (GgmlType::Q5_1, 320),
        (GgmlType::Q8_0, 320),
        (GgmlType::F16, 320),
        (GgmlType::BF16, 320),
        (GgmlType::F32, 320),
        (GgmlType::Q4_K, 512),
        (GgmlType::Q5_K, 512),
        (GgmlType::Q6_K, 512),
    ] {
        let data = random_weights(ty, m, k, 99);
        let w = WeightRef {
            ty,
            rows: m,
            cols: k,
            data: &data,
        };
        let x = random_activations(n, k, 17);
        let scalar = matmul_bits(Path::Scalar, &w, &x, n);

        // The scalar result is the plain per-element dot product, on either path.
        let at = ty.vec_dot_type().unwrap();
        let rb = ty.row_bytes(k).unwrap();
        let mut a = vec![0u8; at.row_bytes(k).unwrap()];
        quant::quantize_activation_row_with(Path::Scalar, at, &x[k..2 * k], &mut a);
        for j in 0..m {
            let wr = &data[j * rb..(j + 1) * rb];
            let d = quant::vec_dot_with(Path::Scalar, ty, k, wr, &a);
            assert_eq!(scalar[m + j], d.to_bits(), "{ty:?} row {j}: scalar dot");
            if Path::Avx2.is_available() {
                let d = quant::vec_dot_with(Path::Avx2, ty, k, wr, &a);
                assert_eq!(scalar[m + j], d.to_bits(), "{ty:?} row {j}: avx2 dot");
            }
        }

        if Path::Avx2.is_available() {
            let mut a2 = vec![0u8; a.len()];
            quant::quantize_activation_row_with(Path::Avx2, at, &x[k..2 * k], &mut a2);
            assert_eq!(a, a2, "{ty:?}: activation rows differ between paths");
            let fast = matmul_bits(Path::Avx2, &w, &x, n);
            assert_eq!(scalar, fast, "{ty:?}: scalar matmul differs from avx2");
            // And back: nothing about the first call changed the second.
            assert_eq!(scalar, matmul_bits(Path::Scalar, &w, &x, n), "{ty:?}");
        }
        checked += 1;
    }
    assert_eq!(checked, 11);
}
