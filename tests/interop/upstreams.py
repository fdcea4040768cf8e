"""The interop suite's upstreams, third-party servers on loopback over TLS, each verifying the
sidecar's ID token (RS256 signature against the fake metadata server's keys, audience, expiry)
before it answers:

  upstreams.py hypercorn DIR TLS_PORT VERIFY_PORT AUDIENCE   hypercorn, h2 and HTTP/1.1 by ALPN; plus
                                                             /_verify on plain VERIFY_PORT for nginx's auth_request
  upstreams.py grpc DIR PORT AUDIENCE                        a grpcio server
  upstreams.py websockets DIR PORT AUDIENCE                  a websockets server (echo)
  upstreams.py scripted DIR PORT AUDIENCE                    an h2 server that refuses each request's first try

DIR is what `wiproxy-fakes` wrote: upstream.crt, upstream.key, jwks.json.
"""

import asyncio
import base64
import json
import os
import ssl
import sys
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64(data):
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


class Verifier:
    """Checks `Bearer <JWT>` as Google's front end does: signature, audience, expiry."""

    def __init__(self, directory, audience):
        with open(os.path.join(directory, "jwks.json")) as f:
            keys = json.load(f)["keys"]
        self.keys = {
            k["kid"]: rsa.RSAPublicNumbers(int.from_bytes(b64(k["e"]), "big"), int.from_bytes(b64(k["n"]), "big")).public_key()
            for k in keys
        }
        self.audience = audience

    def check(self, authorization, audience=None):
        """The token's claims, or raises ValueError saying why it is refused."""
        if not authorization or not authorization.startswith("Bearer "):
            raise ValueError("no bearer token")
        header, payload, signature = authorization[len("Bearer "):].split(".")
        key = self.keys.get(json.loads(b64(header)).get("kid"))
        if key is None:
            raise ValueError("unknown signing key")
        try:
            key.verify(b64(signature), f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except Exception as error:
            raise ValueError("bad signature") from error
        claims = json.loads(b64(payload))
        if claims.get("aud") != (audience or self.audience):
            raise ValueError(f"wrong audience {claims.get('aud')!r}")
        if claims.get("exp", 0) <= time.time():
            raise ValueError("expired")
        return claims


def tls_context(directory, alpn):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.path.join(directory, "upstream.crt"), os.path.join(directory, "upstream.key"))
    context.set_alpn_protocols(alpn)
    return context


def ready(name):
    print(f"{name} ready", flush=True)


# ---- hypercorn: an ASGI echo over h2/HTTP/1.1, and the count of RST_STREAM frames it receives ----

RECEIVED_RESETS = 0


def count_resets():
    """Wraps the h2 library's per-frame handler, which hypercorn uses, to count every RST_STREAM
    frame received, those for streams already closed included (h2 drops those silently)."""
    import h2.connection
    from hyperframe.frame import RstStreamFrame

    receive = h2.connection.H2Connection._receive_frame

    def receive_frame(self, frame):
        global RECEIVED_RESETS
        RECEIVED_RESETS += isinstance(frame, RstStreamFrame)
        return receive(self, frame)

    h2.connection.H2Connection._receive_frame = receive_frame


def hypercorn_app(verifier, tls_port):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break

        async def answer(status, payload, extra=()):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]})
            await send({"type": "http.response.body", "body": data})

        path = scope["path"]
        if scope.get("server", (None, None))[1] != tls_port:
            # nginx's auth_request: the audience is nginx's, sent by nginx.
            try:
                verifier.check(headers.get("authorization"), headers.get("x-audience"))
                if path == "/_upload":
                    return await answer(200, {"body_bytes": len(body)})
                return await answer(200, b"")
            except ValueError as error:
                return await answer(401, {"error": str(error)})
        try:
            claims = verifier.check(headers.get("authorization"))
        except ValueError as error:
            return await answer(401, {"error": str(error)}, [(b"www-authenticate", b'Bearer error="invalid_token"')])
        if path == "/_stats":
            return await answer(200, {"rst_stream_received": RECEIVED_RESETS})
        if path == "/redirect":
            location = f"https://{headers.get('host', '')}/landed".encode()
            return await answer(302, b"", [(b"location", location)])
        await answer(200, {"path": path, "method": scope["method"], "http_version": scope["http_version"],
                           "body_bytes": len(body), "email": claims.get("email"), "aud": claims.get("aud")})

    return app


def run_hypercorn(directory, tls_port, verify_port, audience):
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    count_resets()
    config = Config()
    config.bind = [f"127.0.0.1:{tls_port}"]
    config.insecure_bind = [f"127.0.0.1:{verify_port}"]
    config.certfile = os.path.join(directory, "upstream.crt")
    config.keyfile = os.path.join(directory, "upstream.key")
    config.alpn_protocols = ["h2", "http/1.1"]
    config.keep_alive_max_requests = 1_000_000
    config.accesslog = None
    ready("hypercorn")
    asyncio.run(serve(hypercorn_app(Verifier(directory, audience), int(tls_port)), config))


# ---- grpcio: unary, server-streaming, bidi and an error with trailing metadata, on raw bytes ----

def run_grpc(directory, port, audience):
    from concurrent import futures

    import grpc

    verifier = Verifier(directory, audience)

    def checked(handler):
        def call(request, context):
            metadata = dict(context.invocation_metadata())
            try:
                verifier.check(metadata.get("authorization"))
            except ValueError as error:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"token refused: {error}")
            return handler(request, context)
        return call

    def unary(request, context):
        return b"unary:" + request

    def server_stream(request, context):
        for i in range(3):
            yield f"{request.decode()}-{i}".encode()

    def bidi(requests, context):
        for request in requests:
            yield b"echo:" + request

    def fail(request, context):
        context.set_trailing_metadata((("x-detail", "trailing metadata kept"),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the order is closed")

    handlers = grpc.method_handlers_generic_handler("interop.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(checked(unary)),
        "ServerStream": grpc.unary_stream_rpc_method_handler(checked(server_stream)),
        "Bidi": grpc.stream_stream_rpc_method_handler(checked(bidi)),
        "Fail": grpc.unary_unary_rpc_method_handler(checked(fail)),
    })
    # Connections live 200 ms, then a GOAWAY (grpc-go's MaxConnectionAge, as Cloud Run's and
    # many gRPC servers' settings do): calls must survive it through the sidecar.
    options = [("grpc.max_connection_age_ms", 200), ("grpc.max_connection_age_grace_ms", 10_000)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[handlers], options=options)
    with open(os.path.join(directory, "upstream.key"), "rb") as key, open(os.path.join(directory, "upstream.crt"), "rb") as cert:
        credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    ready("grpc")
    server.wait_for_termination()


# ---- websockets: an echo behind the same token check ----

def run_websockets(directory, port, audience):
    from websockets.asyncio.server import serve

    verifier = Verifier(directory, audience)

    def check(connection, request):
        try:
            verifier.check(request.headers.get("Authorization"))
        except ValueError as error:
            return connection.respond(401, f"token refused: {error}\n")
        return None

    async def echo(websocket):
        async for message in websocket:
            await websocket.send(message)

    async def main():
        async with serve(echo, "127.0.0.1", int(port), ssl=tls_context(directory, ["http/1.1"]), process_request=check) as server:
            ready("websockets")
            await server.serve_forever()

    asyncio.run(main())


# ---- scripted: an h2 server (the h2 library) that refuses each request's first try ----

def run_scripted(directory, port, audience):
    """Answers a GOAWAY whose last-stream-id is below the stream of the first request carrying
    each `x-request-id`, so the upstream never processes it (RFC 9113 §6.8): the sidecar must
    send it again on a new connection, whatever its body's framing. The second try is answered
    with what arrived: the body's length and SHA-256 (JSON, or a gRPC message and trailers).
    `x-refuse-after: BYTES` refuses it only once that much of its body has arrived, every try.
    `/trailers` answers with a declared trailer field."""
    import hashlib

    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    verifier = Verifier(directory, audience)
    tries = {}

    def respond(connection, stream_id, request):
        headers, body = request["headers"], bytes(request["body"])
        try:
            verifier.check(headers.get("authorization"))
        except ValueError as error:
            connection.send_headers(stream_id, [(":status", "401")])
            connection.send_data(stream_id, str(error).encode(), end_stream=True)
            return
        if headers.get(":path") == "/trailers":
            connection.send_headers(stream_id, [(":status", "200"), ("content-type", "text/plain"), ("trailer", "x-checksum")])
            connection.send_data(stream_id, b"trailers follow\n")
            connection.send_headers(stream_id, [("x-checksum", "c0ffee")], end_stream=True)
            return
        grpc = headers.get("content-type", "").startswith("application/grpc")
        if grpc:
            body = body[5:]  # one message: its compression flag and length, then the message
        answer = f"tries={request['tries']} bytes={len(body)} sha256={hashlib.sha256(body).hexdigest()}"
        if grpc:
            message = answer.encode()
            connection.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
            connection.send_data(stream_id, b"\0" + len(message).to_bytes(4, "big") + message)
            connection.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        else:
            data = json.dumps({"answer": answer}).encode()
            connection.send_headers(stream_id, [(":status", "200"), ("content-type", "application/json"),
                                                ("content-length", str(len(data)))])
            connection.send_data(stream_id, data, end_stream=True)

    async def serve_connection(reader, writer):
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        connection = h2.connection.H2Connection(config=config)
        connection.initiate_connection()
        writer.write(connection.data_to_send())
        requests, refused = {}, False
        try:
            while data := await reader.read(65536):
                try:
                    events = connection.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    if refused:
                        continue
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers)
                        key = headers.get("x-request-id")
                        tries[key] = tries.get(key, 0) + 1
                        refuse_after = int(headers.get("x-refuse-after", "0"))
                        if key and tries[key] == 1 and not refuse_after:
                            # Graceful, and below this stream: it was never processed.
                            connection.close_connection(error_code=0, last_stream_id=max(event.stream_id - 2, 0))
                            refused = True
                            continue
                        requests[event.stream_id] = {"headers": headers, "body": bytearray(), "tries": tries[key],
                                                     "refuse_after": refuse_after}
                    elif isinstance(event, h2.events.DataReceived):
                        connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        request = requests.get(event.stream_id)
                        if request is not None:
                            request["body"] += event.data
                            # `x-refuse-after: BYTES`: refused only once that much of the body came.
                            if request["refuse_after"] and len(request["body"]) >= request["refuse_after"]:
                                connection.close_connection(error_code=0, last_stream_id=max(event.stream_id - 2, 0))
                                refused = True
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id in requests:
                        respond(connection, event.stream_id, requests.pop(event.stream_id))
                writer.write(connection.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.H2Error):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(serve_connection, "127.0.0.1", int(port), ssl=tls_context(directory, ["h2"]))
        ready("scripted")
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    {"hypercorn": run_hypercorn, "grpc": run_grpc, "websockets": run_websockets, "scripted": run_scripted}[kind](*args)
