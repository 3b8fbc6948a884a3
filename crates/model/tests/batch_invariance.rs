//! Batch invariance: a sequence's logits are bit-identical whatever else is in the batch, however
//! its prompt is chunked, whatever the thread count, and whatever the kernel path the model runs
//! on. Checked on the tiny model (always) and on the default model.

mod common;

use common::{alone, in_batch, pool};
use ep_kernels::simd::Path;
use ep_model::Model;
use ep_testutil::{self as testutil, TinyWeights};

fn assert_identical(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: row count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        if !same {
            let (j, (p, q)) = x
                .iter()
                .zip(y)
                .enumerate()
                .find(|(_, (p, q))| p.to_bits() != q.to_bits())
                .unwrap();
            panic!("{what}: row {i} differs first at logit {j}: {p} vs {q}");
        }
    }
}

fn check(model: &Model, prompt: &[u32], others: &[Vec<u32>]) {
    let decode = 4;
    let base = pool(1).install(|| alone(model, prompt, &[], decode));
    assert!(base.iter().flatten().all(|x| x.is_finite()));
    let two = pool(2).install(|| alone(model, prompt, &[], decode));
    assert_identical(&base, &two, "1 vs 2 threads");
    let chunked = pool(2).install(|| alone(model, prompt, &[1, 2, 5, 3], decode));
    assert_identical(&base, &chunked, "prefill in chunks 1,2,5,3,rest");
    for threads in [1, 2] {
        let batched = pool(threads).install(|| in_batch(model, prompt, others, 3, decode));
        assert_identical(
            &base,
            &batched,
            &format!("in a batch of 8, {threads} threads"),
        );
    }
}

#[test]
fn tiny_model_is_batch_invariant() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    std::fs::write(&p, testutil::tiny_model_bytes(7, "llama")).unwrap();
    let model = Model::load(&p, |_, _| {}).unwrap();
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 % 256) as u32).collect();
    let others: Vec<Vec<u32>> = [1usize, 40, 7, 16, 3, 64, 11]
        .iter()
        .map(|&n| (0..n).map(|i| ((i * 13 + n) % 258) as u32).collect())
        .collect();
    check(&model, &prompt, &others);
}

/// The kernel path is the model's (`Model::kernels`, chosen once when it is loaded): the same model
/// on `Path::Scalar` and on `Path::Avx2` (where the CPU has it) gives bit-identical logits, alone
/// and in a batch, in one process, for every tiny model's weight types.
#[test]
fn tiny_model_is_kernel_path_invariant() {
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 % 256) as u32).collect();
    let others: Vec<Vec<u32>> = [1usize, 40, 7]
        .iter()
        .map(|&n| (0..n).map(|i| ((i * 13 + n) % 258) as u32).collect())
        .collect();
    if !Path::Avx2.is_available() {
        eprintln!("AVX2 + FMA + F16C not available: only the scalar path runs");
    }
    for weights in [TinyWeights::Q4_1, TinyWeights::Block32, TinyWeights::KQuant] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        std::fs::write(&p, testutil::tiny_model_bytes_with(7, "llama", weights)).unwrap();
        let mut model = Model::load(&p, |_, _| {}).unwrap();
        assert_eq!(
            model.kernels(),
            Path::detect(),
            "{weights:?}: loaded on the detected path"
        );
        let run = |m: &Model| {
            pool(2).install(|| {
                let mut rows = alone(m, &prompt, &[5], 4);
                rows.extend(in_batch(m, &prompt, &others, 1, 4));
                rows
            })
        };
        model.set_kernels(Path::Scalar).unwrap();
        assert_eq!(model.kernels(), Path::Scalar);
        let scalar = run(&model);
        assert!(scalar.iter().flatten().all(|x| x.is_finite()));
        if Path::Avx2.is_available() {
            model.set_kernels(Path::Avx2).unwrap();
            assert_eq!(model.kernels(), Path::Avx2);
            let avx2 = run(&model);
            assert_identical(&scalar, &avx2, &format!("{weights:?}: scalar vs avx2"));
            // And back: the model's path is all that changed.
            model.set_kernels(Path::Scalar).unwrap();
            assert_identical(&scalar, &run(&model), &format!("{weights:?}: scalar again"));
        } else {
            let err = model.set_kernels(Path::Avx2).unwrap_err();
            assert!(err.to_string().contains("avx2"), "{err}");
            assert_eq!(
                model.kernels(),
                Path::Scalar,
                "a refused path leaves the model's"
            );
        }
    }
}

#[test]
fn default_model_is_batch_invariant() {
    let model = Model::load(testutil::require_test_model(), |_, _| {}).unwrap();
    // Token ids of ordinary text; the exact text does not matter here, only that rows are real tokens.
    let prompt: Vec<u32> = vec![
        504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 378, 1345, 314, 216,
    ];
    let others: Vec<Vec<u32>> = [1usize, 37, 5, 20, 9, 52, 2]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|i| (100 + i * 311 + n * 7) as u32 % 49152)
                .collect()
        })
        .collect();
    check(&model, &prompt, &others);
}
