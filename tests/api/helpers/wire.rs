//! Raw-wire tools: what the server sends until it closes a connection,
//! hand-made HTTP/2 bytes, and a codec that sends message bytes as they are.

/// Whether the server closes `stream` (reading until it does) within 15 s.
pub async fn closed_by_server(stream: impl tokio::io::AsyncRead + Unpin) -> bool {
    read_until_closed(stream).await.is_some()
}

/// Everything the server sends on `stream` until it closes it, if it does
/// within 15 s.
pub async fn read_until_closed(mut stream: impl tokio::io::AsyncRead + Unpin) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), read_to_end).await.ok()?;
    Some(received)
}

/// HTTP/2 bytes as no client library would send them.
pub mod raw_h2 {
    /// An HTTP/2 frame.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let [_, a, b, c] = (payload.len() as u32).to_be_bytes();
        let mut bytes = vec![a, b, c, kind, flags];
        bytes.extend(stream.to_be_bytes());
        bytes.extend(payload);
        bytes
    }

    /// The client preface and an empty SETTINGS frame: connected, no request.
    pub fn opening() -> Vec<u8> {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, 0, &[]));
        bytes
    }

    /// [`opening`], then a whole request on stream 1 (`GET /` from HPACK's
    /// static table, END_HEADERS and END_STREAM).
    pub fn opening_and_request() -> Vec<u8> {
        let mut bytes = opening();
        bytes.extend(frame(0x1, 0x4 | 0x1, 1, &[0x82, 0x86, 0x84]));
        bytes
    }

    /// A HEADERS frame on stream 3 announcing three bytes, of which one is
    /// sent: a header block begun and never finished.
    pub fn stalled_headers() -> Vec<u8> {
        let mut bytes = frame(0x1, 0x4, 3, &[0x82, 0x86, 0x84]);
        bytes.truncate(bytes.len() - 2);
        bytes
    }

    /// The GOAWAY frames (last stream id, error code) among the frames the
    /// server sent, `bytes` (a server sends no preface but its SETTINGS).
    pub fn goaways(mut bytes: &[u8]) -> Vec<(u32, u32)> {
        let mut found = Vec::new();
        while bytes.len() >= 9 {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let Some(payload) = bytes.get(9..9 + len) else { break };
            if bytes[3] == 0x7 && len >= 8 {
                let word = |at: usize| u32::from_be_bytes(payload[at..at + 4].try_into().unwrap());
                found.push((word(0) & 0x7fff_ffff, word(4)));
            }
            bytes = &bytes[9 + len..];
        }
        found
    }
}

/// Sends and receives message bytes as they are, so a test can send what no
/// generated client would.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut bytes = vec![0; prost::bytes::Buf::remaining(src)];
        prost::bytes::Buf::copy_to_slice(src, &mut bytes);
        Ok(Some(bytes))
    }
}
