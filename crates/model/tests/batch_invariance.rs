//! Batch invariance: a sequence's logits are bit-identical whatever else is in the batch, however its
//! prompt is chunked, and whatever the thread count. Checked on the tiny model (always) and on the
//! default model.

mod common;

use common::{alone, in_batch, pool};
use ep_model::Model;
use ep_testutil as testutil;

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
