#!/usr/bin/env python3
"""make bench: wiproxy against nginx on the same cores, instruction counts, and cost curves.

Run by bench/run.sh once the binaries are built. Every figure is printed as it is measured and
the whole report is written to bench/RESULTS.md. Standard library only.

Fairness rules: the proxy under test (nginx or the sidecar) and the webhook or its static-TLS
nginx baseline are pinned with taskset to the same cores, nginx with one worker per core, the
sidecar's runtime with one thread per core (tokio reads the affinity mask); the upstream is one
nginx process of its own that both proxies call; wrk runs with 2 threads; paths alternate
A/B/A/B and the median of the rounds is reported.
"""

import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CPUS = os.environ.get("BENCH_PROXY_CPUS", f"0-{os.cpu_count() - 1}" if (os.cpu_count() or 1) > 1 else "0")
CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTED = time.monotonic()
PROFILE = "release"
PROFILES = {
    "measure": "`measure` (Cargo.toml: the release profile without cross-crate LTO, 16 codegen units)",
    "release": "`release` (the shipped binaries: fat LTO, one codegen unit)",
}

UPSTREAM_PORT, NGINX_PROXY_PORT, SIDECAR_PORT, SIDECAR_ADMIN = 18443, 18080, 15080, 15081
WEBHOOK_PORT, WEBHOOK_ADMIN, STATIC_TLS_PORT = 18444, 19090, 18445
CALLGRIND_PORT, CALLGRIND_ADMIN, NGINX_CALLGRIND_PORT = 15090, 15091, 18090


def cpu_count(spec):
    count = 0
    for part in spec.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


WORKERS = cpu_count(CPUS)


def log(message):
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


class Bench:
    def __init__(self, target, work):
        # One profile's directory holds the binaries measured and the fakes run (bench/run.sh).
        self.bin = Path(target)
        self.work = Path(work)
        self.procs = []
        self.results = {}
        self.commands = []

    # ---- processes -------------------------------------------------------------------------

    def spawn(self, name, argv, env=None, pin=False):
        argv = [str(a) for a in argv]
        if pin:
            argv = ["taskset", "-c", CPUS] + argv
        self.commands.append(" ".join(argv))
        out = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self, proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self):
        # SIGTERM first: an nginx master killed outright leaves its workers holding the ports.
        for proc in reversed(self.procs):
            self.stop(proc)

    # ---- nginx -----------------------------------------------------------------------------

    def nginx(self, name, workers, servers, pin):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        return self.spawn(name, [nginx, "-c", self.nginx_conf(name, workers, servers)], pin=pin)

    def nginx_conf(self, name, workers, servers, master=True):
        conf = self.work / f"{name}.conf"
        temp = self.work / f"{name}-temp"
        temp.mkdir(exist_ok=True)
        conf.write_text(
            f"""worker_processes {workers};
master_process {"on" if master else "off"};
daemon off;
pid {self.work}/{name}.pid;
error_log {self.work}/{name}-error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
  uwsgi_temp_path {temp}; scgi_temp_path {temp};
{servers}
}}
"""
        )
        return conf

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def wait_http(url, timeout=30.0, headers=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                code = http_get(url, headers)[0]
                if code == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def wrk(self, url, connections, seconds=SECONDS, script=None):
        argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
        if script:
            argv += ["-s", str(script)]
        argv.append(url)
        self.commands.append(" ".join(argv))
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        p50 = to_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
        p99 = to_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
        return {"rps": rps, "requests": total, "p50": p50, "p99": p99, "errors": int(errors.group(1)) if errors else 0}

    def measured(self, pids, url, connections, script=None):
        """wrk against url, with the CPU the processes `pids()` used per 1,000 requests."""
        before = sum(cpu_ticks(pid) for pid in pids())
        switches_before = sum(context_switches(pid) for pid in pids())
        run = self.wrk(url, connections, script=script)
        after = sum(cpu_ticks(pid) for pid in pids())
        run["cpu_per_1k"] = (after - before) / CLK_TCK / max(run["requests"], 1) * 1000
        switches = sum(context_switches(pid) for pid in pids()) - switches_before
        run["switches_per_req"] = switches / max(run["requests"], 1)
        run["rss_mib"] = sum(rss_kib(pid)[0] for pid in pids()) / 1024
        return run

    def alternate(self, label, paths, connections, script=None):
        """Rounds of A/B: median per path of every figure."""
        runs = {name: [] for name in paths}
        for round_ in range(ROUNDS):
            for name, (url, pids) in paths.items():
                run = self.measured(pids, url, connections, script)
                runs[name].append(run)
                log(
                    f"{label} c={connections} round {round_ + 1} {name:8} {run['rps']:10.0f} req/s "
                    f"p50 {run['p50']:.3f} ms p99 {run['p99']:.3f} ms cpu/1k {run['cpu_per_1k']:.4f} s "
                    f"rss {run['rss_mib']:.1f} MiB switches/req {run['switches_per_req']:.2f}" + (f" NON-2XX {run['errors']}" if run["errors"] else "")
                )
        return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}

    # ---- the sidecar against nginx ---------------------------------------------------------

    def start_fakes(self, name, delay_ms=0):
        directory = self.work / name
        env = dict(os.environ, WIPROXY_FAKES_METADATA_DELAY_MS=str(delay_ms))
        self.spawn(name, [self.bin / "wiproxy-fakes", directory], env=env)
        for _ in range(300):
            if (directory / "env").exists():
                break
            time.sleep(0.05)
        values = dict(line.split("=", 1) for line in (directory / "env").read_text().split())
        return directory, values

    def sidecar_env(self, fakes_env, ca, upstreams, port, admin, extra=None):
        env = {
            "PATH": os.environ.get("PATH", ""),
            "WIPROXY_UPSTREAMS": upstreams,
            "WIPROXY_RESOLVE": f"bench.example.com=127.0.0.1:{UPSTREAM_PORT}",
            "WIPROXY_EXTRA_CA_FILE": str(ca),
            "WIPROXY_LISTEN": f"127.0.0.1:{port}",
            "WIPROXY_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "WIPROXY_LOG": "warn",
        }
        env.update(fakes_env)
        env.update(extra or {})
        return env

    def proxies(self):
        log(f"proxies pinned to cpus {CPUS} ({WORKERS} nginx workers), upstream: one nginx of its own")
        fakes_dir, fakes_env = self.start_fakes("fakes")
        self.fakes_dir, self.fakes_env = fakes_dir, fakes_env
        upstream = self.nginx(
            "upstream",
            1,
            f"""  server {{
    listen 127.0.0.1:{UPSTREAM_PORT} ssl;
    ssl_certificate {fakes_dir}/upstream.crt;
    ssl_certificate_key {fakes_dir}/upstream.key;
    keepalive_requests 1000000;
    location / {{ return 200 "ok\\n"; }}
  }}""",
            pin=False,
        )
        self.proxy_servers = lambda port: f"""  upstream function {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    location / {{
      proxy_pass https://function/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host bench.example.com;
      proxy_set_header Authorization "Bearer eyJhbGciOiJSUzI1NiJ9.fixed.token";
      proxy_ssl_server_name on;
      proxy_ssl_name bench.example.com;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {fakes_dir}/ca.pem;
      proxy_ssl_session_reuse on;
    }}
  }}"""
        proxy = self.nginx("nginx-proxy", WORKERS, self.proxy_servers(NGINX_PROXY_PORT), pin=True)
        # The connection cap (256 by default) raised past the idle-connection step's 10,000, as a
        # platform team would for an app that keeps that many open.
        env = self.sidecar_env(
            fakes_env, fakes_dir / "ca.pem", "bench=https://bench.example.com", SIDECAR_PORT, SIDECAR_ADMIN,
            {"WIPROXY_MAX_CONNECTIONS": "12000"},
        )
        started = time.monotonic()
        sidecar = self.spawn("wiproxy", [self.bin / "wiproxy"], env=env, pin=True)
        assert self.wait_http(f"http://127.0.0.1:{SIDECAR_ADMIN}/readyz"), "the sidecar never got ready"
        ready = time.monotonic() - started
        assert self.wait_http(f"http://127.0.0.1:{SIDECAR_PORT}/bench/"), "the sidecar does not forward"
        assert self.wait_http(f"http://127.0.0.1:{NGINX_PROXY_PORT}/"), "nginx does not forward"
        assert upstream.poll() is None
        idle = rss_kib(sidecar.pid)[0] / 1024
        log(f"sidecar ready in {ready * 1000:.0f} ms, idle RSS {idle:.1f} MiB")
        for url in (f"http://127.0.0.1:{NGINX_PROXY_PORT}/", f"http://127.0.0.1:{SIDECAR_PORT}/bench/"):
            self.wrk(url, 64, seconds=1)
        paths = {
            "nginx": (f"http://127.0.0.1:{NGINX_PROXY_PORT}/", lambda: family(proxy.pid)),
            "wiproxy": (f"http://127.0.0.1:{SIDECAR_PORT}/bench/", lambda: [sidecar.pid]),
        }
        self.results["proxy"] = {c: self.alternate("proxy", paths, c) for c in (8, 64)}
        self.results["sidecar_rss"] = {"idle": idle, "peak": rss_kib(sidecar.pid)[1] / 1024, "ready_ms": ready * 1000}
        self.results["binary_kib"] = (self.bin / "wiproxy").stat().st_size / 1024
        self.idle_connections(sidecar)
        self.stop(sidecar)
        self.stop(proxy)

    def idle_connections(self, sidecar, count=10_000):
        """RSS the sidecar adds for `count` kept-alive connections, each after one request."""
        before = rss_kib(sidecar.pid)[0]
        request = b"GET /bench/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        sockets = []
        try:
            # A few at a time, as an app's connection pool grows: the upstream pool stays small,
            # so what grows is what the idle inbound connections cost.
            for start in range(0, count, 8):
                batch = []
                for _ in range(min(8, count - start)):
                    s = socket.create_connection(("127.0.0.1", SIDECAR_PORT))
                    s.sendall(request)
                    batch.append(s)
                for s in batch:
                    s.settimeout(30)
                    data = b""
                    while not data.endswith(b"ok\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            raise RuntimeError("the sidecar closed a connection")
                        data += chunk
                sockets += batch
            time.sleep(1)
            after = rss_kib(sidecar.pid)[0]
            open_now = count_connections(sidecar.pid)
        finally:
            for s in sockets:
                s.close()
        added = (after - before) / 1024
        self.results["idle_connections"] = {"count": len(sockets), "open": open_now, "added_mib": added}
        log(f"{len(sockets)} idle keep-alive connections ({open_now} open sockets): RSS +{added:.1f} MiB")

    def many_upstreams(self, count=32, delay_ms=100):
        """Ready time and metadata fetch concurrency with `count` upstreams, each its own audience."""
        fakes_dir, fakes_env = self.start_fakes("fakes-slow", delay_ms)
        upstreams = ",".join(f"u{i}=https://bench.example.com/u{i}" for i in range(count))
        env = self.sidecar_env(fakes_env, fakes_dir / "ca.pem", upstreams, 15100, 15101)
        started = time.monotonic()
        sidecar = self.spawn("wiproxy-32", [self.bin / "wiproxy"], env=env, pin=True)
        ok = self.wait_http("http://127.0.0.1:15101/readyz", timeout=60)
        ready = time.monotonic() - started
        stats = json.loads(
            http_get(
                f"http://{fakes_env['GCE_METADATA_HOST']}/fake/stats", {"Metadata-Flavor": "Google"}
            )[1]
        )
        self.stop(sidecar)
        self.results["upstreams"] = {
            "count": count,
            "delay_ms": delay_ms,
            "ready_ms": ready * 1000 if ok else None,
            "max_in_flight": stats["max_in_flight"],
            "fetches": stats["identity_fetches"],
        }
        log(
            f"{count} upstreams, metadata server answering in {delay_ms} ms: ready in {ready * 1000:.0f} ms, "
            f"at most {stats['max_in_flight']} fetches at once ({stats['identity_fetches']} in all)"
        )

    # ---- instruction counts ----------------------------------------------------------------

    def callgrind(self, name, argv, env=None, drive=None, wake=None):
        """Instructions (Ir) of one run of argv under callgrind; `drive` runs against it, and
        `wake` after SIGTERM (valgrind acts on a signal once the process leaves its syscall)."""
        out = self.work / f"callgrind.{name}.out"
        full = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + [str(a) for a in argv]
        self.commands.append(" ".join(full))
        log_file = open(self.work / f"callgrind.{name}.log", "w")
        proc = subprocess.Popen(full, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        if drive:
            try:
                drive()
            finally:
                proc.send_signal(signal.SIGTERM)
                if wake:
                    wake()
        proc.wait(timeout=300)
        for line in out.read_text().splitlines():
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in {out}")

    def instructions(self):
        fixture = ROOT / "webhook/tests/fixtures/review-pod.json"
        policy = ROOT / "examples/policy.yaml"
        cluster = ROOT / "webhook/tests/golden/cluster.yaml"
        driver = self.bin / "examples/review-cost"
        counts = {}
        for n in (100, 1100):
            counts[n] = self.callgrind(f"review-{n}", [driver, fixture, policy, cluster, n])
        per_review = (counts[1100] - counts[100]) / 1000
        log(f"instructions per review (/mutate, 3.5 kB pod review, injected): {per_review:,.0f}")

        env = self.sidecar_env(
            self.fakes_env, self.fakes_dir / "ca.pem", "bench=https://bench.example.com", CALLGRIND_PORT, CALLGRIND_ADMIN
        )
        totals = {}
        for n in (200, 2200):

            def drive(n=n):
                assert self.wait_http(f"http://127.0.0.1:{CALLGRIND_ADMIN}/readyz", timeout=120), "no readiness"
                sequential_requests(CALLGRIND_PORT, "/bench/", n)

            totals[n] = self.callgrind(f"sidecar-{n}", [self.bin / "wiproxy"], env=env, drive=drive)
        per_request = (totals[2200] - totals[200]) / 2000
        log(f"instructions per proxied request (sidecar, HTTP/1.1 keep-alive in, HTTPS out): {per_request:,.0f}")

        # nginx proxying the same requests, one process (no master), under callgrind too.
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.nginx_conf("nginx-callgrind", 1, self.proxy_servers(NGINX_CALLGRIND_PORT), master=False)
        nginx_totals = {}
        for n in (200, 2200):

            def drive(n=n):
                assert self.wait_http(f"http://127.0.0.1:{NGINX_CALLGRIND_PORT}/bench/", timeout=120), "nginx under callgrind never answered"
                sequential_requests(NGINX_CALLGRIND_PORT, "/bench/", n)

            def wake():
                # nginx waits in epoll_wait until its next timer (60 s) unless a client calls.
                try:
                    socket.create_connection(("127.0.0.1", NGINX_CALLGRIND_PORT), timeout=1).close()
                except OSError:
                    pass

            nginx_totals[n] = self.callgrind(f"nginx-{n}", [nginx, "-c", conf], drive=drive, wake=wake)
        nginx_per_request = (nginx_totals[2200] - nginx_totals[200]) / 2000
        log(f"instructions per proxied request (nginx, the same requests): {nginx_per_request:,.0f}")
        self.results["instructions"] = {"review": per_review, "request": per_request, "nginx_request": nginx_per_request}

    # ---- the webhook against nginx serving a static body over TLS --------------------------

    def webhook_serve(self, name, port, admin, extra, env=None):
        argv = [
            self.bin / "wiproxy-webhook", "--log", "warn", "serve",
            "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
            "--tls-cert-file", self.fakes_dir / "upstream.crt", "--tls-key-file", self.fakes_dir / "upstream.key",
            "--gke-autopilot", "false",
        ] + extra
        return self.spawn(name, argv, env=env, pin=True)

    def review_script(self):
        """The wrk script that posts the review fixture."""
        fixture = ROOT / "webhook/tests/fixtures/review-pod.json"
        script = self.work / "review.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {lua_string(fixture.read_text())}\n"
        )
        return script

    def webhook(self):
        fixture = ROOT / "webhook/tests/fixtures/review-pod.json"
        script = self.review_script()
        files = ["--policy-file", ROOT / "examples/policy.yaml", "--cluster-file", ROOT / "webhook/tests/golden/cluster.yaml"]
        webhook = self.webhook_serve("webhook", WEBHOOK_PORT, WEBHOOK_ADMIN, files)
        assert self.wait_http(f"http://127.0.0.1:{WEBHOOK_ADMIN}/readyz"), "the webhook never got ready"
        answer = https_post(WEBHOOK_PORT, "/mutate", fixture.read_bytes())
        assert json.loads(answer)["response"]["allowed"] is True, answer
        body = self.work / "static"
        body.mkdir(exist_ok=True)
        (body / "mutate").write_bytes(answer)
        static = self.nginx(
            "nginx-static",
            WORKERS,
            f"""  server {{
    listen 127.0.0.1:{STATIC_TLS_PORT} ssl;
    ssl_certificate {self.fakes_dir}/upstream.crt;
    ssl_certificate_key {self.fakes_dir}/upstream.key;
    keepalive_requests 1000000;
    root {body};
    # The webhook's own answer as a static file; a POST to a static file is 405 in nginx, so
    # the 405 is answered with the file.
    default_type application/json;
    error_page 405 =200 $uri;
  }}""",
            pin=True,
        )
        time.sleep(0.3)
        assert https_post(STATIC_TLS_PORT, "/mutate", fixture.read_bytes()) == answer, "nginx serves another body"
        for port in (STATIC_TLS_PORT, WEBHOOK_PORT):
            self.wrk(f"https://127.0.0.1:{port}/mutate", 32, seconds=1, script=script)
        paths = {
            "nginx": (f"https://127.0.0.1:{STATIC_TLS_PORT}/mutate", lambda: family(static.pid)),
            "webhook": (f"https://127.0.0.1:{WEBHOOK_PORT}/mutate", lambda: [webhook.pid]),
        }
        self.results["webhook"] = {c: self.alternate("review", paths, c, script) for c in (32, 4)}
        self.results["review_size"] = (len(fixture.read_bytes()), len(answer))
        self.stop(webhook)
        self.stop(static)
        self.script = script

    def policies_curve(self):
        """Review p99 at 4 connections with 1, 100 and 1,000 policies (the pod's policy last)."""
        example = (ROOT / "examples/policy.yaml").read_text()
        curve = {}
        for count in (1, 100, 1000):
            others = "".join(
                f"""---
apiVersion: wiproxy.io/v1alpha1
kind: TokenProxyPolicy
metadata: {{name: team-{i}}}
spec:
  namespaceSelector: {{matchLabels: {{team: team-{i}}}}}
  serviceAccounts: ["*@team-{i}.iam.gserviceaccount.com"]
  upstreams: ["https://europe-west1-team-{i}.cloudfunctions.net/"]
"""
                for i in range(count - 1)
            )
            path = self.work / f"policies-{count}.yaml"
            path.write_text(others + "---\n" + example)
            files = ["--policy-file", path, "--cluster-file", ROOT / "webhook/tests/golden/cluster.yaml"]
            webhook = self.webhook_serve(f"webhook-policies-{count}", 18450, 19091, files)
            assert self.wait_http("http://127.0.0.1:19091/readyz"), "the webhook never got ready"
            run = self.measured(lambda: [webhook.pid], "https://127.0.0.1:18450/mutate", 4, self.script)
            curve[count] = run
            log(f"{count:5} policies: review p99 {run['p99']:.3f} ms, {run['rps']:.0f} req/s at 4 connections")
            self.stop(webhook)
        self.results["policies"] = curve

    def kube_webhook(self, accounts, namespaces, port, admin):
        """The fake API server with `accounts` ServiceAccounts in `namespaces` namespaces, and a
        webhook against it, ready: (fake, webhook, figures of the start)."""
        fake = self.bin / "wiproxy-fake-kube"
        directory = self.work / f"kube-{accounts}"
        server = self.spawn(
            f"fake-kube-{accounts}",
            [fake, "--namespaces", namespaces, "--service-accounts", accounts, "--dir", directory],
        )
        for _ in range(1200):
            if (directory / "kubeconfig").exists():
                break
            time.sleep(0.05)
        assert (directory / "kubeconfig").exists(), "the fake API server never wrote its kubeconfig"
        env = dict(os.environ, KUBECONFIG=str(directory / "kubeconfig"))
        fake_cpu = cpu_ticks(server.pid)
        started = time.monotonic()
        webhook = self.webhook_serve(
            f"webhook-kube-{accounts}", port, admin,
            ["--policy-file", ROOT / "examples/policy.yaml", "--native-sidecars", "never"], env=env,
        )
        ok = self.wait_http(f"http://127.0.0.1:{admin}/readyz", timeout=120)
        synced = time.monotonic() - started
        figures = {
            "namespaces": namespaces, "sync_s": synced if ok else None,
            "sync_cpu_s": cpu_ticks(webhook.pid) / CLK_TCK, "fake_cpu_s": (cpu_ticks(server.pid) - fake_cpu) / CLK_TCK,
        }
        time.sleep(0.5)
        rss, synced_hwm = rss_kib(webhook.pid)
        figures.update(rss_mib=rss / 1024, synced_hwm_mib=synced_hwm / 1024)
        answer = https_post(port, "/mutate", (ROOT / "webhook/tests/fixtures/review-pod.json").read_bytes())
        assert json.loads(answer)["response"]["allowed"] is True, answer
        return server, webhook, figures

    def cluster_curve(self):
        """Webhook RSS and initial sync time against the fake API server, and review p99 at each size.

        The fake (tests/src/apiserver.rs) serves N Namespaces and ServiceAccounts over HTTPS, with
        their managed fields and last-applied annotations as kubectl leaves them, plus the review
        fixture's namespace and ServiceAccount; the webhook lists them in pages of 500, then
        watches. Sync time runs from the webhook's start to its first 200 on /readyz (the
        webhook's and the fake's CPU seconds in that time are reported beside it); the peak RSS
        is read after the review load. The empty cluster's webhook stays up, and its rounds
        alternate with each size's (A/B/A/B, medians of p99 at 4 connections), so the comparison
        holds on a busy machine.
        """
        if not (self.bin / "wiproxy-fake-kube").exists():
            log("no fake API server built: cluster curve skipped")
            return
        curve = {}
        _, empty, figures = self.kube_webhook(0, 0, 18460, 19092)
        curve[0] = figures
        url = "https://127.0.0.1:{}/mutate"
        for accounts, namespaces in ((1_000, 100), (10_000, 1_000), (100_000, 10_000)):
            server, webhook, figures = self.kube_webhook(accounts, namespaces, 18461, 19093)
            paths = {"empty": (url.format(18460), lambda: [empty.pid]), "cluster": (url.format(18461), lambda: [webhook.pid])}
            runs = self.alternate(f"review, {accounts} ServiceAccounts", paths, 4, self.script)
            figures.update(hwm_mib=rss_kib(webhook.pid)[1] / 1024, p99=runs["cluster"]["p99"], empty_p99=runs["empty"]["p99"])
            curve[accounts] = figures
            log(
                f"{accounts:7} ServiceAccounts in {namespaces:6} namespaces: synced in {figures['sync_s']:.2f} s "
                f"(webhook CPU {figures['sync_cpu_s']:.2f} s, fake API server CPU {figures['fake_cpu_s']:.2f} s), "
                f"RSS {figures['rss_mib']:.1f} MiB (peak {figures['hwm_mib']:.1f} under load), "
                f"review p99 {figures['p99']:.3f} ms vs {figures['empty_p99']:.3f} ms empty"
            )
            self.stop(webhook)
            self.stop(server)
        curve[0].update(hwm_mib=rss_kib(empty.pid)[1] / 1024, p99=statistics.median(c["empty_p99"] for c in list(curve.values())[1:]))
        self.results["cluster"] = curve

    def cluster_instructions(self, reviews=200):
        """Instructions per review (callgrind) by the webhook against an empty cluster and one of
        100k ServiceAccounts in 10k namespaces, after the sync: the comparison noise cannot move."""
        fake = self.bin / "wiproxy-fake-kube"
        if not fake.exists():
            return
        body = (ROOT / "webhook/tests/fixtures/review-pod.json").read_bytes()
        counts = {}
        for accounts, namespaces in ((0, 0), (100_000, 10_000)):
            directory = self.work / f"kube-callgrind-{accounts}"
            server = self.spawn(
                f"fake-kube-callgrind-{accounts}",
                [fake, "--namespaces", namespaces, "--service-accounts", accounts, "--dir", directory],
            )
            for _ in range(1200):
                if (directory / "kubeconfig").exists():
                    break
                time.sleep(0.05)
            out = self.work / f"callgrind.cluster-{accounts}.out"
            webhook = self.spawn(
                f"webhook-callgrind-{accounts}",
                [
                    "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", self.bin / "wiproxy-webhook",
                    "--log", "warn", "serve", "--listen", "127.0.0.1:18462", "--admin-listen", "127.0.0.1:19094",
                    "--tls-cert-file", self.fakes_dir / "upstream.crt", "--tls-key-file", self.fakes_dir / "upstream.key",
                    "--gke-autopilot", "false", "--policy-file", ROOT / "examples/policy.yaml", "--native-sidecars", "never",
                ],
                env=dict(os.environ, KUBECONFIG=str(directory / "kubeconfig")),
            )
            assert self.wait_http("http://127.0.0.1:19094/readyz", timeout=300), "the webhook under callgrind never got ready"
            post = https_session(18462)
            for _ in range(20):
                post("/mutate", body)
            subprocess.run(["callgrind_control", "-z", str(webhook.pid)], capture_output=True, check=True)
            for _ in range(reviews):
                post("/mutate", body)
            subprocess.run(["callgrind_control", "-d", str(webhook.pid)], capture_output=True, check=True)
            self.stop(webhook)
            self.stop(server)
            dump = Path(f"{out}.1")
            totals = [int(line.split()[1]) for line in dump.read_text().splitlines() if line.startswith(("summary:", "totals:"))]
            counts[accounts] = totals[0] / reviews
        log(
            f"instructions per review after the sync: {counts[0]:,.0f} with an empty cluster, {counts[100_000]:,.0f} "
            f"with 100k ServiceAccounts ({(counts[100_000] / counts[0] - 1) * 100:+.1f} %)"
        )
        self.results["cluster_instructions"] = counts

    # ---- the report ------------------------------------------------------------------------

    def report(self, path):
        r = self.results
        lines = ["# Benchmark results", ""]
        lines += [
            "Written by `make bench` (bench/run.sh, bench/bench.py). Ratios and instruction counts compare;",
            "absolute figures are this machine's, with wrk, the upstream and the proxies sharing its cores.",
            "",
            "## Machine",
            "",
            f"- CPU: {cpu_model()}, {os.cpu_count()} cores; proxies pinned to cpus {CPUS}, nginx with {WORKERS} workers",
            f"- Memory: {mem_total_gib():.1f} GiB; kernel {platform.release()}; {nginx_version()}; {tool_version(['wrk', '-v'])}",
            f"- {tool_version(['valgrind', '--version'])}; {ROUNDS} rounds of {SECONDS} s per figure, medians",
            f"- Binaries: cargo profile {PROFILES.get(PROFILE, f'`{PROFILE}`')}",
            f"- Total run time: {time.monotonic() - STARTED:.0f} s",
            "",
        ]
        goals = []
        if "proxy" in r:
            lines += ["## Sidecar against nginx (same cores, same upstream)", ""]
            lines += [
                "| connections | proxy | req/s | p50 ms | p99 ms | CPU s per 1,000 req | context switches per req | RSS MiB |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for c, paths in r["proxy"].items():
                for name, run in paths.items():
                    lines.append(
                        f"| {c} | {name} | {run['rps']:,.0f} | {run['p50']:.3f} | {run['p99']:.3f} | {run['cpu_per_1k']:.4f} | {run['switches_per_req']:.2f} | {run['rss_mib']:.1f} |"
                    )
            lines += [
                "",
                "Context switches: voluntary and involuntary, of every thread of the proxy's processes, per request: a thread",
                "switches out each time it waits for work (epoll, a futex).",
            ]
            p64, p8 = r["proxy"][64], r["proxy"][8]
            ratio = p64["wiproxy"]["rps"] / p64["nginx"]["rps"]
            goals.append(("Sidecar req/s ≥ 1.0× nginx at 64 connections", f"{ratio:.2f}×", ratio >= 1.0))
            p50 = p8["wiproxy"]["p50"] / p8["nginx"]["p50"] - 1
            goals.append(("Sidecar p50 at 8 connections within 10 % of nginx", f"{p50 * 100:+.0f} %", p50 <= 0.10))
            for c in (8, 64):
                w, n = r["proxy"][c]["wiproxy"], r["proxy"][c]["nginx"]
                goals.append((f"Sidecar p99 ≤ nginx at {c} connections", f"{w['p99']:.3f} vs {n['p99']:.3f} ms", w["p99"] <= n["p99"]))
                goals.append(
                    (f"Sidecar CPU per 1,000 requests ≤ nginx at {c} connections", f"{w['cpu_per_1k']:.4f} vs {n['cpu_per_1k']:.4f} s", w["cpu_per_1k"] <= n["cpu_per_1k"])
                )
            lines.append("")
        if "sidecar_rss" in r:
            s = r["sidecar_rss"]
            lines += [f"Sidecar: ready in {s['ready_ms']:.0f} ms, RSS idle {s['idle']:.1f} MiB, peak under load {s['peak']:.1f} MiB, binary {r['binary_kib'] / 1024:.2f} MiB.", ""]
            goals.append(("Sidecar RSS ≤ 10 MiB idle", f"{s['idle']:.1f} MiB", s["idle"] <= 10))
            goals.append(("Sidecar RSS ≤ 20 MiB loaded", f"{s['peak']:.1f} MiB", s["peak"] <= 20))
            goals.append(("Sidecar binary ≤ 8 MiB", f"{r['binary_kib'] / 1024:.2f} MiB", r["binary_kib"] <= 8 * 1024))
        if "idle_connections" in r:
            i = r["idle_connections"]
            lines += [f"{i['count']:,} idle keep-alive connections (one request each) add {i['added_mib']:.1f} MiB to the sidecar's RSS.", ""]
            goals.append(("10,000 idle sidecar connections add ≤ 20 MiB", f"{i['added_mib']:.1f} MiB", i["added_mib"] <= 20))
        if "upstreams" in r:
            u = r["upstreams"]
            lines += [
                f"{u['count']} upstreams (one audience each), fake metadata server answering in {u['delay_ms']} ms: ready in "
                f"{u['ready_ms']:.0f} ms, at most {u['max_in_flight']} identity fetches at once ({u['fetches']} in all).",
                "",
            ]
            goals.append(("32 upstreams ready ≤ 1 s, fetches bounded", f"{u['ready_ms']:.0f} ms, ≤ {u['max_in_flight']} at once", u["ready_ms"] <= 1000 and u["max_in_flight"] < u["count"]))
        if "webhook" in r:
            size_in, size_out = r["review_size"]
            lines += [f"## Webhook /mutate against nginx serving the same answer ({size_out:,} bytes) as a static body over TLS", ""]
            lines += [f"The review is webhook/tests/fixtures/review-pod.json ({size_in:,} bytes), injected.", ""]
            lines += ["| connections | server | req/s | p50 ms | p99 ms | CPU s per 1,000 req | RSS MiB |", "|---|---|---|---|---|---|---|"]
            for c, paths in r["webhook"].items():
                for name, run in paths.items():
                    lines.append(
                        f"| {c} | {name} | {run['rps']:,.0f} | {run['p50']:.3f} | {run['p99']:.3f} | {run['cpu_per_1k']:.4f} | {run['rss_mib']:.1f} |"
                    )
            lines.append("")
            w32 = r["webhook"][32]
            ratio = w32["webhook"]["rps"] / w32["nginx"]["rps"]
            goals.append(("Webhook ≥ 0.3× static-TLS nginx (32 connections)", f"{ratio:.2f}×", ratio >= 0.3))
            p99 = r["webhook"][4]["webhook"]["p99"]
            goals.append(("Webhook p99 ≤ 1 ms at 4 connections", f"{p99:.3f} ms", p99 <= 1.0))
        if "instructions" in r:
            ins = r["instructions"]
            lines += ["## Instructions (valgrind --tool=callgrind, difference of two fixed counts)", ""]
            lines += [
                f"- per review (`review-cost`: parse, decide, respond, serialise; 1,100 minus 100 reviews): {ins['review']:,.0f}",
                f"- per proxied request (the sidecar process, 2,200 minus 200 sequential keep-alive requests): {ins['request']:,.0f}",
                f"- per proxied request by nginx (one process, no master; the same requests to the same upstream): {ins['nginx_request']:,.0f}"
                f" ({ins['request'] / ins['nginx_request']:.2f}× for the sidecar)",
                "",
                "User-space instructions only: callgrind does not see the kernel.",
                "",
            ]
            base = BASELINE_INSTRUCTIONS_PER_REVIEW
            goals.append(("Instructions per review at least halved", f"{ins['review']:,.0f} vs {base:,} before ({ins['review'] / base:.2f}×)", ins["review"] <= base / 2))
        if "policies" in r:
            lines += ["## Review p99 by number of policies (4 connections)", "", "| policies | req/s | p99 ms |", "|---|---|---|"]
            for count, run in r["policies"].items():
                lines.append(f"| {count:,} | {run['rps']:,.0f} | {run['p99']:.3f} |")
            lines.append("")
        if "cluster" in r:
            lines += ["## Webhook against the fake API server (list in pages of 500, then watch)", ""]
            lines += [
                "The fake (`wiproxy-fake-kube`, tests/src/apiserver.rs, built in the same profile, at opt-level 1 under `measure`) serves the Namespaces and ServiceAccounts",
                "over HTTPS with their managed fields and last-applied annotations, plus the review fixture's namespace and",
                "ServiceAccount. Sync: from the webhook's start to its first ready `/readyz`, with the CPU seconds the webhook and",
                "the fake spent meanwhile. Peak RSS: after the review load. p99: median of the rounds at 4 connections, each",
                "alternating with the empty cluster's webhook (its own figure in the last column).",
                "",
            ]
            lines += [
                "| ServiceAccounts | Namespaces | initial sync s | webhook CPU s | fake CPU s | RSS MiB | peak RSS MiB | review p99 ms | empty p99 ms |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for accounts, c in r["cluster"].items():
                sync = f"{c['sync_s']:.2f}" if c["sync_s"] is not None else "never"
                lines.append(
                    f"| {accounts:,} | {c['namespaces']:,} | {sync} | {c['sync_cpu_s']:.2f} | {c['fake_cpu_s']:.2f} | {c['rss_mib']:.1f} "
                    f"| {c['hwm_mib']:.1f} | {c['p99']:.3f} | {c.get('empty_p99', c['p99']):.3f} |"
                )
            lines.append("")
            counts = r.get("cluster_instructions")
            if counts:
                lines += [
                    "Instructions per review after the sync (callgrind, 200 reviews on one connection): "
                    f"{counts[0]:,.0f} with an empty cluster, {counts[100_000]:,.0f} with 100k ServiceAccounts "
                    f"({(counts[100_000] / counts[0] - 1) * 100:+.1f} %).",
                    "",
                ]
            top = r["cluster"].get(100_000)
            if top:
                goals.append(("100k SAs + 10k NS: webhook RSS ≤ 64 MiB", f"{top['rss_mib']:.1f} MiB (peak {top['hwm_mib']:.1f})", top["hwm_mib"] <= 64))
                goals.append(("100k SAs + 10k NS: initial sync ≤ 10 s", f"{top['sync_s']:.2f} s", top["sync_s"] is not None and top["sync_s"] <= 10))
                slower = top["p99"] / top["empty_p99"] - 1
                measured = f"{top['p99']:.3f} vs {top['empty_p99']:.3f} ms ({slower * 100:+.0f} %)"
                if counts:
                    measured += f"; instructions per review {(counts[100_000] / counts[0] - 1) * 100:+.1f} %"
                goals.append(("100k SAs + 10k NS: review p99 within 10 % of empty", measured, slower <= 0.10))
        if "cluster" not in r:
            lines += [
                "## Webhook against a fake API server",
                "",
                "Not measured: the fake API server (`wiproxy-fake-kube`) is not built.",
                "",
            ]
            for goal in ("webhook RSS ≤ 64 MiB", "initial sync ≤ 10 s", "review p99 within 10 % of empty"):
                goals.append((f"100k SAs + 10k NS: {goal}", "not measured", False))
        lines += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {goal} | {value} | {'met' if met else 'short'} |" for goal, value, met in goals]
        lines += ["", "## Commands", "", "```"] + self.commands + ["```", ""]
        Path(path).write_text("\n".join(lines))
        print("\n".join(lines[lines.index("## Goals"):lines.index("## Commands")]))


# Instructions per review before the review was parsed once (Value → AdmissionReview<DynamicObject>
# → Value → Pod, the response built as a Value), measured by this script's callgrind step.
BASELINE_INSTRUCTIONS_PER_REVIEW = 774_947


def http_get(url, headers=None):
    host, _, path = url.removeprefix("http://").partition("/")
    name, _, port = host.partition(":")
    conn = http.client.HTTPConnection(name, int(port), timeout=5)
    try:
        conn.request("GET", "/" + path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def https_post(port, path, body):
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        return conn.getresponse().read()
    finally:
        conn.close()


def https_session(port):
    """POSTs over one kept-alive HTTPS connection (the server's certificate unchecked)."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=120)

    def post(path, body):
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = response.read()
        assert response.status == 200, answer
        return answer

    return post


def sequential_requests(port, path, count):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(count):
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
    conn.close()


def to_ms(value):
    number = float(re.match(r"[\d.]+", value).group(0))
    if value.endswith("us"):
        return number / 1000
    if value.endswith("ms"):
        return number
    if value.endswith("m"):
        return number * 60_000
    return number * 1000


def cpu_ticks(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])


def context_switches(pid):
    """Voluntary and involuntary context switches of every thread of pid so far: a thread that
    waits for work (epoll, a futex) switches out once per wait."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def rss_kib(pid):
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except FileNotFoundError:
        pass
    return rss, hwm


def family(pid):
    """pid and its children (nginx's master and workers)."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            pids.append(int(stat.parent.name))
    return pids


def count_connections(pid):
    try:
        return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).startswith("socket:"))
    except OSError:
        return -1


def lua_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_gib():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0


def nginx_version():
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()


def tool_version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return f"{argv[0]}: unknown"


def main():
    global PROFILE
    target = sys.argv[1]
    PROFILE = sys.argv[2] if len(sys.argv) > 2 else "release"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, PermissionError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = tempfile.mkdtemp(prefix="wiproxy-bench-")
    # nginx's workers run as an unprivileged user and read the static body from here.
    os.chmod(work, 0o755)
    bench = Bench(target, work)
    # BENCH_ONLY=cluster measures the cluster curve alone (minutes less, fewer binaries) and
    # prints its report instead of writing bench/RESULTS.md.
    only = os.environ.get("BENCH_ONLY")
    try:
        if only == "cluster":
            bench.fakes_dir, bench.fakes_env = bench.start_fakes("fakes")
            bench.script = bench.review_script()
            bench.cluster_curve()
            bench.cluster_instructions()
        elif only:
            sys.exit(f"BENCH_ONLY={only}: only 'cluster' is known")
        else:
            bench.proxies()
            bench.many_upstreams()
            bench.instructions()
            bench.webhook()
            bench.policies_curve()
            bench.cluster_curve()
            bench.cluster_instructions()
    finally:
        bench.stop_all()
        if os.environ.get("BENCH_KEEP"):
            log(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if only:
        partial = Path(work).with_name(Path(work).name + "-RESULTS.md")
        bench.report(partial)
        log(f"BENCH_ONLY={only}: wrote {partial}, bench/RESULTS.md left as it was")
        return
    bench.report(ROOT / "bench/RESULTS.md")
    log("wrote bench/RESULTS.md")


if __name__ == "__main__":
    main()
