//! The KV wire format: how a prefix's KV travels between processes (cloud → edge). Pure format code:
//! encoding, decoding and validation of bytes, no I/O.
//!
//! A stream is one [`KvHeader`] followed by any number of [`Frame`]s. All integers are little-endian.
//!
//! **Header**
//!
//! ```text
//! magic        4   b"EPKV"
//! version      u16 = 1
//! identity     32  ContentIdentity::digest of the model that computed the KV
//! n_layer      u32
//! n_head_kv    u32
//! head_dim     u32
//! block_tokens u32
//! dtype        u8  0 f32, 1 f16, 2 bf16 (ep_kv::KvDtype)
//! n_tokens     u32, then n_tokens × u32 token ids
//! n_hashes     u32 (= n_tokens / block_tokens), then n_hashes × 16 bytes: the chained hashes of the
//!              prefix's full blocks under the cache root (ep_kv::identity::cache_root)
//! digest       32  BLAKE3 of every preceding header byte
//! ```
//!
//! **Frame** (one layer's K and V for a token range)
//!
//! ```text
//! magic        4   b"EPKF"
//! layer        u32
//! token_start  u32
//! token_end    u32 (exclusive)
//! dtype        u8
//! codec        u8  0 raw, 1 int8, 2 int4 (ep_kv::codec)
//! payload_len  u64
//! digest       32  BLAKE3 of the payload bytes
//! payload      payload_len bytes
//! ```
//!
//! A raw payload (codec 0) is the K rows of tokens `start..end` (each row `n_head_kv × head_dim`
//! values in the dtype, little-endian), then the V rows likewise: `(end − start) × row_bytes × 2`
//! bytes. A lossy payload (codec 1 int8, 2 int4) is one zstd frame of group-wise quantised K and V
//! (keys per channel over groups of 32 tokens, values per token over groups of 32 channels, f16
//! min and scale per group); its exact format is in [`crate::codec`], whose `decode` turns any
//! payload back into raw rows. A lossy payload must be non-empty and at most
//! [`crate::codec::max_payload_len`] bytes (zstd's bound of the body the range implies); its body
//! length is checked when it is decoded.
//!
//! Hostile input never panics and never makes the decoder allocate more than the input it holds:
//! every count is checked against a limit ([`MAX_TOKENS`], [`MAX_PAYLOAD`], [`MAX_LAYERS`],
//! [`MAX_KV_WIDTH`]) and against the bytes present before anything is allocated.

use crate::codec;
use crate::identity::{cache_root, dtype_code, dtype_from_code, CODEC_RAW};
use crate::{block_hashes, BlockHash, KvDtype, KvLayout};

/// Magic of a [`KvHeader`].
pub const HEADER_MAGIC: [u8; 4] = *b"EPKV";
/// Magic of a [`Frame`].
pub const FRAME_MAGIC: [u8; 4] = *b"EPKF";
/// The format version this build reads and writes.
pub const VERSION: u16 = 1;
/// Most tokens a header may carry.
pub const MAX_TOKENS: u32 = 1 << 20;
/// Largest frame payload.
pub const MAX_PAYLOAD: u64 = 1 << 30;
/// Most layers a layout may have.
pub const MAX_LAYERS: u32 = 1 << 12;
/// Largest KV row (`n_head_kv × head_dim` values).
pub const MAX_KV_WIDTH: u64 = 1 << 20;

/// Bytes of a header before its token ids.
const HEADER_FIXED: usize = 4 + 2 + 32 + 4 * 4 + 1 + 4;
/// Bytes of a frame before its payload.
pub const FRAME_HEADER_BYTES: usize = 4 + 4 * 3 + 1 + 1 + 8 + 32;

/// Errors of decoding and validating KV streams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {found:?}, expected {expected:?}")]
    BadMagic { expected: [u8; 4], found: [u8; 4] },
    #[error("KV wire version {0} is not supported (only {VERSION})")]
    UnsupportedVersion(u16),
    /// More bytes are needed: at least `needed` in all, `have` are present.
    #[error("truncated: {needed} bytes needed, {have} present")]
    Truncated { needed: usize, have: usize },
    #[error("header digest mismatch")]
    HeaderDigestMismatch,
    #[error("payload digest mismatch in the frame of layer {layer}, tokens {start}..{end}")]
    DigestMismatch { layer: u32, start: u32, end: u32 },
    #[error("unknown KV dtype code {0}")]
    BadDtype(u8),
    #[error("codec {0} is not supported")]
    UnsupportedCodec(u8),
    #[error("{what} = {value} exceeds the limit {max}")]
    Limit {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("bad layout: {0}")]
    BadLayout(&'static str),
    #[error("{n_hashes} block hashes for {n_tokens} tokens in blocks of {block_tokens}")]
    HashCount {
        n_hashes: u32,
        n_tokens: u32,
        block_tokens: u32,
    },
    #[error("frame layer {layer} is out of range (the KV has {n_layer} layers)")]
    LayerOutOfRange { layer: u32, n_layer: u32 },
    #[error("frame tokens {start}..{end} are not a non-empty range within the {n_tokens} tokens")]
    RangeOutOfBounds { start: u32, end: u32, n_tokens: u32 },
    #[error("frame dtype {frame} differs from the header's {header}")]
    DtypeMismatch { frame: KvDtype, header: KvDtype },
    #[error("frame of layer {layer}, tokens {start}..{end}: payload of {len} bytes, expected {expected}")]
    PayloadLength {
        layer: u32,
        start: u32,
        end: u32,
        len: u64,
        expected: u64,
    },
    #[error("frame of layer {layer}, tokens {start}..{end}: payload of {len} bytes, outside 1..={max} for codec {codec}")]
    PayloadBound {
        layer: u32,
        start: u32,
        end: u32,
        codec: u8,
        len: u64,
        max: u64,
    },
    #[error("the stream failed earlier and cannot continue")]
    StreamFailed,
}

/// The KV's geometry as it travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireLayout {
    pub n_layer: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub block_tokens: u32,
    pub dtype: KvDtype,
}

fn sat_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl From<KvLayout> for WireLayout {
    /// Sizes beyond `u32` saturate (and then fail [`WireLayout::check`]).
    fn from(l: KvLayout) -> Self {
        WireLayout {
            n_layer: sat_u32(l.n_layer),
            n_head_kv: sat_u32(l.n_head_kv),
            head_dim: sat_u32(l.head_dim),
            block_tokens: sat_u32(l.block_tokens),
            dtype: l.dtype,
        }
    }
}

impl From<WireLayout> for KvLayout {
    fn from(l: WireLayout) -> Self {
        KvLayout {
            n_layer: l.n_layer as usize,
            n_head_kv: l.n_head_kv as usize,
            head_dim: l.head_dim as usize,
            block_tokens: l.block_tokens as usize,
            dtype: l.dtype,
        }
    }
}

impl WireLayout {
    /// Values of one K (or V) row: `n_head_kv × head_dim`.
    pub fn kv_width(&self) -> u64 {
        u64::from(self.n_head_kv) * u64::from(self.head_dim)
    }

    /// Bytes of one K (or V) row.
    pub fn row_bytes(&self) -> u64 {
        self.kv_width() * self.dtype.bytes() as u64
    }

    /// Checks the limits a decoded layout must meet.
    pub fn check(&self) -> Result<(), WireError> {
        if self.n_layer == 0 || self.n_head_kv == 0 || self.head_dim == 0 {
            return Err(WireError::BadLayout("a zero dimension"));
        }
        if self.block_tokens == 0 {
            return Err(WireError::BadLayout("zero tokens per block"));
        }
        limit("n_layer", u64::from(self.n_layer), u64::from(MAX_LAYERS))?;
        limit("n_head_kv * head_dim", self.kv_width(), MAX_KV_WIDTH)?;
        limit(
            "block_tokens",
            u64::from(self.block_tokens),
            u64::from(MAX_TOKENS),
        )
    }
}

fn limit(what: &'static str, value: u64, max: u64) -> Result<(), WireError> {
    if value > max {
        Err(WireError::Limit { what, value, max })
    } else {
        Ok(())
    }
}

/// A bounds-checked little-endian reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn need(&self, n: usize) -> Result<(), WireError> {
        let needed = self.pos.saturating_add(n);
        if needed > self.buf.len() {
            Err(WireError::Truncated {
                needed,
                have: self.buf.len(),
            })
        } else {
            Ok(())
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        self.need(n)?;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn magic(&mut self, expected: [u8; 4]) -> Result<(), WireError> {
        // Compare what is present so that a wrong stream fails at once, not after 4 bytes arrive.
        let have = &self.buf[self.pos.min(self.buf.len())..];
        let n = have.len().min(4);
        if have[..n] != expected[..n] {
            let mut found = [0u8; 4];
            found[..n].copy_from_slice(&have[..n]);
            return Err(WireError::BadMagic { expected, found });
        }
        self.array::<4>().map(|_| ())
    }
}

/// The header of a KV stream: whose KV it is, its geometry and the token prefix it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvHeader {
    /// [`crate::ContentIdentity::digest`] of the model that computed the KV.
    pub identity: [u8; 32],
    pub layout: WireLayout,
    pub tokens: Vec<u32>,
    /// Chained hashes of the full blocks of `tokens` under the cache root.
    pub block_hashes: Vec<BlockHash>,
}

impl KvHeader {
    /// A header for the unsalted prefix `tokens`: its block hashes chained from
    /// [`cache_root`]`(identity, dtype, block_tokens, raw codec)`.
    pub fn new(identity: [u8; 32], layout: WireLayout, tokens: Vec<u32>) -> Self {
        let block_hashes = Self::unsalted_hashes(&identity, &layout, &tokens);
        KvHeader {
            identity,
            layout,
            tokens,
            block_hashes,
        }
    }

    fn unsalted_hashes(identity: &[u8; 32], layout: &WireLayout, tokens: &[u32]) -> Vec<BlockHash> {
        let bt = (layout.block_tokens as usize).max(1);
        let root = cache_root(identity, layout.dtype, bt, CODEC_RAW);
        block_hashes(root, tokens, bt, usize::MAX, None)
    }

    /// The block hashes are those of the unsalted prefix under the header's identity and layout (a
    /// receiver checks this before inserting the blocks into its prefix cache; salted prefixes are
    /// checked by the caller, who knows the salt).
    pub fn hashes_match_unsalted(&self) -> bool {
        self.block_hashes == Self::unsalted_hashes(&self.identity, &self.layout, &self.tokens)
    }

    /// The encoded header (module docs).
    pub fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        let mut o = Vec::with_capacity(
            HEADER_FIXED + 4 * self.tokens.len() + 4 + 16 * self.block_hashes.len() + 32,
        );
        o.extend_from_slice(&HEADER_MAGIC);
        o.extend_from_slice(&VERSION.to_le_bytes());
        o.extend_from_slice(&self.identity);
        for v in [l.n_layer, l.n_head_kv, l.head_dim, l.block_tokens] {
            o.extend_from_slice(&v.to_le_bytes());
        }
        o.push(dtype_code(l.dtype));
        o.extend_from_slice(&sat_u32(self.tokens.len()).to_le_bytes());
        for t in &self.tokens {
            o.extend_from_slice(&t.to_le_bytes());
        }
        o.extend_from_slice(&sat_u32(self.block_hashes.len()).to_le_bytes());
        for h in &self.block_hashes {
            o.extend_from_slice(&h.0);
        }
        let d = blake3::hash(&o);
        o.extend_from_slice(d.as_bytes());
        o
    }

    /// Decodes a header at the start of `buf`; returns it and the bytes it took. Checks the magic,
    /// version, layout limits, the token and hash counts, and the digest.
    pub fn decode(buf: &[u8]) -> Result<(KvHeader, usize), WireError> {
        let mut r = Reader { buf, pos: 0 };
        r.magic(HEADER_MAGIC)?;
        let version = r.u16()?;
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let identity = r.array::<32>()?;
        let (n_layer, n_head_kv, head_dim, block_tokens) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let code = r.u8()?;
        let dtype = dtype_from_code(code).ok_or(WireError::BadDtype(code))?;
        let layout = WireLayout {
            n_layer,
            n_head_kv,
            head_dim,
            block_tokens,
            dtype,
        };
        layout.check()?;
        let n_tokens = r.u32()?;
        limit("n_tokens", u64::from(n_tokens), u64::from(MAX_TOKENS))?;
        r.need(4 * n_tokens as usize + 4)?;
        let tokens: Vec<u32> = (0..n_tokens).map(|_| r.u32()).collect::<Result<_, _>>()?;
        let n_hashes = r.u32()?;
        if n_hashes != n_tokens / block_tokens {
            return Err(WireError::HashCount {
                n_hashes,
                n_tokens,
                block_tokens,
            });
        }
        r.need(16 * n_hashes as usize + 32)?;
        let block_hashes: Vec<BlockHash> = (0..n_hashes)
            .map(|_| r.array::<16>().map(BlockHash))
            .collect::<Result<_, _>>()?;
        let body = r.pos;
        let digest = r.array::<32>()?;
        if blake3::hash(&buf[..body]).as_bytes() != &digest {
            return Err(WireError::HeaderDigestMismatch);
        }
        Ok((
            KvHeader {
                identity,
                layout,
                tokens,
                block_hashes,
            },
            r.pos,
        ))
    }
}

/// One layer's K and V for tokens `start..end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub layer: u32,
    pub start: u32,
    /// Exclusive.
    pub end: u32,
    pub dtype: KvDtype,
    pub codec: u8,
    pub payload: Vec<u8>,
    /// BLAKE3 of `payload`.
    pub digest: [u8; 32],
}

impl Frame {
    /// A frame with its payload's digest computed.
    pub fn new(
        layer: u32,
        start: u32,
        end: u32,
        dtype: KvDtype,
        codec: u8,
        payload: Vec<u8>,
    ) -> Self {
        let digest = *blake3::hash(&payload).as_bytes();
        Frame {
            layer,
            start,
            end,
            dtype,
            codec,
            payload,
            digest,
        }
    }

    /// Bytes of a raw payload for this frame's range in `layout`: `(end − start) × row_bytes × 2`
    /// (0 for an empty or reversed range).
    pub fn expected_raw_len(&self, layout: &WireLayout) -> u64 {
        u64::from(self.end.saturating_sub(self.start))
            .saturating_mul(layout.row_bytes())
            .saturating_mul(2)
    }

    /// Bytes of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.payload.len()
    }

    /// Appends the encoded frame (module docs) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&FRAME_MAGIC);
        for v in [self.layer, self.start, self.end] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(dtype_code(self.dtype));
        out.push(self.codec);
        out.extend_from_slice(&(self.payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&self.payload);
    }

    /// Decodes a frame at the start of `buf`; returns it and the bytes it took. Checks the magic, the
    /// dtype code, the payload limit (before allocating) and the payload's digest.
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), WireError> {
        let mut r = Reader { buf, pos: 0 };
        r.magic(FRAME_MAGIC)?;
        let (layer, start, end) = (r.u32()?, r.u32()?, r.u32()?);
        let code = r.u8()?;
        let dtype = dtype_from_code(code).ok_or(WireError::BadDtype(code))?;
        let codec = r.u8()?;
        let len = r.u64()?;
        limit("payload_len", len, MAX_PAYLOAD)?;
        let digest = r.array::<32>()?;
        let payload = r.take(len as usize)?;
        if blake3::hash(payload).as_bytes() != &digest {
            return Err(WireError::DigestMismatch { layer, start, end });
        }
        Ok((
            Frame {
                layer,
                start,
                end,
                dtype,
                codec,
                payload: payload.to_vec(),
                digest,
            },
            r.pos,
        ))
    }
}

/// Checks that `frame` belongs to the stream of `header`: layer in range, `start < end <= n_tokens`,
/// the header's dtype, a known codec ([`crate::codec::CODECS`]), for the raw codec a payload of
/// exactly [`Frame::expected_raw_len`] bytes, for a lossy codec a non-empty payload of at most
/// [`crate::codec::max_payload_len`] bytes.
pub fn validate_frame(header: &KvHeader, frame: &Frame) -> Result<(), WireError> {
    let l = &header.layout;
    if frame.layer >= l.n_layer {
        return Err(WireError::LayerOutOfRange {
            layer: frame.layer,
            n_layer: l.n_layer,
        });
    }
    let n_tokens = sat_u32(header.tokens.len());
    if frame.start >= frame.end || frame.end > n_tokens {
        return Err(WireError::RangeOutOfBounds {
            start: frame.start,
            end: frame.end,
            n_tokens,
        });
    }
    if frame.dtype != l.dtype {
        return Err(WireError::DtypeMismatch {
            frame: frame.dtype,
            header: l.dtype,
        });
    }
    if !codec::CODECS.contains(&frame.codec) {
        return Err(WireError::UnsupportedCodec(frame.codec));
    }
    let len = frame.payload.len() as u64;
    if frame.codec != CODEC_RAW {
        let n = (frame.end - frame.start) as usize;
        let max = codec::max_payload_len(frame.codec, l, n).unwrap_or(0);
        if len == 0 || len > max {
            return Err(WireError::PayloadBound {
                layer: frame.layer,
                start: frame.start,
                end: frame.end,
                codec: frame.codec,
                len,
                max,
            });
        }
        return Ok(());
    }
    let expected = frame.expected_raw_len(l);
    if len != expected {
        return Err(WireError::PayloadLength {
            layer: frame.layer,
            start: frame.start,
            end: frame.end,
            len,
            expected,
        });
    }
    Ok(())
}

/// One decoded item of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Header(KvHeader),
    Frame(Frame),
}

/// Incremental decoding of a stream fed in arbitrary chunks (as a network reader receives them).
///
/// [`StreamReader::push`] appends bytes; [`StreamReader::next_item`] yields the header first, then each
/// frame once all its bytes are present (`Ok(None)`: more bytes needed). Frames are checked with
/// [`validate_frame`] against the header. After an error the reader stays failed
/// ([`WireError::StreamFailed`]). A partial item is decoded again only once the bytes it was known to
/// need have arrived, so feeding one byte at a time stays linear.
#[derive(Debug, Default)]
pub struct StreamReader {
    buf: Vec<u8>,
    /// Consumed bytes at the front of `buf`.
    pos: usize,
    /// Bytes (from `pos`) the pending item needs at least.
    need: usize,
    header: Option<KvHeader>,
    failed: bool,
}

impl StreamReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The header, once decoded.
    pub fn header(&self) -> Option<&KvHeader> {
        self.header.as_ref()
    }

    /// Bytes received but not yet part of a decoded item.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete item, `Ok(None)` if more bytes are needed.
    pub fn next_item(&mut self) -> Result<Option<Item>, WireError> {
        if self.failed {
            return Err(WireError::StreamFailed);
        }
        let avail = &self.buf[self.pos..];
        if avail.is_empty() || avail.len() < self.need {
            return Ok(None);
        }
        let res = match &self.header {
            None => KvHeader::decode(avail).map(|(h, n)| (Item::Header(h), n)),
            Some(h) => Frame::decode(avail).and_then(|(f, n)| {
                validate_frame(h, &f)?;
                Ok((Item::Frame(f), n))
            }),
        };
        match res {
            Ok((item, n)) => {
                self.pos += n;
                self.need = 0;
                if let Item::Header(h) = &item {
                    self.header = Some(h.clone());
                }
                Ok(Some(item))
            }
            Err(WireError::Truncated { needed, .. }) => {
                self.need = needed;
                Ok(None)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }
}
