"""Validates TokenProxyPolicy documents against the openAPIV3Schema of the CRD that
`wiproxy-webhook crd` prints, as the API server would (required fields, types, patterns).

usage: validate_policies.py CRD_FILE POLICY_FILE...
Also checks that known-bad policies are refused, so the check itself can fail.
"""
import sys

import jsonschema
import yaml


def schema_of(crd_path):
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    assert crd["kind"] == "CustomResourceDefinition", crd_path
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def policies(path):
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if doc and doc.get("kind") == "TokenProxyPolicy":
                yield doc


BAD = [
    ("no namespaceSelector", {"spec": {"serviceAccounts": ["*@p.iam.gserviceaccount.com"]}}),
    ("http upstream", {"spec": {"namespaceSelector": {}, "upstreams": ["http://x.example.com/"]}}),
    ("malformed GSA pattern", {"spec": {"namespaceSelector": {}, "serviceAccounts": ["nobody"]}}),
    ("bool as string", {"spec": {"namespaceSelector": {}, "allowDefaultKsa": "yes"}}),
]


def main():
    crd_path, *paths = sys.argv[1:]
    validator = jsonschema.Draft7Validator(schema_of(crd_path))
    count = 0
    for path in paths:
        for policy in policies(path):
            errors = sorted(validator.iter_errors(policy), key=str)
            if errors:
                sys.exit(f"{path}: policy {policy['metadata']['name']}: {errors[0].message}")
            count += 1
    for what, policy in BAD:
        policy = {"apiVersion": "wiproxy.io/v1alpha1", "kind": "TokenProxyPolicy", "metadata": {"name": "bad"}, **policy}
        if validator.is_valid(policy):
            sys.exit(f"the CRD schema accepts a policy with {what}")
    if count == 0:
        sys.exit("no TokenProxyPolicy documents found")
    print(f"{count} policies valid against the CRD schema; {len(BAD)} bad ones refused")


if __name__ == "__main__":
    main()
