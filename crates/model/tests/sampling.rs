//! Integration tests for `ep_model::sampling`.

use std::collections::HashMap;

use ep_model::sampling::{
    apply_penalties, argmax, log_softmax, top_n, Sampler, SamplingError, SamplingParams,
    StopMatcher,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Pure sampling at `temperature`: no top-k/top-p/min-p, no penalties.
fn plain(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed,
        ..SamplingParams::default()
    }
}

fn softmax64(logits: &[f32], temp: f64) -> Vec<f64> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - m) / temp).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// Independent, naive reference of the filter chain on already-penalised logits: full sort
/// (descending logit, ascending id), top-k, top-p, min-p. `slack` widens (> 0) or narrows
/// (< 0) the top-p and min-p thresholds to absorb rounding differences at the boundaries.
fn reference_set(logits: &[f32], p: &SamplingParams, slack: f64) -> Vec<u32> {
    let mut v: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        v.truncate(p.top_k);
    }
    if p.top_p < 1.0 {
        let l: Vec<f32> = v.iter().map(|x| x.1).collect();
        let probs = softmax64(&l, 1.0);
        let mut cum = 0.0;
        let mut keep = v.len();
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 + slack {
                keep = i + 1;
                break;
            }
        }
        v.truncate(keep.max(1));
    }
    if p.min_p > 0.0 {
        let thr = v[0].1 as f64 + (p.min_p as f64).ln() - slack;
        let first = v[0];
        v.retain(|x| x.1 as f64 >= thr);
        if v.is_empty() {
            v.push(first);
        }
    }
    let mut ids: Vec<u32> = v.into_iter().map(|x| x.0).collect();
    ids.sort_unstable();
    ids
}

fn counts_in_window(history: &[u32], last_n: usize) -> HashMap<u32, u32> {
    let mut m = HashMap::new();
    for &t in &history[history.len().saturating_sub(last_n)..] {
        *m.entry(t).or_insert(0) += 1;
    }
    m
}

/// Logits with frequent exact ties (multiples of 0.5).
fn tied_logits() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec((-20i32..20).prop_map(|x| x as f32 * 0.5), 1..80)
}

// ---------------------------------------------------------------- params

#[test]
fn defaults_match_llama_cpp() {
    let d = SamplingParams::default();
    assert_eq!(d.temperature, 0.8);
    assert_eq!(d.top_k, 40);
    assert_eq!(d.top_p, 0.95);
    assert_eq!(d.min_p, 0.05);
    assert_eq!(d.repeat_penalty, 1.0);
    assert_eq!(d.repeat_last_n, 64);
    assert_eq!(d.presence_penalty, 0.0);
    assert_eq!(d.frequency_penalty, 0.0);
    assert_eq!(d.seed, 0);
    assert!(d.validate().is_ok());
    let g = SamplingParams::greedy();
    assert!(g.temperature <= 0.0);
    assert!(g.validate().is_ok());
}

#[test]
fn validate_names_the_offending_field() {
    let cases: Vec<(&str, SamplingParams)> = vec![
        (
            "temperature",
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ),
        (
            "temperature",
            SamplingParams {
                temperature: f32::INFINITY,
                ..Default::default()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: f32::NAN,
                ..Default::default()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: -0.1,
                ..Default::default()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: 1.01,
                ..Default::default()
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: f32::NAN,
                ..Default::default()
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: -0.01,
                ..Default::default()
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
        ),
        (
            "repeat_penalty",
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
        ),
        (
            "repeat_penalty",
            SamplingParams {
                repeat_penalty: -1.1,
                ..Default::default()
            },
        ),
        (
            "repeat_penalty",
            SamplingParams {
                repeat_penalty: f32::NAN,
                ..Default::default()
            },
        ),
        (
            "repeat_penalty",
            SamplingParams {
                repeat_penalty: f32::INFINITY,
                ..Default::default()
            },
        ),
        // 1/p overflows to +inf for a subnormal penalty.
        (
            "repeat_penalty",
            SamplingParams {
                repeat_penalty: 1e-45,
                ..Default::default()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: f32::NAN,
                ..Default::default()
            },
        ),
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: f32::NEG_INFINITY,
                ..Default::default()
            },
        ),
    ];
    for (field, params) in cases {
        let err = params.validate().expect_err(field);
        let SamplingError::InvalidParam { field: got, .. } = &err;
        assert_eq!(*got, field, "{params:?}");
        assert!(err.to_string().contains(field), "{err}");
        assert_eq!(Sampler::new(params).err(), Some(err));
    }
    // Boundary values that are valid.
    for ok in [
        SamplingParams {
            temperature: -1.0,
            ..Default::default()
        },
        SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        SamplingParams {
            top_p: 1.0,
            min_p: 1.0,
            ..Default::default()
        },
        SamplingParams {
            repeat_penalty: 0.01,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            ..Default::default()
        },
    ] {
        assert!(ok.validate().is_ok(), "{ok:?}");
    }
}

#[test]
fn params_serde_roundtrip_and_partial_json() {
    let p = SamplingParams {
        temperature: 0.3,
        top_k: 7,
        seed: 42,
        ..Default::default()
    };
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<SamplingParams>(&json).unwrap(), p);
    let partial: SamplingParams = serde_json::from_str(r#"{"top_k": 3}"#).unwrap();
    assert_eq!(
        partial,
        SamplingParams {
            top_k: 3,
            ..Default::default()
        }
    );
}

// ---------------------------------------------------------------- free functions

#[test]
fn argmax_ties_and_nan() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN, 0.7]), 3);
    assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
    assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    assert_eq!(argmax(&[-5.0]), 0);
    assert_eq!(argmax(&[0.0, f32::INFINITY, f32::INFINITY]), 1);
}

#[test]
fn log_softmax_values() {
    let l = [1.0f32, 2.0, 3.0];
    let ls = log_softmax(&l);
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    for (a, b) in ls.iter().zip(l) {
        assert!((*a as f64 - (b as f64 - lse)).abs() < 1e-6);
    }
    // Large offsets do not overflow.
    let big = log_softmax(&[1e30, 1e30]);
    assert!((big[0] - (-std::f32::consts::LN_2)).abs() < 1e-6);
    // NaN stays NaN and is excluded from the normalisation.
    let n = log_softmax(&[0.0, f32::NAN, 0.0]);
    assert!(n[1].is_nan());
    assert!((n[0] + std::f32::consts::LN_2).abs() < 1e-6);
    // Infinite limits.
    let inf = log_softmax(&[f32::INFINITY, 0.0, f32::INFINITY]);
    assert_eq!(inf[1], f32::NEG_INFINITY);
    assert!((inf[0] + std::f32::consts::LN_2).abs() < 1e-6);
    let ninf = log_softmax(&[f32::NEG_INFINITY; 4]);
    assert!(ninf.iter().all(|&x| (x + 4f32.ln()).abs() < 1e-6));
    assert!(log_softmax(&[]).is_empty());
}

#[test]
fn top_n_basics() {
    let l = [0.5f32, 2.0, f32::NAN, 2.0, -1.0];
    assert_eq!(top_n(&l, 2), vec![(1, 2.0), (3, 2.0)]);
    assert_eq!(top_n(&l, 0), vec![]);
    let all = top_n(&l, 100);
    assert_eq!(all.len(), 5);
    assert_eq!(all[..4], [(1, 2.0), (3, 2.0), (0, 0.5), (4, -1.0)]);
    assert_eq!(all[4].0, 2);
    assert!(all[4].1.is_nan());
}

proptest! {
    #[test]
    fn log_softmax_normalises(logits in prop::collection::vec(-50f32..50.0, 1..200)) {
        let ls = log_softmax(&logits);
        let total: f64 = ls.iter().map(|&x| (x as f64).exp()).sum();
        prop_assert!((total - 1.0).abs() < 1e-5, "sum = {total}");
        // Order-preserving: differences of log-probs equal differences of logits.
        for (a, b) in ls.iter().zip(&logits) {
            prop_assert!(((a - ls[0]) - (b - logits[0])).abs() < 1e-3);
        }
    }

    #[test]
    fn top_n_matches_full_sort(logits in tied_logits(), n in 0usize..100) {
        let mut full: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        full.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        full.truncate(n);
        prop_assert_eq!(top_n(&logits, n), full);
    }

    #[test]
    fn argmax_is_first_maximum(logits in tied_logits()) {
        let i = argmax(&logits) as usize;
        prop_assert!(logits.iter().all(|&l| l <= logits[i]));
        prop_assert!(logits[..i].iter().all(|&l| l < logits[i]));
    }
}

// ---------------------------------------------------------------- sampler: greedy / determinism

proptest! {
    #[test]
    fn greedy_is_argmax(logits in tied_logits(), seed in any::<u64>(), temp in -2f32..=0.0) {
        let mut s = Sampler::new(SamplingParams { temperature: temp, seed, ..SamplingParams::default() }).unwrap();
        let want = argmax(&logits);
        for _ in 0..3 {
            prop_assert_eq!(s.sample(&logits, &[]), want);
        }
        prop_assert_eq!(s.distribution(&logits, &[]), vec![(want, 1.0)]);
        let mut g = Sampler::new(SamplingParams::greedy()).unwrap();
        prop_assert_eq!(g.sample(&logits, &[1, 2, 3]), want);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature(
        logits in tied_logits(),
        temp in 0.01f32..100.0,
        seed in any::<u64>(),
        top_p in 0f32..=1.0,
        min_p in 0f32..=1.0,
    ) {
        let params = SamplingParams { temperature: temp, top_k: 1, top_p, min_p, seed, ..SamplingParams::default() };
        let mut s = Sampler::new(params).unwrap();
        let want = argmax(&logits);
        for _ in 0..5 {
            prop_assert_eq!(s.sample(&logits, &[]), want);
        }
    }
}

#[test]
fn same_seed_same_sequence_different_seed_differs() {
    let flat = vec![0.0f32; 1000];
    let run = |seed: u64| -> Vec<u32> {
        let mut s = Sampler::new(plain(1.0, seed)).unwrap();
        let mut history = Vec::new();
        for _ in 0..50 {
            let t = s.sample(&flat, &history);
            history.push(t);
        }
        history
    };
    for seed in [0u64, 1, 42, u64::MAX] {
        assert_eq!(run(seed), run(seed), "seed {seed} not reproducible");
    }
    // Two independent 50-draw sequences over 1000 equiprobable tokens coincide with
    // probability 1000^-50; they must differ.
    let seqs: Vec<Vec<u32>> = (0..5).map(run).collect();
    for i in 0..seqs.len() {
        for j in i + 1..seqs.len() {
            assert_ne!(seqs[i], seqs[j], "seeds {i} and {j}");
        }
    }
    // A flat distribution is actually used: many distinct tokens appear.
    let mut distinct = seqs[0].clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() > 40,
        "only {} distinct tokens",
        distinct.len()
    );
}

#[test]
fn clone_continues_identically() {
    let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
    let mut a = Sampler::new(plain(1.0, 9)).unwrap();
    for _ in 0..10 {
        a.sample(&logits, &[]);
    }
    let mut b = a.clone();
    let xs: Vec<u32> = (0..30).map(|_| a.sample(&logits, &[])).collect();
    let ys: Vec<u32> = (0..30).map(|_| b.sample(&logits, &[])).collect();
    assert_eq!(xs, ys);
}

// ---------------------------------------------------------------- sampler: distribution

/// Counts of `n` draws must lie within 5 sigma of the binomial expectation.
fn check_frequencies(logits: &[f32], temp: f32, n: usize, seed: u64) {
    let mut s = Sampler::new(plain(temp, seed)).unwrap();
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[s.sample(logits, &[]) as usize] += 1;
    }
    let probs = softmax64(logits, temp as f64);
    for (i, (&c, &p)) in counts.iter().zip(&probs).enumerate() {
        let mean = n as f64 * p;
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (c as f64 - mean).abs() <= 5.0 * sigma,
            "token {i}: {c} draws, expected {mean:.1} ± {sigma:.1} (temp {temp})"
        );
    }
}

#[test]
fn empirical_frequencies_match_softmax() {
    let logits = [1.0f32, 2.0, 0.5, -1.0];
    check_frequencies(&logits, 1.0, 20_000, 1234);
    // Temperature reshapes the distribution as softmax(l / T).
    check_frequencies(&logits, 0.5, 20_000, 99);
    check_frequencies(&logits, 2.5, 20_000, 7);
}

#[test]
fn distribution_matches_softmax_and_sample_stays_inside() {
    let logits = [1.0f32, 2.0, 0.5, -1.0];
    let mut s = Sampler::new(plain(0.7, 0)).unwrap();
    let d = s.distribution(&logits, &[]);
    let want = softmax64(&logits, 0.7);
    assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 0, 2, 3]);
    for (id, p) in &d {
        assert!((*p as f64 - want[*id as usize]).abs() < 1e-6);
    }
}

#[test]
fn nan_and_infinite_logits() {
    // NaN is never drawn.
    let logits = [f32::NAN, 0.0, f32::NAN, 0.0];
    let mut s = Sampler::new(plain(1.0, 3)).unwrap();
    for _ in 0..200 {
        let t = s.sample(&logits, &[]);
        assert!(t == 1 || t == 3, "drew {t}");
    }
    // +inf logits take all the mass, shared evenly.
    let logits = [5.0, f32::INFINITY, 1e30, f32::INFINITY];
    let mut s = Sampler::new(plain(1.0, 3)).unwrap();
    let mut seen = [0usize; 4];
    for _ in 0..400 {
        seen[s.sample(&logits, &[]) as usize] += 1;
    }
    assert_eq!(seen[0] + seen[2], 0);
    assert!(seen[1] > 100 && seen[3] > 100, "{seen:?}");
    // All -inf: uniform rather than a panic or NaN.
    let logits = [f32::NEG_INFINITY; 3];
    let mut s = Sampler::new(SamplingParams {
        seed: 5,
        ..Default::default()
    })
    .unwrap();
    for _ in 0..20 {
        assert!(s.sample(&logits, &[]) < 3);
    }
    // Tiny temperature with huge logit gaps does not overflow.
    let mut s = Sampler::new(plain(1e-6, 1)).unwrap();
    assert_eq!(s.sample(&[1e30, -1e30, 0.0], &[]), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// top-k / top-p / min-p (after penalties) never let a token outside the allowed set through,
    /// and `distribution` is exactly that set up to rounding at the thresholds.
    #[test]
    fn filters_respect_allowed_set(
        logits in prop::collection::vec(-10f32..10.0, 1..120),
        history in prop::collection::vec(0u32..130, 0..40),
        top_k in 0usize..20,
        top_p in 0f32..=1.0,
        min_p in 0f32..=1.0,
        temp in 0.05f32..4.0,
        repeat_penalty in 0.5f32..2.0,
        seed in any::<u64>(),
    ) {
        let params = SamplingParams {
            temperature: temp, top_k, top_p, min_p, repeat_penalty,
            repeat_last_n: 16, presence_penalty: 0.2, frequency_penalty: 0.1, seed,
        };
        let mut penalised = logits.clone();
        apply_penalties(&mut penalised, &history, &params);
        let loose = reference_set(&penalised, &params, 1e-5);
        let strict = reference_set(&penalised, &params, -1e-5);

        let mut s = Sampler::new(params.clone()).unwrap();
        let mut got: Vec<u32> = s.distribution(&logits, &history).into_iter().map(|x| x.0).collect();
        got.sort_unstable();
        prop_assert!(strict.iter().all(|t| got.contains(t)), "strict {:?} ⊄ got {:?}", strict, got);
        prop_assert!(got.iter().all(|t| loose.contains(t)), "got {:?} ⊄ loose {:?}", got, loose);
        if top_k > 0 {
            prop_assert!(got.len() <= top_k);
        }
        for _ in 0..20 {
            let t = s.sample(&logits, &history);
            prop_assert!(loose.contains(&t), "drew {} outside {:?}", t, loose);
        }
    }
}

#[test]
fn large_vocab_top_p_without_top_k() {
    // 49k vocab exercises the partial-sort path of top-p (no top-k, > 256 candidates).
    let mut rng = StdRng::seed_from_u64(17);
    let logits: Vec<f32> = (0..49_152).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    for top_p in [0.05f32, 0.5, 0.95] {
        let params = SamplingParams {
            top_k: 0,
            top_p,
            min_p: 0.0,
            temperature: 1.0,
            ..Default::default()
        };
        let strict = reference_set(&logits, &params, -1e-6);
        let loose = reference_set(&logits, &params, 1e-6);
        let mut s = Sampler::new(params).unwrap();
        let mut got: Vec<u32> = s
            .distribution(&logits, &[])
            .into_iter()
            .map(|x| x.0)
            .collect();
        got.sort_unstable();
        assert!(
            got.len() >= strict.len() && got.len() <= loose.len(),
            "top_p {top_p}"
        );
        assert!(strict.iter().all(|t| got.binary_search(t).is_ok()));
        assert!(got.iter().all(|t| loose.binary_search(t).is_ok()));
        for _ in 0..50 {
            assert!(loose.binary_search(&s.sample(&logits, &[])).is_ok());
        }
    }
}

#[test]
fn top_p_and_min_p_hand_computed() {
    // probs ∝ e^l: l = ln(0.5), ln(0.3), ln(0.15), ln(0.05)
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let ids = |params: SamplingParams| -> Vec<u32> {
        let mut s = Sampler::new(params).unwrap();
        let mut v: Vec<u32> = s
            .distribution(&logits, &[])
            .into_iter()
            .map(|x| x.0)
            .collect();
        v.sort_unstable();
        v
    };
    let base = plain(1.0, 0);
    assert_eq!(
        ids(SamplingParams {
            top_p: 0.45,
            ..base.clone()
        }),
        vec![0]
    );
    assert_eq!(
        ids(SamplingParams {
            top_p: 0.7,
            ..base.clone()
        }),
        vec![0, 1]
    );
    assert_eq!(
        ids(SamplingParams {
            top_p: 0.9,
            ..base.clone()
        }),
        vec![0, 1, 2]
    );
    assert_eq!(
        ids(SamplingParams {
            top_p: 0.0,
            ..base.clone()
        }),
        vec![0]
    );
    // min_p relative to p_max = 0.5: 0.25 keeps >= 0.125, 0.5 keeps >= 0.25.
    assert_eq!(
        ids(SamplingParams {
            min_p: 0.25,
            ..base.clone()
        }),
        vec![0, 1, 2]
    );
    assert_eq!(
        ids(SamplingParams {
            min_p: 0.5,
            ..base.clone()
        }),
        vec![0, 1]
    );
    assert_eq!(
        ids(SamplingParams {
            min_p: 1.0,
            ..base.clone()
        }),
        vec![0]
    );
    // top_k before top_p: top_p is computed over the renormalised top-2 (0.625, 0.375).
    assert_eq!(
        ids(SamplingParams {
            top_k: 2,
            top_p: 0.6,
            ..base.clone()
        }),
        vec![0]
    );
    assert_eq!(
        ids(SamplingParams {
            top_k: 2,
            top_p: 0.7,
            ..base.clone()
        }),
        vec![0, 1]
    );
    // min_p is applied before temperature: a high temperature does not rescue token 3.
    assert_eq!(
        ids(SamplingParams {
            min_p: 0.2,
            temperature: 50.0,
            ..base
        }),
        vec![0, 1, 2]
    );
}

// ---------------------------------------------------------------- penalties

#[test]
fn penalties_hand_computed() {
    let logits = [2.0f32, -1.0, 0.0, 3.0, 1.0];
    let params = SamplingParams {
        repeat_penalty: 2.0,
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        repeat_last_n: 4,
        ..SamplingParams::greedy()
    };
    // Window = last 4 = [1, 0, 0, 9]; token 3 is outside the window, 9 is outside the vocab.
    let history = [3, 3, 1, 0, 0, 9];
    let mut got = logits;
    apply_penalties(&mut got, &history, &params);
    assert_eq!(got[0], -0.25); // positive, count 2: 2 / 2 - 2 * 0.5 - 0.25
    assert_eq!(got[1], -2.75); // negative, count 1: -1 * 2 - 1 * 0.5 - 0.25
    assert_eq!(got[2].to_bits(), 0.0f32.to_bits()); // not in history: bit-identical
    assert_eq!(got[3], 3.0); // only outside the window
    assert_eq!(got[4], 1.0);

    // Greedy sees the penalised logits: 3 wins while outside the window; once penalised
    // (3 / 2 - 0.5 - 0.25 = 0.75) token 0 wins; a presence penalty on 3 and 0 lets 4 win.
    let mut s = Sampler::new(params.clone()).unwrap();
    assert_eq!(s.sample(&logits, &history), 3);
    assert_eq!(s.sample(&logits, &[3]), 0); // 3 -> 3/2 - 0.5 - 0.25 = 0.75 < 2
    let p2 = SamplingParams {
        repeat_penalty: 1.0,
        frequency_penalty: 0.0,
        presence_penalty: 5.0,
        ..params
    };
    let mut s = Sampler::new(p2).unwrap();
    assert_eq!(s.sample(&logits, &[3, 0]), 4);
}

#[test]
fn penalties_disabled_change_nothing() {
    let logits = [2.0f32, -1.0, 0.5];
    let history = [0, 1, 2, 0];
    for params in [
        SamplingParams {
            repeat_penalty: 1.3,
            repeat_last_n: 0,
            ..Default::default()
        },
        SamplingParams {
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            ..Default::default()
        },
    ] {
        let mut got = logits;
        apply_penalties(&mut got, &history, &params);
        assert_eq!(got, logits);
    }
}

proptest! {
    #[test]
    fn penalties_follow_formula(
        logits in prop::collection::vec(-10f32..10.0, 1..50),
        history in prop::collection::vec(0u32..60, 0..100),
        last_n in 0usize..80,
        repeat_penalty in 0.1f32..3.0,
        frequency_penalty in -1f32..1.0,
        presence_penalty in -1f32..1.0,
    ) {
        let params = SamplingParams {
            repeat_penalty, frequency_penalty, presence_penalty, repeat_last_n: last_n,
            ..SamplingParams::default()
        };
        let mut got = logits.clone();
        apply_penalties(&mut got, &history, &params);
        let counts = counts_in_window(&history, last_n);
        let disabled = last_n == 0
            || (repeat_penalty == 1.0 && frequency_penalty == 0.0 && presence_penalty == 0.0);
        for (i, (&before, &after)) in logits.iter().zip(&got).enumerate() {
            match counts.get(&(i as u32)) {
                Some(&c) if !disabled => {
                    let l = if before <= 0.0 { before * repeat_penalty } else { before / repeat_penalty };
                    let want = l - c as f32 * frequency_penalty - presence_penalty;
                    prop_assert_eq!(after.to_bits(), want.to_bits(), "token {}", i);
                }
                _ => prop_assert_eq!(after.to_bits(), before.to_bits(), "token {} changed", i),
            }
        }
    }

    /// The sampler applies exactly these penalties: greedy == argmax(penalised logits).
    #[test]
    fn sampler_uses_penalised_logits(
        logits in tied_logits(),
        history in prop::collection::vec(0u32..90, 0..30),
        repeat_penalty in 0.2f32..3.0,
        presence_penalty in -1f32..2.0,
    ) {
        let params = SamplingParams { repeat_penalty, presence_penalty, repeat_last_n: 8, ..SamplingParams::greedy() };
        let mut penalised = logits.clone();
        apply_penalties(&mut penalised, &history, &params);
        let mut s = Sampler::new(params).unwrap();
        prop_assert_eq!(s.sample(&logits, &history), argmax(&penalised));
    }
}

// ---------------------------------------------------------------- stop strings

/// Feeds `chunks`, returns (everything emitted including `finish`, stopped).
fn stream(stops: &[&str], chunks: &[&str]) -> (String, bool) {
    let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
    let mut out = String::new();
    for c in chunks {
        let (emit, stopped) = m.push(c);
        out.push_str(&emit);
        if stopped {
            assert!(m.is_stopped());
            assert_eq!(m.push("more"), (String::new(), true));
            assert_eq!(m.finish(), "");
            return (out, true);
        }
    }
    out.push_str(&m.finish());
    (out, false)
}

#[test]
fn stop_split_across_pushes() {
    let mut m = StopMatcher::new(vec!["</s>".into()]);
    assert_eq!(m.push("Hello <"), ("Hello ".to_string(), false));
    assert_eq!(m.push("/"), (String::new(), false));
    assert_eq!(m.push("s> tail"), (String::new(), true));
    assert!(m.is_stopped());

    let mut m = StopMatcher::new(vec!["</s>".into()]);
    assert_eq!(m.push("a<"), ("a".to_string(), false));
    assert_eq!(m.push("b"), ("<b".to_string(), false)); // ruled out → released once
    assert_eq!(m.push("c</s"), ("c".to_string(), false));
    assert_eq!(m.finish(), "</s"); // generation ended: held text is not lost
}

#[test]
fn stop_found_inside_single_push_and_repeated_prefix() {
    assert_eq!(stream(&["STOP"], &["abcSTOPdef"]), ("abc".into(), true));
    // "aab" with stop "ab": the first 'a' is released, the second held, then cut.
    let mut m = StopMatcher::new(vec!["ab".into()]);
    assert_eq!(m.push("aa"), ("a".to_string(), false));
    assert_eq!(m.push("b"), (String::new(), true));
    // Partial prefixes that repeat: "xxy" inside "xxxy".
    assert_eq!(stream(&["xxy"], &["x", "x", "x", "y"]), ("x".into(), true));
}

#[test]
fn stop_overlapping_stops() {
    // "bc" completes before "abcd": it wins regardless of chunking.
    assert_eq!(stream(&["abcd", "bc"], &["abcd"]), ("a".into(), true));
    assert_eq!(
        stream(&["abcd", "bc"], &["a", "b", "c", "d"]),
        ("a".into(), true)
    );
    // Both complete at the same position: the longer one is cut.
    assert_eq!(stream(&["abc", "bc"], &["xabc"]), ("x".into(), true));
    assert_eq!(
        stream(&["bc", "abc"], &["x", "ab", "c"]),
        ("x".into(), true)
    );
    // A stop that is a prefix of another completes first.
    assert_eq!(stream(&["ab", "abc"], &["zab", "c"]), ("z".into(), true));
}

#[test]
fn stop_multibyte_utf8() {
    let mut m = StopMatcher::new(vec!["日本語".into(), "é!".into()]);
    assert_eq!(m.push("où日"), ("où".to_string(), false));
    assert_eq!(m.push("本"), (String::new(), false));
    assert_eq!(m.push("x"), ("日本x".to_string(), false));
    assert_eq!(m.push("café"), ("caf".to_string(), false));
    assert_eq!(m.push("!"), (String::new(), true));
    assert_eq!(stream(&["🛑"], &["go 🚀", "🛑 no"]), ("go 🚀".into(), true));
}

#[test]
fn stop_empty_and_none() {
    assert_eq!(stream(&[""], &["abc", ""]), ("abc".into(), false));
    let mut m = StopMatcher::new(vec![]);
    assert_eq!(m.push("abc"), ("abc".to_string(), false));
    assert_eq!(m.finish(), "");
    // Reuse after finish.
    let mut m = StopMatcher::new(vec!["x".into()]);
    assert!(m.push("ax").1);
    assert_eq!(m.finish(), "");
    assert_eq!(m.push("bx"), ("b".to_string(), true));
}

/// Reference: cut at the stop string that completes first (ties: earliest start).
fn reference_stop(text: &str, stops: &[String]) -> (String, bool) {
    let best = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()).map(|at| (at + s.len(), at)))
        .min();
    match best {
        Some((_, at)) => (text[..at].to_string(), true),
        None => (text.to_string(), false),
    }
}

fn small_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!['a', 'b', 'é', '日', ' ']), 0..max)
        .prop_map(|v| v.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any chunking gives the reference result: nothing lost, nothing duplicated, stop string
    /// never emitted, every emitted piece is valid UTF-8 (it is a `String`) on char boundaries.
    #[test]
    fn stop_matcher_chunking_invariant(
        text in small_text(30),
        stops in prop::collection::vec(small_text(4), 0..4),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut bounds: Vec<usize> = cuts
            .iter()
            .filter(|_| !chars.is_empty())
            .map(|i| chars[i.index(chars.len())].0)
            .collect();
        bounds.push(0);
        bounds.push(text.len());
        bounds.sort_unstable();
        bounds.dedup();
        let chunks: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();

        let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
        let got = stream(&stop_refs, &chunks);
        prop_assert_eq!(&got, &reference_stop(&text, &stops));
        prop_assert!(text.starts_with(&got.0));
    }
}
