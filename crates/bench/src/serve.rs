//! The interactive-service load generator of `bench serve`: drives any OpenAI-compatible server over
//! HTTP with streaming chat requests sent at given arrival times (Poisson at a rate, or replayed from a
//! trace), and reports what the anchors report — throughput (requests and output tokens per second),
//! normalized latency (seconds per output token, averaged over requests), TTFT and time per output
//! token at p50/p90/p99 — and whether a service-level objective holds.
//!
//! Times are taken on the client: TTFT from sending the request to the first chunk with content, TPOT
//! as (last content chunk − first) / (output tokens − 1). A request fails when the server answers an
//! error, the connection breaks, it exceeds the request timeout, or it is still running when the
//! point's drain time is over; failed requests are counted, never averaged in. A point where nothing
//! completes is a point with no latencies (and an unmet objective), not an error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// One chat request to send.
#[derive(Clone, Debug, Default)]
pub struct Job {
    /// The model id to name (`model` or `model:cloud-prompt`).
    pub model: String,
    /// `(role, content)` in order.
    pub messages: Vec<(String, String)>,
    pub max_tokens: usize,
    /// The bearer token of this request, instead of the target's (a tenant of its own).
    pub api_key: Option<String>,
    /// EdgePrompt's `edge_prompt` field: one of the tenant's edge prompts by name.
    pub edge_prompt: Option<String>,
}

/// Where to send requests.
#[derive(Clone, Debug)]
pub struct Target {
    /// Base URL without `/v1` (`http://127.0.0.1:8000`).
    pub base_url: String,
    pub api_key: Option<String>,
}

/// What became of one request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// Seconds after the point's start when it was sent.
    pub sent_s: f64,
    pub ok: bool,
    pub error: Option<String>,
    pub ttft_s: Option<f64>,
    pub e2e_s: f64,
    pub output_tokens: usize,
    pub tpot_s: Option<f64>,
    /// The response's HTTP status (0: no response).
    #[serde(default)]
    pub status: u16,
    /// Its `Retry-After` header, when it had one.
    #[serde(default)]
    pub retry_after: Option<String>,
    /// The stream ended as a finished response does: a `finish_reason`, then `[DONE]`.
    #[serde(default)]
    pub finished: bool,
    /// The generated text (the deltas' content in order); never written to records.
    #[serde(skip)]
    pub text: String,
    /// The response's `X-Served-By` header: which server behind a router answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
}

/// The objective a rate must meet: p90 TTFT and p90 TPOT at most these.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Slo {
    pub ttft_p90_s: f64,
    pub tpot_p90_s: f64,
}

impl Default for Slo {
    fn default() -> Self {
        Self {
            ttft_p90_s: 2.0,
            tpot_p90_s: 0.150,
        }
    }
}

/// The statistics of one point (one rate against one system).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PointStats {
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// The most frequent failure, if any.
    pub failure: Option<String>,
    /// Seconds from the first request sent to the last one finished (or given up).
    pub duration_s: f64,
    pub throughput_req_s: f64,
    pub throughput_tok_s: f64,
    /// Mean over completed requests of end-to-end latency / output tokens.
    pub normalized_latency_s_per_token: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p90_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub tpot_p50_ms: Option<f64>,
    pub tpot_p90_ms: Option<f64>,
    pub tpot_p99_ms: Option<f64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p90_ms: Option<f64>,
    /// p90s within the objective, and every request completed.
    pub slo_met: bool,
    /// CPU time the load generator's process used during the point, in % of one core.
    pub loadgen_cpu_pct: Option<f64>,
}

/// The `p`-th percentile (0–100) of `v` by linear interpolation between closest ranks (numpy's
/// default); `None` for an empty slice.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (s.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(s[lo] + (s[hi] - s[lo]) * (rank - lo as f64))
}

/// Arrival offsets (seconds) of `n` requests from a Poisson process of `rate` per second, seeded.
pub fn poisson_arrivals(rate: f64, n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut uniform = move || {
        // xorshift64*, mapped to (0, 1].
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        (r as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let at = t;
            t += -uniform().ln() / rate;
            at
        })
        .collect()
}

/// Arrival offsets from a trace's timestamps (seconds, any origin): the first `n` after `skip`,
/// shifted to start at 0 and scaled so their mean rate is `rate` (`None`: as recorded).
pub fn trace_arrivals(timestamps: &[f64], skip: usize, n: usize, rate: Option<f64>) -> Vec<f64> {
    let t: Vec<f64> = timestamps.iter().skip(skip).take(n).copied().collect();
    let Some(&t0) = t.first() else {
        return Vec::new();
    };
    let span = t.last().map_or(0.0, |l| l - t0);
    let scale = match rate {
        Some(r) if span > 0.0 && t.len() > 1 => (t.len() - 1) as f64 / r / span,
        _ => 1.0,
    };
    t.iter().map(|x| (x - t0) * scale).collect()
}

/// Reads the `TIMESTAMP` column of an Azure LLM inference trace CSV (`TIMESTAMP,ContextTokens,
/// GeneratedTokens`, timestamps like `2023-11-16 18:15:46.6805900`) as seconds since the first, with
/// the token columns.
pub fn read_azure_trace(path: &std::path::Path) -> Result<Vec<(f64, usize, usize)>, String> {
    let mut r = csv::Reader::from_path(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| format!("{}: row {}: {e}", path.display(), i + 2))?;
        let bad = |what: &str| format!("{}: row {}: {what}", path.display(), i + 2);
        let ts = rec.get(0).ok_or_else(|| bad("no timestamp"))?;
        let secs = parse_clock(ts).ok_or_else(|| bad("bad timestamp"))?;
        let ctx = rec
            .get(1)
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| bad("bad ContextTokens"))?;
        let gen = rec
            .get(2)
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| bad("bad GeneratedTokens"))?;
        out.push((secs, ctx, gen));
    }
    if out.is_empty() {
        return Err(format!("{}: no rows", path.display()));
    }
    let t0 = out[0].0;
    for o in &mut out {
        o.0 -= t0;
    }
    Ok(out)
}

/// `YYYY-MM-DD HH:MM:SS.fffffff` → seconds within a day-count epoch (only differences matter).
fn parse_clock(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let mut t = time.split(':');
    let (h, min, sec): (f64, f64, f64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    // Days from a civil date (Howard Hinnant's algorithm), enough to order timestamps across months.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (Linux).
pub fn process_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line (11 and 12 after the state field's start),
    // in USER_HZ ticks, which Linux fixes at 100 for this interface.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / 100.0)
}

/// Sends one streaming chat request and times it (`run_point` sends its jobs through this; a driver
/// with its own schedule or retries calls it directly).
pub async fn send(
    client: &reqwest::Client,
    target: &Target,
    job: &Job,
    timeout: Duration,
) -> Outcome {
    one(client, target, job, timeout, Instant::now()).await
}

/// Sends one streaming chat request and times it.
async fn one(
    client: &reqwest::Client,
    target: &Target,
    job: &Job,
    timeout: Duration,
    start: Instant,
) -> Outcome {
    let sent = Instant::now();
    let sent_s = sent.duration_since(start).as_secs_f64();
    let mut body = serde_json::json!({
        "model": job.model,
        "messages": job.messages.iter().map(|(r, c)| serde_json::json!({"role": r, "content": c})).collect::<Vec<_>>(),
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(e) = &job.edge_prompt {
        body["edge_prompt"] = e.as_str().into();
    }
    // What the response said besides its tokens (written by `run`, read after it).
    let (mut status, mut retry_after, mut finished) = (0u16, None::<String>, false);
    let (mut text, mut served_by) = (String::new(), None::<String>);
    let run = async {
        let mut req = client
            .post(format!("{}/v1/chat/completions", target.base_url))
            .json(&body);
        if let Some(k) = job.api_key.as_ref().or(target.api_key.as_ref()) {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| format!("connect: {e}"))?;
        status = resp.status().as_u16();
        retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        served_by = resp
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let mut saw_reason = false;
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let (mut first, mut last) = (None, None);
        let mut chunks = 0usize;
        let mut usage: Option<usize> = None;
        while let Some(b) = stream.next().await {
            let b = b.map_err(|e| format!("stream: {e}"))?;
            let now = Instant::now();
            buf.extend_from_slice(&b);
            while let Some(i) = find_event_end(&buf) {
                let event: Vec<u8> = buf.drain(..i).collect();
                for line in event.split(|&c| c == b'\n') {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let Some(data) = line.strip_prefix(b"data:") else {
                        continue;
                    };
                    let data = data.trim_ascii();
                    if data == b"[DONE]" {
                        finished = saw_reason;
                        continue;
                    }
                    let v: serde_json::Value =
                        serde_json::from_slice(data).map_err(|e| format!("bad SSE data: {e}"))?;
                    if let Some(e) = v.get("error") {
                        return Err(format!("error event: {}", e["message"]));
                    }
                    let delta = v["choices"][0]["delta"]["content"].as_str();
                    text.push_str(delta.unwrap_or(""));
                    if delta.is_some_and(|c| !c.is_empty()) {
                        chunks += 1;
                        first.get_or_insert(now);
                        last = Some(now);
                    }
                    saw_reason |= v["choices"][0]["finish_reason"].is_string();
                    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                        usage = Some(n as usize);
                    }
                }
            }
        }
        Ok((first, last, usage.unwrap_or(chunks)))
    };
    let result = tokio::time::timeout(timeout, run).await;
    let fail = |e: String| Outcome {
        sent_s,
        ok: false,
        error: Some(e),
        ttft_s: None,
        e2e_s: sent.elapsed().as_secs_f64(),
        output_tokens: 0,
        tpot_s: None,
        status,
        retry_after: retry_after.clone(),
        finished: false,
        text: String::new(),
        served_by: served_by.clone(),
    };
    match result {
        Err(_) => fail("timeout".into()),
        Ok(Err(e)) => fail(e),
        Ok(Ok((first, last, n))) => {
            let e2e_s = sent.elapsed().as_secs_f64();
            let ttft_s = first.map(|f| f.duration_since(sent).as_secs_f64());
            let tpot_s = match (first, last) {
                (Some(f), Some(l)) if n > 1 => {
                    Some(l.duration_since(f).as_secs_f64() / (n - 1) as f64)
                }
                _ => None,
            };
            Outcome {
                sent_s,
                ok: n > 0,
                error: (n == 0).then(|| "no tokens".to_string()),
                ttft_s,
                e2e_s,
                output_tokens: n,
                tpot_s,
                status,
                retry_after: None,
                finished,
                text,
                served_by,
            }
        }
    }
}

/// The end (exclusive, past the blank line) of the first complete SSE event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let a = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let b = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// Sends `jobs[i]` at `arrivals[i]` seconds after the start (each in its own task), waits for all
/// of them — those still running `drain` after the last arrival are given up as failed — and returns
/// every outcome (in job order) with the point's statistics.
pub async fn run_point(
    client: &reqwest::Client,
    target: &Target,
    jobs: &[Job],
    arrivals: &[f64],
    timeout: Duration,
    drain: Duration,
    slo: Slo,
) -> (Vec<Outcome>, PointStats) {
    assert_eq!(jobs.len(), arrivals.len(), "one arrival per job");
    let start = Instant::now();
    let cpu0 = process_cpu_s();
    let target = Arc::new(target.clone());
    let mut tasks = Vec::with_capacity(jobs.len());
    for (job, &at) in jobs.iter().zip(arrivals) {
        let (client, target, job) = (client.clone(), target.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until((start + Duration::from_secs_f64(at.max(0.0))).into()).await;
            one(&client, &target, &job, timeout, start).await
        }));
    }
    let last = arrivals.iter().copied().fold(0.0f64, f64::max);
    let give_up = start + Duration::from_secs_f64(last) + drain;
    let mut out = Vec::with_capacity(tasks.len());
    for (t, &at) in tasks.into_iter().zip(arrivals) {
        let left = give_up.saturating_duration_since(Instant::now());
        let abort = t.abort_handle();
        match tokio::time::timeout(left, t).await {
            Ok(Ok(o)) => out.push(o),
            Ok(Err(e)) => out.push(Outcome {
                sent_s: at,
                ok: false,
                error: Some(format!("task: {e}")),
                ttft_s: None,
                e2e_s: 0.0,
                output_tokens: 0,
                tpot_s: None,
                ..Outcome::default()
            }),
            Err(_) => {
                abort.abort();
                out.push(Outcome {
                    sent_s: at,
                    ok: false,
                    error: Some("unfinished at the end of the drain time".into()),
                    ttft_s: None,
                    e2e_s: start.elapsed().as_secs_f64() - at,
                    output_tokens: 0,
                    tpot_s: None,
                    ..Outcome::default()
                });
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu0, process_cpu_s()) {
        (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall * 100.0),
        _ => None,
    };
    let mut stats = stats_of(&out, slo);
    stats.loadgen_cpu_pct = cpu;
    (out, stats)
}

/// The statistics of a point's outcomes.
pub fn stats_of(out: &[Outcome], slo: Slo) -> PointStats {
    let ok: Vec<&Outcome> = out.iter().filter(|o| o.ok).collect();
    let first = out.iter().map(|o| o.sent_s).fold(f64::INFINITY, f64::min);
    let end = out
        .iter()
        .map(|o| o.sent_s + o.e2e_s)
        .fold(0.0f64, f64::max);
    let duration_s = if out.is_empty() {
        0.0
    } else {
        (end - first).max(0.0)
    };
    let ms = |v: Vec<f64>, p: f64| percentile(&v, p).map(|x| x * 1e3);
    let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_s).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|o| o.tpot_s).collect();
    let e2e: Vec<f64> = ok.iter().map(|o| o.e2e_s).collect();
    let tokens: usize = ok.iter().map(|o| o.output_tokens).sum();
    let norm: Vec<f64> = ok
        .iter()
        .filter(|o| o.output_tokens > 0)
        .map(|o| o.e2e_s / o.output_tokens as f64)
        .collect();
    let mut failures: std::collections::BTreeMap<&str, usize> = Default::default();
    for o in out.iter().filter(|o| !o.ok) {
        *failures
            .entry(o.error.as_deref().unwrap_or("?"))
            .or_default() += 1;
    }
    let failure = failures
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(e, n)| format!("{e} (×{n})"));
    let mut s = PointStats {
        requests: out.len(),
        completed: ok.len(),
        failed: out.len() - ok.len(),
        failure,
        duration_s,
        throughput_req_s: if duration_s > 0.0 {
            ok.len() as f64 / duration_s
        } else {
            0.0
        },
        throughput_tok_s: if duration_s > 0.0 {
            tokens as f64 / duration_s
        } else {
            0.0
        },
        normalized_latency_s_per_token: (!norm.is_empty())
            .then(|| norm.iter().sum::<f64>() / norm.len() as f64),
        ttft_p50_ms: ms(ttft.clone(), 50.0),
        ttft_p90_ms: ms(ttft.clone(), 90.0),
        ttft_p99_ms: ms(ttft, 99.0),
        tpot_p50_ms: ms(tpot.clone(), 50.0),
        tpot_p90_ms: ms(tpot.clone(), 90.0),
        tpot_p99_ms: ms(tpot, 99.0),
        e2e_p50_ms: ms(e2e.clone(), 50.0),
        e2e_p90_ms: ms(e2e, 90.0),
        slo_met: false,
        loadgen_cpu_pct: None,
    };
    s.slo_met = s.failed == 0
        && s.ttft_p90_ms.is_some_and(|t| t <= slo.ttft_p90_s * 1e3)
        && s.tpot_p90_ms.is_some_and(|t| t <= slo.tpot_p90_s * 1e3);
    s
}

/// The highest rate of `points` (rate, objective met) such that the objective holds there (and, on a
/// grid, at every lower rate measured: a met rate above an unmet one is noise, not capacity).
pub fn slo_rate(points: &[(f64, bool)]) -> Option<f64> {
    let mut p: Vec<(f64, bool)> = points.to_vec();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut best = None;
    for (r, ok) in p {
        if !ok {
            break;
        }
        best = Some(r);
    }
    best
}

/// Bisection for the highest rate meeting the objective, between `lo` and `hi`, until the bracket
/// is within `tolerance` (relative) or `max_points` were measured: [`Bisect::next`] names the rate
/// to measure, [`Bisect::record`] takes its result. `lo` is measured first (if unmet, no rate is),
/// then `hi` (if met, it is the answer), then geometric midpoints.
#[derive(Clone, Debug)]
pub struct Bisect {
    lo: f64,
    hi: f64,
    tolerance: f64,
    max_points: usize,
    measured: Vec<(f64, bool)>,
    best: Option<f64>,
    done: bool,
}

impl Bisect {
    pub fn new(lo: f64, hi: f64, tolerance: f64, max_points: usize) -> Self {
        Self {
            lo,
            hi,
            tolerance,
            max_points: max_points.max(2),
            measured: Vec::new(),
            best: None,
            done: false,
        }
    }

    /// The next rate to measure, or `None` when the search is over.
    pub fn next(&self) -> Option<f64> {
        if self.done {
            return None;
        }
        Some(match self.measured.len() {
            0 => self.lo,
            1 => self.hi,
            _ => (self.lo * self.hi).sqrt(),
        })
    }

    /// The result at `rate` (the one [`Bisect::next`] named).
    pub fn record(&mut self, rate: f64, met: bool) {
        self.measured.push((rate, met));
        match self.measured.len() {
            1 if !met => self.done = true,
            1 => self.best = Some(rate),
            2 if met => {
                self.best = Some(rate);
                self.done = true;
            }
            2 => {}
            _ if met => {
                self.lo = rate;
                self.best = Some(rate);
            }
            _ => self.hi = rate,
        }
        if !self.done
            && self.measured.len() >= 2
            && ((self.hi - self.lo) / self.lo <= self.tolerance
                || self.measured.len() >= self.max_points)
        {
            self.done = true;
        }
    }

    /// The highest rate found to meet the objective.
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// Every point measured, in order.
    pub fn measured(&self) -> &[(f64, bool)] {
        &self.measured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy() {
        // numpy.percentile([1, 2, 3, 4, 10], [50, 90, 99]) = [3.0, 7.6, 9.76]
        let v = [4.0, 1.0, 10.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert!((percentile(&v, 90.0).unwrap() - 7.6).abs() < 1e-12);
        assert!((percentile(&v, 99.0).unwrap() - 9.76).abs() < 1e-12);
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[5.0], 99.0), Some(5.0));
    }

    #[test]
    fn poisson_arrivals_have_the_rate() {
        let a = poisson_arrivals(4.0, 20_000, 7);
        assert_eq!(a[0], 0.0);
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        let rate = (a.len() - 1) as f64 / a.last().unwrap();
        assert!((rate - 4.0).abs() < 0.1, "{rate}");
        // Exponential gaps: the coefficient of variation is 1.
        let gaps: Vec<f64> = a.windows(2).map(|w| w[1] - w[0]).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((var.sqrt() / mean - 1.0).abs() < 0.05);
        assert_eq!(a, poisson_arrivals(4.0, 20_000, 7));
        assert_ne!(a, poisson_arrivals(4.0, 20_000, 8));
    }

    #[test]
    fn trace_arrivals_are_shifted_and_scaled() {
        let t = [10.0, 11.0, 13.0, 14.0, 20.0];
        assert_eq!(trace_arrivals(&t, 1, 3, None), vec![0.0, 2.0, 3.0]);
        // Mean rate 2/s over 2 gaps: span 1 s.
        assert_eq!(
            trace_arrivals(&t, 1, 3, Some(2.0)),
            vec![0.0, 2.0 / 3.0, 1.0]
        );
        assert!(trace_arrivals(&t, 9, 3, None).is_empty());
    }

    #[test]
    fn azure_timestamps_parse() {
        let a = parse_clock("2023-11-16 18:15:46.6805900").unwrap();
        let b = parse_clock("2023-11-16 18:15:50.1805900").unwrap();
        assert!((b - a - 3.5).abs() < 1e-6);
        let c = parse_clock("2023-12-01 00:00:00").unwrap();
        let d = parse_clock("2023-11-30 23:59:59").unwrap();
        assert!((c - d - 1.0).abs() < 1e-6);
        assert!(parse_clock("yesterday").is_none());
    }

    fn outcome(sent: f64, ok: bool, ttft: f64, e2e: f64, n: usize) -> Outcome {
        Outcome {
            sent_s: sent,
            ok,
            error: (!ok).then(|| "HTTP 429".to_string()),
            ttft_s: ok.then_some(ttft),
            e2e_s: e2e,
            output_tokens: if ok { n } else { 0 },
            tpot_s: ok.then(|| (e2e - ttft) / (n - 1) as f64),
            ..Outcome::default()
        }
    }

    #[test]
    fn stats_and_the_objective() {
        let out = [
            outcome(0.0, true, 0.5, 2.0, 11),
            outcome(1.0, true, 1.0, 3.0, 11),
            outcome(2.0, false, 0.0, 0.1, 0),
        ];
        let s = stats_of(&out, Slo::default());
        assert_eq!((s.requests, s.completed, s.failed), (3, 2, 1));
        assert_eq!(s.failure.as_deref(), Some("HTTP 429 (×1)"));
        assert!((s.duration_s - 4.0).abs() < 1e-12);
        assert!((s.throughput_req_s - 0.5).abs() < 1e-12);
        assert!((s.throughput_tok_s - 22.0 / 4.0).abs() < 1e-12);
        let norm = (2.0 / 11.0 + 3.0 / 11.0) / 2.0;
        assert!((s.normalized_latency_s_per_token.unwrap() - norm).abs() < 1e-12);
        assert!((s.ttft_p50_ms.unwrap() - 750.0).abs() < 1e-9);
        // A failure breaks the objective even with good latencies.
        assert!(!s.slo_met);
        let s = stats_of(&out[..2], Slo::default());
        assert!(!s.slo_met, "TPOT 150+ ms: {:?}", s.tpot_p90_ms);
        let s = stats_of(
            &out[..2],
            Slo {
                ttft_p90_s: 2.0,
                tpot_p90_s: 0.2,
            },
        );
        assert!(s.slo_met);
        // Nothing completed: reported, no latencies, objective unmet.
        let s = stats_of(&out[2..], Slo::default());
        assert_eq!(s.completed, 0);
        assert!(s.ttft_p90_ms.is_none() && s.normalized_latency_s_per_token.is_none());
        assert!(!s.slo_met);
        assert_eq!(s.throughput_tok_s, 0.0);
        let s = stats_of(&[], Slo::default());
        assert_eq!(s.requests, 0);
    }

    #[test]
    fn slo_rate_on_a_grid_and_by_bisection() {
        assert_eq!(
            slo_rate(&[(1.0, true), (2.0, true), (4.0, false)]),
            Some(2.0)
        );
        assert_eq!(
            slo_rate(&[(4.0, true), (1.0, true), (2.0, false)]),
            Some(1.0)
        );
        assert_eq!(slo_rate(&[(1.0, false)]), None);
        assert_eq!(slo_rate(&[]), None);
        // A server whose capacity is 3.3 req/s.
        let search = |ok: &dyn Fn(f64) -> bool| {
            let mut b = Bisect::new(0.5, 16.0, 0.1, 20);
            while let Some(r) = b.next() {
                b.record(r, ok(r));
            }
            b
        };
        let b = search(&|r| r <= 3.3);
        let r = b.best().unwrap();
        assert!((3.3 / 1.1..=3.3).contains(&r), "{r} {:?}", b.measured());
        assert!(b.measured().len() < 20);
        let b = search(&|_| false);
        assert_eq!((b.best(), b.measured().len()), (None, 1));
        let b = search(&|_| true);
        assert_eq!((b.best(), b.measured().len()), (Some(16.0), 2));
        // The point budget ends the search.
        let mut b = Bisect::new(0.5, 16.0, 1e-9, 5);
        while let Some(r) = b.next() {
            b.record(r, r <= 3.3);
        }
        assert_eq!(b.measured().len(), 5);
    }
}
