//! Single-sequence generation: prefill in chunks, then decode with sampling, stop strings, EOS and a
//! token limit. A [`Session`] keeps its sequence's KV between calls and reuses the longest common prefix
//! of the next prompt (a chat re-sends the whole conversation each turn).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::kv::{ContiguousKv, SeqId};
use crate::sampling::{Sampler, SamplingParams, StopMatcher};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{BatchSeq, LogitsFor, Model, ModelError};

/// Why generation ended (OpenAI's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// The token limit or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Prompt tokens per forward call during prefill.
    pub n_batch: usize,
    /// Report each generated token's log-probability under the model (the raw logits' softmax,
    /// before penalties and temperature) and this many most likely alternatives (`None`: none; the
    /// engine reports them, single-sequence sessions ignore it).
    pub logprobs: Option<usize>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ignore_eos: false,
            n_batch: 512,
            logprobs: None,
        }
    }
}

/// The result of one generation.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    /// Generated tokens, including the end-of-generation token that stopped it, if any.
    pub tokens: Vec<u32>,
    /// Generated text, without the end-of-generation token or the stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    /// Prompt tokens actually prefilled (those not reused from the session's KV).
    pub prefill_tokens: usize,
    pub prefill_secs: f64,
    /// Forward steps after the first generated token.
    pub decode_steps: usize,
    pub decode_secs: f64,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_secs)
    }
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// One sequence with its KV cache, reused across calls.
pub struct Session<'m> {
    model: &'m Model,
    kv: ContiguousKv,
    seq: SeqId,
    /// Tokens whose KV is in the cache.
    cached: Vec<u32>,
}

impl<'m> Session<'m> {
    /// A session whose sequence can hold `n_ctx` tokens.
    pub fn new(model: &'m Model, n_ctx: usize) -> Self {
        let mut kv = ContiguousKv::new(model.attn_shape(), n_ctx);
        let seq = kv.add_seq();
        Self {
            model,
            kv,
            seq,
            cached: Vec::new(),
        }
    }

    /// Context length of the session.
    pub fn n_ctx(&self) -> usize {
        self.kv.max_len()
    }

    /// Runs the prompt's tokens not already cached; returns the logits of the last prompt token.
    fn prefill(&mut self, prompt: &[u32], n_batch: usize) -> Result<(Vec<f32>, usize), ModelError> {
        let mut common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // The last prompt token is always recomputed: its logits are needed.
        common = common.min(prompt.len() - 1);
        self.kv.truncate(self.seq, common);
        self.cached.truncate(common);
        let mut logits = Vec::new();
        let todo = &prompt[common..];
        for chunk in todo.chunks(n_batch.max(1)) {
            let pos = self.cached.len();
            let last = pos + chunk.len() == prompt.len();
            let b = [BatchSeq {
                seq: self.seq,
                tokens: chunk,
                pos,
                logits: if last {
                    LogitsFor::Last
                } else {
                    LogitsFor::None
                },
            }];
            let out = self.model.forward(&b, &mut self.kv);
            if out.is_err() {
                // Leave the cache consistent: drop whatever this chunk may have stored.
                self.kv.truncate(self.seq, pos);
            }
            logits = out?;
            self.cached.extend_from_slice(chunk);
        }
        Ok((logits, todo.len()))
    }

    /// Generates from `prompt` (token ids, template already applied). `on_text` receives text as it
    /// becomes final (never broken UTF-8, never part of a stop string).
    pub fn generate(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation, ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::Request(
                "the prompt is empty (no tokens)".into(),
            ));
        }
        let n_ctx = self.n_ctx();
        if prompt.len() >= n_ctx {
            return Err(ModelError::Request(format!(
                "the prompt has {} tokens, more than the context of {n_ctx} allows (it must leave room for one generated token); raise --ctx-size or shorten the prompt",
                prompt.len()
            )));
        }
        let mut sampler = Sampler::new(params.sampling.clone())?;
        let t0 = Instant::now();
        let (mut logits, prefill_tokens) = self.prefill(prompt, params.n_batch)?;
        let prefill_secs = t0.elapsed().as_secs_f64();

        let mut history = prompt.to_vec();
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut decoder = StreamDecoder::new(tok);
        let mut stops = StopMatcher::new(params.stop.clone());
        let mut emit = |s: &str, text: &mut String| {
            if !s.is_empty() {
                on_text(s);
                text.push_str(s);
            }
        };
        let t1 = Instant::now();
        let mut decode_steps = 0;
        let mut hit_stop = false;
        let finish = loop {
            if tokens.len() >= params.max_tokens {
                break FinishReason::Length;
            }
            let next = sampler.sample(&logits, &history);
            tokens.push(next);
            history.push(next);
            if tok.is_eog(next) && !params.ignore_eos {
                break FinishReason::Stop;
            }
            let piece = decoder.push(next);
            let (out, stopped) = stops.push(&piece);
            emit(&out, &mut text);
            if stopped {
                hit_stop = true;
                break FinishReason::Stop;
            }
            if tokens.len() >= params.max_tokens {
                break FinishReason::Length;
            }
            if self.cached.len() + 1 > n_ctx - 1 {
                break FinishReason::Length;
            }
            let pos = self.cached.len();
            let b = [BatchSeq {
                seq: self.seq,
                tokens: std::slice::from_ref(&next),
                pos,
                logits: LogitsFor::Last,
            }];
            logits = self.model.forward(&b, &mut self.kv)?;
            self.cached.push(next);
            decode_steps += 1;
        };
        if !hit_stop {
            // Flush held-back bytes and text; a stop string may still complete in the tail.
            let (out, stopped) = stops.push(&decoder.finish());
            emit(&out, &mut text);
            if !stopped {
                emit(&stops.finish(), &mut text);
            }
        }
        Ok(Generation {
            prompt_tokens: prompt.to_vec(),
            tokens,
            text,
            finish_reason: finish,
            prefill_tokens,
            prefill_secs,
            decode_steps,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }
}
