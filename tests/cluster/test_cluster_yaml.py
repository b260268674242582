"""The cluster definitions in cluster/, checked without starting Ray or touching a cloud:

- cluster launcher configs (aws.yaml, local.yaml) against Ray's own ray-schema.json, the
  way `ray up` and the autoscaler validate them;
- aws.yaml through the steps `ray up` takes before its first SSH connection (Ray's
  `_bootstrap_config`: defaults, resource autodetection, validation, IAM / key pair /
  subnet / security group set-up) and a worker launch through Ray's AWS node provider,
  against moto's EC2/IAM/CloudFormation, with the security group and instance profiles
  created from aws-prereqs.yaml; the template itself through cfn-lint;
- the KubeRay manifests structurally, through Ray's own RayCluster -> autoscaler config
  translation, and, when KUBERAY_CRD_DIR names a directory holding KubeRay's
  ray.io_rayclusters.yaml and ray.io_rayjobs.yaml CRDs, against their OpenAPI schemas;
- the RayJob's command line through llamaray's own config loader;
- which node type Ray's autoscaler starts for CPU-only work (the CPU type, never a GPU
  one) and for a run that names its accelerator type (that GPU type only), through the
  autoscaler's own `get_nodes_for`, on aws.yaml and on the RayCluster's translation;
- one Ray version everywhere: pyproject.toml's pin, the images, the KubeRay rayVersion;
- what multi-node GPU runs need: EFA interfaces (as many as EC2 says the instance type
  has), one subnet, a cluster placement group, NCCL's settings, and cluster/check_cuda.py.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from functools import partial
from pathlib import Path

import pytest
import ray
import yaml

LAUNCHER_CONFIGS = ["aws.yaml", "local.yaml"]
GPU_TYPES = {
    "gpu.a100x8": ("p4de.24xlarge", 96, "A100"),
    "gpu.h100x8": ("p5.48xlarge", 192, "H100"),
}
CPU_TYPE = ("cpu.m6i16x", "m6i.16xlarge", 64)
GPU_GROUPS = {"a100x8": "p4de.24xlarge", "h100x8": "p5.48xlarge"}
GROUP_ACCELERATORS = {"a100x8": "A100", "h100x8": "H100"}
CPU_GROUP = ("cpu", "m6i.16xlarge")
EFA_DEVICES = {"p4de.24xlarge": 4, "p5.48xlarge": 32}  # EC2's MaximumEfaInterfaces
OPERATOR_NAMESPACE = "kuberay-system"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---------------------------------------------------------------------------------------
# Cluster launcher configs


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema(cluster_dir, name):
    from ray.autoscaler._private.util import validate_config

    config = load(cluster_dir / name)
    # As written (what the autoscaler on the head reads), then as `ray up` prepares it.
    validate_config(copy.deepcopy(config))
    if config["provider"]["type"] == "aws":
        from ray.autoscaler._private.util import prepare_config

        validate_config(prepare_config(copy.deepcopy(config)))


def test_local_yaml_is_complete_for_the_fake_provider(cluster_dir):
    """The autoscaler reads a fake_multinode config as it is (its defaults file is not in
    Ray's wheel), so every top-level field of a full config must be present."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
    from ray.autoscaler._private.providers import _get_default_config

    config = load(cluster_dir / "local.yaml")
    full = _get_default_config({"type": "aws"})
    assert set(full) - set(config) == set()
    assert config["provider"]["type"] == "fake_multinode"
    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE
    head = config["available_node_types"][FAKE_HEAD_NODE_TYPE]
    assert head["resources"]["CPU"] == 0 and head["max_workers"] == 0
    workers = {k: v for k, v in config["available_node_types"].items() if k != FAKE_HEAD_NODE_TYPE}
    assert workers and all(
        t["min_workers"] == 0 and t["max_workers"] >= 2 for t in workers.values()
    )
    assert all(t["resources"]["CPU"] == 1 for t in workers.values())
    assert 0 < config["idle_timeout_minutes"] <= 1


def test_aws_yaml_shape(cluster_dir):
    config = load(cluster_dir / "aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # A CPU head that takes no tasks, GPU workers from zero.
    assert head["resources"] == {"CPU": 0}
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))
    for name, (instance, cpus, gpu) in GPU_TYPES.items():
        t = types[name]
        assert t["node_config"]["InstanceType"] == instance
        # The accelerator type under the name Ray's own detection gives it.
        assert t["resources"] == {"CPU": cpus, "GPU": 8, f"accelerator_type:{gpu}": 1}
        assert t["min_workers"] == 0 and 1 <= t["max_workers"] <= config["max_workers"]
    # A CPU type for Ray Data work, from zero, without GPUs.
    name, instance, cpus = CPU_TYPE
    cpu = types[name]
    assert cpu["node_config"]["InstanceType"] == instance
    assert cpu["resources"] == {"CPU": cpus}
    assert cpu["min_workers"] == 0 and cpu["max_workers"] >= 1
    assert set(types) == {config["head_node_type"], name, *GPU_TYPES}
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert config["max_workers"] == sum(t["max_workers"] for t in workers)
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert config["provider"]["cache_stopped_nodes"] is False

    # Every node type: an instance profile by name (no keys), the prepared security group.
    prereqs = load(cluster_dir / "aws-prereqs.yaml")["Resources"]
    profiles = {prereqs[r]["Properties"]["InstanceProfileName"] for r in prereqs if "Profile" in r}
    for name, t in types.items():
        node = t["node_config"]
        assert node["IamInstanceProfile"]["Name"] in profiles, name
        groups = node.get("SecurityGroupIds") or [
            g for ni in node["NetworkInterfaces"] for g in ni["Groups"]
        ]
        assert groups and node["MetadataOptions"]["HttpTokens"] == "required"
    assert head["node_config"]["IamInstanceProfile"]["Name"] == "llamaray-head"

    # The dashboard on the head's loopback, token auth for every node, the token synced.
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "--num-cpus=0" in head_start
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token ray start" in command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]

    # The project: synced from the checkout, installed editable with the gpu and quality extras.
    assert config["file_mounts"]["~/llamaray"] == "."
    assert ".gitignore" in config["rsync_filter"]
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install .*torch==", setup)
    assert 'pip install -q -e "$HOME/llamaray[gpu,quality]"' in setup
    # The CUDA check runs after torch is installed, on every node (CPU nodes pass).
    commands = config["setup_commands"]
    (check,) = [i for i, c in enumerate(commands) if "cluster/check_cuda.py" in c]
    assert check > max(i for i, c in enumerate(commands) if "torch==" in c)
    assert (cluster_dir / "check_cuda.py").is_file()


def pinned_ray(repo: Path) -> str:
    """The version in pyproject.toml's `ray[...]==X` dependency (it must be a pin)."""
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if re.match(r"ray\[", d)]
    match = re.fullmatch(r"ray\[[\w,]+\]==(\d+\.\d+\.\d+)", ray_dep.replace(" ", ""))
    assert match, f"pyproject.toml must pin ray exactly (ray[...]==X.Y.Z), not {ray_dep!r}"
    return match[1]


def test_versions_in_step(cluster_dir, repo):
    """One Ray everywhere: the pin in pyproject.toml is the installed Ray (that validated
    these files and submits jobs), the Ray of both images and of the KubeRay manifests; no
    setup command installs another."""
    version = pinned_ray(repo)
    assert version == ray.__version__
    aws = load(cluster_dir / "aws.yaml")
    images = [aws["docker"]["image"]] + [
        t["docker"]["worker_image"]
        for t in aws["available_node_types"].values()
        if "worker_image" in t.get("docker", {})
    ]
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py311(-gpu|-cpu)?", image)
    for command in aws["setup_commands"] + aws["worker_setup_commands"]:
        assert not re.search(r"\bray(\[[\w,]*\])?[=<>~]", command), command
    dockerfile = (cluster_dir / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert base == f"rayproject/ray:{version}-py311-gpu"
    assert not re.search(r"pip install[^\n]*\bray[\[=]", dockerfile)
    specs = 0
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for doc in load_all(cluster_dir / "kuberay" / name):
            spec = (
                doc["spec"].get("rayClusterSpec", doc["spec"])
                if "ray.io" in doc["apiVersion"]
                else None
            )
            if spec:
                assert spec["rayVersion"] == version
                specs += 1
    assert specs == 2


def test_version_check_fails_on_a_range_or_a_drift(tmp_path):
    """pinned_ray refuses a range, and a drifted pin differs from the installed Ray."""
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["torch>=2", "ray[default,train]>=2.50"]\n'
    )
    with pytest.raises(AssertionError, match="must pin ray exactly"):
        pinned_ray(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["ray[default,train,data,tune]==2.49.1"]\n'
    )
    assert pinned_ray(tmp_path) == "2.49.1" != ray.__version__


def test_no_credentials_in_cluster_files(cluster_dir):
    patterns = [
        r"AKIA[0-9A-Z]{16}",  # an access key ID
        r"(?i)aws_secret_access_key|aws_access_key_id|secretAccessKey|accessKeyId",
        r"(?i)BEGIN [A-Z ]*PRIVATE KEY",
    ]
    for path in cluster_dir.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".json", ""}:
            text = path.read_text()
            for pattern in patterns:
                assert not re.search(pattern, text), (path, pattern)


def node_docker_config(config: dict, node_type: str) -> dict:
    """The docker settings a node of `node_type` starts with: the global ones updated with
    the node type's (Ray's StandardAutoscaler._get_node_specific_docker_config)."""
    docker = copy.deepcopy(config["docker"])
    docker.update(config["available_node_types"][node_type].get("docker", {}))
    return docker


def test_aws_gpu_nodes_for_multi_node_fsdp(cluster_dir):
    """What FSDP across p4de/p5 nodes needs: every EFA network card used, one subnet, one
    cluster placement group (created by aws-prereqs.yaml), the EFA devices and libraries in
    the container, NCCL's settings; CPU nodes get none of it (no --gpus: Docker would fail
    on a node without the NVIDIA driver loaded)."""
    config = load(cluster_dir / "aws.yaml")
    types = config["available_node_types"]
    assert config["provider"]["use_internal_ips"] is True  # multi-interface: no public IP
    subnets, placements = set(), set()
    for name, t in types.items():
        node = t["node_config"]
        if name not in GPU_TYPES:
            assert "NetworkInterfaces" not in node
            subnets.update(node["SubnetIds"])
            continue
        interfaces = node["NetworkInterfaces"]
        assert len(interfaces) == EFA_DEVICES[node["InstanceType"]]
        assert sorted(ni["NetworkCardIndex"] for ni in interfaces) == list(range(len(interfaces)))
        primary = [ni for ni in interfaces if ni["DeviceIndex"] == 0]
        assert primary == [ni for ni in interfaces if ni["NetworkCardIndex"] == 0]
        assert primary[0]["InterfaceType"] == "efa"  # the node's IP traffic, and EFA
        assert {ni["InterfaceType"] for ni in interfaces} <= {"efa", "efa-only"}
        assert all(ni["DeviceIndex"] == 1 for ni in interfaces if ni not in primary)
        assert all(ni["DeleteOnTermination"] for ni in interfaces)
        assert all(ni["Groups"] == ["sg-REPLACE-WITH-STACK-OUTPUT"] for ni in interfaces)
        subnets.update(ni["SubnetId"] for ni in interfaces)
        placements.add(node["Placement"]["GroupName"])

        docker = node_docker_config(config, name)
        options = docker["run_options"] + docker["worker_run_options"]
        for option in (
            "--gpus all",
            "--device=/dev/infiniband",
            "--cap-add=IPC_LOCK",
            "--ulimit memlock=-1:-1",
            "--volume=/opt/amazon:/opt/amazon:ro",
            "--env FI_PROVIDER=efa",
            "--env FI_EFA_USE_DEVICE_RDMA=1",
            "--env RAY_AUTH_MODE=token",
        ):
            assert option in options, (name, option)
        assert any(o.startswith("--env NCCL_SOCKET_IFNAME=") for o in options)
    assert len(subnets) == 1, subnets  # one subnet for every node
    assert len(placements) == 1, placements
    (cpu,) = [n for n in types if n.startswith("cpu.")]
    cpu_docker = node_docker_config(config, cpu)
    assert not any(
        "--gpus" in o for o in cpu_docker["run_options"] + cpu_docker["worker_run_options"]
    )
    # NCCL finds the AMI's aws-ofi-nccl and libfabric, mounted above.
    (start,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    libs = "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib:"
    assert f"export LD_LIBRARY_PATH={libs}" in start

    # The placement group: aws-prereqs.yaml makes a cluster one and names it in an output.
    prereqs = load(cluster_dir / "aws-prereqs.yaml")
    (group,) = [
        n for n, r in prereqs["Resources"].items() if r["Type"] == "AWS::EC2::PlacementGroup"
    ]
    assert prereqs["Resources"][group]["Properties"]["Strategy"] == "cluster"
    assert prereqs["Outputs"]["PlacementGroupName"]["Value"] == {"Ref": group}
    # ...and the head may launch into it (RunInstances on every resource).
    head_role = prereqs["Resources"]["HeadRole"]["Properties"]["Policies"]
    statements = [s for p in head_role for s in p["PolicyDocument"]["Statement"]]
    assert any("ec2:RunInstances" in s["Action"] and s["Resource"] == "*" for s in statements)

    # The image for KubeRay carries EFA's user space and puts it on the library path.
    dockerfile = (cluster_dir / "Dockerfile").read_text()
    assert "efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify" in dockerfile
    assert re.search(rf"^ENV LD_LIBRARY_PATH={libs}", dockerfile, re.M)


# ---------------------------------------------------------------------------------------
# cluster/check_cuda.py: torch's CUDA build against the node's driver


@pytest.fixture(scope="module")
def check_cuda(cluster_dir):
    spec = importlib.util.spec_from_file_location("check_cuda", cluster_dir / "check_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The header of `nvidia-smi` on a p5 node with a 550 driver (CUDA 12.4).
NVIDIA_SMI_124 = """\
Tue Dec  1 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.127.05             Driver Version: 550.127.05     CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:53:00.0 Off |                    0 |
"""


def test_check_cuda_parses_versions(check_cuda):
    assert check_cuda.driver_cuda(NVIDIA_SMI_124) == (12, 4)
    assert check_cuda.driver_cuda("CUDA Version: 13.0") == (13, 0)
    assert check_cuda.driver_cuda("NVIDIA-SMI has failed: couldn't communicate") is None
    assert check_cuda.parse_version("12.8") == (12, 8)
    assert check_cuda.parse_version("11.8.0") == (11, 8)
    assert check_cuda.parse_version(None) is None and check_cuda.parse_version("") is None
    # (12, 10) is newer than (12, 4): compared as numbers, not strings.
    assert check_cuda.parse_version("12.10") > check_cuda.driver_cuda(NVIDIA_SMI_124)


@pytest.mark.parametrize(
    ("torch_cuda", "smi", "fits", "says"),
    [
        ("12.4", NVIDIA_SMI_124, True, "fits the driver's CUDA 12.4"),
        ("12.1", NVIDIA_SMI_124, True, "fits"),
        ("11.8", NVIDIA_SMI_124, True, "fits"),
        ("12.8", NVIDIA_SMI_124, False, "built for CUDA 12.8, newer than"),
        ("12.10", NVIDIA_SMI_124, False, "newer than this node's driver supports (CUDA 12.4"),
        ("13.0", NVIDIA_SMI_124, False, "download.pytorch.org/whl/cu124"),
        (None, NVIDIA_SMI_124, False, "CPU-only build"),
        ("12.8", "NVIDIA-SMI has failed", False, "printed no 'CUDA Version'"),
        ("12.8", None, True, "no NVIDIA driver on this node"),
        (None, None, True, "nothing to check"),
    ],
)
def test_check_cuda_verdicts(check_cuda, torch_cuda, smi, fits, says):
    ok, message = check_cuda.check(torch_cuda, smi)
    assert ok is fits and says in message, message
    if not ok and torch_cuda and smi and "CUDA Version" in smi:
        # The two ways out: another torch build, or a newer driver (the image).
        assert "TORCH_SPEC" in message and "ImageId" in message


def test_check_cuda_command(cluster_dir, tmp_path):
    """The script as setup_commands runs it: exit 0 where nvidia-smi is missing (a CPU
    node); with an `nvidia-smi` on PATH printing a real header and this machine's CPU-only
    torch, exit 1 naming the problem."""
    script = [sys.executable, str(cluster_dir / "check_cuda.py")]
    env = {k: v for k, v in os.environ.items() if k != "PATH"} | {"PATH": str(tmp_path)}
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "nothing to check" in done.stdout, done.stderr

    import torch

    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{NVIDIA_SMI_124}EOF\n")
    smi.chmod(0o755)
    env["PATH"] = f"{tmp_path}:/usr/bin:/bin"
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120)
    ok, expected = check_cuda_expected(torch.version.cuda)
    assert done.returncode == (0 if ok else 1), done.stdout + done.stderr
    assert expected in (done.stdout + done.stderr)


def check_cuda_expected(torch_cuda: str | None) -> tuple[bool, str]:
    """What the script must say here, for this machine's torch (CPU-only in CI)."""
    if torch_cuda is None:
        return False, "CPU-only build"
    major, minor = (int(x) for x in torch_cuda.split(".")[:2])
    return ((major, minor) <= (12, 4), "fits" if (major, minor) <= (12, 4) else "newer than")


# ---------------------------------------------------------------------------------------
# aws.yaml as `ray up` resolves it, against moto


def test_prereqs_template_passes_cfn_lint(cluster_dir):
    cfn = pytest.importorskip("cfnlint.api")
    matches = cfn.lint((cluster_dir / "aws-prereqs.yaml").read_text(), regions=["us-west-2"])
    assert [str(m) for m in matches] == []


@pytest.fixture
def aws(cluster_dir, tmp_path, monkeypatch):
    """moto's AWS in aws.yaml's region, for boto3 and Ray's launcher in this process."""
    moto = pytest.importorskip("moto")
    import boto3

    region = load(cluster_dir / "aws.yaml")["provider"]["region"]
    monkeypatch.setenv("HOME", str(tmp_path))  # ray up writes ~/.ssh/ray-autoscaler_*.pem
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region,
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    with moto.mock_aws():
        ec2 = boto3.client("ec2", region_name=region)
        yield {
            "ec2": ec2,
            "cfn": boto3.client("cloudformation", region_name=region),
            "iam": boto3.client("iam", region_name=region),
            "ami": ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"],
        }


def fill_in(config: dict, ami: str, sg_id: str, subnet: str) -> dict:
    """aws.yaml with its REPLACE values (AMI, security group, subnet) filled in, as a user
    does after deploying aws-prereqs.yaml."""
    for node_type in config["available_node_types"].values():
        node = node_type["node_config"]
        assert node["ImageId"].startswith("ami-REPLACE")
        node["ImageId"] = ami
        if "NetworkInterfaces" in node:
            # YAML aliases share the interface mappings between node types: copy them.
            node["NetworkInterfaces"] = copy.deepcopy(node["NetworkInterfaces"])
            for ni in node["NetworkInterfaces"]:
                assert ni["SubnetId"].startswith("subnet-REPLACE")
                assert ni["Groups"][0].startswith("sg-REPLACE")
                ni["SubnetId"], ni["Groups"] = subnet, [sg_id]
        else:
            assert node["SecurityGroupIds"][0].startswith("sg-REPLACE")
            assert node["SubnetIds"][0].startswith("subnet-REPLACE")
            node["SecurityGroupIds"], node["SubnetIds"] = [sg_id], [subnet]
    return config


def test_ray_up_bootstrap_and_worker_launch(cluster_dir, aws):
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

    ec2, cfn = aws["ec2"], aws["cfn"]
    ssh_cidr = "203.0.113.7/32"
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    cfn.create_stack(
        StackName="llamaray-prereqs",
        TemplateBody=(cluster_dir / "aws-prereqs.yaml").read_text(),
        Parameters=[
            {"ParameterKey": "VpcId", "ParameterValue": vpc["VpcId"]},
            {"ParameterKey": "SshCidr", "ParameterValue": ssh_cidr},
            {"ParameterKey": "BucketName", "ParameterValue": "llamaray-test"},
        ],
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )
    stack = cfn.describe_stacks(StackName="llamaray-prereqs")["Stacks"][0]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    sg_id = outputs["SecurityGroupId"]

    # The values a user replaces: the AMI, the stack's security group and placement group,
    # and the one (private) subnet.
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])
    subnet = subnet["Subnets"][0]["SubnetId"]
    config = fill_in(load(cluster_dir / "aws.yaml"), aws["ami"], sg_id, subnet)
    # moto's CloudFormation skips AWS::EC2::PlacementGroup (with a warning) and the output
    # naming it; the template's group is checked in test_aws_gpu_nodes_for_multi_node_fsdp.
    group = outputs.get("PlacementGroupName", "llamaray-prereqs-GpuPlacementGroup-1")
    for name in GPU_TYPES:
        placement = config["available_node_types"][name]["node_config"]["Placement"]
        assert placement["GroupName"].startswith("REPLACE-WITH-STACK-OUTPUT")
        placement["GroupName"] = group

    resolved = _bootstrap_config(config, no_config_cache=True)

    # The launcher kept our group and added no rule: SSH from one CIDR, else only the
    # group itself; nothing from 0.0.0.0/0.
    (sg,) = ec2.describe_security_groups(GroupIds=[sg_id])["SecurityGroups"]
    cidrs = [r["CidrIp"] for p in sg["IpPermissions"] for r in p.get("IpRanges", [])]
    assert cidrs == [ssh_cidr]
    (ssh,) = [p for p in sg["IpPermissions"] if p.get("IpRanges")]
    assert (ssh["FromPort"], ssh["ToPort"]) == (22, 22)
    (internal,) = [p for p in sg["IpPermissions"] if p.get("UserIdGroupPairs")]
    assert internal["IpProtocol"] == "-1"
    assert [g["GroupId"] for g in internal["UserIdGroupPairs"]] == [sg_id]
    assert not [p for p in sg["IpPermissions"] if p.get("Ipv6Ranges")]

    types = resolved["available_node_types"]
    for name, t in types.items():
        # Ray's launcher reads an EFA node's group and subnet from its interfaces.
        assert set(t["node_config"]["SecurityGroupIds"]) == {sg_id}, name
        assert set(t["node_config"]["SubnetIds"]) == {subnet}, name  # one subnet for all
    head = types[resolved["head_node_type"]]
    assert head["node_config"]["IamInstanceProfile"] == {"Name": outputs["HeadInstanceProfile"]}
    assert head["resources"]["CPU"] == 0
    # Ray's autodetection (DescribeInstanceTypes) agrees with the file's GPU/CPU counts
    # and accelerator types, and the file's interfaces with EC2's EFA count.
    for name, (instance, cpus, gpu) in GPU_TYPES.items():
        res = types[name]["resources"]
        assert (res["CPU"], res["GPU"], res[f"accelerator_type:{gpu}"]) == (cpus, 8, 1)
        (info,) = ec2.describe_instance_types(InstanceTypes=[instance])["InstanceTypes"]
        efa = info["NetworkInfo"]["EfaInfo"]["MaximumEfaInterfaces"]
        assert efa == EFA_DEVICES[instance]
        assert len(types[name]["node_config"]["NetworkInterfaces"]) == efa
    assert types[CPU_TYPE[0]]["resources"]["CPU"] == CPU_TYPE[2]

    # What the autoscaler on the head does for a pending GPU job: launch a worker with
    # Ray's AWS node provider; botocore checks node_config against EC2's API model.
    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    for name, (instance, _, _) in {**GPU_TYPES, CPU_TYPE[0]: (*CPU_TYPE[1:], None)}.items():
        tags = {
            TAG_RAY_NODE_KIND: "worker",
            TAG_RAY_USER_NODE_TYPE: name,
            TAG_RAY_NODE_NAME: f"ray-{resolved['cluster_name']}-worker",
        }
        provider.create_node(types[name]["node_config"], tags, 1)
        (node_id,) = provider.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: name})
        (inst,) = ec2.describe_instances(InstanceIds=[node_id])["Reservations"][0]["Instances"]
        assert inst["InstanceType"] == instance
        profile = outputs["WorkerInstanceProfile"]
        assert inst["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/{profile}")
        # (moto keeps an instance's groups on its interfaces when it was launched with
        # NetworkInterfaces, and models neither EFA nor placement groups.)
        interfaces = inst["NetworkInterfaces"]
        groups = [g["GroupId"] for g in inst["SecurityGroups"]]
        groups += [g["GroupId"] for ni in interfaces for g in ni["Groups"]]
        assert set(groups) == {sg_id}
        assert {inst["SubnetId"]} | {ni["SubnetId"] for ni in interfaces} == {subnet}
        assert inst["MetadataOptions"]["HttpTokens"] == "required"
        provider.terminate_node(node_id)


def test_launchers_own_security_group_opens_ssh_to_the_world(cluster_dir, aws):
    """Why aws.yaml names a prepared group (and lint_ports flags AWS node types without
    SecurityGroupIds): the group `ray up` creates otherwise admits SSH from 0.0.0.0/0."""
    from ray.autoscaler._private.commands import _bootstrap_config

    for name in ("llamaray-head", "llamaray-worker"):
        aws["iam"].create_instance_profile(InstanceProfileName=name)
    config = load(cluster_dir / "aws.yaml")
    for node_type in config["available_node_types"].values():
        node = node_type["node_config"]
        node["ImageId"] = aws["ami"]
        for key in ("SecurityGroupIds", "SubnetIds", "NetworkInterfaces", "Placement"):
            node.pop(key, None)
    resolved = _bootstrap_config(config, no_config_cache=True)
    (sg_id,) = resolved["available_node_types"]["gpu.a100x8"]["node_config"]["SecurityGroupIds"]
    (sg,) = aws["ec2"].describe_security_groups(GroupIds=[sg_id])["SecurityGroups"]
    world = [
        p for p in sg["IpPermissions"] for r in p.get("IpRanges", []) if r["CidrIp"] == "0.0.0.0/0"
    ]
    assert [(p["FromPort"], p["ToPort"]) for p in world] == [(22, 22)]


# ---------------------------------------------------------------------------------------
# KubeRay


def kuberay_docs(cluster_dir) -> dict[str, dict]:
    docs = {}
    for name in ("access.yaml", "raycluster.yaml", "rayjob.yaml"):
        for doc in load_all(cluster_dir / "kuberay" / name):
            docs[doc["kind"]] = doc
    return docs


def ray_cluster_specs(cluster_dir) -> dict[str, dict]:
    docs = kuberay_docs(cluster_dir)
    return {
        "RayCluster": docs["RayCluster"]["spec"],
        "RayJob": docs["RayJob"]["spec"]["rayClusterSpec"],
    }


def test_kuberay_manifests_shape(cluster_dir):
    docs = kuberay_docs(cluster_dir)
    assert set(docs) == {"ServiceAccount", "NetworkPolicy", "RayCluster", "RayJob"}
    assert docs["RayCluster"]["apiVersion"] == docs["RayJob"]["apiVersion"] == "ray.io/v1"
    sa = docs["ServiceAccount"]
    assert re.fullmatch(
        r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
    )
    for kind, spec in ray_cluster_specs(cluster_dir).items():
        assert spec["enableInTreeAutoscaling"] is True, kind
        assert spec["authOptions"] == {"mode": "token"}, kind
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP", kind
        assert head["rayStartParams"] == {"num-cpus": "0"}, kind
        pods = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"]
            (container,) = pod["spec"]["containers"]
            res = container["resources"]
            assert {"cpu", "memory"} <= set(res["limits"]) and res["limits"] == res["requests"]
            assert "hostNetwork" not in pod["spec"]
        assert (
            "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        )
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {*GPU_GROUPS, CPU_GROUP[0]}, kind
        for name, instance in {**GPU_GROUPS, CPU_GROUP[0]: CPU_GROUP[1]}.items():
            g = groups[name]
            assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1
            assert isinstance(g["rayStartParams"], dict)
            pod = g["template"]["spec"]
            assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == instance
        # The CPU group: no GPUs, no GPU toleration, no EFA.
        cpu_pod = groups[CPU_GROUP[0]]["template"]["spec"]
        assert not any("nvidia.com/gpu" in str(c["resources"]) for c in cpu_pod["containers"])
        assert "tolerations" not in cpu_pod and "initContainers" not in cpu_pod
        for name, instance in GPU_GROUPS.items():
            pod = groups[name]["template"]["spec"]
            (container,) = pod["containers"]
            limits = container["resources"]["limits"]
            assert limits["nvidia.com/gpu"] == "8"
            # Every EFA device of the instance type, from AWS's EFA device plugin.
            assert limits["vpc.amazonaws.com/efa"] == str(EFA_DEVICES[instance])
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
            assert env["NCCL_SOCKET_IFNAME"].startswith("^lo")
            assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
            # NCCL's shared memory: /dev/shm from a memory-backed volume, not 64 MiB.
            (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            (volume,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
            assert volume["emptyDir"]["medium"] == "Memory"
            # torch's CUDA against the node's driver, before Ray starts, on the same GPUs.
            (check,) = pod["initContainers"]
            assert check["command"][-1] == "/home/ray/llamaray/cluster/check_cuda.py"
            assert check["image"] == container["image"]
            assert check["resources"]["limits"]["nvidia.com/gpu"] == "8"
        # rayStartParams are a string map in the CRD.
        for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups.values()]:
            assert all(isinstance(v, str) for v in params.values())
    # The NetworkPolicy covers Ray pods (KubeRay's label) and admits this namespace's pods,
    # and the operator's namespace on the head's dashboard port only.
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert policy["policyTypes"] == ["Ingress"]
    own, operator = policy["ingress"]
    assert own == {"from": [{"podSelector": {}}]}
    assert operator["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}}}
    ]
    (dashboard,) = [
        p
        for p in ray_cluster_specs(cluster_dir)["RayCluster"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ][0]["ports"]
        if p["name"] == "dashboard"
    ]
    assert operator["ports"] == [{"protocol": "TCP", "port": dashboard["containerPort"]}]
    assert dashboard["containerPort"] == 8265


def test_networkpolicy_admits_the_rayjob_controller_and_no_one_else(cluster_dir):
    """Evaluate the NetworkPolicy the way Kubernetes does (a connection is allowed when one
    ingress rule's `from` and `ports` both match) for the connections that matter."""
    policy = kuberay_docs(cluster_dir)["NetworkPolicy"]["spec"]
    own_namespace = "llamaray"

    def allowed(src_namespace: str, port: int) -> bool:
        for rule in policy["ingress"]:
            ports = rule.get("ports")
            if ports and not any(p["port"] == port for p in ports):
                continue
            for peer in rule.get("from", []):
                if "ipBlock" in peer:
                    return True  # none here; would be judged by CIDR
                ns = peer.get("namespaceSelector")
                if ns is None:  # podSelector alone: the policy's own namespace
                    if src_namespace == own_namespace:
                        return True
                elif ns == {} or ns["matchLabels"] == {
                    "kubernetes.io/metadata.name": src_namespace
                }:
                    return True
        return False

    assert allowed(own_namespace, 6379) and allowed(own_namespace, 8265)  # Ray pods, submitter
    assert allowed(OPERATOR_NAMESPACE, 8265)  # the RayJob controller polls the job API
    for port in (6379, 10001, 8076, 52365):  # GCS, client, object manager, agent
        assert not allowed(OPERATOR_NAMESPACE, port), port
    assert not allowed("some-other-team", 8265)


def test_rayjob_runs_on_the_raycluster_spec(cluster_dir):
    """rayjob.yaml embeds raycluster.yaml's spec; they must not drift apart."""
    specs = ray_cluster_specs(cluster_dir)
    assert specs["RayJob"] == specs["RayCluster"]


def test_rayjob_entrypoint_is_a_valid_llamaray_run(cluster_dir, repo):
    from llamaray.config import load_config

    job = kuberay_docs(cluster_dir)["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "jobs/pretrain.py", "--config", "jobs/configs/llama-7b.yaml"]
    cfg = load_config(str(repo / argv[3]), argv[4:])  # llamaray's own validation
    assert cfg.storage.startswith("s3://") and cfg.storage_path == cfg.storage
    assert cfg.data.corpus.startswith("s3://")
    assert cfg.train.device == "cuda"  # GPU workers do not exist when the driver starts
    # Two 8-GPU nodes (FSDP across nodes, over EFA), of one accelerator type.
    assert cfg.train.num_workers == 16 and cfg.model.preset == "7B"
    assert cfg.train.accelerator_type in GROUP_ACCELERATORS.values()
    # jobs/runtime_env.yaml, with the image's checkout (cluster/Dockerfile) as working_dir.
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    submitted = yaml.safe_load((repo / "jobs/runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "/home/ray/llamaray"
    assert submitted["env_vars"].items() <= runtime_env["env_vars"].items()
    assert (
        "COPY --chown=ray:users platform /home/ray/llamaray/platform"
        in (cluster_dir / "Dockerfile").read_text()
    )
    assert job["shutdownAfterJobFinishes"] is True

    # llamaray's no-shared-disk rule passes on this cluster (a head without CPUs, worker
    # pods of their own): corpus and storage in S3, tracking on an MLflow server.
    from llamaray.placement import run_paths, shared_state_problem

    tracking = runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    assert tracking.startswith("http://")
    nodes = [
        {"NodeID": "head", "Alive": True, "Resources": {"CPU": 0}},
        {"NodeID": "gpu-1", "Alive": True, "Resources": {"CPU": 90, "GPU": 8}},
    ]
    assert shared_state_problem(run_paths(cfg), tracking, nodes, "head") is None
    # (and it would refuse the default local tracking store there)
    assert "MLFLOW_TRACKING_URI" in shared_state_problem(
        run_paths(cfg), "sqlite:///runs/mlflow.db", nodes, "head"
    )


def test_rays_kuberay_autoscaler_reads_the_raycluster(cluster_dir):
    """Ray's translation of a RayCluster into its autoscaler config (what the in-tree
    autoscaler sidecar runs) gives a head without CPUs and 8-GPU groups from zero."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )
    from ray.autoscaler._private.util import validate_config

    cr = copy.deepcopy(kuberay_docs(cluster_dir)["RayCluster"])
    cr["metadata"]["namespace"] = "default"
    config = _derive_autoscaling_config_from_ray_cr(cr)
    validate_config(config)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    for name, gpu in GROUP_ACCELERATORS.items():
        assert types[name]["resources"]["GPU"] == 8
        # rayStartParams' custom resources, as the autoscaler reads them.
        assert types[name]["resources"][f"accelerator_type:{gpu}"] == 1
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] == 2
    cpu = types[CPU_GROUP[0]]
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] >= 32
    assert cpu["min_workers"] == 0 and cpu["max_workers"] >= 1
    assert config["idle_timeout_minutes"] == 10


# ---------------------------------------------------------------------------------------
# Which node type Ray's autoscaler starts, for aws.yaml and the RayCluster


def autoscaler_node_types(cluster_dir) -> dict[str, tuple[dict, str]]:
    """{file: (node types, head type)} as the autoscaler on the head sees them: aws.yaml
    as written, the RayCluster through Ray's KubeRay translation."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    aws = load(cluster_dir / "aws.yaml")
    cr = copy.deepcopy(kuberay_docs(cluster_dir)["RayCluster"])
    cr["metadata"]["namespace"] = "default"
    kuberay = _derive_autoscaling_config_from_ray_cr(cr)
    return {
        "aws.yaml": (aws["available_node_types"], aws["head_node_type"]),
        "raycluster.yaml": (kuberay["available_node_types"], kuberay["head_node_type"]),
    }


def nodes_for(node_types: dict, head: str, demand: list[dict]) -> tuple[dict, list]:
    """What Ray's autoscaler adds to an empty cluster (the head only) for `demand`: its
    `get_nodes_for` with its default utilization scorer, as
    ResourceDemandScheduler.get_nodes_to_launch calls them."""
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    scorer = partial(
        _default_utilization_scorer,
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}),
    )
    added, residual = get_nodes_for(
        node_types, {head: 1}, head, max_to_add=100, resources=demand, utilization_scorer=scorer
    )
    return {k: v for k, v in added.items() if v}, residual


def _types_by_role(node_types: dict, head: str) -> tuple[str, dict[str, str]]:
    """(the CPU worker type, {accelerator: GPU worker type})."""
    (cpu,) = [n for n, t in node_types.items() if n != head and not t["resources"].get("GPU")]
    gpus = {
        k.split(":", 1)[1]: n
        for n, t in node_types.items()
        for k in t["resources"]
        if k.startswith("accelerator_type:")
    }
    return cpu, gpus


@pytest.mark.parametrize("file", ["aws.yaml", "raycluster.yaml"])
def test_cpu_only_work_starts_cpu_nodes_only(cluster_dir, file):
    """Ray Data's tasks and actors (prepare, evaluation on a cluster without GPUs) ask for
    CPUs only: the autoscaler starts the CPU type for them, up to everything that type can
    hold, and a GPU type only for work that asks for GPUs. Past the CPU type's maximum,
    CPU-only work does spill onto GPU nodes (the preference is a ranking, not a ban): what
    docs/cluster.md says about sizing the CPU type."""
    node_types, head = autoscaler_node_types(cluster_dir)[file]
    cpu, gpus = _types_by_role(node_types, head)
    assert set(gpus) == {"A100", "H100"}
    most = node_types[cpu]["max_workers"]
    capacity = int(node_types[cpu]["resources"]["CPU"]) * most
    for demand in ([{"CPU": 1}], [{"CPU": 1}] * capacity, [{"CPU": 4}] * 20):
        added, residual = nodes_for(node_types, head, demand)
        assert set(added) == {cpu} and residual == [], (demand, added)
    added, _ = nodes_for(node_types, head, [{"CPU": 1}] * (capacity + 1))
    assert added[cpu] == most and set(added) - {cpu} <= set(gpus.values())
    assert sum(added.values()) == most + 1
    # The same demand with a GPU asked for goes to a GPU type.
    added, _ = nodes_for(node_types, head, [{"CPU": 8, "GPU": 1}] * 8)
    assert set(added) <= set(gpus.values()) and sum(added.values()) == 1


@pytest.mark.parametrize("file", ["aws.yaml", "raycluster.yaml"])
def test_a_run_that_names_its_accelerator_gets_that_gpu_type_only(cluster_dir, file):
    """train.accelerator_type=A100 (ScalingConfig.accelerator_type: each worker also asks
    for 0.001 of `accelerator_type:A100`) starts A100 nodes only; without it, a run bigger
    than one type's maximum is given both types (the mix the accelerator type prevents)."""
    import ray.train

    node_types, head = autoscaler_node_types(cluster_dir)[file]
    _, gpus = _types_by_role(node_types, head)
    cpus = {g: node_types[n]["resources"]["CPU"] for g, n in gpus.items()}
    for gpu, node_type in gpus.items():
        per_node = 8
        scaling = ray.train.ScalingConfig(
            num_workers=2 * per_node,
            use_gpu=True,
            resources_per_worker={"CPU": min(cpus.values()) // per_node, "GPU": 1},
            accelerator_type=gpu,
        )
        bundle = scaling._resources_per_worker_not_none
        assert bundle[f"accelerator_type:{gpu}"] > 0
        added, residual = nodes_for(node_types, head, [bundle] * scaling.num_workers)
        assert added == {node_type: 2} and residual == [], (gpu, added)
        # More than that type has: the rest waits, no other type is started.
        added, residual = nodes_for(node_types, head, [bundle] * (3 * per_node))
        assert added == {node_type: 2} and len(residual) == per_node
    # Without an accelerator type, 24 GPUs on types of at most 2 x 8 mix A100 and H100.
    added, _ = nodes_for(node_types, head, [{"CPU": 8, "GPU": 1}] * 24)
    assert set(added) == set(gpus.values())


def _strict(schema):
    """A CRD schema that rejects unknown fields: the API server prunes them silently, which
    would hide a misspelt field; `kubectl apply --validate=strict` rejects them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.mark.skipif(
    not os.environ.get("KUBERAY_CRD_DIR"),
    reason="KUBERAY_CRD_DIR not set (KubeRay's ray-operator/config/crd/bases)",
)
@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_against_crd_schema(cluster_dir, name):
    import jsonschema

    crd_dir = Path(os.environ["KUBERAY_CRD_DIR"])
    for doc in load_all(cluster_dir / "kuberay" / name):
        if doc["apiVersion"] != "ray.io/v1":
            continue
        crd_file = crd_dir / f"ray.io_{doc['kind'].lower()}s.yaml"
        crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strict(version["schema"]["openAPIV3Schema"])
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
        )
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:20])
