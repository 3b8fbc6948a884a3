//! The engine's KV in the wire format (`ep_kv::wire`): a computed prompt's KV as a header and per-layer
//! frames of raw rows in the stored dtype, and an import started from a received header and fed with
//! received frames — refused unless identity, layout and block hashes are exactly this engine's.

use ep_kv::codec;
use ep_kv::identity::{hex, CODEC_RAW};
use ep_kv::wire::{validate_frame, Frame, KvHeader, WireLayout};

use crate::{Engine, EngineError, KvImport, PromptKv};

impl PromptKv {
    /// The header and frames of this KV under `identity` (a model's content-identity digest): per
    /// layer, frames of at most `frame_tokens` tokens (layer-major, token ranges ascending), each
    /// payload the K rows then the V rows of its range.
    pub fn to_frames(&self, identity: [u8; 32], frame_tokens: usize) -> (KvHeader, Vec<Frame>) {
        let header = KvHeader {
            identity,
            layout: WireLayout::from(self.layout),
            tokens: self.tokens.clone(),
            block_hashes: self.block_hashes.clone(),
        };
        let row = self.layout.kv_width() * self.layout.dtype.bytes();
        let n = self.tokens.len();
        let step = frame_tokens.max(1);
        let mut frames = Vec::new();
        for (l, (k, v)) in self.layers.iter().enumerate() {
            let mut s = 0;
            while s < n {
                let e = (s + step).min(n);
                let mut payload = Vec::with_capacity(2 * (e - s) * row);
                payload.extend_from_slice(&k[s * row..e * row]);
                payload.extend_from_slice(&v[s * row..e * row]);
                frames.push(Frame::new(
                    l as u32,
                    s as u32,
                    e as u32,
                    self.layout.dtype,
                    CODEC_RAW,
                    payload,
                ));
                s = e;
            }
        }
        (header, frames)
    }

    /// [`to_frames`](Self::to_frames) with each payload encoded by wire codec `codec`
    /// ([`ep_kv::codec::encode`]; raw is the stored rows as they are).
    pub fn to_frames_codec(
        &self,
        identity: [u8; 32],
        frame_tokens: usize,
        codec: u8,
    ) -> Result<(KvHeader, Vec<Frame>), codec::CodecError> {
        let (header, mut frames) = self.to_frames(identity, frame_tokens);
        if codec == CODEC_RAW {
            return Ok((header, frames));
        }
        for f in &mut frames {
            let n = (f.end - f.start) as usize;
            let half = f.payload.len() / 2;
            let (k, v) = f.payload.split_at(half);
            let payload = codec::encode(codec, &header.layout, n, k, v)?;
            *f = Frame::new(f.layer, f.start, f.end, f.dtype, codec, payload);
        }
        Ok((header, frames))
    }
}

/// A whole stream: the encoded header followed by the encoded frames.
pub fn encode_stream(header: &KvHeader, frames: &[Frame]) -> Vec<u8> {
    let mut out = header.encode();
    for f in frames {
        f.encode_into(&mut out);
    }
    out
}

impl Engine {
    /// Checks a received header against this engine: the model's content identity, the KV layout
    /// (dtype, block size, shape) and the block hashes of its tokens. The error says what differs.
    pub fn check_header(&self, h: &KvHeader) -> Result<(), EngineError> {
        let ours = self.identity().digest();
        if h.identity != ours {
            return Err(EngineError::KvRefused(format!(
                "it was computed by another model or build (identity {}, this engine's {})",
                hex(&h.identity),
                hex(&ours)
            )));
        }
        let want = WireLayout::from(self.layout());
        if h.layout != want {
            return Err(EngineError::KvRefused(format!(
                "its layout ({} layers × {} KV heads × {}, {} per block, {}) is not this engine's ({} layers × {} KV heads × {}, {} per block, {}); run with --kv-dtype and --block-size as at export",
                h.layout.n_layer,
                h.layout.n_head_kv,
                h.layout.head_dim,
                h.layout.block_tokens,
                h.layout.dtype.name(),
                want.n_layer,
                want.n_head_kv,
                want.head_dim,
                want.block_tokens,
                want.dtype.name()
            )));
        }
        if !h.hashes_match_unsalted() {
            return Err(EngineError::KvRefused(
                "its block hashes do not match its tokens".into(),
            ));
        }
        Ok(())
    }

    /// Starts an import from a received header (checked by [`check_header`](Self::check_header));
    /// feed it the stream's frames with [`KvImport::write_frame`].
    pub fn import_header_blocking(&self, h: &KvHeader) -> Result<KvImport, EngineError> {
        self.check_header(h)?;
        let mut imp = self.import_blocking(h.tokens.clone())?;
        imp.header = Some(h.clone());
        Ok(imp)
    }

    /// [`import_header_blocking`](Self::import_header_blocking) for async callers.
    pub async fn import_header(&self, h: &KvHeader) -> Result<KvImport, EngineError> {
        self.import_header_codec(h, CODEC_RAW).await
    }

    /// [`import_header`](Self::import_header) of a stream whose frames are encoded with `codec`
    /// (a lossy codec imports under that codec's cache root, see [`Engine::import_codec`]).
    pub async fn import_header_codec(
        &self,
        h: &KvHeader,
        codec: u8,
    ) -> Result<KvImport, EngineError> {
        self.check_header(h)?;
        let mut imp = self.import_codec(h.tokens.clone(), codec).await?;
        imp.header = Some(h.clone());
        Ok(imp)
    }
}

impl KvImport {
    /// Writes one received frame (its digest was checked when it was decoded; here it is checked
    /// against the header: layer, range, dtype, codec, length). The frame's codec must be the
    /// import's (a lossy frame never enters an exact import, nor the reverse); its payload is decoded
    /// with [`ep_kv::codec::decode`] into raw rows.
    pub fn write_frame(&self, f: &Frame) -> Result<(), EngineError> {
        let h = self.header.as_ref().ok_or_else(|| {
            EngineError::KvRefused("this import was not started from a stream header".into())
        })?;
        validate_frame(h, f)?;
        if f.codec != self.codec {
            return Err(EngineError::KvRefused(format!(
                "a frame of codec {} in an import of codec {}",
                codec::codec_name(f.codec).unwrap_or("?"),
                codec::codec_name(self.codec).unwrap_or("?")
            )));
        }
        let (k, v) = codec::decode(f.codec, &h.layout, (f.end - f.start) as usize, &f.payload)
            .map_err(|e| {
                EngineError::KvRefused(format!(
                    "frame of layer {}, tokens {}..{}: {e}",
                    f.layer, f.start, f.end
                ))
            })?;
        self.write_rows(f.layer as usize, f.start as usize, f.end as usize, k, v)
    }
}
