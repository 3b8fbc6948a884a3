//! `bench batch`: the paper's non-interactive scenario. A batch of requests arrives at once; each
//! request is one of `groups` cloud prompts of exactly `prefix_tokens` tokens followed by its own
//! question, and generates `gen` tokens greedily. Cloud prompts are MMLU 5-shot prompts (one subject per
//! group, dev examples cut or repeated to the exact length), questions come from the MMLU test split;
//! without a datasets directory both are generated text. The engine runs prompts first, then decode
//! steps; `decode_tok_s = batch × (gen − 1) / time of the decode steps`. Each point is the median of
//! `reps` runs, interleaved over points and modes, the modes' order rotating from rep to rep; every
//! run uses a fresh engine (no cache carried over).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ep_engine::{AttnMode, Engine, EngineConfig, EngineError, Request};
use ep_model::generate::GenerateParams;
use ep_model::sampling::SamplingParams;
use ep_model::tokenizer::Tokenizer;
use ep_model::Model;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::median;

/// Attention modes the engine offers.
pub const MODES: &[&str] = &["paged", "relay", "splice"];

/// Errors of the batch benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{path}: {what}")]
    Dataset { path: PathBuf, what: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// One measured point.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub mode: String,
    pub prefix_tokens: usize,
    pub batch: usize,
    pub groups: usize,
    pub gen_tokens: usize,
    /// batch × (gen − 1) / seconds spent in decode steps (median over runs).
    pub decode_tok_s: f64,
    /// Requests completed per second of the whole run, prompts included (median).
    pub requests_per_s: f64,
    /// Mean duration of one decode step (median over runs).
    pub step_ms: f64,
    /// Seconds from submission until every prompt was processed (median).
    pub prefill_s: f64,
    /// SHA-256 over every request's generated token ids (u32 little-endian), in request order.
    pub outputs_sha256: String,
    pub decode_runs: Vec<f64>,
    pub kv_dtype: String,
    pub threads: usize,
    /// Where the prompts came from: `mmlu` or `generated`.
    pub prompts: &'static str,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    pub modes: Vec<String>,
    pub prefix_tokens: Vec<usize>,
    pub batches: Vec<usize>,
    pub groups: Vec<usize>,
    pub gen: usize,
    pub reps: usize,
    pub datasets: Option<PathBuf>,
    pub engine: EngineConfig,
    pub threads: usize,
}

/// The text of the workload: cloud prompts (one per group) and questions.
pub struct Workload {
    pub source: &'static str,
    /// Per group: the cloud prompt's text (to be cut or repeated to length).
    pub cloud_texts: Vec<String>,
    /// Per group: questions.
    pub questions: Vec<Vec<String>>,
    /// Per group: each question's answer letter (MMLU only; empty for generated text).
    pub answers: Vec<Vec<String>>,
}

fn read_csv(path: &Path) -> Result<Vec<Vec<String>>, BatchError> {
    let err = |what: String| BatchError::Dataset {
        path: path.to_path_buf(),
        what,
    };
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .map_err(|e| err(e.to_string()))?;
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| err(e.to_string()))?;
        if rec.len() != 6 {
            return Err(err(format!(
                "row with {} columns (expected question, A, B, C, D, answer)",
                rec.len()
            )));
        }
        rows.push(rec.iter().map(str::to_string).collect());
    }
    if rows.is_empty() {
        return Err(err("no rows".into()));
    }
    Ok(rows)
}

fn mmlu_item(row: &[String], with_answer: bool) -> String {
    let mut s = format!(
        "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
        row[0], row[1], row[2], row[3], row[4]
    );
    if with_answer {
        s.push(' ');
        s.push_str(&row[5]);
        s.push_str("\n\n");
    }
    s
}

impl Workload {
    /// MMLU from `dir/mmlu/{dev,test}`: the first `groups` subjects in name order.
    pub fn mmlu(dir: &Path, groups: usize) -> Result<Self, BatchError> {
        let dev = dir.join("mmlu").join("dev");
        let mut subjects: Vec<String> = std::fs::read_dir(&dev)
            .map_err(|e| BatchError::Dataset {
                path: dev.clone(),
                what: e.to_string(),
            })?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix("_dev.csv"))
                    .map(str::to_string)
            })
            .collect();
        subjects.sort();
        if subjects.len() < groups {
            return Err(BatchError::Dataset {
                path: dev,
                what: format!("{} subjects, {groups} groups asked", subjects.len()),
            });
        }
        let mut cloud_texts = Vec::new();
        let mut questions = Vec::new();
        let mut answers = Vec::new();
        for s in &subjects[..groups] {
            let rows = read_csv(&dev.join(format!("{s}_dev.csv")))?;
            let mut text = format!(
                "The following are multiple choice questions (with answers) about {}.\n\n",
                s.replace('_', " ")
            );
            for r in &rows {
                text.push_str(&mmlu_item(r, true));
            }
            cloud_texts.push(text);
            let test = dir.join("mmlu").join("test").join(format!("{s}_test.csv"));
            let rows = read_csv(&test)?;
            questions.push(rows.iter().map(|r| mmlu_item(r, false)).collect());
            answers.push(rows.iter().map(|r| r[5].trim().to_string()).collect());
        }
        Ok(Self {
            source: "mmlu",
            cloud_texts,
            questions,
            answers,
        })
    }

    /// Generated text, for machines without the datasets.
    pub fn generated(groups: usize) -> Self {
        let words = [
            "edge", "cloud", "prompt", "cache", "token", "layer", "signal", "network", "tower",
            "packet", "route", "answer", "model", "branch", "office", "link",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut word = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            words[(x % words.len() as u64) as usize]
        };
        let mut cloud_texts = Vec::new();
        let mut questions = Vec::new();
        for g in 0..groups {
            let mut t = format!("Instructions for deployment {g}.\n");
            for i in 0..200 {
                t.push_str(&format!(
                    "Rule {i}: the {} {} {}.\n",
                    word(),
                    word(),
                    word()
                ));
            }
            cloud_texts.push(t);
            questions.push(
                (0..64)
                    .map(|i| format!("Question {i}: which {} serves the {}?", word(), word()))
                    .collect(),
            );
        }
        Self {
            source: "generated",
            cloud_texts,
            questions,
            answers: Vec::new(),
        }
    }

    /// Cloud prompt `g` as exactly `n` tokens (its text cut, or repeated until long enough).
    pub fn cloud_tokens(
        &self,
        tok: &Tokenizer,
        g: usize,
        n: usize,
    ) -> Result<Vec<u32>, BatchError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let unit = tok
            .encode(&self.cloud_texts[g], false)
            .map_err(|e| BatchError::Config(e.to_string()))?;
        if unit.is_empty() {
            return Err(BatchError::Config(
                "a cloud prompt tokenised to nothing".into(),
            ));
        }
        Ok(unit.iter().copied().cycle().take(n).collect())
    }
}

/// The datasets directory: the flag, else `$EDGEPROMPT_DATASETS`, else `../shared/datasets` if it
/// exists.
pub fn datasets_dir(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os("EDGEPROMPT_DATASETS").map(PathBuf::from))
        .or_else(|| {
            let p = PathBuf::from("../shared/datasets");
            p.is_dir().then_some(p)
        })
}

struct Run {
    decode_tok_s: f64,
    requests_per_s: f64,
    step_ms: f64,
    prefill_s: f64,
    sha: String,
}

fn run_point(
    model: &Arc<Model>,
    tok: &Arc<Tokenizer>,
    cfg: &BatchConfig,
    mode: &str,
    prompts: &[(Vec<u32>, usize)],
    pool: Option<Arc<rayon::ThreadPool>>,
) -> Result<Run, BatchError> {
    let attn_mode: AttnMode = mode.parse().map_err(BatchError::Config)?;
    let engine_cfg = EngineConfig {
        prefill_first: true,
        attn_mode,
        // The outputs are read one request after another: none may pause for its reader.
        max_unread_events: 0,
        ..cfg.engine.clone()
    };
    let engine = Engine::start(model.clone(), tok.clone(), engine_cfg, pool)?;
    let params = GenerateParams {
        max_tokens: cfg.gen,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let t0 = Instant::now();
    let streams = prompts
        .iter()
        .map(|(p, public)| {
            engine.submit(Request {
                public_prefix: *public,
                ..Request::new(p.clone(), params.clone())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut sha = Sha256::new();
    for s in streams {
        let out = s.collect_blocking()?;
        if out.tokens.len() != cfg.gen {
            return Err(BatchError::Config(format!(
                "a request generated {} tokens, {} expected (KV budget too small?)",
                out.tokens.len(),
                cfg.gen
            )));
        }
        for t in out.tokens {
            sha.update(t.to_le_bytes());
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let steps = engine.take_step_stats();
    let decode: Vec<_> = steps
        .iter()
        .filter(|s| s.prefill_tokens == 0 && s.decode_tokens > 0)
        .collect();
    let decode_secs: f64 = decode.iter().map(|s| s.secs).sum();
    let prefill_s: f64 = steps
        .iter()
        .filter(|s| s.prefill_tokens > 0)
        .map(|s| s.secs)
        .sum();
    let b = prompts.len();
    Ok(Run {
        decode_tok_s: (b * (cfg.gen - 1)) as f64 / decode_secs.max(1e-9),
        requests_per_s: b as f64 / wall,
        step_ms: 1e3 * decode_secs / decode.len().max(1) as f64,
        prefill_s,
        sha: sha.finalize().iter().map(|x| format!("{x:02x}")).collect(),
    })
}

/// Runs every point; `progress(done, total)` after each run.
pub fn run(
    model: &Arc<Model>,
    tok: &Arc<Tokenizer>,
    cfg: &BatchConfig,
    pool: Option<Arc<rayon::ThreadPool>>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Record>, BatchError> {
    for m in &cfg.modes {
        if !MODES.contains(&m.as_str()) {
            return Err(BatchError::Config(format!(
                "unknown mode '{m}' (available: {})",
                MODES.join(", ")
            )));
        }
    }
    if cfg.gen < 2 || cfg.reps == 0 {
        return Err(BatchError::Config(
            "--gen must be at least 2 and --reps at least 1".into(),
        ));
    }
    let max_groups = cfg.groups.iter().copied().max().unwrap_or(1);
    let work = match &cfg.datasets {
        Some(d) => Workload::mmlu(d, max_groups)?,
        None => Workload::generated(max_groups),
    };
    // Points: (prefix, batch, groups) with the requests' prompts.
    let mut points = Vec::new();
    for &p in &cfg.prefix_tokens {
        for &b in &cfg.batches {
            for &g in &cfg.groups {
                if g == 0 || b == 0 {
                    return Err(BatchError::Config(
                        "batch sizes and groups must be at least 1".into(),
                    ));
                }
                if b % g != 0 {
                    // e.g. batch 1 with 8 groups: not a point of the grid.
                    tracing::info!(
                        batch = b,
                        groups = g,
                        "skipped: the batch does not split evenly"
                    );
                    continue;
                }
                let clouds = (0..g)
                    .map(|gi| work.cloud_tokens(tok, gi, p))
                    .collect::<Result<Vec<_>, _>>()?;
                let per = b / g;
                let mut prompts = Vec::with_capacity(b);
                for i in 0..b {
                    let gi = i / per;
                    let qs = &work.questions[gi];
                    let q = &qs[(i % per) % qs.len()];
                    let mut ids = clouds[gi].clone();
                    ids.extend(
                        tok.encode(q, false)
                            .map_err(|e| BatchError::Config(e.to_string()))?,
                    );
                    prompts.push((ids, p));
                }
                points.push((p, b, g, prompts));
            }
        }
    }
    if points.is_empty() {
        return Err(BatchError::Config(
            "no point: no batch size splits evenly over the groups".into(),
        ));
    }
    let total = cfg.reps * points.len() * cfg.modes.len();
    let mut runs: Vec<Vec<Vec<Run>>> = (0..points.len())
        .map(|_| (0..cfg.modes.len()).map(|_| Vec::new()).collect())
        .collect();
    let mut done = 0;
    // The modes' order rotates from one rep to the next: on a shared machine the mode measured first
    // at a point can see another machine state than the one after it (measured: ±30% on the ratio).
    let nm = cfg.modes.len();
    for rep in 0..cfg.reps {
        for (pi, pt) in points.iter().enumerate() {
            for k in 0..nm {
                let mi = (k + rep) % nm;
                let run = run_point(model, tok, cfg, &cfg.modes[mi], &pt.3, pool.clone())?;
                runs[pi][mi].push(run);
                done += 1;
                progress(done, total);
            }
        }
    }
    let mut out = Vec::new();
    for (pi, (p, b, g, _)) in points.iter().enumerate() {
        if runs[pi].iter().any(|r| r[0].sha != runs[pi][0][0].sha) {
            tracing::warn!(
                prefix = p,
                batch = b,
                groups = g,
                "outputs differ between modes"
            );
        }
        for (mi, mode) in cfg.modes.iter().enumerate() {
            let rs = &runs[pi][mi];
            let sha = rs[0].sha.clone();
            if rs.iter().any(|r| r.sha != sha) {
                tracing::warn!(
                    mode,
                    prefix = p,
                    batch = b,
                    "outputs differ between repetitions"
                );
            }
            out.push(Record {
                mode: mode.clone(),
                prefix_tokens: *p,
                batch: *b,
                groups: *g,
                gen_tokens: cfg.gen,
                decode_tok_s: median(rs.iter().map(|r| r.decode_tok_s).collect()),
                requests_per_s: median(rs.iter().map(|r| r.requests_per_s).collect()),
                step_ms: median(rs.iter().map(|r| r.step_ms).collect()),
                prefill_s: median(rs.iter().map(|r| r.prefill_s).collect()),
                outputs_sha256: sha,
                decode_runs: rs.iter().map(|r| r.decode_tok_s).collect(),
                kv_dtype: cfg.engine.kv_dtype.name().to_string(),
                threads: cfg.threads,
                prompts: work.source,
            });
        }
    }
    Ok(out)
}
