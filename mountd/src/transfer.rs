//! The sending side of an export to another host: `flr://HOST:PORT/DIR`
//! names a directory that host's `flr daemon` writes, reached through its
//! TCP listener with its bearer token.
//!
//! The exchange, one connection per call (the receiving routes live in
//! [`crate::daemon::receive`]):
//! 1. `POST /receive/check`: the target directory is allowed there, empty
//!    (unless overwrite) and has room; nothing is written;
//! 2. `POST /receive`: the receiver makes a hidden partial directory;
//! 3. `PUT /receive/{id}`: one tar stream (chunked, so memory stays
//!    bounded on both sides), unpacked into the partial directory as it
//!    arrives; both ends hash the stream's bytes with BLAKE3;
//! 4. `POST /receive/{id}/commit` with the sender's hash and byte count:
//!    the receiver compares them with its own and only then renames the
//!    entries into place. A mismatch, a broken stream or a `DELETE`
//!    removes the partial directory.
//!
//! The token only ever travels in the `Authorization` header: it is not
//! part of any message, log line or `Debug` output.

use std::io::{self, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::client::{self, Response};

/// How long connecting and each read or write may take. The receiver
/// answers a commit after renaming, which is quick; unpacking keeps pace
/// with the stream.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Bytes gathered before one HTTP chunk goes out.
const CHUNK: usize = 512 << 10;

/// A directory on another host's daemon.
#[derive(Clone)]
pub struct RemoteTarget {
    /// `HOST:PORT`.
    pub addr: String,
    /// An absolute directory on that host.
    pub dir: String,
    token: String,
}

impl std::fmt::Debug for RemoteTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.url())
    }
}

impl RemoteTarget {
    /// Parses `flr://HOST:PORT/DIR`; the token comes separately.
    pub fn parse(url: &str, token: String) -> Result<RemoteTarget, String> {
        let rest = url
            .strip_prefix("flr://")
            .ok_or_else(|| format!("{url} is not a flr://HOST:PORT/DIR address"))?;
        let (addr, dir) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!(
                "{url}: give the host and its daemon's port (flr://HOST:PORT/DIR)"
            ));
        }
        if dir.len() < 2 {
            return Err(format!(
                "{url}: give the directory on that host (flr://HOST:PORT/DIR)"
            ));
        }
        Ok(RemoteTarget {
            addr: addr.to_string(),
            dir: dir.to_string(),
            token,
        })
    }

    pub fn url(&self) -> String {
        format!("flr://{}{}", self.addr, self.dir)
    }

    fn connect(&self) -> io::Result<TcpStream> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name resolves to nothing");
        for a in self.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, TIMEOUT) {
                Ok(s) => {
                    s.set_read_timeout(Some(TIMEOUT))?;
                    s.set_write_timeout(Some(TIMEOUT))?;
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn auth(&self) -> String {
        format!("Authorization: Bearer {}\r\n", self.token)
    }

    /// One JSON call.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> io::Result<Response> {
        let mut s = self.connect()?;
        let body = body.map(|b| b.to_string());
        client::exchange(&mut s, method, path, &self.auth(), body.as_deref())
    }

    /// A `PUT` whose body `send` writes, sent chunked as it is written.
    /// When `send` fails the connection is dropped without the final
    /// chunk, which the receiver takes as a broken transfer.
    pub fn upload(
        &self,
        path: &str,
        send: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
    ) -> Result<Response> {
        let mut s = self
            .connect()
            .with_context(|| format!("cannot reach {}", self.addr))?;
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: flr\r\nConnection: close\r\n{}Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
            self.auth()
        );
        let sent = (|| -> Result<()> {
            s.write_all(head.as_bytes())?;
            let mut w = BufWriter::with_capacity(CHUNK, Chunked { inner: &mut s });
            send(&mut w)?;
            w.flush()?;
            drop(w);
            s.write_all(b"0\r\n\r\n")?;
            s.flush()?;
            Ok(())
        })();
        match sent {
            Ok(()) => Ok(client::read_response(&mut s)
                .with_context(|| format!("{} did not answer the transfer", self.addr))?),
            Err(e) => {
                // The receiver may have answered early, saying why.
                let _ = s.shutdown(std::net::Shutdown::Write);
                if let Ok(r) = client::read_response(&mut s) {
                    if !(200..300).contains(&r.status) {
                        bail!("{e:#}; {} answered: {}", self.addr, r.error_message());
                    }
                }
                Err(e)
            }
        }
    }
}

/// HTTP/1.1 chunked transfer coding: each write is one chunk.
struct Chunked<W: Write> {
    inner: W,
}

impl<W: Write> Write for Chunked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.inner, "{:x}\r\n", buf.len())?;
        self.inner.write_all(buf)?;
        self.inner.write_all(b"\r\n")?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes (BLAKE3) and counts what passes through it.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        }
    }

    /// The hash (hex) and the byte count.
    pub fn finish(self) -> (String, u64) {
        (self.hasher.finalize().to_hex().to_string(), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_mistakes_say_what_is_missing() {
        let t = RemoteTarget::parse("flr://backup-2:8474/srv/restore", "secret".into()).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.dir.as_str()),
            ("backup-2:8474", "/srv/restore")
        );
        assert_eq!(format!("{t:?}"), "flr://backup-2:8474/srv/restore");
        for (url, why) in [
            ("http://h:1/x", "not a flr://"),
            ("flr://h/x", "port"),
            ("flr://h:99999/x", "port"),
            ("flr://h:1", "directory"),
            ("flr://h:1/", "directory"),
        ] {
            let e = RemoteTarget::parse(url, String::new()).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn chunks_frame_each_write() {
        let mut out = Vec::new();
        {
            let mut c = Chunked { inner: &mut out };
            c.write_all(b"hello").unwrap();
            c.write_all(&[b'x'; 17]).unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("5\r\nhello\r\n11\r\n{}\r\n", "x".repeat(17))
        );
    }
}
