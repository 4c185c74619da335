//! A fault-injecting HTTP/1.1 proxy between flr and the test S3 server.
//!
//! Every request flr sends is parsed (request line, headers, a body framed
//! by `Content-Length` or chunked) and sent on to the server over one
//! upstream connection per client connection, keep-alive on both sides.
//! A fraction of requests, chosen by a seeded roll of each request's
//! number (so a run's mix of faults is reproducible from its seed), is
//! instead:
//! - answered `500 InternalError` or `503 SlowDown` without reaching the
//!   server;
//! - cut off: the connection is closed before the request is sent on;
//! - cut off after the server has acted: the response is read from the
//!   server and the connection closed midway through it (half its body,
//!   or half its head when it has none), so flr never learns that a PUT
//!   or DELETE landed and must retry something already done;
//! - delayed before it is sent on.
//!
//! The proxy counts every fault it injected and logs every exchange. It
//! can also freeze: after a given number of exchanges that match a rule
//! (say, the first pack PUT answered), every later request is held
//! unanswered, so a test can kill flr at an exact point of its work; held
//! requests are dropped, never sent on, when the proxy thaws.
//!
//! `Expect: 100-continue` is answered by the proxy itself (and stripped
//! before the request goes on), so a client that waits for it before
//! sending its body never stalls on the proxy.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What the proxy did to one request instead of passing it through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    Status500,
    Status503,
    ResetBeforeForward,
    ResetMidResponse,
    Delay,
}

/// How often each fault happens, in requests per thousand, and the seed
/// of the rolls.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    pub seed: u64,
    pub status_500: u32,
    pub status_503: u32,
    pub reset_before_forward: u32,
    pub reset_mid_response: u32,
    pub delay: u32,
    pub delay_for: Duration,
}

impl FaultPlan {
    /// No faults: a plain proxy (for counting requests).
    pub fn none() -> FaultPlan {
        FaultPlan::default()
    }

    /// Every kind of fault at `per_mille` each, short delays.
    pub fn mixed(seed: u64, per_mille: u32) -> FaultPlan {
        FaultPlan {
            seed,
            status_500: per_mille,
            status_503: per_mille,
            reset_before_forward: per_mille,
            reset_mid_response: per_mille,
            delay: per_mille,
            delay_for: Duration::from_millis(250),
        }
    }

    /// The fault for request number `n`, if any.
    fn roll(&self, n: u64) -> Option<Fault> {
        let mut r = (splitmix(self.seed ^ splitmix(n)) % 1000) as u32;
        for (share, fault) in [
            (self.status_500, Fault::Status500),
            (self.status_503, Fault::Status503),
            (self.reset_before_forward, Fault::ResetBeforeForward),
            (self.reset_mid_response, Fault::ResetMidResponse),
            (self.delay, Fault::Delay),
        ] {
            if r < share {
                return Some(fault);
            }
            r -= share;
        }
        None
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One request as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub query: String,
    /// The server's status, if the request reached it and it answered.
    pub status: Option<u16>,
    /// The fault injected, if any.
    pub fault: Option<Fault>,
    /// Bytes of the request body.
    pub body_len: u64,
    /// Whether the client received the whole response.
    pub delivered: bool,
}

impl Exchange {
    /// A request that reached the server and that it answered with 2xx.
    pub fn succeeded_upstream(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

type Rule = Box<dyn Fn(&Exchange) -> bool + Send + Sync>;

struct Freeze {
    rule: Rule,
    /// Matching exchanges still to pass before the proxy freezes.
    left: u64,
}

struct Shared {
    upstream: u16,
    plan: Mutex<FaultPlan>,
    requests: AtomicU64,
    log: Mutex<Vec<Exchange>>,
    freeze: Mutex<Option<Freeze>>,
    frozen: AtomicBool,
    stop: AtomicBool,
}

/// A running proxy on a loopback port; stops accepting on drop.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy in front of the server on `upstream`.
    pub fn start(upstream: u16, plan: FaultPlan) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy's port");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new(plan),
            requests: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            freeze: Mutex::new(None),
            frozen: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let acceptor = thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let s = s.clone();
                        thread::spawn(move || serve(client, &s));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment that points flr at the server through this proxy.
    pub fn env(&self) -> Vec<(String, String)> {
        crate::s3::env_for(&self.endpoint())
    }

    /// Replaces the fault plan (request numbers go on counting).
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.shared.plan.lock().unwrap() = plan;
    }

    /// Every exchange so far, in the order they ended.
    pub fn log(&self) -> Vec<Exchange> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Forgets the exchanges logged so far.
    pub fn clear_log(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// Faults injected so far, by kind.
    pub fn injected(&self) -> BTreeMap<Fault, u64> {
        let mut out = BTreeMap::new();
        for e in self.shared.log.lock().unwrap().iter() {
            if let Some(f) = e.fault {
                *out.entry(f).or_insert(0) += 1;
            }
        }
        out
    }

    /// All faults injected so far.
    pub fn injected_total(&self) -> u64 {
        self.injected().values().sum()
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Holds every request that arrives after `n` exchanges matching
    /// `rule` have ended.
    pub fn freeze_after(&self, n: u64, rule: impl Fn(&Exchange) -> bool + Send + Sync + 'static) {
        *self.shared.freeze.lock().unwrap() = Some(Freeze {
            rule: Box::new(rule),
            left: n,
        });
    }

    pub fn is_frozen(&self) -> bool {
        self.shared.frozen.load(Ordering::Relaxed)
    }

    /// Waits until the proxy has frozen; false after `timeout`.
    pub fn wait_frozen(&self, timeout: Duration) -> bool {
        let started = Instant::now();
        while !self.is_frozen() {
            if started.elapsed() > timeout {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Lets held and later requests through again, and drops the rule.
    pub fn thaw(&self) {
        *self.shared.freeze.lock().unwrap() = None;
        self.shared.frozen.store(false, Ordering::Relaxed);
    }

    /// A summary for test output: requests, and faults by kind.
    pub fn summary(&self) -> String {
        let mut by_method = BTreeMap::new();
        for e in self.shared.log.lock().unwrap().iter() {
            *by_method.entry(e.method.clone()).or_insert(0u64) += 1;
        }
        format!(
            "{} requests ({by_method:?}), faults injected: {:?}",
            self.requests(),
            self.injected()
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// A parsed request or response head: the first line and the headers.
struct Head {
    line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.line);
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// Reads a head; `None` at a clean end of the stream before it.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut line = String::new();
    // Tolerate blank lines between messages.
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let first = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "end of stream inside a head",
            ));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad header {h:?}"))
        })?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some(Head {
        line: first,
        headers,
    }))
}

/// Reads a body as framed on the wire (chunked bodies keep their
/// framing, so they are sent on unchanged).
fn read_body(r: &mut impl BufRead, head: &Head, bodyless: bool) -> std::io::Result<Vec<u8>> {
    if bodyless {
        return Ok(Vec::new());
    }
    if head.has_token("transfer-encoding", "chunked") {
        let mut raw = Vec::new();
        loop {
            let mut size_line = String::new();
            if r.read_line(&mut size_line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            raw.extend_from_slice(size_line.as_bytes());
            let size =
                usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t)? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    raw.extend_from_slice(t.as_bytes());
                    if t.trim().is_empty() {
                        return Ok(raw);
                    }
                }
            }
            let at = raw.len();
            raw.resize(at + size + 2, 0);
            r.read_exact(&mut raw[at..])?;
        }
    }
    match head.header("content-length") {
        Some(n) => {
            let n: usize = n
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let mut body = vec![0; n];
            r.read_exact(&mut body)?;
            Ok(body)
        }
        None => Ok(Vec::new()),
    }
}

fn status_of(head: &Head) -> u16 {
    head.line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// An S3-style error answer.
fn error_response(status: u16) -> Vec<u8> {
    let (reason, code) = if status == 503 {
        ("Service Unavailable", "SlowDown")
    } else {
        ("Internal Server Error", "InternalError")
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The upstream connection of one client connection.
struct Upstream {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Upstream {
    fn connect(port: u16) -> std::io::Result<Upstream> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        Ok(Upstream {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }
}

/// Serves one client connection until it closes or a fault cuts it.
fn serve(client: TcpStream, shared: &Shared) {
    let _ = client.set_nodelay(true);
    let Ok(mut writer) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(client);
    let mut upstream: Option<Upstream> = None;
    loop {
        let mut head = match read_head(&mut reader) {
            Ok(Some(h)) => h,
            _ => return,
        };
        let mut parts = head.line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target.clone(), String::new()),
        };
        if head.has_token("expect", "100-continue") {
            head.headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case("expect"));
            if writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                return;
            }
        }
        let Ok(body) = read_body(&mut reader, &head, false) else {
            return;
        };
        let client_closes = head.has_token("connection", "close");
        let n = shared.requests.fetch_add(1, Ordering::Relaxed);
        let mut exchange = Exchange {
            method: method.clone(),
            path,
            query,
            status: None,
            fault: None,
            body_len: body.len() as u64,
            delivered: false,
        };

        // Held while frozen. A held request is never sent on: the test
        // kills its sender meanwhile, and a request of a dead process
        // landing later would blur what the killed run had done.
        if shared.frozen.load(Ordering::Relaxed) {
            while shared.frozen.load(Ordering::Relaxed) && !shared.stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(10));
            }
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }

        let fault = shared.plan.lock().unwrap().roll(n);
        exchange.fault = fault;
        let keep = match fault {
            Some(f @ (Fault::Status500 | Fault::Status503)) => {
                let status = if f == Fault::Status500 { 500 } else { 503 };
                exchange.delivered = writer.write_all(&error_response(status)).is_ok();
                exchange.delivered
            }
            Some(Fault::ResetBeforeForward) => {
                let _ = writer.shutdown(Shutdown::Both);
                false
            }
            Some(Fault::ResetMidResponse | Fault::Delay) | None => {
                if fault == Some(Fault::Delay) {
                    let pause = shared.plan.lock().unwrap().delay_for;
                    thread::sleep(pause);
                }
                forward(
                    shared,
                    &mut upstream,
                    &head,
                    &body,
                    &method,
                    &mut writer,
                    fault == Some(Fault::ResetMidResponse),
                    &mut exchange,
                )
            }
        };
        record(shared, exchange);
        if !keep || client_closes {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Sends one request to the server and its answer back (or half of it,
/// when `cut`). Returns whether the client connection stays usable.
#[allow(clippy::too_many_arguments)]
fn forward(
    shared: &Shared,
    upstream: &mut Option<Upstream>,
    head: &Head,
    body: &[u8],
    method: &str,
    client: &mut TcpStream,
    cut: bool,
    exchange: &mut Exchange,
) -> bool {
    let mut request = head.encode();
    request.extend_from_slice(body);
    // A kept-alive upstream connection the server has closed fails on
    // first use: try once more on a fresh one. The request is written on
    // a thread of its own while the answer is read, because the server
    // may answer before it has read the body (a 412 to a create-only PUT
    // of an object it holds) and close the connection under the write.
    let mut answer = None;
    for _ in 0..2 {
        if upstream.is_none() {
            match Upstream::connect(shared.upstream) {
                Ok(u) => *upstream = Some(u),
                Err(_) => break,
            }
        }
        let u = upstream.as_mut().unwrap();
        let request = &request[..];
        let (got, wrote) = thread::scope(|s| {
            let mut w = &u.writer;
            let writing = s.spawn(move || w.write_all(request).and_then(|_| w.flush()));
            let got = read_head(&mut u.reader).and_then(|head| {
                let head =
                    head.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
                let status = status_of(&head);
                let bodyless = method == "HEAD"
                    || status == 204
                    || status == 304
                    || (100..200).contains(&status);
                let body = read_body(&mut u.reader, &head, bodyless)?;
                Ok((head, body))
            });
            if got.is_err() {
                // Unblock a write the server no longer reads.
                let _ = u.writer.shutdown(Shutdown::Both);
            }
            (got, writing.join().unwrap_or(Ok(())))
        });
        match got {
            Ok(a) => {
                if wrote.is_err() {
                    // Answered early; the connection is spent.
                    *upstream = None;
                }
                answer = Some(a);
                break;
            }
            Err(_) => *upstream = None,
        }
    }
    let Some((resp_head, resp_body)) = answer else {
        // The server is unreachable: the client sees a reset.
        return false;
    };
    exchange.status = Some(status_of(&resp_head));
    // Before the client hears the answer, so that nothing it sends next
    // slips past a freeze this exchange sets off.
    note_freeze(shared, exchange);
    if resp_head.has_token("connection", "close") {
        *upstream = None;
    }
    let head_bytes = resp_head.encode();
    if cut {
        let partial = if resp_body.is_empty() {
            &head_bytes[..head_bytes.len() / 2]
        } else {
            &head_bytes[..]
        };
        let _ = client.write_all(partial);
        if !resp_body.is_empty() {
            let _ = client.write_all(&resp_body[..resp_body.len() / 2]);
        }
        let _ = client.flush();
        return false;
    }
    let ok = client
        .write_all(&head_bytes)
        .and_then(|_| client.write_all(&resp_body))
        .and_then(|_| client.flush())
        .is_ok();
    exchange.delivered = ok;
    ok && !resp_head.has_token("connection", "close")
}

fn record(shared: &Shared, exchange: Exchange) {
    if exchange.status.is_none() {
        note_freeze(shared, &exchange);
    }
    shared.log.lock().unwrap().push(exchange);
}

/// Counts `exchange` against the freeze rule, freezing when it is due.
fn note_freeze(shared: &Shared, exchange: &Exchange) {
    let mut freeze = shared.freeze.lock().unwrap();
    if let Some(f) = freeze.as_mut() {
        if (f.rule)(exchange) {
            f.left = f.left.saturating_sub(1);
        }
        if f.left == 0 {
            shared.frozen.store(true, Ordering::Relaxed);
        }
    }
}
