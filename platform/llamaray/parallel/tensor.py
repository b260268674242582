"""Tensor and sequence parallelism (Megatron-LM; Korthikanti et al. 2022) on a dp x tp mesh.

Inside a transformer block, wq/wk/wv and w1/w3 are split by output rows (each rank owns
whole attention heads and a slice of the SwiGLU width) and wo/w2 by input columns, so a
block needs one reduction after attention and one after the MLP and nothing in between.
With sequence parallelism those reductions are reduce-scatters over the sequence and the
norms, residual adds and embeddings run on 1/tp of the tokens: activations between the
blocks take 1/tp of the memory, for the same communication volume (an all-gather before
each of attention and the MLP, a reduce-scatter after).

Order of wrapping: `apply_tensor_parallel` first (its plan names the bare submodules),
then activation checkpointing, then `fully_shard(block, mesh=mesh["dp"])` per block and on
the root. Every rank of a tp group must be fed the same tokens and targets, and with
sequence parallelism the sequence length must be a multiple of the tp degree. For training
and scoring: `KVCache` is sized for all kv heads, so cached generation needs the
un-parallelized model.

    >>> mesh = build_mesh(world_size=8, tensor=2, device_type="cuda")  # doctest: +SKIP
    >>> apply_tensor_parallel(model, mesh["tp"])  # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from llamaray.model.llama import Llama

# TransformerBlock calls attention(x, freqs_cis, cache, layer, start_pos): only x is laid out.
_ATTENTION_EXTRA_ARGS = 4


def build_mesh(world_size: int, tensor: int, device_type: str) -> DeviceMesh:
    """A (dp, tp) mesh: `tensor` consecutive ranks form one tp group (on GPUs, one node's
    NVLink-connected devices), and the world_size // tensor groups are data parallel."""
    if tensor <= 0 or world_size % tensor:
        raise ValueError(
            f"tensor parallel degree {tensor} must be positive and divide world_size={world_size}"
        )
    return init_device_mesh(
        device_type, (world_size // tensor, tensor), mesh_dim_names=("dp", "tp")
    )


def check_divisible(model: Llama, tp: int) -> None:
    """Raise ValueError naming every model dimension the tp degree does not divide."""
    bad = model.args.not_divisible(tp, ("n_heads", "n_kv_heads", "ffn_hidden_dim", "vocab_size"))
    if bad:
        raise ValueError(f"tensor parallel degree {tp} must divide {', '.join(bad)}")


def apply_tensor_parallel(
    model: Llama, tp_mesh: DeviceMesh, sequence_parallel: bool = True
) -> None:
    """Shard `model` over the 1-D `tp_mesh` in place (Megatron plan, as in torchtitan).

    Every parameter becomes a DTensor on `tp_mesh`, the replicated norms included, so that
    after `fully_shard` over dp all of them live on the same 2-D mesh and gradient clipping
    can reduce their norms together. The model still takes and returns plain tensors:
    (B, T) tokens in, full (B, T, vocab) logits or the scalar loss out, equal on all ranks.

    Loss: the model's fused loss reads `output.weight` directly, not through the module, so
    `Llama.forward` gathers the vocab-sharded weight and the sequence-sharded hidden states
    whole and every tp rank computes the full loss. Chosen for correctness and because the
    fused loss never builds the (tokens, vocab) logits; its costs are one all-gather of the
    output weight per step and the loss computed tp times over. A vocab-parallel fused loss
    would remove both.
    """
    tp = tp_mesh.size()
    check_divisible(model, tp)
    seq_layout = Shard(1) if sequence_parallel else Replicate()
    norm_style = SequenceParallel() if sequence_parallel else _ReplicateParams()
    parallelize_module(
        model,
        tp_mesh,
        {
            # Tokens are the same on every rank; each rank looks up its vocab rows and the
            # partial sums are reduce-scattered over the sequence (or all-reduced).
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq_layout),
            "norm": norm_style,
            # Plain full logits, like the un-parallelized model (generation, evaluation).
            "output": ColwiseParallel(input_layouts=seq_layout, output_layouts=Replicate()),
        },
    )
    for block in model.layers.values():
        plan: dict[str, ParallelStyle] = {
            "attention_norm": norm_style,
            "ffn_norm": norm_style,
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq_layout),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq_layout),
            "feed_forward.w3": ColwiseParallel(),
        }
        if sequence_parallel:
            # Attention and the MLP need every position: all-gather the normed input. Local
            # tensors inside, so the head views and rope see plain (B, T, H/tp, D) tensors.
            extra = (None,) * _ATTENTION_EXTRA_ARGS
            plan["attention"] = PrepareModuleInput(
                input_layouts=(Shard(1), *extra),
                desired_input_layouts=(Replicate(), *extra),
                use_local_output=True,
            )
            plan["feed_forward"] = PrepareModuleInput(
                input_layouts=Shard(1), desired_input_layouts=Replicate(), use_local_output=True
            )
        parallelize_module(block, tp_mesh, plan)
    if sequence_parallel:
        model.register_forward_pre_hook(_sequence_divisible_check(tp))


def _sequence_divisible_check(tp: int):
    # The norms build their DTensors assuming even shards, so an uneven split sizes the
    # all-gathers differently on each rank: gloo aborts the process, NCCL may just hang.
    def hook(module: nn.Module, args: tuple) -> None:
        if args and args[0].shape[1] % tp:
            raise ValueError(
                f"sequence parallelism needs the sequence length ({args[0].shape[1]}) to be a "
                f"multiple of the tensor parallel degree ({tp})"
            )

    return hook


class _ReplicateParams(ParallelStyle):
    """A module computed whole on every rank (the norms without sequence parallelism), its
    parameters held as Replicate DTensors so they share the mesh of the sharded ones."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, input_fn=_replicated_inputs, output_fn=_local_output
        )


def _replicated_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return tuple(
        DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        if not isinstance(x, DTensor)
        else x.redistribute(mesh, [Replicate()])
        for x in inputs
    )


def _local_output(module: nn.Module, output, mesh: DeviceMesh):
    return output.to_local()


__all__ = ["apply_tensor_parallel", "build_mesh", "check_divisible"]
