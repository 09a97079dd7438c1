"""What a rule gives the kernels: its state slots, its numbers by name (per launch from a param
group, per block from the lr and step count), its compile-time options, and its equations, written
once in plain Python. Each kernel backend compiles the same two functions with its own arithmetic
(the names below: sqrt, lerp, fma, ...); nothing here imports Triton or numba.

The rule's functions run on one element (numba, and plain Python floats here) or on one block of
elements (Triton), so they use only arithmetic, comparisons, `if` on numbers and the names below:

- ``block_numbers(lr, step, extra, n, DEVICE_LR, COMPUTE) -> Block``: from the launch numbers `n`
  (the rule's Launch NamedTuple), the lr (fp64; read from memory when DEVICE_LR), the tensor's
  step count (fp64, this step included; with `steps`) and its per-tensor integer (with `extra`),
  the numbers the update reads, each in the math dtype (``to_compute(x, COMPUTE)``; a number
  given a local name takes it there too: Triton's interpreter would store it as an fp32 scalar);
- ``update(param, grad, <one argument per state slot>, b, options) -> (param, <slots>)``: one
  step on values in the math dtype; it returns exactly its param and state arguments, by name, in
  the same order (checked when the spec is made). A slot absent under the options holds a
  placeholder the update does not read.
"""
import ast
import inspect
import itertools
import math
import textwrap
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, NamedTuple, Optional

# ---- the arithmetic rule functions use: each kernel backend binds its own ----


def sqrt(x):
    return math.sqrt(x) if x >= 0 else math.nan


def exp2(x):
    return 2.0**x


def lerp(start, end, weight):
    """start + weight (end - start), as torch.lerp."""
    return start + weight * (end - start)


def fma(a, b, c):
    """a * b + c with one rounding."""
    if math.isfinite(a) and math.isfinite(b) and math.isfinite(c):
        return float(Fraction(a) * Fraction(b) + Fraction(c))
    return a * b + c


def maximum(a, b):
    """The larger of a and b; NaN where either is NaN (torch.maximum)."""
    return a if (a != a or a > b) else b


def sign(x):
    """-1, 0 or 1; 0 for NaN, as torch.sign."""
    return float((x > 0) - (x < 0))


def to_compute(x, COMPUTE):
    """`x` in the kernel's math dtype (fp32, fp64 for fp64 tensors)."""
    return x


ARITHMETIC = ("sqrt", "exp2", "lerp", "fma", "maximum", "sign", "to_compute")


class StateSlot(NamedTuple):
    """A state tensor a rule can keep, as torch.optim names it: `signed` where it may be negative
    (an average of grads), not where it never is (an average of squares, a sum of squares);
    `present_when` names the compile-time option it exists under (None: always)."""

    name: str
    signed: bool
    present_when: Optional[str] = None


class NoOptions(NamedTuple):
    """Options of a rule whose code has no variants."""


@dataclass(frozen=True)
class RuleSpec:
    """Everything a kernel backend needs of an update rule, by name.

    `Launch` and `Block` are NamedTuples of numbers; `Options` one of bools, which the kernels
    take as compile-time constants (a new value compiles a variant; lr, betas, eps and the like
    are launch numbers instead, so that changing them compiles nothing). `options(group)` and
    `launch_numbers(group, lr_on_device)` read a param group; the latter is a pure function of
    the group's values (the CPU kernels run a launch again while those stay the same), and where
    `lr_on_device` the kernel reads the lr from memory, so that nothing computed from it on the
    host is used. `steps`: block_numbers reads each tensor's step count; `extra`: it reads a
    per-tensor integer the optimizer sets (SGD: a momentum buffer that starts at this step).
    `uncoded`: (option, slot names) pairs: under that compile-time option those slots are never
    8-bit codes (state_precision="8bit" stores them in bf16), where the rule subtracts one state
    from another and two codings apart could turn the difference's sign."""

    name: str
    states: tuple
    Options: type
    options: Callable
    Launch: type
    launch_numbers: Callable
    Block: type
    block_numbers: Callable
    update: Callable
    steps: bool = False
    extra: bool = False
    uncoded: tuple = ()

    def __post_init__(self):
        for slot in self.states:
            if slot.present_when is not None and slot.present_when not in self.Options._fields:
                raise ValueError(f"{self.name}: state {slot.name!r} is present_when {slot.present_when!r}, "
                                 f"which is not one of its options {self.Options._fields}")
        for option, names in self.uncoded:
            if option not in self.Options._fields or not set(names) <= {slot.name for slot in self.states}:
                raise ValueError(f"{self.name}: uncoded ({option!r}, {names}) names an unknown option or state")
        check_update(self.name, self.update, [slot.name for slot in self.states])

    def present(self, options):
        """Which state slots exist under `options`, in slot order."""
        return tuple(slot.present_when is None or bool(getattr(options, slot.present_when)) for slot in self.states)

    def state_names(self, options):
        """The names of the state tensors kept under `options`, in slot (table) order."""
        return [slot.name for slot, present in zip(self.states, self.present(options)) if present]

    def may_code(self, options, name):
        """Whether state `name` may be stored as 8-bit codes under `options`."""
        return not any(getattr(options, option) and name in names for option, names in self.uncoded)

    def slot(self, name):
        """The StateSlot named `name`."""
        return next(slot for slot in self.states if slot.name == name)

    def option_variants(self):
        """Every value of Options: the variants a backend can compile."""
        return [self.Options(*values) for values in itertools.product((False, True), repeat=len(self.Options._fields))]


def check_update(name, update, slots):
    """An update's arguments are (param, grad, *slots, numbers, options), and every return gives
    back (param, *slots) by those names: a reordering fails here, not in the numbers."""
    arguments = list(inspect.signature(update).parameters)
    expected = ["param", "grad", *slots]
    if arguments[:-2] != expected or len(arguments) != len(expected) + 2:
        raise ValueError(f"{name}: update arguments {arguments} are not (param, grad, {', '.join(slots)}, numbers, "
                         "options)")
    tree = ast.parse(textwrap.dedent(inspect.getsource(update)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Return):
            returned = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            names = [element.id if isinstance(element, ast.Name) else None for element in returned]
            if names != ["param", *slots]:
                raise ValueError(f"{name}: update returns {ast.unparse(node.value)}, not (param, {', '.join(slots)})")


def log2_or_minus_inf(beta):
    """log2(beta) for beta^step as exp2(step * log2(beta)) (0^step = 0 from the first step)."""
    return math.log2(beta) if beta > 0 else -math.inf


def grad_sign(group):
    """-1 where the group maximizes, else 1."""
    return -1.0 if group["maximize"] else 1.0
