//! Telling HTTP/2 with prior knowledge from HTTP/1.1 by a connection's first bytes.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes tell HTTP/2's preface from anything else (HTTP/1.1), as
/// hyper-util's `auto` server does: the bytes read, and whether they are the preface. `None`:
/// the client closed first.
pub(super) async fn sniff<Io: AsyncRead + Unpin>(io: &mut Io) -> std::io::Result<Option<(Bytes, bool)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    loop {
        let n = io.read(&mut buf[len..]).await?;
        if n == 0 && len == 0 {
            return Ok(None);
        }
        len += n;
        let h2 = buf[..len] == H2_PREFACE[..len];
        if n == 0 || !h2 || len == H2_PREFACE.len() {
            return Ok(Some((Bytes::copy_from_slice(&buf[..len]), h2 && len == H2_PREFACE.len())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_preface_in_pieces_is_http2_and_anything_else_is_not() {
        // `chain` hands out its first part, then its second: the preface comes in two reads.
        let mut pieces = (&b"PRI * HTTP"[..]).chain(&b"/2.0\r\n\r\nSM\r\n\r\nrest"[..]);
        let (bytes, h2) = sniff(&mut pieces).await.expect("reads").expect("bytes");
        assert!(h2);
        assert_eq!(&bytes[..], &H2_PREFACE[..]);

        let (bytes, h2) = sniff(&mut &b"GET / HTTP/1.1\r\n"[..]).await.expect("reads").expect("bytes");
        assert!(!h2);
        assert_eq!(&bytes[..], b"GET / HTTP/1.1\r\n");
        // A prefix of the preface, then the end: not HTTP/2, and what came is kept.
        let (bytes, h2) = sniff(&mut &b"PRI *"[..]).await.expect("reads").expect("bytes");
        assert!(!h2);
        assert_eq!(&bytes[..], b"PRI *");
        assert!(sniff(&mut &b""[..]).await.expect("reads").is_none());
    }
}
