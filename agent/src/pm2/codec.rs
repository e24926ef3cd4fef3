//! The amp wire format PM2's daemon speaks on `rpc.sock` and `pub.sock`.
//!
//! Owns: encoding requests and decoding frames. It never touches a socket.
//!
//! Invariants:
//! - A frame is `meta:u8 = (1 << 4) | argc`, then per argument `len:u32` big-endian and `len` bytes.
//!   Arguments are `s:` + UTF-8, `j:` + JSON, or raw bytes.
//! - Requests are only built by [`encode_call`], which always produces
//!   `[ j:{"type":"call","method":M,"args":[A]} , s:<id> ]` with exactly one element in `args`: a
//!   malformed frame makes the real daemon stop and resurrect every app.
//! - [`Decoder`] accepts any chunking (partial frames, several frames per read), caps one frame at
//!   [`MAX_FRAME`] bytes and never panics on arbitrary input; after an error it must be discarded
//!   together with its connection.

use serde::Serialize;

/// Largest frame the decoder accepts (header and all arguments).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// The only protocol version amp knows (high nibble of the meta byte).
const VERSION: u8 = 1;

/// Arguments in one frame are limited by the 4-bit argc.
const MAX_ARGS: usize = 15;

/// One decoded argument, as its raw bytes including the `s:`/`j:` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawArg(pub Vec<u8>);

impl RawArg {
    /// The string of an `s:` argument, if it is one and valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        self.0
            .strip_prefix(b"s:")
            .and_then(|b| std::str::from_utf8(b).ok())
    }
    /// The JSON bytes of a `j:` argument, if it is one.
    pub fn as_json(&self) -> Option<&[u8]> {
        self.0.strip_prefix(b"j:")
    }
    /// Whether the argument is exactly `s:<s>`, without decoding anything.
    pub fn is_str(&self, s: &str) -> bool {
        self.0.len() == s.len() + 2 && self.0.starts_with(b"s:") && &self.0[2..] == s.as_bytes()
    }
}

/// An argument to encode.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Str(&'a str),
    /// Already-serialized JSON.
    Json(&'a [u8]),
    Raw(&'a [u8]),
}

impl Arg<'_> {
    fn encoded_len(&self) -> usize {
        match self {
            Arg::Str(s) => 2 + s.len(),
            Arg::Json(j) => 2 + j.len(),
            Arg::Raw(r) => r.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported amp version {version} (meta byte {meta:#04x})")]
    Version { version: u8, meta: u8 },
    #[error("amp frame of at least {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
}

/// Encodes one frame. Panics only on programming errors (more than 15 arguments or an argument
/// over 4 GiB), which the typed callers in this module never produce.
pub fn encode_frame(args: &[Arg<'_>]) -> Vec<u8> {
    assert!(
        args.len() <= MAX_ARGS,
        "amp frames carry at most 15 arguments"
    );
    let total = 1 + args.iter().map(|a| 4 + a.encoded_len()).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.push((VERSION << 4) | args.len() as u8);
    for arg in args {
        // The typed encoders send a pm_id or a name: never near 4 GiB (documented above).
        #[allow(clippy::expect_used)]
        let len = u32::try_from(arg.encoded_len()).expect("amp argument over 4 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        match arg {
            Arg::Str(s) => {
                out.extend_from_slice(b"s:");
                out.extend_from_slice(s.as_bytes());
            }
            Arg::Json(j) => {
                out.extend_from_slice(b"j:");
                out.extend_from_slice(j);
            }
            Arg::Raw(r) => out.extend_from_slice(r),
        }
    }
    out
}

#[derive(Serialize)]
struct Call<'a, A: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    method: &'a str,
    /// A one-element array by construction: `"args":[]` crashes the daemon's dispatcher.
    args: [&'a A; 1],
}

/// Encodes an axon-rpc call `[ j:{"type":"call","method":M,"args":[arg]} , s:<id> ]`.
pub fn encode_call<A: Serialize>(method: &str, arg: &A, id: &str) -> Vec<u8> {
    let call = Call {
        kind: "call",
        method,
        args: [arg],
    };
    // Serializing these plain structs cannot fail: no maps with non-string keys, no custom impls
    // that error. Falling back to `{}` keeps the one-element invariant even if it ever did.
    let json = serde_json::to_vec(&call).unwrap_or_else(|_| {
        serde_json::to_vec(&Call {
            kind: "call",
            method,
            args: [&EmptyObject {}],
        })
        .unwrap_or_default()
    });
    encode_frame(&[Arg::Json(&json), Arg::Str(id)])
}

/// `{}`: the argument for methods that ignore theirs.
#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct EmptyObject {}

/// Incremental amp decoder.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    failed: Option<DecodeError>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Appends bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error every later
    /// call returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<Vec<RawArg>>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.parse() {
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
            ok => ok,
        }
    }

    fn parse(&mut self) -> Result<Option<Vec<RawArg>>, DecodeError> {
        let data = &self.buf[self.pos..];
        let Some(&meta) = data.first() else {
            return Ok(None);
        };
        let version = meta >> 4;
        if version != VERSION {
            return Err(DecodeError::Version { version, meta });
        }
        let argc = usize::from(meta & 0x0f);
        // First pass: check that the whole frame is here, without copying.
        let mut off = 1usize;
        for _ in 0..argc {
            let Some(hdr) = data.get(off..off + 4) else {
                return Ok(None);
            };
            let len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
            let end = off + 4 + len;
            if end > MAX_FRAME {
                return Err(DecodeError::TooLarge {
                    size: end,
                    max: MAX_FRAME,
                });
            }
            if data.len() < end {
                return Ok(None);
            }
            off = end;
        }
        let mut args = Vec::with_capacity(argc);
        let mut at = 1usize;
        for _ in 0..argc {
            let len =
                u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
            args.push(RawArg(data[at + 4..at + 4 + len].to_vec()));
            at += 4 + len;
        }
        self.pos += off;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        Ok(Some(args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Verbatim from FACTS.md section 1 (captured from a real PM2 7.0.4 exchange).
    fn ping_request() -> Vec<u8> {
        let mut v = vec![0x12, 0, 0, 0, 0x2d];
        v.extend_from_slice(br#"j:{"type":"call","method":"ping","args":[{}]}"#);
        v.extend_from_slice(&[0, 0, 0, 0x10]);
        v.extend_from_slice(b"s:pmguard-8247:0");
        v
    }

    fn pong_reply() -> Vec<u8> {
        let mut v = vec![0x12, 0, 0, 0, 0x1b];
        v.extend_from_slice(br#"j:{"args":[{"msg":"pong"}]}"#);
        v.extend_from_slice(&[0, 0, 0, 0x10]);
        v.extend_from_slice(b"s:pmguard-8247:0");
        v
    }

    #[test]
    fn ping_request_bytes_match_the_capture() {
        assert_eq!(
            encode_call("ping", &EmptyObject {}, "pmguard-8247:0"),
            ping_request()
        );
    }

    #[test]
    fn captured_reply_decodes() {
        let mut d = Decoder::new();
        d.feed(&pong_reply());
        let frame = d.next_frame().unwrap().unwrap();
        assert_eq!(frame.len(), 2);
        assert_eq!(frame[0].as_json().unwrap(), br#"{"args":[{"msg":"pong"}]}"#);
        assert_eq!(frame[1].as_str(), Some("pmguard-8247:0"));
        assert!(frame[1].is_str("pmguard-8247:0"));
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn request_round_trips_byte_by_byte() {
        let bytes = ping_request();
        let mut d = Decoder::new();
        for (i, b) in bytes.iter().enumerate() {
            d.feed(&[*b]);
            let got = d.next_frame().unwrap();
            assert_eq!(got.is_some(), i == bytes.len() - 1);
        }
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut all = Vec::new();
        for i in 0..5 {
            all.extend(encode_call(
                "getVersion",
                &EmptyObject {},
                &format!("pmguard-1:{i}"),
            ));
        }
        all.extend(encode_frame(&[]));
        all.extend(&pong_reply()[..7]);
        let mut d = Decoder::new();
        d.feed(&all);
        for i in 0..5 {
            let f = d.next_frame().unwrap().unwrap();
            assert_eq!(f[1].as_str().unwrap(), format!("pmguard-1:{i}"));
        }
        assert_eq!(d.next_frame().unwrap(), Some(vec![]));
        assert_eq!(d.next_frame().unwrap(), None);
        d.feed(&pong_reply()[7..]);
        assert!(d.next_frame().unwrap().is_some());
    }

    #[test]
    fn oversized_frame_is_rejected_from_its_header() {
        let mut d = Decoder::new();
        d.feed(&[0x11, 0x04, 0, 0, 0]);
        assert!(matches!(d.next_frame(), Err(DecodeError::TooLarge { .. })));
        // Sticky: the stream cannot be resynchronised.
        d.feed(&pong_reply());
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn bad_version_is_an_error() {
        let mut d = Decoder::new();
        d.feed(&[0x22, 0, 0, 0, 0]);
        assert!(matches!(
            d.next_frame(),
            Err(DecodeError::Version { version: 2, .. })
        ));
    }

    #[test]
    fn call_has_exactly_one_arg() {
        let frame = encode_call("stopProcessId", &3u32, "x");
        let mut d = Decoder::new();
        d.feed(&frame);
        let f = d.next_frame().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(f[0].as_json().unwrap()).unwrap();
        assert_eq!(v["args"].as_array().unwrap().len(), 1);
        assert_eq!(v["args"][0], 3);
        assert_eq!(v["type"], "call");
        assert_eq!(v["method"], "stopProcessId");
    }

    fn chunks(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut i = 0;
        while at < bytes.len() {
            let n = sizes
                .get(i % sizes.len().max(1))
                .copied()
                .unwrap_or(1)
                .max(1);
            let end = (at + n).min(bytes.len());
            out.push(bytes[at..end].to_vec());
            at = end;
            i += 1;
        }
        out
    }

    #[derive(Debug, Clone)]
    enum OwnedArg {
        Str(String),
        Json(Vec<u8>),
        Raw(Vec<u8>),
    }

    fn arg_strategy() -> impl Strategy<Value = OwnedArg> {
        prop_oneof![
            ".{0,40}".prop_map(OwnedArg::Str),
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(OwnedArg::Json),
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(OwnedArg::Raw),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            sizes in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let mut d = Decoder::new();
            for c in chunks(&bytes, &sizes) {
                d.feed(&c);
                let mut n = 0;
                // Frames with argc 0 are one byte each, so this terminates within the input size.
                while let Ok(Some(_)) = d.next_frame() {
                    n += 1;
                    prop_assert!(n <= bytes.len());
                }
            }
        }

        #[test]
        fn frames_round_trip_in_any_chunking(
            frames in proptest::collection::vec(proptest::collection::vec(arg_strategy(), 0..6), 1..8),
            sizes in proptest::collection::vec(1usize..64, 1..10),
        ) {
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for f in &frames {
                let args: Vec<Arg<'_>> = f.iter().map(|a| match a {
                    OwnedArg::Str(s) => Arg::Str(s),
                    OwnedArg::Json(j) => Arg::Json(j),
                    OwnedArg::Raw(r) => Arg::Raw(r),
                }).collect();
                wire.extend(encode_frame(&args));
                expected.push(f.iter().map(|a| RawArg(match a {
                    OwnedArg::Str(s) => [b"s:".as_slice(), s.as_bytes()].concat(),
                    OwnedArg::Json(j) => [b"j:".as_slice(), j].concat(),
                    OwnedArg::Raw(r) => r.clone(),
                })).collect::<Vec<_>>());
            }
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for c in chunks(&wire, &sizes) {
                d.feed(&c);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, expected);
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn calls_decode_to_one_arg_and_the_id(id in "[a-z0-9:-]{1,30}", n in any::<u32>()) {
            let mut d = Decoder::new();
            d.feed(&encode_call("restartProcessId", &serde_json::json!({"id": n, "env": {}}), &id));
            let f = d.next_frame().unwrap().unwrap();
            prop_assert_eq!(f.len(), 2);
            let v: serde_json::Value = serde_json::from_slice(f[0].as_json().unwrap()).unwrap();
            prop_assert_eq!(v["args"].as_array().unwrap().len(), 1);
            prop_assert_eq!(f[1].as_str().unwrap(), id.as_str());
        }
    }
}
