//! Raw HTTP/1.1 over TLS, for what hyper would never send: odd framing, pipelined
//! requests, heads written a few bytes at a time. An exchange writes bytes, then reads
//! until the gate closes the connection or stays quiet for a while, and tells which.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::client::{Client, RawResponse};

/// What came back on one connection.
#[derive(Debug)]
pub struct Exchange {
    /// Every byte the gate sent.
    pub bytes: Vec<u8>,
    /// Whether the gate closed the connection (EOF or reset) before the quiet period.
    pub closed: bool,
}

impl Exchange {
    /// Every response in `bytes`, in order (bodies framed by Content-Length or
    /// chunked encoding; a response without either takes the rest).
    pub fn responses(&self) -> Vec<RawResponse> {
        let mut out = Vec::new();
        let mut rest: &[u8] = &self.bytes;
        while let Some(end) = find(rest, b"\r\n\r\n") {
            let head = &rest[..end + 4];
            let parsed = RawResponse::parse(head);
            let after = &rest[end + 4..];
            let chunked = parsed
                .header_values("transfer-encoding")
                .iter()
                .any(|v| v.eq_ignore_ascii_case("chunked"));
            let length = parsed
                .header_values("content-length")
                .first()
                .and_then(|v| v.parse::<usize>().ok());
            let (body, used) = if chunked {
                dechunk(after)
            } else if let Some(n) = length {
                let n = n.min(after.len());
                (after[..n].to_vec(), n)
            } else {
                (after.to_vec(), after.len())
            };
            out.push(RawResponse { body, ..parsed });
            rest = &after[used..];
        }
        out
    }

    pub fn statuses(&self) -> Vec<u16> {
        self.responses().iter().map(|r| r.status).collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decode a chunked body; returns it and how many bytes it took (all when cut short).
fn dechunk(mut data: &[u8]) -> (Vec<u8>, usize) {
    let total = data.len();
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else {
            return (body, total);
        };
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_owned();
        let Ok(size) = usize::from_str_radix(&size_text, 16) else {
            return (body, total);
        };
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers end with an empty line.
            let used = find(data, b"\r\n").map_or(data.len(), |i| i + 2);
            return (body, total - data.len() + used);
        }
        if data.len() < size + 2 {
            body.extend_from_slice(&data[..size.min(data.len())]);
            return (body, total);
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Read until EOF or error (closed), or until nothing arrives for `quiet`.
pub async fn read_until_closed_or_quiet(
    stream: &mut TlsStream<TcpStream>,
    quiet: Duration,
) -> Exchange {
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Exchange {
                    bytes,
                    closed: true,
                };
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => {
                return Exchange {
                    bytes,
                    closed: false,
                };
            }
        }
    }
}

/// Write `request` on a fresh TLS connection (ALPN `http/1.1`) and read the answer.
/// A write the gate cuts short (it may close before reading everything) is fine.
pub async fn exchange(client: &Client, request: &[u8], quiet: Duration) -> Exchange {
    let mut stream = client
        .try_connect(&[b"http/1.1"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = stream.write_all(request).await;
    let _ = stream.flush().await;
    read_until_closed_or_quiet(&mut stream, quiet).await
}

/// `Host: localhost:PORT` for raw requests to `client`'s gate.
pub fn host_header(client: &Client) -> String {
    format!("Host: localhost:{}\r\n", client.addr.port())
}
