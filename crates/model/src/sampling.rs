//! Token sampling and stop-string matching.
//!
//! The sampler follows the semantics of llama.cpp's default sampler chain (`common/sampling.cpp`
//! with the samplers from `src/llama-sampler.cpp`), restricted to the stages EdgePrompt supports:
//!
//! 1. **penalties** — repeat / frequency / presence penalties over the last `repeat_last_n`
//!    tokens of the history;
//! 2. **top-k** — keep the `top_k` highest logits;
//! 3. **top-p** — keep the smallest prefix (by descending probability) whose cumulative
//!    probability reaches `top_p`;
//! 4. **min-p** — keep the tokens whose probability is at least `min_p` times that of the most
//!    likely token;
//! 5. **temperature** — divide the surviving logits by `temperature`;
//! 6. **draw** — sample one token from the softmax of what is left.
//!
//! A temperature `<= 0` selects greedy decoding: penalties are still applied (as in llama.cpp),
//! then the highest logit wins, the lowest token id on ties. No randomness is consumed.
//!
//! Differences from llama.cpp that are deliberate: ties between equal logits are always broken
//! in favour of the lower token id (llama.cpp leaves their order unspecified), NaN logits are
//! treated as `-inf`, and probabilities are accumulated in `f64`.
//!
//! # Reproducibility
//!
//! The random draws use [`rand::rngs::StdRng`] seeded with [`SamplingParams::seed`]. For a given
//! seed, parameters and sequence of `sample` calls the output is deterministic **within one
//! build**; `StdRng`'s algorithm is not guaranteed to stay the same across `rand` versions, so a
//! seed is not a portable, long-term reproducibility key.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Invalid sampling configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter has a value outside its domain.
    #[error("invalid sampling parameter `{field}` = {value}: {reason}")]
    InvalidParam {
        /// Name of the offending [`SamplingParams`] field.
        field: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// What the value must satisfy.
        reason: &'static str,
    },
}

/// Sampling configuration. Field semantics follow llama.cpp.
///
/// Missing fields deserialize to their [`Default`] values.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` means greedy decoding (argmax, lowest id on ties).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables.
    pub top_k: usize,
    /// Nucleus sampling threshold in `[0, 1]`; `1.0` disables, `0.0` keeps only the top token.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in `[0, 1]`; `0.0` disables.
    pub min_p: f32,
    /// Repetition penalty (`> 0`); `1.0` disables. A penalised logit `l` becomes `l / p` when
    /// `l > 0` and `l * p` otherwise.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the penalties look at; `0` disables all three
    /// penalties, `usize::MAX` means the whole history.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token that occurs in the window; `0` disables.
    pub presence_penalty: f32,
    /// Subtracted `count` times from the logit of every token occurring `count` times in the
    /// window; `0` disables.
    pub frequency_penalty: f32,
    /// Seed of the random generator (see the module docs on reproducibility).
    pub seed: u64,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, penalties off
    /// (window 64), seed 0.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, every filter and penalty disabled.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field; the error names the first offending field.
    pub fn validate(&self) -> Result<(), SamplingError> {
        fn bad(field: &'static str, value: f32, reason: &'static str) -> SamplingError {
            SamplingError::InvalidParam {
                field,
                value: value.to_string(),
                reason,
            }
        }
        if !self.temperature.is_finite() {
            return Err(bad("temperature", self.temperature, "must be finite"));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(bad("top_p", self.top_p, "must be in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad("min_p", self.min_p, "must be in [0, 1]"));
        }
        let rp = self.repeat_penalty;
        if !rp.is_finite() || rp <= 0.0 || !(1.0 / rp).is_finite() {
            return Err(bad(
                "repeat_penalty",
                rp,
                "must be finite and greater than 0 (1.0 disables)",
            ));
        }
        if !self.presence_penalty.is_finite() {
            return Err(bad(
                "presence_penalty",
                self.presence_penalty,
                "must be finite",
            ));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(bad(
                "frequency_penalty",
                self.frequency_penalty,
                "must be finite",
            ));
        }
        Ok(())
    }

    fn penalties_enabled(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

/// The penalised value of `logit` for a token seen `count > 0` times in the window.
fn penalize(logit: f32, count: u32, p: &SamplingParams) -> f32 {
    let l = if logit <= 0.0 {
        logit * p.repeat_penalty
    } else {
        logit / p.repeat_penalty
    };
    l - count as f32 * p.frequency_penalty - p.presence_penalty
}

/// Fills `scratch` with the window's tokens and calls `f(token, count)` once per distinct token.
fn for_each_count(
    history: &[u32],
    last_n: usize,
    scratch: &mut Vec<u32>,
    mut f: impl FnMut(u32, u32),
) {
    let window = &history[history.len().saturating_sub(last_n)..];
    scratch.clear();
    scratch.extend_from_slice(window);
    scratch.sort_unstable();
    for run in scratch.chunk_by(|a, b| a == b) {
        f(run[0], run.len() as u32);
    }
}

/// Applies the repeat / frequency / presence penalties of `params` to `logits` in place, exactly
/// as [`Sampler::sample`] does before filtering. For every distinct token `t` occurring `c`
/// times in the last `repeat_last_n` entries of `history` (ids outside `logits` are ignored):
///
/// ```text
/// l = logits[t];
/// l = if l <= 0 { l * repeat_penalty } else { l / repeat_penalty };
/// logits[t] = l - c * frequency_penalty - presence_penalty;
/// ```
///
/// Nothing changes when the penalties are disabled (`repeat_last_n == 0`, or
/// `repeat_penalty == 1`, `frequency_penalty == 0` and `presence_penalty == 0`).
pub fn apply_penalties(logits: &mut [f32], history: &[u32], params: &SamplingParams) {
    if !params.penalties_enabled() {
        return;
    }
    let mut scratch = Vec::new();
    for_each_count(history, params.repeat_last_n, &mut scratch, |t, c| {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = penalize(*l, c, params);
        }
    });
}

#[derive(Clone, Copy, Debug)]
struct Cand {
    id: u32,
    logit: f32,
}

/// Integer sort key: ascending key = descending logit, then ascending id. Equal logits
/// (including `-0.0` vs `+0.0`) give equal high halves. Logits are never NaN here (sanitised on
/// entry). Integer comparisons make selection and sorting of a large vocabulary cheap.
#[inline]
fn sort_key(c: &Cand) -> u64 {
    let bits = (c.logit + 0.0).to_bits(); // `+ 0.0` maps -0.0 to +0.0
                                          // Monotone map f32 -> u32 (IEEE total order for non-NaN values).
    let ordered = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(!ordered) << 32) | u64::from(c.id)
}

/// Descending logit, ascending id on ties.
#[inline]
fn cmp_desc(a: &Cand, b: &Cand) -> Ordering {
    sort_key(a).cmp(&sort_key(b))
}

/// Above this `k`, top-k uses linear-time selection instead of a bounded heap.
const TOP_K_HEAP_MAX: usize = 1024;

/// Reduces `cands` (in id order, so `cands[id].id == id`) to its `k` best entries, sorted.
/// `1 <= k < cands.len()`.
fn top_k_sorted(cands: &mut Vec<Cand>, k: usize) {
    if k <= TOP_K_HEAP_MAX {
        // Bounded max-heap of the k best keys: O(n log k), and most candidates are rejected by
        // a single comparison against the current worst.
        let mut heap: BinaryHeap<u64> = BinaryHeap::with_capacity(k);
        for c in cands.iter() {
            let key = sort_key(c);
            if heap.len() < k {
                heap.push(key);
            } else if let Some(mut worst) = heap.peek_mut() {
                if key < *worst {
                    *worst = key;
                }
            }
        }
        let best: Vec<Cand> = heap
            .into_sorted_vec()
            .into_iter()
            .map(|key| cands[(key & 0xffff_ffff) as usize])
            .collect();
        *cands = best;
    } else {
        cands.select_nth_unstable_by(k - 1, cmp_desc);
        cands.truncate(k);
        cands.sort_unstable_by(cmp_desc);
    }
}

/// Maximum logit of a non-empty candidate list.
fn max_logit(c: &[Cand]) -> f32 {
    c.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.logit))
}

/// Unnormalised softmax weight of `logit` at temperature `temp` given the maximum `max`.
///
/// Handles the infinite cases as the limits they stand for: when some logit is `+inf` the mass
/// is spread evenly over the `+inf` logits; when every logit is `-inf` they are all equal, so
/// the distribution is uniform.
#[inline]
fn weight(logit: f32, max: f32, temp: f64) -> f64 {
    if max.is_finite() {
        ((f64::from(logit) - f64::from(max)) / temp).exp()
    } else if logit == max {
        1.0
    } else {
        0.0
    }
}

/// Size of the first partial sort in the top-p stage when the candidates are not sorted yet
/// (llama.cpp's adaptive heuristic): most of the mass usually sits in the first few hundred.
const TOP_P_PARTIAL: usize = 256;

/// A stateful sampler: owns the random generator and scratch buffers.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    cands: Vec<Cand>,
    weights: Vec<f64>,
    scratch: Vec<u32>,
}

impl Sampler {
    /// Validates `params` and seeds the generator with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            cands: Vec::new(),
            weights: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    fn greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Chooses the next token from `logits` (one per vocabulary entry).
    ///
    /// `history` holds all tokens so far (prompt + generated); the penalties look at its last
    /// `repeat_last_n` entries. Deterministic for a given seed and sequence of calls. Each
    /// non-greedy call consumes exactly one random number; greedy calls consume none.
    ///
    /// # Panics
    /// If `logits` is empty or has more than `u32::MAX` entries.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.prepare(logits, history);
        if self.greedy() {
            // The filters never remove the top token, so greedy = argmax after the penalties.
            // Candidates are in id order here, so the first maximum has the lowest id.
            return argmax_cands(&self.cands);
        }
        self.filter();
        let r: f64 = self.rng.gen();
        let cands = &self.cands;
        let temp = f64::from(self.params.temperature);
        let max = max_logit(cands);
        self.weights.clear();
        self.weights
            .extend(cands.iter().map(|c| weight(c.logit, max, temp)));
        let total: f64 = self.weights.iter().sum();
        let target = r * total;
        let mut cum = 0.0;
        let mut last_positive = cands[0].id;
        for (c, &w) in cands.iter().zip(&self.weights) {
            if w > 0.0 {
                cum += w;
                last_positive = c.id;
                if cum > target {
                    return c.id;
                }
            }
        }
        // Only reachable through rounding (r * total ~ total).
        last_positive
    }

    /// The distribution `sample` would draw from for these inputs: the tokens surviving the
    /// penalties and filters with their final probabilities (after temperature), sorted by
    /// descending probability, ties by lower id. Consumes no randomness. In greedy mode this is
    /// the single argmax token with probability 1.
    ///
    /// # Panics
    /// If `logits` is empty or has more than `u32::MAX` entries.
    pub fn distribution(&mut self, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
        self.prepare(logits, history);
        if self.greedy() {
            let best = argmax_cands(&self.cands);
            return vec![(best, 1.0)];
        }
        self.filter();
        let temp = f64::from(self.params.temperature);
        let max = max_logit(&self.cands);
        let total: f64 = self.cands.iter().map(|c| weight(c.logit, max, temp)).sum();
        let mut out: Vec<(u32, f32)> = self
            .cands
            .iter()
            .map(|c| (c.id, (weight(c.logit, max, temp) / total) as f32))
            .collect();
        out.sort_by(|a, b| {
            b.1.partial_cmp(&a.1)
                .unwrap_or(Ordering::Equal)
                .then(a.0.cmp(&b.0))
        });
        out
    }

    /// Loads the candidates (NaN → -inf) in id order and applies the penalties.
    fn prepare(&mut self, logits: &[f32], history: &[u32]) {
        assert!(!logits.is_empty(), "cannot sample from empty logits");
        assert!(
            u32::try_from(logits.len()).is_ok(),
            "vocabulary larger than u32::MAX"
        );
        self.cands.clear();
        self.cands
            .extend(logits.iter().enumerate().map(|(i, &l)| Cand {
                id: i as u32,
                logit: if l.is_nan() { f32::NEG_INFINITY } else { l },
            }));
        if self.params.penalties_enabled() {
            let (cands, params) = (&mut self.cands, &self.params);
            for_each_count(history, params.repeat_last_n, &mut self.scratch, |t, c| {
                if let Some(cand) = cands.get_mut(t as usize) {
                    cand.logit = penalize(cand.logit, c, params);
                }
            });
        }
    }

    /// top-k → top-p → min-p on the candidate list. Never leaves it empty.
    fn filter(&mut self) {
        let p = &self.params;
        let cands = &mut self.cands;
        let mut sorted = false;

        // top-k: never sorts the whole vocabulary, only the k survivors.
        if p.top_k > 0 && p.top_k < cands.len() {
            top_k_sorted(cands, p.top_k);
            sorted = true;
        }

        // top-p: keep the shortest descending prefix whose mass reaches top_p.
        if p.top_p < 1.0 && cands.len() > 1 {
            let max = max_logit(cands);
            let total: f64 = cands.iter().map(|c| weight(c.logit, max, 1.0)).sum();
            let target = f64::from(p.top_p) * total;
            // Sort lazily: the next block of best candidates is selected (linear time) and
            // sorted only when the running sum needs it; blocks grow geometrically from
            // TOP_P_PARTIAL, so a peaked distribution touches only a few hundred tokens.
            let mut sorted_upto = if sorted { cands.len() } else { 0 };
            let mut cum = 0.0;
            let mut keep = cands.len();
            for i in 0..cands.len() {
                if i == sorted_upto {
                    let block = (2 * sorted_upto).max(TOP_P_PARTIAL);
                    let rest = &mut cands[sorted_upto..];
                    if block < rest.len() {
                        rest.select_nth_unstable_by(block - 1, cmp_desc);
                        rest[..block].sort_unstable_by(cmp_desc);
                        sorted_upto += block;
                    } else {
                        rest.sort_unstable_by(cmp_desc);
                        sorted_upto = cands.len();
                    }
                }
                cum += weight(cands[i].logit, max, 1.0);
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
        }

        // min-p: p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p).
        if p.min_p > 0.0 && cands.len() > 1 {
            let threshold = max_logit(cands) + p.min_p.ln();
            cands.retain(|c| c.logit >= threshold);
        }
    }
}

fn argmax_cands(c: &[Cand]) -> u32 {
    c.iter()
        .fold(c[0], |best, c| if c.logit > best.logit { *c } else { best })
        .id
}

/// Index of the largest logit; the lowest index on ties. NaN entries are ignored (an all-NaN
/// slice yields 0).
///
/// # Panics
/// If `logits` is empty.
pub fn argmax(logits: &[f32]) -> u32 {
    assert!(!logits.is_empty(), "argmax of empty logits");
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if l <= b => {}
            _ => best = Some((i, l)),
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// `log(softmax(logits))`, computed in `f64` and returned as `f32`.
///
/// NaN entries stay NaN and are excluded from the normalisation. Infinite maxima are treated as
/// limits: if some logits are `+inf` they share the mass equally (the rest get `-inf`); if all
/// non-NaN logits are `-inf` the result is uniform.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits
        .iter()
        .filter(|l| !l.is_nan())
        .fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
    if max.is_infinite() {
        let n_max = logits.iter().filter(|&&l| f64::from(l) == max).count() as f64;
        let lp = -n_max.ln();
        return logits
            .iter()
            .map(|&l| {
                if l.is_nan() {
                    f32::NAN
                } else if f64::from(l) == max {
                    lp as f32
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
    }
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| (f64::from(l) - max).exp())
        .sum();
    // (l - max) - ln(sum) rather than l - (max + ln(sum)): keeps precision for huge logits.
    let log_sum = sum.ln();
    logits
        .iter()
        .map(|&l| ((f64::from(l) - max) - log_sum) as f32)
        .collect()
}

/// The `n` largest logits as `(id, logit)`, sorted descending, ties by lower id; NaN entries
/// rank below everything. Does not sort the whole slice when `n` is small.
pub fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    fn cmp(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
        match (a.1.is_nan(), b.1.is_nan()) {
            (false, false) => b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal),
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (true, true) => Ordering::Equal,
        }
        .then(a.0.cmp(&b.0))
    }
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let mut v: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    if n < v.len() {
        v.select_nth_unstable_by(n - 1, cmp);
        v.truncate(n);
    }
    v.sort_unstable_by(cmp);
    v
}

/// Stop-string matcher for streamed text.
///
/// Text that could still turn out to be the beginning of a stop string is held back until it
/// is either completed (generation stops and the stop string is never emitted) or ruled out.
/// The result does not depend on how the text is split across [`push`](Self::push) calls: the
/// stream stops at the stop string that is *completed first*; if several complete at the same
/// position, the longest (earliest starting) one is cut. Since `push` takes `&str`, emitted
/// text always ends on a character boundary.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been found.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds newly decoded text. Returns the text that is safe to emit now and whether a stop
    /// string was found. On a stop, the text before it is emitted and the stop string and
    /// anything after it are dropped; later pushes return `("", true)`.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);

        // The stop completed first: minimal end, then minimal start (= longest).
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at + s.len(), at)))
            .min();
        if let Some((_, at)) = first {
            self.held.truncate(at);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }

        // Hold back the longest suffix that is a proper prefix of some stop string.
        let hold_from = self.hold_from();
        let rest = self.held.split_off(hold_from);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// Byte offset in `held` from which the text may still become a stop string.
    fn hold_from(&self) -> usize {
        let h = &self.held;
        let longest = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0);
        let start = h.len().saturating_sub(longest);
        (start..h.len())
            .filter(|&i| h.is_char_boundary(i))
            .find(|&i| {
                let tail = &h[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(h.len())
    }

    /// Ends the stream: returns the held-back text (empty after a stop) and resets the matcher
    /// for reuse with the same stop strings.
    pub fn finish(&mut self) -> String {
        self.stopped = false;
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_handles_infinities() {
        assert_eq!(weight(f32::INFINITY, f32::INFINITY, 1.0), 1.0);
        assert_eq!(weight(3.0, f32::INFINITY, 1.0), 0.0);
        assert_eq!(weight(f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0), 1.0);
        assert_eq!(weight(2.0, 2.0, 0.5), 1.0);
        assert_eq!(weight(f32::NEG_INFINITY, 2.0, 0.5), 0.0);
    }

    #[test]
    fn top_p_partial_sort_path_matches_full_sort() {
        // > TOP_P_PARTIAL candidates, flat enough that the nucleus needs more than 256 tokens,
        // so the lazy "sort the rest" branch runs.
        let logits: Vec<f32> = (0..3000)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
            .collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params.clone()).unwrap();
        s.prepare(&logits, &[]);
        s.filter();
        let got: Vec<u32> = s.cands.iter().map(|c| c.id).collect();

        let mut all: Vec<Cand> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| Cand {
                id: i as u32,
                logit: l,
            })
            .collect();
        all.sort_by(cmp_desc);
        let max = all[0].logit;
        let total: f64 = all.iter().map(|c| weight(c.logit, max, 1.0)).sum();
        let mut cum = 0.0;
        let mut keep = all.len();
        for (i, c) in all.iter().enumerate() {
            cum += weight(c.logit, max, 1.0);
            if cum >= 0.9 * total {
                keep = i + 1;
                break;
            }
        }
        let want: Vec<u32> = all[..keep].iter().map(|c| c.id).collect();
        assert!(keep > TOP_P_PARTIAL, "test must exercise the lazy branch");
        assert_eq!(got, want);
    }

    #[test]
    fn stop_hold_from_respects_char_boundaries() {
        let mut m = StopMatcher::new(vec!["日本語".into()]);
        m.held = "x日本".into();
        assert_eq!(m.hold_from(), 1);
        m.held = "x日".into();
        assert_eq!(m.hold_from(), 1);
        m.held = "x本".into();
        assert_eq!(m.hold_from(), "x本".len());
    }
}
