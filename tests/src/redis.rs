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

/// One `redis-server` process of a cluster or a Sentinel: started from arguments, checked
/// with `PING` on its port.
fn spawn_node(name: &str, args: Vec<String>, port: u16, dir: &std::path::Path) -> Result<Supervised> {
    let bin = redis_server_binary()?;
    let log = dir.join(format!("{name}.log"));
    let mut server = Supervised::spawn(name, &bin, &args, &log, None)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        server.check_running()?;
        if answers(port, "PING", "PONG") {
            return Ok(server);
        }
        if Instant::now() > deadline {
            bail!("{name} did not answer PING within 30 s; its log:\n{}", log_tail(&log, 20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether one inline command to 127.0.0.1:`port` gets a reply containing `want` (read
/// until it does: a Sentinel does not close on `QUIT`).
fn answers(port: u16, line: &str, want: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(format!("{line}\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    let mut got = String::new();
    while !got.contains(want) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    true
}

/// One inline command to 127.0.0.1:`port`; the raw reply.
fn raw_command(port: u16, line: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to redis")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\r\nQUIT\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `redis-cli` (Debian's `redis-tools`, a dependency of `redis-server`): `$REDIS_CLI`, else
/// next to `redis-server`.
pub fn redis_cli_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REDIS_CLI") {
        return Ok(PathBuf::from(p));
    }
    let server = redis_server_binary()?;
    let cli = server.with_file_name("redis-cli");
    if cli.is_file() { Ok(cli) } else { bail!("redis-cli is not installed: `apt-get install redis-tools`") }
}

/// A Redis Cluster of three masters (no replicas) on loopback, slots spread by
/// `redis-cli --cluster create`; stopped with the test process.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<(Supervised, u16)>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers and joins them; waits for `cluster_state:ok`
    /// on every node.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir().context("a scratch directory for redis")?;
        let mut nodes = Vec::new();
        for i in 0..3 {
            let (port, bus) = (free_port()?, free_port()?);
            let node_dir = dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir)?;
            let args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--cluster-port",
                &bus.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &node_dir.join("nodes.conf").display().to_string(),
                "--cluster-node-timeout",
                "5000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                &node_dir.display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            nodes.push((spawn_node(&format!("redis-cluster-{i}"), args, port, dir.path())?, port));
        }
        let mut create = std::process::Command::new(redis_cli_binary()?);
        create.arg("--cluster").arg("create");
        for (_, port) in &nodes {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out =
            create.args(["--cluster-replicas", "0", "--cluster-yes"]).output().context("redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cluster = Self { nodes, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cluster
            .ports()
            .iter()
            .all(|p| raw_command(*p, "CLUSTER INFO").is_ok_and(|r| r.contains("cluster_state:ok")))
        {
            if Instant::now() > deadline {
                bail!("the cluster did not reach cluster_state:ok within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(cluster)
    }

    /// The nodes' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|(_, p)| *p).collect()
    }

    /// `redis+cluster://127.0.0.1:<p1>,…` (every node as a seed).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.ports().iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// One inline command sent to node `i` (not redirected).
    pub fn command(&self, i: usize, line: &str) -> Result<String> {
        raw_command(self.nodes[i].1, line)
    }
}

/// One Redis master watched by one Sentinel (`redis-server --sentinel`) on loopback.
#[derive(Debug)]
pub struct RedisSentinel {
    /// The master.
    pub master: RedisServer,
    sentinel: Option<Supervised>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    /// The master's name at the Sentinel.
    pub const MASTER: &'static str = "toolgate";

    /// Starts a master and a Sentinel monitoring it; waits until the Sentinel names it.
    pub fn start() -> Result<Self> {
        let master = RedisServer::start()?;
        let dir = tempfile::tempdir().context("a scratch directory for the sentinel")?;
        let port = free_port()?;
        // Sentinel rewrites its configuration file: it must be a writable file.
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {} 127.0.0.1 {} 1\nsentinel down-after-milliseconds {} 5000\n",
                dir.path().display(),
                Self::MASTER,
                master.port(),
                Self::MASTER
            ),
        )?;
        let args = vec![conf.display().to_string(), "--sentinel".to_owned()];
        let sentinel = spawn_node("redis-sentinel", args, port, dir.path())?;
        let s = Self { master, sentinel: Some(sentinel), port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        let ask = format!("SENTINEL get-master-addr-by-name {}", Self::MASTER);
        while !answers(port, &ask, &s.master.port().to_string()) {
            if Instant::now() > deadline {
                bail!("the sentinel did not name the master within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(s)
    }

    /// `redis+sentinel://127.0.0.1:<sentinel port>/<master>`.
    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/{}", self.port, Self::MASTER)
    }

    /// Stops the Sentinel.
    pub fn stop_sentinel(&mut self) {
        if let Some(mut s) = self.sentinel.take() {
            s.stop(Duration::from_secs(20));
        }
    }
}
