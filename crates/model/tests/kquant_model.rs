//! A model whose matrices are K-quants (Q4_K, Q5_K, Q6_K), and one whose matrices are the other
//! 32-element formats (Q4_0, Q5_0, Q5_1, Q8_0), load and run: its logits are
//! batch-invariant (bit-identical alone, in a batch, prefilled in chunks, on 1 or 2 threads), and
//! close to those of the same random model with the matrices dequantised to F32 (the difference is the
//! quantisation of the activations to Q8_K, Q8_0 or Q8_1).

use ep_kernels::GgmlType;
use ep_model::Model;
use ep_testutil::{self as testutil, TinyWeights};

mod common;

use common::{alone, in_batch, pool};

fn load(dir: &tempfile::TempDir, seed: u64, weights: TinyWeights) -> Model {
    let p = dir.path().join(format!("tiny-{seed}-{weights:?}.gguf"));
    std::fs::write(&p, testutil::tiny_model_bytes_with(seed, "llama", weights)).unwrap();
    Model::load(&p, |_, _| {}).unwrap()
}

fn assert_identical(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: row count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if let Some((j, (p, q))) = x
            .iter()
            .zip(y)
            .enumerate()
            .find(|(_, (p, q))| p.to_bits() != q.to_bits())
        {
            panic!("{what}: row {i} differs first at logit {j}: {p} vs {q}");
        }
    }
}

fn prompt() -> Vec<u32> {
    (0..19).map(|i| (i * 37 % 256) as u32).collect()
}

/// The types of every layer matrix of `model`.
fn matrix_types(model: &Model) -> Vec<GgmlType> {
    let mut out = Vec::new();
    for l in 0..testutil::TINY_LAYERS {
        for m in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            let name = format!("blk.{l}.{m}.weight");
            out.push(model.gguf().unwrap().tensor(&name).unwrap().ty);
        }
    }
    out
}

#[test]
fn kquant_model_has_kquant_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&dir, 7, TinyWeights::KQuant);
    let mut seen = std::collections::BTreeSet::new();
    for t in matrix_types(&model) {
        assert!(t.ktype().is_some(), "{t:?}");
        seen.insert(t.id());
    }
    assert_eq!(seen.len(), 3, "Q4_K, Q5_K and Q6_K all used");
    assert_eq!(model.cfg.n_embd, testutil::TINY_K_EMBD);
    let f32_model = load(&dir, 7, TinyWeights::KQuantAsF32);
    assert_eq!(
        f32_model
            .gguf()
            .unwrap()
            .tensor("blk.0.ffn_down.weight")
            .unwrap()
            .ty,
        GgmlType::F32
    );
}

#[test]
fn kquant_model_is_batch_invariant() {
    batch_invariant(TinyWeights::KQuant);
}

#[test]
fn block32_model_is_batch_invariant() {
    batch_invariant(TinyWeights::Block32);
}

fn batch_invariant(weights: TinyWeights) {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&dir, 7, weights);
    let prompt = prompt();
    let others: Vec<Vec<u32>> = [1usize, 30, 7, 16, 3, 11]
        .iter()
        .map(|&n| (0..n).map(|i| ((i * 13 + n) % 258) as u32).collect())
        .collect();
    let decode = 3;
    let base = pool(1).install(|| alone(&model, &prompt, &[], decode));
    assert!(base.iter().flatten().all(|x| x.is_finite()));
    let two = pool(2).install(|| alone(&model, &prompt, &[], decode));
    assert_identical(&base, &two, "1 vs 2 threads");
    let chunked = pool(2).install(|| alone(&model, &prompt, &[1, 2, 5, 3], decode));
    assert_identical(&base, &chunked, "prefill in chunks 1,2,5,3,rest");
    for threads in [1, 2] {
        let batched = pool(threads).install(|| in_batch(&model, &prompt, &others, 3, decode));
        assert_identical(
            &base,
            &batched,
            &format!("in a batch of 7, {threads} threads"),
        );
    }
}

/// `‖a − b‖₂ / ‖b‖₂` over all logits.
fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut d, mut m) = (0f64, 0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        d += (*x as f64 - *y as f64).powi(2);
        m += (*y as f64).powi(2);
    }
    (d / m).sqrt()
}

#[test]
fn block32_model_has_q4_0_q5_0_q5_1_and_q8_0_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&dir, 7, TinyWeights::Block32);
    let seen: std::collections::BTreeSet<&str> =
        matrix_types(&model).iter().map(|t| t.name()).collect();
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["q4_0", "q5_0", "q5_1", "q8_0"]
    );
}

/// The 32-element formats quantise activations per 32 values (Q8_0 / Q8_1), so the model is closer
/// to its F32 dequantisation than the K-quant one (measured 0.013 relative, against 0.031).
#[test]
fn block32_model_is_close_to_its_f32_dequantisation() {
    close_to_f32(TinyWeights::Block32, TinyWeights::Block32AsF32, 0.03);
}

/// Q8_K has one scale per 256 activations, so each K-quant matmul rounds its input to about 1%
/// (relative); over the 14 matmuls of the two layers the logits of this random model end up about
/// 3% (RMS) away from the F32 model's (measured 0.031), and a different random model 140% away.
#[test]
fn kquant_model_is_close_to_its_f32_dequantisation() {
    close_to_f32(TinyWeights::KQuant, TinyWeights::KQuantAsF32, 0.05);
}

/// The logits of the model with `quant` matrices are within `bound` (relative RMS) of its twin with
/// them dequantised to F32 (`as_f32`), not equal to them, and far from another random model's.
fn close_to_f32(quant: TinyWeights, as_f32: TinyWeights, bound: f64) {
    let dir = tempfile::tempdir().unwrap();
    let prompt = prompt();
    let logits = |seed: u64, w: TinyWeights| {
        let model = load(&dir, seed, w);
        pool(2).install(|| alone(&model, &prompt, &[], 0))
    };
    let q = logits(7, quant);
    let f = logits(7, as_f32);
    let other = logits(8, as_f32);
    // The logits are not degenerate: they spread over a range.
    let spread = |r: &[f32]| {
        let (lo, hi) = r
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        hi - lo
    };
    assert!(f.iter().all(|r| spread(r) > 0.5), "flat logits");
    let close = rel_diff(&q, &f);
    let far = rel_diff(&other, &f);
    println!("{quant:?} vs its F32 dequantisation: {close}, another model: {far}");
    assert!(
        close > 0.0,
        "{quant:?}: the activations' quantisation should change some bits"
    );
    assert!(
        close < bound,
        "{quant:?} vs F32 dequantised: relative {close}"
    );
    assert!(far > 0.5, "a different model should be far: relative {far}");
}
