"""Every update rule, once: its class and torch.optim twin, the option sets that change its
arithmetic (what tests sweep), its richest options, the variants the benchmarks time, and, from
the class, its state keys and the bytes a step moves per param. Tests, benchmarks and tools read
this; nothing else lists the rules."""
import itertools
from dataclasses import dataclass, field

import torch

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .radam import RAdam
from .rmsprop import RMSprop
from .sgd import SGD


@dataclass(frozen=True)
class Benchmark:
    """One variant of a rule the benchmarks time: `name` on the command line and in the JSON,
    `label` in tables and plots, constructor `options`."""

    name: str
    label: str
    options: dict


@dataclass(frozen=True)
class RuleInfo:
    name: str
    optimizer: type  # the fusedopt class
    default_lr: float  # short trajectories at this lr move the params well away from their start
    option_grid: tuple  # option sets that change the arithmetic, every option covered
    richest: tuple  # option sets with most options on (fp64, 16-bit and scenario runs)
    stateful: dict  # options under which the rule keeps state (SGD: momentum)
    option_values: dict = field(default_factory=dict)  # each option off and on: the exhaustive sweep
    benchmarks: tuple = field(default=())

    @property
    def torch_optimizer(self):
        """The torch.optim class of the same name: the oracle and the checkpoint twin."""
        return getattr(torch.optim, self.optimizer.__name__)

    def every_combination(self):
        """Every combination of `option_values` that torch.optim accepts (the plain-torch
        reference is swept over all of them; the kernels over `option_grid`)."""
        names = list(self.option_values)
        for values in itertools.product(*self.option_values.values()):
            options = dict(zip(names, values))
            try:
                self.torch_optimizer([torch.nn.Parameter(torch.zeros(1))], **options)
            except ValueError:  # e.g. SGD's nesterov without momentum
                continue
            yield options

    def state_keys(self, **options):
        """The state tensors a param keeps under `options` (besides "step"), in table order."""
        optimizer = self.optimizer([torch.nn.Parameter(torch.zeros(1))], backend="torch", **options)
        return list(optimizer.state_keys(optimizer.param_groups[0]))

    def bytes_per_param(self, dtype=torch.float32, **options):
        """Bytes a step must move per param, steady state: param, grad and every state read once,
        param and every state written once, all in the param's dtype."""
        states = len(self.state_keys(**options))
        return ((2 + states) + (1 + states)) * torch.empty((), dtype=dtype).element_size()


RULES = {info.name: info for info in (
    RuleInfo("sgd", SGD, 0.05,
             option_grid=({}, {"weight_decay": 0.1, "maximize": True}, {"momentum": 0.9},
                          {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}, {"momentum": 0.9, "nesterov": True},
                          {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
             richest=({"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1, "maximize": True},
                      {"momentum": 0.9, "nesterov": True}),
             stateful={"momentum": 0.9},
             option_values={"momentum": (0.0, 0.9), "dampening": (0.0, 0.3), "nesterov": (False, True),
                            "weight_decay": (0.0, 0.1), "maximize": (False, True)},
             benchmarks=(Benchmark("sgd", "SGD", {"lr": 1e-3}),
                         Benchmark("sgd_momentum", "SGD+momentum", {"lr": 1e-3, "momentum": 0.9}))),
    RuleInfo("adam", Adam, 0.02,
             option_grid=({}, {"amsgrad": True}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
                          {"amsgrad": True, "weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
             richest=({"amsgrad": True, "weight_decay": 0.1},),
             stateful={"amsgrad": True},
             option_values={"amsgrad": (False, True), "weight_decay": (0.0, 0.1),
                            "decoupled_weight_decay": (False, True), "maximize": (False, True)},
             benchmarks=(Benchmark("adam", "Adam", {"lr": 1e-3}),)),
    RuleInfo("adamw", AdamW, 0.02,
             option_grid=({}, {"amsgrad": True, "maximize": True, "weight_decay": 0.1}),
             richest=({"amsgrad": True, "maximize": True},),
             stateful={},
             option_values={"amsgrad": (False, True), "weight_decay": (0.0, 0.1), "maximize": (False, True)},
             benchmarks=(Benchmark("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),)),
    RuleInfo("adagrad", Adagrad, 0.05,
             option_grid=({}, {"lr_decay": 0.05, "weight_decay": 0.1},
                          {"initial_accumulator_value": 0.5, "eps": 1e-6, "maximize": True}),
             richest=({"lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.1},),
             stateful={"lr_decay": 0.01},
             option_values={"lr_decay": (0.0, 0.05), "weight_decay": (0.0, 0.1),
                            "initial_accumulator_value": (0.0, 0.3), "maximize": (False, True)},
             benchmarks=(Benchmark("adagrad", "Adagrad", {"lr": 1e-2}),)),
    RuleInfo("rmsprop", RMSprop, 0.01,
             option_grid=({}, {"momentum": 0.9}, {"centered": True},
                          {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
                          {"alpha": 0.9, "eps": 1e-6}),
             richest=({"centered": True, "momentum": 0.9, "weight_decay": 0.1},),
             stateful={"momentum": 0.5, "centered": True},
             option_values={"momentum": (0.0, 0.9), "centered": (False, True), "weight_decay": (0.0, 0.1),
                            "maximize": (False, True)},
             benchmarks=(Benchmark("rmsprop", "RMSprop", {"lr": 1e-3}),)),
    RuleInfo("radam", RAdam, 0.02,
             option_grid=({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
                          {"weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
             richest=({"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},),
             stateful={},
             option_values={"weight_decay": (0.0, 0.1), "decoupled_weight_decay": (False, True),
                            "maximize": (False, True)},
             benchmarks=(Benchmark("radam", "RAdam", {"lr": 1e-3}),)),
)}
