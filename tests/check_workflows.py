"""Checks the GitHub workflows beyond their schema (which check-jsonschema's vendored
github-workflows schema checks first, in the Makefile), as actionlint would:

- every `run:` script passes shellcheck, with each `${{ … }}` expression replaced by a plain word;
- every expression names a known context, and `steps.ID` / `needs.JOB` name a step or job that exists;
- every action is pinned to a version;
- what the release relies on: a tag trigger, both architectures, keyless signing (id-token: write),
  an SBOM, `helm push` with the version and appVersion taken from the tag; CI runs .ci/run.

usage: check_workflows.py WORKFLOW.yml...
"""
import json
import re
import subprocess
import sys
import tempfile

import yaml

CONTEXTS = {"github", "env", "vars", "job", "jobs", "steps", "runner", "secrets", "strategy", "matrix", "needs", "inputs",
            "hashFiles", "format", "contains", "startsWith", "endsWith", "join", "toJSON", "fromJSON", "success",
            "always", "cancelled", "failure"}
EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.S)
problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def check_expressions(name, workflow):
    jobs = workflow.get("jobs", {})
    for job_id, job in jobs.items():
        step_ids = {s.get("id") for s in job.get("steps", []) if s.get("id")}
        for path, text in walk(job, f"jobs.{job_id}"):
            for expression in EXPRESSION.findall(text):
                for word in re.findall(r"(?<![\w.'])([A-Za-z_][\w-]*)(?=\s*[.(\[]|\s*$|\s*[=!<>&|)])", expression):
                    if word not in CONTEXTS and word not in {"true", "false", "null"}:
                        problem(f"{name} {path}", f"unknown context {word!r} in ${{{{{expression}}}}}")
                for step in re.findall(r"\bsteps\.([\w-]+)", expression):
                    if step not in step_ids:
                        problem(f"{name} {path}", f"no step with id {step!r}")
                for needed in re.findall(r"\bneeds\.([\w-]+)", expression):
                    if needed not in jobs:
                        problem(f"{name} {path}", f"no job {needed!r}")
        for needed in [job.get("needs")] if isinstance(job.get("needs"), str) else job.get("needs", []):
            if needed not in jobs:
                problem(f"{name} jobs.{job_id}.needs", f"no job {needed!r}")


def check_steps(name, workflow):
    for job_id, job in workflow.get("jobs", {}).items():
        for i, step in enumerate(job.get("steps", [])):
            where = f"{name} jobs.{job_id}.steps[{i}]"
            if "uses" in step and not re.search(r"@(v\d+(\.\d+)*|[0-9a-f]{40})$", step["uses"]):
                problem(where, f"action {step['uses']} is not pinned to a version")
            if "run" in step:
                shell = step.get("shell", job.get("defaults", {}).get("run", {}).get("shell", "bash"))
                if shell not in {"bash", "sh"}:
                    continue
                script = EXPRESSION.sub("GITHUB_EXPRESSION", step["run"])
                with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
                    f.write(f"#!/usr/bin/env {shell}\nset -e\n{script}")
                    f.flush()
                    result = subprocess.run(["shellcheck", "--format=gcc", f.name], capture_output=True, text=True)
                if result.returncode != 0:
                    problem(where, "shellcheck:\n    " + result.stdout.replace(f.name, "run").strip().replace("\n", "\n    "))


def text_of(workflow):
    return json.dumps(workflow, default=str)


def check_ci(workflow):
    triggers = workflow.get(True, workflow.get("on"))
    if "pull_request" not in triggers or "push" not in triggers:
        problem("ci.yml", "runs on push and pull_request")
    if "bash .ci/run" not in text_of(workflow):
        problem("ci.yml", "runs make test through .ci/run")


def check_release(workflow, raw):
    triggers = workflow.get(True, workflow.get("on"))
    if not triggers.get("push", {}).get("tags"):
        problem("release.yml", "runs on a tag push")
    text = raw
    arches = {entry["arch"] for job in workflow["jobs"].values()
              for entry in job.get("strategy", {}).get("matrix", {}).get("include", [])}
    if arches != {"amd64", "arm64"}:
        problem("release.yml", f"images for amd64 and arm64, not {sorted(arches)}")
    signing = [job for job in workflow["jobs"].values() if "cosign sign" in json.dumps(job)]
    if not signing or signing[0].get("permissions", {}).get("id-token") != "write":
        problem("release.yml", "keyless cosign signing needs permissions id-token: write in its job")
    for needle, why in [("make image", "builds the images with make image"), ("syft", "makes an SBOM"),
                        ("cosign attest", "attests the SBOM"), ("helm push", "pushes the chart"),
                        ('--app-version "$version"', "sets the chart's appVersion from the tag"),
                        ('--version "$version"', "sets the chart's version from the tag")]:
        if needle not in text:
            problem("release.yml", why)


def main():
    for name in sys.argv[1:]:
        with open(name) as f:
            raw = f.read()
        workflow = yaml.safe_load(raw)
        check_expressions(name, workflow)
        check_steps(name, workflow)
        if name.endswith("/ci.yml"):
            check_ci(workflow)
        if name.endswith("/release.yml"):
            check_release(workflow, raw)
    if problems:
        print("workflow problems:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print(f"check-workflows: {len(sys.argv) - 1} workflows: run scripts pass shellcheck, expressions, actions and release steps checked")


if __name__ == "__main__":
    main()
