#!/usr/bin/env python3
"""Does this node's torch build fit its NVIDIA driver? A node-setup check for GPU nodes.

    python cluster/check_cuda.py        # exit 0: fits, or no NVIDIA driver (a CPU node)
                                        # exit 1: torch needs a newer CUDA than the driver has

A torch wheel is built for one CUDA version (`torch.version.cuda`, e.g. "12.8"); the
driver supports CUDA up to the version `nvidia-smi` prints in its header ("CUDA Version:
12.4"). A wheel built for a newer CUDA than the driver's fails at the first CUDA call, or
later in NCCL, which on an autoscaled cluster is minutes into a run on an expensive node.
cluster/aws.yaml runs this in setup_commands, so such a node fails its setup instead, with
both versions and the two ways out in the message. Needs only the standard library and
torch (it reads torch's version without initialising CUDA).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

_DRIVER_CUDA = re.compile(r"CUDA Version\s*:\s*(\d+)\.(\d+)")


def parse_version(text: str | None) -> tuple[int, int] | None:
    """ "12.8" or "12.8.1" -> (12, 8); None or anything else -> None."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", text or "")
    return (int(match[1]), int(match[2])) if match else None


def driver_cuda(nvidia_smi_output: str) -> tuple[int, int] | None:
    """The highest CUDA version the driver supports, from `nvidia-smi`'s header."""
    match = _DRIVER_CUDA.search(nvidia_smi_output)
    return (int(match[1]), int(match[2])) if match else None


def check(torch_cuda: str | None, nvidia_smi_output: str | None) -> tuple[bool, str]:
    """(fits, message) for torch's CUDA version and nvidia-smi's output (None: no driver)."""
    if nvidia_smi_output is None:
        return True, "no NVIDIA driver on this node (nvidia-smi not found): nothing to check"
    driver = driver_cuda(nvidia_smi_output)
    if driver is None:
        return False, (
            "nvidia-smi printed no 'CUDA Version' (is the driver loaded? is this container "
            "started with --gpus all?); cannot tell whether torch's CUDA build fits"
        )
    built = parse_version(torch_cuda)
    if built is None:
        return False, (
            f"torch is a CPU-only build (torch.version.cuda={torch_cuda!r}) on a node whose "
            f"driver supports CUDA {driver[0]}.{driver[1]}: training would not use the GPUs. "
            "Install PyPI's Linux wheel (the CUDA build), e.g. pip install 'torch==<version>'"
        )
    shown = f"{driver[0]}.{driver[1]}"
    if built > driver:
        return False, (
            f"torch was built for CUDA {torch_cuda}, newer than this node's driver supports "
            f"(CUDA {shown}, from nvidia-smi). Either install a torch build for CUDA {shown} "
            f"or older (pip install torch --index-url "
            f"https://download.pytorch.org/whl/cu{driver[0]}{driver[1]}, if that build "
            "exists) in cluster/aws.yaml's setup_commands / cluster/Dockerfile's TORCH_SPEC, "
            "or use an AMI / node image with a newer NVIDIA driver (ImageId)"
        )
    return True, f"torch's CUDA {torch_cuda} fits the driver's CUDA {shown}"


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def main() -> int:
    import torch  # only here: the functions above are tested without a GPU

    fits, message = check(torch.version.cuda, _nvidia_smi())
    print(f"check_cuda: {message}", file=sys.stdout if fits else sys.stderr)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
