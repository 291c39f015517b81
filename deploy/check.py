"""Render the chart and validate it offline: what .ci/run runs (and tests/unit/test_deploy.py).

    build/deploy-tools/bin/python deploy/check.py            # everything
    build/deploy-tools/bin/python deploy/check.py --quick    # render, lint, kubernetes-validate

Run by the deploy tools' own virtualenv (scripts/install --test makes build/deploy-tools:
helm-python-sdk, Helm's own Go SDK as a library, for the render and lint; kubernetes-validate;
checkov; hadolint), not televote's: checkov pins its own versions of many packages.

For each set of values (the chart's defaults; deploy/ci-values.yaml on top of them):
1. `helm lint --strict` and render (`helm template`), one file per template, into --out;
2. kubernetes-validate --strict against the oldest and the newest Kubernetes release the chart
   supports (resources of operators' CRDs, CloudNativePG's Cluster and cert-manager's
   Certificate, have no schema there: it warns and skips them);
3. checkov on the manifests and on deploy/Dockerfile, with the checks in SKIPPED left out, each
   for the reason given; then hadolint on the Dockerfile.
Exits 1 naming what failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import yaml

DEPLOY = Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "televote"
DOCKERFILE = DEPLOY / "Dockerfile"
VALUES = {"defaults": None, "ci": DEPLOY / "ci-values.yaml"}
#: The chart's kubeVersion floor and the newest release kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
RELEASE, NAMESPACE = "televote", "televote"
RESOURCES_JSON = "resources.json"
BIN = Path(sys.executable).parent

#: checkov checks that do not fit, and why. Everything else it flags must be fixed.
SKIPPED = {
    "CKV_K8S_11": "no CPU limits: a replica is one single-threaded Python process (or Envoy "
                  "with --concurrency workers) whose request is what it can use; a CFS quota "
                  "only adds throttling pauses to votes' latency. Memory has limits.",
}
#: Left out for one values set only.
SKIPPED_FOR = {"defaults": {
    "CKV_K8S_43": "the chart's defaults name a tag: no digest exists before an image is built. "
                  "ci-values.yaml sets one, and its render is checked with this check on.",
}}
#: checkov otherwise asks its vendor's API for guidelines first (and waits out retries).
OFFLINE = {"BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}


def render(values_file: Path | None, out: Path) -> list[Path]:
    """Lint and render the chart with `values_file` over its defaults; the files written."""
    values = yaml.safe_load(values_file.read_text()) if values_file else {}
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBERNETES_VERSIONS[0]}")
    # Severity 1 is information ("icon is recommended"); 2 warnings, 3 errors.
    problems = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] > 1]
    if problems or report["errors"]:
        raise SystemExit("helm lint:\n" + "\n".join([*problems, *report["errors"]]))
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    written = []
    for template, text in sorted(manifests.items()):
        if not text.strip() or not template.endswith(".yaml"):
            continue
        path = out / Path(template).name
        path.write_text(text)
        written.append(path)
    # The same resources as JSON, for tests that read them without a YAML parser.
    resources = [resource for path in written for resource in yaml.safe_load_all(path.read_text())
                 if resource]
    (out / RESOURCES_JSON).write_text(json.dumps(resources, indent=1))
    return written


def _custom_kinds(files: list[Path]) -> set[str]:
    """The operators' kinds among the rendered resources (kind apiVersion)."""
    kinds = set()
    for path in files:
        for resource in yaml.safe_load_all(path.read_text()):
            if resource and "." in resource["apiVersion"].split("/")[0] and not resource[
                    "apiVersion"].split("/")[0].endswith("k8s.io"):
                kinds.add(f"{resource['kind']} {resource['apiVersion']}")
    return kinds


def run(label: str, argv: list[str], failures: list[str],
        env: dict[str, str] | None = None) -> None:
    print(f"== {label}", flush=True)
    if subprocess.run(argv, timeout=600, env={**os.environ, **(env or {})}).returncode != 0:
        failures.append(label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEPLOY.parent / "build" / "deploy",
                        help="where the rendered manifests go (one folder per values set)")
    parser.add_argument("--quick", action="store_true",
                        help="render, lint and kubernetes-validate only (no checkov, hadolint)")
    args = parser.parse_args()
    failures: list[str] = []
    rendered = {}
    for name, values_file in VALUES.items():
        files = render(values_file, args.out / name)
        rendered[name] = files
        print(f"== rendered {name}: {', '.join(path.name for path in files)}", flush=True)
        # kubernetes-validate has schemas for Kubernetes' own kinds only.
        print("   (no schema offline, not validated: "
              + ", ".join(sorted(_custom_kinds(files))) + ")", flush=True)
        for version in KUBERNETES_VERSIONS:
            run(f"kubernetes-validate {name} {version}",
                [str(BIN / "kubernetes-validate"), "--strict", "--quiet", "--no-warn",
                 "-k", version, *map(str, files)], failures)
    if not args.quick:
        checkov = [str(BIN / "checkov"), "--quiet", "--compact", "--skip-download"]
        for name in VALUES:
            skips = ",".join([*SKIPPED, *SKIPPED_FOR.get(name, {})])
            run(f"checkov {name}", [*checkov, "--framework", "kubernetes",
                                    "-d", str(args.out / name), "--skip-check", skips],
                failures, OFFLINE)
        run("checkov Dockerfile", [*checkov, "--framework", "dockerfile", "-f", str(DOCKERFILE),
                                   "--skip-check", ",".join(SKIPPED)], failures, OFFLINE)
        run("hadolint Dockerfile", [str(BIN / "hadolint"), str(DOCKERFILE)], failures)
    if failures:
        raise SystemExit("deploy check failed: " + "; ".join(failures))
    print("deploy check passed: rendered, validated"
          + ("" if args.quick else ", checkov and hadolint clean"))


if __name__ == "__main__":
    main()
