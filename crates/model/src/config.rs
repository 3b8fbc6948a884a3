//! Model hyper-parameters read from GGUF metadata.

use crate::gguf::{Gguf, GgufError};
use crate::ModelError;

/// Architectures whose forward pass this build implements (the Llama family).
pub const SUPPORTED_ARCHS: &[&str] = &["llama"];

/// Hyper-parameters of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    /// Context length the model was trained for.
    pub n_ctx_train: usize,
    pub rope_base: f32,
    /// Multiplier on positions (1 / linear scaling factor).
    pub rope_freq_scale: f32,
    /// Number of leading dimensions of each head that RoPE rotates.
    pub rope_dims: usize,
    /// RoPE on half-split pairs (`true`) or adjacent pairs (`false`, Llama GGUFs).
    pub rope_neox: bool,
    pub rms_eps: f32,
}

impl ModelConfig {
    /// Reads the configuration; an unsupported architecture or RoPE scaling is an error naming it.
    pub fn from_gguf(g: &Gguf) -> Result<Self, ModelError> {
        let arch = g.get_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArch {
                path: g.path.clone(),
                arch,
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let opt_u32 = |k: &str| -> Result<Option<u32>, GgufError> {
            match g.get(&key(k)) {
                None => Ok(None),
                Some(_) => g.get_u32(&key(k)).map(Some),
            }
        };
        let n_embd = g.get_u32(&key("embedding_length"))? as usize;
        let n_head = g.get_u32(&key("attention.head_count"))? as usize;
        let n_head_kv = opt_u32("attention.head_count_kv")?.map_or(n_head, |v| v as usize);
        let head_dim = opt_u32("attention.key_length")?
            .map(|v| v as usize)
            .unwrap_or(n_embd.checked_div(n_head).unwrap_or(0));
        let n_vocab = match opt_u32("vocab_size")? {
            Some(v) => v as usize,
            None => g.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_freq_scale = match g.get(&key("rope.scaling.type")) {
            None => 1.0,
            Some(_) => match g.get_str(&key("rope.scaling.type"))? {
                "none" => 1.0,
                "linear" => {
                    let f = g.get_f32(&key("rope.scaling.factor"))?;
                    if f > 0.0 {
                        1.0 / f
                    } else {
                        1.0
                    }
                }
                other => {
                    return Err(ModelError::Invalid {
                        path: g.path.clone(),
                        what: format!("RoPE scaling type '{other}' is not supported"),
                    })
                }
            },
        };
        let cfg = ModelConfig {
            n_layer: g.get_u32(&key("block_count"))? as usize,
            n_embd,
            n_ff: g.get_u32(&key("feed_forward_length"))? as usize,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train: opt_u32("context_length")?.map_or(2048, |v| v as usize),
            rope_base: match g.get(&key("rope.freq_base")) {
                None => 10000.0,
                Some(_) => g.get_f32(&key("rope.freq_base"))?,
            },
            rope_freq_scale,
            rope_dims: opt_u32("rope.dimension_count")?.map_or(head_dim, |v| v as usize),
            rope_neox: false,
            rms_eps: g.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            arch,
        };
        cfg.validate().map_err(|what| ModelError::Invalid {
            path: g.path.clone(),
            what,
        })?;
        Ok(cfg)
    }

    /// Checks the shape relations the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.n_layer == 0 || self.n_embd == 0 || self.n_head == 0 || self.n_head_kv == 0 {
            return Err(format!("degenerate model shape {self:?}"));
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(format!(
                "head count {} is not a multiple of the KV head count {}",
                self.n_head, self.n_head_kv
            ));
        }
        if self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
            || self.rope_dims > self.head_dim
            || !self.rope_dims.is_multiple_of(2)
        {
            return Err(format!(
                "head dimension {} / RoPE dimensions {} are not usable",
                self.head_dim, self.rope_dims
            ));
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn gqa_group(&self) -> usize {
        self.n_head / self.n_head_kv
    }
}
