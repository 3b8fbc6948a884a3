//! Tokenizer built from GGUF metadata, matching llama.cpp's `llama_tokenize` / `llama_token_to_piece`.
//!
//! Supported today: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) and `"llama"` (SentencePiece, see
//! [`crate::spm`]). The other model types are rejected with an error naming them.
//!
//! Byte-level BPE encoding follows llama.cpp step by step (SentencePiece vocabularies share step 1 and
//! then tokenize each fragment as [`crate::spm`] describes):
//!
//! 1. **Special-token partition** (llama.cpp's `tokenizer_st_partition`): the special tokens (token
//!    types control, user-defined and unknown) are searched for in the text, longest token text first;
//!    each occurrence becomes that token and splits the text around it. Control and unknown tokens are
//!    only matched when `parse_special` is on; user-defined tokens are always matched (as llama.cpp and
//!    HF `tokenizers` do).
//! 2. **Pre-tokenization** of each remaining text fragment with the regexes llama.cpp uses for the
//!    vocabulary's `tokenizer.ggml.pre` type (see [`pre_tokenizer_regexes`]), each applied as an
//!    "isolated" split, then the GPT-2 byte-to-unicode mapping.
//! 3. **BPE merges** by rank (lowest first, leftmost on ties) within each pre-token, done by the
//!    `tokenizers` crate's BPE model built from the GGUF vocabulary and merges.
//!
//! Decoding renders each token as llama.cpp's `token_to_piece(special = true)` does: normal tokens are
//! mapped back from the byte-level alphabet to raw bytes, control / user-defined / unknown tokens are
//! rendered as their text, byte tokens as their byte, unused tokens as nothing.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::gguf::{Gguf, GgufError, MetaValue};
use crate::spm::{self, SpmModel, SpmSpec};

/// Errors building or running a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "unsupported tokenizer model '{0}' (tokenizer.ggml.model); supported: \"gpt2\" (byte-level BPE), \
         \"llama\" (SentencePiece)"
    )]
    UnsupportedModel(String),
    #[error(
        "unsupported pre-tokenizer '{0}' (tokenizer.ggml.pre) for a byte-level BPE vocabulary; \
         supported: {SUPPORTED_PRE}"
    )]
    UnsupportedPre(String),
    #[error("invalid tokenizer metadata: {0}")]
    Invalid(String),
    #[error("tokenizer backend error: {0}")]
    Backend(String),
    /// A problem with a file of a Hugging Face model directory.
    #[error("{path}: {what}")]
    File {
        path: std::path::PathBuf,
        what: String,
    },
}

const SUPPORTED_PRE: &str = "default (or empty), smollm, starcoder, refact, command-r, codeshell, \
     exaone, minerva-7b, gpt2, gpt-2, phi-2, mpt, olmo, jais, llama3, llama-v3, llama-bpe, falcon3, \
     falcon-h1, pixtral, midm-2.0, lfm2, dbrx, smaug-bpe, qwen2, deepseek-r1-qwen, megrez, stablelm2";

// ---------------------------------------------------------------------------------------------------
// Pre-tokenizer regexes (llama.cpp `llm_tokenizer_bpe` constructor, src/llama-vocab.cpp)
// ---------------------------------------------------------------------------------------------------

/// GPT-2's pattern. llama.cpp writes it without the trailing `|\s+` but runs it through a hand-written
/// matcher (`unicode_regex_split_custom_gpt2`) that implements the full pattern, trailing `\s+`
/// included; with isolated splitting the two are equivalent anyway.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's pattern, with llama.cpp's rewrite of the case-insensitive group.
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pattern: Llama 3's with single digits.
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Single digits (applied before GPT-2's pattern for smollm / starcoder-family vocabularies).
const RE_DIGIT: &str = r"\p{N}";

const PRE_DEFAULT: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    RE_GPT2,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];
const PRE_GPT2: &[&str] = &[RE_GPT2];
const PRE_SMOLLM: &[&str] = &[RE_DIGIT, RE_GPT2];
const PRE_LLAMA3: &[&str] = &[RE_LLAMA3];
const PRE_QWEN2: &[&str] = &[RE_QWEN2];

/// How a `tokenizer.ggml.pre` value configures the BPE tokenizer (as in llama.cpp's `llama_vocab::load`).
#[derive(Clone, Copy, Debug)]
struct PreConfig {
    regexes: &'static [&'static str],
    /// A pre-token that is itself in the vocabulary becomes that token without merging (llama3).
    ignore_merges: bool,
    /// Default for adding BOS when `tokenizer.ggml.add_bos_token` is absent.
    add_bos: bool,
}

fn pre_config(pre: &str) -> Option<PreConfig> {
    let cfg = |regexes, ignore_merges, add_bos| {
        Some(PreConfig {
            regexes,
            ignore_merges,
            add_bos,
        })
    };
    match pre {
        "" | "default" => cfg(PRE_DEFAULT, false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => cfg(PRE_LLAMA3, true, true),
        "dbrx" | "smaug-bpe" => cfg(PRE_LLAMA3, false, false),
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" => cfg(PRE_GPT2, false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            cfg(PRE_SMOLLM, false, false)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => cfg(PRE_QWEN2, false, false),
        _ => None,
    }
}

/// The regexes llama.cpp splits text with for a `tokenizer.ggml.pre` value, in the order they are
/// applied (each one splits the pieces the previous ones produced, keeping matches and the text between
/// them as separate pieces). `None` for an unsupported value.
pub fn pre_tokenizer_regexes(pre: &str) -> Option<&'static [&'static str]> {
    pre_config(pre).map(|c| c.regexes)
}

// ---------------------------------------------------------------------------------------------------
// Token attributes (llama.cpp `llama_token_attr`)
// ---------------------------------------------------------------------------------------------------

const ATTR_UNKNOWN: u8 = 1 << 0;
const ATTR_UNUSED: u8 = 1 << 1;
const ATTR_NORMAL: u8 = 1 << 2;
const ATTR_CONTROL: u8 = 1 << 3;
const ATTR_USER_DEFINED: u8 = 1 << 4;
const ATTR_BYTE: u8 = 1 << 5;
const ATTR_SPECIAL: u8 = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN;

/// GGUF `tokenizer.ggml.token_type` value to attribute bits.
fn attr_from_type(t: i32) -> u8 {
    match t {
        1 => ATTR_NORMAL,
        2 => ATTR_UNKNOWN,
        3 => ATTR_CONTROL,
        4 => ATTR_USER_DEFINED,
        5 => ATTR_UNUSED,
        6 => ATTR_BYTE,
        _ => 0,
    }
}

/// Token texts llama.cpp treats as end-of-generation (`special_eog_ids`), forcing them to control type.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

// ---------------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode alphabet
// ---------------------------------------------------------------------------------------------------

/// Highest code point used by the byte-level alphabet, plus one.
const BYTE_ALPHABET_END: usize = 256 + 68;

/// `bytes_to_unicode()` from GPT-2: printable Latin-1 bytes map to themselves, the other 68 bytes to
/// U+0100.. in order.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let cp = if printable {
            b as u32
        } else {
            n += 1;
            255 + n
        };
        *slot = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    table
}

/// Inverse of [`byte_to_char_table`], indexed by code point.
fn char_to_byte_table() -> Vec<Option<u8>> {
    let mut table = vec![None; BYTE_ALPHABET_END];
    for (b, c) in byte_to_char_table().iter().enumerate() {
        table[*c as usize] = Some(b as u8);
    }
    table
}

/// Raw bytes of a byte-level BPE token text: each alphabet character becomes its byte; a character
/// outside the alphabet (malformed vocabulary) is kept as its own UTF-8.
fn byte_level_decode(text: &str, inverse: &[Option<u8>], out: &mut Vec<u8>) {
    for c in text.chars() {
        match inverse.get(c as usize).copied().flatten() {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------------------

/// Special-token ids as read from metadata (`tokenizer.ggml.*_token_id`); `None` where the key is absent.
/// Values are `i64` so that negative / out-of-range entries in a file can be recognised and ignored.
#[derive(Clone, Debug, Default)]
pub struct SpecialIds {
    pub bos: Option<i64>,
    pub eos: Option<i64>,
    pub eot: Option<i64>,
    pub eom: Option<i64>,
    pub unk: Option<i64>,
    pub sep: Option<i64>,
    pub pad: Option<i64>,
    pub mask: Option<i64>,
    pub fim_pre: Option<i64>,
    pub fim_suf: Option<i64>,
    pub fim_mid: Option<i64>,
    pub fim_pad: Option<i64>,
    pub fim_rep: Option<i64>,
    pub fim_sep: Option<i64>,
}

/// Everything a byte-level BPE tokenizer is built from: the GGUF `tokenizer.ggml.*` metadata, borrowed.
/// [`Tokenizer::from_gguf`] fills it from a file; tests build small ones by hand.
#[derive(Clone, Debug, Default)]
pub struct BpeSpec<'a> {
    /// `tokenizer.ggml.tokens`: token texts in the byte-level alphabet (e.g. `"Ġthe"`), indexed by id.
    pub tokens: Vec<&'a str>,
    /// `tokenizer.ggml.token_type`, one per token (1 normal, 2 unknown, 3 control, 4 user-defined,
    /// 5 unused, 6 byte). Empty: all normal.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`: `"left right"`, highest priority first.
    pub merges: Vec<&'a str>,
    /// `tokenizer.ggml.pre`.
    pub pre: &'a str,
    pub special: SpecialIds,
    /// `tokenizer.ggml.add_bos_token` (`None`: absent, the pre-tokenizer type's default applies).
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token` (`None`: absent, false).
    pub add_eos: Option<bool>,
}

/// How text fragments (between special tokens) become tokens.
enum Backend {
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`), run by the `tokenizers` crate.
    Bpe(Box<tokenizers::Tokenizer>),
    /// SentencePiece (`tokenizer.ggml.model = "llama"`), llama.cpp's score-driven merge.
    Spm(SpmModel),
    /// A Hugging Face `tokenizer.json`, run whole by the `tokenizers` crate (normalizer, pre-tokenizer,
    /// model, added tokens): `plain` matches special added tokens in text, `split` (its
    /// `encode_special_tokens` on) tokenizes their text as ordinary text.
    Hf {
        plain: Box<tokenizers::Tokenizer>,
        split: Box<tokenizers::Tokenizer>,
    },
}

/// A tokenizer built from GGUF metadata: byte-level BPE (llama.cpp vocabulary type
/// `LLAMA_VOCAB_TYPE_BPE`) or SentencePiece (`LLAMA_VOCAB_TYPE_SPM`).
pub struct Tokenizer {
    backend: Backend,
    pre: String,
    n_vocab: usize,
    attrs: Vec<u8>,
    /// Decoded piece of every token, concatenated; `piece_offsets[id]..piece_offsets[id + 1]`.
    pieces: Vec<u8>,
    piece_offsets: Vec<u32>,
    /// Special tokens (control, user-defined, unknown) with their text, longest text first.
    special_order: Vec<(u32, String)>,
    /// Exact vocabulary lookup for every token whose text the BPE model may not know (empty-text
    /// replacements); everything else goes through the BPE model's vocabulary.
    extra_ids: HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    /// [`Tokenizer::digest`].
    digest: [u8; 32],
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model())
            .field("pre", &self.pre)
            .field("n_vocab", &self.n_vocab)
            .field("n_special", &self.special_order.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish()
    }
}

fn opt_i64(g: &Gguf, key: &str) -> Option<i64> {
    g.get(key).and_then(MetaValue::as_i64)
}

fn opt_bool(g: &Gguf, key: &str) -> Result<Option<bool>, TokenizerError> {
    match g.get(key) {
        None => Ok(None),
        Some(MetaValue::Bool(b)) => Ok(Some(*b)),
        Some(_) => g.get_bool(key).map(Some).map_err(TokenizerError::from),
    }
}

/// Token texts (llama.cpp renames empty ones `[EMPTY_<id>]`), their attributes from the token types, and
/// the renamed texts with their ids.
type BaseVocab<'a> = (Vec<Cow<'a, str>>, Vec<u8>, HashMap<String, u32>);

fn base_vocab<'a>(
    tokens: &[&'a str],
    token_types: &[i32],
) -> Result<BaseVocab<'a>, TokenizerError> {
    let n = tokens.len();
    if n == 0 {
        return Err(TokenizerError::Invalid("empty vocabulary".into()));
    }
    if n > u32::MAX as usize / 2 {
        return Err(TokenizerError::Invalid(format!(
            "vocabulary too large ({n})"
        )));
    }
    if !token_types.is_empty() && token_types.len() < n {
        return Err(TokenizerError::Invalid(format!(
            "{} token types for {n} tokens",
            token_types.len()
        )));
    }
    let mut texts: Vec<Cow<'a, str>> = Vec::with_capacity(n);
    let mut extra_ids = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            let name = format!("[EMPTY_{i}]");
            extra_ids.insert(name.clone(), i as u32);
            texts.push(name.into());
        } else {
            texts.push((*t).into());
        }
    }
    let attrs: Vec<u8> = if token_types.is_empty() {
        vec![ATTR_NORMAL; n]
    } else {
        token_types[..n]
            .iter()
            .map(|&t| attr_from_type(t))
            .collect()
    };
    Ok((texts, attrs, extra_ids))
}

/// Special tokens resolved from metadata and token texts (llama.cpp `llama_vocab::load`).
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    /// End-of-generation tokens, ascending.
    eog: Vec<u32>,
    /// Special tokens (control, user-defined, unknown) with their text, longest text first.
    special_order: Vec<(u32, String)>,
}

/// Resolves the special-token ids (metadata ids outside the vocabulary are ignored; `defaults` are the
/// BOS / EOS / UNK ids of the vocabulary type, used when the metadata does not name one), detects
/// end-of-turn / FIM tokens by text and adjusts `attrs` as llama.cpp does.
fn resolve_specials(
    texts: &[Cow<'_, str>],
    attrs: &mut [u8],
    lookup: &dyn Fn(&str) -> Option<u32>,
    s: &SpecialIds,
    defaults: [Option<u32>; 3],
) -> Specials {
    let n = texts.len();
    let in_range = |v: Option<i64>| {
        v.and_then(|x| u32::try_from(x).ok())
            .filter(|&x| (x as usize) < n)
    };
    let with_default = |v: Option<i64>, default: Option<u32>| {
        if v.is_some() {
            in_range(v).or(default.filter(|&d| (d as usize) < n))
        } else {
            default.filter(|&d| (d as usize) < n)
        }
    };
    let [default_bos, default_eos, default_unk] = defaults;
    let bos = with_default(s.bos, default_bos);
    let eos = with_default(s.eos, default_eos);
    let unk = with_default(s.unk, default_unk);
    let mut eot = in_range(s.eot);
    let mut eom = in_range(s.eom);
    let mut fim_pre = in_range(s.fim_pre);
    let mut fim_suf = in_range(s.fim_suf);
    let mut fim_mid = in_range(s.fim_mid);
    let mut fim_pad = in_range(s.fim_pad);
    let mut fim_rep = in_range(s.fim_rep);
    let mut fim_sep = in_range(s.fim_sep);

    // Auto-detect special tokens by text, forcing them to control type (llama.cpp's workaround).
    let detect = |slot: &mut Option<u32>, names: &[&str], attrs: &mut [u8]| {
        if slot.is_some() {
            return;
        }
        for name in names {
            if let Some(id) = lookup(name) {
                *slot = Some(id);
                attrs[id as usize] |= ATTR_CONTROL;
                return;
            }
        }
    };
    detect(&mut eot, EOT_TEXTS, attrs);
    detect(&mut eom, EOM_TEXTS, attrs);
    detect(&mut fim_pre, FIM_PRE_TEXTS, attrs);
    detect(&mut fim_suf, FIM_SUF_TEXTS, attrs);
    detect(&mut fim_mid, FIM_MID_TEXTS, attrs);
    detect(&mut fim_pad, FIM_PAD_TEXTS, attrs);
    detect(&mut fim_rep, FIM_REP_TEXTS, attrs);
    detect(&mut fim_sep, FIM_SEP_TEXTS, attrs);
    let _ = (fim_pre, fim_suf, fim_mid);

    // Control tokens named "unused..." are unused.
    for (i, t) in texts.iter().enumerate() {
        if attrs[i] & ATTR_CONTROL != 0 && t.contains("unused") {
            attrs[i] |= ATTR_UNUSED;
        }
    }

    // End-of-generation set.
    let mut eog: Vec<u32> = Vec::new();
    let add_eog = |id: Option<u32>, eog: &mut Vec<u32>| {
        if let Some(id) = id {
            if !eog.contains(&id) {
                eog.push(id);
            }
        }
    };
    add_eog(fim_pad, &mut eog);
    add_eog(fim_rep, &mut eog);
    add_eog(fim_sep, &mut eog);
    for name in EOG_TEXTS {
        if let Some(id) = lookup(name) {
            add_eog(Some(id), &mut eog);
            attrs[id as usize] |= ATTR_CONTROL;
        }
    }
    // gpt-oss: always rendered, matched like user-defined tokens.
    for name in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(id) = lookup(name) {
            attrs[id as usize] = ATTR_USER_DEFINED;
        }
    }
    add_eog(eos, &mut eog);
    add_eog(eot, &mut eog);
    add_eog(eom, &mut eog);
    // o200k_harmony / solar-open: "<|end|>" is not end-of-generation there; gemma4 / plamo: "</s>" is
    // a normal token.
    {
        let has = |t: &str| eog.iter().any(|&id| texts[id as usize] == t);
        let drop_end = (has("<|return|>") && (has("<|call|>") || has("<|calls|>")))
            || ((has("<|call|>") || has("<|calls|>")) && has("<|flush|>"));
        let drop_s = has("<|tool_response>") || has("<|plamo:eos|>");
        let pos_of = |eog: &[u32], t: &str| eog.iter().position(|&id| texts[id as usize] == t);
        if drop_end {
            if let Some(pos) = pos_of(&eog, "<|end|>") {
                let id = eog.remove(pos);
                attrs[id as usize] = ATTR_USER_DEFINED;
            }
        }
        if drop_s {
            if let Some(pos) = pos_of(&eog, "</s>") {
                let id = eog.remove(pos);
                attrs[id as usize] = ATTR_NORMAL;
            }
        }
    }
    eog.sort_unstable();

    // Special tokens, longest text first (ties by id; llama.cpp's sort leaves ties unspecified).
    let mut special_order: Vec<(u32, String)> = (0..n)
        .filter(|&i| attrs[i] & ATTR_SPECIAL != 0)
        .map(|i| (i as u32, texts[i].to_string()))
        .collect();
    special_order.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));

    Specials {
        bos,
        eos,
        unk,
        eog,
        special_order,
    }
}

/// `tokenizer.ggml.scores` as f32 (llama.cpp accepts f32 or i32 arrays); empty when absent.
fn read_scores(g: &Gguf, key: &str) -> Result<Vec<f32>, TokenizerError> {
    match g.get(key) {
        None => Ok(Vec::new()),
        Some(MetaValue::Array(a)) => a
            .iter()
            .map(|v| match v {
                MetaValue::F32(x) => Ok(*x),
                MetaValue::I32(x) => Ok(*x as f32),
                other => Err(TokenizerError::Invalid(format!(
                    "{key}: expected an array of f32 or i32, found an element of type {}",
                    other.type_name()
                ))),
            })
            .collect(),
        Some(other) => Err(TokenizerError::Invalid(format!(
            "{key}: expected an array, found {}",
            other.type_name()
        ))),
    }
}

/// The byte stream [`Tokenizer::digest`] hashes.
pub(crate) struct DigestStream(blake3::Hasher);

impl DigestStream {
    pub(crate) fn new(kind: &str) -> Self {
        let mut d = DigestStream(blake3::Hasher::new());
        d.bytes(b"edgeprompt/tokenizer/v1");
        d.str(kind);
        d
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.bytes(s.as_bytes());
    }
    fn strs(&mut self, v: &[&str]) {
        self.u32(v.len() as u32);
        for s in v {
            self.str(s);
        }
    }
    fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            None => self.bytes(&[0]),
            Some(x) => {
                self.bytes(&[1]);
                self.bytes(&x.to_le_bytes());
            }
        }
    }
    fn opt_bool(&mut self, v: Option<bool>) {
        match v {
            None => self.bytes(&[0]),
            Some(b) => self.bytes(&[1, u8::from(b)]),
        }
    }
    fn types(&mut self, t: &[i32]) {
        self.u32(t.len() as u32);
        for x in t {
            self.bytes(&x.to_le_bytes());
        }
    }
    fn special(&mut self, s: &SpecialIds) {
        for v in [
            s.bos, s.eos, s.eot, s.eom, s.unk, s.sep, s.pad, s.mask, s.fim_pre, s.fim_suf,
            s.fim_mid, s.fim_pad, s.fim_rep, s.fim_sep,
        ] {
            self.opt_i64(v);
        }
    }
    /// A file the tokenizer read, or its absence.
    pub(crate) fn file(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            None => self.bytes(&[0]),
            Some(b) => {
                self.bytes(&[1]);
                self.bytes(&(b.len() as u64).to_le_bytes());
                self.bytes(b);
            }
        }
    }
    pub(crate) fn finish(self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

fn bpe_digest(spec: &BpeSpec<'_>) -> [u8; 32] {
    let mut d = DigestStream::new("gpt2");
    d.str(spec.pre);
    d.strs(&spec.tokens);
    d.types(&spec.token_types);
    d.strs(&spec.merges);
    d.special(&spec.special);
    d.opt_bool(spec.add_bos);
    d.opt_bool(spec.add_eos);
    d.finish()
}

fn spm_digest(spec: &SpmSpec<'_>) -> [u8; 32] {
    let mut d = DigestStream::new("llama");
    d.str(spec.pre);
    d.strs(&spec.tokens);
    d.u32(spec.scores.len() as u32);
    for x in &spec.scores {
        d.bytes(&x.to_le_bytes());
    }
    d.types(&spec.token_types);
    d.special(&spec.special);
    d.opt_bool(spec.add_bos);
    d.opt_bool(spec.add_eos);
    d.opt_bool(spec.add_space_prefix);
    d.finish()
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    ///
    /// Errors: a `tokenizer.ggml.model` other than `"gpt2"` or `"llama"`, an unsupported
    /// `tokenizer.ggml.pre` (BPE), missing or mistyped token / merge / score arrays.
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" && model != "llama" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre = match g.get("tokenizer.ggml.pre") {
            None => "",
            Some(_) => g.get_str("tokenizer.ggml.pre")?,
        };
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let token_types = match g.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(_) => g.get_i32_array("tokenizer.ggml.token_type")?,
        };
        let id = |k: &str| opt_i64(g, &format!("tokenizer.ggml.{k}"));
        let special = SpecialIds {
            bos: id("bos_token_id"),
            eos: id("eos_token_id"),
            eot: id("eot_token_id"),
            eom: id("eom_token_id"),
            unk: id("unknown_token_id"),
            sep: id("seperator_token_id"),
            pad: id("padding_token_id"),
            mask: id("mask_token_id"),
            fim_pre: id("fim_pre_token_id").or_else(|| id("prefix_token_id")),
            fim_suf: id("fim_suf_token_id").or_else(|| id("suffix_token_id")),
            fim_mid: id("fim_mid_token_id").or_else(|| id("middle_token_id")),
            fim_pad: id("fim_pad_token_id"),
            fim_rep: id("fim_rep_token_id"),
            fim_sep: id("fim_sep_token_id"),
        };
        if model == "llama" {
            return Self::from_spm(&SpmSpec {
                tokens,
                scores: read_scores(g, "tokenizer.ggml.scores")?,
                token_types,
                pre,
                special,
                add_bos: opt_bool(g, "tokenizer.ggml.add_bos_token")?,
                add_eos: opt_bool(g, "tokenizer.ggml.add_eos_token")?,
                add_space_prefix: opt_bool(g, "tokenizer.ggml.add_space_prefix")?,
            });
        }
        let merges = g.get_str_array("tokenizer.ggml.merges")?;
        Self::from_bpe(&BpeSpec {
            tokens,
            token_types,
            merges,
            pre,
            special,
            add_bos: opt_bool(g, "tokenizer.ggml.add_bos_token")?,
            add_eos: opt_bool(g, "tokenizer.ggml.add_eos_token")?,
        })
    }

    /// Builds the tokenizer of a Hugging Face model directory: `tokenizer.json` (required) run by the
    /// `tokenizers` crate, with `tokenizer_config.json` (optional: `bos_token`, `eos_token`,
    /// `add_bos_token`, `add_eos_token`) and `generation_config.json` (optional: more `eos_token_id`s,
    /// which end generation too).
    ///
    /// Encoding equals transformers' `tokenizer(text)`: the text goes through `tokenizers` without its
    /// post-processor and BOS / EOS are added per [`Tokenizer::add_bos`] / [`Tokenizer::add_eos`],
    /// which are `add_bos_token` / `add_eos_token` when the config sets them and otherwise what the
    /// post-processor adds to an empty text. Token pieces (for decoding) follow the decoder: byte-level
    /// tokens are mapped back to bytes, SentencePiece-style tokens turn `▁` into a space and `<0xNN>`
    /// into its byte, added tokens are their text.
    pub fn from_hf_dir(dir: &std::path::Path) -> Result<Self, TokenizerError> {
        crate::hf_tokenizer::build(dir)
    }

    /// Assembles a tokenizer from a parsed `tokenizer.json` (see [`Tokenizer::from_hf_dir`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_hf_parts(
        plain: tokenizers::Tokenizer,
        texts: Vec<Option<String>>,
        added: &HashMap<u32, bool>,
        style: crate::hf_tokenizer::PieceStyle,
        bos: Option<u32>,
        eos: Option<u32>,
        extra_eog: &[u32],
        add_bos: Option<bool>,
        add_eos: Option<bool>,
        unk: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        use crate::hf_tokenizer::PieceStyle;
        let n = texts.len();
        if n == 0 {
            return Err(TokenizerError::Invalid("empty vocabulary".into()));
        }
        let mut split = plain.clone();
        split.set_encode_special_tokens(true);
        let inverse = char_to_byte_table();
        let mut attrs = vec![ATTR_UNUSED; n];
        let mut pieces = Vec::with_capacity(n * 6);
        let mut piece_offsets = Vec::with_capacity(n + 1);
        piece_offsets.push(0u32);
        let mut special_order = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let id = i as u32;
            if let Some(t) = t {
                let a = if let Some(&special) = added.get(&id) {
                    special_order.push((id, t.clone()));
                    if special {
                        ATTR_CONTROL
                    } else {
                        ATTR_USER_DEFINED
                    }
                } else if Some(id) == unk {
                    ATTR_UNKNOWN
                } else if style == PieceStyle::Spm && is_byte_token(t) {
                    ATTR_BYTE
                } else {
                    ATTR_NORMAL
                };
                attrs[i] = a;
                if a & ATTR_SPECIAL != 0 {
                    pieces.extend_from_slice(t.as_bytes());
                } else if a & ATTR_BYTE != 0 {
                    pieces.push(spm::byte_token_value(t));
                } else {
                    match style {
                        PieceStyle::ByteLevel => byte_level_decode(t, &inverse, &mut pieces),
                        PieceStyle::Spm => spm::unescape_into(t, &mut pieces),
                        PieceStyle::Plain => pieces.extend_from_slice(t.as_bytes()),
                    }
                }
            }
            let end = u32::try_from(pieces.len())
                .map_err(|_| TokenizerError::Invalid("vocabulary text too large".into()))?;
            piece_offsets.push(end);
        }
        special_order.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));

        let in_vocab = |id: &u32| (*id as usize) < n;
        let mut eog: Vec<u32> = eos
            .into_iter()
            .chain(extra_eog.iter().copied())
            .filter(in_vocab)
            .collect();
        for (id, text) in &special_order {
            if EOG_TEXTS.contains(&text.as_str()) {
                eog.push(*id);
            }
        }
        eog.sort_unstable();
        eog.dedup();

        // What the post-processor adds around an empty text.
        let empty = plain
            .encode_fast("", true)
            .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        let ids = empty.get_ids();
        let pp_bos = bos.is_some() && ids.first().copied() == bos;
        let pp_eos = eos.is_some() && ids.last().copied() == eos && !(pp_bos && ids.len() == 1);
        Ok(Tokenizer {
            backend: Backend::Hf {
                plain: Box::new(plain),
                split: Box::new(split),
            },
            pre: "hf".into(),
            n_vocab: n,
            attrs,
            pieces,
            piece_offsets,
            special_order,
            extra_ids: HashMap::new(),
            bos,
            eos,
            eog,
            add_bos: add_bos.unwrap_or(pp_bos) && bos.is_some(),
            add_eos: add_eos.unwrap_or(pp_eos) && eos.is_some(),
            // Set by the directory reader from the files' bytes.
            digest: [0; 32],
        })
    }

    /// Builds a byte-level BPE tokenizer from its parts (what [`Tokenizer::from_gguf`] reads).
    ///
    /// As in llama.cpp: BOS and EOS default to id 11 when the metadata does not name them (and the
    /// vocabulary has that many tokens); ids outside the vocabulary are ignored; an empty token text is
    /// replaced by `[EMPTY_<id>]`.
    pub fn from_bpe(spec: &BpeSpec<'_>) -> Result<Self, TokenizerError> {
        let cfg =
            pre_config(spec.pre).ok_or_else(|| TokenizerError::UnsupportedPre(spec.pre.into()))?;
        let (texts, mut attrs, extra_ids) = base_vocab(&spec.tokens, &spec.token_types)?;
        let n = texts.len();
        // Text -> id, last occurrence winning as in llama.cpp's `token_to_id[word] = i`.
        let mut vocab: Vocab = Vocab::default();
        vocab.reserve(n);
        for (i, t) in texts.iter().enumerate() {
            vocab.insert(t.to_string(), i as u32);
        }
        let lookup = |s: &str| vocab.get(s).copied();

        // Special ids (llama.cpp defaults for gpt2 vocabularies: BOS = EOS = 11).
        let Specials {
            bos,
            eos,
            eog,
            special_order,
            ..
        } = resolve_specials(
            &texts,
            &mut attrs,
            &lookup,
            &spec.special,
            [Some(11), Some(11), None],
        );

        // Decoded pieces (llama.cpp `token_to_piece(special = true)`).
        let inverse = char_to_byte_table();
        let mut pieces = Vec::with_capacity(n * 6);
        let mut piece_offsets = Vec::with_capacity(n + 1);
        piece_offsets.push(0u32);
        for (i, t) in texts.iter().enumerate() {
            let a = attrs[i];
            if a & ATTR_SPECIAL != 0 {
                pieces.extend_from_slice(t.as_bytes());
            } else if a & ATTR_NORMAL != 0 {
                byte_level_decode(t, &inverse, &mut pieces);
            } else if a & ATTR_BYTE != 0 {
                let mut chars = t.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) if inverse.get(c as usize).copied().flatten().is_some() => {
                        byte_level_decode(t, &inverse, &mut pieces)
                    }
                    _ => pieces.extend_from_slice(t.as_bytes()),
                }
            }
            let end = u32::try_from(pieces.len())
                .map_err(|_| TokenizerError::Invalid("vocabulary text too large".into()))?;
            piece_offsets.push(end);
        }

        // Merges: "left right" split at the first space after the first byte; the first occurrence of
        // a pair wins (llama.cpp `bpe_ranks.emplace`). Merges whose parts or result are not in the
        // vocabulary cannot produce a token and are dropped (the BPE model requires all three).
        let mut merges: Vec<(String, String)> = Vec::with_capacity(spec.merges.len());
        let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(spec.merges.len());
        let mut dropped = 0usize;
        let mut joined = String::new();
        for m in &spec.merges {
            let split_at = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
            let Some(pos) = split_at else {
                dropped += 1;
                continue;
            };
            let (a, b) = (&m[..pos], &m[pos + 1..]);
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            if !vocab.contains_key(a) || !vocab.contains_key(b) || !vocab.contains_key(&joined) {
                dropped += 1;
                continue;
            }
            if seen.insert((a, b)) {
                merges.push((a.to_string(), b.to_string()));
            }
        }
        if dropped > 0 {
            tracing::warn!(
                "tokenizer: ignored {dropped} merges that do not produce vocabulary tokens"
            );
        }

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(cfg.ignore_merges)
            .build()
            .map_err(|e| TokenizerError::Backend(format!("building BPE model: {e}")))?;

        let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(cfg.regexes.len() + 1);
        for re in cfg.regexes {
            let split = Split::new(
                SplitPattern::Regex((*re).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Backend(format!("compiling pre-tokenizer regex: {e}")))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, false, false).into());

        let mut hf = tokenizers::Tokenizer::new(bpe);
        hf.with_pre_tokenizer(Some(Sequence::new(steps)));
        hf.with_decoder(Some(ByteLevel::default()));
        // Special tokens are split out by `partition` (llama.cpp's algorithm) before the text reaches the
        // HF tokenizer; they are registered so that the HF side knows them, with extraction off so that
        // control-token text in plain text (parse_special = false) is tokenized as text.
        let added: Vec<AddedToken> = special_order
            .iter()
            .map(|(_, t)| AddedToken::from(t.clone(), true))
            .collect();
        hf.add_special_tokens(&added);
        hf.set_encode_special_tokens(true);

        let add_bos = spec.add_bos.unwrap_or(cfg.add_bos) && bos.is_some();
        let add_eos = spec.add_eos.unwrap_or(false) && eos.is_some();

        Ok(Tokenizer {
            backend: Backend::Bpe(Box::new(hf)),
            pre: spec.pre.to_string(),
            n_vocab: n,
            attrs,
            pieces,
            piece_offsets,
            special_order,
            extra_ids,
            bos,
            eos,
            eog,
            add_bos,
            add_eos,
            digest: bpe_digest(spec),
        })
    }

    /// Builds a SentencePiece tokenizer from its parts (what [`Tokenizer::from_gguf`] reads for
    /// `tokenizer.ggml.model = "llama"`).
    ///
    /// As in llama.cpp: BOS / EOS / UNK default to ids 1 / 2 / 0 when the metadata does not name them
    /// (and the vocabulary has that many tokens); BOS is added unless `add_bos_token` is false; a space
    /// is prefixed unless `add_space_prefix` is false; an empty token text is replaced by
    /// `[EMPTY_<id>]`.
    pub fn from_spm(spec: &SpmSpec<'_>) -> Result<Self, TokenizerError> {
        let (texts, mut attrs, extra_ids) = base_vocab(&spec.tokens, &spec.token_types)?;
        let n = texts.len();
        if !spec.scores.is_empty() && spec.scores.len() < n {
            return Err(TokenizerError::Invalid(format!(
                "{} scores for {n} tokens",
                spec.scores.len()
            )));
        }
        let text_refs: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
        let scores = if spec.scores.is_empty() {
            vec![0.0; n]
        } else {
            spec.scores[..n].to_vec()
        };
        let mut by_text: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (i, t) in text_refs.iter().enumerate() {
            by_text.insert(t, i as u32);
        }
        let lookup = |s: &str| by_text.get(s).copied();
        let sp = resolve_specials(
            &texts,
            &mut attrs,
            &lookup,
            &spec.special,
            [Some(1), Some(2), Some(0)],
        );

        // Decoded pieces (llama.cpp `token_to_piece(special = true)` for SPM vocabularies).
        let mut pieces = Vec::with_capacity(n * 6);
        let mut piece_offsets = Vec::with_capacity(n + 1);
        piece_offsets.push(0u32);
        for (i, t) in texts.iter().enumerate() {
            let a = attrs[i];
            if a & ATTR_SPECIAL != 0 {
                pieces.extend_from_slice(t.as_bytes());
            } else if a & ATTR_NORMAL != 0 {
                spm::unescape_into(t, &mut pieces);
            } else if a & ATTR_BYTE != 0 {
                pieces.push(spm::byte_token_value(t));
            }
            let end = u32::try_from(pieces.len())
                .map_err(|_| TokenizerError::Invalid("vocabulary text too large".into()))?;
            piece_offsets.push(end);
        }

        let model = SpmModel::new(
            &text_refs,
            scores,
            sp.unk,
            spec.add_space_prefix.unwrap_or(true),
        );
        let add_bos = spec.add_bos.unwrap_or(true) && sp.bos.is_some();
        let add_eos = spec.add_eos.unwrap_or(false) && sp.eos.is_some();
        Ok(Tokenizer {
            backend: Backend::Spm(model),
            pre: spec.pre.to_string(),
            n_vocab: n,
            attrs,
            pieces,
            piece_offsets,
            special_order: sp.special_order,
            extra_ids,
            bos: sp.bos,
            eos: sp.eos,
            eog: sp.eog,
            add_bos,
            add_eos,
            digest: spm_digest(spec),
        })
    }

    // -----------------------------------------------------------------------------------------------
    // Encoding
    // -----------------------------------------------------------------------------------------------

    /// Tokenizes `text` as llama.cpp's `llama_tokenize(text, add_special = true, parse_special)`.
    ///
    /// BOS is prepended when the metadata says so (`tokenizer.ggml.add_bos_token`, or the
    /// vocabulary's default: SentencePiece yes, SmolLM2 no), and EOS appended when
    /// `tokenizer.ggml.add_eos_token` is true. With `parse_special`, the text of control tokens (e.g.
    /// `"<|im_start|>"`) becomes that token; without it, such text is tokenized as ordinary text.
    /// User-defined tokens are always matched. Empty text gives no text tokens (so an empty vector unless
    /// BOS/EOS are added).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, parse_special, true)
    }

    /// [`Tokenizer::encode`] with llama.cpp's `add_special` flag: when false, neither BOS nor EOS is
    /// added whatever the metadata says (llama-cpp-python's `tokenize(add_bos = False)`).
    pub fn encode_with(
        &self,
        text: &str,
        parse_special: bool,
        add_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let rule = if parse_special {
            SpecialRule::All
        } else {
            SpecialRule::Never
        };
        self.encode_rule(text, rule, add_special)
    }

    /// [`Tokenizer::encode_with`] with special tokens parsed only inside `special_spans` (byte ranges
    /// of `text`): a control or unknown token's text becomes that token only where the whole match lies
    /// within one span; everywhere else it is tokenized as ordinary text, as with
    /// `parse_special = false`. User-defined tokens are matched everywhere, as always. The matching
    /// and the tokenization of the fragments between matches are llama.cpp's, so with one span
    /// covering the text this is `encode_with(text, true, add_special)`, and with no spans
    /// `encode_with(text, false, add_special)`.
    ///
    /// A Hugging Face `tokenizer.json` runs whole through `tokenizers` when no special-token match
    /// is refused (so then exactly `encode_with(text, true, ..)`); otherwise each fragment between the
    /// accepted matches goes through `tokenizers` separately with special-token matching off.
    pub fn encode_spans(
        &self,
        text: &str,
        special_spans: &[std::ops::Range<usize>],
        add_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_rule(text, SpecialRule::Within(special_spans), add_special)
    }

    /// The control and unknown tokens (those [`Tokenizer::encode`] matches only with `parse_special`)
    /// with their texts, longest text first.
    pub fn parsed_special_tokens(&self) -> impl Iterator<Item = (u32, &str)> + '_ {
        self.special_order
            .iter()
            .filter(|(id, t)| {
                !t.is_empty() && self.attrs[*id as usize] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0
            })
            .map(|(id, t)| (*id, t.as_str()))
    }

    fn encode_rule(
        &self,
        text: &str,
        rule: SpecialRule<'_>,
        add_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        if let Backend::Hf { plain, split } = &self.backend {
            // The whole text through `tokenizers` (its added-token matching included), without its
            // post-processor: BOS / EOS follow `add_bos` / `add_eos` here.
            let hf_encode = |hf: &tokenizers::Tokenizer, t: &str, out: &mut Vec<u32>| {
                let enc = hf
                    .encode_fast(t, false)
                    .map_err(|e| TokenizerError::Backend(e.to_string()))?;
                out.extend_from_slice(enc.get_ids());
                Ok::<(), TokenizerError>(())
            };
            match rule {
                SpecialRule::All => hf_encode(plain, text, &mut out)?,
                SpecialRule::Never => hf_encode(split, text, &mut out)?,
                SpecialRule::Within(_) => {
                    let frags = self.partition(text, rule);
                    if frags == self.partition(text, SpecialRule::All) {
                        hf_encode(plain, text, &mut out)?;
                    } else {
                        for frag in frags {
                            match frag {
                                Fragment::Token(id) => out.push(id),
                                Fragment::Text(start, end) => {
                                    hf_encode(split, &text[start..end], &mut out)?
                                }
                            }
                        }
                    }
                }
            }
        } else if !text.is_empty() {
            // SentencePiece prefixes a space to the first fragment and to each one after a special
            // token (whether or not BOS was added).
            let mut after_special = true;
            for frag in self.partition(text, rule) {
                match frag {
                    Fragment::Token(id) => {
                        out.push(id);
                        after_special = true;
                    }
                    Fragment::Text(start, end) => {
                        self.encode_text(&text[start..end], after_special, &mut out)?;
                        after_special = false;
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// llama.cpp's `tokenizer_st_partition`: for each special token, longest first, split every
    /// remaining text fragment at each of its occurrences. Control and unknown tokens are matched as
    /// `rule` says (a refused occurrence stays text, and the search goes on from its next character).
    fn partition(&self, text: &str, rule: SpecialRule<'_>) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Text(0, text.len())];
        let mut next = Vec::new();
        for (id, pat) in &self.special_order {
            let attr = self.attrs[*id as usize];
            let ruled = attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0;
            if ruled && matches!(rule, SpecialRule::Never) {
                continue;
            }
            if pat.is_empty() {
                continue;
            }
            // Cheap pre-check over the whole text before rebuilding the fragment list.
            if !text.contains(pat.as_str()) {
                continue;
            }
            let accept = |at: usize| match rule {
                SpecialRule::Within(spans) if ruled => spans
                    .iter()
                    .any(|s| s.start <= at && at + pat.len() <= s.end),
                _ => true,
            };
            next.clear();
            for f in &frags {
                match *f {
                    Fragment::Token(_) => next.push(*f),
                    Fragment::Text(start, end) => {
                        let mut pos = start;
                        let mut search = start;
                        while let Some(m) = text[search..end].find(pat.as_str()) {
                            let at = search + m;
                            if !accept(at) {
                                search = at + text[at..].chars().next().map_or(1, char::len_utf8);
                                continue;
                            }
                            if at > pos {
                                next.push(Fragment::Text(pos, at));
                            }
                            next.push(Fragment::Token(*id));
                            pos = at + pat.len();
                            search = pos;
                        }
                        if pos < end {
                            next.push(Fragment::Text(pos, end));
                        }
                    }
                }
            }
            std::mem::swap(&mut frags, &mut next);
        }
        frags
    }

    /// Tokenizes a fragment that contains no special tokens: pre-tokenization and BPE, or the
    /// SentencePiece merge (`after_special`: the fragment is the first or follows a special token).
    fn encode_text(
        &self,
        text: &str,
        after_special: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        match &self.backend {
            Backend::Bpe(hf) => {
                let enc = hf
                    .encode_fast(text, false)
                    .map_err(|e| TokenizerError::Backend(e.to_string()))?;
                out.extend_from_slice(enc.get_ids());
                Ok(())
            }
            Backend::Spm(m) => m.encode_fragment(text, after_special, out),
            Backend::Hf { .. } => unreachable!("HF tokenizers encode whole texts in encode_with"),
        }
    }

    // -----------------------------------------------------------------------------------------------
    // Decoding and vocabulary queries
    // -----------------------------------------------------------------------------------------------

    /// Text of a token sequence: the concatenated [`Tokenizer::token_bytes`], with invalid UTF-8 (e.g. a
    /// multi-byte character cut off at the end) replaced by U+FFFD. Ids outside the vocabulary are
    /// skipped. Lossless for any sequence whose bytes form valid UTF-8.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id));
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// Text of a token sequence as llama-cpp-python's `Llama.detokenize(ids, special)` gives it: each
    /// token's piece (llama.cpp `token_to_piece`; with `special` false, control and unknown tokens give
    /// nothing), then, when the first token is BOS and the text starts with a space, that one space
    /// removed (the space SentencePiece prefixes to the prompt). Invalid UTF-8 becomes U+FFFD.
    pub fn detokenize(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let hidden = self
                .attrs
                .get(id as usize)
                .is_some_and(|a| a & (ATTR_CONTROL | ATTR_UNKNOWN) != 0);
            if special || !hidden {
                bytes.extend_from_slice(self.token_bytes(id));
            }
        }
        let start = usize::from(
            ids.first().is_some_and(|&id| Some(id) == self.bos) && bytes.first() == Some(&b' '),
        );
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// Raw bytes of one token's piece: normal tokens mapped back from the byte-level alphabet (may be
    /// part of a multi-byte character), special tokens their text, unused tokens and ids outside the
    /// vocabulary nothing.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i >= self.n_vocab {
            return &[];
        }
        let (start, end) = (
            self.piece_offsets[i] as usize,
            self.piece_offsets[i + 1] as usize,
        );
        &self.pieces[start..end]
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.n_vocab
    }

    /// Beginning-of-sequence token, if the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token, if the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether generation stops at this token (llama.cpp `llama_vocab_is_eog`): EOS, EOT, EOM, the FIM
    /// pad / repo / file-separator tokens and the tokens with a known end-of-turn text such as
    /// `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `</s>`.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation tokens, ascending.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether the token is special: control, user-defined or unknown type (after llama.cpp's
    /// adjustments), i.e. matched as a whole in text by [`Tokenizer::encode`] with `parse_special`.
    pub fn is_special(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & ATTR_SPECIAL != 0)
    }

    /// Whether the token is a control token (rendered only on request by chat front ends).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & ATTR_CONTROL != 0)
    }

    /// The id of the vocabulary entry with exactly this text, as stored in the GGUF: special tokens by
    /// their text (`"<|im_start|>"`), normal tokens in the byte-level alphabet (`"Ġthe"`) or with
    /// SentencePiece's `▁` for spaces (`"▁the"`).
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        match &self.backend {
            Backend::Bpe(hf) => hf.token_to_id(text),
            Backend::Spm(m) => m.token_to_id(text),
            Backend::Hf { plain, .. } => plain.token_to_id(text),
        }
        .or_else(|| self.extra_ids.get(text).copied())
    }

    /// The `tokenizer.ggml.model` this tokenizer implements: `"gpt2"` (byte-level BPE) or `"llama"`
    /// (SentencePiece); `"hf"` for a Hugging Face `tokenizer.json`.
    pub fn model(&self) -> &'static str {
        match self.backend {
            Backend::Bpe(_) => "gpt2",
            Backend::Spm(_) => "llama",
            Backend::Hf { .. } => "hf",
        }
    }

    /// Whether a space is prefixed to the text (SentencePiece `add_space_prefix`; false for BPE).
    pub fn add_space_prefix(&self) -> bool {
        match &self.backend {
            Backend::Bpe(_) | Backend::Hf { .. } => false,
            Backend::Spm(m) => m.add_space_prefix(),
        }
    }

    /// The `tokenizer.ggml.pre` value this tokenizer was built for.
    pub fn pre(&self) -> &str {
        &self.pre
    }

    /// Whether [`Tokenizer::encode`] prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`Tokenizer::encode`] appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// BLAKE3 digest of everything this tokenizer was built from, so that any change that could change
    /// a token id changes it (the KV identity's tokenizer digest, `ep_kv::identity`). It covers the
    /// sources, not the built tables: merges and scores change ids but are not kept here. The stream
    /// (integers little-endian, `str` = u32 length + UTF-8 bytes, `opt(x)` = u8 0, or u8 1 + x):
    ///
    /// - GGUF byte-level BPE: `b"edgeprompt/tokenizer/v1" str("gpt2") str(pre)`, u32 count + each
    ///   token text, u32 count + each token type as i32, u32 count + each merge, the 14 special ids of
    ///   [`SpecialIds`] in declaration order each `opt(i64)`, `opt(u8 add_bos)`, `opt(u8 add_eos)`.
    /// - GGUF SentencePiece: `... str("llama") str(pre)`, tokens, u32 count + each score as f32, token
    ///   types, special ids, `opt(add_bos) opt(add_eos) opt(add_space_prefix)`.
    /// - Hugging Face directory: `... str("hf")` then for `tokenizer.json`, `tokenizer_config.json`,
    ///   `generation_config.json`, `config.json` (the files the tokenizer reads) `opt(u64 length +
    ///   bytes)`.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    pub(crate) fn set_digest(&mut self, d: [u8; 32]) {
        self.digest = d;
    }

    /// The underlying HF `tokenizers` tokenizer (for GGUF byte-level BPE: no special-token handling;
    /// for a `tokenizer.json`: the whole tokenizer); `None` for SentencePiece vocabularies.
    pub fn hf(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.backend {
            Backend::Bpe(hf) => Some(hf),
            Backend::Hf { plain, .. } => Some(plain),
            Backend::Spm(_) => None,
        }
    }
}

/// `<0xNN>`: a SentencePiece byte-fallback token.
fn is_byte_token(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// Where [`Tokenizer::partition`] matches control and unknown tokens.
#[derive(Clone, Copy, Debug)]
enum SpecialRule<'a> {
    /// Everywhere (`parse_special`).
    All,
    /// Nowhere.
    Never,
    /// Only matches lying wholly inside one of these byte ranges.
    Within(&'a [std::ops::Range<usize>]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment {
    /// Byte range of the input text.
    Text(usize, usize),
    Token(u32),
}

// ---------------------------------------------------------------------------------------------------
// Streaming detokenizer
// ---------------------------------------------------------------------------------------------------

/// Incremental detokenizer: turns tokens into text as they are generated without ever emitting broken
/// UTF-8. Bytes of an incomplete multi-byte character are held back until the rest arrives; bytes that
/// can never form valid UTF-8 are emitted as U+FFFD (exactly as [`Tokenizer::decode`] renders them), so
/// the concatenation of every [`StreamDecoder::push`] and the final [`StreamDecoder::finish`] equals
/// `decode` of all the tokens.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.pending.extend_from_slice(self.tok.token_bytes(id));
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(
                        &self.pending[start..start + valid],
                    ));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start += valid + bad;
                        }
                        None => {
                            // Incomplete character at the end: keep it for the next token.
                            start += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Flushes held-back bytes (an incomplete character at the very end becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes are being held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------------
// Unit tests (tiny hand-built vocabularies)
// ---------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-level form of a string (what the vocabulary stores).
    fn bl(s: &str) -> String {
        let t = byte_to_char_table();
        s.bytes().map(|b| t[b as usize]).collect()
    }

    /// A small vocabulary: specials, all 256 byte symbols, then merge results.
    struct Tiny {
        tokens: Vec<String>,
        types: Vec<i32>,
        merges: Vec<String>,
    }

    impl Tiny {
        fn new() -> Self {
            let mut t = Tiny {
                tokens: Vec::new(),
                types: Vec::new(),
                merges: Vec::new(),
            };
            t.add("<|endoftext|>", 3);
            t.add("<|im_start|>", 3);
            t.add("<|im_end|>", 3);
            t.add("<user_tok>", 4);
            t.add("<|im_start|>x", 3); // longer special that contains another
            for c in byte_to_char_table() {
                t.add(&c.to_string(), 1);
            }
            t
        }
        fn add(&mut self, text: &str, ty: i32) -> u32 {
            self.tokens.push(text.to_string());
            self.types.push(ty);
            (self.tokens.len() - 1) as u32
        }
        /// Adds the merge `a b` (byte-level forms) and its result token.
        fn merge(&mut self, a: &str, b: &str) -> u32 {
            self.merges.push(format!("{} {}", bl(a), bl(b)));
            let joined = format!("{a}{b}");
            self.add(&bl(&joined), 1)
        }
        fn build(&self, pre: &str) -> Tokenizer {
            let spec = BpeSpec {
                tokens: self.tokens.iter().map(String::as_str).collect(),
                token_types: self.types.clone(),
                merges: self.merges.iter().map(String::as_str).collect(),
                pre,
                special: SpecialIds {
                    bos: Some(1),
                    eos: Some(2),
                    unk: Some(0),
                    ..Default::default()
                },
                add_bos: Some(false),
                add_eos: None,
            };
            Tokenizer::from_bpe(&spec).expect("build tiny tokenizer")
        }
        fn id(&self, text: &str) -> u32 {
            self.tokens.iter().position(|t| t == text).unwrap() as u32
        }
    }

    fn byte_id(t: &Tiny, b: u8) -> u32 {
        t.id(&byte_to_char_table()[b as usize].to_string())
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<StreamDecoder<'static>>();
    }

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let fwd = byte_to_char_table();
        let inv = char_to_byte_table();
        let mut seen = HashSet::new();
        for (b, c) in fwd.iter().enumerate() {
            assert!(seen.insert(*c));
            assert_eq!(inv[*c as usize], Some(b as u8));
        }
        assert_eq!(fwd[b' ' as usize], 'Ġ');
        assert_eq!(fwd[b'\n' as usize], 'Ċ');
        assert_eq!(fwd[b'a' as usize], 'a');
    }

    #[test]
    fn bpe_merges_follow_rank() {
        let mut t = Tiny::new();
        let he = t.merge("h", "e");
        let ll = t.merge("l", "l");
        let hell = t.merge("he", "ll");
        let hello = t.merge("hell", "o");
        let sp_w = t.merge(" ", "w");
        let tok = t.build("gpt2");
        assert_eq!(tok.encode("hello", false).unwrap(), vec![hello]);
        assert_eq!(tok.encode("hell", false).unwrap(), vec![hell]);
        assert_eq!(
            tok.encode("heh", false).unwrap(),
            vec![he, byte_id(&t, b'h')]
        );
        assert_eq!(
            tok.encode("hello world", false).unwrap(),
            vec![
                hello,
                sp_w,
                byte_id(&t, b'o'),
                byte_id(&t, b'r'),
                byte_id(&t, b'l'),
                byte_id(&t, b'd')
            ]
        );
        assert_eq!(tok.encode("ll", false).unwrap(), vec![ll]);
        assert_eq!(
            tok.decode(&tok.encode("hello world", false).unwrap()),
            "hello world"
        );
    }

    #[test]
    fn lower_rank_merge_wins_over_leftmost() {
        let mut t = Tiny::new();
        // "bc" has a better rank than "ab": "abc" -> "a" + "bc".
        let bc = t.merge("b", "c");
        let _ab = t.merge("a", "b");
        let tok = t.build("gpt2");
        assert_eq!(
            tok.encode("abc", false).unwrap(),
            vec![byte_id(&t, b'a'), bc]
        );
    }

    #[test]
    fn smollm_splits_digits_individually() {
        let mut t = Tiny::new();
        let d12 = t.merge("1", "2");
        let tok_gpt2 = t.build("gpt2");
        let tok_smollm = t.build("smollm");
        assert_eq!(tok_gpt2.encode("12", false).unwrap(), vec![d12]);
        assert_eq!(
            tok_smollm.encode("12", false).unwrap(),
            vec![byte_id(&t, b'1'), byte_id(&t, b'2')]
        );
    }

    #[test]
    fn special_tokens_split_only_with_parse_special() {
        let t = Tiny::new();
        let tok = t.build("smollm");
        let start = t.id("<|im_start|>");
        let end = t.id("<|im_end|>");
        let ids = tok.encode("<|im_start|>hi<|im_end|>", true).unwrap();
        assert_eq!(ids, vec![start, byte_id(&t, b'h'), byte_id(&t, b'i'), end]);
        let plain = tok.encode("<|im_start|>hi", false).unwrap();
        assert!(!plain.contains(&start));
        assert_eq!(plain.len(), "<|im_start|>hi".len());
        assert_eq!(tok.decode(&plain), "<|im_start|>hi");
        // The longest special text wins.
        let long = t.id("<|im_start|>x");
        assert_eq!(tok.encode("<|im_start|>x", true).unwrap(), vec![long]);
        // User-defined tokens are matched even without parse_special.
        let user = t.id("<user_tok>");
        assert_eq!(
            tok.encode("a<user_tok>", false).unwrap(),
            vec![byte_id(&t, b'a'), user]
        );
        assert!(tok.is_special(start) && tok.is_special(user));
        assert!(!tok.is_special(byte_id(&t, b'a')));
    }

    #[test]
    fn eog_and_special_ids() {
        let t = Tiny::new();
        let tok = t.build("smollm");
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_id(), Some(2));
        assert!(tok.is_eog(t.id("<|im_end|>")));
        assert!(tok.is_eog(t.id("<|endoftext|>")));
        assert!(!tok.is_eog(t.id("<|im_start|>")));
        assert!(!tok.is_eog(999_999));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
        assert_eq!(tok.token_to_id("Ġ"), Some(byte_id(&t, b' ')));
        assert_eq!(tok.token_to_id("no such token"), None);
    }

    #[test]
    fn emoji_falls_back_to_bytes_and_round_trips() {
        let t = Tiny::new();
        let tok = t.build("smollm");
        let text = "a 😀 é 中文\n\tx";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids.len(), text.len()); // no merges: one token per byte
        for (id, b) in ids.iter().zip(text.bytes()) {
            assert_eq!(tok.token_bytes(*id), &[b]);
        }
        assert_eq!(tok.decode(&ids), text);
    }

    #[test]
    fn empty_and_out_of_range() {
        let t = Tiny::new();
        let tok = t.build("smollm");
        assert!(tok.encode("", true).unwrap().is_empty());
        assert_eq!(tok.token_bytes(u32::MAX), b"");
        assert_eq!(tok.decode(&[u32::MAX, byte_id(&t, b'a'), 1_000_000]), "a");
    }

    #[test]
    fn adds_bos_when_asked() {
        let t = Tiny::new();
        let spec = BpeSpec {
            tokens: t.tokens.iter().map(String::as_str).collect(),
            token_types: t.types.clone(),
            merges: vec![],
            pre: "llama-bpe",
            special: SpecialIds {
                bos: Some(1),
                eos: Some(2),
                ..Default::default()
            },
            add_bos: None, // llama3 default: add BOS
            add_eos: None,
        };
        let tok = Tokenizer::from_bpe(&spec).unwrap();
        assert!(tok.add_bos());
        assert_eq!(tok.encode("a", false).unwrap(), vec![1, byte_id(&t, b'a')]);
        assert_eq!(tok.encode("", false).unwrap(), vec![1]);
    }

    #[test]
    fn unknown_pre_is_an_error_naming_it() {
        let t = Tiny::new();
        let spec = BpeSpec {
            tokens: t.tokens.iter().map(String::as_str).collect(),
            pre: "no-such-pre",
            ..Default::default()
        };
        let err = Tokenizer::from_bpe(&spec).unwrap_err().to_string();
        assert!(err.contains("no-such-pre"), "{err}");
    }

    #[test]
    fn all_supported_pre_types_compile() {
        let t = Tiny::new();
        for pre in [
            "",
            "default",
            "smollm",
            "gpt2",
            "gpt-2",
            "llama3",
            "llama-bpe",
            "qwen2",
            "dbrx",
        ] {
            let tok = t.build(pre);
            let text = "Hello, world! It's 2024...  x\n\n y 😀";
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids), text, "pre {pre}");
        }
    }

    #[test]
    fn stream_decoder_holds_back_split_characters() {
        let t = Tiny::new();
        let tok = t.build("smollm");
        let text = "x😀é中y";
        let ids = tok.encode(text, false).unwrap();
        let mut sd = StreamDecoder::new(&tok);
        let mut out = String::new();
        let mut pieces = Vec::new();
        for &id in &ids {
            let p = sd.push(id);
            pieces.push(p.clone());
            out.push_str(&p);
        }
        out.push_str(&sd.finish());
        assert_eq!(out, text);
        assert_eq!(out, tok.decode(&ids));
        // The emoji's 4 bytes arrive as 4 tokens: nothing for the first three, then the whole emoji.
        assert_eq!(pieces[0], "x");
        assert_eq!(pieces[1], "");
        assert_eq!(pieces[2], "");
        assert_eq!(pieces[3], "");
        assert_eq!(pieces[4], "😀");
    }

    #[test]
    fn stream_decoder_invalid_bytes_match_decode() {
        let t = Tiny::new();
        let tok = t.build("smollm");
        // A lone continuation byte, a truncated 3-byte sequence followed by ASCII, and a trailing lead.
        let bytes: Vec<u8> = vec![b'a', 0x80, b'b', 0xE4, 0xB8, b'c', 0xF0, 0x9F];
        let ids: Vec<u32> = bytes.iter().map(|&b| byte_id(&t, b)).collect();
        let mut sd = StreamDecoder::new(&tok);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&sd.push(id));
        }
        assert!(sd.has_pending());
        out.push_str(&sd.finish());
        assert_eq!(out, tok.decode(&ids));
        assert_eq!(out, String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn from_gguf_reads_metadata() {
        use crate::gguf::writer::to_bytes;
        let mut t = Tiny::new();
        let he = t.merge("h", "e");
        let strs = |v: &[String]| {
            MetaValue::Array(v.iter().map(|s| MetaValue::String(s.clone())).collect())
        };
        let meta = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String("llama".into()),
            ),
            (
                "tokenizer.ggml.model".to_string(),
                MetaValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                MetaValue::String("smollm".into()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strs(&t.tokens)),
            (
                "tokenizer.ggml.token_type".to_string(),
                MetaValue::Array(t.types.iter().map(|&x| MetaValue::I32(x)).collect()),
            ),
            ("tokenizer.ggml.merges".to_string(), strs(&t.merges)),
            ("tokenizer.ggml.bos_token_id".to_string(), MetaValue::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_string(), MetaValue::U32(2)),
            (
                "tokenizer.ggml.add_bos_token".to_string(),
                MetaValue::Bool(false),
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, to_bytes(&meta, &[])).unwrap();
        let g = Gguf::open(&path).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        assert_eq!(tok.vocab_size(), t.tokens.len());
        assert_eq!(tok.encode("he", false).unwrap(), vec![he]);
        assert_eq!(tok.pre(), "smollm");

        // Other vocabulary types are not supported.
        let mut meta2 = meta.clone();
        meta2[1].1 = MetaValue::String("bert".into());
        let path2 = dir.path().join("wpm.gguf");
        std::fs::write(&path2, to_bytes(&meta2, &[])).unwrap();
        let err = Tokenizer::from_gguf(&Gguf::open(&path2).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("'bert'"), "{err}");
    }
}
