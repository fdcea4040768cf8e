"""The interop suite's Python clients, each run as its own process by run.py with the app
environment the webhook injects (WIPROXY_URL, WIPROXY_<NAME>_URL, WIPROXY_<NAME>_ADDR). Each
checks what it got, prints one line, and exits non-zero on any surprise.

  clients.py requests | proxy-mode | httpx-h1 | httpx-h2c | grpc | websockets
  clients.py h2load-goaway RUNS N | idle-burst | chunked-posts N | grpc-many N | scripted-goaway | trailers-h1

The connection counts read nginx's access log (INTEROP_NGINX_LOG, INTEROP_IDLE_LOG: each line
starts with the connection's serial number, which nginx gives every connection it accepts or
opens, used or not).
"""

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

GSA = os.environ.get("EXPECTED_EMAIL", "")


def expect(condition, what):
    if not condition:
        print(f"FAILED: {what}")
        sys.exit(1)


def echo_ok(reply, path, version=None):
    expect(reply.status_code == 200, f"status {reply.status_code}: {reply.text[:300]}")
    echo = reply.json()
    expect(echo["path"] == path, f"path {echo['path']!r}, wanted {path!r}")
    expect(echo["email"] == GSA, f"token email {echo['email']!r}")
    if version:
        expect(echo["http_version"] == version, f"upstream spoke HTTP/{echo['http_version']}, wanted {version}")
    return echo


def requests_client():
    import requests

    base = os.environ["WIPROXY_HC_URL"]
    with requests.Session() as session:
        echo_ok(session.get(f"{base}/echo"), "/echo", "2")
        body = os.urandom(1024 * 1024)
        echo = echo_ok(session.post(f"{base}/upload", data=body), "/upload")
        expect(echo["body_bytes"] == len(body), "the body arrived whole")
        # The upstream redirects to its own absolute URL; the Location comes back through the sidecar.
        landed = session.get(f"{base}/redirect")
        expect([r.status_code for r in landed.history] == [302], f"history {landed.history}")
        expect(landed.history[0].headers["location"] == f"{base}/landed", landed.history[0].headers["location"])
        echo_ok(landed, "/landed")
    print("ok: GET over an h2 upstream, 1 MiB POST, a redirect followed through the sidecar")


def proxy_mode():
    import requests

    proxies = {"http": os.environ["WIPROXY_URL"]}
    with requests.Session() as session:
        session.trust_env = False
        echo_ok(session.get("http://hypercorn.interop.test/echo", proxies=proxies), "/echo")
        echo_ok(session.get("http://hypercorn.interop.test:443/echo", proxies=proxies), "/echo")
        # HTTP_PROXY and the injected base URL together: a request to the sidecar itself.
        echo_ok(session.get(f"{os.environ['WIPROXY_HC_URL']}/echo", proxies=proxies), "/echo")
        refused = session.get("http://elsewhere.interop.test/", proxies=proxies)
        expect(refused.status_code == 403, f"status {refused.status_code}")
        expect("https://hypercorn.interop.test/" in refused.json()["error"], refused.text)
    print("ok: HTTP_PROXY to an upstream, :443, to the sidecar itself; 403 naming URL prefixes")


def httpx_client(http2):
    import httpx

    base = os.environ["WIPROXY_HC_URL"]
    with httpx.Client(http1=not http2, http2=http2, trust_env=False) as client:
        for i in range(20):
            reply = client.get(f"{base}/echo/{i}")
            echo_ok(reply, f"/echo/{i}")
            expect(reply.http_version == ("HTTP/2" if http2 else "HTTP/1.1"), reply.http_version)
        with client.stream("GET", f"{base}/echo/stream") as reply:
            expect(reply.status_code == 200 and b"email" in b"".join(reply.iter_bytes()), "streamed answer")
    print(f"ok: 21 requests on one {'h2c (prior knowledge)' if http2 else 'HTTP/1.1'} connection")


def grpc_client():
    import grpc

    with grpc.insecure_channel(os.environ["WIPROXY_GRPC_ADDR"]) as channel:
        def method(kind, name):
            return getattr(channel, kind)(f"/interop.Echo/{name}")

        expect(method("unary_unary", "Unary")(b"hi", timeout=10) == b"unary:hi", "unary")
        streamed = list(method("unary_stream", "ServerStream")(b"n", timeout=10))
        expect(streamed == [b"n-0", b"n-1", b"n-2"], f"server streaming {streamed}")
        bidi = list(method("stream_stream", "Bidi")(iter([b"a", b"b", b"c"]), timeout=10))
        expect(bidi == [b"echo:a", b"echo:b", b"echo:c"], f"bidi {bidi}")
        try:
            method("unary_unary", "Fail")(b"x", timeout=10)
            expect(False, "Fail succeeded")
        except grpc.RpcError as error:
            expect(error.code() == grpc.StatusCode.FAILED_PRECONDITION, f"code {error.code()}")
            expect(error.details() == "the order is closed", error.details())
            expect(("x-detail", "trailing metadata kept") in tuple(error.trailing_metadata()), str(error.trailing_metadata()))
    # Dialling the proxy port instead: no upstream is named by the path, and the refusal is gRPC's.
    with grpc.insecure_channel(os.environ["WIPROXY_URL"].removeprefix("http://")) as channel:
        try:
            channel.unary_unary("/interop.Echo/Unary")(b"hi", timeout=10)
            expect(False, "a call to an unknown upstream succeeded")
        except grpc.RpcError as error:
            expect(error.code() == grpc.StatusCode.UNIMPLEMENTED, f"code {error.code()}")
            expect("no upstream named" in error.details(), error.details())
            refused = error.details()
    print(f"ok: unary, server streaming, bidi, FAILED_PRECONDITION with trailing metadata; refused: {refused[:80]}…")


def websockets_client():
    from websockets.sync.client import connect

    url = os.environ["WIPROXY_WS_URL"].replace("http://", "ws://") + "/echo"
    with connect(url, proxy=None) as socket:
        for message in ["one", "two", "x" * 100_000]:
            socket.send(message)
            expect(socket.recv(timeout=10) == message, "echo")
        socket.send(b"\x00\x01binary")
        expect(socket.recv(timeout=10) == b"\x00\x01binary", "binary echo")
    print("ok: text, a 100 kB message and binary echoed over a WebSocket through the sidecar")


class Serials:
    """The connection serial numbers in the lines nginx has logged since the last look."""

    def __init__(self, log):
        self.log, self.offset = log, os.path.getsize(log)

    def new(self):
        time.sleep(0.05)  # nginx writes a line as each request ends
        with open(self.log) as f:
            f.seek(self.offset)
            lines = f.read()
            self.offset = f.tell()
        return [int(line.split()[0]) for line in lines.splitlines() if line.strip()]


def h2load(url, n, what="", timeout=20):
    try:
        clients = str(min(n, 10))
        done = subprocess.run(["h2load", "-n", str(n), "-c", clients, "-m", "10", url],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        expect(False, f"{what}h2load did not finish within {timeout} s: a request was left unanswered")
    statuses = re.search(r"status codes: .*", done.stdout)
    expect(f"status codes: {n} 2xx" in done.stdout, f"{what}{statuses.group(0) if statuses else done.stdout[-500:]}")


def h2load_goaway(runs, n):
    """RUNS bursts of N requests, 100 streams at a time, to nginx closing each connection after
    100 requests: every request answered 2xx, and at most 2 TLS connections per GOAWAY. New
    connections are counted as the growth of nginx's highest serial number since the last burst,
    so connections opened and thrown away unused count too (nginx also numbers its own
    connections to the token check, at most one per 5 s, which the allowance of 2 per GOAWAY
    covers)."""
    runs, n = int(runs), int(n)
    url = os.environ["WIPROXY_NGINX_URL"] + "/ok.txt"
    serials = Serials(os.environ["INTEROP_NGINX_LOG"])
    last, opened, worst, logged = None, 0, 0, 0
    goaways = max(n // 100, 1)
    for run in range(runs):
        h2load(url, n, f"run {run}: ")
        new = serials.new()
        logged += len(new)
        first = min(new) - 1 if last is None else last
        last = max(last or 0, max(new))
        count = last - first
        opened, worst = opened + count, max(worst, count)
        expect(count <= 2 * goaways, f"run {run}: {count} connections opened for {goaways} GOAWAYs")
    logged += len(serials.new())
    print(f"ok: {runs} runs of {n} requests, all 2xx; {opened} TLS connections opened "
          f"({opened / runs:.1f} a run, at most {worst}) for {goaways} GOAWAYs a run; nginx processed {logged}")


def idle_burst():
    """One request, nginx closes the idle connection after 1 s, then 100 requests at once: at
    most 2 new connections."""
    url = os.environ["WIPROXY_IDLE_URL"] + "/ok.txt"
    serials = Serials(os.environ["INTEROP_IDLE_LOG"])
    h2load(url, 1)
    before = max(serials.new())
    time.sleep(2.5)
    h2load(url, 100)
    new = serials.new()
    opened = max(new) - before
    expect(opened <= 2, f"{opened} connections opened for one burst after an idle close")
    print(f"ok: 100 requests after an idle close, {opened} new connection(s), {len(set(new))} used")


def chunked_posts(count):
    """COUNT chunked 2 KiB POSTs from 10 threads to nginx, which sends a GOAWAY every 100
    requests: every one answered, its body whole."""
    import requests

    count = int(count)
    url = os.environ["WIPROXY_NGINX_URL"] + "/upload"
    failures, lock = [], threading.Lock()

    def worker(share):
        with requests.Session() as session:
            for _ in range(share):
                reply = session.post(url, data=iter([b"a" * 1024, b"b" * 1024]))
                ok = reply.status_code == 200 and reply.json().get("body_bytes") == 2048
                if not ok:
                    with lock:
                        failures.append(f"{reply.status_code} {reply.text[:200]}")

    threads = [threading.Thread(target=worker, args=(count // 10,)) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expect(not failures, f"{len(failures)} of {count} failed, e.g. {failures[:3]}")
    print(f"ok: {count} chunked POSTs across {count // 100} GOAWAYs, 0 failed")


def grpc_many(count):
    """COUNT unary calls from 4 threads to a server that ends each connection after 200 ms."""
    import grpc

    count = int(count)
    failures, lock = [], threading.Lock()
    with grpc.insecure_channel(os.environ["WIPROXY_GRPC_ADDR"]) as channel:
        unary = channel.unary_unary("/interop.Echo/Unary")

        def worker(share):
            for i in range(share):
                try:
                    expect(unary(b"%d" % i, timeout=10) == b"unary:%d" % i, "unary answer")
                except grpc.RpcError as error:
                    with lock:
                        failures.append(f"{error.code()}: {error.details()}")

        threads = [threading.Thread(target=worker, args=(count // 4,)) for _ in range(4)]
        started = time.time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    expect(not failures, f"{len(failures)} of {count} calls failed, e.g. {failures[:3]}")
    print(f"ok: {count} calls across connections that live 200 ms, 0 failed, in {time.time() - started:.1f} s")


def scripted_goaway():
    """The scripted upstream refuses each request's first try with a GOAWAY below its stream:
    a body with a length, a chunked one and a gRPC call are each sent again, whole."""
    import hashlib

    import grpc
    import requests

    url = os.environ["WIPROXY_SCRIPTED_URL"] + "/refused"
    body = os.urandom(300_000)
    want = f"tries=2 bytes={len(body)} sha256={hashlib.sha256(body).hexdigest()}"
    with requests.Session() as session:
        for framing, data in [("length", body), ("chunked", iter([body[:100_000], body[100_000:]]))]:
            reply = session.post(url, data=data, headers={"x-request-id": str(uuid.uuid4())})
            expect(reply.status_code == 200, f"{framing}: status {reply.status_code}: {reply.text[:300]}")
            expect(reply.json()["answer"] == want, f"{framing}: {reply.json()['answer']}, wanted {want}")
    with grpc.insecure_channel(os.environ["WIPROXY_SCRIPTED_ADDR"]) as channel:
        answer = channel.unary_unary("/scripted.Refused/Call")(body, metadata=(("x-request-id", str(uuid.uuid4())),), timeout=10)
        expect(answer.decode() == want, f"grpc: {answer!r}, wanted {want}")
    # Past the 1 MiB the sidecar keeps for a retry, a refused request cannot be sent again: an
    # h2c client is told so with RST_STREAM(REFUSED_STREAM), which lets it send it again itself.
    # curl, because it reads frames while its upload waits for flow control (httpx's h2 client
    # does not notice a reset of a stream whose window is spent, and waits for its timeout).
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile() as upload:
        upload.write(b"z" * 2_400_000)
        upload.flush()
        run = subprocess.run(
            ["curl", "-sS", "-v", "--http2-prior-knowledge", "--max-time", "10", "--data-binary", f"@{upload.name}",
             "-H", f"x-request-id: {uuid.uuid4()}", "-H", "x-refuse-after: 2000000", url],
            capture_output=True, text=True)
    # curl takes REFUSED_STREAM as "not processed, send again" and does so itself, up to five
    # times (the scripted upstream refuses every try of a body this large), then gives up.
    refused = [line for line in run.stderr.splitlines() if "REFUSED_STREAM" in line]
    expect(run.returncode != 0 and refused and "200 OK" not in run.stderr,
           f"curl exit {run.returncode}, no REFUSED_STREAM: {run.stderr.strip()[-400:]}")
    print("ok: refused by GOAWAY, sent again whole: a body with a length, a chunked body, a gRPC call; "
          "past the retry budget, RST_STREAM(REFUSED_STREAM) to an h2c client")


def trailers_h1():
    """An HTTP/1.1 client that sends `TE: trailers` receives the upstream's trailer fields."""
    address = os.environ["WIPROXY_URL"].removeprefix("http://")
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"GET /scripted/trailers HTTP/1.1\r\nHost: " + address.encode()
                           + b"\r\nTE: trailers\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    expect(head.startswith(b"HTTP/1.1 200"), head.decode(errors="replace"))
    expect(b"transfer-encoding: chunked" in head.lower(), head.decode(errors="replace"))
    expect(b"\r\n0\r\nx-checksum: c0ffee\r\n" in rest, f"no trailer in {rest!r}")
    print("ok: the upstream's trailer field reached an HTTP/1.1 client")


if __name__ == "__main__":
    {
        "requests": requests_client,
        "proxy-mode": proxy_mode,
        "httpx-h1": lambda: httpx_client(False),
        "httpx-h2c": lambda: httpx_client(True),
        "grpc": grpc_client,
        "websockets": websockets_client,
        "h2load-goaway": h2load_goaway,
        "idle-burst": idle_burst,
        "chunked-posts": chunked_posts,
        "grpc-many": grpc_many,
        "scripted-goaway": scripted_goaway,
        "trailers-h1": trailers_h1,
    }[sys.argv[1]](*sys.argv[2:])
