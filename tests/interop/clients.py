"""The interop suite's Python clients, each run as its own process by run.py with the app
environment the webhook injects (WIPROXY_URL, WIPROXY_<NAME>_URL, WIPROXY_<NAME>_ADDR). Each
checks what it got, prints one line, and exits non-zero on any surprise.

  clients.py requests | proxy-mode | httpx-h1 | httpx-h2c | grpc | websockets
"""

import asyncio
import os
import sys

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


if __name__ == "__main__":
    {
        "requests": requests_client,
        "proxy-mode": proxy_mode,
        "httpx-h1": lambda: httpx_client(False),
        "httpx-h2c": lambda: httpx_client(True),
        "grpc": grpc_client,
        "websockets": websockets_client,
    }[sys.argv[1]]()
