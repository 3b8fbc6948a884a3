//! The Llama-family forward pass over weights used in place: a GGUF file, or the safetensors files of a
//! Hugging Face model directory (see [`crate::hf`]).
//!
//! The pass is split into [`Model::embed`], [`Model::layer`] and [`Model::logits`] so a caller can run
//! it layer by layer (and hold a sequence at a layer boundary while KV for the next layer arrives);
//! [`Model::forward`] runs all three. Every op works row by row and every output element of a matmul is
//! one dot-product call, so a row's result does not depend on what else is in the batch, on how a
//! prompt is chunked, or on the thread count.

use std::path::Path;
use std::time::{Duration, Instant};

use ep_kernels::matmul::{self, KernelError, WeightRef};
use ep_kernels::simd;
use ep_kernels::{ops, GgmlType};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::gguf::Gguf;
use crate::kv::{Attention, AttnShape, SeqSlice};
use crate::ModelError;

/// A weight matrix in a mapped file: `rows` output features of `cols` inputs each, `len` bytes at
/// `offset` in the bytes of file `file` of the model's [`Weights`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub(crate) ty: GgmlType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) file: usize,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: Mat,
    pub(crate) wk: Mat,
    pub(crate) wv: Mat,
    pub(crate) wo: Mat,
    /// Optional projection biases (Qwen2 has Q/K/V biases), added after the matmul.
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) bo: Option<Vec<f32>>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) w_gate: Mat,
    pub(crate) w_up: Mat,
    pub(crate) w_down: Mat,
}

/// Where the weights live.
pub(crate) enum Weights {
    /// One GGUF file; [`Mat::offset`] is relative to its data section (file 0).
    Gguf(Gguf),
    /// Mapped safetensors files; [`Mat::offset`] is relative to the start of file [`Mat::file`].
    Files(Vec<Mmap>),
}

/// A loaded model: configuration, the mapped file(s) and where each weight lies in them.
pub struct Model {
    pub cfg: ModelConfig,
    pub(crate) weights: Weights,
    pub(crate) tok_embd: Mat,
    pub(crate) output: Mat,
    pub(crate) output_norm: Vec<f32>,
    pub(crate) layers: Vec<Layer>,
    /// Matmuls keep the activations in f32 instead of rounding them to the weight type's vec-dot type
    /// (Hugging Face checkpoints, whose reference computes in f32; GGUF models follow ggml).
    pub(crate) f32_activations: bool,
    /// The kernel path every matmul, SwiGLU and attention call of this model runs on: chosen once,
    /// by [`simd::Path::detect`] when the model is loaded ([`Model::kernels`],
    /// [`Model::set_kernels`]).
    pub(crate) kernels: simd::Path,
}

/// What the forward pass does besides the configuration and the weights, as far as it changes the KV
/// ([`Model::identity_facts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityFacts {
    /// Projection biases present in any layer: bit 0 Q, bit 1 K, bit 2 V, bit 3 output.
    pub biases: u8,
    /// Matmuls keep activations in f32 (Hugging Face weights) instead of ggml's quantised activations.
    pub f32_activations: bool,
}

/// One sequence's new tokens in a batch.
#[derive(Clone, Debug)]
pub struct BatchSeq<'a> {
    pub seq: usize,
    pub tokens: &'a [u32],
    /// Position of the first token (tokens already in the KV store).
    pub pos: usize,
    /// Which rows' logits to return.
    pub logits: LogitsFor,
}

/// Which rows of a sequence's part of a batch produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// Where a layer's time went: its weight products (Q/K/V, output, gate/up, down) and its attention
/// (the [`Attention`] call: KV writes and the attention kernels). The rest — norms, RoPE, SwiGLU,
/// residuals — is the difference to the layer's whole time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerTimes {
    pub weights: Duration,
    pub attention: Duration,
}

/// Activations of a batch between layers.
pub struct Hidden {
    /// rows × n_embd.
    pub x: Vec<f32>,
    pub slices: Vec<SeqSlice>,
    /// Position of each row.
    pub pos: Vec<usize>,
}

impl Model {
    /// Opens a GGUF model. `progress` is called with (tensors checked, total).
    pub fn load(
        path: impl AsRef<Path>,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        Self::from_gguf(Gguf::open(path)?, progress)
    }

    /// A model over an opened GGUF file: its configuration and every tensor's type and shape
    /// checked. `progress` as in [`Model::load`].
    pub fn from_gguf(
        gguf: Gguf,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(&gguf)?;
        let n_tensors = 2 + 9 * cfg.n_layer;
        let mut done = 0usize;
        let mut step = |done: &mut usize| {
            *done += 1;
            progress(*done, n_tensors);
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Mat, ModelError> {
            let t = gguf.tensor(name).ok_or_else(|| ModelError::MissingTensor {
                path: gguf.path.clone(),
                name: name.to_string(),
            })?;
            let want = [cols as u64, rows as u64];
            let dims_ok =
                t.dims.len() >= 2 && t.dims[..2] == want && t.dims[2..].iter().all(|&d| d == 1);
            if !dims_ok {
                return Err(ModelError::Invalid {
                    path: gguf.path.clone(),
                    what: format!("tensor '{name}' has shape {:?}, expected {want:?}", t.dims),
                });
            }
            // Offsets and sizes were bounds-checked against the file when it was opened.
            Ok(Mat {
                ty: t.ty,
                rows,
                cols,
                file: 0,
                offset: t.offset as usize,
                len: t.size as usize,
            })
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>, ModelError> {
            let t = gguf.tensor(name).ok_or_else(|| ModelError::MissingTensor {
                path: gguf.path.clone(),
                name: name.to_string(),
            })?;
            if t.n_elements() != n as u64 {
                return Err(ModelError::Invalid {
                    path: gguf.path.clone(),
                    what: format!(
                        "tensor '{name}' has {} elements, expected {n}",
                        t.n_elements()
                    ),
                });
            }
            let mut v = vec![0f32; n];
            let w = WeightRef {
                ty: t.ty,
                rows: 1,
                cols: n,
                data: gguf.tensor_data(t),
            };
            matmul::get_row(&w, 0, &mut v)?;
            Ok(v)
        };
        let c = &cfg;
        let (qw, kvw) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        let tok_embd = mat("token_embd.weight", c.n_vocab, c.n_embd)?;
        step(&mut done);
        let output = match gguf.tensor("output.weight") {
            Some(_) => mat("output.weight", c.n_vocab, c.n_embd)?,
            None => tok_embd,
        };
        let output_norm = vector("output_norm.weight", c.n_embd)?;
        step(&mut done);
        // `n_layer` is the file's word: no more layers are reserved than it has tensors for.
        let mut layers = Vec::with_capacity(c.n_layer.min(gguf.tensors.len() / 9));
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let mut get = |s: &str, r: usize, k: usize| {
                let m = mat(&n(s), r, k);
                step(&mut done);
                m
            };
            let wq = get("attn_q", qw, c.n_embd)?;
            let wk = get("attn_k", kvw, c.n_embd)?;
            let wv = get("attn_v", kvw, c.n_embd)?;
            let wo = get("attn_output", c.n_embd, qw)?;
            let w_gate = get("ffn_gate", c.n_ff, c.n_embd)?;
            let w_up = get("ffn_up", c.n_ff, c.n_embd)?;
            let w_down = get("ffn_down", c.n_embd, c.n_ff)?;
            let attn_norm = vector(&n("attn_norm"), c.n_embd)?;
            let ffn_norm = vector(&n("ffn_norm"), c.n_embd)?;
            step(&mut done);
            step(&mut done);
            layers.push(Layer {
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                bq: None,
                bk: None,
                bv: None,
                bo: None,
                ffn_norm,
                w_gate,
                w_up,
                w_down,
            });
        }
        Ok(Model {
            cfg,
            weights: Weights::Gguf(gguf),
            tok_embd,
            output,
            output_norm,
            layers,
            f32_activations: false,
            kernels: simd::Path::detect(),
        })
    }

    /// Opens a Hugging Face model directory (`config.json` + safetensors); see [`crate::hf`].
    pub fn load_hf_dir(
        dir: impl AsRef<Path>,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        crate::hf::load_model(dir.as_ref(), progress)
    }

    /// The underlying GGUF (metadata for the tokenizer and chat template); `None` for a model loaded from
    /// a Hugging Face directory.
    pub fn gguf(&self) -> Option<&Gguf> {
        match &self.weights {
            Weights::Gguf(g) => Some(g),
            Weights::Files(_) => None,
        }
    }

    /// The kernel path this model runs on: [`simd::Path::detect`] at load time (AVX2 where the CPU
    /// has it, unless `EDGEPROMPT_FORCE_SCALAR` is set). Both paths give bit-identical results.
    pub fn kernels(&self) -> simd::Path {
        self.kernels
    }

    /// Runs this model on kernel path `path` from now on (the results do not change, only the
    /// speed). A path this CPU cannot run is an error ([`KernelError::PathUnavailable`]), and the
    /// model keeps its path.
    pub fn set_kernels(&mut self, path: simd::Path) -> Result<(), ModelError> {
        if !path.is_available() {
            return Err(KernelError::PathUnavailable(path.name()).into());
        }
        self.kernels = path;
        Ok(())
    }

    /// Shape of the attention step.
    pub fn attn_shape(&self) -> AttnShape {
        AttnShape {
            n_layer: self.cfg.n_layer,
            n_head: self.cfg.n_head,
            n_head_kv: self.cfg.n_head_kv,
            head_dim: self.cfg.head_dim,
        }
    }

    /// BLAKE3 digest of every weight byte, in a fixed order (the KV identity's weights digest,
    /// `ep_kv::identity`). The hashed stream (integers little-endian) is
    ///
    /// ```text
    /// b"edgeprompt/weights/v1" u32(n_layer)
    /// mat(token_embd)  (b"T" if the output matrix is the token embedding, else mat(output))
    /// vec(output_norm)
    /// per layer: mat(q) mat(k) mat(v) mat(o) mat(gate) mat(up) mat(down)
    ///            vec(attn_norm) vec(ffn_norm) opt(bq) opt(bk) opt(bv) opt(bo)
    /// mat(m) = b"M" u32(ggml type id) u64(rows) u64(cols) u64(byte length) the tensor's bytes as stored
    /// vec(v) = b"V" u64(len) each value as f32
    /// opt(b) = b"-" when absent, else vec(b)
    /// ```
    ///
    /// Matrix bytes are hashed as stored in the file (quantised blocks, safetensors' f32/f16/bf16);
    /// vectors as the f32 values the forward pass uses. Large matrices are hashed with BLAKE3's
    /// multithreaded update on the current rayon pool (same digest, it is a tree hash).
    /// `scripts/reference/make_identity_fixture.py` reimplements this for a GGUF file.
    pub fn weights_digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"edgeprompt/weights/v1");
        h.update(&(self.cfg.n_layer as u32).to_le_bytes());
        let mat = |h: &mut blake3::Hasher, m: &Mat| {
            let d = self.w(m).data;
            h.update(b"M");
            h.update(&m.ty.id().to_le_bytes());
            h.update(&(m.rows as u64).to_le_bytes());
            h.update(&(m.cols as u64).to_le_bytes());
            h.update(&(d.len() as u64).to_le_bytes());
            if d.len() >= 1 << 20 {
                h.update_rayon(d);
            } else {
                h.update(d);
            }
        };
        let vector = |h: &mut blake3::Hasher, v: &[f32]| {
            h.update(b"V");
            h.update(&(v.len() as u64).to_le_bytes());
            let mut buf = Vec::with_capacity(v.len() * 4);
            for x in v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            h.update(&buf);
        };
        mat(&mut h, &self.tok_embd);
        if self.output_is_token_embedding() {
            h.update(b"T");
        } else {
            mat(&mut h, &self.output);
        }
        vector(&mut h, &self.output_norm);
        for l in &self.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                mat(&mut h, m);
            }
            vector(&mut h, &l.attn_norm);
            vector(&mut h, &l.ffn_norm);
            for b in [&l.bq, &l.bk, &l.bv, &l.bo] {
                match b {
                    Some(b) => vector(&mut h, b),
                    None => {
                        h.update(b"-");
                    }
                }
            }
        }
        *h.finalize().as_bytes()
    }

    /// The output matrix is the token embedding (tied weights).
    fn output_is_token_embedding(&self) -> bool {
        let (a, b) = (&self.output, &self.tok_embd);
        a.file == b.file && a.offset == b.offset && a.len == b.len && a.ty == b.ty
    }

    /// The facts of this model besides its weights that shape its KV (for `ep_kv::identity`).
    pub fn identity_facts(&self) -> IdentityFacts {
        let mut biases = 0u8;
        for l in &self.layers {
            for (bit, b) in [&l.bq, &l.bk, &l.bv, &l.bo].into_iter().enumerate() {
                if b.is_some() {
                    biases |= 1 << bit;
                }
            }
        }
        IdentityFacts {
            biases,
            f32_activations: self.f32_activations,
        }
    }

    fn w(&self, m: &Mat) -> WeightRef<'_> {
        let bytes: &[u8] = match &self.weights {
            Weights::Gguf(g) => g.data_section(),
            Weights::Files(f) => &f[m.file],
        };
        WeightRef {
            ty: m.ty,
            rows: m.rows,
            cols: m.cols,
            // Loaders check every range against its file before building a `Mat`.
            data: &bytes[m.offset..m.offset + m.len],
        }
    }

    /// `out = x · mᵀ` (+ `bias` per row), with the activation handling of this model's weights.
    fn mm(
        &self,
        m: &Mat,
        bias: Option<&[f32]>,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let w = self.w(m);
        if self.f32_activations {
            matmul::matmul_f32_act_with(self.kernels, &w, x, n, out)?;
        } else {
            matmul::matmul_with(self.kernels, &w, x, n, out)?;
        }
        if let Some(b) = bias.filter(|_| m.rows > 0) {
            out.par_chunks_mut(m.rows)
                .for_each(|row| ops::add_in_place(row, b));
        }
        Ok(())
    }

    /// Embeds a batch: looks up each token's row. Errors on an out-of-range token or a malformed batch.
    pub fn embed(&self, batch: &[BatchSeq<'_>]) -> Result<Hidden, ModelError> {
        let d = self.cfg.n_embd;
        let n: usize = batch.iter().map(|b| b.tokens.len()).sum();
        let mut x = vec![0f32; n * d];
        let mut slices = Vec::with_capacity(batch.len());
        let mut pos = Vec::with_capacity(n);
        let mut row = 0;
        let emb = self.w(&self.tok_embd);
        for (i, b) in batch.iter().enumerate() {
            if batch[..i].iter().any(|o| o.seq == b.seq) {
                return Err(ModelError::Batch(format!(
                    "sequence {} appears twice in one batch",
                    b.seq
                )));
            }
            for (j, &t) in b.tokens.iter().enumerate() {
                if t as usize >= self.cfg.n_vocab {
                    return Err(ModelError::Batch(format!(
                        "token id {t} is outside the vocabulary ({} tokens)",
                        self.cfg.n_vocab
                    )));
                }
                matmul::get_row(&emb, t as usize, &mut x[(row + j) * d..(row + j + 1) * d])?;
                pos.push(b.pos + j);
            }
            slices.push(SeqSlice {
                seq: b.seq,
                rows: row..row + b.tokens.len(),
                pos: b.pos,
            });
            row += b.tokens.len();
        }
        Ok(Hidden { x, slices, pos })
    }

    /// Runs decoder layer `il` on the batch in place.
    pub fn layer(
        &self,
        il: usize,
        h: &mut Hidden,
        attn: &mut dyn Attention,
    ) -> Result<(), ModelError> {
        self.layer_timed(il, h, attn, &mut LayerTimes::default())
    }

    /// [`Model::layer`], adding the time its weight products and its attention took to `times`.
    pub fn layer_timed(
        &self,
        il: usize,
        h: &mut Hidden,
        attn: &mut dyn Attention,
        times: &mut LayerTimes,
    ) -> Result<(), ModelError> {
        let c = &self.cfg;
        let l = &self.layers[il];
        let n = h.pos.len();
        let d = c.n_embd;
        let hd = c.head_dim;
        let (qw, kvw) = (c.n_head * hd, c.n_head_kv * hd);

        let mut xn = vec![0f32; n * d];
        norm_rows(&h.x, &l.attn_norm, c.rms_eps, &mut xn, d);
        let mut q = vec![0f32; n * qw];
        let mut k = vec![0f32; n * kvw];
        let mut v = vec![0f32; n * kvw];
        let t = Instant::now();
        self.mm(&l.wq, l.bq.as_deref(), &xn, n, &mut q)?;
        self.mm(&l.wk, l.bk.as_deref(), &xn, n, &mut k)?;
        self.mm(&l.wv, l.bv.as_deref(), &xn, n, &mut v)?;
        times.weights += t.elapsed();
        self.rope_rows(&mut q, &h.pos, c.n_head);
        self.rope_rows(&mut k, &h.pos, c.n_head_kv);

        let mut att = vec![0f32; n * qw];
        let t = Instant::now();
        attn.attend(self.kernels, il, &h.slices, &q, &k, &v, &mut att)?;
        times.attention += t.elapsed();
        let mut o = vec![0f32; n * d];
        let t = Instant::now();
        self.mm(&l.wo, l.bo.as_deref(), &att, n, &mut o)?;
        times.weights += t.elapsed();
        ops::add_in_place(&mut h.x, &o);

        norm_rows(&h.x, &l.ffn_norm, c.rms_eps, &mut xn, d);
        let mut gate = vec![0f32; n * c.n_ff];
        let mut up = vec![0f32; n * c.n_ff];
        let t = Instant::now();
        self.mm(&l.w_gate, None, &xn, n, &mut gate)?;
        self.mm(&l.w_up, None, &xn, n, &mut up)?;
        times.weights += t.elapsed();
        let mut act = vec![0f32; n * c.n_ff];
        ops::swiglu(self.kernels, &gate, &up, &mut act);
        let t = Instant::now();
        self.mm(&l.w_down, None, &act, n, &mut o)?;
        times.weights += t.elapsed();
        ops::add_in_place(&mut h.x, &o);
        Ok(())
    }

    fn rope_rows(&self, x: &mut [f32], pos: &[usize], n_heads: usize) {
        let c = &self.cfg;
        let hd = c.head_dim;
        x.par_chunks_mut(n_heads * hd)
            .zip(pos)
            .for_each_init(Vec::new, |table, (row, &p)| {
                ops::rope_table(p, c.rope_dims, c.rope_base, c.rope_freq_scale, table);
                for head in row.chunks_exact_mut(hd) {
                    let rot = &mut head[..c.rope_dims];
                    if c.rope_neox {
                        ops::rope_apply_neox(rot, table);
                    } else {
                        ops::rope_apply_norm(rot, table);
                    }
                }
            });
    }

    /// Final norm and output projection for the given rows of the batch: rows × n_vocab logits.
    pub fn logits(&self, h: &Hidden, rows: &[usize]) -> Result<Vec<f32>, ModelError> {
        let d = self.cfg.n_embd;
        let mut xn = vec![0f32; rows.len() * d];
        for (i, &r) in rows.iter().enumerate() {
            ops::rms_norm(
                &h.x[r * d..(r + 1) * d],
                &self.output_norm,
                self.cfg.rms_eps,
                &mut xn[i * d..(i + 1) * d],
            );
        }
        let mut out = vec![0f32; rows.len() * self.cfg.n_vocab];
        self.mm(&self.output, None, &xn, rows.len(), &mut out)?;
        Ok(out)
    }

    /// Runs the whole forward pass. Returns the logits of the requested rows, in batch order
    /// (`n_vocab` floats per row).
    pub fn forward(
        &self,
        batch: &[BatchSeq<'_>],
        attn: &mut dyn Attention,
    ) -> Result<Vec<f32>, ModelError> {
        let mut h = self.embed(batch)?;
        for il in 0..self.cfg.n_layer {
            self.layer(il, &mut h, attn)?;
        }
        let mut rows = Vec::new();
        for (b, s) in batch.iter().zip(&h.slices) {
            match b.logits {
                LogitsFor::None => {}
                LogitsFor::Last => {
                    rows.extend(s.rows.end.checked_sub(1).filter(|&r| r >= s.rows.start))
                }
                LogitsFor::All => rows.extend(s.rows.clone()),
            }
        }
        self.logits(&h, &rows)
    }
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], d: usize) {
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, xr)| ops::rms_norm(xr, w, eps, o));
}
