#!/usr/bin/env python3
"""Port-exposure lint for cluster definitions: nothing of Ray's or MLflow's reachable from
the internet, and no Ray cluster without token authentication.

    python cluster/lint_ports.py cluster/            # directories are searched recursively
    python cluster/lint_ports.py cluster/aws.yaml bad.yaml

Exit 0 when every file passes, 1 with one `file: where: reason` line per finding (2 on
usage errors). Reads YAML (every document of a multi-document file), JSON, Dockerfiles and
shell scripts; needs only the standard library and PyYAML. It finds:

- firewall rules open to the whole internet (0.0.0.0/0, ::/0, or any IPv4 range wider than
  a /8) on a sensitive port (SSH, Ray's GCS 6379, dashboard 8265, client 10001, ..., MLflow
  5000, 8080, ...) or on all ports: the `IpPermissions` of a Ray cluster launcher config's
  provider.security_group, and CloudFormation security groups and ingress rules;
- AWS launcher node types without `SecurityGroupIds`: Ray's launcher then creates a group
  whose SSH rule is open to 0.0.0.0/0 (ray/autoscaler/_private/aws/config.py);
- a Ray dashboard bound to every interface (`--dashboard-host=0.0.0.0`, `::`) or an
  `mlflow server` / `mlflow ui` with `--host 0.0.0.0`, in any command string; and cloud
  launcher configs without head_start_ray_commands, whose defaults do exactly that;
- cloud launcher start commands without `RAY_AUTH_MODE=token`, and KubeRay clusters whose
  `authOptions.mode` is not `token`;
- Kubernetes Services of type LoadBalancer or NodePort, and Ingresses, that expose a
  sensitive port; KubeRay head services of type LoadBalancer/NodePort or with
  `enableIngress`; `hostPort`s on sensitive ports and `hostNetwork: true`.

Not flagged: KubeRay's `rayStartParams` binding the dashboard to 0.0.0.0 inside the pod
(KubeRay's default: the RayJob submitter reaches it through the ClusterIP service; who can
reach the pod is the Service type's and NetworkPolicy's business, both checked here).
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SENSITIVE_PORTS = {
    22: "SSH",
    3000: "Grafana",
    5000: "MLflow",
    6006: "TensorBoard",
    6379: "Ray GCS",
    8000: "Ray Serve",
    8076: "Ray object manager",
    8080: "MLflow / web UIs",
    8265: "Ray dashboard",
    8888: "Jupyter",
    9090: "Prometheus",
    10001: "Ray client",
    52365: "Ray dashboard agent",
}
SENSITIVE_PORT_NAMES = {"dashboard", "gcs", "gcs-server", "client", "redis", "mlflow", "serve"}
CLOUD_PROVIDERS = {"aws", "gcp", "azure", "aliyun", "vsphere"}
# 0.0.0.0 (with or without a :port), ::, [::] or *; not 0.0.0.01, ::1 or 127.0.0.1.
WILDCARD_HOST = r"(?:0\.0\.0\.0(?![\w.])|(?:::|\[::\])(?![\w.:])|\*)"
DASHBOARD_ALL_INTERFACES = re.compile(rf"--dashboard-host(?:=|\s+)[\"']?{WILDCARD_HOST}")
MLFLOW_SERVER = re.compile(r"\bmlflow\s+(?:server|ui)\b")
MLFLOW_ALL_INTERFACES = re.compile(rf"(?<![\w-])(?:--host|-h)(?:=|\s+)[\"']?{WILDCARD_HOST}")
YAML_SUFFIXES = {".yaml", ".yml", ".json"}
SHELL_SUFFIXES = {".sh", ".bash"}


@dataclass(frozen=True)
class Finding:
    path: str
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.where}: {self.reason}"


# ---------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads CloudFormation's short intrinsic tags (!Ref, !GetAtt, !Sub...)
    as their long forms instead of failing."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_Loader.add_multi_constructor("!", _intrinsic)


def load_documents(path: Path) -> list[Any]:
    text = path.read_text()
    if path.suffix == ".json":
        return [json.loads(text)]
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc is not None]


# ---------------------------------------------------------------------------------------
# Helpers


def _walk(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every (location, value) in a parsed document, depth first."""
    yield where, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{where}[{i}]")


def _is_public(cidr: str) -> bool:
    """0.0.0.0/0, ::/0, or an IPv4 range wider than a /8 (0.0.0.0/1 + 128.0.0.0/1...)."""
    try:
        net = ipaddress.ip_network(str(cidr).strip(), strict=False)
    except ValueError:
        return False
    return net.prefixlen == 0 or (net.version == 4 and net.prefixlen < 8)


def _port_range(rule: dict) -> tuple[int, int] | None:
    """The TCP/UDP ports an ingress rule opens, (0, 65535) for all; None for ICMP."""
    proto = str(rule.get("IpProtocol", "-1")).lower()
    if proto in {"-1", "all"}:
        return (0, 65535)
    if proto in {"icmp", "icmpv6", "1", "58"}:
        return None
    try:
        lo, hi = int(rule.get("FromPort", 0)), int(rule.get("ToPort", 65535))
    except (TypeError, ValueError):
        return (0, 65535)
    if lo == -1 or hi == -1:
        return (0, 65535)
    return (lo, hi)


def _exposed(lo: int, hi: int) -> str:
    if (lo, hi) == (0, 65535):
        return "all ports"
    hit = [f"{p} ({name})" for p, name in sorted(SENSITIVE_PORTS.items()) if lo <= p <= hi]
    return ", ".join(hit)


def _check_ingress(rule: dict, where: str, path: str, resolve=lambda v: v) -> list[Finding]:
    """One EC2 ingress rule, in either the API's form (IpRanges: [{CidrIp}], as in Ray's
    provider.security_group.IpPermissions) or CloudFormation's (CidrIp: ...)."""
    cidrs = [resolve(rule.get("CidrIp")), resolve(rule.get("CidrIpv6"))]
    cidrs += [resolve(r.get("CidrIp")) for r in rule.get("IpRanges") or [] if isinstance(r, dict)]
    cidrs += [
        resolve(r.get("CidrIpv6")) for r in rule.get("Ipv6Ranges") or [] if isinstance(r, dict)
    ]
    public = [c for c in cidrs if isinstance(c, str) and _is_public(c)]
    ports = _port_range(rule)
    if not public or ports is None:
        return []
    exposed = _exposed(*ports)
    if not exposed:
        return []
    return [Finding(path, where, f"ingress from {', '.join(public)} opens {exposed}")]


# ---------------------------------------------------------------------------------------
# Checks: each takes a parsed document and returns findings.


def check_strings(doc: Any, path: str) -> list[Finding]:
    """Commands anywhere: a dashboard or an MLflow server bound to every interface."""
    findings = []
    for where, value in _walk(doc):
        if isinstance(value, str):
            findings += _check_command(value, path, where or "(document)")
    return findings


def _check_command(text: str, path: str, where: str) -> list[Finding]:
    findings = []
    text = text.replace("\\\n", " ")  # shell line continuations
    if DASHBOARD_ALL_INTERFACES.search(text):
        findings.append(
            Finding(path, where, "Ray dashboard bound to all interfaces (--dashboard-host)")
        )
    for command in re.split(r"&&|\|\||;|\n", text):
        if MLFLOW_SERVER.search(command) and MLFLOW_ALL_INTERFACES.search(command):
            findings.append(Finding(path, where, "MLflow server bound to all interfaces (--host)"))
    return findings


def _is_launcher_config(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("provider"), dict)
        and "type" in doc["provider"]
        and ("available_node_types" in doc or "head_node_type" in doc or "cluster_name" in doc)
    )


def check_launcher(doc: Any, path: str) -> list[Finding]:
    """A Ray cluster launcher config (ray up)."""
    if not _is_launcher_config(doc):
        return []
    findings = []
    provider = doc["provider"]
    kind = provider.get("type")
    rules = (provider.get("security_group") or {}).get("IpPermissions") or []
    for i, rule in enumerate(rules):
        if isinstance(rule, dict):
            where = f"provider.security_group.IpPermissions[{i}]"
            findings += _check_ingress(rule, where, path)
    if kind not in CLOUD_PROVIDERS:
        return findings
    if "head_start_ray_commands" not in doc:
        findings.append(
            Finding(
                path,
                "head_start_ray_commands",
                f"missing: Ray's {kind} defaults start the head with --dashboard-host=0.0.0.0",
            )
        )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, command in enumerate(doc.get(key) or []):
            if not (isinstance(command, str) and "ray start" in command):
                continue
            if not re.search(r"RAY_AUTH_MODE=[\"']?token\b", command):
                findings.append(
                    Finding(
                        path,
                        f"{key}[{i}]",
                        "token auth off: ray start without RAY_AUTH_MODE=token",
                    )
                )
    if kind == "aws":
        for name, node_type in (doc.get("available_node_types") or {}).items():
            node = (node_type or {}).get("node_config") or {}
            grouped = (
                "SecurityGroupIds" in node
                or "LaunchTemplate" in node
                or any("Groups" in ni for ni in node.get("NetworkInterfaces") or [])
            )
            if not grouped:
                findings.append(
                    Finding(
                        path,
                        f"available_node_types.{name}.node_config",
                        "no SecurityGroupIds: ray up would create a security group with "
                        "SSH (22) open to 0.0.0.0/0",
                    )
                )
    return findings


def check_cloudformation(doc: Any, path: str) -> list[Finding]:
    """Security groups and ingress rules of a CloudFormation template."""
    if not (isinstance(doc, dict) and isinstance(doc.get("Resources"), dict)):
        return []
    params = doc.get("Parameters") or {}

    def resolve(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"Ref"}:
            return (params.get(value["Ref"]) or {}).get("Default")
        return value

    findings = []
    for name, res in doc["Resources"].items():
        if not isinstance(res, dict):
            continue
        props = res.get("Properties") or {}
        if res.get("Type") == "AWS::EC2::SecurityGroup":
            for i, rule in enumerate(props.get("SecurityGroupIngress") or []):
                if isinstance(rule, dict):
                    where = f"Resources.{name}.Properties.SecurityGroupIngress[{i}]"
                    findings += _check_ingress(rule, where, path, resolve)
        elif res.get("Type") == "AWS::EC2::SecurityGroupIngress":
            findings += _check_ingress(props, f"Resources.{name}.Properties", path, resolve)
    return findings


def _sensitive_port(port: Any) -> str | None:
    if isinstance(port, int) and port in SENSITIVE_PORTS:
        return f"{port} ({SENSITIVE_PORTS[port]})"
    if isinstance(port, str):
        if port.isdigit() and int(port) in SENSITIVE_PORTS:
            return f"{port} ({SENSITIVE_PORTS[int(port)]})"
        if port.lower() in SENSITIVE_PORT_NAMES:
            return f"'{port}'"
    return None


def _ray_cluster_spec(doc: dict) -> tuple[str, dict] | None:
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        return "spec", spec
    if kind in {"RayJob", "RayService"} and isinstance(spec.get("rayClusterSpec"), dict):
        return "spec.rayClusterSpec", spec["rayClusterSpec"]
    return None


def check_kubernetes(doc: Any, path: str) -> list[Finding]:
    """Services, Ingresses, KubeRay custom resources and pod templates."""
    if not (isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc):
        return []
    findings = []
    kind, name = doc["kind"], (doc.get("metadata") or {}).get("name", "?")
    spec = doc.get("spec") or {}
    if kind == "Service" and spec.get("type") in {"LoadBalancer", "NodePort"}:
        for i, port in enumerate(spec.get("ports") or []):
            hits = {_sensitive_port(port.get(k)) for k in ("port", "targetPort", "name")}
            hits.discard(None)
            if hits:
                findings.append(
                    Finding(
                        path,
                        f"Service {name}: spec.ports[{i}]",
                        f"{spec['type']} Service exposes {', '.join(sorted(hits))}",
                    )
                )
    if kind == "Ingress":
        for where, value in _walk(spec, "spec"):
            if isinstance(value, dict) and isinstance(value.get("service"), dict):
                port = value["service"].get("port") or {}
                hit = _sensitive_port(port.get("number")) or _sensitive_port(port.get("name"))
                if hit:
                    findings.append(Finding(path, f"Ingress {name}: {where}", f"exposes {hit}"))
    ray = _ray_cluster_spec(doc)
    if ray:
        prefix, rc = ray
        head = rc.get("headGroupSpec") or {}
        if head.get("serviceType") in {"LoadBalancer", "NodePort"}:
            findings.append(
                Finding(
                    path,
                    f"{kind} {name}: {prefix}.headGroupSpec.serviceType",
                    f"{head['serviceType']} head service exposes GCS, dashboard and client",
                )
            )
        if head.get("enableIngress"):
            findings.append(
                Finding(
                    path,
                    f"{kind} {name}: {prefix}.headGroupSpec.enableIngress",
                    "an Ingress to the Ray dashboard",
                )
            )
        mode = (rc.get("authOptions") or {}).get("mode")
        if mode != "token":
            findings.append(
                Finding(
                    path,
                    f"{kind} {name}: {prefix}.authOptions.mode",
                    f"token auth off ({mode or 'no authOptions'}); set mode: token",
                )
            )
    for where, value in _walk(doc):
        if not isinstance(value, dict):
            continue
        if value.get("hostNetwork") is True:
            findings.append(
                Finding(path, f"{kind} {name}: {where}.hostNetwork", "pods bind the node's ports")
            )
        for c, container in enumerate(value.get("containers") or []):
            for p, port in enumerate((container or {}).get("ports") or []):
                hit = _sensitive_port((port or {}).get("hostPort"))
                if hit:
                    at = f"{where}.containers[{c}].ports[{p}].hostPort"
                    findings.append(Finding(path, f"{kind} {name}: {at}", f"hostPort {hit}"))
    return findings


CHECKS = (check_strings, check_launcher, check_cloudformation, check_kubernetes)


# ---------------------------------------------------------------------------------------
# Files


def _kind(path: Path) -> str | None:
    if path.name.startswith("Dockerfile") and not path.name.endswith(".dockerignore"):
        return "text"
    if path.suffix in SHELL_SUFFIXES:
        return "text"
    if path.suffix in YAML_SUFFIXES:
        return "yaml"
    return None


def lint_file(path: Path) -> list[Finding]:
    shown = str(path)
    if _kind(path) == "text":
        findings, command, start = [], "", 1
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not command:
                start = n
            if line.lstrip().startswith("#"):
                continue
            stripped = line.rstrip()
            command += stripped.rstrip("\\") + " "
            if not stripped.endswith("\\"):  # else a shell line continuation goes on
                findings += _check_command(command, shown, f"line {start}")
                command = ""
        if command:
            findings += _check_command(command, shown, f"line {start}")
        return findings
    try:
        docs = load_documents(path)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        return [Finding(shown, "(file)", f"cannot parse: {err}".splitlines()[0])]
    findings = []
    for i, doc in enumerate(docs):
        for check in CHECKS:
            for f in check(doc, shown):
                where = f.where if len(docs) == 1 else f"document {i + 1}: {f.where}"
                findings.append(Finding(f.path, where, f.reason))
    return findings


def files_under(paths: list[Path]) -> list[Path]:
    """The given files, and the lintable files under the given directories."""
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
        else:
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a in {"-h", "--help"} for a in args):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    missing = [a for a in args if not Path(a).exists()]
    if missing:
        print(f"lint_ports: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    files = files_under([Path(a) for a in args])
    findings = [f for path in files for f in lint_file(path)]
    for f in findings:
        print(f)
    if findings:
        print(f"lint_ports: {len(findings)} finding(s) in {len(files)} file(s)", file=sys.stderr)
        return 1
    print(f"lint_ports: {len(files)} file(s), nothing exposed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
