//! How far a client has got with its requests' headers, read off the bytes
//! it sends, so [`super::DeadlineStream`] knows when a deadline must run.
//!
//! A deadline runs while the server waits on the client for headers:
//!
//! - **HTTP/2** (gRPC and health listeners): from the accept until the first
//!   request's header block is complete (the preface, the SETTINGS frame,
//!   then a HEADERS frame and any CONTINUATIONs up to `END_HEADERS`); later,
//!   from the first byte of any frame header, and through a header block,
//!   until it is complete. Between frames nothing runs: a connection that
//!   has made a request may idle (keepalive and `--max-connection-age`
//!   bound it).
//! - **HTTP/1** (the metrics listener): from the accept, and again from each
//!   byte of a response the server writes, until a request head ends (a
//!   blank line after a request line: blank lines before one are skipped,
//!   as hyper skips them). So a keep-alive connection idle after its
//!   response is closed too. A client that opens with the HTTP/2 preface is
//!   refused: the listener serves HTTP/1 only.
//!
//! Only frame headers are read; payloads are skipped by length, so this
//! costs a few comparisons per read.

/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 frame types and flags this reads.
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const RST_STREAM: u8 = 0x3;
const END_HEADERS: u8 = 0x4;

/// Which protocol a listener speaks, as far as telling where headers end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2 with prior knowledge (gRPC).
    Http2,
    /// HTTP/1.1, or HTTP/2 if the client opens with its preface.
    Http1,
}

/// Where an HTTP/2 byte stream is: how many bytes of the preface are left,
/// then frame headers and the payloads they announce.
#[derive(Debug, Clone, Default)]
pub(crate) struct Frames {
    preface_left: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
    /// The flags of the frame whose payload is being skipped.
    flags: u8,
    /// The payload being skipped belongs to a HEADERS or CONTINUATION frame.
    in_header_frame: bool,
    /// A header block has begun and its `END_HEADERS` has not been seen.
    awaiting_end_headers: bool,
    /// Header blocks completed.
    pub blocks: u64,
    /// RST_STREAM frames begun (on a client's stream: the streams it reset).
    pub resets: u64,
}

impl Frames {
    /// A client's stream, starting with the preface.
    pub fn client() -> Self {
        Self { preface_left: PREFACE.len(), ..Self::default() }
    }

    /// A server's stream (no preface).
    pub fn server() -> Self {
        Self::default()
    }

    /// Reads `bytes`, the next ones of the stream.
    pub fn read(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.frame_done();
                }
            } else {
                let n = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 9 {
                    let [a, b, c, kind, flags, ..] = self.header;
                    self.header_len = 0;
                    self.flags = flags;
                    self.payload_left = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                    self.in_header_frame = kind == HEADERS || kind == CONTINUATION;
                    if kind == HEADERS {
                        self.awaiting_end_headers = true;
                    }
                    if kind == RST_STREAM {
                        self.resets += 1;
                    }
                    if self.payload_left == 0 {
                        self.frame_done();
                    }
                }
            }
        }
    }

    /// A frame (its header and payload) has been read whole.
    fn frame_done(&mut self) {
        if self.in_header_frame && self.flags & END_HEADERS != 0 && self.awaiting_end_headers {
            self.awaiting_end_headers = false;
            self.blocks += 1;
        }
        self.in_header_frame = false;
    }

    /// Whether the stream stops between two frames (or at its start).
    pub fn at_boundary(&self) -> bool {
        self.preface_left == 0 && self.header_len == 0 && self.payload_left == 0
    }

    /// Whether the client is part-way through something the server waits
    /// on: the preface, a frame header, or a header block.
    pub fn mid_headers(&self) -> bool {
        self.preface_left > 0
            || self.header_len > 0
            || (self.payload_left > 0 && self.in_header_frame)
            || self.awaiting_end_headers
    }
}

/// Where an HTTP/1 request stream is: between heads, or inside one.
#[derive(Debug, Clone, Default)]
pub(crate) struct Heads {
    /// The last bytes of the head being read, for finding `\r\n\r\n` (or
    /// `\n\n`) across reads.
    tail: [u8; 4],
    /// A head has begun (a byte other than CR or LF since the last ended).
    in_head: bool,
    /// Heads completed.
    pub heads: u64,
    /// The first bytes of the first head, to tell the HTTP/2 preface.
    opening: Vec<u8>,
}

impl Heads {
    /// Reads `bytes`, the next ones of the stream.
    pub fn read(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if !self.in_head {
                // Blank lines between requests are skipped (RFC 9112 2.2),
                // so they end nothing.
                if byte == b'\r' || byte == b'\n' {
                    continue;
                }
                self.in_head = true;
                self.tail = [0; 4];
            }
            if self.heads == 0 && self.opening.len() < 4 {
                self.opening.push(byte);
            }
            self.tail = [self.tail[1], self.tail[2], self.tail[3], byte];
            if self.tail == *b"\r\n\r\n" || self.tail[2..] == *b"\n\n" {
                self.heads += 1;
                self.in_head = false;
            }
        }
    }

    /// Whether the client opened with the HTTP/2 preface (`PRI * HTTP/2.0`).
    fn is_http2(&self) -> bool {
        self.opening.as_slice() == &PREFACE[..4]
    }
}

/// What a connection's client has sent, read as its listener's protocol.
#[derive(Debug)]
pub(crate) enum Progress {
    /// HTTP/2 frames.
    Http2(Frames),
    /// HTTP/1 heads.
    Http1(Heads),
}

/// What the deadline should do after a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Keep whatever deadline runs (or none).
    Keep,
    /// Start a deadline now, if none runs.
    Start,
    /// Headers are complete: stop the deadline.
    Stop,
    /// The client speaks what this listener does not serve: close it.
    Refuse,
}

impl Progress {
    /// Nothing read yet, on a listener speaking `protocol`.
    pub fn new(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Http2 => Self::Http2(Frames::client()),
            Protocol::Http1 => Self::Http1(Heads::default()),
        }
    }

    /// Reads the client's next `bytes`; says what the deadline should do.
    pub fn read(&mut self, bytes: &[u8]) -> Due {
        match self {
            Self::Http2(frames) => {
                frames.read(bytes);
                // The first request's deadline runs from the accept and is
                // never restarted; a later one starts at its first byte.
                match (frames.blocks, frames.mid_headers()) {
                    (0, _) => Due::Keep,
                    (_, true) => Due::Start,
                    (_, false) => Due::Stop,
                }
            }
            Self::Http1(heads) => {
                let before = heads.heads;
                heads.read(bytes);
                if heads.is_http2() {
                    Due::Refuse
                } else if heads.heads > before {
                    Due::Stop
                } else {
                    Due::Keep
                }
            }
        }
    }

    /// The server wrote a response's bytes: on HTTP/1 the client's next
    /// head is now awaited (a keep-alive connection must not idle forever).
    pub fn wrote(&self) -> Due {
        match self {
            Self::Http1(_) => Due::Start,
            Self::Http2(_) => Due::Keep,
        }
    }

    /// How many streams the client has reset (HTTP/2 only).
    pub fn resets(&self) -> u64 {
        match self {
            Self::Http2(frames) => frames.resets,
            Self::Http1(_) => 0,
        }
    }

    /// Whether no request's headers have been completed yet.
    pub fn before_first_request(&self) -> bool {
        match self {
            Self::Http2(frames) => frames.blocks == 0,
            Self::Http1(heads) => heads.heads == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame header: length, type, flags, stream 1.
    fn frame(len: usize, kind: u8, flags: u8) -> Vec<u8> {
        let [_, a, b, c] = (len as u32).to_be_bytes();
        vec![a, b, c, kind, flags, 0, 0, 0, 1]
    }

    /// The preface, an empty SETTINGS frame, and a request's header block
    /// in a HEADERS frame and a CONTINUATION.
    fn request() -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0, 0x4, 0));
        bytes.extend(frame(3, HEADERS, 0));
        bytes.extend([0x82, 0x86, 0x84]);
        bytes.extend(frame(1, CONTINUATION, END_HEADERS));
        bytes.push(0x41);
        bytes
    }

    #[test]
    fn a_header_block_completes_however_the_bytes_are_split() {
        let bytes = request();
        for chunk in 1..=bytes.len() {
            let mut progress = Progress::new(Protocol::Http2);
            let mut dues = Vec::new();
            for piece in bytes.chunks(chunk) {
                dues.push(progress.read(piece));
            }
            assert_eq!(dues.last(), Some(&Due::Stop), "split every {chunk} bytes");
            assert!(
                dues[..dues.len() - 1].iter().all(|due| *due == Due::Keep),
                "split every {chunk}: {dues:?}"
            );
            assert!(!progress.before_first_request());
        }
    }

    #[test]
    fn only_header_blocks_and_frame_headers_are_waited_on() {
        let mut progress = Progress::new(Protocol::Http2);
        assert_eq!(progress.read(&request()), Due::Stop);
        // A DATA frame's payload, part-way: not waited on.
        let mut data = frame(100, 0x0, 0);
        data.extend([0; 10]);
        assert_eq!(progress.read(&data), Due::Stop);
        assert_eq!(progress.read(&[0; 90]), Due::Stop);
        // Half a frame header starts the deadline; so does a HEADERS frame
        // without END_HEADERS, until its CONTINUATION ends the block.
        assert_eq!(progress.read(&frame(3, HEADERS, 0)[..4]), Due::Start);
        assert_eq!(progress.read(&frame(3, HEADERS, 0)[4..]), Due::Start);
        assert_eq!(progress.read(&[0x82, 0x86, 0x84]), Due::Start);
        assert_eq!(progress.read(&frame(0, CONTINUATION, END_HEADERS)), Due::Stop);
    }

    #[test]
    fn stream_resets_are_counted_however_the_bytes_are_split() {
        let mut progress = Progress::new(Protocol::Http2);
        progress.read(&request());
        let mut resets = Vec::new();
        for _ in 0..3 {
            resets.extend(frame(4, RST_STREAM, 0));
            resets.extend(8u32.to_be_bytes());
        }
        // A DATA frame whose payload looks like a frame header is skipped.
        let mut data = frame(9, 0x0, 0);
        data.extend(frame(4, RST_STREAM, 0));
        resets.extend(data);
        for byte in &resets {
            progress.read(std::slice::from_ref(byte));
        }
        assert_eq!(progress.resets(), 3);
    }

    #[test]
    fn http1_heads_end_at_a_blank_line_after_a_request_line() {
        let mut progress = Progress::new(Protocol::Http1);
        assert_eq!(progress.read(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), Due::Keep);
        assert_eq!(progress.read(b"\r"), Due::Keep);
        assert_eq!(progress.read(b"\n"), Due::Stop);
        assert_eq!(progress.wrote(), Due::Start);
        assert_eq!(progress.read(b"GET / HTTP/1.1\n\n"), Due::Stop);
        // Blank lines alone (before a request, or between two) end nothing:
        // hyper skips them and waits on.
        let mut progress = Progress::new(Protocol::Http1);
        assert_eq!(progress.read(b"\r\n\r\n\n\n\r\n"), Due::Keep);
        assert!(progress.before_first_request());
        assert_eq!(progress.read(b"GET / HTTP/1.1\r\n\r\n"), Due::Stop);
        assert_eq!(progress.read(b"\r\n\r\n"), Due::Keep);
    }

    #[test]
    fn http1_listeners_refuse_the_http2_preface() {
        for chunk in [1, 3, 24] {
            let mut progress = Progress::new(Protocol::Http1);
            let dues: Vec<_> = PREFACE.chunks(chunk).map(|piece| progress.read(piece)).collect();
            assert!(dues.contains(&Due::Refuse), "split every {chunk}: {dues:?}");
        }
        let mut progress = Progress::new(Protocol::Http1);
        assert_eq!(progress.read(b"PRIVATE / HTTP/1.1\r\n\r\n"), Due::Stop);
    }

    #[test]
    fn a_server_stream_has_boundaries_between_frames() {
        let mut frames = Frames::server();
        assert!(frames.at_boundary());
        frames.read(&frame(6, 0x4, 0)[..5]);
        assert!(!frames.at_boundary());
        frames.read(&frame(6, 0x4, 0)[5..]);
        frames.read(&[0; 5]);
        assert!(!frames.at_boundary());
        frames.read(&[0]);
        assert!(frames.at_boundary());
    }
}
