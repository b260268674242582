"""cluster/lint_ports.py: passes on cluster/, fails (exit 1, file and reason) on planted
examples of each kind of exposure it knows."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest


@pytest.fixture(scope="module")
def lint(cluster_dir):
    spec = importlib.util.spec_from_file_location("lint_ports", cluster_dir / "lint_ports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lint_ports"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("lint_ports", None)


def test_cluster_dir_passes_from_the_command_line(repo):
    done = subprocess.run(
        [sys.executable, "cluster/lint_ports.py", "cluster/"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing exposed" in done.stdout
    # Every kind of file it reads is there: launcher configs, CloudFormation, KubeRay, Docker.
    n = int(done.stdout.split("lint_ports: ")[1].split()[0])
    assert n >= 7


BAD = {
    "sg-dashboard.yaml": (
        """
        cluster_name: bad
        provider:
          type: aws
          region: us-west-2
          security_group:
            GroupName: bad
            IpPermissions:
              - {IpProtocol: tcp, FromPort: 8265, ToPort: 8265, IpRanges: [{CidrIp: 0.0.0.0/0}]}
        head_start_ray_commands: ["RAY_AUTH_MODE=token ray start --head"]
        available_node_types:
          head: {resources: {}, node_config: {SecurityGroupIds: [sg-1]}}
        head_node_type: head
        """,
        ["provider.security_group.IpPermissions[0]", "0.0.0.0/0", "8265 (Ray dashboard)"],
    ),
    "sg-all-ports-ipv6.yaml": (
        """
        cluster_name: bad
        provider:
          type: aws
          security_group:
            IpPermissions:
              - {IpProtocol: "-1", Ipv6Ranges: [{CidrIpv6: "::/0"}]}
        head_start_ray_commands: ["RAY_AUTH_MODE=token ray start --head"]
        available_node_types:
          head: {resources: {}, node_config: {SecurityGroupIds: [sg-1]}}
        """,
        ["::/0", "all ports"],
    ),
    "dashboard-all-interfaces.yaml": (
        """
        cluster_name: bad
        provider: {type: aws}
        available_node_types:
          head: {resources: {}, node_config: {SecurityGroupIds: [sg-1]}}
        head_start_ray_commands:
          - ray stop
          - >-
            ulimit -n 65536; RAY_AUTH_MODE=token ray start --head --port=6379
            --dashboard-host=0.0.0.0
        """,
        ["head_start_ray_commands[1]", "Ray dashboard bound to all interfaces"],
    ),
    "defaults-dashboard.yaml": (
        """
        cluster_name: bad
        provider: {type: gcp}
        available_node_types: {}
        """,
        ["head_start_ray_commands", "--dashboard-host=0.0.0.0"],
    ),
    "no-token.yaml": (
        """
        cluster_name: bad
        provider: {type: aws}
        available_node_types:
          head: {resources: {}, node_config: {SecurityGroupIds: [sg-1]}}
        head_start_ray_commands: ["ray start --head --dashboard-host=127.0.0.1"]
        worker_start_ray_commands: ["RAY_AUTH_MODE=disabled ray start --address=$RAY_HEAD_IP:6379"]
        """,
        ["head_start_ray_commands[0]", "worker_start_ray_commands[0]", "token auth off"],
    ),
    "default-security-group.yaml": (
        """
        cluster_name: bad
        provider: {type: aws}
        head_start_ray_commands: ["RAY_AUTH_MODE=token ray start --head"]
        available_node_types:
          gpu: {resources: {}, node_config: {InstanceType: p5.48xlarge}}
        """,
        ["available_node_types.gpu.node_config", "SSH (22) open to 0.0.0.0/0"],
    ),
    "loadbalancer.yaml": (
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: harmless}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: ray-public}
        spec:
          type: LoadBalancer
          selector: {ray.io/node-type: head}
          ports:
            - {name: dashboard, port: 8265}
            - {name: gcs, port: 6379}
            - {name: http, port: 80, targetPort: 5000}
        """,
        [
            "document 2: Service ray-public: spec.ports[0]",
            "LoadBalancer Service exposes",
            "8265 (Ray dashboard)",
            "6379 (Ray GCS)",
            "5000 (MLflow)",
        ],
    ),
    "mlflow-server.yaml": (
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: mlflow}
        spec:
          template:
            spec:
              containers:
                - name: mlflow
                  image: ghcr.io/mlflow/mlflow
                  command: ["sh", "-c"]
                  args: ["mlflow server --backend-store-uri sqlite:///m.db --host 0.0.0.0"]
        """,
        ["args[0]", "MLflow server bound to all interfaces"],
    ),
    "mlflow.sh": (
        """
        #!/bin/sh
        mlflow server --backend-store-uri sqlite:///m.db \\
          --host=0.0.0.0
        """,
        ["line 2", "MLflow server bound to all interfaces"],
    ),
    "raycluster-exposed.yaml": (
        """
        apiVersion: ray.io/v1
        kind: RayCluster
        metadata: {name: open}
        spec:
          headGroupSpec:
            serviceType: NodePort
            enableIngress: true
            rayStartParams: {}
            template:
              spec:
                hostNetwork: true
                containers:
                  - name: ray-head
                    image: rayproject/ray
                    ports: [{containerPort: 8265, hostPort: 8265}]
        """,
        [
            "headGroupSpec.serviceType",
            "NodePort head service",
            "enableIngress",
            "token auth off (no authOptions)",
            "hostNetwork",
            "hostPort 8265",
        ],
    ),
    "cloudformation.yaml": (
        """
        Parameters:
          Cidr: {Type: String, Default: 0.0.0.0/0}
        Resources:
          Group:
            Type: AWS::EC2::SecurityGroup
            Properties:
              GroupDescription: open
              SecurityGroupIngress:
                - {IpProtocol: tcp, FromPort: 5000, ToPort: 5000, CidrIp: !Ref Cidr}
          Rule:
            Type: AWS::EC2::SecurityGroupIngress
            Properties:
              GroupId: !GetAtt Group.GroupId
              IpProtocol: tcp
              FromPort: 6000
              ToPort: 11000
              CidrIp: 0.0.0.0/1
        """,
        [
            "Resources.Group.Properties.SecurityGroupIngress[0]",
            "5000 (MLflow)",
            "Resources.Rule.Properties",
            "6379 (Ray GCS)",
            "10001 (Ray client)",
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_planted_exposure_fails(lint, tmp_path, name, capsys):
    text, expected = BAD[name]
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    assert lint.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: "), out
    for fragment in expected:
        assert fragment in out, (fragment, out)


def test_fixed_versions_pass(lint, tmp_path, capsys):
    """The same shapes done right are not flagged."""
    good = tmp_path / "good.yaml"
    good.write_text(
        textwrap.dedent(
            """
            apiVersion: v1
            kind: Service
            metadata: {name: ray-internal}
            spec:
              type: ClusterIP
              ports: [{name: dashboard, port: 8265}]
            ---
            apiVersion: v1
            kind: Service
            metadata: {name: web}
            spec:
              type: LoadBalancer
              ports: [{name: https, port: 443, targetPort: 8443}]
            ---
            Resources:
              Group:
                Type: AWS::EC2::SecurityGroup
                Properties:
                  GroupDescription: ok
                  SecurityGroupIngress:
                    - {IpProtocol: tcp, FromPort: 22, ToPort: 22, CidrIp: 203.0.113.7/32}
                    - {IpProtocol: tcp, FromPort: 443, ToPort: 443, CidrIp: 0.0.0.0/0}
            ---
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: operator-to-dashboard}
            spec:
              podSelector: {matchLabels: {ray.io/is-ray-node: "yes"}}
              policyTypes: [Ingress]
              ingress:
                - from: [{podSelector: {}}]
                - from:
                    - namespaceSelector:
                        matchLabels: {kubernetes.io/metadata.name: kuberay-system}
                  ports: [{protocol: TCP, port: 8265}]
            ---
            cluster_name: ok
            provider: {type: aws}
            available_node_types:
              head: {resources: {}, node_config: {SecurityGroupIds: [sg-1]}}
            head_start_ray_commands:
              - RAY_AUTH_MODE=token ray start --head --dashboard-host=127.0.0.1
              - mlflow server --host 127.0.0.1 --port 5000
            """
        )
    )
    assert lint.main([str(good)]) == 0, capsys.readouterr().out


def test_unparsable_file_fails(lint, tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1, 2\n")
    assert lint.main([str(path)]) == 1
    assert "cannot parse" in capsys.readouterr().out


def test_usage_errors(lint, tmp_path):
    assert lint.main([]) == 2
    assert lint.main([str(tmp_path / "missing.yaml")]) == 2
