//! Test helpers: a small HTTP/1.1 upstream, a raw HTTP/1.1 client that reports exactly
//! what the wire did (Connection: close, EOF, RST), and condition waits with deadlines.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub fn lo0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Waits until `cond` holds, polling every 10 ms; panics after `limit`.
pub async fn wait_until<F: FnMut() -> bool>(limit: Duration, what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `f` or panics after `limit`.
pub async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// An HTTP/1.1 keep-alive upstream. `/slow` answers after 100 ms; `/reset` resets the
/// connection (RST) after reading the request; anything else answers `hello` at once.
pub async fn start_upstream() -> SocketAddr {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(serve_upstream_conn(s));
        }
    });
    addr
}

async fn serve_upstream_conn(s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            match r.read_line(&mut h).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if h == "\r\n" {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        if path.starts_with("/reset") {
            let s = r.into_inner();
            let _ = s.set_zero_linger();
            drop(s);
            return;
        }
        if path.starts_with("/slow") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello";
        if r.get_mut().write_all(resp).await.is_err() {
            return;
        }
    }
}

/// A line echo server for tcp mode.
pub async fn start_line_echo() -> SocketAddr {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (rd, mut wr) = s.into_split();
                let mut rd = BufReader::new(rd);
                loop {
                    let mut line = String::new();
                    match rd.read_line(&mut line).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if wr.write_all(line.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub close: bool,
    pub body: Vec<u8>,
}

/// A raw HTTP/1.1 client on one connection.
pub struct H1 {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> io::Result<H1> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(H1 { s, buf: Vec::new() })
    }

    pub async fn send(&mut self, method: &str, path: &str) -> io::Result<()> {
        self.send_with(method, path, "").await
    }

    /// Like [`H1::send`], with extra header lines (each ending in `\r\n`).
    pub async fn send_with(&mut self, method: &str, path: &str, headers: &str) -> io::Result<()> {
        let req =
            format!("{method} {path} HTTP/1.1\r\nhost: test\r\n{headers}content-length: 0\r\n\r\n");
        self.s.write_all(req.as_bytes()).await
    }

    /// Reads one response. EOF before it is complete is `UnexpectedEof`; RST shows as
    /// `ConnectionReset`.
    pub async fn read_response(&mut self) -> io::Result<Resp> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, head.clone()))?;
        let mut len = 0usize;
        let mut close = false;
        for l in lines {
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if let Some(v) = lower.strip_prefix("connection:") {
                close |= v.split(',').any(|t| t.trim() == "close");
            }
        }
        while self.buf.len() < head_end + len {
            self.fill().await?;
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Ok(Resp {
            status,
            close,
            body,
        })
    }

    pub async fn request(&mut self, path: &str) -> io::Result<Resp> {
        self.send("GET", path).await?;
        self.read_response().await
    }

    async fn fill(&mut self) -> io::Result<()> {
        let mut b = [0u8; 4096];
        let n = self.s.read(&mut b).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&b[..n]);
        Ok(())
    }

    /// Waits for the server's close: Ok(()) on a clean EOF (FIN) with nothing unread.
    pub async fn expect_eof(&mut self) -> io::Result<()> {
        let mut b = [0u8; 64];
        match self.s.read(&mut b).await? {
            0 => Ok(()),
            n => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected bytes: {:?}", String::from_utf8_lossy(&b[..n])),
            )),
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// One request on a fresh connection; returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut c = H1::connect(addr).await.expect("connect");
    c.send(method, path).await.expect("send");
    let r = c.read_response().await.expect("response");
    (r.status, String::from_utf8_lossy(&r.body).to_string())
}

/// The drain token the tests start their agents with.
pub const DRAIN_TOKEN: &str = "test-drain-token";

/// `POST /drain` with the test drain token, as the injected preStop hook sends it.
pub async fn drain(admin: SocketAddr) -> (u16, String) {
    let mut c = H1::connect(admin).await.expect("connect");
    let header = format!("x-sluice-drain-token: {DRAIN_TOKEN}\r\n");
    c.send_with("POST", "/drain", &header).await.expect("send");
    let r = c.read_response().await.expect("response");
    (r.status, String::from_utf8_lossy(&r.body).to_string())
}

/// The value of an unlabelled or labelled sample in OpenMetrics text.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == sample).then(|| v.parse().ok()).flatten()
    })
}

/// A loopback port free now (bound then released), for a program started next to bind.
pub async fn free_port() -> SocketAddr {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// A port nothing listens on, for the whole run.
pub async fn dead_port() -> SocketAddr {
    // A privileged port nothing on a test machine listens on: tests only ever bind
    // ephemeral ports, so unlike a freed ephemeral port (once taken by another test's
    // server running beside this one, which answered 404 where "upstream down" expected
    // 502) it cannot come back to life during the run. Checked, not assumed.
    let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert!(
        tokio::net::TcpStream::connect(a).await.is_err(),
        "something listens on {a}: the tests need a port where nothing does"
    );
    a
}
