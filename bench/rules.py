"""The update rules the benchmarks cover, their constructor options, and the bytes each must move.

The bytes table is DESIGN.md's "memory traffic per parameter": every element of the parameter,
its gradient and each state tensor read once, and the parameter and each state written once.
"""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Rule:
    name: str  # id used on the command line and in the JSON
    label: str  # what tables and plots show
    class_name: str  # the same name in torch.optim and in fusedopt
    options: dict = field(default_factory=dict)  # constructor keyword arguments

    def bytes_per_param(self, dtype=torch.float32):
        return bytes_per_param(self.class_name, dtype, **self.options)


RULES = {
    rule.name: rule
    for rule in (
        Rule("sgd", "SGD", "SGD", {"lr": 1e-3}),
        Rule("sgd_momentum", "SGD+momentum", "SGD", {"lr": 1e-3, "momentum": 0.9}),
        Rule("adagrad", "Adagrad", "Adagrad", {"lr": 1e-2}),
        Rule("rmsprop", "RMSprop", "RMSprop", {"lr": 1e-3}),
        Rule("adam", "Adam", "Adam", {"lr": 1e-3}),
        Rule("adamw", "AdamW", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),
    )
}

_ALIASES = {"momentum": "sgd_momentum", "sgdm": "sgd_momentum", "sgd+momentum": "sgd_momentum"}


def parse_rules(text):
    """``"adam,sgd-momentum"`` -> list of Rule; ``"all"`` or empty -> every rule."""
    if not text or text == "all":
        return list(RULES.values())
    rules = []
    for item in text.split(","):
        key = item.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key not in RULES:
            raise ValueError(f"unknown rule {item!r}; choose from {', '.join(RULES)}")
        rules.append(RULES[key])
    return rules


def bytes_per_param(class_name, dtype=torch.float32, **options):
    """Bytes one optimizer step must move per parameter (reads plus writes, steady state).

    Parameter, gradient and state all have the parameter's dtype, so the fp32 figures scale with
    its element size: fp32 SGD 12, SGD+momentum 20, Adagrad 20, RMSprop 20 (28 with momentum,
    36 centered with momentum), Adam/AdamW 28 (36 with amsgrad); bf16 halves each.
    """
    name = class_name.lower()
    if name == "sgd":
        states = 1 if options.get("momentum", 0) else 0
    elif name == "adagrad":
        states = 1
    elif name == "rmsprop":
        states = 1 + bool(options.get("momentum", 0)) + bool(options.get("centered", False))
    elif name in ("adam", "adamw"):
        states = 2 + bool(options.get("amsgrad", False))
    else:
        raise ValueError(f"no bytes-per-parameter entry for {class_name!r}")
    # read p, g and every state; write p and every state
    accesses = (2 + states) + (1 + states)
    return accesses * torch.empty((), dtype=dtype).element_size()
