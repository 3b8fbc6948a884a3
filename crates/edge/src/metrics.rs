//! Prometheus metrics under vLLM-style names (`edgeprompt:…`), served at `/metrics` in the text
//! exposition format. Counters get `_total` appended by the encoder.

use std::sync::Mutex;

use ep_engine::{EngineStats, StepTotals};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::fetch::TrafficStats;

/// The edge's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub running: Gauge,
    pub waiting: Gauge,
    /// Requests accepted by the HTTP layer and not yet answered (queued here or in the engine).
    pub in_flight: Gauge,
    pub kv_usage: Gauge<f64, AtomicU64>,
    pub prefix_queries: Counter,
    pub prefix_hits: Counter,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub success: Counter,
    pub errors: Counter,
    pub rejected_queue_full: Counter,
    pub stalled: Counter,
    pub cloud_down: Counter,
    pub frames_refetched: Counter,
    pub cloud_up: Counter,
    /// How cloud prompts' KV was obtained, per strategy (`fetch-f16`, `split`, `recompute`, …).
    pub kv_decisions: Family<StrategyLabel, Counter>,
    pub link_rtt: Gauge<f64, AtomicU64>,
    pub link_rate: Gauge<f64, AtomicU64>,
    /// 1 once the adaptive policy's start-up measurements are done.
    pub planner_ready: Gauge,
    /// The engine's steps, their tokens and where their time went, by kind of step.
    steps: Family<StepLabel, Counter>,
    step_tokens: Family<StepTokensLabel, Counter>,
    step_seconds: Family<StepPhaseLabel, Counter<f64, AtomicU64>>,
}

/// `step`: `decode` (decode rows only) or `prefill` (with prompt rows).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

/// `kind`: `prefill` or `decode` rows.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StepTokensLabel {
    step: &'static str,
    kind: &'static str,
}

/// `phase`: `weights` (weight products, logits included), `attention`, `other` (the rest of the
/// forward pass) or `scheduler`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StepPhaseLabel {
    step: &'static str,
    phase: &'static str,
}

/// The label of [`Metrics::kv_decisions`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct StrategyLabel {
    pub strategy: String,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0,
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::default()),
            ttft: Histogram::new(latency_buckets()),
            itl: Histogram::new(latency_buckets()),
            e2e: Histogram::new(latency_buckets()),
            running: Gauge::default(),
            waiting: Gauge::default(),
            in_flight: Gauge::default(),
            kv_usage: Gauge::default(),
            prefix_queries: Counter::default(),
            prefix_hits: Counter::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            success: Counter::default(),
            errors: Counter::default(),
            rejected_queue_full: Counter::default(),
            stalled: Counter::default(),
            cloud_down: Counter::default(),
            frames_refetched: Counter::default(),
            cloud_up: Counter::default(),
            kv_decisions: Family::default(),
            link_rtt: Gauge::default(),
            link_rate: Gauge::default(),
            planner_ready: Gauge::default(),
            steps: Family::default(),
            step_tokens: Family::default(),
            step_seconds: Family::default(),
        };
        {
            let mut r = m.registry.lock().expect("metrics lock");
            let p = "edgeprompt:";
            macro_rules! reg {
                ($name:expr, $help:expr, $m:expr) => {
                    r.register(format!("{p}{}", $name), $help, $m)
                };
            }
            reg!(
                "time_to_first_token_seconds",
                "Time to the first generated token",
                m.ttft.clone()
            );
            reg!(
                "inter_token_latency_seconds",
                "Time between consecutive generated tokens",
                m.itl.clone()
            );
            reg!(
                "e2e_request_latency_seconds",
                "Time from submission to the last token",
                m.e2e.clone()
            );
            reg!(
                "num_requests_running",
                "Requests the engine is running",
                m.running.clone()
            );
            reg!(
                "num_requests_waiting",
                "Requests waiting for admission in the engine",
                m.waiting.clone()
            );
            reg!(
                "num_requests_in_flight",
                "Requests accepted by the HTTP layer and not yet answered",
                m.in_flight.clone()
            );
            reg!(
                "kv_cache_usage_perc",
                "Fraction of the KV block pool in use (0 to 1)",
                m.kv_usage.clone()
            );
            reg!(
                "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                m.prefix_queries.clone()
            );
            reg!(
                "prefix_cache_hits",
                "Prompt tokens found in the prefix cache",
                m.prefix_hits.clone()
            );
            reg!(
                "prompt_tokens",
                "Prompt tokens of finished requests",
                m.prompt_tokens.clone()
            );
            reg!(
                "generation_tokens",
                "Generated tokens",
                m.generation_tokens.clone()
            );
            reg!(
                "request_success",
                "Requests that finished",
                m.success.clone()
            );
            reg!(
                "request_errors",
                "Requests answered with an error",
                m.errors.clone()
            );
            reg!(
                "request_rejected_queue_full",
                "Requests refused with 429 because the queue was full",
                m.rejected_queue_full.clone()
            );
            reg!(
                "connections_write_stalled",
                "Connections closed because the client read nothing for the write-stall timeout (their requests cancelled)",
                m.stalled.clone()
            );
            reg!(
                "cloud_bytes_received",
                "Bytes received from the cloud",
                m.cloud_down.clone()
            );
            reg!(
                "kv_frames_refetched",
                "KV frames that failed their digest or checks as received and were fetched again alone",
                m.frames_refetched.clone()
            );
            reg!(
                "cloud_bytes_sent",
                "Bytes sent to the cloud",
                m.cloud_up.clone()
            );
            reg!(
                "kv_strategy_decisions",
                "Cloud prompts whose KV was obtained with each strategy",
                m.kv_decisions.clone()
            );
            reg!(
                "link_rtt_seconds",
                "Round trip to the cloud as this edge measured it",
                m.link_rtt.clone()
            );
            reg!(
                "link_throughput_bytes_per_second",
                "Throughput from the cloud as this edge measured it",
                m.link_rate.clone()
            );
            reg!(
                "kv_planner_ready",
                "1 once the link was probed and this edge's prefill speed measured",
                m.planner_ready.clone()
            );
            reg!(
                "engine_steps",
                "Engine steps, by kind: decode rows only, or with prompt rows",
                m.steps.clone()
            );
            reg!(
                "engine_step_tokens",
                "Rows of the engine's steps: prompt (prefill) or decode tokens",
                m.step_tokens.clone()
            );
            reg!(
                "engine_step_seconds",
                "Time of the engine's steps by phase: weights, attention, other, scheduler",
                m.step_seconds.clone()
            );
        }
        m
    }

    /// Brings the KV-strategy counters and link gauges up to the fetcher's view.
    pub fn set_kv_view(
        &self,
        link: Option<crate::plan::LinkEstimate>,
        counts: &[(String, u64)],
        ready: bool,
    ) {
        self.planner_ready.set(i64::from(ready));
        if let Some(l) = link {
            self.link_rtt.set(l.rtt_s);
            self.link_rate.set(l.bytes_per_s);
        }
        for (strategy, n) in counts {
            let c = self.kv_decisions.get_or_create(&StrategyLabel {
                strategy: strategy.clone(),
            });
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    /// Brings the step counters of one kind up to the engine's totals.
    fn set_steps(&self, step: &'static str, t: &StepTotals) {
        let c = self.steps.get_or_create(&StepLabel { step });
        c.inc_by(t.steps.saturating_sub(c.get()));
        for (kind, n) in [("prefill", t.prefill_tokens), ("decode", t.decode_tokens)] {
            let c = self
                .step_tokens
                .get_or_create(&StepTokensLabel { step, kind });
            c.inc_by(n.saturating_sub(c.get()));
        }
        let other = t.secs - t.sched_secs - t.weights_secs - t.attention_secs;
        for (phase, v) in [
            ("weights", t.weights_secs),
            ("attention", t.attention_secs),
            ("other", other),
            ("scheduler", t.sched_secs),
        ] {
            let c = self
                .step_seconds
                .get_or_create(&StepPhaseLabel { step, phase });
            let d = v - c.get();
            if d > 0.0 {
                c.inc_by(d);
            }
        }
    }

    /// Brings the gauges and cloud counters up to date and encodes everything.
    pub fn render(&self, engine: &EngineStats, traffic: Option<TrafficStats>) -> String {
        self.running.set(engine.running as i64);
        self.waiting.set(engine.waiting as i64);
        let usage = if engine.kv_budget_bytes > 0 {
            engine.kv_used_bytes as f64 / engine.kv_budget_bytes as f64
        } else {
            0.0
        };
        self.kv_usage.set(usage);
        if let Some(t) = traffic {
            let r = self.registry.lock().expect("metrics lock");
            // Counters only go up: add what the fetcher counted since the last scrape.
            self.cloud_down
                .inc_by(t.bytes_down.saturating_sub(self.cloud_down.get()));
            self.cloud_up
                .inc_by(t.bytes_up.saturating_sub(self.cloud_up.get()));
            self.frames_refetched.inc_by(
                t.frames_refetched
                    .saturating_sub(self.frames_refetched.get()),
            );
            drop(r);
        }
        for (step, t) in [
            ("decode", &engine.decode_steps),
            ("prefill", &engine.prefill_steps),
        ] {
            self.set_steps(step, t);
        }
        let mut out = String::new();
        let r = self.registry.lock().expect("metrics lock");
        encode(&mut out, &r).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vllm_style_names() {
        let m = Metrics::new();
        m.ttft.observe(0.2);
        m.prefix_queries.inc_by(10);
        let stats = EngineStats {
            kv_budget_bytes: 100,
            kv_used_bytes: 25,
            running: 2,
            ..EngineStats::default()
        };
        let t = TrafficStats {
            bytes_down: 7,
            ..TrafficStats::default()
        };
        let s = m.render(&stats, Some(t));
        assert!(
            s.contains("edgeprompt:time_to_first_token_seconds_bucket"),
            "{s}"
        );
        assert!(
            s.contains("edgeprompt:prefix_cache_queries_total 10"),
            "{s}"
        );
        assert!(s.contains("edgeprompt:num_requests_running 2"), "{s}");
        assert!(s.contains("edgeprompt:kv_cache_usage_perc 0.25"), "{s}");
        assert!(s.contains("edgeprompt:cloud_bytes_received_total 7"), "{s}");
        let s = m.render(&stats, Some(t));
        assert!(s.contains("edgeprompt:cloud_bytes_received_total 7"), "{s}");
    }

    #[test]
    fn step_profile_counters_follow_the_engine_totals() {
        let m = Metrics::new();
        let mut stats = EngineStats {
            prefill_steps: StepTotals {
                steps: 3,
                prefill_tokens: 300,
                decode_tokens: 12,
                secs: 1.5,
                sched_secs: 0.25,
                weights_secs: 0.75,
                attention_secs: 0.25,
            },
            ..EngineStats::default()
        };
        let s = m.render(&stats, None);
        for line in [
            r#"edgeprompt:engine_steps_total{step="prefill"} 3"#,
            r#"edgeprompt:engine_steps_total{step="decode"} 0"#,
            r#"edgeprompt:engine_step_tokens_total{step="prefill",kind="prefill"} 300"#,
            r#"edgeprompt:engine_step_tokens_total{step="prefill",kind="decode"} 12"#,
            r#"edgeprompt:engine_step_seconds_total{step="prefill",phase="weights"} 0.75"#,
            r#"edgeprompt:engine_step_seconds_total{step="prefill",phase="other"} 0.25"#,
            r#"edgeprompt:engine_step_seconds_total{step="prefill",phase="scheduler"} 0.25"#,
        ] {
            assert!(s.lines().any(|l| l == line), "{line} not in\n{s}");
        }
        // Counters only go up, by what the engine added since the last scrape.
        stats.prefill_steps.steps = 5;
        stats.prefill_steps.weights_secs = 1.0;
        let s = m.render(&stats, None);
        assert!(
            s.lines()
                .any(|l| l == r#"edgeprompt:engine_steps_total{step="prefill"} 5"#),
            "{s}"
        );
        assert!(
            s.lines().any(|l| l
                == r#"edgeprompt:engine_step_seconds_total{step="prefill",phase="weights"} 1.0"#),
            "{s}"
        );
    }
}
