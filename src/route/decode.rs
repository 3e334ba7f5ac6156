//! Request bodies as sent → the bytes to parse. gzip is all or nothing:
//! every member of a multi-member stream is read (block compressors such as
//! bgzip and many log shippers write several), and a truncated stream or
//! bytes after the last member refuse the whole request, so a 2xx never
//! hides a row that was sent but not read.

use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderValue;
use flate2::{Decompress, FlushDecompress, Status};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::admission::Ticket;
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

fn unreadable(why: impl std::fmt::Display) -> ApiError {
    ApiError::input(
        400,
        "unreadable_body",
        None,
        format!("cannot read the body: {why}"),
    )
}

/// Why a body stopped arriving.
pub fn body_timeout(limit: Duration) -> ApiError {
    ApiError::input(
        408,
        "body_timeout",
        None,
        format!("the body did not arrive within {} ms", limit.as_millis()),
    )
}

/// A body slower than the minimum rate.
fn too_slow(rate: f64, min: u64) -> ApiError {
    ApiError::input(
        408,
        "body_too_slow",
        None,
        format!("the body arrived at {rate:.0} bytes/s, below the minimum of {min} bytes/s"),
    )
}

/// How fast a body must arrive: at least `min_rate` bytes/s (as sent) of
/// the time the router waited on the client, once it waited `grace` (0: no
/// minimum). Time the router itself held the body back (waiting for memory)
/// does not count. `progress` is told of every wait and byte, so that a
/// connection below the rate can make room for another.
pub struct Pace<'a> {
    pub min_rate: u64,
    pub grace: Duration,
    pub progress: Option<&'a super::admission::Progress>,
}

impl Pace<'_> {
    fn check(&self, sent: u64, waited: Duration) -> Result<(), ApiError> {
        let rate = sent as f64 / waited.as_secs_f64().max(1e-3);
        if self.min_rate > 0 && rate < self.min_rate as f64 {
            return Err(too_slow(rate, self.min_rate));
        }
        Ok(())
    }
}

/// The first buffer of a body of unknown size; it doubles from there.
const FIRST_CAPACITY: usize = 64 * 1024;

/// Reads the whole body as it streams, decompressed, into a buffer whose
/// every byte of capacity `ticket` admitted first: at most `max` bytes
/// (413 the moment it would be more), within `deadline` (408 after), at the
/// `pace` (408 below it).
pub async fn read(
    body: &mut Body,
    encoding: Encoding,
    content_length: Option<u64>,
    ticket: &mut Ticket<'_>,
    deadline: Instant,
    limit: Duration,
    pace: &Pace<'_>,
) -> Result<Vec<u8>, ApiError> {
    let max = ticket.max_body();
    let mut out = Vec::new();
    let mut gz = match encoding {
        Encoding::Identity => None,
        Encoding::Gzip => Some(Gunzip::new()),
    };
    // A declared identity length is the whole body: admitted at once, and
    // refused before a byte is read when too large.
    let first = match (content_length, encoding) {
        (Some(n), Encoding::Identity) if n > max as u64 => return Err(too_large(max)),
        (Some(n), Encoding::Identity) => n as usize,
        _ => FIRST_CAPACITY.min(max + 1),
    };
    ticket.reserve(&mut out, first).await?;
    // Bytes as sent, the time spent waiting on the client, and at which
    // such time the rate is next checked (every second after the grace,
    // whether or not bytes arrive).
    let mut sent = 0u64;
    let mut waited = Duration::ZERO;
    let mut check_at = pace.grace;
    loop {
        let began = Instant::now();
        let wake = if pace.min_rate > 0 {
            deadline.min(began + check_at.saturating_sub(waited))
        } else {
            deadline
        };
        if let Some(p) = pace.progress {
            p.waiting_on_client(true);
        }
        let next = tokio::time::timeout_at(wake, body.frame()).await;
        if let Some(p) = pace.progress {
            p.waiting_on_client(false);
        }
        waited += began.elapsed();
        let frame = match next {
            Err(_) if wake < deadline => {
                pace.check(sent, waited)?;
                check_at = waited + Duration::from_secs(1);
                continue;
            }
            Err(_) => return Err(body_timeout(limit)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(unreadable(e)),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        sent += data.len() as u64;
        if let Some(p) = pace.progress {
            p.body_received(data.len());
        }
        if pace.min_rate > 0 && waited >= check_at {
            pace.check(sent, waited)?;
            check_at = waited + Duration::from_secs(1);
        }
        match &mut gz {
            None => {
                let need = out.len() + data.len();
                if need > max {
                    return Err(too_large(max));
                }
                if need > out.capacity() {
                    let grown = (out.capacity() * 2).clamp(need, max);
                    ticket.reserve(&mut out, grown).await?;
                }
                out.extend_from_slice(&data);
            }
            Some(gz) => {
                gz.push(&data);
                inflate(gz, &mut out, ticket, max).await?;
            }
        }
    }
    if let Some(gz) = &mut gz {
        inflate(gz, &mut out, ticket, max).await?;
        gz.finish().map_err(unreadable)?;
    }
    Ok(out)
}

/// How much of a refused body to read and drop.
pub struct Linger {
    pub bytes: usize,
    pub time: Duration,
}

/// Reads and drops what is left of `body`, at most `linger.bytes` (as sent)
/// for at most `linger.time`: memory stays one frame.
pub async fn linger(body: &mut Body, linger: Linger) {
    let deadline = Instant::now() + linger.time;
    let mut read = 0usize;
    while read <= linger.bytes {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => read += f.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
}

/// Decompresses what `gz` holds into `out`, growing it (admitted first) up
/// to one byte beyond `max`, which tells "exactly max" from "too large".
async fn inflate(
    gz: &mut Gunzip,
    out: &mut Vec<u8>,
    ticket: &mut Ticket<'_>,
    max: usize,
) -> Result<(), ApiError> {
    loop {
        match gz.run(out).map_err(unreadable)? {
            Progress::NeedInput => break,
            Progress::NeedSpace => {
                if out.len() > max {
                    return Err(too_large(max));
                }
                let grown = (out.capacity() * 2).clamp(out.len() + 1, max + 1);
                ticket.reserve(out, grown).await?;
            }
        }
    }
    if out.len() > max {
        return Err(too_large(max));
    }
    Ok(())
}

/// Decompresses every gzip member of `raw` (the streaming reader's rules,
/// at once), refusing a truncated stream,
/// trailing bytes and output beyond `max`.
pub fn gunzip(raw: &[u8], max: usize) -> Result<Vec<u8>, ApiError> {
    let mut gz = Gunzip::new();
    gz.push(raw);
    let mut out = Vec::with_capacity(FIRST_CAPACITY.min(max + 1));
    loop {
        match gz.run(&mut out).map_err(unreadable)? {
            Progress::NeedInput => break,
            Progress::NeedSpace if out.len() > max => return Err(too_large(max)),
            Progress::NeedSpace => {
                let grown = (out.capacity() * 2).clamp(out.len() + 1, max + 1);
                out.reserve_exact(grown - out.len());
            }
        }
    }
    if out.len() > max {
        return Err(too_large(max));
    }
    gz.finish().map_err(unreadable)?;
    Ok(out)
}

/// What [`Gunzip::run`] needs to go on.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Everything pushed so far is decompressed.
    NeedInput,
    /// The output buffer is full.
    NeedSpace,
}

#[derive(Debug)]
enum Member {
    /// Before a member's header; `any` once one member has ended.
    Header {
        any: bool,
    },
    Deflate,
    Trailer,
}

/// A gzip stream (RFC 1952) decompressed as it arrives, into the spare
/// capacity of a buffer the caller grows: the decompressor never allocates
/// output of its own, so a small body that expands enormously holds no more
/// than the caller admitted.
pub struct Gunzip {
    input: Vec<u8>,
    pos: usize,
    state: Member,
    inflater: Decompress,
    crc: crc32fast::Hasher,
    /// Output bytes of the current member (its trailer holds them mod 2³²).
    member_len: u64,
}

impl Gunzip {
    pub fn new() -> Gunzip {
        Gunzip {
            input: Vec::new(),
            pos: 0,
            state: Member::Header { any: false },
            inflater: Decompress::new(false),
            crc: crc32fast::Hasher::new(),
            member_len: 0,
        }
    }

    /// More compressed bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
        self.input.extend_from_slice(data);
    }

    /// Decompresses into `out`'s spare capacity until it is full or the
    /// input is used up.
    pub fn run(&mut self, out: &mut Vec<u8>) -> Result<Progress, String> {
        loop {
            let rest = &self.input[self.pos..];
            match self.state {
                Member::Header { .. } => {
                    let Some(len) = header_len(rest)? else {
                        return Ok(Progress::NeedInput);
                    };
                    self.pos += len;
                    self.inflater.reset(false);
                    self.crc = crc32fast::Hasher::new();
                    self.member_len = 0;
                    self.state = Member::Deflate;
                }
                Member::Deflate => {
                    if out.len() == out.capacity() {
                        return Ok(Progress::NeedSpace);
                    }
                    let (in0, out0) = (self.inflater.total_in(), out.len());
                    let status = self
                        .inflater
                        .decompress_vec(rest, out, FlushDecompress::None)
                        .map_err(|e| format!("invalid gzip data ({e})"))?;
                    self.pos += (self.inflater.total_in() - in0) as usize;
                    self.crc.update(&out[out0..]);
                    self.member_len += (out.len() - out0) as u64;
                    if status == Status::StreamEnd {
                        self.state = Member::Trailer;
                    } else if self.inflater.total_in() == in0 && out.len() == out0 {
                        return Ok(if out.len() == out.capacity() {
                            Progress::NeedSpace
                        } else {
                            Progress::NeedInput
                        });
                    }
                }
                Member::Trailer => {
                    if rest.len() < 8 {
                        return Ok(Progress::NeedInput);
                    }
                    let crc = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                    let size = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
                    if crc != self.crc.clone().finalize() || size != self.member_len as u32 {
                        return Err("invalid gzip data (checksum mismatch)".into());
                    }
                    self.pos += 8;
                    self.state = Member::Header { any: true };
                }
            }
        }
    }

    /// At the end of the body: every member must be whole, nothing after.
    pub fn finish(&self) -> Result<(), String> {
        match self.state {
            Member::Header { any: true } if self.pos == self.input.len() => Ok(()),
            Member::Header { any: false } if self.input.is_empty() => {
                Err("empty gzip stream".into())
            }
            _ => Err("invalid gzip data (truncated stream)".into()),
        }
    }
}

/// The length of the gzip member header at the start of `b`; None while it
/// is incomplete.
fn header_len(b: &[u8]) -> Result<Option<usize>, String> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    let bad = || Err("invalid gzip header".to_string());
    if b.is_empty() {
        return Ok(None);
    }
    if b[0] != 0x1f || (b.len() > 1 && b[1] != 0x8b) || (b.len() > 2 && b[2] != 8) {
        return bad();
    }
    if b.len() < 10 {
        return Ok(None);
    }
    let flags = b[3];
    if flags & 0xe0 != 0 {
        return bad();
    }
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let Some(x) = b.get(at..at + 2) else {
            return Ok(None);
        };
        at += 2 + usize::from(u16::from_le_bytes([x[0], x[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let Some(nul) = b.get(at..).and_then(|r| r.iter().position(|c| *c == 0)) else {
                return Ok(None);
            };
            at += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        // The header's own check: the low 16 bits of the CRC-32 of every
        // header byte before it.
        let Some(x) = b.get(at..at + 2) else {
            return Ok(None);
        };
        if u32::from(u16::from_le_bytes([x[0], x[1]])) != crc32fast::hash(&b[..at]) & 0xffff {
            return Err("invalid gzip header (header checksum mismatch)".to_string());
        }
        at += 2;
    }
    Ok((b.len() >= at).then_some(at))
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

    /// `z` (a member with the plain 10-byte header) with a header CRC.
    fn with_header_crc(z: &[u8], crc: Option<u16>) -> Vec<u8> {
        let mut header = z[..10].to_vec();
        header[3] |= 2;
        let crc = crc.unwrap_or((crc32fast::hash(&header) & 0xffff) as u16);
        let mut out = header;
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&z[10..]);
        out
    }

    #[test]
    fn a_header_checksum_is_checked() {
        let z = gz(b"{\"a\":1}\n");
        assert_eq!(z[3], 0, "a plain header");
        let good = with_header_crc(&z, None);
        assert_eq!(gunzip(&good, 1 << 20).unwrap(), b"{\"a\":1}\n");
        let right = u16::from_le_bytes([good[10], good[11]]);
        let bad = with_header_crc(&z, Some(right ^ 1));
        let e = gunzip(&bad, 1 << 20).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(format!("{e:?}").contains("header checksum"), "{e:?}");
        // Cut inside the header checksum: incomplete, then refused as truncated.
        assert_eq!(gunzip(&good[..11], 1 << 20).unwrap_err().status(), 400);
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
    fn any_split_of_the_input_gives_the_same_output() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut z = gz(&data[..300_000]);
        z.extend(gz(&data[300_000..]));
        for step in [1, 7, 4096, z.len()] {
            let mut g = Gunzip::new();
            let mut out = Vec::with_capacity(1000);
            for chunk in z.chunks(step) {
                g.push(chunk);
                while g.run(&mut out).unwrap() == Progress::NeedSpace {
                    out.reserve_exact(out.capacity());
                }
            }
            g.finish().unwrap();
            assert!(out == data, "step {step}");
        }
    }

    #[test]
    fn output_stays_within_the_buffer() {
        let z = gz(&vec![0u8; 10 << 20]);
        let mut g = Gunzip::new();
        g.push(&z);
        let mut out = Vec::with_capacity(4096);
        assert_eq!(g.run(&mut out).unwrap(), Progress::NeedSpace);
        assert_eq!(out.len(), 4096);
        assert_eq!(out.capacity(), 4096);
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
