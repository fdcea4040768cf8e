"""Checks the chart's optional extras: the PrometheusRule, the Grafana dashboard ConfigMap and the
NetworkPolicy.

kubernetes-validate knows the built-in kinds only, so the Makefile validates the ConfigMap and the
NetworkPolicy with it (`split` writes the render without the PrometheusRule), and this script checks
the PrometheusRule's shape against a small schema of the Prometheus Operator's CRD (the fields the
chart uses), and that every metric and label the alerts and the dashboard query is one the webhook
or the sidecar exports (read from their metrics.rs).

usage: check_extras.py none RENDERED                 the defaults render none of the extras
       check_extras.py split RENDERED OUT            RENDERED minus the PrometheusRule, into OUT
       check_extras.py all RENDERED METRICS_RS...    every extra, self-signed mode
       check_extras.py cert-manager RENDERED METRICS_RS...  the certificate-expiry alert
"""
import json
import re
import sys

import jsonschema
import yaml

DURATION = "^([0-9]+(ms|s|m|h|d|w|y))+$"
RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": DURATION},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr"],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": DURATION},
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
SCRAPE_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint", "le"}
# Series exported by other software that the chart's rules may query.
FOREIGN = {"certmanager_certificate_expiration_timestamp_seconds": {"name", "namespace"}}
PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "by", "without", "rate", "increase", "histogram_quantile",
                "time", "and", "or", "unless", "on", "ignoring", "abs", "humanizePercentage"}


def fail(message):
    sys.exit(f"chart extras check failed: {message}")


def expect(condition, message):
    if not condition:
        fail(message)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def exported(sources):
    """Metric names (with their exposition suffixes) and label names the Rust code registers."""
    names, labels = {}, set()
    for source in sources:
        text = open(source).read()
        prefix = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', text)
        expect(prefix, f"no Registry::with_prefix in {source}")
        struct_fields = {}
        for struct, body in re.findall(r"pub struct (\w+Labels) \{([^}]*)\}", text):
            struct_fields[struct] = set(re.findall(r"pub (\w+):", body))
            labels |= struct_fields[struct]
        for name, kind in re.findall(r'registry\.register\(\s*"([a-z_]+)",[^;]*?(\w+)\.clone\(\)', text, re.S):
            base = f"{prefix.group(1)}_{name}"
            declared = re.search(rf"pub {kind}: (Family<(\w+), (\w+)>|(\w+))", text)
            expect(declared, f"cannot find the type of {kind} in {source}")
            metric_type = declared.group(3) or declared.group(4)
            metric_labels = struct_fields.get(declared.group(2), set())
            suffixes = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}[metric_type]
            for suffix in suffixes:
                names[base + suffix] = metric_labels | ({"le"} if suffix == "_bucket" else set())
    expect(len(names) >= 8, f"only {len(names)} metrics found in {sources}")
    return names


def check_query(expr, metrics, where):
    """Every metric the expression reads exists, and every label it names is one that metric has."""
    used = set(re.findall(r"\b(wiproxy_[a-z_]+|certmanager_[a-z_]+)\b", expr))
    expect(used, f"{where}: no wiproxy metric in {expr!r}")
    known = {**metrics, **FOREIGN}
    for name in used:
        expect(name in known, f"{where}: metric {name} is not exported (known: {sorted(metrics)})")
    allowed = set().union(*(known[n] for n in used)) | SCRAPE_LABELS
    named = set()
    for selector in re.findall(r"\{([^}]*)\}", expr):
        named |= set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        named |= {label.strip() for label in grouping.split(",") if label.strip()}
    for label in named:
        expect(label in allowed, f"{where}: label {label} is not a label of {sorted(used)}")
    expect(expr.count("(") == expr.count(")"), f"{where}: unbalanced parentheses in {expr!r}")


def by_kind(docs):
    kinds = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def check_rule(rule_doc, metrics):
    try:
        jsonschema.validate(rule_doc, RULE_SCHEMA)
    except jsonschema.ValidationError as e:
        fail(f"PrometheusRule shape: {e.message} at {list(e.absolute_path)}")
    alerts = {}
    for group in rule_doc["spec"]["groups"]:
        for rule in group["rules"]:
            check_query(rule["expr"], metrics, f"alert {rule['alert']}")
            expect(rule["labels"].get("severity") in {"warning", "critical"}, f"alert {rule['alert']}: severity")
            expect(rule["annotations"].get("summary"), f"alert {rule['alert']}: summary")
            alerts[rule["alert"]] = rule
    return alerts


def main():
    mode, rendered, *rest = sys.argv[1:]
    docs = load(rendered)
    kinds = by_kind(docs)
    dashboards = [d for d in kinds.get("ConfigMap", []) if d["metadata"]["name"].endswith("-dashboard")]

    if mode == "none":
        expect("PrometheusRule" not in kinds and "NetworkPolicy" not in kinds and not dashboards,
               "the defaults render an extra; each is off by default")
        print("chart extras: none rendered by default")
        return
    if mode == "split":
        with open(rest[0], "w") as f:
            yaml.safe_dump_all([d for d in docs if d["kind"] != "PrometheusRule"], f)
        return

    metrics = exported(rest)
    expect(len(kinds.get("PrometheusRule", [])) == 1, "one PrometheusRule")
    alerts = check_rule(kinds["PrometheusRule"][0], metrics)
    if mode == "cert-manager":
        expiry = alerts.get("WiproxyWebhookCertificateExpiry")
        expect(expiry, "cert-manager mode: the certificate-expiry alert")
        certificate = next(d for d in kinds["Certificate"] if d["spec"].get("secretName"))
        expect(f'name="{certificate["metadata"]["name"]}"' in expiry["expr"], "the expiry alert watches the webhook's Certificate")
        print(f"chart extras (cert-manager): {len(alerts)} alerts, expiry alert on Certificate {certificate['metadata']['name']}")
        return

    for alert in ["WiproxySidecarTokenFetchFailing", "WiproxySidecarTokenExpiring", "WiproxyWebhookErrors",
                  "WiproxyWebhookDenialRate", "WiproxyWebhookCertificateReloadFailing"]:
        expect(alert in alerts, f"alert {alert}")
    expect("WiproxyWebhookCertificateExpiry" not in alerts, "self-signed mode has no expiry metric to alert on")

    expect(len(dashboards) == 1, "one dashboard ConfigMap")
    dashboard_cm = dashboards[0]
    expect(dashboard_cm["metadata"]["labels"].get("grafana_dashboard") == "1", "the dashboard carries Grafana's label")
    dashboard = json.loads(dashboard_cm["data"]["wiproxy.json"])
    targets = [t for p in dashboard["panels"] for t in p["targets"]]
    expect(len(dashboard["panels"]) >= 6 and dashboard["uid"] == "wiproxy", "dashboard panels")
    for target in targets:
        check_query(target["expr"], metrics, f"dashboard query {target['expr']!r}")
    exported_bases = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in metrics}
    queried = {re.sub(r"_(total|bucket|sum|count)$", "", m) for t in targets for m in re.findall(r"wiproxy_[a-z_]+", t["expr"])}
    expect(exported_bases <= queried, f"the dashboard shows no panel for {sorted(exported_bases - queried)}")

    expect(len(kinds.get("NetworkPolicy", [])) == 1, "one NetworkPolicy")
    policy = kinds["NetworkPolicy"][0]["spec"]
    deployment = kinds["Deployment"][0]
    expect(policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"], "the policy selects the webhook pods")
    expect(policy["policyTypes"] == ["Ingress"], "ingress only")
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    rules = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    expect(set(rules) == {"https", "metrics"} and set(rules) <= container_ports, f"ingress ports {sorted(rules)}")
    expect([b["ipBlock"]["cidr"] for b in rules["https"]["from"]] == ["172.16.0.0/28"], "webhook port from the control plane's CIDR")
    expect(rules["metrics"]["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
           "metrics only from the monitoring namespace")
    print(f"chart extras: PrometheusRule ({len(alerts)} alerts, schema and metric names checked), "
          f"dashboard ({len(targets)} queries on exported metrics), NetworkPolicy (webhook port from the control plane, "
          f"metrics from namespace monitoring)")


if __name__ == "__main__":
    main()
