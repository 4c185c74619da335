//! A blocking HTTP/1.1 client for the daemon's Unix socket: one request
//! per connection, enough for the command line and tests. On Windows
//! there is no Unix socket: [`request`] fails with "not supported", and
//! the daemon is reached on its TCP listener with its bearer token
//! ([`exchange`] over a `TcpStream`, as `flr export --to` does).

use std::io::{self, Read, Write};
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::path::Path;
#[cfg(unix)]
use std::time::Duration;

/// How long a request may take before the client gives up; the daemon
/// answers every call in well under this, mounting included.
#[cfg(unix)]
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `error` message of a failed call, or the raw body.
    pub fn error_message(&self) -> String {
        match self.json().get("error").and_then(|e| e.as_str()) {
            Some(m) => m.to_string(),
            None => self.body.trim().to_string(),
        }
    }
}

/// Whether a daemon answers on `socket`.
pub fn is_running(socket: &Path) -> bool {
    request(socket, "GET", "/health", None).is_ok_and(|r| r.status == 200)
}

/// Sends one request with an optional JSON body and reads the whole
/// response.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> io::Result<Response> {
    let raw = body.map(|b| b.to_string());
    request_raw(socket, method, path, raw.as_deref())
}

/// Like [`request`] with a body sent as is (tests send malformed JSON).
pub fn request_raw(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> io::Result<Response> {
    #[cfg(not(unix))]
    {
        let _ = (socket, method, path, body);
        Err(crate::host::unsupported(
            "the daemon's Unix control socket (reach it on its TCP listener with the bearer token)",
        ))
    }
    #[cfg(unix)]
    {
        request_unix(socket, method, path, body)
    }
}

#[cfg(unix)]
fn request_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    exchange(&mut stream, method, path, "", body)
}

/// One request on an open connection: `headers` are extra header lines,
/// each ending in CRLF; the body, if any, is JSON.
pub fn exchange<S: Read + Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<&str>,
) -> io::Result<Response> {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: flr\r\nConnection: close\r\n{headers}");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    stream.write_all(req.as_bytes())?;
    read_response(stream)
}

/// Reads a whole response (the server closes the connection after it).
pub fn read_response<S: Read>(stream: &mut S) -> io::Result<Response> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("response has no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("response has no status line"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("malformed chunked body"))?;
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_responses_parse() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "{}"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
    }
}
