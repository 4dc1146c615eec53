//! A throw-away `redis-server` (Debian's package, installed by `.ci/run`) on loopback for
//! tests of the shared counter store: a free port, no persistence, stopped with the test
//! process (see [`crate::Supervised`]). It can be killed and restarted on the same port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Supervised, free_port, log_tail};

/// A `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    server: Option<Supervised>,
    port: u16,
    /// With TLS: the TLS port (`port` stays plain, for readiness checks and [`Self::command`]).
    tls: Option<(u16, PathBuf, PathBuf)>,
    password: Option<String>,
    /// With an ACL file: the user [`Self::command`] and the readiness check log in as.
    user: Option<String>,
    aclfile: Option<PathBuf>,
    dir: tempfile::TempDir,
    starts: u32,
}

/// The `redis-server` binary: `$REDIS_SERVER`, else `redis-server` on `PATH`.
pub fn redis_server_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REDIS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .context("redis-server is not installed: `apt-get install redis-server` (.ci/run does)")
}

impl RedisServer {
    /// Starts a server without a password.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// Starts a server that requires `password` (for the `default` user).
    pub fn start_with(password: Option<&str>) -> Result<Self> {
        let mut dir = tempfile::tempdir().context("a scratch directory for redis")?;
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut r = Self {
                server: None,
                port,
                tls: None,
                password: password.map(str::to_owned),
                user: None,
                aclfile: None,
                dir,
                starts: 0,
            };
            match r.restart() {
                Ok(()) => return Ok(r),
                Err(e) => {
                    last = Some(e);
                    dir = r.dir;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis did not start")))
    }

    /// Starts a server that also speaks TLS (on [`Self::tls_url`]) with this certificate
    /// and key (PEM); clients need no certificate.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let dir = tempfile::tempdir().context("a scratch directory for redis")?;
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::write(&cert, cert_pem)?;
        std::fs::write(&key, key_pem)?;
        let mut r = Self {
            server: None,
            port: free_port()?,
            tls: Some((free_port()?, cert, key)),
            password: None,
            user: None,
            aclfile: None,
            dir,
            starts: 0,
        };
        r.restart()?;
        Ok(r)
    }

    /// Starts a server with this ACL file (`--aclfile`); `user` and `password` are one of
    /// its users, for the readiness check and [`Self::command`].
    pub fn start_with_acl(acl: &str, user: &str, password: &str) -> Result<Self> {
        let dir = tempfile::tempdir().context("a scratch directory for redis")?;
        let file = dir.path().join("users.acl");
        std::fs::write(&file, acl)?;
        let mut r = Self {
            server: None,
            port: free_port()?,
            tls: None,
            password: Some(password.to_owned()),
            user: Some(user.to_owned()),
            aclfile: Some(file),
            dir,
            starts: 0,
        };
        r.restart()?;
        Ok(r)
    }

    /// `rediss://localhost:<tls port>` (TLS servers only).
    pub fn tls_url(&self) -> Option<String> {
        self.tls.as_ref().map(|(p, _, _)| format!("rediss://localhost:{p}"))
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>` (without the password).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM through the watchdog) and waits until the port is closed.
    pub fn kill(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop(Duration::from_secs(20));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// (Re)starts the server on its port, empty (no persistence), and waits for `PING`.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.starts += 1;
        let bin = redis_server_binary()?;
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &self.dir.path().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(file) = &self.aclfile {
            args.extend(["--aclfile".into(), file.display().to_string()]);
        } else if let Some(p) = &self.password {
            args.extend(["--requirepass".into(), p.clone()]);
        }
        if let Some((port, cert, key)) = &self.tls {
            args.extend([
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                cert.display().to_string(),
                "--tls-key-file".into(),
                key.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ]);
        }
        let log = self.dir.path().join(format!("redis-{}.log", self.starts));
        let mut server = Supervised::spawn("redis-server", &bin, &args, &log, None)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            server.check_running()?;
            if self.pings() {
                self.server = Some(server);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within 30 s; its log:\n{}", log_tail(&log, 20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn auth_line(&self) -> String {
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => format!("AUTH {u} {p}\r\n"),
            (None, Some(p)) => format!("AUTH {p}\r\n"),
            _ => String::new(),
        }
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut cmd = String::new();
        cmd.push_str(&self.auth_line());
        cmd.push_str("PING\r\n");
        if s.write_all(cmd.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 256];
        let mut got = String::new();
        while !got.contains("PONG") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        true
    }

    /// Sends one inline command and returns the raw reply (for assertions on keys).
    pub fn command(&self, line: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).context("connecting to redis")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut cmd = String::new();
        cmd.push_str(&self.auth_line());
        cmd.push_str(line);
        cmd.push_str("\r\nQUIT\r\n");
        s.write_all(cmd.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }
}
