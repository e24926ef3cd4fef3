//! HTTP/1.1 wire pieces shared by the probe and the outbound client: finding bytes and
//! decoding a chunked body.

/// Where `needle` first occurs in `hay` (an empty needle is found at 0).
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A chunked body decoded as far as it has arrived.
pub enum Dechunk {
    Done(Vec<u8>),
    Partial(Vec<u8>),
    Bad,
}

/// Decodes a chunked body seen so far (trailers are ignored).
pub fn dechunk(mut raw: &[u8]) -> Dechunk {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(raw, b"\r\n") else {
            return Dechunk::Partial(out);
        };
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return Dechunk::Bad;
        };
        raw = &raw[eol + 2..];
        if size == 0 {
            return Dechunk::Done(out);
        }
        if raw.len() < size {
            out.extend_from_slice(raw);
            return Dechunk::Partial(out);
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size..];
        if raw.len() < 2 {
            return Dechunk::Partial(out);
        }
        raw = &raw[2..];
    }
}
