//! `bench micro`: the engine's raw speed on one model — prefill at 512 tokens, and decode at batch 1, 8
//! and 32, each row at a short context and at 1024 tokens of context. Every point is the median of
//! `reps` runs; runs of all points are interleaved so that drift on a noisy machine spreads evenly.

use std::time::Instant;

use ep_model::kv::ContiguousKv;
use ep_model::{BatchSeq, LogitsFor, Model, ModelError};
use serde::Serialize;

use crate::median;

/// One measured point.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub engine: &'static str,
    /// `prefill` or `decode`.
    pub kind: &'static str,
    pub batch: usize,
    /// Tokens already in each sequence's KV when the timed steps start.
    pub context: usize,
    /// Tokens timed (prefill: prompt tokens; decode: steps per sequence).
    pub tokens: usize,
    pub tok_s: f64,
    pub runs: Vec<f64>,
    pub threads: usize,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct MicroConfig {
    pub prefill_tokens: usize,
    pub batches: Vec<usize>,
    pub contexts: Vec<usize>,
    pub decode_steps: usize,
    pub reps: usize,
    pub threads: usize,
}

impl Default for MicroConfig {
    fn default() -> Self {
        Self {
            prefill_tokens: 512,
            batches: vec![1, 8, 32],
            contexts: vec![16, 1024],
            decode_steps: 16,
            reps: 3,
            threads: 1,
        }
    }
}

/// Deterministic ordinary-token ids (no special tokens: ids from 100 up).
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (100 + x % (vocab as u64 - 100)) as u32
        })
        .collect()
}

fn time_prefill(model: &Model, n: usize) -> Result<f64, ModelError> {
    let mut kv = ContiguousKv::new(model.attn_shape(), n + 1);
    let seq = kv.add_seq();
    let prompt = tokens(n, model.cfg.n_vocab, 1);
    let t = Instant::now();
    model.forward(
        &[BatchSeq {
            seq,
            tokens: &prompt,
            pos: 0,
            logits: LogitsFor::Last,
        }],
        &mut kv,
    )?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Decode `steps` tokens for `batch` sequences that each hold its own copy of a `context`-token prompt.
fn time_decode(
    model: &Model,
    batch: usize,
    context: usize,
    steps: usize,
) -> Result<f64, ModelError> {
    let mut kv = ContiguousKv::new(model.attn_shape(), context + steps + 1);
    let first = kv.add_seq();
    let prompt = tokens(context, model.cfg.n_vocab, 2);
    for (i, chunk) in prompt.chunks(512).enumerate() {
        model.forward(
            &[BatchSeq {
                seq: first,
                tokens: chunk,
                pos: i * 512,
                logits: LogitsFor::None,
            }],
            &mut kv,
        )?;
    }
    let mut seqs = vec![first];
    for _ in 1..batch {
        seqs.push(kv.fork(first)?);
    }
    let next = tokens(batch * steps, model.cfg.n_vocab, 3);
    let t = Instant::now();
    for s in 0..steps {
        let b: Vec<BatchSeq> = seqs
            .iter()
            .enumerate()
            .map(|(i, &seq)| BatchSeq {
                seq,
                tokens: std::slice::from_ref(&next[s * batch + i]),
                pos: context + s,
                logits: LogitsFor::Last,
            })
            .collect();
        model.forward(&b, &mut kv)?;
    }
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

#[derive(Clone, Copy)]
enum Point {
    Prefill(usize),
    Decode { batch: usize, context: usize },
}

/// Runs the micro benchmark; `progress` is told each finished run (done, total).
pub fn run(
    model: &Model,
    cfg: &MicroConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Record>, ModelError> {
    let mut points = vec![Point::Prefill(cfg.prefill_tokens)];
    for &context in &cfg.contexts {
        for &batch in &cfg.batches {
            points.push(Point::Decode { batch, context });
        }
    }
    let total = points.len() * cfg.reps;
    let mut runs = vec![Vec::new(); points.len()];
    for rep in 0..cfg.reps {
        for (i, p) in points.iter().enumerate() {
            let r = match *p {
                Point::Prefill(n) => time_prefill(model, n)?,
                Point::Decode { batch, context } => {
                    time_decode(model, batch, context, cfg.decode_steps)?
                }
            };
            runs[i].push(r);
            progress(rep * points.len() + i + 1, total);
        }
    }
    Ok(points
        .iter()
        .zip(runs)
        .map(|(p, runs)| {
            let (kind, batch, context, tokens) = match *p {
                Point::Prefill(n) => ("prefill", 1, 0, n),
                Point::Decode { batch, context } => ("decode", batch, context, cfg.decode_steps),
            };
            Record {
                engine: "edgeprompt",
                kind,
                batch,
                context,
                tokens,
                tok_s: median(runs.clone()),
                runs,
                threads: cfg.threads,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_point_on_the_tiny_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        std::fs::write(&p, ep_testutil::tiny_model_bytes(1, "llama")).unwrap();
        let model = Model::load(&p, |_, _| {}).unwrap();
        let cfg = MicroConfig {
            prefill_tokens: 20,
            batches: vec![1, 3],
            contexts: vec![4, 40],
            decode_steps: 2,
            reps: 2,
            threads: 1,
        };
        let mut seen = 0;
        let recs = run(&model, &cfg, |done, total| {
            seen = done;
            assert!(done <= total);
        })
        .unwrap();
        assert_eq!(seen, 10);
        assert_eq!(recs.len(), 5);
        assert_eq!(recs[0].kind, "prefill");
        assert!(recs.iter().all(|r| r.tok_s > 0.0 && r.runs.len() == 2));
        let keys: Vec<(usize, usize)> = recs[1..].iter().map(|r| (r.batch, r.context)).collect();
        assert_eq!(keys, vec![(1, 4), (3, 4), (1, 40), (3, 40)]);
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0]), 5.0);
    }
}
