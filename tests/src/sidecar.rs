//! The `wiproxy` binary run as a separate process, as in a pod: a clean environment, its log
//! captured to a file, its memory readable from /proc.

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A binary built next to the running executable (`target/<profile>/NAME`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let mut dir = exe.parent().expect("executable folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build it first with `cargo build --workspace --bins`", path.display());
    path
}

/// A free loopback port (bound and released; good enough on a test machine).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub struct Sidecar {
    child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts `wiproxy` with exactly `env` (plus listen addresses when it names none) and waits
    /// for its admin port.
    pub fn start(env: &[(String, String)]) -> Self {
        Self::start_with(env, &[])
    }

    /// As `start`, with extra command-line arguments.
    pub fn start_with(env: &[(String, String)], args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("wiproxy.log");
        // Listen addresses given in `env` are kept (an unspecified IP is reached on loopback);
        // missing ones get free loopback ports.
        let address = |name: &str| -> SocketAddr {
            let given = env.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.parse::<SocketAddr>().ok());
            match given {
                Some(addr) if addr.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
                Some(addr) => addr,
                None => SocketAddr::from(([127, 0, 0, 1], free_port())),
            }
        };
        let proxy = address("WIPROXY_LISTEN");
        let admin = address("WIPROXY_ADMIN_LISTEN");
        let mut command = Command::new(binary("wiproxy"));
        command
            .env_clear()
            .env("WIPROXY_LISTEN", proxy.to_string())
            .env("WIPROXY_ADMIN_LISTEN", admin.to_string())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = command.spawn().expect("start wiproxy");
        let mut sidecar = Self { child, proxy, admin, log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(admin).is_err() {
            if let Ok(Some(status)) = sidecar.child.try_wait() {
                panic!("wiproxy exited with {status}: {}", sidecar.log());
            }
            assert!(Instant::now() < deadline, "wiproxy did not open its admin port: {}", sidecar.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        sidecar
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Asks for a graceful stop and waits for the exit status.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Panics when any of `secrets` appears in the log.
    pub fn assert_log_free_of(&self, secrets: &[String]) {
        let log = self.log();
        for secret in secrets {
            assert!(!log.contains(secret.as_str()), "a token appears in the sidecar's log");
            // Tokens are JWTs; their signature part alone must not appear either.
            if let Some(signature) = secret.rsplit('.').next().filter(|s| s.len() > 20) {
                assert!(!log.contains(signature), "a token signature appears in the sidecar's log");
            }
        }
    }
}

/// Runs `wiproxy` with exactly `env` (plus free listen addresses) where it must refuse to start:
/// its exit code and what it wrote to stderr, or `None` for the code when it was still running
/// after `within` (then it is killed).
pub fn run_to_exit(env: &[(String, String)], within: Duration) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("wiproxy.log");
    let mut child = Command::new(binary("wiproxy"))
        .env_clear()
        .env("WIPROXY_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("WIPROXY_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start wiproxy");
    let deadline = Instant::now() + within;
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
