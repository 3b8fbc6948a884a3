//! How the edge gets a cloud prompt's KV: fetch it (in one of the codecs the quality floor allows),
//! recompute it locally from the manifest's token ids, or **split** — recompute the first `r` tokens
//! while the frames of the rest arrive — chosen per prompt for the lowest expected time to first
//! token from what the edge measured itself: the link's round trip and throughput
//! ([`LinkEstimator`]) and its own prefill speed ([`PrefillModel`]).
//!
//! The cost model (seconds; `n` prompt tokens, `B` bytes per second, `rtt`):
//! - fetch with codec `c`: `rtt + max(bytes_c / B, decode_c · n)` (frames are decoded as they
//!   arrive, so decoding overlaps the transfer);
//! - recompute: `prefill(n) + turn` (the user turn's own prefill, which a fetch hides under its
//!   transfer but the others run after the prefix);
//! - split at `r` (a frame boundary and a block boundary): `max(prefill(r) + overhead, rtt +
//!   max(bytes_c · (n − r)/n / B, decode_c · (n − r)))` — both run at once, and the best `r` makes
//!   them finish together; chosen only when expected [`SPLIT_MARGIN`] × faster than the best
//!   single-source strategy; plus `turn`;
//!
//! where `prefill(n) = s_tok · n + s_pair · n(n+1)/2` (weight products per token plus attention
//! per query–key pair; `s_pair / s_tok` comes from the model's shape, `s_tok` from a prefill the
//! edge timed). Every strategy first fetches the manifest (the token ids), so that cost is left out.

use std::sync::Mutex;
use std::time::Instant;

use ep_kv::codec::{codec_name, CODEC_INT4, CODEC_INT8};
use ep_kv::identity::CODEC_RAW;

/// How a cloud prompt's KV is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// All frames fetched, encoded with `codec`.
    Fetch { codec: u8 },
    /// Computed here from the token ids.
    Recompute,
    /// Tokens `0..from` computed here while the frames of `from..` arrive in `codec`.
    Split { codec: u8, from: u32 },
}

impl Strategy {
    /// The strategy's name as the benchmarks report it: `fetch-f16` (raw, in the stored dtype),
    /// `fetch-int8`, `fetch-int4`, `recompute`, `split`.
    pub fn label(&self, dtype: &str) -> String {
        match self {
            Strategy::Fetch { codec } if *codec == CODEC_RAW => format!("fetch-{dtype}"),
            Strategy::Fetch { codec } => format!("fetch-{}", codec_name(*codec).unwrap_or("?")),
            Strategy::Recompute => "recompute".into(),
            Strategy::Split { .. } => "split".into(),
        }
    }

    /// The codec of the KV this strategy puts in the cache (raw for recompute).
    pub fn codec(&self) -> u8 {
        match self {
            Strategy::Fetch { codec } | Strategy::Split { codec, .. } => *codec,
            Strategy::Recompute => CODEC_RAW,
        }
    }
}

/// What the operator configured: a fixed strategy, or the adaptive choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    Adaptive,
    FetchRaw,
    FetchInt8,
    FetchInt4,
    Recompute,
    /// Split, in the smallest allowed encoding, at the point the cost model balances.
    Split,
}

impl Policy {
    /// Parses `adaptive`, `fetch-f16` (or `fetch-raw`), `fetch-int8`, `fetch-int4`, `recompute`,
    /// `split`.
    pub fn parse(s: &str) -> Result<Policy, String> {
        Ok(match s {
            "adaptive" => Policy::Adaptive,
            "fetch-f16" | "fetch-raw" | "fetch-f32" | "fetch" => Policy::FetchRaw,
            "fetch-int8" => Policy::FetchInt8,
            "fetch-int4" => Policy::FetchInt4,
            "recompute" => Policy::Recompute,
            "split" => Policy::Split,
            _ => {
                return Err(format!(
                    "unknown KV strategy '{s}' (adaptive, fetch-f16, fetch-int8, fetch-int4, recompute, split)"
                ))
            }
        })
    }
}

/// The edge's prefill speed: `secs(n) = s_tok · n + s_pair · n(n+1)/2`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefillModel {
    pub s_tok: f64,
    pub s_pair: f64,
}

impl PrefillModel {
    /// Work per token (weight multiply-adds) and per query–key pair (attention multiply-adds) of a
    /// Llama-shaped model.
    pub fn work_ratio(cfg: &ep_model::ModelConfig) -> f64 {
        let d = cfg.n_embd as f64;
        let kv = (cfg.n_head_kv * cfg.head_dim) as f64;
        let q = (cfg.n_head * cfg.head_dim) as f64;
        let per_layer = d * q + 2.0 * d * kv + q * d + 3.0 * d * cfg.n_ff as f64;
        let per_token = cfg.n_layer as f64 * per_layer + d * cfg.n_vocab as f64;
        // QKᵀ and PV: two multiply-adds per head dimension per pair, per head and layer.
        let per_pair = 2.0 * (cfg.n_layer * cfg.n_head * cfg.head_dim) as f64;
        per_pair / per_token
    }

    /// The model that explains a prefill of `n` tokens taking `secs`, given the pair/token work
    /// ratio.
    pub fn calibrated(n: usize, secs: f64, ratio: f64) -> PrefillModel {
        let n = n.max(1) as f64;
        let units = n + ratio * n * (n + 1.0) / 2.0;
        let s_tok = secs / units;
        PrefillModel {
            s_tok,
            s_pair: s_tok * ratio,
        }
    }

    /// The model through two timed prefills (`n1` tokens in `t1` s, `n2` in `t2`); `None` when the
    /// two do not determine one.
    pub fn fitted(n1: usize, t1: f64, n2: usize, t2: f64) -> Option<PrefillModel> {
        let (a1, b1) = (n1 as f64, (n1 * (n1 + 1)) as f64 / 2.0);
        let (a2, b2) = (n2 as f64, (n2 * (n2 + 1)) as f64 / 2.0);
        let det = a1 * b2 - a2 * b1;
        if !(t1.is_finite() && t2.is_finite()) || det.abs() < 1e-9 {
            return None;
        }
        Some(PrefillModel {
            s_tok: (t1 * b2 - t2 * b1) / det,
            s_pair: (a1 * t2 - a2 * t1) / det,
        })
    }

    pub fn secs(&self, n: usize) -> f64 {
        let n = n as f64;
        self.s_tok * n + self.s_pair * n * (n + 1.0) / 2.0
    }
}

/// What the edge knows of the link and of itself when it decides.
#[derive(Clone, Debug, PartialEq)]
pub struct Costs {
    pub rtt_s: f64,
    pub bytes_per_s: f64,
    pub prefill: PrefillModel,
    /// Seconds to decode one token's KV (all layers), per codec id (raw, int8, int4).
    pub decode_s_per_token: [f64; 3],
    /// What a split adds besides its halves: its own prefill request's fixed cost (scheduling, the
    /// first step) before the import can begin.
    pub split_overhead_s: f64,
    /// A typical user turn's tokens: a fetch runs them layer by layer while frames arrive, so it
    /// hides them; after a recompute or a split they are computed once the prefix is in.
    pub turn_tokens: usize,
}

/// A split is chosen only when the model expects it this much faster than the best of fetching and
/// recomputing: it has more moving parts, so more ways for the model to be wrong.
pub const SPLIT_MARGIN: f64 = 0.95;

/// What the cloud offers for one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Offer {
    pub n_tokens: usize,
    /// Stream bytes per codec the cloud serves.
    pub sizes: Vec<(u8, u64)>,
    /// Token positions where frames start (besides 0) and blocks start: the possible split points.
    pub split_points: Vec<u32>,
}

/// A decision: the strategy, its expected seconds, and every option weighed (for the log).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub strategy: Strategy,
    pub expected_s: f64,
    pub options: Vec<(Strategy, f64)>,
}

impl Costs {
    fn decode(&self, codec: u8, tokens: usize) -> f64 {
        self.decode_s_per_token
            .get(codec as usize)
            .copied()
            .unwrap_or(0.0)
            * tokens as f64
    }

    fn transfer(&self, bytes: f64) -> f64 {
        bytes / self.bytes_per_s.max(1.0)
    }

    /// Expected seconds of `s` for `offer` (`None` when the cloud does not offer its codec).
    pub fn expected(&self, s: Strategy, offer: &Offer) -> Option<f64> {
        let n = offer.n_tokens;
        let size = |c: u8| offer.sizes.iter().find(|(k, _)| *k == c).map(|(_, b)| *b);
        // The user turn after the prefix: hidden under a fetch, in series after the others.
        let t = self.turn_tokens as f64;
        let turn = self.prefill.s_tok * t + self.prefill.s_pair * t * n as f64;
        Some(match s {
            Strategy::Recompute => self.prefill.secs(n) + turn,
            Strategy::Fetch { codec } => {
                let b = size(codec)? as f64;
                self.rtt_s + self.transfer(b).max(self.decode(codec, n))
            }
            Strategy::Split { codec, from } => {
                let r = from as usize;
                if r == 0 || r >= n {
                    return None;
                }
                let b = size(codec)? as f64 * (n - r) as f64 / n as f64;
                let fetch = self.rtt_s + self.transfer(b).max(self.decode(codec, n - r));
                (self.prefill.secs(r) + self.split_overhead_s).max(fetch) + turn
            }
        })
    }
}

/// The strategies `policy` may use with `allowed` codecs (the quality floor), for `offer`.
pub fn candidates(policy: &Policy, allowed: &[u8], offer: &Offer) -> Vec<Strategy> {
    let offered = |c: u8| offer.sizes.iter().any(|(k, _)| *k == c);
    let codecs: Vec<u8> = allowed.iter().copied().filter(|&c| offered(c)).collect();
    let splits = |codecs: &[u8]| -> Vec<Strategy> {
        codecs
            .iter()
            .flat_map(|&codec| {
                offer
                    .split_points
                    .iter()
                    .map(move |&from| Strategy::Split { codec, from })
            })
            .collect()
    };
    match policy {
        Policy::FetchRaw => vec![Strategy::Fetch { codec: CODEC_RAW }],
        Policy::FetchInt8 => vec![Strategy::Fetch { codec: CODEC_INT8 }],
        Policy::FetchInt4 => vec![Strategy::Fetch { codec: CODEC_INT4 }],
        Policy::Recompute => vec![Strategy::Recompute],
        Policy::Split => {
            // The smallest allowed encoding, the split point chosen by the model.
            let best = codecs
                .iter()
                .copied()
                .min_by_key(|&c| offer.sizes.iter().find(|(k, _)| *k == c).map(|(_, b)| *b));
            splits(&best.into_iter().collect::<Vec<_>>())
        }
        Policy::Adaptive => {
            let mut v = vec![Strategy::Recompute];
            v.extend(codecs.iter().map(|&codec| Strategy::Fetch { codec }));
            v.extend(splits(&codecs));
            v
        }
    }
}

/// The option of `candidates` with the lowest expected time (ties: the earlier one). A fixed policy
/// whose codec the cloud does not offer falls back to recompute.
pub fn choose(policy: &Policy, allowed: &[u8], costs: &Costs, offer: &Offer) -> Plan {
    let options: Vec<(Strategy, f64)> = candidates(policy, allowed, offer)
        .into_iter()
        .filter_map(|s| costs.expected(s, offer).map(|t| (s, t)))
        .collect();
    let min_of = |split: bool| {
        options
            .iter()
            .copied()
            .filter(|(s, _)| matches!(s, Strategy::Split { .. }) == split)
            .fold(None::<(Strategy, f64)>, |acc, o| match acc {
                Some(a) if a.1 <= o.1 => Some(a),
                _ => Some(o),
            })
    };
    let best = match (min_of(false), min_of(true)) {
        (Some(simple), Some(split)) if split.1 < SPLIT_MARGIN * simple.1 => Some(split),
        (Some(simple), _) => Some(simple),
        (None, split) => split,
    };
    match best {
        Some((strategy, expected_s)) => Plan {
            strategy,
            expected_s,
            options,
        },
        None => Plan {
            strategy: Strategy::Recompute,
            expected_s: costs.prefill.secs(offer.n_tokens),
            options,
        },
    }
}

/// The link as the edge measured it: round trips of small requests and throughput of transfers.
#[derive(Default)]
pub struct LinkEstimator {
    s: Mutex<LinkState>,
}

#[derive(Default, Clone, Copy)]
struct LinkState {
    rtt_s: Option<f64>,
    bytes_per_s: Option<f64>,
    rtt_samples: u32,
    rate_samples: u32,
}

/// An estimate of the link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkEstimate {
    pub rtt_s: f64,
    pub bytes_per_s: f64,
    pub rtt_samples: u32,
    pub rate_samples: u32,
}

impl LinkEstimator {
    /// A small request's time from sending to its response head: the round trip plus the cloud's
    /// time; the smallest recent one is kept (older minima decay slowly, so a path that got slower
    /// is noticed).
    pub fn rtt_sample(&self, secs: f64) {
        if !(secs.is_finite() && secs >= 0.0) {
            return;
        }
        let mut s = self.s.lock().expect("link");
        s.rtt_s = Some(match s.rtt_s {
            Some(r) if secs < r => secs,
            Some(r) => r + 0.1 * (secs - r).min(r),
            None => secs,
        });
        s.rtt_samples += 1;
    }

    /// A transfer's steady rate (bytes per second), e.g. from [`steady_rate`].
    pub fn rate_sample(&self, bytes_per_s: f64) {
        if !(bytes_per_s.is_finite() && bytes_per_s > 0.0) {
            return;
        }
        let mut s = self.s.lock().expect("link");
        s.bytes_per_s = Some(match s.bytes_per_s {
            // The newest transfer counts most: links change.
            Some(r) => 0.5 * r + 0.5 * bytes_per_s,
            None => bytes_per_s,
        });
        s.rate_samples += 1;
    }

    /// The round trip measured so far.
    pub fn rtt(&self) -> Option<f64> {
        self.s.lock().expect("link").rtt_s
    }

    /// The estimate, once both a round trip and a rate were measured.
    pub fn estimate(&self) -> Option<LinkEstimate> {
        let s = *self.s.lock().expect("link");
        Some(LinkEstimate {
            rtt_s: s.rtt_s?,
            bytes_per_s: s.bytes_per_s?,
            rtt_samples: s.rtt_samples,
            rate_samples: s.rate_samples,
        })
    }
}

/// Arrival times of a transfer's bytes, to measure its steady rate.
pub struct Arrivals {
    start: Instant,
    points: Vec<(f64, u64)>,
    total: u64,
}

impl Arrivals {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            points: Vec::new(),
            total: 0,
        }
    }

    pub fn push(&mut self, bytes: usize) {
        self.total += bytes as u64;
        self.points
            .push((self.start.elapsed().as_secs_f64(), self.total));
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The steady rate: [`steady_rate`] of what arrived.
    pub fn rate(&self) -> Option<f64> {
        steady_rate(&self.points)
    }
}

/// The rate of the last third of a transfer (by time since its first byte), past TCP's slow start:
/// `points` are (seconds, cumulative bytes). `None` when too little arrived to tell.
pub fn steady_rate(points: &[(f64, u64)]) -> Option<f64> {
    let (&(t0, b0), &(t1, b1)) = (points.first()?, points.last()?);
    if points.len() < 4 || t1 - t0 <= 0.0 || b1 <= b0 {
        return None;
    }
    let mid = t0 + (t1 - t0) * 2.0 / 3.0;
    let &(tm, bm) = points.iter().find(|(t, _)| *t >= mid)?;
    if t1 - tm <= 1e-4 || b1 <= bm {
        return Some((b1 - b0) as f64 / (t1 - t0));
    }
    Some((b1 - bm) as f64 / (t1 - tm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(mbit: f64, rtt_ms: f64) -> Costs {
        Costs {
            rtt_s: rtt_ms / 1000.0,
            bytes_per_s: mbit * 1e6 / 8.0,
            // 262 tokens/s with a small attention term: the default model on 2 cores.
            prefill: PrefillModel {
                s_tok: 1.0 / 262.0,
                s_pair: 1.0 / 262.0 / 20_000.0,
            },
            decode_s_per_token: [0.0, 2e-5, 2e-5],
            split_overhead_s: 0.0,
            turn_tokens: 0,
        }
    }

    fn offer(n: usize) -> Offer {
        Offer {
            n_tokens: n,
            sizes: vec![
                (CODEC_RAW, 23_040 * n as u64),
                (CODEC_INT8, 12_000 * n as u64),
                (CODEC_INT4, 7_000 * n as u64),
            ],
            split_points: (1..n / 64).map(|i| (i * 64) as u32).collect(),
        }
    }

    const ALL: &[u8] = &[CODEC_RAW, CODEC_INT8, CODEC_INT4];

    /// A simulated link: the time each strategy takes when the link is as `truth` says, whatever was
    /// estimated.
    fn simulate(truth: &Costs, s: Strategy, o: &Offer) -> f64 {
        truth.expected(s, o).expect("offered")
    }

    #[test]
    fn fast_link_fetches_slow_link_recomputes_or_splits() {
        let o = offer(1024);
        let p = choose(&Policy::Adaptive, ALL, &costs(10_000.0, 1.0), &o);
        assert_eq!(p.strategy, Strategy::Fetch { codec: CODEC_RAW }, "{p:?}");
        let p = choose(&Policy::Adaptive, &[CODEC_RAW], &costs(0.5, 300.0), &o);
        assert_eq!(p.strategy, Strategy::Recompute, "{p:?}");
        // A 5 Mbit/s link with int4: neither alone is best; the split is.
        let c = costs(5.0, 120.0);
        let p = choose(&Policy::Adaptive, ALL, &c, &o);
        let Strategy::Split { codec, from } = p.strategy else {
            panic!("{p:?}");
        };
        assert_eq!(codec, CODEC_INT4);
        let best_fixed = [Strategy::Recompute, Strategy::Fetch { codec: CODEC_INT4 }]
            .iter()
            .map(|&s| c.expected(s, &o).unwrap())
            .fold(f64::INFINITY, f64::min);
        assert!(p.expected_s < best_fixed, "{p:?} vs {best_fixed}");
        // Both halves end close together at the chosen point.
        let compute = c.prefill.secs(from as usize);
        assert!((compute - p.expected_s).abs() / p.expected_s < 0.1, "{p:?}");
    }

    #[test]
    fn the_quality_floor_limits_codecs() {
        let o = offer(1024);
        let p = choose(&Policy::Adaptive, &[CODEC_RAW], &costs(100.0, 20.0), &o);
        assert!(
            p.options.iter().all(|(s, _)| s.codec() == CODEC_RAW),
            "{p:?}"
        );
        let p = choose(
            &Policy::Adaptive,
            &[CODEC_RAW, CODEC_INT4],
            &costs(100.0, 20.0),
            &o,
        );
        assert_eq!(p.strategy.codec(), CODEC_INT4, "{p:?}");
    }

    #[test]
    fn adaptive_is_within_ten_percent_of_the_best_fixed_strategy_on_a_simulated_link() {
        // The decision is made on a noisy estimate (rate off by ±8%, RTT by ±50%); the time is the
        // true link's. Adaptive must stay within 10% of the best fixed strategy. (A split point is
        // as sensitive to the rate as the rate's error: with the rate 20% low, a 4k split on a
        // 100 Mbit/s link ends ~20% late.)
        for &(mbit, rtt) in &[
            (10_000.0, 1.0),
            (1000.0, 5.0),
            (100.0, 20.0),
            (5.0, 120.0),
            (1.0, 200.0),
            (20.0, 60.0),
        ] {
            for n in [1024usize, 4096] {
                let o = offer(n);
                let truth = costs(mbit, rtt);
                let fixed = [
                    Policy::FetchRaw,
                    Policy::FetchInt8,
                    Policy::FetchInt4,
                    Policy::Recompute,
                    Policy::Split,
                ];
                let best = fixed
                    .iter()
                    .map(|p| simulate(&truth, choose(p, ALL, &truth, &o).strategy, &o))
                    .fold(f64::INFINITY, f64::min);
                for (rate_err, rtt_err) in [(0.92, 1.5), (1.08, 0.5), (1.0, 1.0)] {
                    let mut est = truth.clone();
                    est.bytes_per_s *= rate_err;
                    est.rtt_s *= rtt_err;
                    let a = choose(&Policy::Adaptive, ALL, &est, &o).strategy;
                    let t = simulate(&truth, a, &o);
                    assert!(
                        t <= best * 1.1,
                        "{mbit} Mbit/s {rtt} ms n={n}: adaptive {a:?} {t:.3}s vs best {best:.3}s"
                    );
                }
            }
        }
    }

    #[test]
    fn fixed_policies_and_labels() {
        let o = offer(1024);
        let c = costs(100.0, 20.0);
        assert_eq!(
            choose(&Policy::FetchInt8, ALL, &c, &o).strategy,
            Strategy::Fetch { codec: CODEC_INT8 }
        );
        assert_eq!(
            choose(&Policy::Recompute, ALL, &c, &o).strategy,
            Strategy::Recompute
        );
        assert!(matches!(
            choose(&Policy::Split, ALL, &c, &o).strategy,
            Strategy::Split {
                codec: CODEC_INT4,
                ..
            }
        ));
        // A codec the cloud does not serve: recompute.
        let mut o2 = o.clone();
        o2.sizes.retain(|(c, _)| *c == CODEC_RAW);
        assert_eq!(
            choose(&Policy::FetchInt4, ALL, &c, &o2).strategy,
            Strategy::Recompute
        );
        assert_eq!(Strategy::Fetch { codec: 0 }.label("f16"), "fetch-f16");
        assert_eq!(Strategy::Fetch { codec: 2 }.label("f16"), "fetch-int4");
        assert_eq!(Policy::parse("fetch-f16"), Ok(Policy::FetchRaw));
        assert!(Policy::parse("teleport").is_err());
    }

    #[test]
    fn two_timed_prefills_fit_the_model() {
        let truth = PrefillModel {
            s_tok: 1e-3,
            s_pair: 2e-7,
        };
        let m = PrefillModel::fitted(64, truth.secs(64), 384, truth.secs(384)).unwrap();
        assert!((m.s_tok - truth.s_tok).abs() < 1e-9 && (m.s_pair - truth.s_pair).abs() < 1e-12);
        assert!(PrefillModel::fitted(64, 0.1, 64, 0.1).is_none());
    }

    #[test]
    fn prefill_model_calibration_reproduces_its_sample() {
        let m = PrefillModel::calibrated(128, 0.5, 1e-4);
        assert!((m.secs(128) - 0.5).abs() < 1e-9);
        assert!(m.secs(1024) > 8.0 * 0.5);
    }

    #[test]
    fn steady_rate_ignores_slow_start() {
        // Doubling per 20 ms round for 5 rounds, then 12.5 MB/s.
        let mut pts = vec![];
        let (mut t, mut b, mut w) = (0.0, 0u64, 14_600u64);
        for _ in 0..5 {
            t += 0.02;
            b += w;
            w *= 2;
            pts.push((t, b));
        }
        for _ in 0..20 {
            t += 0.01;
            b += 125_000;
            pts.push((t, b));
        }
        let r = steady_rate(&pts).unwrap();
        assert!((r - 12.5e6).abs() / 12.5e6 < 0.05, "{r}");
        assert_eq!(steady_rate(&pts[..2]), None);
    }

    #[test]
    fn estimator_keeps_min_rtt_and_recent_rate() {
        let e = LinkEstimator::default();
        assert!(e.estimate().is_none());
        e.rtt_sample(0.05);
        e.rtt_sample(0.02);
        e.rtt_sample(0.03);
        e.rate_sample(1e6);
        e.rate_sample(3e6);
        let x = e.estimate().unwrap();
        assert!(x.rtt_s >= 0.02 && x.rtt_s < 0.022, "{x:?}");
        assert_eq!(x.bytes_per_s, 2e6);
    }
}
