"""Every update rule, once, in the spirit of torch's OptimizerInfo: its class and, where torch.optim
has one, its torch.optim twin; the option sets that change its arithmetic (what tests sweep), its
richest options, bad inputs with the exception torch raises for them, the values tests change by
hand or put in a second param group, random options for property tests, the variants the
benchmarks time, and, from the class, its state keys and the bytes a step moves per param. Tests,
benchmarks and tools read this; nothing else lists the rules or their values."""
import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .lion import Lion
from .radam import RAdam
from .rmsprop import RMSprop
from .sgd import SGD


LARGE_MATRIX = (4096, 4096)  # a param whose states take every format (the benchmarks' bytes per param)


@dataclass(frozen=True)
class Benchmark:
    """One variant of a rule the benchmarks time: `name` on the command line and in the JSON,
    `label` in tables and plots, constructor `options`, and the bytes a step must move per fp32
    param of LARGE_MATRIX's shape (the design's table: param, grad and each state read, param and
    each state written, each in its format)."""

    name: str
    label: str
    options: dict
    bytes_per_param: int


@dataclass(frozen=True)
class ErrorInput:
    """Constructor arguments a rule refuses: the exception type torch.optim raises for them, and a
    regular expression its message matches."""

    options: dict
    error: type
    match: str


@dataclass(frozen=True)
class RuleInfo:
    name: str
    optimizer: type  # the fusedopt class
    twin: Optional[type]  # the torch.optim class of the same rule (None: the float64 reference is the oracle)
    default_lr: float  # short trajectories at this lr move the params well away from their start
    option_grid: tuple  # option sets that change the arithmetic, every option covered
    richest: tuple  # option sets with most options on (fp64, 16-bit and scenario runs)
    stateful: dict  # options under which the rule keeps state (SGD: momentum)
    option_values: dict = field(default_factory=dict)  # each option off and on: the exhaustive sweep
    benchmarks: tuple = field(default=())
    api_options: dict = field(default_factory=dict)  # an lr and options that use every state tensor
    second_group: dict = field(default_factory=dict)  # other values (and state tensors) for a second group
    changed_by_hand: tuple = ()  # values changed between steps that torch reads at every step
    error_inputs: tuple = ()  # ErrorInput: bad constructor arguments
    sparse_options: tuple = ()  # option sets stepped with sparse grads (empty: sparse grads raise)
    late_state_options: tuple = ()  # values that add a state tensor: switched on after steps, KeyError
    random_options: Callable = None  # (pick) -> options, for property tests (see Pick)
    defaults: dict = field(default_factory=dict)  # the constructor's defaults, where there is no twin

    @property
    def torch_optimizer(self):
        """The torch.optim class of the same rule, or None."""
        return self.twin

    @property
    def oracle_class(self):
        """What fusedopt's class is compared with: torch.optim's class of the rule, or where
        torch.optim has not the rule, fusedopt's on its plain-torch reference path
        (fusedopt.reference, itself held to the float64 reference), which like torch.optim's
        for-loop leaves AMP's unscaling to the scaler."""
        if self.twin is not None:
            return self.twin
        return functools.partial(self.optimizer, backend="torch", unscale_in_step=False)

    def oracle(self, params, **options):
        """The oracle_class's single-tensor (for-loop) implementation over `params`."""
        return self.oracle_class(params, foreach=False, **options)

    def every_combination(self):
        """Every combination of `option_values` that the rule accepts (the plain-torch reference
        is swept over all of them; the kernels over `option_grid`)."""
        names = list(self.option_values)
        for values in itertools.product(*self.option_values.values()):
            options = dict(zip(names, values))
            try:
                (self.twin or self.optimizer)([torch.nn.Parameter(torch.zeros(1))], **options)
            except ValueError:  # e.g. SGD's nesterov without momentum
                continue
            yield options

    def state_keys(self, **options):
        """The state tensors a param keeps under `options` (besides "step"), in table order."""
        optimizer = self.optimizer([torch.nn.Parameter(torch.zeros(1))], backend="torch", **options)
        return list(optimizer._state_keys(optimizer.param_groups[0]))

    def bytes_per_param(self, dtype=torch.float32, shape=LARGE_MATRIX, **options):
        """Bytes a step must move per param of `shape`, steady state: param, grad and every state
        read once, param and every state written once; the param and grad in `dtype`, each state
        in the format its state_precision gives such a param (fusedopt.formats: the param's dtype,
        bf16, or 8-bit codes with a 4-byte scale per block), a 16-bit remainder or an fp32 master
        read and written beside a bf16 param."""
        from . import formats, rounding

        param = torch.empty(shape, dtype=dtype, device="meta")
        element = param.element_size()
        fmt = formats.state_format(options.pop("state_precision", "fp32"), param)
        state = {formats.PLAIN: element, formats.BF16: 2, formats.Q8: 1 + 4 / formats.QUANT_BLOCK}[fmt]
        master = {"master": 4, "remainder": 2}.get(rounding.param_rounding(
            options.pop("stochastic_rounding", False), options.pop("master_weights", False)), 0)
        options.pop("state_rounding", None)
        total = 3 * element + 2 * state * len(self.state_keys(**options))
        return total + 2 * master if dtype == torch.bfloat16 else total


class Pick:
    """What random_options draws from (a property test adapts its generator to it): `rate(low,
    high)` a float in [low, high], `zero_or(low, high)` 0 or such a float, `boolean()`, and
    `choice(values)`."""


def _rates(pick, highest_lr=0.1):
    return dict(lr=pick.rate(1e-4, highest_lr), weight_decay=pick.zero_or(0.0, 0.5), maximize=pick.boolean())


def _sgd_options(pick):
    momentum = pick.zero_or(0.1, 0.95)
    nesterov = momentum > 0 and pick.boolean()
    return dict(_rates(pick), momentum=momentum, nesterov=nesterov,
                dampening=0.0 if nesterov else pick.zero_or(0.0, 0.5))


def _moment_options(pick):
    return dict(_rates(pick), betas=(pick.rate(0.0, 0.99), pick.rate(0.9, 0.9999)), eps=pick.choice([1e-8, 1e-6, 1e-3]))


def _adam_options(pick):
    return dict(_moment_options(pick), amsgrad=pick.boolean(), decoupled_weight_decay=pick.boolean())


def _adamw_options(pick):
    return dict(_moment_options(pick), amsgrad=pick.boolean())


def _adagrad_options(pick):
    return dict(_rates(pick), lr_decay=pick.zero_or(0.0, 0.5), initial_accumulator_value=pick.zero_or(0.0, 1.0),
                eps=pick.choice([1e-10, 1e-6]))


def _rmsprop_options(pick):
    return dict(_rates(pick, highest_lr=0.05), alpha=pick.rate(0.5, 0.999), eps=pick.choice([1e-8, 1e-6]),
                momentum=pick.zero_or(0.1, 0.95), centered=pick.boolean())


def _radam_options(pick):
    return dict(_moment_options(pick), decoupled_weight_decay=pick.boolean())


def _lion_options(pick):
    return dict(_rates(pick, highest_lr=0.01), betas=(pick.rate(0.0, 0.99), pick.rate(0.9, 0.9999)))


# ---- bad constructor arguments, with what torch.optim raises for them ----

def _errors(*cases):
    return tuple(ErrorInput(options, error, match) for options, error, match in cases)


NOT_COMPARABLE = r"not supported between instances"


def _unexpected(name, cls):
    """Python's TypeError for a keyword `cls.__init__` does not take, naming the class as torch's does."""
    return rf"^{cls}\.__init__\(\) got an unexpected keyword argument '{name}'$"


def _unknown_keyword(cls):
    return _errors((dict(unknown_option=1), TypeError, _unexpected("unknown_option", cls)))


COMMON_ERRORS = _errors(
    (dict(lr=-1e-3), ValueError, r"Invalid learning rate: -0\.001"),
    (dict(lr=torch.tensor(-1e-3)), ValueError, r"Invalid learning rate: -0\.00"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"Tensor lr must be 1-element"),
    (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0\.1"),
    (dict(lr="0.1"), TypeError, NOT_COMPARABLE),
    (dict(lr=None), TypeError, NOT_COMPARABLE),
)
NAN_LR = _errors((dict(lr=math.nan), ValueError, r"Invalid learning rate: nan"))
SWITCH_ERRORS = _errors(
    (dict(fused=True, foreach=True), RuntimeError, r"`fused` and `foreach` cannot be `True` together"),
    (dict(fused=True, differentiable=True), RuntimeError, r"`fused` does not support `differentiable`"),
)
BETA_ERRORS = _errors(
    (dict(betas=(-0.1, 0.999)), ValueError, r"Invalid beta parameter at index 0: -0\.1"),
    (dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1\.0"),
    (dict(betas=(0.9, 1.0)), ValueError, r"Invalid beta parameter at index 1: 1\.0"),
    (dict(betas=(0.9,)), IndexError, r"tuple index out of range"),
    (dict(betas=0.9), TypeError, r"'float' object is not subscriptable"),
)
ADAM_ERRORS = COMMON_ERRORS + NAN_LR + SWITCH_ERRORS + BETA_ERRORS + _errors(
    (dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08"),
    (dict(betas=(0.9, -0.5)), ValueError, r"Invalid beta parameter at index 1: -0\.5"),
    (dict(betas=(0, 0.999)), ValueError, r"betas must be either both floats or both Tensors"),
    (dict(betas=(0.9, 0)), ValueError, r"betas must be either both floats or both Tensors"),
    (dict(betas=(torch.tensor(0.9), 0.999)), ValueError, r"betas must be either both floats or both Tensors"),
    (dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.999))), RuntimeError, r"more than one value is ambiguous"),
    (dict(betas=(torch.tensor(0.9), torch.tensor([0.99, 0.99]))), RuntimeError, r"more than one value is ambiguous"),
    (dict(lr=torch.tensor(1e-3), foreach=True), ValueError,
     r"lr as a Tensor is not supported for capturable=False and foreach=True"),
    (dict(betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True), ValueError,
     r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True"),
)

RULES = {info.name: info for info in (
    RuleInfo("sgd", SGD, torch.optim.SGD, 0.05,
             option_grid=({}, {"weight_decay": 0.1, "maximize": True}, {"momentum": 0.9},
                          {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}, {"momentum": 0.9, "nesterov": True},
                          {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
             richest=({"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1, "maximize": True},
                      {"momentum": 0.9, "nesterov": True}),
             stateful={"momentum": 0.9},
             option_values={"momentum": (0.0, 0.9), "dampening": (0.0, 0.3), "nesterov": (False, True),
                            "weight_decay": (0.0, 0.1), "maximize": (False, True)},
             benchmarks=(Benchmark("sgd", "SGD", {"lr": 1e-3}, 12),
                         Benchmark("sgd_momentum", "SGD+momentum", {"lr": 1e-3, "momentum": 0.9}, 20)),
             api_options=dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
             second_group=dict(lr=0.05, momentum=0.0, weight_decay=0.0),
             changed_by_hand=(dict(momentum=0.5, dampening=0.3), dict(weight_decay=0.1),
                              dict(nesterov=True, dampening=0.0)),
             error_inputs=_unknown_keyword("SGD") + COMMON_ERRORS + SWITCH_ERRORS + _errors(
                 (dict(momentum=-0.5), ValueError, r"Invalid momentum value: -0\.5"),
                 (dict(nesterov=True), ValueError, r"Nesterov momentum requires a momentum and zero dampening"),
                 (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
                  r"Nesterov momentum requires a momentum and zero dampening"),
                 (dict(amsgrad=True), TypeError, _unexpected("amsgrad", "SGD"))),
             sparse_options=(dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.2),
                             dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
             random_options=_sgd_options),
    RuleInfo("adam", Adam, torch.optim.Adam, 0.02,
             option_grid=({}, {"amsgrad": True}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
                          {"amsgrad": True, "weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
             richest=({"amsgrad": True, "weight_decay": 0.1},),
             stateful={"amsgrad": True},
             option_values={"amsgrad": (False, True), "weight_decay": (0.0, 0.1),
                            "decoupled_weight_decay": (False, True), "maximize": (False, True)},
             benchmarks=(Benchmark("adam", "Adam", {"lr": 1e-3}, 28),),
             api_options=dict(lr=0.05, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True),
             second_group=dict(lr=0.01, betas=(0.9, 0.99), amsgrad=False, maximize=True),
             changed_by_hand=(dict(betas=(0.5, 0.9)), dict(eps=1e-3, weight_decay=0.0), dict(maximize=True)),
             error_inputs=_unknown_keyword("Adam") + ADAM_ERRORS + _errors(
                 (dict(momentum=0.9), TypeError, _unexpected("momentum", "Adam"))),
             late_state_options=(dict(amsgrad=True),),
             random_options=_adam_options),
    RuleInfo("adamw", AdamW, torch.optim.AdamW, 0.02,
             option_grid=({}, {"amsgrad": True, "maximize": True, "weight_decay": 0.1}),
             richest=({"amsgrad": True, "maximize": True},),
             stateful={},
             option_values={"amsgrad": (False, True), "weight_decay": (0.0, 0.1), "maximize": (False, True)},
             benchmarks=(Benchmark("adamw_bf16", "AdamW, bf16 states",
                                   {"lr": 1e-3, "weight_decay": 1e-2, "state_precision": "bf16"}, 20),
                         Benchmark("adamw_8bit", "AdamW, 8-bit states",
                                   {"lr": 1e-3, "weight_decay": 1e-2, "state_precision": "8bit"}, 16.25),
                         Benchmark("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, 28)),
             api_options=dict(lr=0.05, weight_decay=0.1),
             second_group=dict(lr=0.01, weight_decay=0.5, amsgrad=True),
             changed_by_hand=(dict(betas=(0.5, 0.9)), dict(weight_decay=0.3), dict(eps=1e-2)),
             error_inputs=_unknown_keyword("AdamW") + ADAM_ERRORS + _errors(
                 (dict(decoupled_weight_decay=False), TypeError, _unexpected("decoupled_weight_decay", "AdamW"))),
             late_state_options=(dict(amsgrad=True),),
             random_options=_adamw_options),
    RuleInfo("adagrad", Adagrad, torch.optim.Adagrad, 0.05,
             option_grid=({}, {"lr_decay": 0.05, "weight_decay": 0.1},
                          {"initial_accumulator_value": 0.5, "eps": 1e-6, "maximize": True}),
             richest=({"lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.1},),
             stateful={"lr_decay": 0.01},
             option_values={"lr_decay": (0.0, 0.05), "weight_decay": (0.0, 0.1),
                            "initial_accumulator_value": (0.0, 0.3), "maximize": (False, True)},
             benchmarks=(Benchmark("adagrad", "Adagrad", {"lr": 1e-2}, 20),),
             api_options=dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.2),
             second_group=dict(lr=0.3, lr_decay=0.0, weight_decay=0.1, eps=1e-6),
             changed_by_hand=(dict(lr_decay=0.5), dict(weight_decay=0.2), dict(eps=1e-2, maximize=True)),
             error_inputs=_unknown_keyword("Adagrad") + COMMON_ERRORS + NAN_LR + SWITCH_ERRORS + _errors(
                 (dict(lr_decay=-0.1), ValueError, r"Invalid lr_decay value: -0\.1"),
                 (dict(initial_accumulator_value=-0.1), ValueError, r"Invalid initial_accumulator_value value: -0\.1"),
                 (dict(eps=-1e-10), ValueError, r"Invalid epsilon value: -1e-10")),
             sparse_options=(dict(lr=0.1), dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.2, maximize=True)),
             random_options=_adagrad_options),
    RuleInfo("rmsprop", RMSprop, torch.optim.RMSprop, 0.01,
             option_grid=({}, {"momentum": 0.9}, {"centered": True},
                          {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
                          {"alpha": 0.9, "eps": 1e-6}),
             richest=({"centered": True, "momentum": 0.9, "weight_decay": 0.1},),
             stateful={"momentum": 0.5, "centered": True},
             option_values={"momentum": (0.0, 0.9), "centered": (False, True), "weight_decay": (0.0, 0.1),
                            "maximize": (False, True)},
             benchmarks=(Benchmark("rmsprop", "RMSprop", {"lr": 1e-3}, 20),),
             api_options=dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.1),
             second_group=dict(lr=0.02, momentum=0.0, centered=False, alpha=0.9),
             changed_by_hand=(dict(alpha=0.5), dict(momentum=0.9, eps=1e-3), dict(weight_decay=0.0, maximize=True)),
             error_inputs=_unknown_keyword("RMSprop") + COMMON_ERRORS + NAN_LR + _errors(
                 (dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08"),
                 (dict(momentum=-0.1), ValueError, r"Invalid momentum value: -0\.1"),
                 (dict(alpha=-0.1), ValueError, r"Invalid alpha value: -0\.1"),
                 (dict(fused=True), TypeError, _unexpected("fused", "RMSprop"))),
             late_state_options=(dict(momentum=0.9), dict(centered=True)),
             random_options=_rmsprop_options),
    RuleInfo("radam", RAdam, torch.optim.RAdam, 0.02,
             option_grid=({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
                          {"weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
             richest=({"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},),
             stateful={},
             option_values={"weight_decay": (0.0, 0.1), "decoupled_weight_decay": (False, True),
                            "maximize": (False, True)},
             benchmarks=(Benchmark("radam", "RAdam", {"lr": 1e-3}, 28),),
             api_options=dict(lr=0.02),
             second_group=dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, decoupled_weight_decay=True),
             changed_by_hand=(dict(betas=(0.5, 0.9)), dict(weight_decay=0.3, decoupled_weight_decay=True),
                              dict(eps=1e-2, maximize=True)),
             error_inputs=_unknown_keyword("RAdam") + COMMON_ERRORS + NAN_LR + BETA_ERRORS + _errors(
                 (dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08"),
                 (dict(fused=True), TypeError, _unexpected("fused", "RAdam")),
                 (dict(amsgrad=True), TypeError, _unexpected("amsgrad", "RAdam"))),
             random_options=_radam_options),
    RuleInfo("lion", Lion, None, 0.02,
             option_grid=({}, {"weight_decay": 0.1}, {"betas": (0.5, 0.9), "maximize": True},
                          {"weight_decay": 0.1, "maximize": True, "betas": (0.875, 0.9375)}),
             # betas of few bits: the sign's argument is then exact in fp32 and fp64 alike, so 16-bit
             # params (whose values tie often) take the same sign in every precision
             richest=({"weight_decay": 0.1, "maximize": True, "betas": (0.875, 0.9375)},),
             stateful={},
             option_values={"weight_decay": (0.0, 0.1), "betas": ((0.9, 0.99), (0.5, 0.9)), "maximize": (False, True)},
             benchmarks=(Benchmark("lion", "Lion", {"lr": 1e-4}, 20),),
             api_options=dict(lr=0.02, weight_decay=0.1),
             second_group=dict(lr=0.01, betas=(0.5, 0.9), maximize=True),
             changed_by_hand=(dict(betas=(0.5, 0.9)), dict(weight_decay=0.3), dict(maximize=True)),
             error_inputs=_unknown_keyword("Lion") + COMMON_ERRORS + NAN_LR + BETA_ERRORS + _errors(
                 (dict(fused=True), TypeError, _unexpected("fused", "Lion")),
                 (dict(amsgrad=True), TypeError, _unexpected("amsgrad", "Lion"))),
             random_options=_lion_options,
             defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False, foreach=None,
                           differentiable=False)),
)}
