"""make interop: real third-party clients against real third-party upstreams through the built
`wiproxy`, on loopback only, every upstream verifying the ID token. One table of scenarios, one
runner: each scenario is a command run with the app's environment (as the webhook injects it),
and passes when it exits 0 and prints what the table expects.

usage: run.py TARGET_DIR [--requests N]   (TARGET_DIR holds wiproxy and wiproxy-fakes)
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
HOSTS = ["hypercorn.interop.test", "nginx.interop.test", "grpc.interop.test", "ws.interop.test", "idle.interop.test",
         "scripted.interop.test"]
TIMEOUT = 180  # seconds, for any one scenario

NODE_FETCH = """
const base = process.env.WIPROXY_HC_URL;
const echo = await (await fetch(`${base}/echo`)).json();
if (echo.email !== process.env.EXPECTED_EMAIL) { console.log('FAILED', echo); process.exit(1); }
const post = await (await fetch(`${base}/upload`, {method: 'POST', body: 'x'.repeat(300000)})).json();
if (post.body_bytes !== 300000) { console.log('FAILED', post); process.exit(1); }
console.log(`ok: fetch GET and POST, upstream spoke HTTP/${echo.http_version}`);
"""


def scenarios(n):
    """(name, client, upstream, command, what stdout must match)."""
    return [
        ("requests", "Python requests", "hypercorn h2", [PYTHON, "clients.py", "requests"], r"^ok"),
        ("proxy mode", "Python requests", "hypercorn h2", [PYTHON, "clients.py", "proxy-mode"], r"^ok"),
        ("httpx h1", "httpx HTTP/1.1", "hypercorn h2", [PYTHON, "clients.py", "httpx-h1"], r"^ok"),
        ("httpx h2c", "httpx h2c", "hypercorn h2", [PYTHON, "clients.py", "httpx-h2c"], r"^ok"),
        ("node fetch", "Node fetch", "hypercorn h2", ["node", "--input-type=module", "-e", NODE_FETCH], r"^ok"),
        ("curl h2c upgrade", "curl --http2", "hypercorn h2",
         ["curl", "-sS", "--http2", "-w", "\nHTTP/%{http_version}\n", "{hc}/echo"], r'"email".*\nHTTP/1\.1$'),
        ("curl 100-continue", "curl -T", "hypercorn h2",
         ["curl", "-sS", "-T", "{upload}", "-H", "Expect: 100-continue", "{hc}/upload"], r'"body_bytes": 3000000'),
        ("nghttp h2c", "nghttp", "hypercorn h2", ["nghttp", "{hc}/echo"], r'"http_version": "2"'),
        # The sidecar answers an h2c upgrade over HTTP/1.1 (never tunnelled); nghttp then reports
        # "HTTP Upgrade failed" and exits 1, so the answer itself is what is checked.
        ("nghttp upgrade", "nghttp -u", "hypercorn h2", ["sh", "-c", "nghttp -uv {hc}/echo || true"],
         r'HTTP Upgrade response\nHTTP/1\.1 200 OK\n[^\[]*"email": "invoker@'),
        ("grpc", "grpcio", "grpcio TLS", [PYTHON, "clients.py", "grpc"], r"^ok"),
        ("websockets", "websockets", "websockets TLS", [PYTHON, "clients.py", "websockets"], r"^ok"),
        ("h2load h2c", "h2load -c 10 -m 10", "nginx h2, keepalive_requests 100",
         ["h2load", "-n", str(n), "-c", "10", "-m", "10", "{nginx}/ok.txt"], rf"status codes: {n} 2xx"),
        ("h2load HTTP/1.1", "h2load --h1 -c 10", "hypercorn h2",
         ["h2load", "--h1", "-n", str(n), "-c", "10", "{hc}/echo"], rf"status codes: {n} 2xx"),
        ("no RST_STREAM", "curl", "hypercorn h2", ["curl", "-sS", "{hc}/_stats"], r'"rst_stream_received": 0\b'),
        # The upstream connection layer (docs/sidecar.md, "Upstream connections"): one TLS
        # connection per GOAWAY, not a handshake storm, and no request lost or left unanswered.
        ("GOAWAY x50", "h2load -c 10 -m 10", "nginx h2, keepalive_requests 100",
         [PYTHON, "clients.py", "h2load-goaway", "50", str(n)], r"^ok"),
        ("GOAWAY x500", "h2load -c 10 -m 10", "nginx h2, keepalive_requests 100",
         [PYTHON, "clients.py", "h2load-goaway", "500", "200"], r"^ok"),
        ("idle burst", "h2load -c 10 -m 10", "nginx h2, keepalive_timeout 1s",
         [PYTHON, "clients.py", "idle-burst"], r"^ok"),
        ("chunked POSTs", "Python requests", "nginx h2, keepalive_requests 100",
         [PYTHON, "clients.py", "chunked-posts", "1000"], r"^ok"),
        ("grpc max age", "grpcio", "grpcio TLS, max age 200 ms", [PYTHON, "clients.py", "grpc-many", "10000"], r"^ok"),
        ("GOAWAY refused", "requests, grpcio", "scripted h2 (h2 library)", [PYTHON, "clients.py", "scripted-goaway"], r"^ok"),
        ("trailers HTTP/1.1", "raw HTTP/1.1", "scripted h2 (h2 library)", [PYTHON, "clients.py", "trailers-h1"], r"^ok"),
    ]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, log, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    sys.exit(f"{what} did not start; its log:\n{open(log).read() if os.path.exists(log) else ''}")


def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


NGINX_CONF = """
{user}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  # The connection's serial number (nginx numbers every connection it opens or accepts) and its
  # count of requests: the suite counts the sidecar's TLS connections with them.
  log_format conns '$connection $connection_requests $status $request_method';
  client_body_temp_path {work}/nginx; proxy_temp_path {work}/nginx; fastcgi_temp_path {work}/nginx;
  uwsgi_temp_path {work}/nginx; scgi_temp_path {work}/nginx;
  proxy_cache_path {work}/nginx-auth keys_zone=auth:1m;
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {work}/upstream.crt;
    ssl_certificate_key {work}/upstream.key;
    access_log {work}/nginx-access.log conns;
    # Every 100 requests on a connection, a GOAWAY: the sidecar must send the rest again.
    keepalive_requests 100;
    root {work}/www;
    location / {{ auth_request /_verify; try_files $uri =404; }}
    # A body read whole by the upstream, which verifies the token itself and counts the bytes.
    location = /upload {{
      proxy_pass http://127.0.0.1:{verify}/_upload;
      proxy_set_header X-Audience https://nginx.interop.test;
    }}
    # The token is verified by the hypercorn process (signature, audience, expiry), its verdict
    # cached for a few seconds per token.
    location = /_verify {{
      internal;
      proxy_pass http://127.0.0.1:{verify}/_verify;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Audience https://nginx.interop.test;
      proxy_cache auth;
      proxy_cache_key $http_authorization;
      proxy_cache_valid 200 5s;
      # One check per token at a time, not one per waiting request (each opens a connection
      # nginx numbers, which would blur the suite's counts of the sidecar's connections).
      proxy_cache_lock on;
      proxy_cache_use_stale updating;
    }}
  }}
  # The same, closing a connection idle for 1 s.
  server {{
    listen 127.0.0.1:{idle} ssl http2;
    ssl_certificate {work}/upstream.crt;
    ssl_certificate_key {work}/upstream.key;
    access_log {work}/idle-access.log conns;
    keepalive_timeout 1s;
    root {work}/www;
    location / {{ auth_request /_verify; try_files $uri =404; }}
    location = /_verify {{
      internal;
      proxy_pass http://127.0.0.1:{verify}/_verify;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Audience https://idle.interop.test;
      proxy_cache auth;
      proxy_cache_key $http_authorization;
      proxy_cache_valid 200 60s;
      proxy_cache_lock on;
      proxy_cache_use_stale updating;
    }}
  }}
}}
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--requests", type=int, default=2000, help="requests in each h2load scenario")
    parser.add_argument("--only", action="append", help="run only the scenario of this name (repeatable)")
    args = parser.parse_args()
    target = os.path.abspath(args.target)
    for tool in ["nginx", "nghttp", "h2load", "curl", "node"]:
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} is missing: .ci/run installs it (apt-get install nginx nghttp2-client curl nodejs)")
    work = tempfile.mkdtemp(prefix="wiproxy-interop-")
    processes = []

    def start(name, command, env=None):
        log = open(os.path.join(work, f"{name}.log"), "w")
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE))
        return log.name

    try:
        log = start("fakes", [os.path.join(target, "wiproxy-fakes"), work, *HOSTS])
        wait_for("wiproxy-fakes", lambda: os.path.exists(os.path.join(work, "env")), log)
        fakes = dict(line.split("=", 1) for line in open(os.path.join(work, "env")).read().split())

        ports = {name: free_port() for name in ["hc", "verify", "nginx", "grpc", "ws", "proxy", "admin", "grpc_listen", "idle",
                                                 "scripted", "scripted_listen"]}
        log = start("hypercorn", [PYTHON, "upstreams.py", "hypercorn", work, str(ports["hc"]), str(ports["verify"]), "https://hypercorn.interop.test"])
        wait_for("hypercorn", lambda: listening(ports["hc"]) and listening(ports["verify"]), log)
        log = start("grpc", [PYTHON, "upstreams.py", "grpc", work, str(ports["grpc"]), "https://grpc.interop.test"])
        wait_for("the grpc server", lambda: listening(ports["grpc"]), log)
        log = start("websockets", [PYTHON, "upstreams.py", "websockets", work, str(ports["ws"]), "https://ws.interop.test"])
        wait_for("the websockets server", lambda: listening(ports["ws"]), log)
        log = start("scripted", [PYTHON, "upstreams.py", "scripted", work, str(ports["scripted"]), "https://scripted.interop.test"])
        wait_for("the scripted h2 server", lambda: listening(ports["scripted"]), log)
        os.makedirs(os.path.join(work, "www"))
        os.makedirs(os.path.join(work, "nginx"))
        with open(os.path.join(work, "www", "ok.txt"), "w") as f:
            f.write("ok\n")
        with open(os.path.join(work, "nginx.conf"), "w") as f:
            # Run by root (as CI does), nginx's workers would drop to "nobody", who cannot read the work dir.
            user = "user root;" if os.geteuid() == 0 else ""
            f.write(NGINX_CONF.format(user=user, work=work, port=ports["nginx"], verify=ports["verify"], idle=ports["idle"]))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        subprocess.run([nginx, "-c", os.path.join(work, "nginx.conf"), "-e", os.path.join(work, "nginx-error.log")], check=True)

        upstreams = ",".join([
            "hc=https://hypercorn.interop.test",
            "nginx=https://nginx.interop.test",
            f"grpc=https://grpc.interop.test;listen={ports['grpc_listen']}",
            "ws=https://ws.interop.test",
            "idle=https://idle.interop.test",
            f"scripted=https://scripted.interop.test;listen={ports['scripted_listen']}",
        ])
        keys = ["hc", "nginx", "grpc", "ws", "idle", "scripted"]
        resolve = ",".join(f"{host}=127.0.0.1:{ports[key]}" for host, key in zip(HOSTS, keys))
        sidecar_env = {
            **fakes,
            "WIPROXY_UPSTREAMS": upstreams,
            "WIPROXY_RESOLVE": resolve,
            "WIPROXY_EXTRA_CA_FILE": os.path.join(work, "ca.pem"),
            "WIPROXY_LISTEN": f"127.0.0.1:{ports['proxy']}",
            "WIPROXY_ADMIN_LISTEN": f"127.0.0.1:{ports['admin']}",
            "WIPROXY_LOG": os.environ.get("INTEROP_WIPROXY_LOG", "info"),
            "WIPROXY_LOG_FORMAT": "text",
        }
        log = start("wiproxy", [os.path.join(target, "wiproxy")], env=sidecar_env)

        def sidecar_ready():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/readyz", timeout=2).status == 200
            except OSError:
                return False

        wait_for("wiproxy", sidecar_ready, log)

        # What the webhook injects into the app's containers.
        proxy = f"http://127.0.0.1:{ports['proxy']}"
        app_env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": work,
            "EXPECTED_EMAIL": fakes["WIPROXY_EXPECTED_SERVICE_ACCOUNT"],
            "WIPROXY_URL": proxy,
            **{f"WIPROXY_{name.upper()}_URL": f"{proxy}/{name}" for name in ["hc", "nginx", "grpc", "ws", "idle", "scripted"]},
            "WIPROXY_GRPC_ADDR": f"127.0.0.1:{ports['grpc_listen']}",
            "WIPROXY_SCRIPTED_ADDR": f"127.0.0.1:{ports['scripted_listen']}",
            # Not the app's: where nginx logs each request's connection, for the suite's counts.
            "INTEROP_NGINX_LOG": os.path.join(work, "nginx-access.log"),
            "INTEROP_IDLE_LOG": os.path.join(work, "idle-access.log"),
        }
        upload = os.path.join(work, "upload.bin")
        with open(upload, "wb") as f:
            f.write(os.urandom(3_000_000))
        fill = {"hc": f"{proxy}/hc", "nginx": f"{proxy}/nginx", "upload": upload}

        results = []
        started = time.time()
        for name, client, upstream, command, expected in scenarios(args.requests):
            if args.only and name not in args.only:
                continue
            for key, value in fill.items():
                command = [part.replace(f"{{{key}}}", value) for part in command]
            began = time.time()
            try:
                done = subprocess.run(command, cwd=HERE, env=app_env, capture_output=True, text=True, timeout=TIMEOUT)
                output = done.stdout + done.stderr
                passed = done.returncode == 0 and re.search(expected, done.stdout, re.MULTILINE) is not None
            except subprocess.TimeoutExpired:
                output, passed = f"timed out after {TIMEOUT} s", False
            results.append((name, client, upstream, passed, time.time() - began))
            if not passed:
                print(f"--- {name}: {' '.join(command)}\n{output.strip()[-3000:]}\n--- expected /{expected}/\n")
            else:
                detail = [line for line in output.splitlines() if re.search(r"^ok|status codes|finished in|rst_stream", line)]
                print(f"{name}: {' | '.join(detail)[:200]}")

        print(f"\n{'scenario':<20} {'client':<20} {'upstream':<34} {'result':<6} seconds")
        for name, client, upstream, passed, seconds in results:
            print(f"{name:<20} {client:<20} {upstream:<34} {'pass' if passed else 'FAIL':<6} {seconds:.1f}")
        failed = sum(not passed for *_, passed, _ in results)
        print(f"\nscenarios took {time.time() - started:.0f} s")
        print(f"interop: {len(results) - failed} passed, {failed} failed")
        if failed:
            print(f"logs in {work}")
            for name in ["wiproxy", "hypercorn", "grpc", "websockets", "scripted", "nginx-error"]:
                path = os.path.join(work, f"{name}.log")
                if os.path.exists(path):
                    print(f"--- {name}.log (tail)\n{open(path).read()[-2000:]}")
        return 1 if failed else 0
    finally:
        pid = os.path.join(work, "nginx.pid")
        if os.path.exists(pid):
            subprocess.run(["kill", open(pid).read().strip()], check=False)
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
