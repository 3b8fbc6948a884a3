//! `bench codecs`: what the lossy KV codecs cost in quality and save in bytes.
//!
//! MMLU test questions, spread round-robin over the subjects, each after its subject's 5-shot cloud
//! prompt (the dev examples). Per subject the cloud prompt's exact KV (f16) is computed once below the
//! engine (`Model::forward` over a [`ContiguousKv`]), sent through each codec as a whole wire stream
//! (header, then per-layer frames of `frame_tokens` tokens, every frame checked by the
//! [`StreamReader`] and decoded with [`ep_kv::codec::decode`]) and loaded into a KV of its own. Per
//! question, on the exact KV: the greedy next token and a greedy continuation of `cont_tokens`
//! tokens; on each decoded KV: the same question with that continuation teacher-forced (one forward
//! pass), compared position by position — top-1 agreement with the exact greedy token, KL divergence
//! KL(exact ‖ codec) of the next-token distributions — and the answer letter (the likeliest of
//! ` A`…` D` after the prompt) against the exact KV's and against the dataset's answer.
//!
//! `bytes_per_token` is the encoded stream's length (header with token ids and block hashes, frame
//! headers, payloads: scales and minimums included) over the prompt tokens. A codec whose decoded
//! rows equal the exact rows bit for bit (raw) reuses the exact logits: the forward pass is a
//! deterministic function of its inputs (batch invariance, docs/correctness.md).
//!
//! Scheme names: `raw`, `int8`, `int4` are the wire codecs. For measurements a name may add
//! `+kN` (key groups of N tokens), `+vN` (value groups of N channels), `+hiL` (the first L layers
//! int8) and `+zN` (zstd level N); such variants are not wire codecs (their frames carry the base
//! codec's id but are decoded with the variant's parameters).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ep_kv::codec::{self, QuantSpec, CODEC_INT8, CODEC_RAW};
use ep_kv::wire::{Frame, Item, KvHeader, StreamReader, WireLayout};
use ep_kv::{ContentIdentity, KvDtype};
use ep_model::kv::ContiguousKv;
use ep_model::tokenizer::Tokenizer;
use ep_model::{BatchSeq, LogitsFor, Model, ModelError};
use half::f16;
use serde::Serialize;

use crate::batch::{BatchError, Workload};

/// Errors of the codecs benchmark.
#[derive(Debug, thiserror::Error)]
pub enum CodecsError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Dataset(#[from] BatchError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("codec {scheme}: {what}")]
    Codec { scheme: String, what: String },
}

/// What to run.
#[derive(Clone, Debug)]
pub struct CodecsConfig {
    /// Datasets directory holding `mmlu/{dev,test}`.
    pub datasets: PathBuf,
    pub questions: usize,
    pub codecs: Vec<String>,
    /// Greedy continuation teacher-forced per question (positions compared, the answer's included).
    pub cont_tokens: usize,
    /// Tokens per wire frame.
    pub frame_tokens: usize,
    /// Tokens per block in the stream header (its block hashes).
    pub block_tokens: usize,
}

/// One codec's aggregate over all questions.
#[derive(Clone, Debug, Serialize)]
pub struct CodecRecord {
    pub codec: String,
    pub questions: usize,
    pub subjects: usize,
    /// Cloud-prompt tokens encoded (sum over subjects).
    pub prompt_tokens: usize,
    /// Teacher-forced positions compared (questions × cont_tokens).
    pub positions: usize,
    /// Encoded stream bytes (header, frame headers, payloads) per prompt token.
    pub bytes_per_token: f64,
    /// Frame payload bytes alone per prompt token.
    pub payload_bytes_per_token: f64,
    /// Raw f16 K and V per token: 2 × n_layer × kv_width × 2.
    pub f16_bytes_per_token: f64,
    /// `f16_bytes_per_token / bytes_per_token`.
    pub compression_vs_f16: f64,
    /// Fraction of positions whose argmax equals the exact KV's greedy token.
    pub top1_agreement: f64,
    /// Fraction of questions whose answer letter equals the exact KV's.
    pub answer_agreement: f64,
    /// Mean KL(exact ‖ codec) over the positions, nats.
    pub mean_kl: f64,
    pub max_kl: f64,
    /// Fraction of questions answered correctly with this codec's KV, and with the exact KV.
    pub accuracy: f64,
    pub exact_accuracy: f64,
    /// Largest |exact − decoded| over every K/V value.
    pub max_abs_err: f64,
    /// Decoded rows bit-identical to the exact ones (the forward pass was then not repeated).
    pub kv_identical: bool,
    /// Raw KV megabytes (f16) per second of encoding, and of decoding (stream parsing included).
    pub encode_mb_s: f64,
    pub decode_mb_s: f64,
    pub frame_tokens: usize,
    pub cont_tokens: usize,
    pub kv_dtype: &'static str,
}

/// A codec, or a measured variant of one (module docs).
#[derive(Clone, Debug)]
struct Scheme {
    name: String,
    /// The wire codec id the frames carry.
    base: u8,
    /// Parameters for lossy layers (None: raw).
    spec: Option<QuantSpec>,
    /// The first `hi` layers are int8.
    hi: usize,
}

impl Scheme {
    fn parse(name: &str) -> Result<Scheme, CodecsError> {
        let bad = |what: String| CodecsError::Config(format!("codec '{name}': {what}"));
        let mut parts = name.split('+');
        let base_name = parts.next().unwrap_or_default();
        let base = codec::parse(base_name).ok_or_else(|| {
            bad(format!(
                "unknown (available: {})",
                codec::CODECS
                    .iter()
                    .filter_map(|&c| codec::codec_name(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let mut spec = QuantSpec::of(base);
        let mut hi = 0;
        for p in parts {
            let (key, num) = p.split_at(p.find(|c: char| c.is_ascii_digit()).unwrap_or(p.len()));
            let n: i64 = num
                .parse()
                .map_err(|_| bad(format!("modifier '{p}' needs a number")))?;
            let s = spec
                .as_mut()
                .ok_or_else(|| bad("raw takes no modifiers".into()))?;
            match (key, n) {
                ("k", 1..=65536) => s.k_group = n as usize,
                ("v", 1..=65536) => s.v_group = n as usize,
                ("z", -7..=22) => s.zstd_level = n as i32,
                ("hi", 0..=4096) => hi = n as usize,
                _ => return Err(bad(format!("modifier '{p}' (+kN, +vN, +zN, +hiL)"))),
            }
        }
        Ok(Scheme {
            name: name.to_string(),
            base,
            spec,
            hi,
        })
    }

    /// The codec id and parameters of `layer`'s frames.
    fn layer(&self, layer: usize) -> (u8, Option<QuantSpec>) {
        match self.spec {
            Some(s) if layer < self.hi => (
                CODEC_INT8,
                QuantSpec::of(CODEC_INT8).map(|e| QuantSpec {
                    zstd_level: s.zstd_level,
                    ..e
                }),
            ),
            Some(s) => (self.base, Some(s)),
            None => (CODEC_RAW, None),
        }
    }

    fn encode(
        &self,
        layer: usize,
        l: &WireLayout,
        n: usize,
        k: &[u8],
        v: &[u8],
    ) -> Result<(u8, Vec<u8>), codec::CodecError> {
        let (id, spec) = self.layer(layer);
        let p = match spec {
            Some(s) if Some(s) != QuantSpec::of(id) => codec::encode_quant(&s, l, n, k, v)?,
            _ => codec::encode(id, l, n, k, v)?,
        };
        Ok((id, p))
    }

    fn decode(&self, f: &Frame, l: &WireLayout) -> Result<(Vec<u8>, Vec<u8>), codec::CodecError> {
        let n = (f.end - f.start) as usize;
        let (id, spec) = self.layer(f.layer as usize);
        if id != f.codec {
            return Err(codec::CodecError::Unknown(f.codec));
        }
        match spec {
            Some(s) if Some(s) != QuantSpec::of(id) => codec::decode_quant(&s, l, n, &f.payload),
            _ => codec::decode(f.codec, l, n, &f.payload),
        }
    }
}

#[derive(Default)]
struct Acc {
    stream_bytes: usize,
    payload_bytes: usize,
    positions: usize,
    top1: usize,
    answers: usize,
    correct: usize,
    kl_sum: f64,
    kl_max: f64,
    max_abs_err: f64,
    identical: bool,
    encode_s: f64,
    decode_s: f64,
}

fn f16_bytes(xs: &[f16]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_of(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(p ‖ q) of two logit rows.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

fn subjects(dir: &Path) -> Result<usize, CodecsError> {
    let dev = dir.join("mmlu").join("dev");
    let n = std::fs::read_dir(&dev)
        .map_err(|e| CodecsError::Config(format!("{}: {e}", dev.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with("_dev.csv"))
        .count();
    if n == 0 {
        return Err(CodecsError::Config(format!(
            "{}: no *_dev.csv files",
            dev.display()
        )));
    }
    Ok(n)
}

fn forward(
    model: &Model,
    kv: &mut ContiguousKv,
    seq: usize,
    tokens: &[u32],
    logits: LogitsFor,
) -> Result<Vec<f32>, ModelError> {
    let mut out = Vec::new();
    let chunks: Vec<&[u32]> = tokens.chunks(512).collect();
    for (i, c) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let pos = kv.seq_len(seq);
        let lf = match logits {
            LogitsFor::Last if !last => LogitsFor::None,
            other => other,
        };
        out.extend(model.forward(
            &[BatchSeq {
                seq,
                tokens: c,
                pos,
                logits: lf,
            }],
            kv,
        )?);
    }
    Ok(out)
}

/// Runs the benchmark; `progress(done, total)` after each question.
pub fn run(
    model: &Model,
    tok: &Tokenizer,
    cfg: &CodecsConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<CodecRecord>, CodecsError> {
    if cfg.questions == 0 || cfg.cont_tokens == 0 || cfg.frame_tokens == 0 {
        return Err(CodecsError::Config(
            "--questions, the continuation and --frame-tokens must be at least 1".into(),
        ));
    }
    let schemes = cfg
        .codecs
        .iter()
        .map(|c| Scheme::parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    if schemes.is_empty() {
        return Err(CodecsError::Config("no codec given".into()));
    }
    let n_subj = subjects(&cfg.datasets)?.min(cfg.questions);
    let work = Workload::mmlu(&cfg.datasets, n_subj)?;
    let enc = |s: &str| {
        tok.encode(s, false)
            .map_err(|e| CodecsError::Config(e.to_string()))
    };
    let mut letters = Vec::new();
    for l in [" A", " B", " C", " D"] {
        match enc(l)?.as_slice() {
            [t] => letters.push(*t as usize),
            other => {
                return Err(CodecsError::Config(format!(
                    "'{l}' is {} tokens in this tokenizer, not one",
                    other.len()
                )))
            }
        }
    }
    // Question i: subject i % n_subj, its (i / n_subj)-th test question.
    let mut per_subject: Vec<Vec<usize>> = vec![Vec::new(); n_subj];
    for i in 0..cfg.questions {
        per_subject[i % n_subj].push(i / n_subj);
    }
    let answers = read_answers(&cfg.datasets, n_subj)?;
    let shape = model.attn_shape();
    let layout = WireLayout {
        n_layer: shape.n_layer as u32,
        n_head_kv: shape.n_head_kv as u32,
        head_dim: shape.head_dim as u32,
        block_tokens: cfg.block_tokens as u32,
        dtype: KvDtype::F16,
    };
    layout
        .check()
        .map_err(|e| CodecsError::Config(e.to_string()))?;
    let identity = ContentIdentity::of(model, tok).digest();
    let w = shape.kv_width();
    let mut accs: Vec<Acc> = schemes
        .iter()
        .map(|_| Acc {
            identical: true,
            ..Acc::default()
        })
        .collect();
    let (mut prompt_tokens, mut exact_correct, mut done) = (0, 0, 0);
    for (s, qs) in per_subject.iter().enumerate() {
        let prefix = enc(&work.cloud_texts[s])?;
        if prefix.is_empty() {
            return Err(CodecsError::Config("a cloud prompt has no tokens".into()));
        }
        let p = prefix.len();
        prompt_tokens += p;
        let max_len = p + 8192;
        let mut exact = ContiguousKv::new(shape, max_len);
        let seq = exact.add_seq();
        forward(model, &mut exact, seq, &prefix, LogitsFor::None)?;
        let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..shape.n_layer)
            .map(|l| {
                let (k, v) = exact.rows(seq, l).expect("the sequence exists");
                (f16_bytes(k), f16_bytes(v))
            })
            .collect();
        // Each scheme: the whole stream encoded, parsed, decoded into a KV of its own.
        let mut decoded = Vec::with_capacity(schemes.len());
        for (sc, acc) in schemes.iter().zip(accs.iter_mut()) {
            let cerr = |what: String| CodecsError::Codec {
                scheme: sc.name.clone(),
                what,
            };
            let t0 = Instant::now();
            let header = KvHeader::new(identity, layout, prefix.clone());
            let mut stream = header.encode();
            for (l, (k, v)) in rows.iter().enumerate() {
                for s0 in (0..p).step_by(cfg.frame_tokens) {
                    let s1 = (s0 + cfg.frame_tokens).min(p);
                    let (id, payload) = sc
                        .encode(
                            l,
                            &layout,
                            s1 - s0,
                            &k[s0 * w * 2..s1 * w * 2],
                            &v[s0 * w * 2..s1 * w * 2],
                        )
                        .map_err(|e| cerr(e.to_string()))?;
                    acc.payload_bytes += payload.len();
                    Frame::new(l as u32, s0 as u32, s1 as u32, KvDtype::F16, id, payload)
                        .encode_into(&mut stream);
                }
            }
            acc.encode_s += t0.elapsed().as_secs_f64();
            acc.stream_bytes += stream.len();
            let t1 = Instant::now();
            let mut reader = StreamReader::new();
            reader.push(&stream);
            let mut kv = ContiguousKv::new(shape, max_len);
            let dseq = kv.add_seq();
            let mut dec_rows: Vec<(Vec<u8>, Vec<u8>)> = vec![Default::default(); shape.n_layer];
            while let Some(item) = reader.next_item().map_err(|e| cerr(e.to_string()))? {
                if let Item::Frame(f) = item {
                    let (k, v) = sc.decode(&f, &layout).map_err(|e| cerr(e.to_string()))?;
                    let l = f.layer as usize;
                    kv.push_rows(dseq, l, &f16_of(&k), &f16_of(&v))?;
                    dec_rows[l].0.extend_from_slice(&k);
                    dec_rows[l].1.extend_from_slice(&v);
                }
            }
            acc.decode_s += t1.elapsed().as_secs_f64();
            if kv.seq_len(dseq) != p || reader.pending_bytes() != 0 {
                return Err(cerr(format!(
                    "the decoded stream holds {} of {p} tokens",
                    kv.seq_len(dseq)
                )));
            }
            let same = dec_rows == rows;
            acc.identical &= same;
            for ((k, v), (dk, dv)) in rows.iter().zip(&dec_rows) {
                for (a, b) in f16_of(k)
                    .iter()
                    .chain(&f16_of(v))
                    .zip(f16_of(dk).iter().chain(&f16_of(dv)))
                {
                    acc.max_abs_err = acc.max_abs_err.max((a.to_f32() - b.to_f32()).abs() as f64);
                }
            }
            decoded.push((kv, dseq, same));
        }
        for &qi in qs {
            let items = &work.questions[s];
            let q = enc(&items[qi % items.len()])?;
            let truth = answers[s][qi % items.len()];
            // Exact KV: greedy answer and continuation.
            exact.truncate(seq, p);
            let mut logits = vec![forward(model, &mut exact, seq, &q, LogitsFor::Last)?];
            let mut cont = Vec::with_capacity(cfg.cont_tokens);
            loop {
                let next = argmax(logits.last().expect("one row")) as u32;
                cont.push(next);
                if cont.len() == cfg.cont_tokens {
                    break;
                }
                logits.push(forward(model, &mut exact, seq, &[next], LogitsFor::Last)?);
            }
            let letter = |row: &[f32]| {
                (0..4)
                    .max_by(|&a, &b| row[letters[a]].total_cmp(&row[letters[b]]))
                    .unwrap_or(0)
            };
            let exact_letter = letter(&logits[0]);
            exact_correct += usize::from(exact_letter == truth);
            let n_vocab = model.cfg.n_vocab;
            for ((kv, dseq, same), acc) in decoded.iter_mut().zip(accs.iter_mut()) {
                let rows_c: Vec<Vec<f32>> = if *same {
                    logits.clone()
                } else {
                    kv.truncate(*dseq, p);
                    let mut toks = q.clone();
                    toks.extend_from_slice(&cont[..cont.len() - 1]);
                    let all = forward(model, kv, *dseq, &toks, LogitsFor::All)?;
                    all[(toks.len() - cont.len()) * n_vocab..]
                        .chunks(n_vocab)
                        .map(<[f32]>::to_vec)
                        .collect()
                };
                for (i, (e, c)) in logits.iter().zip(&rows_c).enumerate() {
                    acc.positions += 1;
                    acc.top1 += usize::from(argmax(c) as u32 == cont[i]);
                    let d = kl(e, c);
                    acc.kl_sum += d;
                    acc.kl_max = acc.kl_max.max(d);
                }
                let l = letter(&rows_c[0]);
                acc.answers += usize::from(l == exact_letter);
                acc.correct += usize::from(l == truth);
            }
            done += 1;
            progress(done, cfg.questions);
        }
    }
    let f16_bpt = (2 * shape.n_layer * w * 2) as f64;
    let nq = cfg.questions as f64;
    let kv_mb = (prompt_tokens as f64 * f16_bpt) / 1e6;
    Ok(schemes
        .iter()
        .zip(accs)
        .map(|(sc, a)| {
            let bpt = a.stream_bytes as f64 / prompt_tokens as f64;
            CodecRecord {
                codec: sc.name.clone(),
                questions: cfg.questions,
                subjects: n_subj,
                prompt_tokens,
                positions: a.positions,
                bytes_per_token: bpt,
                payload_bytes_per_token: a.payload_bytes as f64 / prompt_tokens as f64,
                f16_bytes_per_token: f16_bpt,
                compression_vs_f16: f16_bpt / bpt,
                top1_agreement: a.top1 as f64 / a.positions.max(1) as f64,
                answer_agreement: a.answers as f64 / nq,
                mean_kl: a.kl_sum / a.positions.max(1) as f64,
                max_kl: a.kl_max,
                accuracy: a.correct as f64 / nq,
                exact_accuracy: exact_correct as f64 / nq,
                max_abs_err: a.max_abs_err,
                kv_identical: a.identical,
                encode_mb_s: kv_mb / a.encode_s.max(1e-9),
                decode_mb_s: kv_mb / a.decode_s.max(1e-9),
                frame_tokens: cfg.frame_tokens,
                cont_tokens: cfg.cont_tokens,
                kv_dtype: "f16",
            }
        })
        .collect())
}

/// Per subject, the answer letter (0..4) of each test question.
fn read_answers(dir: &Path, n: usize) -> Result<Vec<Vec<usize>>, CodecsError> {
    let dev = dir.join("mmlu").join("dev");
    let mut subjects: Vec<String> = std::fs::read_dir(&dev)
        .map_err(|e| CodecsError::Config(format!("{}: {e}", dev.display())))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix("_dev.csv"))
                .map(str::to_string)
        })
        .collect();
    subjects.sort();
    subjects
        .iter()
        .take(n)
        .map(|s| {
            let path = dir.join("mmlu").join("test").join(format!("{s}_test.csv"));
            let mut r = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_path(&path)
                .map_err(|e| CodecsError::Config(format!("{}: {e}", path.display())))?;
            r.records()
                .map(|rec| {
                    let rec =
                        rec.map_err(|e| CodecsError::Config(format!("{}: {e}", path.display())))?;
                    Ok(match rec.get(5).map(str::trim) {
                        Some("A") => 0,
                        Some("B") => 1,
                        Some("C") => 2,
                        Some("D") => 3,
                        _ => usize::MAX,
                    })
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_names() {
        let s = Scheme::parse("int4+k64+v64+hi2+z9").unwrap();
        assert_eq!(s.base, codec::CODEC_INT4);
        let spec = s.spec.unwrap();
        assert_eq!((spec.k_group, spec.v_group, spec.zstd_level), (64, 64, 9));
        assert_eq!(s.layer(1).0, CODEC_INT8);
        assert_eq!(s.layer(1).1.unwrap().k_group, 32);
        assert_eq!(s.layer(2).0, codec::CODEC_INT4);
        assert!(Scheme::parse("raw+k64").is_err());
        assert!(Scheme::parse("int5").is_err());
        assert!(Scheme::parse("int4+q3").is_err());
        assert!(Scheme::parse("int4+k0").is_err());
        assert_eq!(Scheme::parse("raw").unwrap().layer(0), (CODEC_RAW, None));
    }

    #[test]
    fn kl_of_equal_rows_is_zero() {
        let a = [1.0f32, 2.0, 3.0];
        assert!(kl(&a, &a).abs() < 1e-12);
        assert!(kl(&a, &[3.0, 2.0, 1.0]) > 0.1);
    }
}
