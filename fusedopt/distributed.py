"""DTensor params (FSDP2's fully_shard, tensor parallel): the kernels update the local shards of
param, grad and states, and a grad norm is summed over the mesh dims where the grads are
sharded (not where they are replicated), so every rank gets the global norm.

torch.distributed is never imported here: DTensors exist only once the user has imported it.
"""
import math
import sys

import torch


def dtensor_class():
    """torch's DTensor, or None while no DTensor can exist in this process."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor):
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor):
    """The shard this rank holds of a DTensor (no copy, no autograd), else the tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def shard_like(local, tensor):
    """`local`, this rank's shard of a tensor placed as `tensor` is: a DTensor of `tensor`'s mesh,
    placements, shape and strides where `tensor` is one, else `local` itself."""
    if not is_dtensor(tensor):
        return local
    return dtensor_class().from_local(local, tensor.device_mesh, tensor.placements, run_check=False,
                                      shape=tensor.shape, stride=tensor.stride())


def same_sharding(tensor, other):
    """Whether `other` is split over the ranks as `tensor` is (both plain tensors, or DTensors of
    one global shape on one mesh with the same placements), so their local shards line up."""
    if not is_dtensor(tensor):
        return not is_dtensor(other)
    if not is_dtensor(other):
        return False
    return other._spec is tensor._spec or (
        other.shape == tensor.shape and other.device_mesh == tensor.device_mesh
        and other.placements == tensor.placements
    )


def same_row_sharding(tensor, scales):
    """Whether the scales of an 8-bit state of `tensor` (one row of them per dim-0 slice) are split
    over the ranks as `tensor`'s dim 0 is, so that each rank's scales are those of its rows."""
    if not is_dtensor(tensor):
        return not is_dtensor(scales)
    if not is_dtensor(scales):
        return False
    return (scales.shape[0] == tensor.shape[0] and scales.device_mesh == tensor.device_mesh
            and scales.placements == tensor.placements and splits_rows_only(tensor))


def splits_rows_only(tensor):
    """Whether a DTensor is split over its dim 0 alone (replicated otherwise), so that each shard
    holds whole dim-0 slices."""
    return all(placement.is_replicate() or (placement.is_shard() and placement.dim == 0)
               for placement in tensor.placements)


def local_grads(params, grads):
    """The local shards of `grads`, or None where a DTensor param's grad is not split as its
    param (the grads of plain params are passed through: the layout check sees their type)."""
    dtensor = dtensor_class()
    if dtensor is None:
        return grads
    local = []
    for param, grad in zip(params, grads):
        if isinstance(param, dtensor):
            if not isinstance(grad, dtensor) or not same_sharding(param, grad):
                return None
            grad = grad._local_tensor
        local.append(grad)
    return local


def norm_group(grad):
    """Where the norm partial of `grad`'s local shard must be reduced: (mesh, the mesh dims where
    it is sharded), or None for a plain tensor or one replicated everywhere."""
    if not is_dtensor(grad):
        return None
    dims = tuple(dim for dim, placement in enumerate(grad.placements) if placement.is_shard())
    return (grad.device_mesh, dims) if dims else None


def norm_group_order(group):
    """A key ordering norm groups alike on every rank: by the ranks of the mesh, then the dims."""
    if group is None:
        return ()
    mesh, dims = group
    return (tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()), dims)


def without_partial_sums(grads):
    """DTensor grads holding per-rank partial sums (Partial placements) reduced to replicas, so
    that each rank's shard holds final values; other grads as they are. A collective where any
    grad is Partial (every rank has the same params, so all take part)."""
    replaced = []
    for grad in grads:
        if is_dtensor(grad) and any(placement.is_partial() for placement in grad.placements):
            from torch.distributed.tensor import Replicate

            grad = grad.redistribute(grad.device_mesh, [Replicate() if placement.is_partial() else placement
                                                        for placement in grad.placements])
        replaced.append(grad)
    return replaced


def reduce_over_shards(partial, nonfinite, group, norm_type):
    """(partial, nonfinite) of this rank's shards summed (maxed, for the inf norm) over the ranks of
    `group`'s sharded mesh dims: the global values on every rank."""
    if group is None:
        return partial, nonfinite
    import torch.distributed as dist

    mesh, dims = group
    dtype = torch.promote_types(partial.dtype, nonfinite.dtype)
    packed = torch.stack([partial.to(dtype), nonfinite.to(dtype)])
    op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
    for dim in dims:
        dist.all_reduce(packed, op=op, group=mesh.get_group(dim))
    return packed[0].to(partial.dtype), packed[1].to(nonfinite.dtype)


def replicated_like(total, grads):
    """The total norm as torch's clip_grad_norm_ returns it for these grads: a DTensor replicated
    over the mesh of the first DTensor grad, else the plain tensor."""
    if dtensor_class() is None:
        return total
    for grad in grads:
        if is_dtensor(grad):
            from torch.distributed.tensor import DTensor, Replicate

            mesh = grad.device_mesh
            return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return total


def full_value(tensor):
    """A DTensor's global value as a plain tensor on every rank (a collective where it is
    partial); a plain tensor as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor
