"""Checks what `helm template charts/wiproxy` renders: the webhook configuration fields the
product relies on, the Deployment's safety settings, and that every flag the chart passes to
`wiproxy-webhook serve` exists.

usage: check_chart.py MODE RENDERED_YAML SERVE_HELP_TEXT [EXTRA_EXCLUDED_NAMESPACE...]
"""
import re
import sys

import yaml


def fail(message):
    sys.exit(f"chart check failed: {message}")


def expect(condition, message):
    if not condition:
        fail(message)


def main():
    mode, rendered, help_file, *extra_excluded = sys.argv[1:]
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    with open(help_file) as f:
        help_text = f.read()

    mutating = by_kind["MutatingWebhookConfiguration"][0]["webhooks"]
    expect([h["name"] for h in mutating] == ["inject.wiproxy.io", "annotations.wiproxy.io"],
           f"the injection and the annotation guard: {[h['name'] for h in mutating]}")
    guard = mutating[1]
    expect(guard["rules"] == [{"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                               "resources": ["pods"], "scope": "Namespaced"}], f"pod UPDATE rule: {guard['rules']}")
    expect(guard["clientConfig"]["service"]["path"] == "/mutate", "the guard calls /mutate")
    expect(guard["objectSelector"] == mutating[0]["objectSelector"], "the guard sees labelled pods only")
    expect(guard["namespaceSelector"] == mutating[0]["namespaceSelector"], "the guard skips the same namespaces")
    expect(guard["failurePolicy"] == "Ignore" and guard["sideEffects"] == "None", "the guard never blocks on an outage")
    expect("'wiproxy.io/status' in oldObject.metadata.annotations" in guard["matchConditions"][0]["expression"],
           "the guard is sent injected pods only")
    hook = mutating[0]
    expect(hook["admissionReviewVersions"] == ["v1"], "admissionReviewVersions v1")
    expect(hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}], f"pod CREATE rule: {hook['rules']}")
    expect(hook["objectSelector"] == {"matchLabels": {"wiproxy.io/inject": "true"}}, "objectSelector on the label")
    expressions = hook["namespaceSelector"]["matchExpressions"]
    expect(len(expressions) == 1 and expressions[0]["key"] == "kubernetes.io/metadata.name"
           and expressions[0]["operator"] == "NotIn", "namespaceSelector NotIn on the namespace name")
    excluded = set(expressions[0]["values"])
    for namespace in ["kube-system", "kube-public", "kube-node-lease", "wiproxy-system", *extra_excluded]:
        expect(namespace in excluded, f"namespace {namespace} excluded: {sorted(excluded)}")
    expect(hook["failurePolicy"] == "Fail", "failurePolicy Fail")
    expect(hook["timeoutSeconds"] == 5, "timeoutSeconds 5")
    expect(hook["reinvocationPolicy"] == "IfNeeded", "reinvocationPolicy IfNeeded")
    expect(hook["sideEffects"] == "NoneOnDryRun", "sideEffects NoneOnDryRun")
    expect(hook["matchPolicy"] == "Equivalent", "matchPolicy Equivalent")
    service = hook["clientConfig"]["service"]
    expect(service["path"] == "/mutate" and service["port"] == 443, "calls /mutate on 443")

    validating = by_kind["ValidatingWebhookConfiguration"][0]["webhooks"][0]
    expect(validating["failurePolicy"] == "Ignore", "validation failurePolicy Ignore")
    expect(validating["sideEffects"] == "None", "validation has no side effects")
    expect(validating["clientConfig"]["service"]["path"] == "/validate", "validation calls /validate")
    resources = {r for rule in validating["rules"] for r in rule["resources"]}
    expect(resources == {"deployments", "statefulsets", "daemonsets", "replicasets", "jobs", "cronjobs"}, f"workloads: {resources}")

    for config in by_kind["MutatingWebhookConfiguration"] + by_kind["ValidatingWebhookConfiguration"]:
        annotations = config["metadata"].get("annotations") or {}
        bundle = config["webhooks"][0]["clientConfig"].get("caBundle")
        if mode == "cert-manager":
            expect(annotations.get("cert-manager.io/inject-ca-from") == "wiproxy-system/wiproxy", "cert-manager injects the CA")
        elif mode == "provided":
            expect(bool(bundle), "provided mode carries the caBundle")
        else:
            expect(not bundle, "self-signed mode leaves caBundle to the webhook")

    deployment = by_kind["Deployment"][0]
    spec = deployment["spec"]["template"]["spec"]
    expect(deployment["spec"]["replicas"] == 2, "two replicas")
    expect(spec["priorityClassName"] == "system-cluster-critical", "priorityClassName")
    quotas = [q for q in by_kind.get("ResourceQuota", [])
              if {"scopeName": "PriorityClass", "operator": "In", "values": ["system-cluster-critical"]}
              in q["spec"].get("scopeSelector", {}).get("matchExpressions", [])]
    expect(len(quotas) == 1 and int(quotas[0]["spec"]["hard"]["pods"]) > deployment["spec"]["replicas"],
           "a ResourceQuota scoped to the critical PriorityClass (GKE admits such pods outside kube-system only with one)")
    expect(len(spec["topologySpreadConstraints"]) >= 1, "topology spread")
    expect(spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 65532, "non-root")
    container = spec["containers"][0]
    context = container["securityContext"]
    expect(context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
           and context["capabilities"]["drop"] == ["ALL"], "restricted container")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expect(ports == {"https": 10250, "metrics": 9090}, f"ports {ports}")
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"]:
        expect(container[probe]["httpGet"]["port"] == "metrics", f"{probe} on the admin port")
    expect(by_kind["PodDisruptionBudget"][0]["spec"]["minAvailable"] == 1, "PDB minAvailable 1")
    service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in by_kind["Service"][0]["spec"]["ports"]}
    expect(service_ports["https"] == (443, "https"), f"Service 443 -> https (10250): {service_ports}")

    args = container["args"]
    expect(args[0] == "serve", "runs serve")
    flags = [re.match(r"(--[a-z0-9-]+)", a).group(1) for a in args[1:]]
    for flag in flags:
        expect(re.search(rf"^\s+{re.escape(flag)}\b", help_text, re.M), f"{flag} is not a flag of wiproxy-webhook serve")
    expect("--gke-autopilot=auto" in args and "--native-sidecars=auto" in args, "Autopilot and native sidecars detected")
    rules = by_kind["ClusterRole"][0]["rules"]
    expect({"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]} in rules,
           "list/watch of nodes, for the kubelet versions")
    autopilot_rules = [r for r in rules if r["resources"] == ["mutatingwebhookconfigurations"] and r["verbs"] == ["get"]]
    expect(len(autopilot_rules) == 1 and all(n.endswith(".common-webhooks.networking.gke.io") for n in autopilot_rules[0]["resourceNames"]),
           "get of GKE's Autopilot webhooks by name, nothing more")
    if mode == "self-signed":
        expect("--self-signed-secret" in flags and "--webhook-configurations" in flags, "self-signed flags")
        expect("Role" in by_kind, "Secret access for self-signed mode")
    else:
        expect("--tls-cert-file" in flags, "certificate files")
    print(f"{mode}: webhook configurations, Deployment and {len(flags)} flags checked")


if __name__ == "__main__":
    main()
