//! The KV wire format (`ep_kv::wire`): round trips, chunked streaming, corruption and hostile input.

use ep_kv::identity::dtype_code;
use ep_kv::wire::{
    validate_frame, Frame, Item, KvHeader, StreamReader, WireError, WireLayout, FRAME_HEADER_BYTES,
    MAX_PAYLOAD, MAX_TOKENS,
};
use ep_kv::{KvDtype, KvLayout};
use proptest::prelude::*;

fn dtype_of(i: u8) -> KvDtype {
    [KvDtype::F32, KvDtype::F16, KvDtype::Bf16][i as usize % 3]
}

fn layout_strategy() -> impl Strategy<Value = WireLayout> {
    (1u32..6, 1u32..4, 1u32..5, 1u32..20, 0u8..3).prop_map(|(l, h, d, bt, dt)| WireLayout {
        n_layer: l,
        n_head_kv: h,
        head_dim: d * 4,
        block_tokens: bt,
        dtype: dtype_of(dt),
    })
}

/// A header and a set of valid raw frames for it.
fn stream_strategy() -> impl Strategy<Value = (KvHeader, Vec<Frame>)> {
    (
        layout_strategy(),
        any::<[u8; 32]>(),
        prop::collection::vec(any::<u32>(), 1..70),
    )
        .prop_flat_map(|(layout, id, tokens)| {
            let n = tokens.len() as u32;
            let frame = (0..layout.n_layer, 0..n, 1..=n, any::<u64>()).prop_map(
                move |(layer, a, b, seed)| {
                    let (start, end) = if a < b {
                        (a, b)
                    } else {
                        (b - 1, a.max(b - 1) + 1)
                    };
                    let len = u64::from(end - start) * layout.row_bytes() * 2;
                    let mut x = seed;
                    let payload = (0..len)
                        .map(|_| {
                            x = x
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            (x >> 56) as u8
                        })
                        .collect();
                    Frame::new(layer, start, end, layout.dtype, 0, payload)
                },
            );
            (
                Just(KvHeader::new(id, layout, tokens)),
                prop::collection::vec(frame, 0..6),
            )
        })
}

fn encode_stream(h: &KvHeader, frames: &[Frame]) -> Vec<u8> {
    let mut out = h.encode();
    for f in frames {
        f.encode_into(&mut out);
    }
    out
}

/// Decodes a whole stream with `decode` calls.
fn decode_whole(buf: &[u8]) -> Result<(KvHeader, Vec<Frame>), WireError> {
    let (h, mut at) = KvHeader::decode(buf)?;
    let mut frames = Vec::new();
    while at < buf.len() {
        let (f, n) = Frame::decode(&buf[at..])?;
        validate_frame(&h, &f)?;
        frames.push(f);
        at += n;
    }
    Ok((h, frames))
}

/// Feeds `buf` to a stream reader in the chunks ending at `cuts`, collecting every item.
fn decode_chunked(buf: &[u8], cuts: &[usize]) -> Result<Vec<Item>, WireError> {
    let mut r = StreamReader::new();
    let mut items = Vec::new();
    let mut prev = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(buf.len())).collect();
    ends.push(buf.len());
    ends.sort_unstable();
    for e in ends {
        r.push(&buf[prev..e]);
        prev = e;
        while let Some(item) = r.next_item()? {
            items.push(item);
        }
    }
    assert_eq!(r.pending_bytes(), 0);
    Ok(items)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn header_and_frames_round_trip((h, frames) in stream_strategy()) {
        prop_assert!(h.hashes_match_unsalted());
        prop_assert_eq!(h.block_hashes.len(), h.tokens.len() / h.layout.block_tokens as usize);
        let enc = h.encode();
        let (d, n) = KvHeader::decode(&enc).unwrap();
        prop_assert_eq!(n, enc.len());
        prop_assert_eq!(&d, &h);
        for f in &frames {
            validate_frame(&h, f).unwrap();
            prop_assert_eq!(f.payload.len() as u64, f.expected_raw_len(&h.layout));
            let mut out = Vec::new();
            f.encode_into(&mut out);
            prop_assert_eq!(out.len(), f.encoded_len());
            let (g, n) = Frame::decode(&out).unwrap();
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(&g, f);
        }
        let whole = encode_stream(&h, &frames);
        let (dh, df) = decode_whole(&whole).unwrap();
        prop_assert_eq!(dh, h);
        prop_assert_eq!(df, frames);
    }

    #[test]
    fn chunked_stream_equals_whole_decoding(
        (h, frames) in stream_strategy(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let buf = encode_stream(&h, &frames);
        let cuts: Vec<usize> = cuts.iter().map(|c| c.index(buf.len() + 1)).collect();
        let items = decode_chunked(&buf, &cuts).unwrap();
        let mut want = vec![Item::Header(h)];
        want.extend(frames.into_iter().map(Item::Frame));
        prop_assert_eq!(items, want);
    }

    /// Every prefix of a stream decodes to an error or a shorter result, never a panic; the stream
    /// reader reports "more bytes needed" for every strict prefix of an item.
    #[test]
    fn truncations_error_never_panic((h, frames) in stream_strategy()) {
        let buf = encode_stream(&h, &frames);
        let hlen = h.encode().len();
        // Every cut through the header and the first frame's fixed part, then about 200 more.
        let step = (buf.len() / 200).max(1);
        let cuts = (0..buf.len().min(hlen + FRAME_HEADER_BYTES + 1)).chain((0..buf.len()).step_by(step));
        for cut in cuts {
            let part = &buf[..cut];
            if cut < hlen {
                let is_truncated = matches!(KvHeader::decode(part), Err(WireError::Truncated { .. }));
                prop_assert!(is_truncated, "cut {}", cut);
            }
            let _ = decode_whole(part);
            let mut r = StreamReader::new();
            r.push(part);
            while let Some(_item) = r.next_item().unwrap() {}
        }
    }

    /// Random bytes anywhere, or random fields, never panic.
    #[test]
    fn random_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..300), magic in 0u8..3) {
        let prefix: &[u8] = match magic {
            0 => b"EPKV",
            1 => b"EPKF",
            _ => b"",
        };
        bytes.splice(0..0, prefix.iter().copied());
        let _ = KvHeader::decode(&bytes);
        let _ = Frame::decode(&bytes);
        let mut r = StreamReader::new();
        r.push(&bytes);
        let _ = r.next_item();
    }
}

fn sample() -> (KvHeader, Frame) {
    let layout = WireLayout {
        n_layer: 3,
        n_head_kv: 2,
        head_dim: 8,
        block_tokens: 4,
        dtype: KvDtype::F16,
    };
    let h = KvHeader::new([7; 32], layout, (100..111).collect());
    let len = 3 * layout.row_bytes() as usize * 2;
    let f = Frame::new(
        2,
        5,
        8,
        KvDtype::F16,
        0,
        (0..len).map(|i| i as u8).collect(),
    );
    validate_frame(&h, &f).unwrap();
    (h, f)
}

#[test]
fn every_single_byte_corruption_of_a_payload_is_detected() {
    let (_, f) = sample();
    let mut enc = Vec::new();
    f.encode_into(&mut enc);
    for i in FRAME_HEADER_BYTES..enc.len() {
        for bit in [0x01u8, 0x80, 0xff] {
            let mut bad = enc.clone();
            bad[i] ^= bit;
            assert_eq!(
                Frame::decode(&bad).unwrap_err(),
                WireError::DigestMismatch {
                    layer: 2,
                    start: 5,
                    end: 8
                },
                "byte {i} ^ {bit:#x}"
            );
        }
    }
    // A corrupted digest field is detected too.
    let mut bad = enc.clone();
    bad[FRAME_HEADER_BYTES - 1] ^= 1;
    assert!(matches!(
        Frame::decode(&bad),
        Err(WireError::DigestMismatch { .. })
    ));
}

#[test]
fn every_single_byte_corruption_of_a_header_is_detected() {
    let (h, _) = sample();
    let enc = h.encode();
    for i in 0..enc.len() {
        let mut bad = enc.clone();
        bad[i] ^= 0x01;
        assert!(KvHeader::decode(&bad).is_err(), "header byte {i}");
    }
}

#[test]
fn layout_conversion_and_row_bytes() {
    let kl = KvLayout {
        n_layer: 30,
        n_head_kv: 3,
        head_dim: 64,
        block_tokens: 16,
        dtype: KvDtype::Bf16,
    };
    let w = WireLayout::from(kl);
    assert_eq!(w.row_bytes(), 3 * 64 * 2);
    assert_eq!(KvLayout::from(w), kl);
    assert_eq!(dtype_code(KvDtype::F32), 0);
    assert_eq!(dtype_code(KvDtype::F16), 1);
    assert_eq!(dtype_code(KvDtype::Bf16), 2);
}

/// The header's byte layout, field by field, as documented.
#[test]
fn header_byte_layout_is_as_documented() {
    let (h, f) = sample();
    let e = h.encode();
    assert_eq!(&e[0..4], b"EPKV");
    assert_eq!(&e[4..6], &1u16.to_le_bytes());
    assert_eq!(&e[6..38], &[7u8; 32]);
    assert_eq!(&e[38..42], &3u32.to_le_bytes());
    assert_eq!(&e[42..46], &2u32.to_le_bytes());
    assert_eq!(&e[46..50], &8u32.to_le_bytes());
    assert_eq!(&e[50..54], &4u32.to_le_bytes());
    assert_eq!(e[54], 1);
    assert_eq!(&e[55..59], &11u32.to_le_bytes());
    assert_eq!(&e[59..63], &100u32.to_le_bytes());
    let at = 59 + 44;
    assert_eq!(&e[at..at + 4], &2u32.to_le_bytes());
    assert_eq!(&e[at + 4..at + 20], &h.block_hashes[0].0);
    let body = at + 4 + 32;
    assert_eq!(e.len(), body + 32);
    assert_eq!(&e[body..], blake3::hash(&e[..body]).as_bytes());

    let mut fe = Vec::new();
    f.encode_into(&mut fe);
    assert_eq!(&fe[0..4], b"EPKF");
    assert_eq!(&fe[4..8], &2u32.to_le_bytes());
    assert_eq!(&fe[8..12], &5u32.to_le_bytes());
    assert_eq!(&fe[12..16], &8u32.to_le_bytes());
    assert_eq!(fe[16], 1);
    assert_eq!(fe[17], 0);
    assert_eq!(&fe[18..26], &(f.payload.len() as u64).to_le_bytes());
    assert_eq!(&fe[26..58], blake3::hash(&f.payload).as_bytes());
    assert_eq!(&fe[58..], &f.payload[..]);
}

fn patch(buf: &mut [u8], at: usize, v: &[u8]) {
    buf[at..at + v.len()].copy_from_slice(v);
}

#[test]
fn hostile_header_fields() {
    let (h, _) = sample();
    let enc = h.encode();
    let err = |b: &[u8]| KvHeader::decode(b).unwrap_err();
    let mut b = enc.clone();
    patch(&mut b, 0, b"EPKX");
    assert!(matches!(err(&b), WireError::BadMagic { .. }));
    // A wrong magic is reported as soon as its first byte arrives.
    assert!(matches!(err(b"X"), WireError::BadMagic { .. }));
    assert!(matches!(err(b"EP"), WireError::Truncated { .. }));
    let mut b = enc.clone();
    patch(&mut b, 4, &2u16.to_le_bytes());
    assert_eq!(err(&b), WireError::UnsupportedVersion(2));
    // n_tokens huge: refused before reading (or allocating) anything.
    let mut b = enc[..59].to_vec();
    patch(&mut b, 55, &u32::MAX.to_le_bytes());
    assert!(matches!(
        err(&b),
        WireError::Limit {
            what: "n_tokens",
            ..
        }
    ));
    let mut b = enc[..59].to_vec();
    patch(&mut b, 55, &MAX_TOKENS.to_le_bytes());
    assert!(matches!(err(&b), WireError::Truncated { .. }));
    // n_hashes inconsistent with n_tokens / block_tokens.
    let mut b = enc.clone();
    patch(&mut b, 59 + 44, &u32::MAX.to_le_bytes());
    assert!(matches!(
        err(&b),
        WireError::HashCount {
            n_hashes: u32::MAX,
            ..
        }
    ));
    // Degenerate and huge layouts, unknown dtype.
    for (at, v) in [
        (38, 0u32),
        (50, 0),
        (42, u32::MAX),
        (46, u32::MAX),
        (38, u32::MAX),
    ] {
        let mut b = enc.clone();
        patch(&mut b, at, &v.to_le_bytes());
        assert!(
            matches!(err(&b), WireError::BadLayout(_) | WireError::Limit { .. }),
            "field at {at} = {v}: {:?}",
            err(&b)
        );
    }
    let mut b = enc.clone();
    b[54] = 9;
    assert_eq!(err(&b), WireError::BadDtype(9));
    // A valid-looking header whose digest is wrong.
    let mut b = enc.clone();
    let n = b.len();
    b[n - 1] ^= 1;
    assert_eq!(err(&b), WireError::HeaderDigestMismatch);
}

#[test]
fn hostile_frame_fields() {
    let (h, f) = sample();
    let mut enc = Vec::new();
    f.encode_into(&mut enc);
    let err = |b: &[u8]| Frame::decode(b).unwrap_err();
    // payload_len beyond the limit: refused before allocating.
    let mut b = enc[..FRAME_HEADER_BYTES].to_vec();
    patch(&mut b, 18, &u64::MAX.to_le_bytes());
    assert!(matches!(
        err(&b),
        WireError::Limit {
            what: "payload_len",
            ..
        }
    ));
    // At the limit but absent: truncated, nothing allocated.
    patch(&mut b, 18, &MAX_PAYLOAD.to_le_bytes());
    assert!(matches!(err(&b), WireError::Truncated { .. }));
    let mut b = enc.clone();
    b[16] = 3;
    assert_eq!(err(&b), WireError::BadDtype(3));
    // Decodable frames that do not fit the header.
    let bad = |g: Frame| validate_frame(&h, &g).unwrap_err();
    let p = f.payload.clone();
    assert!(matches!(
        bad(Frame::new(3, 5, 8, KvDtype::F16, 0, p.clone())),
        WireError::LayerOutOfRange { .. }
    ));
    assert!(matches!(
        bad(Frame::new(0, 5, 5, KvDtype::F16, 0, vec![])),
        WireError::RangeOutOfBounds { .. }
    ));
    assert!(matches!(
        bad(Frame::new(0, 9, 12, KvDtype::F16, 0, p.clone())),
        WireError::RangeOutOfBounds { .. }
    ));
    assert!(matches!(
        bad(Frame::new(0, 6, 5, KvDtype::F16, 0, vec![])),
        WireError::RangeOutOfBounds { .. }
    ));
    assert!(matches!(
        bad(Frame::new(0, 5, 8, KvDtype::Bf16, 0, p.clone())),
        WireError::DtypeMismatch { .. }
    ));
    assert_eq!(
        bad(Frame::new(0, 5, 8, KvDtype::F16, 7, p.clone())),
        WireError::UnsupportedCodec(7)
    );
    assert!(matches!(
        bad(Frame::new(0, 5, 8, KvDtype::F16, 0, p[1..].to_vec())),
        WireError::PayloadLength {
            expected: 192,
            len: 191,
            ..
        }
    ));
}

#[test]
fn stream_reader_rejects_bad_frames_and_stays_failed() {
    let (h, f) = sample();
    let mut buf = h.encode();
    f.encode_into(&mut buf);
    let mut corrupt = f.clone();
    corrupt.payload[0] ^= 1; // digest left stale
    corrupt.encode_into(&mut buf);
    let mut r = StreamReader::new();
    r.push(&buf);
    assert!(matches!(r.next_item(), Ok(Some(Item::Header(_)))));
    assert!(r.header().is_some());
    assert_eq!(r.next_item(), Ok(Some(Item::Frame(f))));
    assert_eq!(
        r.next_item(),
        Err(WireError::DigestMismatch {
            layer: 2,
            start: 5,
            end: 8
        })
    );
    assert_eq!(r.next_item(), Err(WireError::StreamFailed));
    // A second header where a frame belongs is a bad frame magic.
    let mut r = StreamReader::new();
    r.push(&h.encode());
    r.push(&h.encode());
    assert!(matches!(r.next_item(), Ok(Some(Item::Header(_)))));
    assert!(matches!(r.next_item(), Err(WireError::BadMagic { .. })));
}

/// One byte at a time through a large header and frames: every byte is an `Ok(None)` until an item is
/// complete, and the whole is decoded.
#[test]
fn byte_at_a_time() {
    let layout = WireLayout {
        n_layer: 2,
        n_head_kv: 3,
        head_dim: 64,
        block_tokens: 16,
        dtype: KvDtype::F32,
    };
    let h = KvHeader::new([1; 32], layout, (0..5000).collect());
    let frames: Vec<Frame> = (0..2)
        .map(|l| {
            let len = 40 * layout.row_bytes() as usize * 2;
            Frame::new(l, 100, 140, KvDtype::F32, 0, vec![l as u8; len])
        })
        .collect();
    let buf = encode_stream(&h, &frames);
    let cuts: Vec<usize> = (0..buf.len()).collect();
    let items = decode_chunked(&buf, &cuts).unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0], Item::Header(h));
}
