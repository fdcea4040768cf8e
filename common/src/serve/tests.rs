//! The connection policy over real sockets: the cap and who leaves for whom, per-source shares,
//! the request limit, kept-alive connections, timeouts and the drain.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use super::*;

#[test]
fn accept_errors_back_off_and_log_at_most_once_a_second() {
    let mut errors = AcceptErrors { name: "test", last_logged: None, quiet: 0, backoff: ACCEPT_BACKOFF_FIRST };
    let emfile = std::io::Error::from_raw_os_error(24);
    let waits: Vec<_> = (0..10).map(|_| errors.failed(&emfile)).collect();
    assert_eq!(waits[0], ACCEPT_BACKOFF_FIRST);
    assert!(waits.windows(2).all(|w| w[1] >= w[0]));
    assert_eq!(*waits.last().expect("waits"), ACCEPT_BACKOFF_MAX);
    // One line logged, nine kept quiet.
    assert_eq!(errors.quiet, 9);
    errors.accepted();
    assert_eq!(errors.failed(&emfile), ACCEPT_BACKOFF_FIRST);
}

/// With a cap of one, a second client waits while the first connection is serving a request:
/// the first is answered in full, and the second only once the first has gone.
#[tokio::test]
async fn past_the_cap_a_client_waits_while_every_connection_is_serving() {
    let (addr, _stop) = echo_server(ConnectionPolicy::new("test", 1).header_timeout(Duration::from_secs(60))).await;
    let started = Instant::now();
    let first = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
        read_response(&mut stream).await
    });
    // Let the server start on the first request before the second arrives.
    settle().await;
    let mut second = TcpStream::connect(addr).await.expect("connect");
    second.write_all(b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let answer = tokio::time::timeout(Duration::from_secs(30), read_response(&mut second)).await.expect("answered");
    assert_eq!(answer, "/second");
    assert!(started.elapsed() >= SLOW, "the second client was served while the first held the only slot");
    assert_eq!(first.await.expect("task"), "/slow");
}

/// Asserts the server closes `stream` (a clean end, nothing more to read) within 30 s.
async fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{what}: {read:?} {rest:?}");
}

/// Reads one HTTP/1.1 response with a `content-length` from `stream`; its body.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.expect("read"), 1, "closed in a head: {bytes:?}");
        bytes.push(byte[0]);
    }
    let head = String::from_utf8(bytes).expect("text");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .and_then(|v| v.parse::<usize>().ok())
        .expect("content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("body");
    String::from_utf8(body).expect("text")
}

/// How long a request for `/slow` takes.
const SLOW: Duration = Duration::from_secs(1);

/// A server answering each request with its path, after [`SLOW`] for `/slow`.
async fn echo_server(policy: ConnectionPolicy) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = watch::channel(false);
    let service = || {
        hyper::service::service_fn(|request: Request<RequestBody>| async move {
            if request.uri().path() == "/slow" {
                tokio::time::sleep(SLOW).await;
            }
            Ok::<_, std::convert::Infallible>(Response::new(request.uri().path().to_owned()))
        })
    };
    tokio::spawn(serve(listener, policy, stopped, Duration::from_secs(1), |s| async move { Some(s) }, service));
    (addr, stop)
}

/// hyper lets go of a kept-alive connection between requests; the next request is served
/// all the same, also one whose head was half sent when hyper let go (what hyper had read
/// comes back with the stream), and requests sent in one write.
#[tokio::test]
async fn kept_alive_connections_are_served_after_hyper_lets_go() {
    let (addr, _stop) = echo_server(ConnectionPolicy::new("test", 4)).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let wait = Duration::from_millis(200);

    stream.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert_eq!(read_response(&mut stream).await, "/one");
    tokio::time::sleep(wait).await;
    stream.write_all(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert_eq!(read_response(&mut stream).await, "/two");

    // hyper has read the start of /four when it lets go.
    stream.write_all(b"GET /three HTTP/1.1\r\nHost: x\r\n\r\nGET /four HTTP/1.1\r\nHo").await.expect("write");
    assert_eq!(read_response(&mut stream).await, "/three");
    tokio::time::sleep(wait).await;
    stream.write_all(b"st: x\r\n\r\n").await.expect("write");
    assert_eq!(read_response(&mut stream).await, "/four");

    tokio::time::sleep(wait).await;
    stream
        .write_all(b"GET /five HTTP/1.1\r\nHost: x\r\n\r\nGET /six HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(read_response(&mut stream).await, "/five");
    assert_eq!(read_response(&mut stream).await, "/six");
}

/// At the cap a new connection takes the place of the kept-alive connection that has waited
/// longest, instead of waiting for its header timeout; the other kept-alive connection is
/// left alone and still served.
#[tokio::test]
async fn at_the_cap_a_new_connection_takes_the_place_of_the_oldest_kept_alive_one() {
    let policy = ConnectionPolicy::new("test", 2)
        .header_timeout(Duration::from_secs(600))
        .idle_timeout(Duration::from_secs(600));
    let (addr, _stop) = echo_server(policy).await;
    let mut kept = Vec::new();
    for path in ["/first", "/second"] {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
        assert_eq!(read_response(&mut stream).await, path);
        kept.push(stream);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut third = TcpStream::connect(addr).await.expect("connect");
    third.write_all(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let answered = tokio::time::timeout(Duration::from_secs(30), read_response(&mut third)).await;
    assert_eq!(answered.expect("the third connection waited for a kept-alive one to time out"), "/third");

    assert_closed(&mut kept[0], "the longest-waiting connection was not closed").await;
    kept[1].write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert_eq!(read_response(&mut kept[1]).await, "/again");
}

/// A kept-alive connection that hyper let go of is still closed once the header timeout
/// passes without a request.
#[tokio::test]
async fn a_kept_alive_wait_ends_at_the_header_timeout() {
    let (addr, _stop) = echo_server(ConnectionPolicy::new("test", 4).header_timeout(Duration::from_secs(1))).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert_eq!(read_response(&mut stream).await, "/one");
    assert_closed(&mut stream, "the idle connection was not closed").await;
}

/// A request body that stopped arriving (answered after the body timeout) makes hyper close
/// the connection after the answer: it is not kept open as if it were between requests.
#[tokio::test]
async fn a_connection_whose_body_stalled_is_closed_after_the_answer() {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (_stop, stopped) = watch::channel(false);
    let service = || {
        hyper::service::service_fn(|request: Request<RequestBody>| async move {
            let read = request.into_body().collect().await;
            Ok::<_, std::convert::Infallible>(Response::new(String::from(if read.is_ok() {
                "read"
            } else {
                "stalled"
            })))
        })
    };
    let policy = ConnectionPolicy::new("test", 4)
        .header_timeout(Duration::from_secs(600))
        .idle_timeout(Duration::from_secs(600))
        .body_timeout(Duration::from_secs(1));
    tokio::spawn(serve(listener, policy, stopped, Duration::from_secs(1), |s| async move { Some(s) }, service));
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123").await.expect("write");
    assert_eq!(read_response(&mut stream).await, "stalled");
    assert_closed(&mut stream, "the connection was kept").await;
}

/// On shutdown, a connection waiting between requests is closed, and the drain ends.
#[tokio::test]
async fn shutdown_closes_waiting_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = watch::channel(false);
    let service = || {
        hyper::service::service_fn(|_request: Request<RequestBody>| async {
            Ok::<_, std::convert::Infallible>(Response::new(String::from("ok")))
        })
    };
    let policy = ConnectionPolicy::new("test", 4).header_timeout(Duration::from_secs(600));
    let serving =
        tokio::spawn(serve(listener, policy, stopped, Duration::from_secs(60), |s| async move { Some(s) }, service));
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    assert_eq!(read_response(&mut stream).await, "ok");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(true).expect("stop");
    assert_closed(&mut stream, "the waiting connection was not closed").await;
    tokio::time::timeout(Duration::from_secs(30), serving).await.expect("drained").expect("task");
}

#[test]
fn a_header_limit_below_hypers_minimum_is_raised() {
    assert_eq!(ConnectionPolicy::new("t", 1).max_header_bytes(100).max_header_bytes, MIN_HEADER_BYTES);
}

/// A connection from `source` (any loopback address: the kernel routes all of 127.0.0.0/8 to
/// the loopback interface).
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::from((source, 0))).expect("bind the source address");
    socket.connect(addr).await.expect("connect")
}

/// Sends one request and reads its answer on a kept-alive connection.
async fn get(stream: &mut TcpStream, path: &str) -> String {
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
    tokio::time::timeout(Duration::from_secs(30), read_response(stream)).await.expect("answered in time")
}

/// Lets the server accept what was connected.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// At the cap, a connection that never sent a request leaves for a new one before a kept-alive
/// connection does, though the kept-alive one is older and has waited longer.
#[tokio::test]
async fn at_the_cap_a_silent_connection_leaves_before_a_kept_alive_one() {
    let policy = ConnectionPolicy::new("test", 2)
        .per_source(2)
        .header_timeout(Duration::from_secs(600))
        .idle_timeout(Duration::from_secs(600));
    let (addr, _stop) = echo_server(policy).await;
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(get(&mut kept, "/first").await, "/first");
    settle().await;
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    settle().await;

    let mut third = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(get(&mut third, "/third").await, "/third");
    assert_closed(&mut silent, "the silent connection was not closed").await;
    assert_eq!(get(&mut kept, "/again").await, "/again", "the kept-alive connection was closed");
}

/// An HTTP/2 connection serving a stream is never asked to leave: a new connection past the cap
/// waits until it is gone, and its stream is answered in full.
#[tokio::test]
async fn an_http2_connection_with_a_stream_in_flight_never_leaves_for_a_new_one() {
    use http_body_util::{BodyExt, Empty};
    let policy = ConnectionPolicy::new("test", 1).header_timeout(Duration::from_secs(600));
    let (addr, _stop) = echo_server(policy).await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, driving) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let driver = tokio::spawn(driving);
    let request = Request::get(format!("http://{addr}/slow")).body(Empty::<Bytes>::new()).expect("request");
    let streaming = tokio::spawn(async move {
        let response = sender.send_request(request).await.expect("the stream was answered, not reset");
        let body = response.into_body().collect().await.expect("the whole body").to_bytes();
        (body, Instant::now())
    });
    settle().await;

    let waiting = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let answer = get(&mut stream, "/new").await;
        (answer, Instant::now())
    });
    let (body, streamed) =
        tokio::time::timeout(Duration::from_secs(30), streaming).await.expect("in time").expect("task");
    assert_eq!(&body[..], b"/slow");
    // The HTTP/2 connection ends; the new one takes its slot.
    driver.abort();
    let (answer, answered) =
        tokio::time::timeout(Duration::from_secs(30), waiting).await.expect("in time").expect("task");
    assert_eq!(answer, "/new");
    assert!(answered > streamed, "the new connection was served while the HTTP/2 stream held the only slot");
}

/// A source at its share makes room among its own connections, oldest silent first, even with
/// room under the cap; with all of its connections serving, its new one is closed at once. Other
/// sources are served all the while.
#[tokio::test]
async fn a_source_at_its_share_makes_room_among_its_own_connections_only() {
    const GREEDY: [u8; 4] = [127, 0, 0, 2];
    const BUSY: [u8; 4] = [127, 0, 0, 3];
    const OTHER: [u8; 4] = [127, 0, 0, 4];
    let policy = ConnectionPolicy::new("test", 16)
        .per_source(2)
        .header_timeout(Duration::from_secs(600))
        .idle_timeout(Duration::from_secs(600));
    let (addr, _stop) = echo_server(policy).await;

    let mut oldest = connect_from(GREEDY, addr).await;
    settle().await;
    let mut younger = connect_from(GREEDY, addr).await;
    settle().await;
    let mut newest = connect_from(GREEDY, addr).await;
    assert_closed(&mut oldest, "the source's oldest silent connection was not closed").await;
    assert_eq!(get(&mut newest, "/newest").await, "/newest");
    assert_eq!(get(&mut younger, "/younger").await, "/younger");

    let mut others = Vec::new();
    for i in 0..4 {
        let mut stream = connect_from(OTHER, addr).await;
        assert_eq!(get(&mut stream, &format!("/other{i}")).await, format!("/other{i}"));
        others.push(stream);
    }
    // The other source's kept-alive connections made room among themselves.
    assert_eq!(get(&mut others[3], "/still").await, "/still");

    let mut serving = Vec::new();
    for _ in 0..2 {
        let mut stream = connect_from(BUSY, addr).await;
        stream.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        serving.push(stream);
    }
    settle().await;
    let started = Instant::now();
    let mut refused = connect_from(BUSY, addr).await;
    let _ = refused.write_all(b"GET /refused HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), refused.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the connection past the share was answered: {read:?} {rest:?}");
    assert!(started.elapsed() < SLOW, "refused only once a serving connection ended");
    for stream in &mut serving {
        assert_eq!(read_response(stream).await, "/slow");
    }
    let mut other = connect_from(OTHER, addr).await;
    assert_eq!(get(&mut other, "/other").await, "/other");
}

/// Past the request limit, shared by every connection of the policy, an HTTP/2 stream is reset
/// with REFUSED_STREAM and an HTTP/1.1 request gets 503; neither reaches the service.
#[tokio::test]
async fn past_the_request_limit_a_stream_is_refused_and_a_request_gets_503() {
    use http_body_util::Empty;
    let policy = ConnectionPolicy::new("test", 8).max_requests(1);
    let (addr, _stop) = echo_server(policy).await;
    let mut busy = TcpStream::connect(addr).await.expect("connect");
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    settle().await;

    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, driving) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(driving);
    let request = Request::get(format!("http://{addr}/h2")).body(Empty::<Bytes>::new()).expect("request");
    let error = sender.send_request(request).await.expect_err("the stream was served past the limit");
    let reason =
        std::error::Error::source(&error).and_then(|e| e.downcast_ref::<h2::Error>()).and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::REFUSED_STREAM), "{error:?}");

    let mut refused = TcpStream::connect(addr).await.expect("connect");
    refused.write_all(b"GET /h1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), refused.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("1 requests in flight"), "{answer}");

    assert_eq!(read_response(&mut busy).await, "/slow");
    // The limit frees with the answer: the next stream is served.
    settle().await;
    let request = Request::get(format!("http://{addr}/after")).body(Empty::<Bytes>::new()).expect("request");
    assert_eq!(sender.send_request(request).await.expect("served").status(), 200);
}

/// A connection that has started its first request is left to finish it, though it is older
/// than a silent one: a client in the middle of its head (or TLS handshake) finishes it.
#[tokio::test]
async fn a_connection_that_started_its_head_is_left_to_finish_it() {
    let policy = ConnectionPolicy::new("test", 2)
        .per_source(2)
        .header_timeout(Duration::from_secs(600))
        .idle_timeout(Duration::from_secs(600));
    let (addr, _stop) = echo_server(policy).await;
    let mut started = TcpStream::connect(addr).await.expect("connect");
    started.write_all(b"GET /started HTTP/1.1\r\nHo").await.expect("write");
    settle().await;
    let mut quiet = TcpStream::connect(addr).await.expect("connect");
    settle().await;

    let mut third = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(get(&mut third, "/third").await, "/third");
    assert_closed(&mut quiet, "the quiet connection was not closed").await;
    started.write_all(b"st: x\r\n\r\n").await.expect("write");
    assert_eq!(read_response(&mut started).await, "/started");
}
