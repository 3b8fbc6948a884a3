//! `edgeprompt model`: model-file tools. `model random` writes a Llama-shaped GGUF with random weights
//! and the tokenizer, chat template and `general.*` metadata of another GGUF, for timing benchmarks
//! at sizes no fetched model has (its text is noise).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ep_kernels::quant::f32_to_f16_hw;
use ep_kernels::GgmlType;
use ep_model::gguf::writer::{to_bytes, TensorOut};
use ep_model::gguf::{Gguf, MetaValue};
use ep_model::paths;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

#[derive(Args)]
pub(crate) struct ModelArgs {
    #[command(subcommand)]
    cmd: ModelCommand,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a GGUF of a Llama shape with random weights (for timing only: its text is noise). The
    /// tokenizer, chat template and general.* metadata, the embedding's tensor type, the matrices'
    /// types and whether the output matrix is tied to the embedding are those of --like.
    Random(RandomArgs),
}

#[derive(Args)]
struct RandomArgs {
    /// GGUF whose metadata (tokenizer, chat template, general.*, context length, RoPE) and tensor
    /// types are copied. Default: the fetched SmolLM2-135M-Instruct.
    #[arg(long)]
    like: Option<PathBuf>,
    /// Transformer blocks.
    #[arg(long, default_value_t = 16)]
    layers: usize,
    /// Embedding width (n_embd).
    #[arg(long, default_value_t = 2048)]
    embd: usize,
    /// Attention (query) heads; head_dim = embd / heads.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    /// KV heads (grouped-query attention); divides --heads.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Feed-forward width (n_ff).
    #[arg(long, default_value_t = 8192)]
    ff: usize,
    /// Seed of the weights: the same seed and shape give the same file.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output file (written to a temporary file beside it, then renamed).
    #[arg(long)]
    out: PathBuf,
}

pub(crate) fn run(args: ModelArgs) -> Result<()> {
    match args.cmd {
        ModelCommand::Random(a) => random(a),
    }
}

/// The shape of the model to write.
#[derive(Clone, Copy, Debug)]
struct Shape {
    layers: usize,
    embd: usize,
    heads: usize,
    kv_heads: usize,
    ff: usize,
}

impl Shape {
    fn head_dim(&self) -> usize {
        self.embd / self.heads
    }

    fn check(&self) -> Result<()> {
        let s = self;
        if s.layers == 0 || s.embd == 0 || s.heads == 0 || s.kv_heads == 0 || s.ff == 0 {
            bail!("--layers, --embd, --heads, --kv-heads and --ff must all be positive");
        }
        if !s.embd.is_multiple_of(s.heads) {
            bail!("--embd {} is not a multiple of --heads {}", s.embd, s.heads);
        }
        if !s.heads.is_multiple_of(s.kv_heads) {
            bail!(
                "--heads {} is not a multiple of --kv-heads {}",
                s.heads,
                s.kv_heads
            );
        }
        if !s.head_dim().is_multiple_of(2) {
            bail!("head_dim {} (embd / heads) must be even", s.head_dim());
        }
        Ok(())
    }
}

/// How one tensor's values are drawn.
#[derive(Clone, Copy)]
enum Fill {
    /// Norm weights: about 1.0.
    Norm,
    /// Weights: uniform, zero mean, standard deviation about 0.02.
    Weight,
}

struct Spec {
    name: String,
    /// ggml order: [n_cols, n_rows] (one entry for vectors).
    dims: Vec<u64>,
    ty: GgmlType,
    fill: Fill,
}

impl Spec {
    fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Tensor types this command can draw random blocks of.
fn generable(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32 | GgmlType::F16 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0
    )
}

fn random(a: RandomArgs) -> Result<()> {
    let shape = Shape {
        layers: a.layers,
        embd: a.embd,
        heads: a.heads,
        kv_heads: a.kv_heads,
        ff: a.ff,
    };
    shape.check()?;
    let like_path = a.like.clone().unwrap_or_else(paths::default_model_path);
    if !like_path.exists() {
        if a.like.is_none() {
            bail!(
                "the default model is not at {} (it is the model whose metadata is copied): run \
                 scripts/fetch-model.sh first, or pass --like GGUF",
                like_path.display()
            );
        }
        bail!("--like {} does not exist", like_path.display());
    }
    let like = Gguf::open(&like_path)?;
    let (meta, n_vocab) = metadata(&like, shape, a.seed)?;
    let specs = specs(&like, shape, n_vocab)?;
    for s in &specs {
        let cols = s.dims[0] as usize;
        if s.ty.row_bytes(cols).is_none() {
            bail!(
                "tensor '{}': a row of {cols} is not a whole number of {}-element {} blocks \
                 (choose sizes that are multiples of {})",
                s.name,
                s.ty.block_size(),
                s.ty.name(),
                s.ty.block_size()
            );
        }
    }
    let n_params: u64 = specs.iter().map(Spec::n_elements).sum();

    let bar = ProgressBar::new(specs.len() as u64).with_style(
        ProgressStyle::with_template("random weights [{bar:30}] {pos}/{len} tensors {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let tensors: Vec<TensorOut> = specs
        .par_iter()
        .enumerate()
        .map(|(i, s)| {
            let mut rng = SplitMix64::new(a.seed, i as u64);
            let data = fill(s, &mut rng);
            bar.inc(1);
            TensorOut::new(s.name.clone(), s.dims.clone(), s.ty, data)
        })
        .collect();
    bar.finish_and_clear();

    let spinner = ProgressBar::new_spinner().with_message(format!("writing {}", a.out.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    // The project's writer builds the whole file in memory (about twice the file's size at peak).
    let bytes = to_bytes(&meta, &tensors);
    drop(tensors);
    write_atomic(&a.out, &bytes)?;
    spinner.finish_and_clear();

    println!(
        "wrote {}: {} layers, n_embd {}, {} heads, {} KV heads (head_dim {}), n_ff {}, vocab {}, \
         like {}",
        a.out.display(),
        shape.layers,
        shape.embd,
        shape.heads,
        shape.kv_heads,
        shape.head_dim(),
        shape.ff,
        n_vocab,
        like_path.display()
    );
    println!("parameters: {n_params} ({:.3} B)", n_params as f64 / 1e9);
    println!(
        "file size: {} bytes ({:.1} MiB)",
        bytes.len(),
        bytes.len() as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// The source's metadata with the shape keys replaced; also the vocabulary size.
fn metadata(like: &Gguf, shape: Shape, seed: u64) -> Result<(Vec<(String, MetaValue)>, usize)> {
    let file = like.path.display();
    let arch = like
        .get_str("general.architecture")
        .with_context(|| format!("{file}: cannot tell its architecture"))?
        .to_string();
    if arch != "llama" {
        bail!("{file}: architecture '{arch}' is not a Llama model (this writes Llama shapes)");
    }
    let tokens = like
        .get_str_array("tokenizer.ggml.tokens")
        .with_context(|| format!("{file}: has no tokenizer to copy"))?;
    let n_vocab = match like.get(&format!("{arch}.vocab_size")) {
        Some(v) => v
            .as_i64()
            .and_then(|v| usize::try_from(v).ok())
            .with_context(|| format!("{file}: {arch}.vocab_size is not a count"))?,
        None => tokens.len(),
    };
    let hd = shape.head_dim() as u32;
    let k = |s: &str| format!("{arch}.{s}");
    let replace: Vec<(String, u32)> = vec![
        (k("block_count"), shape.layers as u32),
        (k("embedding_length"), shape.embd as u32),
        (k("feed_forward_length"), shape.ff as u32),
        (k("attention.head_count"), shape.heads as u32),
        (k("attention.head_count_kv"), shape.kv_heads as u32),
    ];
    // Keys that depend on head_dim: replaced only where the source has them (absent, the loader
    // derives them from embd / heads).
    let head_dim_keys = [
        k("rope.dimension_count"),
        k("attention.key_length"),
        k("attention.value_length"),
    ];
    let mut meta: Vec<(String, MetaValue)> = Vec::with_capacity(like.metadata.len() + 8);
    for (key, v) in &like.metadata {
        if let Some((_, n)) = replace.iter().find(|(r, _)| r == key) {
            meta.push((key.clone(), MetaValue::U32(*n)));
            continue;
        }
        if head_dim_keys.contains(key) {
            meta.push((key.clone(), MetaValue::U32(hd)));
            continue;
        }
        meta.push((key.clone(), v.clone()));
    }
    for (key, n) in replace {
        if !like.metadata.contains_key(&key) {
            meta.push((key, MetaValue::U32(n)));
        }
    }
    meta.push((
        "edgeprompt.random_weights.seed".to_string(),
        MetaValue::U64(seed),
    ));
    Ok((meta, n_vocab))
}

/// The tensors to write, with the source's types: the embedding's (and the output matrix's, if the
/// source has one, else tied), each matrix role's (Q4_1 where the source's type cannot be drawn).
fn specs(like: &Gguf, shape: Shape, n_vocab: usize) -> Result<Vec<Spec>> {
    let file = like.path.display();
    let ty_of = |name: &str, fallback: GgmlType| -> GgmlType {
        like.tensor(name)
            .map(|t| t.ty)
            .filter(|&t| generable(t))
            .unwrap_or(fallback)
    };
    if like.tensor("token_embd.weight").is_none() {
        bail!("{file}: has no token_embd.weight (not a Llama GGUF?)");
    }
    let (e, v) = (shape.embd as u64, n_vocab as u64);
    let qw = (shape.heads * shape.head_dim()) as u64;
    let kvw = (shape.kv_heads * shape.head_dim()) as u64;
    let ff = shape.ff as u64;
    let mut specs = vec![
        Spec {
            name: "token_embd.weight".into(),
            dims: vec![e, v],
            ty: ty_of("token_embd.weight", GgmlType::Q8_0),
            fill: Fill::Weight,
        },
        Spec {
            name: "output_norm.weight".into(),
            dims: vec![e],
            ty: GgmlType::F32,
            fill: Fill::Norm,
        },
    ];
    if like.tensor("output.weight").is_some() {
        specs.push(Spec {
            name: "output.weight".into(),
            dims: vec![e, v],
            ty: ty_of("output.weight", GgmlType::Q8_0),
            fill: Fill::Weight,
        });
    }
    for l in 0..shape.layers {
        for norm in ["attn_norm", "ffn_norm"] {
            specs.push(Spec {
                name: format!("blk.{l}.{norm}.weight"),
                dims: vec![e],
                ty: GgmlType::F32,
                fill: Fill::Norm,
            });
        }
        for (role, cols, rows) in [
            ("attn_q", e, qw),
            ("attn_k", e, kvw),
            ("attn_v", e, kvw),
            ("attn_output", qw, e),
            ("ffn_gate", e, ff),
            ("ffn_up", e, ff),
            ("ffn_down", ff, e),
        ] {
            // The source's type for this role (its first block's), Q4_1 otherwise.
            let ty = ty_of(&format!("blk.0.{role}.weight"), GgmlType::Q4_1);
            specs.push(Spec {
                name: format!("blk.{l}.{role}.weight"),
                dims: vec![cols, rows],
                ty,
                fill: Fill::Weight,
            });
        }
    }
    Ok(specs)
}

/// Standard deviation of the random weights.
const WEIGHT_STD: f32 = 0.02;

/// Random bytes of a tensor in its type. Every value is finite: weights are uniform with zero mean
/// and standard deviation about [`WEIGHT_STD`], norm weights are 1.0 ± 0.05.
fn fill(s: &Spec, r: &mut SplitMix64) -> Vec<u8> {
    let n = s.n_elements() as usize;
    let mut out = Vec::with_capacity(s.ty.row_bytes(n).unwrap_or(n * 4));
    // Half-width of a uniform distribution with standard deviation WEIGHT_STD.
    let a = WEIGHT_STD * 3f32.sqrt();
    // A block's scale, within ±10 % of `base`.
    let jitter = |r: &mut SplitMix64, base: f32| base * (0.9 + 0.2 * r.unit());
    match (s.fill, s.ty) {
        (Fill::Norm, _) => {
            // Norms are always written as f32.
            for _ in 0..n {
                out.extend_from_slice(&(1.0 + 0.1 * (r.unit() - 0.5)).to_le_bytes());
            }
        }
        (Fill::Weight, GgmlType::F32) => {
            for _ in 0..n {
                out.extend_from_slice(&(a * (2.0 * r.unit() - 1.0)).to_le_bytes());
            }
        }
        (Fill::Weight, GgmlType::F16) => {
            for _ in 0..n {
                out.extend_from_slice(&f32_to_f16_hw(a * (2.0 * r.unit() - 1.0)).to_le_bytes());
            }
        }
        (Fill::Weight, GgmlType::Q4_1) => {
            // w = d * q + m, q uniform in 0..=15, m = -7.5 d: zero mean, std d * 4.61.
            for _ in 0..n / 32 {
                let d = jitter(r, 2.0 * a / 15.0);
                out.extend_from_slice(&f32_to_f16_hw(d).to_le_bytes());
                out.extend_from_slice(&f32_to_f16_hw(-7.5 * d).to_le_bytes());
                r.fill(&mut out, 16);
            }
        }
        (Fill::Weight, GgmlType::Q4_0) => {
            // w = d * (q - 8), q uniform in 0..=15.
            for _ in 0..n / 32 {
                let d = jitter(r, 2.0 * a / 15.0);
                out.extend_from_slice(&f32_to_f16_hw(d).to_le_bytes());
                r.fill(&mut out, 16);
            }
        }
        (Fill::Weight, GgmlType::Q8_0) => {
            // w = d * q, q uniform in -127..=127 (never -128): std d * 73.3.
            for _ in 0..n / 32 {
                let d = jitter(r, a / 127.0);
                out.extend_from_slice(&f32_to_f16_hw(d).to_le_bytes());
                for _ in 0..32 {
                    let q = (r.next() % 255) as i32 - 127;
                    out.push(q as i8 as u8);
                }
            }
        }
        (Fill::Weight, other) => {
            unreachable!("type {} is filtered out by generable()", other.name())
        }
    }
    out
}

/// SplitMix64: a small, fast generator whose output is fixed by (seed, stream) on every platform, so
/// tensors can be drawn in parallel and a seed always gives the same file.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, stream: u64) -> Self {
        let mut r = SplitMix64(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Appends `n` random bytes.
    fn fill(&mut self, out: &mut Vec<u8>, n: usize) {
        let mut left = n;
        while left > 0 {
            let b = self.next().to_le_bytes();
            let k = left.min(8);
            out.extend_from_slice(&b[..k]);
            left -= k;
        }
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| {
        format!(
            "{}: cannot create a temporary file in {}",
            path.display(),
            dir.display()
        )
    })?;
    // A temporary file is private (0600); the model is an ordinary file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("{}: cannot set permissions", path.display()))?;
    }
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("{}: write failed", path.display()))?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| {
        format!(
            "{}: cannot rename the written file into place",
            path.display()
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_blocks_are_finite_and_centred() {
        let s = Spec {
            name: "w".into(),
            dims: vec![64, 64],
            ty: GgmlType::Q4_1,
            fill: Fill::Weight,
        };
        let bytes = fill(&s, &mut SplitMix64::new(1, 0));
        let mut f = vec![0f32; 64 * 64];
        ep_kernels::quant::dequantize_row(GgmlType::Q4_1, &bytes, &mut f);
        assert!(f.iter().all(|x| x.is_finite()));
        let mean = f.iter().sum::<f32>() / f.len() as f32;
        let std = (f.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / f.len() as f32).sqrt();
        assert!(mean.abs() < 0.003, "mean {mean}");
        assert!((0.015..0.025).contains(&std), "std {std}");
    }

    #[test]
    fn same_seed_same_bytes() {
        let s = Spec {
            name: "w".into(),
            dims: vec![32, 8],
            ty: GgmlType::Q8_0,
            fill: Fill::Weight,
        };
        let a = fill(&s, &mut SplitMix64::new(7, 3));
        let b = fill(&s, &mut SplitMix64::new(7, 3));
        let c = fill(&s, &mut SplitMix64::new(8, 3));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
