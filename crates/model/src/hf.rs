//! Hugging Face model directories: `config.json` plus one or more `*.safetensors` files (with
//! `model.safetensors.index.json` when sharded), for `LlamaForCausalLM`, `MistralForCausalLM` and
//! `Qwen2ForCausalLM`, with F32, F16 or BF16 weights.
//!
//! The safetensors files are memory-mapped and the weights used in place, as for GGUF. Differences from
//! a GGUF conversion of the same checkpoint, all deliberate:
//!
//! * **RoPE layout.** HF stores Q/K projections for the half-split ("NeoX", `rotate_half`) rotation;
//!   llama.cpp's converter permutes Llama's rows to the adjacent-pair layout and uses "normal" RoPE. The
//!   weights here are not permuted, so HF models run with `rope_neox = true` (all three architectures).
//! * **Activations stay f32** in the matmuls ([`ep_kernels::matmul::matmul_f32_act_with`]): F16 /
//!   BF16 weights are widened exactly and dotted with f32 activations, as `transformers` computes
//!   in f32, instead of rounding the activations to f16 / bf16 as ggml does for GGUF files.
//! * **Biases.** Optional Q/K/V (and O) projection biases (Qwen2, Llama with `attention_bias`) are
//!   added after the matmul.
//!
//! Everything read from the directory is checked; a problem is a [`ModelError`] naming the file.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use ep_kernels::matmul::{self, WeightRef};
use ep_kernels::GgmlType;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::llama::{Layer, Mat, Model, Weights};
use crate::tokenizer::Tokenizer;
use crate::ModelError;

/// `architectures[0]` values of `config.json` this build runs.
pub const SUPPORTED_HF_ARCHS: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

fn invalid(path: &Path, what: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Reads and parses a JSON file; errors name the file.
pub(crate) fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| invalid(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| invalid(path, format!("invalid JSON: {e}")))
}

/// Whether `path` is to be loaded as a Hugging Face model directory (any directory: one without
/// `config.json` is an error naming that file).
pub fn is_hf_dir(path: &Path) -> bool {
    path.is_dir()
}

// ---------------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------------

/// What `config.json` says beyond [`ModelConfig`].
#[derive(Clone, Debug)]
pub struct HfConfig {
    pub cfg: ModelConfig,
    /// `architectures[0]`.
    pub architecture: String,
    pub tie_word_embeddings: bool,
    /// Q/K/V projections have biases (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection has a bias (Llama with `attention_bias`).
    pub o_bias: bool,
}

/// Parses a `config.json` value (`path` only names the file in errors).
pub fn parse_config(path: &Path, v: &Value) -> Result<HfConfig, ModelError> {
    let obj = v
        .as_object()
        .ok_or_else(|| invalid(path, "expected a JSON object"))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let architecture = match get("architectures") {
        Some(Value::Array(a)) if !a.is_empty() => a[0]
            .as_str()
            .ok_or_else(|| invalid(path, "'architectures' must hold strings"))?
            .to_string(),
        Some(_) => return Err(invalid(path, "'architectures' must be a non-empty list")),
        None => match get("model_type").and_then(Value::as_str) {
            Some("llama") => "LlamaForCausalLM".into(),
            Some("mistral") => "MistralForCausalLM".into(),
            Some("qwen2") => "Qwen2ForCausalLM".into(),
            Some(other) => other.to_string(),
            None => {
                return Err(invalid(
                    path,
                    "neither 'architectures' nor 'model_type' is set",
                ))
            }
        },
    };
    if !SUPPORTED_HF_ARCHS.contains(&architecture.as_str()) {
        return Err(ModelError::UnsupportedHfArch {
            path: path.to_path_buf(),
            arch: architecture,
        });
    }
    let usize_of = |k: &str| -> Result<Option<usize>, ModelError> {
        match get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| invalid(path, format!("'{k}' = {v} is not a non-negative integer"))),
        }
    };
    let req_usize = |k: &str| -> Result<usize, ModelError> {
        usize_of(k)?.ok_or_else(|| invalid(path, format!("required key '{k}' is missing")))
    };
    let f64_of = |o: &serde_json::Map<String, Value>, k: &str| -> Result<Option<f64>, ModelError> {
        match o.get(k).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(path, format!("'{k}' = {v} is not a number"))),
        }
    };
    let bool_of = |k: &str, default: bool| -> Result<bool, ModelError> {
        match get(k) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(invalid(path, format!("'{k}' = {v} is not a boolean"))),
        }
    };
    if let Some(act) = get("hidden_act") {
        if act.as_str() != Some("silu") {
            return Err(invalid(
                path,
                format!("hidden_act {act} is not supported (only \"silu\")"),
            ));
        }
    }
    if get("quantization_config").is_some() {
        return Err(invalid(
            path,
            "quantized checkpoints (quantization_config) are not supported; use F32, F16 or BF16 weights",
        ));
    }
    if bool_of("mlp_bias", false)? {
        return Err(invalid(path, "mlp_bias = true is not supported"));
    }
    let qwen2 = architecture == "Qwen2ForCausalLM";
    let attention_bias = bool_of("attention_bias", false)?;

    let n_embd = req_usize("hidden_size")?;
    let n_head = req_usize("num_attention_heads")?;
    let n_head_kv = usize_of("num_key_value_heads")?.unwrap_or(n_head);
    let head_dim = match usize_of("head_dim")? {
        Some(h) => h,
        None => n_embd.checked_div(n_head).unwrap_or(0),
    };
    let top = obj.clone();
    // RoPE: transformers < 5 writes `rope_theta` / `rope_scaling`; 5 writes `rope_parameters`.
    let rope_params = get("rope_parameters").or_else(|| get("rope_scaling"));
    let rope_obj = match rope_params {
        None => None,
        Some(Value::Object(o)) => Some(o.clone()),
        Some(v) => {
            return Err(invalid(
                path,
                format!("RoPE parameters {v} are not an object"),
            ))
        }
    };
    let mut rope_base = f64_of(&top, "rope_theta")?;
    let mut rope_freq_scale = 1.0f32;
    if let Some(o) = &rope_obj {
        if rope_base.is_none() {
            rope_base = f64_of(o, "rope_theta")?;
        }
        let ty = o
            .get("rope_type")
            .or_else(|| o.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        match ty {
            "default" => {}
            "linear" => {
                let f = f64_of(o, "factor")?
                    .ok_or_else(|| invalid(path, "linear RoPE scaling without 'factor'"))?;
                if !(f > 0.0 && f.is_finite()) {
                    return Err(invalid(
                        path,
                        format!("RoPE scaling factor {f} must be positive"),
                    ));
                }
                rope_freq_scale = (1.0 / f) as f32;
            }
            other => {
                return Err(invalid(
                    path,
                    format!("RoPE scaling type '{other}' is not supported (only linear)"),
                ))
            }
        }
    }
    let rope_base = rope_base.unwrap_or(10000.0) as f32;
    if let Some(f) = f64_of(&top, "partial_rotary_factor")? {
        if f != 1.0 {
            return Err(invalid(
                path,
                format!("partial_rotary_factor {f} is not supported"),
            ));
        }
    }
    let rms_eps = f64_of(&top, "rms_norm_eps")?.unwrap_or(1e-6) as f32;
    let mut n_ctx_train = usize_of("max_position_embeddings")?.unwrap_or(2048);
    // Sliding-window attention is not implemented: within the window it is plain causal attention, so
    // the default context is capped at the window.
    let window = match architecture.as_str() {
        "MistralForCausalLM" => usize_of("sliding_window")?,
        "Qwen2ForCausalLM" if bool_of("use_sliding_window", false)? => usize_of("sliding_window")?,
        _ => None,
    };
    if let Some(w) = window.filter(|&w| w > 0 && w < n_ctx_train) {
        tracing::warn!(
            window = w,
            "sliding-window attention is not implemented: context capped at the window"
        );
        n_ctx_train = w;
    }
    let cfg = ModelConfig {
        arch: architecture.clone(),
        n_layer: req_usize("num_hidden_layers")?,
        n_embd,
        n_ff: req_usize("intermediate_size")?,
        n_head,
        n_head_kv,
        head_dim,
        n_vocab: req_usize("vocab_size")?,
        n_ctx_train,
        rope_base,
        rope_freq_scale,
        rope_dims: head_dim,
        rope_neox: true,
        rms_eps,
    };
    cfg.validate().map_err(|what| invalid(path, what))?;
    if cfg.n_vocab == 0 || cfg.n_ff == 0 {
        return Err(invalid(
            path,
            "vocab_size and intermediate_size must be positive",
        ));
    }
    Ok(HfConfig {
        cfg,
        tie_word_embeddings: bool_of("tie_word_embeddings", false)?,
        qkv_bias: qwen2 || attention_bias,
        o_bias: attention_bias,
        architecture,
    })
}

// ---------------------------------------------------------------------------------------------------
// safetensors files
// ---------------------------------------------------------------------------------------------------

/// One tensor's place in the mapped files.
#[derive(Clone, Debug)]
struct TensorLoc {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

/// The mapped safetensors files of a directory and their tensor directory.
struct Files {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    tensors: HashMap<String, TensorLoc>,
}

/// The safetensors files of `dir`: those named by `model.safetensors.index.json` if present, else every
/// `*.safetensors` file in the directory.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid(&index, "'weight_map' is missing or not an object"))?;
        let mut names = BTreeSet::new();
        for (tensor, file) in map {
            let f = file.as_str().ok_or_else(|| {
                invalid(
                    &index,
                    format!("weight_map entry for '{tensor}' is not a string"),
                )
            })?;
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(invalid(
                    &index,
                    format!("weight_map names a file outside the directory: '{f}'"),
                ));
            }
            names.insert(f.to_string());
        }
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| invalid(dir, e.to_string()))?;
    let mut files = Vec::new();
    for e in rd {
        let p = e.map_err(|e| invalid(dir, e.to_string()))?.path();
        if p.extension().is_some_and(|x| x == "safetensors") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(invalid(
            dir,
            "no *.safetensors files (and no model.safetensors.index.json) in the model directory",
        ));
    }
    Ok(files)
}

impl Files {
    fn open(dir: &Path) -> Result<Self, ModelError> {
        let paths = safetensors_files(dir)?;
        let mut maps = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (fi, p) in paths.iter().enumerate() {
            let file = File::open(p).map_err(|e| invalid(p, e.to_string()))?;
            // SAFETY: the map is read-only and private to this process; the model files are not expected
            // to be modified while they are open (the same assumption every mmap-based loader makes).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| invalid(p, e.to_string()))?;
            let (n, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| invalid(p, format!("not a valid safetensors file: {e}")))?;
            // `read_metadata` checked that the offsets tile the data section, which ends at the end of
            // the file.
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let (start, end) = (base + s, base + e);
                if start > end || end > map.len() {
                    return Err(invalid(p, format!("tensor '{name}' lies outside the file")));
                }
                let loc = TensorLoc {
                    file: fi,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start,
                    end,
                };
                if tensors.insert(name.clone(), loc).is_some() {
                    return Err(invalid(p, format!("tensor '{name}' appears in two files")));
                }
            }
            maps.push(map);
        }
        Ok(Files {
            paths,
            maps,
            tensors,
        })
    }

    fn get(&self, dir: &Path, name: &str) -> Result<&TensorLoc, ModelError> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: dir.to_path_buf(),
                name: name.to_string(),
            })
    }

    fn ggml_type(&self, name: &str, t: &TensorLoc) -> Result<GgmlType, ModelError> {
        match t.dtype {
            Dtype::F32 => Ok(GgmlType::F32),
            Dtype::F16 => Ok(GgmlType::F16),
            Dtype::BF16 => Ok(GgmlType::BF16),
            other => Err(invalid(
                &self.paths[t.file],
                format!(
                    "tensor '{name}' has dtype {other:?}; only F32, F16 and BF16 are supported"
                ),
            )),
        }
    }

    /// A `[rows, cols]` matrix.
    fn mat(&self, dir: &Path, name: &str, rows: usize, cols: usize) -> Result<Mat, ModelError> {
        let t = self.get(dir, name)?;
        let ty = self.ggml_type(name, t)?;
        if t.shape != [rows, cols] {
            return Err(invalid(
                &self.paths[t.file],
                format!(
                    "tensor '{name}' has shape {:?}, expected [{rows}, {cols}]",
                    t.shape
                ),
            ));
        }
        let m = Mat {
            ty,
            rows,
            cols,
            file: t.file,
            offset: t.start,
            len: t.end - t.start,
        };
        self.weight_ref(&m)
            .validate()
            .map_err(|e| invalid(&self.paths[t.file], format!("tensor '{name}': {e}")))?;
        Ok(m)
    }

    fn weight_ref(&self, m: &Mat) -> WeightRef<'_> {
        WeightRef {
            ty: m.ty,
            rows: m.rows,
            cols: m.cols,
            data: &self.maps[m.file][m.offset..m.offset + m.len],
        }
    }

    /// A vector of `n` elements, widened to f32.
    fn vector(&self, dir: &Path, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.get(dir, name)?;
        if t.shape != [n] {
            return Err(invalid(
                &self.paths[t.file],
                format!("tensor '{name}' has shape {:?}, expected [{n}]", t.shape),
            ));
        }
        let m = Mat {
            ty: self.ggml_type(name, t)?,
            rows: 1,
            cols: n,
            file: t.file,
            offset: t.start,
            len: t.end - t.start,
        };
        let mut v = vec![0f32; n];
        matmul::get_row(&self.weight_ref(&m), 0, &mut v)
            .map_err(|e| invalid(&self.paths[t.file], format!("tensor '{name}': {e}")))?;
        Ok(v)
    }
}

/// Loads the model of a Hugging Face directory. `progress` is called with (tensors checked, total).
pub(crate) fn load_model(
    dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<Model, ModelError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(invalid(
            &config_path,
            "missing: a model directory needs config.json and *.safetensors files",
        ));
    }
    let hc = parse_config(&config_path, &read_json(&config_path)?)?;
    let files = Files::open(dir)?;
    let c = &hc.cfg;
    let total = 3 + 9 * c.n_layer;
    let mut done = 0usize;
    let mut step = || {
        done += 1;
        progress(done, total);
    };
    let (qw, kvw) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    let tok_embd = files.mat(dir, "model.embed_tokens.weight", c.n_vocab, c.n_embd)?;
    step();
    let output = if files.tensors.contains_key("lm_head.weight") && !hc.tie_word_embeddings {
        files.mat(dir, "lm_head.weight", c.n_vocab, c.n_embd)?
    } else if hc.tie_word_embeddings {
        tok_embd
    } else {
        return Err(ModelError::MissingTensor {
            path: dir.to_path_buf(),
            name: "lm_head.weight (tie_word_embeddings is false)".into(),
        });
    };
    step();
    let output_norm = files.vector(dir, "model.norm.weight", c.n_embd)?;
    step();
    // `num_hidden_layers` is the file's word: no more layers are reserved than it has tensors for.
    let mut layers = Vec::with_capacity(c.n_layer.min(files.tensors.len() / 9));
    for i in 0..c.n_layer {
        let p = format!("model.layers.{i}");
        let mut mat = |s: &str, r: usize, k: usize| {
            let m = files.mat(dir, &format!("{p}.{s}.weight"), r, k);
            step();
            m
        };
        let wq = mat("self_attn.q_proj", qw, c.n_embd)?;
        let wk = mat("self_attn.k_proj", kvw, c.n_embd)?;
        let wv = mat("self_attn.v_proj", kvw, c.n_embd)?;
        let wo = mat("self_attn.o_proj", c.n_embd, qw)?;
        let w_gate = mat("mlp.gate_proj", c.n_ff, c.n_embd)?;
        let w_up = mat("mlp.up_proj", c.n_ff, c.n_embd)?;
        let w_down = mat("mlp.down_proj", c.n_embd, c.n_ff)?;
        let bias = |s: &str, n: usize, required: bool| -> Result<Option<Vec<f32>>, ModelError> {
            let name = format!("{p}.{s}.bias");
            if required || files.tensors.contains_key(&name) {
                files.vector(dir, &name, n).map(Some)
            } else {
                Ok(None)
            }
        };
        let bq = bias("self_attn.q_proj", qw, hc.qkv_bias)?;
        let bk = bias("self_attn.k_proj", kvw, hc.qkv_bias)?;
        let bv = bias("self_attn.v_proj", kvw, hc.qkv_bias)?;
        let bo = bias("self_attn.o_proj", c.n_embd, hc.o_bias)?;
        let attn_norm = files.vector(dir, &format!("{p}.input_layernorm.weight"), c.n_embd)?;
        step();
        let ffn_norm = files.vector(
            dir,
            &format!("{p}.post_attention_layernorm.weight"),
            c.n_embd,
        )?;
        step();
        layers.push(Layer {
            attn_norm,
            wq,
            wk,
            wv,
            wo,
            bq,
            bk,
            bv,
            bo,
            ffn_norm,
            w_gate,
            w_up,
            w_down,
        });
    }
    Ok(Model {
        cfg: hc.cfg,
        weights: Weights::Files(files.maps),
        tok_embd,
        output,
        output_norm,
        layers,
        f32_activations: true,
        kernels: ep_kernels::simd::Path::detect(),
    })
}

// ---------------------------------------------------------------------------------------------------
// One entry point for the CLI
// ---------------------------------------------------------------------------------------------------

/// A model with its tokenizer and (optional) chat template.
pub struct ModelBundle {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

/// Loads a GGUF file, or a Hugging Face model directory (`config.json`, `*.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json`), with its tokenizer and chat template. `progress` is
/// called with (tensors checked, total).
pub fn load_model_dir_or_gguf(
    path: impl AsRef<Path>,
    progress: impl FnMut(usize, usize),
) -> Result<ModelBundle, ModelError> {
    let path = path.as_ref();
    let context = |what: &str, e: &dyn std::fmt::Display| ModelError::Load {
        path: path.to_path_buf(),
        what: format!("{what}: {e}"),
    };
    if is_hf_dir(path) {
        let model = load_model(path, progress)?;
        let tokenizer = Tokenizer::from_hf_dir(path).map_err(|e| context("tokenizer", &e))?;
        let template = ChatTemplate::from_hf_dir(path, &tokenizer)
            .map_err(|e| context("chat template", &e))?;
        return Ok(ModelBundle {
            model,
            tokenizer,
            template,
        });
    }
    let model = Model::load(path, progress)?;
    let g = model
        .gguf()
        .ok_or_else(|| invalid(path, "not a GGUF model"))?;
    let tokenizer = Tokenizer::from_gguf(g).map_err(|e| context("tokenizer", &e))?;
    let template =
        ChatTemplate::from_gguf(g, &tokenizer).map_err(|e| context("chat template", &e))?;
    Ok(ModelBundle {
        model,
        tokenizer,
        template,
    })
}

/// A JSON value that names a token: a string, or an object with a `content` string (transformers'
/// serialised `AddedToken`). `None` for null / absent.
pub(crate) fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Integer ids of a JSON value that is an id or a list of ids (`eos_token_id`).
pub(crate) fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .into_iter()
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    }
}
