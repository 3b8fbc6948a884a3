//! Batch invariance: a sequence's logits are bit-identical whatever else is in the batch, however its
//! prompt is chunked, and whatever the thread count. Checked on the tiny model (always) and on the
//! default model.

use ep_model::kv::ContiguousKv;
use ep_model::sampling::argmax;
use ep_model::{testutil, BatchSeq, LogitsFor, Model};

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

/// Logits of every prompt row followed by `decode` greedy steps, target alone, prompt in chunks.
fn alone(model: &Model, prompt: &[u32], chunks: &[usize], decode: usize) -> Vec<Vec<f32>> {
    let v = model.cfg.n_vocab;
    let mut kv = ContiguousKv::new(model.attn_shape(), 512);
    let seq = kv.add_seq();
    let mut rows = Vec::new();
    let mut pos = 0;
    let mut sizes = chunks.iter().copied().chain(std::iter::repeat(usize::MAX));
    while pos < prompt.len() {
        let n = sizes.next().unwrap().min(prompt.len() - pos);
        let b = [BatchSeq {
            seq,
            tokens: &prompt[pos..pos + n],
            pos,
            logits: LogitsFor::All,
        }];
        let l = model.forward(&b, &mut kv).unwrap();
        rows.extend(l.chunks(v).map(<[f32]>::to_vec));
        pos += n;
    }
    for _ in 0..decode {
        let t = argmax(rows.last().unwrap());
        let b = [BatchSeq {
            seq,
            tokens: &[t],
            pos,
            logits: LogitsFor::Last,
        }];
        rows.push(model.forward(&b, &mut kv).unwrap());
        pos += 1;
    }
    rows
}

/// The same, with the target at index `at` among `others` prompts, all prefilled in one batch and
/// decoded together.
fn in_batch(
    model: &Model,
    prompt: &[u32],
    others: &[Vec<u32>],
    at: usize,
    decode: usize,
) -> Vec<Vec<f32>> {
    let v = model.cfg.n_vocab;
    let mut kv = ContiguousKv::new(model.attn_shape(), 512);
    let mut all: Vec<Vec<u32>> = others.to_vec();
    all.insert(at, prompt.to_vec());
    let seqs: Vec<usize> = all.iter().map(|_| kv.add_seq()).collect();
    let b: Vec<BatchSeq> = all
        .iter()
        .zip(&seqs)
        .map(|(p, &seq)| BatchSeq {
            seq,
            tokens: p,
            pos: 0,
            logits: LogitsFor::All,
        })
        .collect();
    let l = model.forward(&b, &mut kv).unwrap();
    let skip: usize = all[..at].iter().map(Vec::len).sum();
    let mut rows: Vec<Vec<f32>> = l[skip * v..(skip + prompt.len()) * v]
        .chunks(v)
        .map(<[f32]>::to_vec)
        .collect();
    let mut last: Vec<u32> = all
        .iter()
        .scan(0usize, |off, p| {
            *off += p.len();
            Some(argmax(&l[(*off - 1) * v..*off * v]))
        })
        .collect();
    for step in 0..decode {
        let b: Vec<BatchSeq> = all
            .iter()
            .zip(&seqs)
            .zip(&last)
            .map(|((p, &seq), t)| BatchSeq {
                seq,
                tokens: std::slice::from_ref(t),
                pos: p.len() + step,
                logits: LogitsFor::Last,
            })
            .collect();
        let l = model.forward(&b, &mut kv).unwrap();
        rows.push(l[at * v..(at + 1) * v].to_vec());
        last = l.chunks(v).map(argmax).collect();
    }
    rows
}

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
