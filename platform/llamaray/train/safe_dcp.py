"""Reading DCP checkpoints without ever running code from them.

torch's DCP reader unpickles a checkpoint's `.metadata` with `pickle.load`, and its default
load planner reads non-tensor entries (the optimizer's `param_groups`) with
`torch.load(weights_only=False)`. A pickle can name any callable, so whoever can write a
run's storage folder could make every process that resumes, evaluates or finetunes from it
run their code; the integrity records do not help, since they are plain sha256s that the
same writer can recompute.

Here `.metadata` goes through `load_metadata`, an unpickler that resolves only the names a
DCP metadata file holds (torch's metadata dataclasses, `torch.Size`, dtypes, layouts, paths)
and refuses any other with `UnsafeCheckpoint`; byte entries are read with
`torch.load(weights_only=True)` (`SafeLoadPlanner`). Every reader of the platform's
checkpoints (resume, `llamaray eval`, a finetune's base, the driver's shape check) uses
`SafeFileSystemReader` or `load_metadata`.

What stays trusted: the tensors themselves (numbers), and state that Ray Tune pickles for
its own restore (`tuner.pkl`, the experiment state), which `Tuner.restore` unpickles with
the standard unpickler. A sweep's storage folder must be writable only by whoever may run
code on the cluster (docs/reliability.md).
"""

from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

METADATA_FILE = ".metadata"

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where each item is
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name: "torch.strided"
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class UnsafeCheckpoint(pickle.UnpicklingError, ValueError):
    """A checkpoint file whose pickle names something a checkpoint never holds (a
    ValueError too: the command line reports it in one line, like other bad input)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        target = None
        if (module, name) in _ALLOWED or module == _METADATA_MODULE:
            try:
                target = super().find_class(module, name)
            except AttributeError:  # no such name: refused below like any other
                target = None
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            target = getattr(torch, name)
        # In the metadata module, only the data classes it defines (not what it imports).
        if module == _METADATA_MODULE and not (
            isinstance(target, type) and target.__module__ == module
        ):
            target = None
        if target is None:
            raise UnsafeCheckpoint(
                f"it names {module}.{name}, which DCP metadata never holds; refusing to "
                "unpickle it (a pickle naming a callable runs it)"
            )
        return target


def load_metadata(data: bytes | io.IOBase, where: str = METADATA_FILE):
    """DCP `Metadata` from the bytes (or a binary stream) of a `.metadata` file, through an
    unpickler that resolves only DCP's own classes; `UnsafeCheckpoint` naming `where`
    otherwise.

    >>> import pickle, os
    >>> load_metadata(pickle.dumps(os.system), "demo/.metadata")
    Traceback (most recent call last):
    ...
    llamaray.train.safe_dcp.UnsafeCheckpoint: demo/.metadata: it names posix.system, ...
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        metadata = _MetadataUnpickler(stream).load()
    except UnsafeCheckpoint as err:
        raise UnsafeCheckpoint(f"{where}: {err}") from None
    # Every item must be read from a file inside the checkpoint's folder.
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        if relative.startswith("/") or ".." in relative.replace("\\", "/").split("/"):
            raise UnsafeCheckpoint(f"{where}: an item is stored at {relative!r}, outside it")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's `FileSystemReader` with `.metadata` read by `load_metadata`."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))  # `__{rank}.metadata` if asked
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with byte entries read by `torch.load(weights_only=True)`:
    the optimizer's param_groups are numbers, strings and lists, which it allows."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
