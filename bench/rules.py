"""The update rules the benchmarks cover (fusedopt.registry's benchmark variants), their
constructor options, and the bytes each must move.

The bytes are DESIGN.md's "memory traffic per parameter": every element of the parameter, its
gradient and each state tensor read once, and the parameter and each state written once.
"""

from dataclasses import dataclass, field

import torch

from fusedopt.registry import RULES as REGISTRY


@dataclass(frozen=True)
class Rule:
    name: str  # id used on the command line and in the JSON
    label: str  # what tables and plots show
    class_name: str  # the same name in torch.optim and in fusedopt
    options: dict = field(default_factory=dict)  # constructor keyword arguments

    def bytes_per_param(self, dtype=torch.float32):
        return bytes_per_param(self.class_name, dtype, **self.options)


RULES = {variant.name: Rule(variant.name, variant.label, info.optimizer.__name__, variant.options)
         for info in REGISTRY.values() for variant in info.benchmarks}

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
    """Bytes one optimizer step must move per parameter (reads plus writes, steady state), from
    the rule's state keys under `options`.

    Parameter, gradient and state all have the parameter's dtype, so the fp32 figures scale with
    its element size: fp32 SGD 12, SGD+momentum 20, Adagrad 20, RMSprop 20 (28 with momentum,
    36 centered with momentum), Adam/AdamW/RAdam 28 (36 with amsgrad); bf16 halves each.
    """
    infos = [info for info in REGISTRY.values() if info.optimizer.__name__.lower() == class_name.lower()]
    if not infos:
        raise ValueError(f"no bytes-per-parameter entry for {class_name!r}")
    return infos[0].bytes_per_param(dtype, **options)
