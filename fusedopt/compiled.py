"""opt.step() inside a torch.compile'd region: one opaque operator, ``fusedopt::step``.

dynamo never traces the update itself (cached tables, kernel launches and host checks are state a
graph would freeze). Where a compiled region calls ``opt.step()``, a graph holds one call of this
operator instead. It declares the tensors the step writes (params and states) and reads (grads),
so nothing in a graph is reordered around the update, and runs the optimizer's eager step when the
graph runs. Under functionalization (``aot_eager``, or where inductor cannot update in place) the
graph hands it copies of the tensors: their values are stepped and written back to the copies, so
the graph's own write-back leaves the user's tensors stepped once.

It is never captured in a CUDA graph (``mode="reduce-overhead"``): a replay would skip the host
work of each step (the table checks, the state it makes, the tensors held now) and write through
the addresses of the step it captured. It carries torch's ``cudagraph_unsafe`` tag, so inductor
runs the graph that holds it without CUDA graphs (on a torch without the tag: because the graph
mutates inputs that are not static).
"""
import inspect
import itertools
import weakref
from typing import List

import torch

_optimizers = weakref.WeakValueDictionary()  # handle -> optimizer (the graph holds only the int)
_handles = itertools.count()


try:
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback
except ImportError:  # a torch without it: the eager step everywhere, as a graph break
    def _eval_frame_callback():
        return None


def in_compiled_region():
    """Whether the caller runs inside a torch.compile'd function (in a frame dynamo left to run
    eagerly): dynamo's frame callback is set."""
    callback = _eval_frame_callback()
    return callback is not None and callback is not False


def register(optimizer):
    """A handle for `optimizer` that a graph can hold: an int, valid while the optimizer lives."""
    handle = next(_handles)
    _optimizers[handle] = optimizer
    return handle


def _never_captured():
    """custom_op's tags that keep inductor from capturing the operator in a CUDA graph."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None or "tags" not in inspect.signature(torch.library.custom_op).parameters:
        return {}
    return {"tags": (tag,)}


@torch.library.custom_op("fusedopt::step", mutates_args=("params", "states"), **_never_captured())
def step(handle: int, params: List[torch.Tensor], grads: List[torch.Tensor], states: List[torch.Tensor],
         steps: List[torch.Tensor]) -> None:
    optimizer = _optimizers.get(handle)
    if optimizer is None:
        raise RuntimeError("fusedopt::step: the optimizer this graph was compiled for no longer exists")
    optimizer._step_from_graph(params, grads, states, steps)


@step.register_fake
def _(handle, params, grads, states, steps):
    return None


def operands(optimizer, groups):
    """What a step of `optimizer` touches, as the operator takes it: the params with grads of
    `groups` (its param_groups) and their grads, state tensors and step counts. The step counts
    are written too but not declared so: on the kernels they are views into one buffer per bucket,
    which functionalization would copy one by one. Plain Python that dynamo traces too; it reads
    no group option, so a graph does not depend on the lr."""
    params, grads, states, steps = [], [], [], []
    for group in groups:
        for p in group["params"]:
            grad = p.grad
            if grad is not None:
                params.append(p)
                grads.append(grad)
    # The state dict only after every param and grad has been read through its group: dynamo then
    # knows each param by its group, not by a dict key (whose grads it would have to hold).
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                (steps if key == "step" else states).append(value)
    return params, grads, states, steps


def take_newer_values(given, live):
    """Before the step: where the graph handed copies (functionalization), the user's tensors take
    the copies' values, which are the newest (the graph may have written them before the step).
    `given` and `live`: operands() as the graph passed them and as the optimizer holds them now.
    Returns the (copy, user's tensor) pairs, for give_values_back."""
    if list(map(len, given)) != list(map(len, live)):  # the graph's guards make this unreachable
        held = {tensor.data_ptr() for tensor in itertools.chain(*live)}
        if any(copy.data_ptr() not in held for copy in itertools.chain(*given)):
            raise RuntimeError("fusedopt::step: the graph handed over copies of tensors the optimizer no longer "
                               "steps; call torch._dynamo.reset() and compile again")
        return []
    copied = []
    for copy, tensor in zip(itertools.chain(*given), itertools.chain(*live)):
        if copy.data_ptr() != tensor.data_ptr() and copy.shape == tensor.shape and copy.dtype == tensor.dtype:
            tensor.copy_(copy)
            copied.append((copy, tensor))
    return copied


def give_values_back(copied, written):
    """After the step: the copies the graph gave for the `written` tensors take their new values."""
    written = set(map(id, written))
    for copy, tensor in copied:
        if id(tensor) in written:
            copy.copy_(tensor)
