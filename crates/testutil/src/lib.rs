//! Helpers for the workspace's tests and benchmarks (a dev-dependency only): the model the tests run
//! against, and tiny random-weight GGUF models written in memory.

use std::path::PathBuf;

pub use ep_model::paths::{default_model_path, edgeprompt_home, DEFAULT_MODEL_FILE};

/// The model tests run against: `$EDGEPROMPT_MODEL`, else the default model path. `None` when absent.
pub fn test_model_path() -> Option<PathBuf> {
    let p = std::env::var_os("EDGEPROMPT_MODEL")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(default_model_path);
    p.is_file().then_some(p)
}

/// The model for tests that need it. Panics with instructions when it was not fetched: the test command
/// (`scripts/test.sh`) fetches it first, so a missing model is a set-up error, not a skip.
pub fn require_test_model() -> PathBuf {
    test_model_path().unwrap_or_else(|| {
        panic!(
            "the default model is missing at {}: run scripts/fetch-model.sh (or set EDGEPROMPT_MODEL)",
            default_model_path().display()
        )
    })
}

/// Shape of the tiny test model.
pub const TINY_LAYERS: usize = 2;
pub const TINY_EMBD: usize = 64;
pub const TINY_FF: usize = 128;
pub const TINY_HEADS: usize = 4;
pub const TINY_KV_HEADS: usize = 2;

/// GPT-2's byte-to-character map of byte-level BPE vocabularies.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut out = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable.contains(&b) {
            char::from_u32(b).expect("latin-1")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("valid")
        };
    }
    out
}

/// Shape of the tiny K-quant test model ([`TinyWeights::KQuant`]): K-quant rows are whole 256-element
/// super-blocks, so every matrix dimension that is a row length is a multiple of 256.
pub const TINY_K_EMBD: usize = 256;
pub const TINY_K_FF: usize = 512;

/// The matrices of a tiny test model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyWeights {
    /// Q4_1 (64 wide, [`TINY_EMBD`] / [`TINY_FF`]).
    Q4_1,
    /// Q4_K, Q5_K and Q6_K, in turn over the matrices of each layer ([`TINY_K_EMBD`] /
    /// [`TINY_K_FF`] wide).
    KQuant,
    /// The same random model as [`TinyWeights::KQuant`] (same seed), with the K-quant matrices
    /// dequantised to F32.
    KQuantAsF32,
    /// Q4_0, Q5_0, Q5_1 and Q8_0, in turn over the matrices of each layer (64 wide, as
    /// [`TinyWeights::Q4_1`]): the 32-element formats besides Q4_1.
    Block32,
    /// The same random model as [`TinyWeights::Block32`] (same seed), dequantised to F32.
    Block32AsF32,
}

/// The tiny models' generator (an LCG; the Q4_1 model's bytes depend on its exact sequence).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

/// Random Q4_1 rows: `d` in 0.01..0.05, `m = -7.5 d`.
fn tiny_q4_1(r: &mut Lcg, rows: usize, cols: usize) -> Vec<u8> {
    use half::f16;
    let mut v = Vec::with_capacity(rows * cols / 32 * 20);
    for _ in 0..rows * cols / 32 {
        let d = 0.01 + (r.next() % 100) as f32 * 0.0004;
        v.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        v.extend_from_slice(&f16::from_f32(-7.5 * d).to_le_bytes());
        for _ in 0..16 {
            v.push(r.next() as u8);
        }
    }
    v
}

/// Random rows of a 32-element format `ty` (Q4_0, Q5_0, Q5_1, Q8_0), centred, weights of about
/// ±0.1 like [`tiny_q4_1`]'s.
fn tiny_block32(r: &mut Lcg, ty: ep_kernels::GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    use ep_kernels::GgmlType;
    use half::f16;
    let nb = rows * cols / 32;
    let mut v = Vec::with_capacity(nb * ty.type_size());
    for _ in 0..nb {
        let u = (r.next() % 100) as f32;
        let mut b: Vec<u8> = (0..ty.type_size()).map(|_| r.next() as u8).collect();
        let (d, m) = match ty {
            GgmlType::Q4_0 => (0.01 + u * 0.0004, None),
            GgmlType::Q5_0 => (0.005 + u * 0.0002, None),
            GgmlType::Q5_1 => (0.005 + u * 0.0002, Some(-15.5)),
            _ => (0.0004 + u * 0.000016, None), // Q8_0: codes of ±127
        };
        b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        if let Some(k) = m {
            b[2..4].copy_from_slice(&f16::from_f32(k * d).to_le_bytes());
        }
        v.extend_from_slice(&b);
    }
    v
}

/// Random K-quant rows of `ty` (Q4_K, Q5_K or Q6_K), centred: sub-block scales `d * sc` around
/// 0.013, and for Q4_K/Q5_K mins `dmin * m = d * sc * 7.5` (resp. 15.5), so a weight is
/// `d * sc * (q - mid)`.
fn tiny_kquant(r: &mut Lcg, ty: ep_kernels::GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    use ep_kernels::GgmlType;
    use half::f16;
    let nb = rows * cols / 256;
    let mut v = Vec::with_capacity(nb * ty.type_size());
    for _ in 0..nb {
        let d = 0.0002 + (r.next() % 100) as f32 * 0.000001;
        let mut b: Vec<u8> = (0..ty.type_size()).map(|_| r.next() as u8).collect();
        match ty {
            GgmlType::Q6_K => {
                // `ql`, `qh` random; scales in ±32..64; `d` last.
                for s in &mut b[192..208] {
                    let mag = 32 + (*s & 31) as i8;
                    *s = if *s & 0x80 != 0 { -mag } else { mag } as u8;
                }
                b[208..210].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            }
            _ => {
                // Six-bit scales in 32..64 and mins equal to them (see `scales_mins_k4`).
                let mid = if ty == GgmlType::Q4_K { 7.5 } else { 15.5 };
                b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                b[2..4].copy_from_slice(&f16::from_f32(d * mid).to_le_bytes());
                let sc: [u8; 8] = std::array::from_fn(|j| 32 | (b[4 + j] & 31));
                for j in 0..4 {
                    b[4 + j] = sc[j] | ((sc[j + 4] >> 4) << 6);
                    b[8 + j] = sc[j] | ((sc[j + 4] >> 4) << 6);
                    b[12 + j] = (sc[j + 4] & 0xF) | ((sc[j + 4] & 0xF) << 4);
                }
            }
        }
        v.extend_from_slice(&b);
    }
    v
}

/// A tiny random-weight Llama GGUF (2 layers, 64 wide, GQA 4/2, Q4_1 matrices, Q8_0 embeddings, tied
/// output) with a byte-level vocabulary of 256 bytes plus ChatML control tokens and a ChatML template.
/// `arch` is written as `general.architecture`, so tests can also build unsupported ones.
pub fn tiny_model_bytes(seed: u64, arch: &str) -> Vec<u8> {
    tiny_model_bytes_with(seed, arch, TinyWeights::Q4_1)
}

/// [`tiny_model_bytes`] with the matrices of `weights` (and the shape that goes with them).
pub fn tiny_model_bytes_with(seed: u64, arch: &str, weights: TinyWeights) -> Vec<u8> {
    use ep_kernels::GgmlType;
    use ep_model::gguf::writer::{to_bytes, TensorOut};
    use ep_model::gguf::MetaValue as M;
    use half::f16;

    let (n_embd, n_ff) = match weights {
        TinyWeights::Q4_1 | TinyWeights::Block32 | TinyWeights::Block32AsF32 => {
            (TINY_EMBD, TINY_FF)
        }
        TinyWeights::KQuant | TinyWeights::KQuantAsF32 => (TINY_K_EMBD, TINY_K_FF),
    };
    let mut rng = Lcg(seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407));
    let vocab: Vec<String> = {
        let mut t: Vec<String> = byte_chars().into_iter().map(|c| c.to_string()).collect();
        t.push("<|im_start|>".into());
        t.push("<|im_end|>".into());
        t
    };
    let n_vocab = vocab.len();
    let mut embd = Vec::with_capacity(n_vocab * n_embd / 32 * 34);
    for _ in 0..n_vocab * n_embd / 32 {
        embd.extend_from_slice(&f16::from_f32(0.02).to_le_bytes());
        for _ in 0..32 {
            embd.push(rng.next() as u8);
        }
    }
    let hd = n_embd / TINY_HEADS;
    let (qw, kvw) = (TINY_HEADS * hd, TINY_KV_HEADS * hd);
    let ones = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| (1.0f32 + (i % 7) as f32 * 0.01).to_le_bytes())
            .collect()
    };
    let e = n_embd as u64;
    let mut tensors = vec![
        TensorOut::new(
            "token_embd.weight",
            vec![e, n_vocab as u64],
            GgmlType::Q8_0,
            embd,
        ),
        TensorOut::new("output_norm.weight", vec![e], GgmlType::F32, ones(n_embd)),
    ];
    for l in 0..TINY_LAYERS {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push(TensorOut::new(
            n("attn_norm"),
            vec![e],
            GgmlType::F32,
            ones(n_embd),
        ));
        tensors.push(TensorOut::new(
            n("ffn_norm"),
            vec![e],
            GgmlType::F32,
            ones(n_embd),
        ));
        for (idx, (name, rows, cols)) in [
            ("attn_q", qw, n_embd),
            ("attn_k", kvw, n_embd),
            ("attn_v", kvw, n_embd),
            ("attn_output", n_embd, qw),
            ("ffn_gate", n_ff, n_embd),
            ("ffn_up", n_ff, n_embd),
            ("ffn_down", n_embd, n_ff),
        ]
        .into_iter()
        .enumerate()
        {
            let dims = vec![cols as u64, rows as u64];
            let kty = [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K][(7 * l + idx) % 3];
            let bty = [
                GgmlType::Q4_0,
                GgmlType::Q5_0,
                GgmlType::Q5_1,
                GgmlType::Q8_0,
            ][(7 * l + idx) % 4];
            let as_f32 = |ty: GgmlType, q: Vec<u8>| {
                let mut f = vec![0f32; rows * cols];
                ep_kernels::quant::dequantize_row(ty, &q, &mut f);
                let data = f.iter().flat_map(|v| v.to_le_bytes()).collect();
                TensorOut::new(n(name), dims.clone(), GgmlType::F32, data)
            };
            let t = match weights {
                TinyWeights::Q4_1 => TensorOut::new(
                    n(name),
                    dims,
                    GgmlType::Q4_1,
                    tiny_q4_1(&mut rng, rows, cols),
                ),
                TinyWeights::KQuant => {
                    TensorOut::new(n(name), dims, kty, tiny_kquant(&mut rng, kty, rows, cols))
                }
                TinyWeights::KQuantAsF32 => as_f32(kty, tiny_kquant(&mut rng, kty, rows, cols)),
                TinyWeights::Block32 => {
                    TensorOut::new(n(name), dims, bty, tiny_block32(&mut rng, bty, rows, cols))
                }
                TinyWeights::Block32AsF32 => as_f32(bty, tiny_block32(&mut rng, bty, rows, cols)),
            };
            tensors.push(t);
        }
    }
    let k = |s: &str| format!("{arch}.{s}");
    let mut types = vec![M::I32(1); 256];
    types.extend([M::I32(3), M::I32(3)]);
    let template = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let meta = vec![
        ("general.architecture".to_string(), M::String(arch.into())),
        (
            "general.name".to_string(),
            M::String("tiny test model".into()),
        ),
        (k("block_count"), M::U32(TINY_LAYERS as u32)),
        (k("context_length"), M::U32(256)),
        (k("embedding_length"), M::U32(n_embd as u32)),
        (k("feed_forward_length"), M::U32(n_ff as u32)),
        (k("attention.head_count"), M::U32(TINY_HEADS as u32)),
        (k("attention.head_count_kv"), M::U32(TINY_KV_HEADS as u32)),
        (k("rope.freq_base"), M::F32(10000.0)),
        (k("attention.layer_norm_rms_epsilon"), M::F32(1e-5)),
        (k("vocab_size"), M::U32(n_vocab as u32)),
        ("tokenizer.ggml.model".to_string(), M::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), M::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            M::Array(vocab.into_iter().map(M::String).collect()),
        ),
        ("tokenizer.ggml.token_type".to_string(), M::Array(types)),
        ("tokenizer.ggml.merges".to_string(), M::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".to_string(), M::U32(256)),
        ("tokenizer.ggml.eos_token_id".to_string(), M::U32(257)),
        ("tokenizer.ggml.add_bos_token".to_string(), M::Bool(false)),
        (
            "tokenizer.chat_template".to_string(),
            M::String(template.into()),
        ),
    ];
    to_bytes(&meta, &tensors)
}

/// The tiny random model of `seed` (the "llama" architecture) written to a temporary directory and
/// loaded with its tokenizer. Keep the directory as long as the model: the model maps the file.
pub fn load_tiny(
    seed: u64,
) -> (
    ep_model::Model,
    ep_model::tokenizer::Tokenizer,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, tiny_model_bytes(seed, "llama")).expect("the tiny model is written");
    let model = ep_model::Model::load(&path, |_, _| {}).expect("the tiny model loads");
    let tok = ep_model::tokenizer::Tokenizer::from_gguf(model.gguf().expect("a GGUF model"))
        .expect("the tiny model's tokenizer");
    (model, tok, dir)
}
