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
- the RayJob's command line through llamaray's own config loader.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

LAUNCHER_CONFIGS = ["aws.yaml", "local.yaml"]
GPU_TYPES = {
    "gpu.a100x8": ("p4de.24xlarge", 96, "A100"),
    "gpu.h100x8": ("p5.48xlarge", 192, "H100"),
}
GPU_GROUPS = {"a100x8": "p4de.24xlarge", "h100x8": "p5.48xlarge"}


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
    for name, (instance, cpus, _) in GPU_TYPES.items():
        t = types[name]
        assert t["node_config"]["InstanceType"] == instance
        assert t["resources"] == {"CPU": cpus, "GPU": 8}
        assert t["min_workers"] == 0 and 1 <= t["max_workers"] <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert config["provider"]["cache_stopped_nodes"] is False

    # Every node type: an instance profile by name (no keys), the prepared security group.
    prereqs = load(cluster_dir / "aws-prereqs.yaml")["Resources"]
    profiles = {prereqs[r]["Properties"]["InstanceProfileName"] for r in prereqs if "Profile" in r}
    for name, t in types.items():
        node = t["node_config"]
        assert node["IamInstanceProfile"]["Name"] in profiles, name
        assert node["SecurityGroupIds"] and node["MetadataOptions"]["HttpTokens"] == "required"
    assert head["node_config"]["IamInstanceProfile"]["Name"] == "llamaray-head"

    # The dashboard on the head's loopback, token auth for every node, the token synced.
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "--num-cpus=0" in head_start
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token ray start" in command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]

    # The project: synced from the checkout, installed editable with the gpu extra.
    assert config["file_mounts"]["~/llamaray"] == "."
    assert ".gitignore" in config["rsync_filter"]
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install .*torch==", setup)
    assert 'pip install -q -e "$HOME/llamaray[gpu]"' in setup


def test_versions_in_step(cluster_dir):
    """The Ray in images and manifests is the Ray that validated them (and submits jobs)."""
    version = ray.__version__
    aws = load(cluster_dir / "aws.yaml")
    assert aws["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    dockerfile = (cluster_dir / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(version)}-py311-gpu$", dockerfile, re.M)
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for doc in load_all(cluster_dir / "kuberay" / name):
            spec = (
                doc["spec"].get("rayClusterSpec", doc["spec"])
                if "ray.io" in doc["apiVersion"]
                else None
            )
            if spec:
                assert spec["rayVersion"] == version


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

    # The values a user replaces: the AMI and the stack's security group.
    config = load(cluster_dir / "aws.yaml")
    for node_type in config["available_node_types"].values():
        node = node_type["node_config"]
        assert node["ImageId"].startswith("ami-REPLACE")
        assert node["SecurityGroupIds"][0].startswith("sg-REPLACE")
        node["ImageId"], node["SecurityGroupIds"] = aws["ami"], [sg_id]

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
        assert t["node_config"]["SecurityGroupIds"] == [sg_id], name
        assert t["node_config"]["SubnetIds"], name  # picked in the group's VPC
    head = types[resolved["head_node_type"]]
    assert head["node_config"]["IamInstanceProfile"] == {"Name": outputs["HeadInstanceProfile"]}
    assert head["resources"]["CPU"] == 0
    # Ray's autodetection (DescribeInstanceTypes) agrees with the file's GPU/CPU counts.
    for name, (_, cpus, gpu) in GPU_TYPES.items():
        res = types[name]["resources"]
        assert (res["CPU"], res["GPU"], res[f"accelerator_type:{gpu}"]) == (cpus, 8, 1)

    # What the autoscaler on the head does for a pending GPU job: launch a worker with
    # Ray's AWS node provider; botocore checks node_config against EC2's API model.
    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    for name, (instance, _, _) in GPU_TYPES.items():
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
        assert [g["GroupId"] for g in inst["SecurityGroups"]] == [sg_id]
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
        node_type["node_config"]["ImageId"] = aws["ami"]
        del node_type["node_config"]["SecurityGroupIds"]
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
        assert set(groups) == set(GPU_GROUPS), kind
        for name, instance in GPU_GROUPS.items():
            g = groups[name]
            assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1
            assert isinstance(g["rayStartParams"], dict)
            pod = g["template"]["spec"]
            assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == instance
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
        # rayStartParams are a string map in the CRD.
        for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups.values()]:
            assert all(isinstance(v, str) for v in params.values())
    # The NetworkPolicy covers Ray pods (KubeRay's label) and admits only this namespace.
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert policy["ingress"] == [{"from": [{"podSelector": {}}]}]


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
    assert cfg.train.num_workers == 8 and cfg.model.preset == "7B"
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
    for name in GPU_GROUPS:
        assert types[name]["resources"]["GPU"] == 8
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] == 2
    assert config["idle_timeout_minutes"] == 10


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
