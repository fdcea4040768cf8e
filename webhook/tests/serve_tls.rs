//! The webhook over real TLS on loopback: a client that verifies the CA posts an API-server
//! review, and the serving certificate is swapped through a Secret volume's `..data` symlink.

mod support;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use wiproxy_webhook::server::{router, serve_tls, AppState, ConnectionArgs};
use wiproxy_webhook::tls::ReloadingCertificate;

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        Self { ca }
    }

    fn leaf(&self) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
        let cert = params.signed_by(&key, &self.ca).expect("leaf");
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("CA root");
        let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A Secret volume as the kubelet lays it out: `tls.crt -> ..data/tls.crt`, `..data -> ..<version>`.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: usize,
}

impl SecretVolume {
    fn new(files: &[(&str, &[u8])]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut volume = Self { dir, version: 0 };
        volume.swap(files);
        for (name, _) in files {
            symlink(Path::new("..data").join(name), volume.dir.path().join(name)).expect("file symlink");
        }
        volume
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a new version and points `..data` at it with one atomic rename, as the kubelet does.
    fn swap(&mut self, files: &[(&str, &[u8])]) {
        self.version += 1;
        let version = format!("..2026_11_29_{:04}", self.version);
        std::fs::create_dir(self.dir.path().join(&version)).expect("version dir");
        for (name, content) in files {
            std::fs::write(self.dir.path().join(&version).join(name), content).expect("write file");
        }
        let tmp = self.dir.path().join("..data_tmp");
        symlink(&version, &tmp).expect("tmp symlink");
        std::fs::rename(&tmp, self.dir.path().join("..data")).expect("swap ..data");
    }
}

struct Server {
    addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(certificate: Arc<ReloadingCertificate>) -> Server {
    start_with(certificate, ConnectionArgs::default()).await
}

async fn start_with(certificate: Arc<ReloadingCertificate>, connections: ConnectionArgs) -> Server {
    let _ = rustls::crypto::ring::default_provider().install_default();
    certificate.clone().watch(Duration::from_millis(50), |_| {});
    let tls = Arc::new(certificate.server_config());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = watch::channel(false);
    let mut state = AppState::new(support::webhook());
    state.body_timeout = Duration::from_secs(connections.body_timeout);
    let app = router(state);
    let policy = connections.admission();
    let task = tokio::spawn(serve_tls(listener, tls, app, policy, stopped, Duration::from_secs(5)));
    Server { addr, stop, task }
}

/// Connects over TLS verifying `client`'s CA; returns the certificate the server presented and,
/// when `body` is given, the JSON answer of `POST /mutate`.
async fn call(
    addr: std::net::SocketAddr,
    client: Arc<rustls::ClientConfig>,
    body: Option<String>,
) -> Result<(CertificateDer<'static>, Option<(u16, Value)>), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client);
    let server_name = ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(server_name, tcp).await.map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned().ok_or("no certificate")?;
    let Some(body) = body else { return Ok((presented.into_owned(), None)) };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::post("/mutate")
        .header("host", "wiproxy.wiproxy-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    Ok((presented.into_owned(), Some((status, value))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_reviews_and_reloads_a_swapped_certificate() {
    let first_pki = Pki::new("first CA");
    let first = first_pki.leaf();
    let mut volume =
        SecretVolume::new(&[("tls.crt", first.cert_pem.as_bytes()), ("tls.key", first.key_pem.as_bytes())]);
    let certificate =
        Arc::new(ReloadingCertificate::load(&volume.path("tls.crt"), &volume.path("tls.key")).expect("loads"));
    let server = start(certificate).await;

    // A review as the API server sends it, answered with a patch equal to what render does.
    let review = support::review_fixture();
    let (presented, answer) =
        call(server.addr, first_pki.client_config(), Some(review.to_string())).await.expect("TLS call");
    assert_eq!(presented, first.der);
    let (status, response) = answer.expect("answer");
    assert_eq!(status, 200);
    let object = &review["request"]["object"];
    let patched = support::apply_response_patch(&response, object);
    assert_eq!(patched, {
        let mut rendered = support::render_pod(object);
        // render prints the pod; the patch leaves the API server's fields (status) in place.
        rendered["status"] = object["status"].clone();
        rendered
    });

    // A new pair from another CA, swapped in through `..data`, reaches new connections.
    let second_pki = Pki::new("second CA");
    let second = second_pki.leaf();
    volume.swap(&[("tls.crt", second.cert_pem.as_bytes()), ("tls.key", second.key_pem.as_bytes())]);
    let mut served = None;
    for _ in 0..100 {
        if let Ok((presented, _)) = call(server.addr, second_pki.client_config(), None).await {
            served = Some(presented);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served.as_ref(), Some(&second.der), "the swapped certificate is served without a restart");
    assert!(call(server.addr, first_pki.client_config(), None).await.is_err(), "the old CA no longer verifies");

    // A broken pair (key of another certificate) is refused and the last good pair stays.
    let stray = second_pki.leaf();
    volume.swap(&[("tls.crt", second.cert_pem.as_bytes()), ("tls.key", stray.key_pem.as_bytes())]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (presented, answer) =
        call(server.addr, second_pki.client_config(), Some(review.to_string())).await.expect("still serving");
    assert_eq!(presented, second.der);
    assert_eq!(answer.expect("answer").0, 200);

    server.stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(10), server.task).await.expect("drains in time").expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_open_connections_on_shutdown() {
    let pki = Pki::new("drain CA");
    let leaf = pki.leaf();
    let volume = SecretVolume::new(&[("tls.crt", leaf.cert_pem.as_bytes()), ("tls.key", leaf.key_pem.as_bytes())]);
    let certificate =
        Arc::new(ReloadingCertificate::load(&volume.path("tls.crt"), &volume.path("tls.key")).expect("loads"));
    let server = start(certificate).await;

    // An idle keep-alive connection must not hold the shutdown for the whole drain timeout.
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("http");
    let connection = tokio::spawn(connection);
    let request = http::Request::post("/mutate")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(support::review_fixture().to_string())))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    drop(response);

    let started = std::time::Instant::now();
    server.stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(4), server.task).await.expect("drained before the timeout").expect("task");
    assert!(started.elapsed() < Duration::from_secs(4));
    tokio::time::timeout(Duration::from_secs(2), connection).await.expect("client connection closed").ok();
    // New connections are refused once the listener is gone.
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[test]
fn unusable_certificate_files_are_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let missing = ReloadingCertificate::load(&cert, &key).expect_err("missing files").to_string();
    assert!(missing.contains("tls.crt"), "{missing}");
    std::fs::write(&cert, "not a certificate").expect("write");
    std::fs::write(&key, "not a key").expect("write");
    let garbage = ReloadingCertificate::load(&cert, &key).expect_err("garbage").to_string();
    assert!(garbage.contains("tls.crt") && garbage.contains("PEM"), "{garbage}");
}

/// Writes `head_and_body` over TLS and reads until the server closes (or the hang guard).
async fn send_raw(addr: std::net::SocketAddr, client: Arc<rustls::ClientConfig>, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(client);
    let mut tls = connector.connect(ServerName::try_from("localhost").expect("name"), tcp).await.expect("TLS");
    tls.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_unfinished_and_slow_requests_are_answered_or_closed() {
    let pki = Pki::new("limits CA");
    let leaf = pki.leaf();
    let volume = SecretVolume::new(&[("tls.crt", leaf.cert_pem.as_bytes()), ("tls.key", leaf.key_pem.as_bytes())]);
    let certificate =
        Arc::new(ReloadingCertificate::load(&volume.path("tls.crt"), &volume.path("tls.key")).expect("loads"));
    let connections = ConnectionArgs { max_connections: 8, header_timeout: 1, body_timeout: 1, idle_timeout: 1 };
    let server = start_with(certificate, connections).await;
    let head = |length: u64| {
        format!("POST /mutate HTTP/1.1\r\nHost: wiproxy\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n0123456789")
    };

    // Content-Length: 10^12 with 10 bytes behind it: refused at once, the body never awaited.
    let answer = send_raw(server.addr, pki.client_config(), head(1_000_000_000_000).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A body that stops: 408 once the body timeout passes.
    let answer = send_raw(server.addr, pki.client_config(), head(1000).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");
    // Headers that never end, and a connection that never sends anything: closed.
    for partial in [&b"POST /mutate HTTP/1.1\r\nHost: wiproxy\r\nX-Slow: "[..], &b""[..]] {
        let answer = send_raw(server.addr, pki.client_config(), partial).await;
        assert!(!answer.contains("200 OK"), "{answer}");
    }
    // More connections than the cap, all idle, then they time out and a review is answered.
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    let review = support::review_fixture();
    let (_, answer) =
        tokio::time::timeout(Duration::from_secs(60), call(server.addr, pki.client_config(), Some(review.to_string())))
            .await
            .expect("answered once the idle connections time out")
            .expect("TLS call");
    assert_eq!(answer.expect("answer").0, 200);
    drop(idle);
    server.stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(10), server.task).await.expect("drains in time").expect("task");
}
