//! Helpers shared by the batch-invariance tests: one sequence alone (prompt in chunks, then greedy
//! decode) and the same sequence inside a batch, both over the reference `ContiguousKv`.

use ep_model::kv::ContiguousKv;
use ep_model::sampling::argmax;
use ep_model::{BatchSeq, LogitsFor, Model};

pub fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

/// Logits of every prompt row followed by `decode` greedy steps, target alone, prompt in chunks.
pub fn alone(model: &Model, prompt: &[u32], chunks: &[usize], decode: usize) -> Vec<Vec<f32>> {
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
pub fn in_batch(
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
