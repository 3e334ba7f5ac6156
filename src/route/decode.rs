//! Request bodies as sent → the bytes to parse. gzip is all or nothing:
//! every member of a multi-member stream is read (block compressors such as
//! bgzip and many log shippers write several), and a truncated stream or
//! bytes after the last member refuse the whole request, so a 2xx never
//! hides a row that was sent but not read.

use std::io::Read;

use axum::body::Body;
use axum::http::HeaderValue;
use bytes::Bytes;
use http_body_util::BodyExt;

use super::error::ApiError;

/// The body's `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    pub fn from_header(value: Option<&HeaderValue>) -> Result<Encoding, ApiError> {
        let Some(v) = value else {
            return Ok(Encoding::Identity);
        };
        // A value that is not visible ASCII names no encoding we know.
        let text = v.to_str().map(|t| t.trim().to_ascii_lowercase());
        match text.as_deref() {
            Ok("" | "identity") => Ok(Encoding::Identity),
            Ok("gzip" | "x-gzip") => Ok(Encoding::Gzip),
            _ => Err(ApiError::input(
                415,
                "unsupported_encoding",
                None,
                "content encoding is not accepted; send the body uncompressed or with gzip",
            )),
        }
    }
}

fn too_large(max: usize) -> ApiError {
    ApiError::input(
        413,
        "body_too_large",
        None,
        format!("the body exceeds {max} bytes (after decompression)"),
    )
}

/// Reads the whole body, at most `max` bytes as sent and `max` bytes after
/// decompression.
pub async fn read(body: Body, encoding: Encoding, max: usize) -> Result<Bytes, ApiError> {
    let raw = match http_body_util::Limited::new(body, max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large(max)),
        Err(e) => {
            return Err(ApiError::input(
                400,
                "unreadable_body",
                None,
                format!("cannot read the body: {e}"),
            ))
        }
    };
    match encoding {
        Encoding::Identity => Ok(raw),
        Encoding::Gzip => gunzip(&raw, max).map(Bytes::from),
    }
}

/// Decompresses every gzip member of `raw`, refusing a truncated stream,
/// trailing bytes and output beyond `max`.
pub fn gunzip(raw: &[u8], max: usize) -> Result<Vec<u8>, ApiError> {
    let bad = |why: String| {
        ApiError::input(
            400,
            "unreadable_body",
            None,
            format!("cannot read the body: {why}"),
        )
    };
    if raw.is_empty() {
        return Err(bad("empty gzip stream".into()));
    }
    let mut out = Vec::new();
    // One more byte than allowed tells "exactly max" from "too large".
    let mut decoder = flate2::read::MultiGzDecoder::new(raw).take(max as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|e| bad(format!("invalid gzip data ({e})")))?;
    if out.len() > max {
        return Err(too_large(max));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn every_member_is_read() {
        let mut two = gz(b"{\"a\":1}\n");
        two.extend(gz(b"{\"a\":2}\n"));
        assert_eq!(gunzip(&two, 1 << 20).unwrap(), b"{\"a\":1}\n{\"a\":2}\n");
    }

    #[test]
    fn trailing_bytes_and_truncation_refuse_the_body() {
        let mut trailing = gz(b"line\n");
        trailing.extend_from_slice(b"garbage");
        assert_eq!(gunzip(&trailing, 1 << 20).unwrap_err().status(), 400);
        let whole = gz(b"a line long enough to be cut\n");
        for cut in [1, 5, whole.len() / 2, whole.len() - 1] {
            let e = gunzip(&whole[..cut], 1 << 20).unwrap_err();
            assert_eq!(e.status(), 400, "cut at {cut}");
        }
        assert_eq!(gunzip(b"", 1 << 20).unwrap_err().status(), 400);
        assert_eq!(gunzip(b"not gzip", 1 << 20).unwrap_err().status(), 400);
    }

    #[test]
    fn the_limit_applies_after_decompression() {
        let data = vec![b'x'; 1000];
        let z = gz(&data);
        assert_eq!(gunzip(&z, 1000).unwrap().len(), 1000);
        assert_eq!(gunzip(&z, 999).unwrap_err().status(), 413);
    }

    #[test]
    fn encodings() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(Encoding::from_header(None).unwrap(), Encoding::Identity);
        assert_eq!(
            Encoding::from_header(Some(&h("GZIP"))).unwrap(),
            Encoding::Gzip
        );
        assert_eq!(
            Encoding::from_header(Some(&h("x-gzip"))).unwrap(),
            Encoding::Gzip
        );
        assert_eq!(
            Encoding::from_header(Some(&h("br"))).unwrap_err().status(),
            415
        );
        let not_ascii = HeaderValue::from_bytes(b"gz\xffip").unwrap();
        assert_eq!(
            Encoding::from_header(Some(&not_ascii))
                .unwrap_err()
                .status(),
            415
        );
    }
}
