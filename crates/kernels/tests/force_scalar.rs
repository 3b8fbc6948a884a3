//! The scalar path can be forced by `EDGEPROMPT_FORCE_SCALAR=1` and by `set_force_scalar`, and gives the
//! same results as the SIMD path. A separate test binary (one test) because it flips process-wide state.

// `std::env::set_var` is `unsafe` (edition 2024): it sets process-wide state.
#![allow(unsafe_code)]

mod common;

use common::{random_activations, random_weights};
use ep_kernels::matmul::{matmul, WeightRef};
use ep_kernels::quant::{self, GgmlType};
use ep_kernels::simd;

fn matmul_bits(w: &WeightRef, x: &[f32], n: usize) -> Vec<u32> {
    let mut out = vec![0f32; n * w.rows];
    matmul(w, x, n, &mut out).unwrap();
    out.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn force_scalar_env_and_switch() {
    // Before any dispatch: the environment variable is read once, at first use.
    // SAFETY: no other thread of this test binary reads or writes the environment.
    unsafe { std::env::set_var(simd::FORCE_SCALAR_ENV, "1") };
    assert!(simd::force_scalar());
    assert_eq!(simd::active_path(), "scalar");

    let (m, n) = (70, 3);
    let mut results = Vec::new();
    for (ty, k) in [
        (GgmlType::Q4_1, 320),
        (GgmlType::Q4_0, 320),
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

        simd::set_force_scalar(true);
        assert_eq!(simd::active_path(), "scalar");
        let scalar = matmul_bits(&w, &x, n);

        // The scalar result is the plain per-element dot product.
        let at = ty.vec_dot_type().unwrap();
        let rb = ty.row_bytes(k).unwrap();
        let mut a = vec![0u8; at.row_bytes(k).unwrap()];
        quant::quantize_activation_row(at, &x[k..2 * k], &mut a);
        for j in 0..m {
            let d = quant::vec_dot(ty, k, &data[j * rb..(j + 1) * rb], &a);
            assert_eq!(scalar[m + j], d.to_bits());
        }

        simd::set_force_scalar(false);
        let expected = if simd::avx2_available() {
            "avx2"
        } else {
            "scalar"
        };
        assert_eq!(simd::active_path(), expected);
        let fast = matmul_bits(&w, &x, n);
        assert_eq!(
            scalar, fast,
            "{ty:?}: forced scalar differs from {expected}"
        );
        results.push(fast);
    }
    assert_eq!(results.len(), 9);
}
