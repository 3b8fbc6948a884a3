//! SentencePiece-style tokenization as llama.cpp does it for `tokenizer.ggml.model = "llama"`
//! (vocabulary type `LLAMA_VOCAB_TYPE_SPM`: Llama 1/2, Mistral v0.1, TinyLlama, ...).
//!
//! llama.cpp does not run SentencePiece itself. For each text fragment left over by the special-token
//! partition (shared with the BPE tokenizer, see [`crate::tokenizer`]) it:
//!
//! 1. prepends a space when `add_space_prefix` is on (`tokenizer.ggml.add_space_prefix`, default true)
//!    and the fragment is the first one or follows a special token;
//! 2. replaces every space with U+2581 (`▁`); nothing else is normalised;
//! 3. splits the text into UTF-8 characters (the initial symbols) and repeatedly merges the adjacent
//!    pair whose concatenation is a vocabulary entry with the highest score (`tokenizer.ggml.scores`),
//!    the leftmost pair on equal scores, until no adjacent pair forms a vocabulary entry. The pairs are
//!    kept in a priority queue; entries that went stale because one side was merged meanwhile are
//!    skipped when popped;
//! 4. emits each remaining symbol as its token, or, when the symbol is not a vocabulary entry (a
//!    character the vocabulary does not know), as one byte token per UTF-8 byte: `<0xXX>` (upper-case
//!    hex), else the one-byte text itself.
//!
//! The merge only looks at the text of a pair, so any vocabulary entry reachable through a chain of
//! entries can be produced (not just the merges SentencePiece learned), and an entry none of whose
//! two-part splits is reachable is never produced. Token types do not matter while merging: any entry
//! with the right text counts.
//!
//! Where llama.cpp has no byte token for a byte it throws (and the process aborts); here the unknown
//! token is emitted instead, or an error returned when there is none.
//!
//! Decoding (llama.cpp `token_to_piece`): normal tokens have `▁` turned back into spaces, byte tokens
//! become their byte, control / unknown / user-defined tokens their text, anything else nothing.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::tokenizer::{SpecialIds, TokenizerError};

/// U+2581 LOWER ONE EIGHTH BLOCK, SentencePiece's stand-in for a space.
pub const SPACE_MARK: char = '\u{2581}';

/// Everything a SentencePiece tokenizer is built from: the GGUF `tokenizer.ggml.*` metadata, borrowed.
/// [`crate::tokenizer::Tokenizer::from_gguf`] fills it from a file; tests build small ones by hand.
#[derive(Clone, Debug, Default)]
pub struct SpmSpec<'a> {
    /// `tokenizer.ggml.tokens`: token texts with `▁` for spaces (e.g. `"▁the"`), indexed by id.
    pub tokens: Vec<&'a str>,
    /// `tokenizer.ggml.scores`, one per token (higher merges first). Empty: all 0.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type`, one per token (1 normal, 2 unknown, 3 control, 4 user-defined,
    /// 5 unused, 6 byte). Empty: all normal.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.pre` (not used by SentencePiece vocabularies; kept for reporting).
    pub pre: &'a str,
    /// Special-token ids from metadata. Absent BOS / EOS / UNK default to 1 / 2 / 0 as in llama.cpp.
    pub special: SpecialIds,
    /// `tokenizer.ggml.add_bos_token` (`None`: absent, true).
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token` (`None`: absent, false).
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (`None`: absent, true).
    pub add_space_prefix: Option<bool>,
}

/// The merge model of a SentencePiece vocabulary: exact text lookup, scores and byte fallback.
#[derive(Clone, Debug)]
pub(crate) struct SpmModel {
    /// Text -> id for every token, the last id winning for a repeated text (llama.cpp `token_to_id`).
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    /// Byte fallback token of each byte (`<0xXX>`, else the one-byte text), if the vocabulary has one.
    byte_ids: Vec<Option<u32>>,
    /// Emitted for a byte without a byte token.
    unk: Option<u32>,
    /// Longest token text in bytes: longer pairs cannot be vocabulary entries.
    max_len: usize,
    add_space_prefix: bool,
}

/// One symbol of the text being merged: a byte range, linked to its live neighbours.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

/// A candidate merge of two adjacent symbols. The queue pops the highest score first and, on equal
/// scores, the pair that starts further left. `size` (bytes of the pair when it was queued) detects
/// stale entries: symbols only ever grow, so if both are alive with the same total size they are still
/// exactly the queued pair.
#[derive(Clone, Copy, Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        // Scores compare as C++ `<` does (so -0.0 == 0.0); NaN compares equal to everything.
        let by_score = if self.score < other.score {
            Ordering::Less
        } else if other.score < self.score {
            Ordering::Greater
        } else {
            Ordering::Equal
        };
        by_score
            .then_with(|| other.left.cmp(&self.left))
            .then_with(|| other.size.cmp(&self.size))
    }
}

impl SpmModel {
    /// Builds the model from the (already renamed, see `Tokenizer::from_gguf`) token texts.
    pub(crate) fn new(
        texts: &[&str],
        scores: Vec<f32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Self {
        let mut ids = HashMap::with_capacity(texts.len());
        let mut max_len = 0;
        for (i, t) in texts.iter().enumerate() {
            ids.insert((*t).to_string(), i as u32);
            max_len = max_len.max(t.len());
        }
        let mut byte_ids = vec![None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                // A one-byte text; bytes >= 0x80 alone are not UTF-8 and cannot be token texts.
                char::from_u32(b as u32)
                    .filter(|c| c.is_ascii())
                    .and_then(|c| ids.get(c.encode_utf8(&mut [0u8; 4]) as &str).copied())
            });
        }
        SpmModel {
            ids,
            scores,
            byte_ids,
            unk,
            max_len,
            add_space_prefix,
        }
    }

    /// Whether a space is prepended to the first fragment and to fragments after special tokens.
    pub(crate) fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// The id of the token with exactly this text.
    pub(crate) fn token_to_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Tokenizes one text fragment that contains no special tokens; `after_special` is true for the
    /// first fragment and for fragments that follow a special token (those get the space prefix).
    pub(crate) fn encode_fragment(
        &self,
        fragment: &str,
        after_special: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut text = String::with_capacity(fragment.len() + 3 * (fragment.len() / 4 + 2));
        if self.add_space_prefix && after_special {
            text.push(SPACE_MARK);
        }
        for c in fragment.chars() {
            text.push(if c == ' ' { SPACE_MARK } else { c });
        }
        self.encode_escaped(&text, out)
    }

    /// The merge loop on text whose spaces are already `▁`.
    fn encode_escaped(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if start + len == text.len() {
                    NONE
                } else {
                    i + 1
                },
            });
        }
        if symbols.is_empty() {
            return Ok(());
        }

        let mut queue: BinaryHeap<Bigram> = BinaryHeap::with_capacity(symbols.len());
        for right in 1..symbols.len() {
            self.push_bigram(text, &symbols, right - 1, right, &mut queue);
        }

        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue; // stale: one side was merged since this pair was queued
            }
            // Merge the right symbol into the left one and unlink it.
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if r.next != NONE {
                symbols[r.next].prev = b.left;
            }
            self.push_bigram(text, &symbols, l.prev, b.left, &mut queue);
            self.push_bigram(text, &symbols, b.left, r.next, &mut queue);
        }

        let mut i = 0;
        while i != NONE {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &byte in piece.as_bytes() {
                        match self.byte_ids[byte as usize].or(self.unk) {
                            Some(id) => out.push(id),
                            None => {
                                return Err(TokenizerError::Invalid(format!(
                                    "SentencePiece vocabulary has no byte token <0x{byte:02X}> \
                                     and no unknown token"
                                )))
                            }
                        }
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }

    /// Queues the pair (left, right) if their joined text is a vocabulary entry.
    fn push_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        if left == NONE || right == NONE {
            return;
        }
        let (l, r) = (symbols[left], symbols[right]);
        let size = l.len + r.len;
        if size > self.max_len {
            return;
        }
        let joined = &text[l.start..l.start + size];
        if let Some(&id) = self.ids.get(joined) {
            queue.push(Bigram {
                score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                left,
                right,
                size,
            });
        }
    }
}

/// The byte a byte token stands for, read as llama.cpp does (`strtol(text.substr(3, 2), 16)`): the hex
/// digits at byte offsets 3..5 (`<0x41>` -> 0x41), as many as there are, 0 when there are none.
pub(crate) fn byte_token_value(text: &str) -> u8 {
    let digits = text.as_bytes().get(3..).unwrap_or(&[]);
    let mut v: u32 = 0;
    for &d in digits.iter().take(2) {
        match (d as char).to_digit(16) {
            Some(x) => v = v * 16 + x,
            None => break,
        }
    }
    v as u8
}

/// A normal token's piece: the text with every `▁` turned back into a space.
pub(crate) fn unescape_into(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        if c == SPACE_MARK {
            out.push(b' ');
        } else {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(tokens: &[(&str, f32)], add_space_prefix: bool) -> SpmModel {
        let texts: Vec<&str> = tokens.iter().map(|t| t.0).collect();
        let scores = tokens.iter().map(|t| t.1).collect();
        SpmModel::new(&texts, scores, Some(0), add_space_prefix)
    }

    fn enc(m: &SpmModel, s: &str) -> Vec<u32> {
        let mut out = Vec::new();
        m.encode_fragment(s, true, &mut out).unwrap();
        out
    }

    #[test]
    fn higher_score_merges_first_and_ties_go_left() {
        // 0 <unk>, 1 a, 2 b, 3 c, 4 ab, 5 bc
        let mut toks = vec![("<unk>", 0.0), ("a", 0.0), ("b", 0.0), ("c", 0.0)];
        toks.extend([("ab", -2.0), ("bc", -1.0)]);
        assert_eq!(enc(&model(&toks, false), "abc"), vec![1, 5]);
        toks[4].1 = -1.0; // tie: the left pair wins
        assert_eq!(enc(&model(&toks, false), "abc"), vec![4, 3]);
        toks[4].1 = 0.0;
        assert_eq!(enc(&model(&toks, false), "abc"), vec![4, 3]);
    }

    #[test]
    fn unreachable_entries_are_never_produced() {
        // "abc" exists but neither "ab" nor "bc" does.
        let toks = [
            ("<unk>", 0.0),
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("abc", 5.0),
        ];
        assert_eq!(enc(&model(&toks, false), "abc"), vec![1, 2, 3]);
    }

    #[test]
    fn spaces_are_escaped_and_prefixed() {
        let toks = [
            ("<unk>", 0.0),
            ("▁", 0.0),
            ("a", 0.0),
            ("▁a", 1.0),
            ("▁▁", 0.5),
        ];
        let m = model(&toks, true);
        assert_eq!(enc(&m, "a"), vec![3]);
        // "▁▁a": "▁a" (1.0) beats "▁▁" (0.5), and "▁▁a" is not an entry.
        assert_eq!(enc(&m, " a"), vec![1, 3]);
        let mut out = Vec::new();
        m.encode_fragment("a", false, &mut out).unwrap();
        assert_eq!(out, vec![2]);
        let m2 = model(&toks, false);
        assert_eq!(enc(&m2, "a a"), vec![2, 3]);
    }

    #[test]
    fn byte_fallback_uses_hex_tokens_then_raw_then_unk() {
        let mut toks: Vec<(String, f32)> = vec![("<unk>".into(), 0.0)];
        toks.push(("<0xC3>".into(), 0.0)); // 1
        toks.push(("z".into(), 0.0)); // 2: raw one-byte fallback for 'z'
        let texts: Vec<&str> = toks.iter().map(|t| t.0.as_str()).collect();
        let m = SpmModel::new(&texts, vec![0.0; 3], Some(0), false);
        // "é" = C3 A9: C3 has a byte token, A9 does not -> unk.
        assert_eq!(enc(&m, "é"), vec![1, 0]);
        assert_eq!(enc(&m, "z"), vec![2]);
        let m_no_unk = SpmModel::new(&texts, vec![0.0; 3], None, false);
        let mut out = Vec::new();
        assert!(m_no_unk.encode_fragment("é", false, &mut out).is_err());
    }

    #[test]
    fn byte_token_values() {
        assert_eq!(byte_token_value("<0x41>"), 0x41);
        assert_eq!(byte_token_value("<0xff>"), 0xFF);
        assert_eq!(byte_token_value("<0x0A>"), 0x0A);
        assert_eq!(byte_token_value("<0xZ1>"), 0);
        assert_eq!(byte_token_value("ab"), 0);
    }
}
