//! `make reliability`: the attacks a hostile tenant or a noisy neighbour can make, against the
//! release binaries on loopback, with the fakes standing in for Google. Prints one table: cases
//! tried, panics, tokens leaked, peak RSS and connections held per attack, and exits non-zero
//! when a bound does not hold. Usage: `wiproxy-reliability RELEASE_DIR`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use wiproxy_tests::client::Http;
use wiproxy_tests::pki::TestCa;
use wiproxy_tests::sidecar::{free_port, Sidecar};
use wiproxy_tests::world::{World, FUNCTION_URL};

/// The short timeouts the attacks run under (flags and env), so the run stays within minutes.
const HEADER_TIMEOUT: u64 = 2;
const BODY_TIMEOUT: u64 = 2;
const IDLE_TIMEOUT: u64 = 5;
const MAX_CONNECTIONS: usize = 512;
const MIB: f64 = 1024.0 * 1024.0;

struct Row {
    attack: &'static str,
    cases: u64,
    panics: u64,
    leaked: u64,
    peak_rss: f64,
    held: String,
    verdict: Result<String, String>,
}

/// A process's memory and file descriptors from /proc.
struct Proc(u32);

impl Proc {
    fn status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0)).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    }

    /// Resets the peak (VmHWM) to the current RSS, so each attack reads its own peak.
    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.0), "5");
    }

    fn peak_mib(&self) -> f64 {
        self.status("VmHWM:") as f64 * 1024.0 / MIB
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.0)).map(|d| d.count()).unwrap_or(0)
    }
}

/// The webhook, served from files, its log in `log`.
struct Webhook {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Webhook {
    fn start(
        bin: &Path,
        dir: &Path,
        cert: &Path,
        key: &Path,
        fd_limit: Option<u64>,
        name: &str,
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.join(format!("{name}.log"));
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let command = format!(
            "{limit}exec {bin} serve --listen 127.0.0.1:{port} --admin-listen 127.0.0.1:{admin} \
             --tls-cert-file {cert} --tls-key-file {key} --cluster-file {cluster} --policy-file {policy} \
             --header-timeout {HEADER_TIMEOUT} --body-timeout {BODY_TIMEOUT} --idle-timeout {IDLE_TIMEOUT} \
             --max-connections {MAX_CONNECTIONS} --log-format text",
            limit = fd_limit.map(|n| format!("ulimit -n {n}; ")).unwrap_or_default(),
            bin = bin.display(),
            admin = admin.port(),
            cert = cert.display(),
            key = key.display(),
            cluster = root.join("webhook/tests/golden/cluster.yaml").display(),
            policy = root.join("examples/policy.yaml").display(),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting wiproxy-webhook")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("wiproxy-webhook did not listen: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, addr, admin, log })
    }

    fn proc(&self) -> Proc {
        Proc(self.child.id())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn tls_connect(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await?)
}

/// Writes `bytes`, then reads until the server closes; the answer and how long it took.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    bytes: &[u8],
    guard: Duration,
) -> (String, Duration) {
    let started = Instant::now();
    let _ = stream.write_all(bytes).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(guard, stream.read_to_end(&mut answer)).await;
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

/// Sends one byte a second until the server closes the connection; how long it stayed open.
async fn slowloris<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, head: &[u8], guard: Duration) -> Duration {
    let started = Instant::now();
    let _ = stream.write_all(head).await;
    let mut buf = [0u8; 1024];
    while started.elapsed() < guard {
        let wrote = stream.write_all(b"a").await.and(stream.flush().await);
        if wrote.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            _ => {}
        }
    }
    started.elapsed()
}

fn review_body(padding: usize) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../webhook/tests/fixtures/review-pod.json");
    let mut review: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("review fixture")).expect("JSON");
    if padding > 0 {
        review["request"]["object"]["metadata"]["annotations"]["example.com/padding"] =
            serde_json::Value::String("x".repeat(padding));
    }
    serde_json::to_vec(&review).expect("serializes")
}

/// The largest review the webhook takes: a pod at every injection limit (32 upstreams, 31 app
/// containers, so 31 × (1 + 32) = 1,023 of the 1,024 added variables), padded with an
/// annotation to just under the 4 MiB body limit.
fn largest_review() -> Vec<u8> {
    let mut review: serde_json::Value = serde_json::from_slice(&review_body(0)).expect("JSON");
    let pod = &mut review["request"]["object"];
    let upstreams: Vec<String> =
        (0..32).map(|i| format!("u{i}=https://europe-west1-host-project.cloudfunctions.net/f{i}")).collect();
    pod["metadata"]["annotations"]["wiproxy.io/upstreams"] = upstreams.join(",").into();
    let app = pod["spec"]["containers"][0].clone();
    let containers: Vec<serde_json::Value> = (0..31)
        .map(|i| {
            let mut container = app.clone();
            container["name"] = format!("app-{i}").into();
            container
        })
        .collect();
    pod["spec"]["containers"] = containers.into();
    let size = serde_json::to_vec(&review).expect("serializes").len();
    review["request"]["object"]["metadata"]["annotations"]["example.com/padding"] =
        serde_json::Value::String("x".repeat(4 * 1024 * 1024 - size - 4096));
    serde_json::to_vec(&review).expect("serializes")
}

/// Whether an HTTP answer is a 200 carrying an allowed review with a patch.
fn patched(answer: &str) -> bool {
    answer.starts_with("HTTP/1.1 200") && answer.contains(r#""allowed":true"#) && answer.contains(r#""patch":"#)
}

fn post(body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /mutate HTTP/1.1\r\nHost: wiproxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

fn post_to(path: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: wiproxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// The pod review with `pointer` (under the pod) set to copies of `entry` filling the body to
/// just under the 4 MiB limit, or to `bytes` when given.
fn amplified_review(pointer: &str, entry: &str, bytes: Option<usize>) -> Vec<u8> {
    let mut review: serde_json::Value = serde_json::from_slice(&review_body(0)).expect("JSON");
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
    let parent = review["request"]["object"].pointer_mut(parent).and_then(|p| p.as_object_mut());
    parent.expect("the parent exists").insert(key.to_owned(), serde_json::json!([]));
    let size = serde_json::to_vec(&review).expect("serializes").len();
    let count = (bytes.unwrap_or(4 * 1024 * 1024 - 4096) - size) / (entry.len() + 1);
    let text = serde_json::to_string(&review).expect("serializes");
    let marker = format!("\"{}\":[]", pointer.rsplit('/').next().expect("a key"));
    text.replacen(&marker, &marker.replace("[]", &format!("[{}]", vec![entry; count].join(","))), 1).into_bytes()
}

/// A Deployment review for `/validate`, padded with `[]` in a field no one reads to just under
/// the 4 MiB limit.
fn padded_deployment_review() -> Vec<u8> {
    let review: serde_json::Value = serde_json::from_slice(&review_body(0)).expect("JSON");
    let pod = &review["request"]["object"];
    let mut deployment = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "orders-client", "namespace": "payments"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "orders-client"}},
                 "template": {"metadata": pod["metadata"], "spec": pod["spec"]}, "x-padding": []},
    });
    deployment["spec"]["template"]["metadata"]["ownerReferences"] = serde_json::Value::Null;
    let mut review = review.clone();
    review["request"]["kind"] = serde_json::json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    review["request"]["resource"] = serde_json::json!({"group": "apps", "version": "v1", "resource": "deployments"});
    review["request"]["name"] = "orders-client".into();
    review["request"]["object"] = deployment;
    let text = serde_json::to_string(&review).expect("serializes");
    let count = (4 * 1024 * 1024 - 4096 - text.len()) / 3;
    text.replacen("\"x-padding\":[]", &format!("\"x-padding\":[{}]", vec!["[]"; count].join(",")), 1).into_bytes()
}

/// Whether an HTTP answer is a 200 carrying a denial (an AdmissionReview, not an HTTP error).
fn denied(answer: &str, says: &str) -> bool {
    answer.starts_with("HTTP/1.1 200") && answer.contains(r#""allowed":false"#) && answer.contains(says)
}

/// Keeps `streams` h2 streams open on one TLS connection, each declaring a 4 MiB body and
/// sending none of it, replacing each as the server ends it, until `until`.
async fn hold_declared_streams(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    streams: usize,
    until: Instant,
) -> anyhow::Result<usize> {
    let stream = tls_connect(addr, &tls).await?;
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(connection);
    let mut open = tokio::task::JoinSet::new();
    let mut opened = 0;
    while Instant::now() < until {
        while open.len() < streams {
            let mut sender = sender.clone();
            let request = http::Request::post("https://localhost/mutate")
                .header("content-type", "application/json")
                .header("content-length", (4 * 1024 * 1024).to_string())
                .body(http_body_util::StreamBody::new(futures_util::stream::pending::<
                    Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>,
                >()))?;
            open.spawn(async move { sender.send_request(request).await.map(|r| r.status().as_u16()).ok() });
            opened += 1;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), open.join_next()).await;
    }
    open.abort_all();
    Ok(opened)
}

fn check(ok: bool, detail: String) -> Result<String, String> {
    if ok {
        Ok(detail)
    } else {
        Err(detail)
    }
}

/// The most lines containing `needle` logged within one second.
fn lines_per_second(log: &str, needle: &str) -> usize {
    let mut per_second = std::collections::HashMap::<String, usize>::new();
    for line in log.lines().filter(|l| l.contains(needle)) {
        // Text logs start with an RFC 3339 timestamp: the second is its first 19 characters.
        *per_second.entry(line.chars().take(19).collect()).or_default() += 1;
    }
    per_second.values().copied().max().unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let release = PathBuf::from(std::env::args().nth(1).context("usage: wiproxy-reliability RELEASE_DIR")?);
    let webhook_bin = release.join("wiproxy-webhook");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new();
    let (cert_pem, key_pem) = ca.server_pem(&["localhost"]);
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, cert_pem)?;
    std::fs::write(&key, key_pem)?;
    let mut tls = ca.client_config();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = Arc::new(tls);
    let mut rows = Vec::new();
    let guard = Duration::from_secs(30);

    // The webhook's admission port.
    let webhook = Webhook::start(&webhook_bin, dir.path(), &cert, &key, None, "webhook")?;
    let proc = webhook.proc();

    proc.reset_peak();
    // Idle connections that never start TLS: past the cap they wait in the backlog, and the
    // accepted ones are closed by the header timeout, so the webhook cycles through them.
    let mut connecting = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(2000));
    for _ in 0..10_000 {
        let (gate, addr) = (gate.clone(), webhook.addr);
        connecting.spawn(async move {
            let _permit = gate.acquire_owned().await;
            tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await.ok()?.ok()
        });
    }
    let mut held = Vec::new();
    let mut fds = 0;
    while let Some(joined) = connecting.join_next().await {
        if let Ok(Some(stream)) = joined {
            held.push(stream);
            if held.len() % 1000 == 0 {
                fds = fds.max(proc.fds());
            }
        }
    }
    for _ in 0..6 {
        fds = fds.max(proc.fds());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let tcp = held.len();
    // A review while they are held: answered once the ones ahead of it time out.
    let during = tokio::time::timeout(Duration::from_secs(60), async {
        let stream = tls_connect(webhook.addr, &tls).await.ok()?;
        Some(exchange(stream, &post(&review_body(0)), Duration::from_secs(30)).await.0)
    })
    .await
    .ok()
    .flatten()
    .is_some_and(|answer| answer.starts_with("HTTP/1.1 200"));
    let served = if during { "review answered" } else { "review NOT answered" };
    let peak = proc.peak_mib();
    drop(held);
    let cap_holds = fds <= MAX_CONNECTIONS + 32;
    rows.push(Row {
        attack: "webhook: 10,000 idle TLS connections",
        cases: 10_000,
        panics: 0,
        leaked: 0,
        peak_rss: peak,
        held: format!("{tcp} held, max {fds} fds at the webhook"),
        verdict: check(
            cap_holds && during && peak <= 128.0,
            format!("max server fds {fds} <= cap {MAX_CONNECTIONS} + 32; {served} meanwhile"),
        ),
    });
    tokio::time::sleep(Duration::from_secs(HEADER_TIMEOUT + 1)).await;

    proc.reset_peak();
    let lasted =
        slowloris(tls_connect(webhook.addr, &tls).await?, b"POST /mutate HTTP/1.1\r\nHost: w\r\nX-Slow: ", guard).await;
    let (answer, took) = exchange(
        tls_connect(webhook.addr, &tls).await?,
        b"POST /mutate HTTP/1.1\r\nHost: w\r\nContent-Length: 1000\r\n\r\n0123456789",
        guard,
    )
    .await;
    let (huge, huge_took) = exchange(
        tls_connect(webhook.addr, &tls).await?,
        b"POST /mutate HTTP/1.1\r\nHost: w\r\nContent-Length: 1000000000000\r\n\r\n0123456789",
        guard,
    )
    .await;
    let bound = Duration::from_secs(HEADER_TIMEOUT.max(BODY_TIMEOUT) + 2);
    rows.push(Row {
        attack: "webhook: slowloris, unfinished body, CL 10^12",
        cases: 3,
        panics: 0,
        leaked: 0,
        peak_rss: proc.peak_mib(),
        held: "1 each".into(),
        verdict: check(
            lasted <= bound && took <= bound && answer.starts_with("HTTP/1.1 408") && huge.starts_with("HTTP/1.1 413"),
            format!(
                "slowloris closed after {:.1} s, body: {} after {:.1} s, 10^12: {} after {:.2} s",
                lasted.as_secs_f64(),
                answer.lines().next().unwrap_or("closed"),
                took.as_secs_f64(),
                huge.lines().next().unwrap_or("closed"),
                huge_took.as_secs_f64()
            ),
        ),
    });

    proc.reset_peak();
    let body = largest_review();
    // One after another: the bound of one review at the limits.
    let mut ok = 0;
    let mut failures = Vec::new();
    for _ in 0..4 {
        let stream = tls_connect(webhook.addr, &tls).await?;
        let (answer, took) = exchange(stream, &post(&body), Duration::from_secs(60)).await;
        if patched(&answer) {
            ok += 1;
        } else {
            failures.push(format!("{:?} after {:.1} s", answer.lines().next().unwrap_or("closed"), took.as_secs_f64()));
        }
    }
    let peak = proc.peak_mib();
    rows.push(Row {
        attack: "webhook: largest review (4 MiB, every limit), 4 in turn",
        cases: 4,
        panics: 0,
        leaked: 0,
        peak_rss: peak,
        held: "1".into(),
        verdict: check(
            ok == 4 && peak <= 128.0,
            format!(
                "{ok}/4 patched, {:.1} MiB each{}, peak {peak:.1} MiB <= 128",
                body.len() as f64 / MIB,
                failures.iter().map(|f| format!("; {f}")).collect::<String>()
            ),
        ),
    });

    // At once, as a busy API server sends them.
    proc.reset_peak();
    let body = Arc::new(body);
    let mut reviews = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (addr, tls, body) = (webhook.addr, tls.clone(), body.clone());
        reviews.spawn(async move {
            let stream = tls_connect(addr, &tls).await.ok()?;
            Some(exchange(stream, &post(&body), Duration::from_secs(60)).await.0)
        });
    }
    // The budget holds four at once, charged as their bytes arrive; one whose next chunk finds
    // no room is told so at once (503, and the API server's caller tries again), which is an
    // answer, not a loss.
    let (mut ok, mut busy, mut failures) = (0, 0, Vec::new());
    while let Some(answer) = reviews.join_next().await {
        match answer.ok().flatten() {
            Some(answer) if patched(&answer) => ok += 1,
            Some(answer) if answer.starts_with("HTTP/1.1 503") && answer.contains("MiB of reviews at once") => {
                busy += 1
            }
            answer => {
                failures.push(format!("{:?}", answer.as_deref().and_then(|a| a.lines().next()).unwrap_or("closed")))
            }
        }
    }
    let peak = proc.peak_mib();
    rows.push(Row {
        attack: "webhook: 16 largest reviews at once",
        cases: 16,
        panics: 0,
        leaked: 0,
        peak_rss: peak,
        held: "16".into(),
        verdict: check(
            ok + busy == 16 && ok >= 4 && peak <= 128.0,
            format!(
                "{ok}/16 patched, {busy} told the webhook is busy (503){}, peak {peak:.1} MiB <= 128",
                failures.iter().map(|f| format!("; {f}")).collect::<String>()
            ),
        ),
    });
    // Parse amplification: bodies of entries that cost far more parsed than sent, each refused
    // while it is scanned, on a webhook of its own so that its idle RSS is its own (the rows above
    // leave freed memory in the allocator). Peak RSS per body byte is what the webhook adds over
    // its idle RSS, after one normal review.
    let fresh = Webhook::start(&webhook_bin, dir.path(), &cert, &key, None, "webhook-h1")?;
    let _ = exchange(tls_connect(fresh.addr, &tls).await?, &post(&review_body(0)), guard).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let proc = fresh.proc();
    let idle = proc.status("VmRSS:") as f64 * 1024.0 / MIB;
    let shapes = [
        ("volumes", "/mutate", amplified_review("/spec/volumes", r#"{"name":"v"}"#, None), "spec.volumes has"),
        (
            "env",
            "/mutate",
            amplified_review("/spec/containers/0/env", r#"{"name":"A"}"#, Some(3_000_000)),
            "spec.containers[0].env has",
        ),
        ("[] padding", "/validate", padded_deployment_review(), "JSON values"),
    ];
    for (shape, path, body, says) in &shapes {
        proc.reset_peak();
        let stream = tls_connect(fresh.addr, &tls).await?;
        let (answer, took) = exchange(stream, &post_to(path, body), Duration::from_secs(30)).await;
        let peak = proc.peak_mib();
        let per_byte = (peak - idle) * MIB / body.len() as f64;
        let refused = denied(&answer, says);
        rows.push(Row {
            attack: match *shape {
                "volumes" => "webhook H1: 4 MiB of {\"name\":\"v\"} volumes",
                "env" => "webhook H1: 3 MB of {\"name\":\"A\"} env entries",
                _ => "webhook H1: 4 MiB /validate Deployment padded with []",
            },
            cases: 1,
            panics: 0,
            leaked: 0,
            peak_rss: peak,
            held: "1".into(),
            verdict: check(
                refused && took <= Duration::from_secs(10) && peak <= 96.0,
                format!(
                    "{} after {:.2} s; {:.1} MiB body, peak {peak:.1} MiB <= 96 (idle {idle:.1}): {per_byte:.1} bytes of peak RSS per body byte",
                    if refused { "denied while scanned" } else { "NOT denied" },
                    took.as_secs_f64(),
                    body.len() as f64 / MIB,
                ),
            ),
        });
    }
    proc.reset_peak();
    let volumes = Arc::new(shapes[0].2.clone());
    let mut pair = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (addr, tls, body) = (fresh.addr, tls.clone(), volumes.clone());
        pair.spawn(async move {
            let stream = tls_connect(addr, &tls).await.ok()?;
            Some(exchange(stream, &post(&body), Duration::from_secs(30)).await)
        });
    }
    let mut refused = 0;
    let mut slowest = Duration::ZERO;
    while let Some(answer) = pair.join_next().await {
        if let Some((answer, took)) = answer.ok().flatten() {
            slowest = slowest.max(took);
            if denied(&answer, "spec.volumes has") && took <= Duration::from_secs(10) {
                refused += 1;
            }
        }
    }
    let peak = proc.peak_mib();
    let per_byte = (peak - idle) * MIB / (2 * volumes.len()) as f64;
    rows.push(Row {
        attack: "webhook H1: two 4 MiB volume reviews at once",
        cases: 2,
        panics: 0,
        leaked: 0,
        peak_rss: peak,
        held: "2".into(),
        verdict: check(
            refused == 2 && peak <= 128.0,
            format!(
                "{refused}/2 denied within 10 s (slowest {:.2} s), peak {peak:.1} MiB <= 128: {per_byte:.1} bytes of peak RSS per body byte",
                slowest.as_secs_f64()
            ),
        ),
    });

    let webhook_log = fresh.log();
    drop(fresh);
    let proc = webhook.proc();

    // The review budget: 8 h2 streams on one TLS connection each declare 4 MiB (twice the
    // budget together) and send nothing, renewed as they time out; normal reviews meanwhile.
    proc.reset_peak();
    let mut h2_tls = ca.client_config();
    h2_tls.alpn_protocols = vec![b"h2".to_vec()];
    let holding_for = Duration::from_secs(BODY_TIMEOUT * 6);
    let holder = tokio::spawn(hold_declared_streams(webhook.addr, Arc::new(h2_tls), 8, Instant::now() + holding_for));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut answered, mut tried) = (0, 0);
    let normal = review_body(0);
    let normal_started = Instant::now();
    while normal_started.elapsed() < holding_for - Duration::from_secs(1) {
        tried += 1;
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            let stream = tls_connect(webhook.addr, &tls).await.ok()?;
            Some(exchange(stream, &post(&normal), Duration::from_secs(5)).await.0)
        })
        .await
        .ok()
        .flatten();
        if answer.is_some_and(|a| patched(&a)) && started.elapsed() <= Duration::from_secs(5) {
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened = holder.await.ok().and_then(Result::ok).unwrap_or(0);
    let share = answered as f64 / tried.max(1) as f64;
    rows.push(Row {
        attack: "webhook H2: 8 h2 streams declare 4 MiB, send none",
        cases: tried,
        panics: 0,
        leaked: 0,
        peak_rss: proc.peak_mib(),
        held: format!("8 streams ({opened} opened)"),
        verdict: check(
            opened >= 8 && share >= 0.9,
            format!("{answered}/{tried} normal reviews answered within 5 s ({:.0} % >= 90 %)", share * 100.0),
        ),
    });

    rows.push(probes_row("H3 webhook admin: probes under 10 silent connections/s", webhook.admin).await);
    rows.push(silent_admission_row(&webhook, &tls).await?);
    let webhook_log = webhook_log + &webhook.log();
    drop(webhook);

    // The file-descriptor limit: a webhook with 128 descriptors, 400 connections held.
    let limited = Webhook::start(&webhook_bin, dir.path(), &cert, &key, Some(128), "webhook-fd")?;
    let mut holders = Vec::new();
    for _ in 0..400 {
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(limited.addr)).await
        {
            holders.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fresh_started = Instant::now();
    let mut answered = None;
    while fresh_started.elapsed() < Duration::from_secs(30) {
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), tls_connect(limited.addr, &tls)).await {
            let (answer, _) = exchange(stream, &post(&review_body(0)), Duration::from_secs(10)).await;
            if answer.starts_with("HTTP/1.1 200") {
                answered = Some(fresh_started.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held_count = holders.len();
    drop(holders);
    let log = limited.log();
    let per_second = lines_per_second(&log, "accept failed");
    rows.push(Row {
        attack: "webhook: fd limit (128), 400 connections held",
        cases: 400,
        panics: 0,
        leaked: 0,
        peak_rss: limited.proc().peak_mib(),
        held: format!("{held_count}"),
        verdict: check(
            answered.is_some() && per_second <= 3,
            format!(
                "fresh review answered after {}, at most {per_second} accept-error lines a second",
                answered.map(|d| format!("{:.1} s", d.as_secs_f64())).unwrap_or_else(|| "never".into())
            ),
        ),
    });
    let webhook_log = webhook_log + &log;
    drop(limited);

    // The sidecar.
    let world = World::start().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_addr = silent.local_addr()?;
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let mut env = world.env(&format!("fn={FUNCTION_URL},stalled=https://stalled.example.com/"));
    for (key, value) in env.iter_mut() {
        if key == "WIPROXY_RESOLVE" {
            value.push_str(&format!(",stalled.example.com={silent_addr}"));
        }
        if key == "WIPROXY_LOG" {
            *value = "info".into();
        }
    }
    env.push(("WIPROXY_BODY_TIMEOUT".into(), BODY_TIMEOUT.to_string()));
    env.push(("WIPROXY_CONNECT_TIMEOUT".into(), "2".into()));
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    let ready_by = Instant::now() + Duration::from_secs(15);
    while http.get(&sidecar.admin_url("/readyz")).await.status != 200 {
        if Instant::now() > ready_by {
            bail!("the sidecar never became ready: {}", sidecar.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let side = Proc(sidecar.pid());

    side.reset_peak();
    let header = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(384 * 1024));
    let mut attacks = tokio::task::JoinSet::new();
    for _ in 0..150 {
        let (addr, header) = (sidecar.admin, header.clone());
        attacks.spawn(async move {
            let stream = TcpStream::connect(addr).await.ok()?;
            Some(exchange(stream, header.as_bytes(), Duration::from_secs(10)).await.0)
        });
    }
    let mut refused = 0;
    while let Some(answer) = attacks.join_next().await {
        if answer.ok().flatten().is_some_and(|a| a.starts_with("HTTP/1.1 431") || a.is_empty()) {
            refused += 1;
        }
    }
    let peak = side.peak_mib();
    rows.push(Row {
        attack: "sidecar admin: 150 × 384 KB headers",
        cases: 150,
        panics: 0,
        leaked: 0,
        peak_rss: peak,
        held: "150".into(),
        verdict: check(peak <= 32.0, format!("{refused}/150 refused (431 or closed), peak {peak:.1} MiB <= 32")),
    });

    side.reset_peak();
    let lasted = slowloris(TcpStream::connect(sidecar.admin).await?, b"GET /healthz HTTP/1.1\r\nX-Slow: ", guard).await;
    let mut holders = Vec::new();
    for _ in 0..300 {
        if let Ok(mut stream) = TcpStream::connect(sidecar.admin).await {
            let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await;
            holders.push(stream);
        }
    }
    let mut served = 0;
    for _ in 0..20 {
        if let Ok(reply) = tokio::time::timeout(Duration::from_secs(10), http.get(&sidecar.url("/fn/items"))).await {
            if reply.status == 200 {
                served += 1;
            }
        }
    }
    let held_count = holders.len();
    drop(holders);
    rows.push(Row {
        attack: "sidecar admin: slowloris, 300 held vs proxy",
        cases: 21,
        panics: 0,
        leaked: 0,
        peak_rss: side.peak_mib(),
        held: format!("{held_count}"),
        verdict: check(
            lasted <= Duration::from_secs(8) && served == 20,
            format!("slowloris closed after {:.1} s; proxy served {served}/20 while held", lasted.as_secs_f64()),
        ),
    });

    side.reset_peak();
    let body = bytes::Bytes::from(vec![b'x'; 1024 * 1024]);
    let mut posts = tokio::task::JoinSet::new();
    for _ in 0..80 {
        let (url, body) = (sidecar.url("/fn/sleep/2"), body.clone());
        posts.spawn(async move {
            let request = http::Request::post(url).body(http_body_util::Full::new(body)).expect("request");
            Http::new().send(request).await.map(|reply| reply.status.as_u16()).unwrap_or(0)
        });
    }
    let mut answered = 0;
    while let Some(status) = posts.join_next().await {
        if status.unwrap_or(0) == 200 {
            answered += 1;
        }
    }
    let peak = side.peak_mib();
    rows.push(Row {
        attack: "sidecar: 80 × 1 MiB POSTs, slow upstream",
        cases: 80,
        panics: 0,
        leaked: 0,
        peak_rss: peak,
        held: "80".into(),
        verdict: check(peak <= 48.0, format!("{answered}/80 answered 200, peak {peak:.1} MiB <= 48")),
    });

    side.reset_peak();
    let (stalled, took) = exchange(
        TcpStream::connect(sidecar.proxy).await?,
        b"POST /fn/items HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
        guard,
    )
    .await;
    let handshake_started = Instant::now();
    let reply = http.get(&sidecar.url("/stalled/x")).await;
    let handshake_took = handshake_started.elapsed();
    rows.push(Row {
        attack: "sidecar: stalled body, stalled TLS handshake",
        cases: 2,
        panics: 0,
        leaked: 0,
        peak_rss: side.peak_mib(),
        held: "1 each".into(),
        verdict: check(
            stalled.starts_with("HTTP/1.1 408")
                && took <= Duration::from_secs(BODY_TIMEOUT + 2)
                && reply.status == 504
                && handshake_took <= Duration::from_secs(4),
            format!(
                "body: {} after {:.1} s; handshake: {} after {:.1} s",
                stalled.lines().next().unwrap_or("closed"),
                took.as_secs_f64(),
                reply.status.as_u16(),
                handshake_took.as_secs_f64()
            ),
        ),
    });

    rows.push(probes_row("H3 sidecar admin: probes under 10 silent connections/s", sidecar.admin).await);
    let (row, streams_log) = h2c_streams_row(&world).await?;
    rows.push(row);

    // Panics and leaked tokens, over every log.
    let logs = format!("{webhook_log}{}{streams_log}", sidecar.log());
    let panics = logs.matches("panicked").count() as u64;
    let minted = world.google.minted();
    let leaked = minted
        .iter()
        .filter(|token| {
            logs.contains(token.as_str()) || token.rsplit('.').next().is_some_and(|s| s.len() > 20 && logs.contains(s))
        })
        .count() as u64;
    if let Some(row) = rows.last_mut() {
        row.panics = panics;
        row.leaked = leaked;
    }

    println!("| attack | cases | panics | tokens leaked | peak RSS (MiB) | connections held | result |");
    println!("|---|---:|---:|---:|---:|---|---|");
    let mut failed = panics > 0 || leaked > 0;
    for row in &rows {
        let (mark, detail) = match &row.verdict {
            Ok(detail) => ("ok", detail),
            Err(detail) => {
                failed = true;
                ("FAIL", detail)
            }
        };
        println!(
            "| {} | {} | {} | {} | {:.1} | {} | {mark}: {detail} |",
            row.attack, row.cases, row.panics, row.leaked, row.peak_rss, row.held
        );
    }
    let cases: u64 = rows.iter().map(|r| r.cases).sum();
    println!(
        "\n{cases} cases, {panics} panics, {leaked} tokens leaked (of {} minted), in {:.0} s",
        minted.len(),
        started.elapsed().as_secs_f64()
    );
    if failed {
        bail!("a bound did not hold (FAIL above)");
    }
    Ok(())
}

/// A connection from `source`, a loopback address other than 127.0.0.1: the kernel routes all
/// of 127.0.0.0/8 to the loopback interface, so each address stands for another pod.
async fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(addr).await
}

/// One silent connection from `source`: connects, sends nothing, and holds the connection until
/// the server closes it (or `stop`); with `again`, connects again 100 ms after each close.
async fn silent(addr: SocketAddr, source: Ipv4Addr, again: bool, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(5), connect_from(source, addr)).await {
            let mut buf = [0u8; 64];
            tokio::select! {
                _ = stream.read(&mut buf) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
        if !again || *stop.borrow() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A kubelet-like probe: `GET /readyz` on a new connection, answered 200 within 1 s (the
/// kubelet's default `timeoutSeconds`; its HTTP prober disables keep-alive).
async fn probe(addr: SocketAddr) -> bool {
    tokio::time::timeout(Duration::from_secs(1), async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        Some(answer.starts_with(b"HTTP/1.1 200"))
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// H3: probes from 127.0.0.1 (the node) while one pod (127.0.0.2) opens 10 silent
/// connections a second to `admin`, each held until the server closes it.
async fn probes_row(attack: &'static str, admin: SocketAddr) -> Row {
    const PROBES: u64 = 20;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let opening = tokio::spawn({
        let stopped = stopped.clone();
        async move {
            let mut silent_ones = tokio::task::JoinSet::new();
            while !*stopped.borrow() {
                silent_ones.spawn(silent(admin, Ipv4Addr::new(127, 0, 0, 2), false, stopped.clone()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let opened = silent_ones.len();
            silent_ones.join_all().await;
            opened
        }
    });
    // Past the admin ports' 5 s header timeout: about 50 silent connections at once, against 16
    // or 32 slots before the connection policy made room.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut answered = 0;
    for _ in 0..PROBES {
        if probe(admin).await {
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let _ = stop.send(true);
    let opened = opening.await.unwrap_or(0);
    let share = answered as f64 / PROBES as f64;
    Row {
        attack,
        cases: PROBES,
        panics: 0,
        leaked: 0,
        peak_rss: 0.0,
        held: format!("{opened} silent opened"),
        verdict: check(share >= 0.9, format!("{answered}/{PROBES} probes answered 200 within 1 s (>= 90 %)")),
    }
}

/// One review on a kept-alive HTTP/1.1 connection (hyper's client keeps it): whether it was
/// answered with an allowed review within 5 s.
async fn review_on<B>(sender: &mut B, body: &[u8]) -> bool
where
    B: ReviewSender,
{
    tokio::time::timeout(Duration::from_secs(5), sender.review(body)).await.ok().flatten().unwrap_or(false)
}

/// The two kinds of review connections H4 sends on.
trait ReviewSender {
    fn review(&mut self, body: &[u8]) -> impl std::future::Future<Output = Option<bool>> + Send;
}

fn review_request(body: &[u8]) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post("https://localhost/mutate")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(body)))
        .expect("request")
}

async fn allowed(response: http::Response<hyper::body::Incoming>) -> Option<bool> {
    use http_body_util::BodyExt;
    let ok = response.status() == 200;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some(ok && String::from_utf8_lossy(&body).contains(r#""allowed":true"#))
}

impl ReviewSender for hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    async fn review(&mut self, body: &[u8]) -> Option<bool> {
        self.ready().await.ok()?;
        allowed(self.send_request(review_request(body)).await.ok()?).await
    }
}

impl ReviewSender for hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    async fn review(&mut self, body: &[u8]) -> Option<bool> {
        self.ready().await.ok()?;
        allowed(self.send_request(review_request(body)).await.ok()?).await
    }
}

/// H4: reviews on a kept-alive HTTP/1.1 connection (as the API server keeps one) and on new h2
/// connections, while 1,500 connections from 100 other sources never send a TLS hello, each
/// opened again 100 ms after the webhook closes it, so the admission port stays full.
async fn silent_admission_row(webhook: &Webhook, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<Row> {
    const SILENT: usize = 1500;
    const REVIEWS: u64 = 10;
    let body = review_body(0);
    let stream = tls_connect(webhook.addr, tls).await?;
    let (mut kept, driving) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(driving);
    if !review_on(&mut kept, &body).await {
        bail!("the kept-alive connection's first review, before any attack, was not answered");
    }

    let proc = webhook.proc();
    proc.reset_peak();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut silent_ones = tokio::task::JoinSet::new();
    for i in 0..SILENT {
        let source = Ipv4Addr::new(127, 0, 1, 1 + (i % 100) as u8);
        silent_ones.spawn(silent(webhook.addr, source, true, stopped.clone()));
    }
    // Past the 2 s header timeout every slot has been taken by a silent connection; the
    // kept-alive client sends all the while, as the API server does (waiting longer than the
    // header timeout between reviews, it would see its connection closed as idle).
    let warm_up = Instant::now() + Duration::from_secs(HEADER_TIMEOUT + 1);
    while Instant::now() < warm_up {
        review_on(&mut kept, &body).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let held = proc.fds();

    let mut kept_answered = 0;
    for _ in 0..REVIEWS {
        if review_on(&mut kept, &body).await {
            kept_answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut h2_tls = (**tls).clone();
    h2_tls.alpn_protocols = vec![b"h2".to_vec()];
    let h2_tls = Arc::new(h2_tls);
    let mut h2_answered = 0;
    for _ in 0..REVIEWS {
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            let stream = tls_connect(webhook.addr, &h2_tls).await.ok()?;
            let (mut sender, driving) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .ok()?;
            tokio::spawn(driving);
            sender.review(&body).await
        })
        .await;
        if answered.ok().flatten().unwrap_or(false) {
            h2_answered += 1;
        }
    }
    let _ = stop.send(true);
    silent_ones.join_all().await;
    let enough = |n: u64| n as f64 / REVIEWS as f64 >= 0.9;
    Ok(Row {
        attack: "H4 webhook: reviews while 1,500 silent connections fill the admission port",
        cases: 2 * REVIEWS,
        panics: 0,
        leaked: 0,
        peak_rss: proc.peak_mib(),
        held: format!("{SILENT} silent from 100 sources, {held} fds at the webhook"),
        verdict: check(
            enough(kept_answered) && enough(h2_answered),
            format!(
                "kept-alive HTTP/1.1 client {kept_answered}/{REVIEWS}, new h2 connections {h2_answered}/{REVIEWS} answered within 5 s (>= 90 % each)"
            ),
        ),
    })
}

/// L4: 1,500 concurrent h2c streams (15 connections of 100) from the app to an upstream that
/// speaks HTTP/1.1 only, each held 5 s by the upstream (so that all are in flight at once), against the sidecar's injected memory
/// limit (64Mi, webhook/src/inject.rs). Every stream is answered, or refused with
/// REFUSED_STREAM (the client may send it again: it was not processed), nothing else. A
/// sidecar of its own, so the peak is this attack's alone; its log is returned.
async fn h2c_streams_row(world: &World) -> anyhow::Result<(Row, String)> {
    use wiproxy_tests::world::RUN_HOST;
    const CONNECTIONS: usize = 15;
    const STREAMS: usize = 100;
    const LIMIT_MIB: f64 = 64.0;
    let mut http1_only = (*world.ca.server_config(&[RUN_HOST])).clone();
    http1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
    let upstream =
        wiproxy_tests::serve::https(wiproxy_tests::function::router(world.function.clone()), Arc::new(http1_only))
            .await;
    let mut env = world.env(&format!("run=https://{RUN_HOST}"));
    for (key, value) in env.iter_mut() {
        if key == "WIPROXY_RESOLVE" {
            // The Cloud Run host on the HTTP/1.1-only front end instead.
            *value = format!("{RUN_HOST}={upstream},{value}");
        }
        if key == "WIPROXY_LOG" {
            *value = "info".into();
        }
    }
    let sidecar = Sidecar::start(&env);
    let http = Http::new();
    let ready_by = Instant::now() + Duration::from_secs(15);
    while http.get(&sidecar.admin_url("/readyz")).await.status != 200 {
        if Instant::now() > ready_by {
            bail!("the sidecar never became ready: {}", sidecar.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proc = Proc(sidecar.pid());
    proc.reset_peak();

    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let tcp = TcpStream::connect(sidecar.proxy).await?;
        let (sender, driving) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await?;
        tokio::spawn(driving);
        for _ in 0..STREAMS {
            let mut sender = sender.clone();
            let url = sidecar.url("/run/sleep/5");
            streams.spawn(async move {
                let request =
                    http::Request::get(url).body(http_body_util::Empty::<bytes::Bytes>::new()).expect("request");
                let sent = tokio::time::timeout(Duration::from_secs(60), async {
                    sender.ready().await?;
                    sender.send_request(request).await
                })
                .await;
                match sent {
                    Ok(Ok(response)) => Ok(response.status().as_u16()),
                    Ok(Err(e)) => {
                        let reason = std::error::Error::source(&e)
                            .and_then(|e| e.downcast_ref::<h2::Error>())
                            .and_then(h2::Error::reason);
                        Err(reason.map(|r| format!("{r:?}")).unwrap_or_else(|| e.to_string()))
                    }
                    Err(_) => Err("no answer within 60 s".to_owned()),
                }
            });
        }
    }
    let (mut ok, mut refused, mut other) = (0u64, 0u64, std::collections::BTreeMap::<String, u64>::new());
    while let Some(outcome) = streams.join_next().await {
        match outcome.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(200) => ok += 1,
            Err(reason) if reason == "REFUSED_STREAM" => refused += 1,
            Ok(status) => *other.entry(status.to_string()).or_default() += 1,
            Err(reason) => *other.entry(reason).or_default() += 1,
        }
    }
    let peak = proc.peak_mib();
    let total = (CONNECTIONS * STREAMS) as u64;
    let row = Row {
        attack: "L4 sidecar: 1,500 h2c streams to an HTTP/1.1 upstream",
        cases: total,
        panics: 0,
        leaked: 0,
        peak_rss: peak,
        held: format!("{CONNECTIONS} connections"),
        verdict: check(
            peak <= LIMIT_MIB && ok + refused == total && ok > 0,
            format!(
                "{ok} answered 200, {refused} refused (REFUSED_STREAM){}, peak {peak:.1} MiB <= {LIMIT_MIB}",
                other.iter().map(|(what, n)| format!("; {n} {what}")).collect::<String>()
            ),
        ),
    };
    Ok((row, sidecar.log()))
}
