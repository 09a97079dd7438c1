"""The constructor arguments every fusedopt optimizer takes beside its rule's own (torch.optim's), and
the documentation of torch's switches the classes share: each listed once here. Every class's
signature and docstring show them and its argument check knows them (FusedOptimizer.__init_subclass__
applies `document` to each class), so a new shared argument is one entry in SHARED_ARGUMENTS and its
use in FusedOptimizer.__init__."""
import inspect
import textwrap
from typing import NamedTuple


class SharedArgument(NamedTuple):
    """A keyword-only constructor argument of every class: its name, default, type (as docstrings
    write it) and what it does."""

    name: str
    default: object
    kind: str
    doc: str


SHARED_ARGUMENTS = (
    SharedArgument(
        "backend", None, "str, optional",
        'what updates the params: "auto" (the Triton kernels for CUDA tensors, the numba CPU kernels for CPU '
        'tensors), "numba" (the same as "auto", naming the CPU kernels), "triton" (the Triton kernels everywhere: '
        'CPU tensors through the Triton interpreter, TRITON_INTERPRET=1) or "torch" (the plain-torch reference, '
        'fusedopt.reference). Params the kernels cannot walk take the reference. (default: the FUSEDOPT_BACKEND '
        'environment variable, else "auto")'),
    SharedArgument(
        "max_grad_norm", None, "float, optional",
        "clip every step by the total 2-norm of the grads, as clip_grad_norm_ then step() would, the norm's "
        "reduction reading each grad once and the factor applied inside the update; the norm is left in "
        "``last_grad_norm`` (default: None, no clipping)"),
    SharedArgument(
        "schedule", None, "fusedopt.schedules.Schedule, optional",
        "a learning-rate schedule the kernels read at each group's step count (``group['group_step']``) on the "
        "device: the lrs of ScheduledLR driving it from the host, with nothing on the host (default: None)"),
    SharedArgument(
        "schedule_steps", None, "int, optional",
        "for a schedule without an end (inverse sqrt, exponential decay): the steps to tabulate, its last factor "
        "held after them (default: None)"),
    SharedArgument(
        "stochastic_rounding", False, "bool",
        "store updated bf16 params rounded stochastically (unbiased: the expected value is the fp32 result), the "
        "random bits keyed by ``rounding_seed``, the element, the tensor and the step (default: False)"),
    SharedArgument(
        "master_weights", False, "bool or str",
        "keep an fp32 master of each bf16 param in its state, update it and store the param as the master "
        "rounded to nearest, ties away from zero: True, an fp32 copy (``state['master_param']``); "
        "\"remainder\", the bf16 param and a 16-bit remainder (``state['master_remainder']``), the same numbers "
        "for 2 bytes per param instead of 4; "
        "an alternative to stochastic_rounding (default: False)"),
    SharedArgument("rounding_seed", 0, "int", "the seed of stochastic rounding, in [0, 2**63) (default: 0)"),
    SharedArgument(
        "state_precision", "fp32", "str",
        "how the states are stored, per param group: \"fp32\" (in the param's dtype, as torch.optim keeps them), "
        "\"bf16\", or \"8bit\" (blockwise codes with one fp32 scale per 64 elements of a row); params under 4,096 "
        "elements keep the param's dtype (fusedopt.formats) (default: \"fp32\")"),
    SharedArgument(
        "state_rounding", "nearest", "str",
        "how bf16 and 8-bit states are rounded, per param group: \"nearest\" or \"stochastic\" (unbiased, the "
        "random bits keyed like the params' stochastic rounding) (default: \"nearest\")"),
    SharedArgument(
        "unscale_in_step", True, "bool",
        "under torch.amp.GradScaler, unscale the grads and skip steps with an inf or NaN inside the kernels, as "
        "torch's fused optimizers do; False for training loops that unscale first (Lightning's gradient "
        "clipping under fp16) (default: True)"),
)
SHARED_NAMES = frozenset(argument.name for argument in SHARED_ARGUMENTS)

# torch.optim's params, implementation switches and shared options, as each class's docstring names them
SWITCH_DOCS = {
    "params": "params (iterable): the parameters to optimize: an iterable of tensors, of (name, tensor) pairs, or "
              "of dicts defining parameter groups",
    "maximize": "maximize (bool): maximize the objective with respect to the params, instead of minimizing "
                "(default: False)",
    "foreach": "foreach (bool, optional): torch's switch for its multi-tensor implementation: accepted and recorded "
               "in the param groups (so checkpoints stay interchangeable); fusedopt always runs its own fused "
               "kernels (default: None)",
    "fused": "fused (bool, optional): accepted and recorded, as foreach; where True, step() refuses what torch's "
             "fused kernels refuse (complex params, devices without them), with torch's RuntimeError "
             "(default: None)",
    "capturable": "capturable (bool): keep the step counts on the params' device from the first step, so that "
                  "step() with a tensor lr can be captured in a CUDA graph; CPU params raise AssertionError as in "
                  "torch (default: False)",
    "differentiable": "differentiable (bool): True raises NotImplementedError: fusedopt's update is not "
                      "differentiable (default: False)",
}


def shared_arguments_doc(indent=""):
    """The docstring lines of the shared arguments, each item starting at `indent`."""
    return "\n".join(_item(f"{a.name} ({a.kind}): {a.doc}", indent) for a in SHARED_ARGUMENTS)


def _item(text, indent, width=100):
    """One argument's docstring item, its continuation lines indented once more."""
    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + "    ")


def with_defaults(shared, owner):
    """The shared arguments given (`shared`, by name) with the defaults of the others; TypeError,
    naming the class `owner` as Python names a function, for any other keyword."""
    for name in shared:
        if name not in SHARED_NAMES:
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {name!r}")
    return {argument.name: shared.get(argument.name, argument.default) for argument in SHARED_ARGUMENTS}


def document(cls):
    """Give a class its whole signature and docstring: an __init__ of its own that takes **shared
    shows the shared arguments in place of it (keyword only, with their defaults), and the
    docstring's placeholders are filled: ``{shared_arguments}`` with their documentation,
    ``{maximize}``, ``{foreach}``, ... with torch's switches'."""
    init = cls.__dict__.get("__init__")
    if init is not None:
        signature = inspect.signature(init)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        if len(own) < len(signature.parameters):
            present = {p.name for p in own}
            shared = [inspect.Parameter(a.name, inspect.Parameter.KEYWORD_ONLY, default=a.default)
                      for a in SHARED_ARGUMENTS if a.name not in present]
            init.__signature__ = signature.replace(parameters=own + shared)
    doc = cls.__dict__.get("__doc__")
    if doc and "{" in doc:
        lines = []
        for line in doc.split("\n"):
            token, indent = line.strip(), line[:len(line) - len(line.lstrip())]
            if token == "{shared_arguments}":
                lines.append(shared_arguments_doc(indent))
            elif token[1:-1] in SWITCH_DOCS and token == "{" + token[1:-1] + "}":
                lines.append(_item(SWITCH_DOCS[token[1:-1]], indent))
            else:
                lines.append(line)
        cls.__doc__ = "\n".join(lines)
    return cls
